// `outpost secret create|update|list|show|delete`: credentials for workloads, encrypted at rest on
// the server and delivered sealed to each device whose deployments name them (spec.secrets).
// Values go up and never come back: list and show print names, key names, versions and times.
#include <iostream>

#include "cli/cli.h"
#include "common/clock.h"
#include "common/crypto.h"
#include "common/durable_file.h"
#include "common/units.h"

namespace outpost::cli {
namespace {

struct SecretArgs {
  std::string name;
  std::vector<std::string> literals;  // K=V
  std::vector<std::string> files;     // K=FILE
  std::string rotate_at;              // RFC 3339 or +10m
};

// "+10m" (from now) or an RFC 3339 time -> Unix ms.
Result<int64_t> parse_rotate_at(const std::string& text) {
  if (!text.empty() && text.front() == '+') {
    auto ms = parse_duration_ms(text.substr(1));
    if (!ms) return make_error(Errc::kInvalidArgument, "--rotate-at: " + ms.error().message);
    return now_ms() + *ms;
  }
  auto at = parse_rfc3339_ms(text);
  if (!at) {
    return make_error(Errc::kInvalidArgument,
                      "--rotate-at: " + at.error().message + " (or a time from now like +10m)");
  }
  return *at;
}

// {"data":{key:base64}} from --from-literal and --from-file; errors name the flag, never a value.
Result<nlohmann::json> data_of(const SecretArgs& a) {
  nlohmann::json data = nlohmann::json::object();
  auto split = [](const std::string& pair, const char* flag,
                  const char* form) -> Result<std::pair<std::string, std::string>> {
    const auto eq = pair.find('=');
    if (eq == std::string::npos || eq == 0) {
      return make_error(Errc::kInvalidArgument, std::string(flag) + ": expected " + form +
                                                    ", got something without a key (" +
                                                    std::to_string(pair.size()) + " characters)");
    }
    return std::make_pair(pair.substr(0, eq), pair.substr(eq + 1));
  };
  auto add = [&](const std::string& key, std::string value, const char* flag) -> Status {
    if (data.contains(key)) {
      return make_error(Errc::kInvalidArgument,
                        std::string(flag) + ": key " + key + " is given twice");
    }
    data[key] = crypto::base64_encode(value);
    crypto::wipe(value);
    return ok();
  };
  for (const auto& pair : a.literals) {
    auto kv = split(pair, "--from-literal", "KEY=VALUE");
    if (!kv) return make_error(kv.error());
    OUTPOST_TRY(add(kv->first, std::move(kv->second), "--from-literal"));
  }
  for (const auto& pair : a.files) {
    auto kv = split(pair, "--from-file", "KEY=FILE");
    if (!kv) return make_error(kv.error());
    auto contents = read_file(kv->second);
    if (!contents) {
      return make_error(contents.error().with_context("--from-file " + kv->first));
    }
    OUTPOST_TRY(add(kv->first, std::move(*contents), "--from-file"));
  }
  if (data.empty()) {
    return make_error(Errc::kInvalidArgument,
                      "give the values with --from-literal KEY=VALUE or --from-file KEY=FILE");
  }
  return data;
}

std::string keys_text(const nlohmann::json& keys) {
  std::string out;
  for (const auto& k : keys) {
    if (k.is_string()) out += (out.empty() ? "" : ",") + k.get<std::string>();
  }
  return out.empty() ? "-" : out;
}

std::string time_text(int64_t ms) { return ms > 0 ? format_iso8601(ms) : "-"; }

void add_value_options(CLI::App* cmd, SecretArgs& a) {
  cmd->add_option("--from-literal", a.literals,
                  "KEY=VALUE (repeatable). The value is visible to other users of this machine "
                  "while the command runs (ps); prefer --from-file for real credentials");
  cmd->add_option("--from-file", a.files,
                  "KEY=FILE: the file's bytes are the value (repeatable; any bytes, up to 64 KiB)");
}

// "secret camera version 3 (keys password,user), active now" / "... switches at T".
void print_stored(const nlohmann::json& r, int64_t version) {
  std::cout << "secret " << text_of(r, "name") << " version " << version;
  for (const auto& v : list_of(r, "versions")) {
    if (int_of(v, "version") != version) continue;
    std::cout << " (keys " << keys_text(list_of(v, "keys")) << ")";
    if (text_of(v, "state") == "staged") {
      std::cout << " staged: devices switch to it at " << time_text(int_of(v, "activate_at"))
                << ", from their local copy if offline then";
    } else {
      std::cout << " active now";
    }
  }
  std::cout << "\n";
}

}  // namespace

void add_secret_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* secret = app.add_subcommand(
      "secret", "Secrets for workloads: encrypted at rest, delivered sealed to each device");
  secret->require_subcommand(1);
  secret->footer(
      "A deployment names its secrets in spec.secrets; each device running it gets them sealed to\n"
      "its own key and hands them to the workload as files: $OUTPOST_SECRETS_DIR/<secret>/<key>.\n"
      "Values are never shown again (list and show print names, keys, versions and times).\n"
      "Writes need the operator role and a user not scoped to sites (secrets are fleet-wide).\n"
      "Examples:\n"
      "  outpost secret create camera --from-literal user=cam --from-file password=./pw.txt\n"
      "  outpost secret update camera --from-literal user=cam --from-file password=./new.txt \\\n"
      "      --rotate-at +10m\n"
      "  outpost secret show camera");

  auto args = std::make_shared<SecretArgs>();
  auto* create = secret->add_subcommand("create", "Create a secret (version 1, active at once)");
  create->add_option("NAME", args->name, "Secret name (lowercase letters, digits, '-', '.', '_')")
      ->required();
  add_value_options(create, *args);
  create->footer(
      "Example: outpost secret create camera --from-literal user=cam --from-file "
      "password=./pw.txt\n"
      "Then name it in a deployment: spec.secrets: [camera]; the workload reads\n"
      "$OUTPOST_SECRETS_DIR/camera/password.");
  create->callback([&options, &exit_code, args] {
    Session session(options);
    auto data = data_of(*args);
    if (!data) {
      exit_code = session.fail(data.error());
      return;
    }
    nlohmann::json body = {{"name", args->name}, {"data", std::move(*data)}};
    auto result = session.perform("POST", "/api/v1/secrets", exit_code, body.dump());
    if (!result || session.json_output()) return;
    print_stored(*result, 1);
  });

  auto* update = secret->add_subcommand(
      "update", "Store the next version of a secret: at once, or staged with --rotate-at");
  update->add_option("NAME", args->name, "Secret name")->required();
  add_value_options(update, *args);
  update->add_option("--rotate-at", args->rotate_at,
                     "When devices switch to the new version: an RFC 3339 time "
                     "(2026-12-07T02:00:00Z) or a time from now (+10m). Devices receive it ahead "
                     "and switch on time from their local copy, even offline. Default: at once");
  update->footer(
      "The new version replaces every key (give them all). On the switch the agent rewrites the\n"
      "files atomically and restarts the workload, or sends it SIGHUP with\n"
      "spec.workload.on_secret_rotate: sighup.\n"
      "Examples:\n"
      "  outpost secret update camera --from-literal user=cam --from-file password=./new.txt\n"
      "  outpost secret update camera --from-literal user=cam --from-file password=./new.txt \\\n"
      "      --rotate-at 2026-12-08T02:00:00Z\n"
      "  outpost secret update camera --from-literal user=cam --from-file password=./new.txt \\\n"
      "      --rotate-at +10m");
  update->callback([&options, &exit_code, args] {
    Session session(options);
    auto data = data_of(*args);
    if (!data) {
      exit_code = session.fail(data.error());
      return;
    }
    nlohmann::json body = {{"data", std::move(*data)}};
    if (!args->rotate_at.empty()) {
      auto at = parse_rotate_at(args->rotate_at);
      if (!at) {
        exit_code = session.fail(at.error());
        return;
      }
      body["rotate_at"] = *at;
    }
    auto result =
        session.perform("PUT", "/api/v1/secrets/" + url_encode(args->name), exit_code, body.dump());
    if (!result || session.json_output()) return;
    print_stored(*result, int_of(*result, "version"));
  });

  auto* list = secret->add_subcommand("list", "List secrets (names, keys and versions; no values)");
  list->footer("Example: outpost secret list -o json");
  list->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/secrets", exit_code, "secrets");
    if (!result) return;
    Table table({"NAME", "VERSION", "KEYS", "UPDATED", "ROTATE AT"});
    for (const auto& s : list_of(*result, "secrets")) {
      std::string rotate = "-";
      if (int_of(s, "rotate_at") > 0) {
        rotate = time_text(int_of(s, "rotate_at")) + " (v" + text_of(s, "staged_version") + ")";
      }
      table.add({text_of(s, "name"), text_of(s, "active_version"), keys_text(list_of(s, "keys")),
                 time_text(int_of(s, "updated_at")), rotate});
    }
    std::cout << table.render();
    if (table.empty()) std::cerr << "no secrets yet (outpost secret create --help)\n";
    exit_code = kExitOk;
  });

  auto shown = std::make_shared<std::string>();
  auto* show = secret->add_subcommand(
      "show", "Show a secret's metadata: versions, key names, created, rotate_at (no values)");
  show->add_option("NAME", *shown, "Secret name")->required();
  show->footer("Example: outpost secret show camera");
  show->callback([&options, &exit_code, shown] {
    Session session(options);
    auto result = session.fetch("/api/v1/secrets/" + url_encode(*shown), exit_code);
    if (!result) return;
    const auto& s = *result;
    std::cout << "Secret:      " << text_of(s, "name") << "\n"
              << "Created:     " << time_text(int_of(s, "created_at")) << "\n"
              << "Updated:     " << time_text(int_of(s, "updated_at")) << "\n"
              << "Active:      version " << text_of(s, "active_version") << " (keys "
              << keys_text(list_of(s, "keys")) << ")\n"
              << "Rotate at:   "
              << (int_of(s, "rotate_at") > 0 ? time_text(int_of(s, "rotate_at")) + " (version " +
                                                   text_of(s, "staged_version") + ")"
                                             : std::string("-"))
              << "\n";
    std::string used;
    for (const auto& d : list_of(s, "deployments")) {
      if (d.is_string()) used += (used.empty() ? "" : ", ") + d.get<std::string>();
    }
    std::cout << "Deployments: " << (used.empty() ? "(none names it)" : used) << "\n";
    Table table({"VERSION", "STATE", "KEYS", "ACTIVATE AT", "CREATED", "BY"});
    for (const auto& v : list_of(s, "versions")) {
      table.add({text_of(v, "version"), text_of(v, "state"), keys_text(list_of(v, "keys")),
                 time_text(int_of(v, "activate_at")), time_text(int_of(v, "created_at")),
                 text_of(v, "created_by")});
    }
    std::cout << table.render();
    exit_code = kExitOk;
  });

  auto removed = std::make_shared<std::string>();
  auto* remove = secret->add_subcommand(
      "delete",
      "Delete a secret: devices drop it on their next sync; workloads naming it are stopped "
      "and wait for it");
  remove->add_option("NAME", *removed, "Secret name")->required();
  remove->footer("Example: outpost secret delete camera");
  remove->callback([&options, &exit_code, removed] {
    Session session(options);
    auto result = session.perform("DELETE", "/api/v1/secrets/" + url_encode(*removed), exit_code);
    if (!result || session.json_output()) return;
    std::cout << "secret " << *removed << " deleted\n";
  });
}

}  // namespace outpost::cli
