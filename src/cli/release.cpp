// `outpost release keys init|rotate` and `outpost release status`: the offline root of signed
// release metadata (common/release_meta.h). The root keys live in a directory the operator
// keeps off the server (removable media, a vault); the CLI reads them only to sign a root.
#include <sys/stat.h>

#include <iostream>

#include "cli/cli.h"
#include "common/crypto.h"
#include "common/durable_file.h"
#include "common/release_meta.h"
#include "common/units.h"

namespace outpost::cli {
namespace {

using json = nlohmann::json;

struct KeysArgs {
  std::string dir;
  int keys = 3;
  int threshold = 2;
  std::string expires = "365d";
  bool new_root_keys = false;
};

std::string keys_dir(const std::string& dir) { return dir + "/keys"; }

// keyid -> pair, for every DIR/keys/<keyid>.key.
Result<std::map<std::string, crypto::Ed25519KeyPair>> load_root_keys(const std::string& dir) {
  std::map<std::string, crypto::Ed25519KeyPair> out;
  for (const auto& name : list_directory(keys_dir(dir))) {
    if (name.size() < 5 || name.substr(name.size() - 4) != ".key") continue;
    const std::string path = keys_dir(dir) + "/" + name;
    auto text = read_file(path);
    if (!text) return make_error(text.error());
    auto pair = crypto::key_pair_from_secret(*text, path);
    if (!pair) return make_error(pair.error());
    out[release::key_id(pair->public_key)] = *pair;
  }
  return out;
}

Result<std::vector<crypto::Ed25519KeyPair>> make_root_keys(const std::string& dir, int count) {
  OUTPOST_TRY(make_dirs(keys_dir(dir), 0700));
  std::vector<crypto::Ed25519KeyPair> made;
  for (int i = 0; i < count; ++i) {
    auto pair = crypto::ed25519_generate();
    const std::string path = keys_dir(dir) + "/" + release::key_id(pair.public_key) + ".key";
    OUTPOST_TRY(write_file_durably(path, crypto::base64_encode(pair.secret_key) + "\n", 0600));
    made.push_back(pair);
  }
  return made;
}

// The root the CLI builds: the root keys with their threshold, and the server's online key as
// the only key of the targets and timestamp roles.
release::Root build_root(int64_t version, int64_t expires_ms,
                         const std::vector<crypto::Ed25519KeyPair>& root_keys, int threshold,
                         const std::string& online_public) {
  release::Root root;
  root.version = version;
  root.expires_ms = expires_ms;
  release::RoleKeys root_role;
  root_role.threshold = threshold;
  for (const auto& k : root_keys) {
    const std::string id = release::key_id(k.public_key);
    root.keys[id] = k.public_key;
    root_role.keyids.push_back(id);
  }
  const std::string online_id = release::key_id(online_public);
  root.keys[online_id] = online_public;
  root.roles[std::string(release::kRoot)] = root_role;
  root.roles[std::string(release::kTargets)] = {{online_id}, 1};
  root.roles[std::string(release::kTimestamp)] = {{online_id}, 1};
  return root;
}

Result<std::string> online_public_of(const json& key) {
  auto pub = crypto::base64_decode(text_of(key, "public"));
  if (!pub || pub->size() != 32) {
    return make_error(Errc::kInternal, "the server's answer holds no valid online public key");
  }
  return *pub;
}

void print_status(const json& s) {
  const json& root = object_of(s, "root");
  if (root.empty()) {
    std::cout << "Release metadata: none yet (no root). Devices check artifacts by digest only.\n"
              << "Make the offline root keys: outpost release keys init --dir DIR\n";
  } else {
    std::cout << "Root:       version " << text_of(root, "version") << ", expires "
              << text_of(root, "expires") << ", " << text_of(root, "threshold") << " of "
              << list_of(root, "keys").size() << " root keys sign it\n";
    const json& t = object_of(s, "targets");
    if (!t.empty()) {
      std::cout << "Targets:    version " << text_of(t, "version") << ", expires "
                << text_of(t, "expires") << ", " << text_of(t, "artifacts") << " artifact(s)\n";
    }
    const json& ts = object_of(s, "timestamp");
    if (!ts.empty()) {
      std::cout << "Timestamp:  version " << text_of(ts, "version") << ", expires "
                << text_of(ts, "expires") << "\n";
    }
  }
  std::cout << "Online key: " << text_of(object_of(s, "online_key"), "keyid").substr(0, 16)
            << " (held by the server; signs targets and timestamp)\n";
  if (!object_of(s, "pending_key").empty()) {
    std::cout << "Pending:    " << text_of(object_of(s, "pending_key"), "keyid").substr(0, 16)
              << " (takes over when a root naming it is installed)\n";
  }
  if (!text_of(s, "error").empty()) std::cout << "Problem:    " << text_of(s, "error") << "\n";
}

Status check_counts(const KeysArgs& a) {
  if (a.keys < 1 || a.keys > release::kMaxKeysPerRole) {
    return make_error(Error{Errc::kInvalidArgument,
                            "--keys: " + std::to_string(a.keys) + " is not between 1 and " +
                                std::to_string(release::kMaxKeysPerRole),
                            "keys"});
  }
  if (a.threshold < 1 || a.threshold > a.keys) {
    return make_error(Error{Errc::kInvalidArgument,
                            "--threshold: " + std::to_string(a.threshold) +
                                " must be between 1 and --keys (" + std::to_string(a.keys) + ")",
                            "threshold"});
  }
  return ok();
}

Result<int64_t> expiry_of(const KeysArgs& a) {
  auto ms = parse_duration_ms(a.expires);
  if (!ms || *ms <= 0) {
    return make_error(Error{Errc::kInvalidArgument,
                            "--expires: expected a duration like 365d, got \"" + a.expires + "\"",
                            "expires"});
  }
  return now_ms() + *ms;
}

int keys_init(Session& session, const KeysArgs& a) {
  if (auto counts = check_counts(a); !counts) return session.fail(counts.error());
  auto expires = expiry_of(a);
  if (!expires) return session.fail(expires.error());
  auto existing = load_root_keys(a.dir);
  if (!existing) return session.fail(existing.error());
  if (!existing->empty()) {
    return session.fail(Error{Errc::kAlreadyExists,
                              a.dir +
                                  " already holds root keys: to change keys or extend the "
                                  "root, use `outpost release keys rotate --dir " +
                                  a.dir + "`",
                              "dir"});
  }
  auto status = session.call("GET", "/api/v1/release");
  if (!status) return session.fail(status.error());
  if (!object_of(*status, "root").empty()) {
    return session.fail(Error{
        Errc::kAlreadyExists,
        "the server already has root version " + text_of(object_of(*status, "root"), "version") +
            ": use `outpost release keys rotate --dir DIR` with its root keys",
        ""});
  }
  auto online = online_public_of(object_of(*status, "online_key"));
  if (!online) return session.fail(online.error());
  auto keys = make_root_keys(a.dir, a.keys);
  if (!keys) return session.fail(keys.error());
  release::Root root = build_root(1, *expires, *keys, a.threshold, *online);
  std::vector<std::string> secrets;
  for (const auto& k : *keys) secrets.push_back(k.secret_key);
  const std::string text = release::sign_document(release::root_signed(root), secrets);
  if (auto saved = write_file_durably(a.dir + "/root.json", text, 0644); !saved) {
    return session.fail(saved.error());
  }
  auto accepted = session.call("PUT", "/api/v1/release/root", text);
  if (!accepted) return session.fail(accepted.error());
  if (session.json_output()) {
    session.print_json(*accepted);
    return kExitOk;
  }
  std::cout << "Root version 1 installed: " << a.threshold << " of " << a.keys
            << " root keys must sign each new root; it expires " << release::format_time(*expires)
            << ".\n"
            << "The root keys are in " << keys_dir(a.dir)
            << "/: move them off this machine (removable media, a vault) and keep them\n"
            << "apart; `outpost release keys rotate --dir DIR` needs " << a.threshold
            << " of them again.\n";
  print_status(*accepted);
  return kExitOk;
}

// keys_given/threshold_given: the flags were on the command line (else the current root's).
int keys_rotate(Session& session, KeysArgs a, bool keys_given, bool threshold_given) {
  auto expires = expiry_of(a);
  if (!expires) return session.fail(expires.error());
  auto held = load_root_keys(a.dir);
  if (!held) return session.fail(held.error());
  auto current_text = session.call("GET", "/api/v1/device/release/root");
  if (!current_text) return session.fail(current_text.error());
  auto current = release::verify_first_root(current_text->dump());
  if (!current) {
    return session.fail(current.error().with_context("the server's current root"));
  }
  const auto& role = current->roles.at(std::string(release::kRoot));
  std::vector<std::string> old_secrets;
  for (const auto& id : role.keyids) {
    if (auto it = held->find(id); it != held->end()) old_secrets.push_back(it->second.secret_key);
  }
  if (static_cast<int>(old_secrets.size()) < role.threshold) {
    return session.fail(Error{Errc::kFailedPrecondition,
                              a.dir + "/keys holds " + std::to_string(old_secrets.size()) +
                                  " of the root keys of root version " +
                                  std::to_string(current->version) + "; it takes " +
                                  std::to_string(role.threshold) + " to sign the next one",
                              "dir"});
  }
  if (!keys_given) a.keys = static_cast<int>(role.keyids.size());
  if (!threshold_given) a.threshold = std::min(role.threshold, a.keys);
  if (auto counts = check_counts(a); !counts) return session.fail(counts.error());
  // A new online key every time: rotating is also how a server's stolen key is retired.
  auto pending = session.call("POST", "/api/v1/release/online-key");
  if (!pending) return session.fail(pending.error());
  auto online = online_public_of(*pending);
  if (!online) return session.fail(online.error());
  std::vector<crypto::Ed25519KeyPair> root_keys;
  std::vector<std::string> retired;
  if (a.new_root_keys) {
    auto made = make_root_keys(a.dir, a.keys);
    if (!made) return session.fail(made.error());
    root_keys = *made;
    retired = role.keyids;
  } else {
    if (keys_given && a.keys != static_cast<int>(role.keyids.size())) {
      return session.fail(Error{Errc::kInvalidArgument,
                                "--keys changes the number of root keys: add --new-root-keys",
                                "keys"});
    }
    for (const auto& id : role.keyids) {
      auto it = held->find(id);
      crypto::Ed25519KeyPair pub_only;
      pub_only.public_key = current->keys.at(id);
      root_keys.push_back(it != held->end() ? it->second : pub_only);
    }
  }
  release::Root next = build_root(current->version + 1, *expires, root_keys, a.threshold, *online);
  std::vector<std::string> secrets = old_secrets;
  for (const auto& k : root_keys) {
    if (k.secret_key.empty()) continue;
    if (std::find(secrets.begin(), secrets.end(), k.secret_key) == secrets.end()) {
      secrets.push_back(k.secret_key);
    }
  }
  const std::string text = release::sign_document(release::root_signed(next), secrets);
  auto accepted = session.call("PUT", "/api/v1/release/root", text);
  if (!accepted) return session.fail(accepted.error());
  (void)write_file_durably(a.dir + "/root.json", text, 0644);
  if (!retired.empty()) {
    (void)make_dirs(a.dir + "/retired", 0700);
    for (const auto& id : retired) {
      const std::string from = keys_dir(a.dir) + "/" + id + ".key";
      if (::access(from.c_str(), F_OK) == 0) {
        (void)rename_durably(from, a.dir + "/retired/" + id + ".key");
      }
    }
  }
  if (session.json_output()) {
    session.print_json(*accepted);
    return kExitOk;
  }
  std::cout << "Root version " << next.version << " installed (signed by root version "
            << current->version << "'s keys" << (a.new_root_keys ? " and the new ones" : "")
            << "); the server signs with a new online key from now on.\n";
  if (a.new_root_keys) {
    std::cout << "New root keys are in " << keys_dir(a.dir) << "/; the old ones moved to " << a.dir
              << "/retired/ (devices no longer accept them).\n";
  }
  print_status(*accepted);
  return kExitOk;
}

}  // namespace

void add_release_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* rel = app.add_subcommand("release", "Signed release metadata: offline root keys, status");
  rel->require_subcommand(1);
  rel->footer(
      "Devices install an artifact only when signed metadata lists it with its length: root\n"
      "(offline keys, a threshold of them) names the server's online key, which signs targets\n"
      "(every artifact) and timestamp (short-lived). Refused: rollback, freeze, mix-and-match,\n"
      "endless data. Example: outpost release keys init --dir /media/usb/outpost-root");

  auto* status = rel->add_subcommand("status", "Root, targets and timestamp versions and expiry");
  status->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/release", exit_code);
    if (!result) return;
    print_status(*result);
  });

  auto* keys = rel->add_subcommand("keys", "Make or rotate the offline root keys");
  keys->require_subcommand(1);
  auto args = std::make_shared<KeysArgs>();
  auto* init = keys->add_subcommand(
      "init", "Make the root keys in DIR and install root version 1 on the server");
  init->add_option("--dir", args->dir, "Where the root keys go (keep it offline)")->required();
  init->add_option("--keys", args->keys, "How many root keys")->capture_default_str();
  init->add_option("--threshold", args->threshold, "How many must sign a new root")
      ->capture_default_str();
  init->add_option("--expires", args->expires, "Root expiry (devices refuse an expired root)")
      ->capture_default_str();
  init->footer(
      "Example: outpost release keys init --dir /media/usb/outpost-root --keys 3 "
      "--threshold 2");
  init->callback([&options, &exit_code, args] {
    Session session(options);
    exit_code = keys_init(session, *args);
  });

  auto* rotate = keys->add_subcommand(
      "rotate",
      "Sign root version N+1 with DIR's keys: a new online key on the server, a new expiry, and "
      "with --new-root-keys new root keys");
  rotate->add_option("--dir", args->dir, "The root keys (a threshold of them)")->required();
  rotate->add_flag("--new-root-keys", args->new_root_keys,
                   "Replace the root keys too (the old ones sign the hand-over, then retire)");
  auto* keys_flag = rotate->add_option("--keys", args->keys, "With --new-root-keys: how many");
  auto* threshold_flag =
      rotate->add_option("--threshold", args->threshold, "How many must sign a new root");
  rotate->add_option("--expires", args->expires, "Expiry of the new root")->capture_default_str();
  rotate->footer(
      "Example: outpost release keys rotate --dir /media/usb/outpost-root\n"
      "         outpost release keys rotate --dir /media/usb/outpost-root --new-root-keys");
  rotate->callback([&options, &exit_code, args, keys_flag, threshold_flag] {
    Session session(options);
    exit_code = keys_rotate(session, *args, keys_flag->count() > 0, threshold_flag->count() > 0);
  });
}

}  // namespace outpost::cli
