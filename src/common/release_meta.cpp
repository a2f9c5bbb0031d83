#include "common/release_meta.h"

#include <algorithm>
#include <ctime>
#include <set>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/json_fields.h"

namespace outpost::release {
namespace {

using json = nlohmann::json;

constexpr std::string_view kContext = "outpost-release-v1\n";

Error field_error(const std::string& where, const std::string& what) {
  return Error{Errc::kInvalidArgument, where + ": " + what, where};
}

Result<int64_t> int_field(const json& obj, const std::string& key, const std::string& where,
                          int64_t min_value) {
  auto it = obj.find(key);
  if (it == obj.end()) return make_error(field_error(where + "." + key, "missing"));
  if (!it->is_number_integer()) {
    return make_error(field_error(where + "." + key, "must be an integer"));
  }
  const int64_t v = it->get<int64_t>();
  if (v < min_value) {
    return make_error(field_error(where + "." + key,
                                  std::to_string(v) + " is below " + std::to_string(min_value)));
  }
  return v;
}

Result<std::string> string_field(const json& obj, const std::string& key,
                                 const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end()) return make_error(field_error(where + "." + key, "missing"));
  if (!it->is_string()) return make_error(field_error(where + "." + key, "must be a string"));
  return it->get<std::string>();
}

Result<int64_t> expires_field(const json& obj, const std::string& where) {
  auto text = string_field(obj, "expires", where);
  if (!text) return make_error(text.error());
  auto t = parse_time(*text);
  if (!t) return make_error(field_error(where + ".expires", t.error().message));
  return *t;
}

// The two fields every document has: a version of at least 1 and an expiry.
template <typename Doc>
Status read_version_and_expiry(const json& s, const std::string& where, Doc& doc) {
  auto version = int_field(s, "version", where, 1);
  if (!version) return make_error(version.error());
  doc.version = *version;
  auto expires = expires_field(s, where);
  if (!expires) return make_error(expires.error());
  doc.expires_ms = *expires;
  return ok();
}

bool is_hex(std::string_view s, size_t len) {
  if (s.size() != len) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

std::string role_title(std::string_view role) { return std::string(role) + " metadata"; }

Status check_not_expired(std::string_view role, int64_t version, int64_t expires_ms,
                         int64_t now_ms) {
  if (expires_ms > now_ms) return ok();
  return make_error(Errc::kPermissionDenied,
                    "freeze refused: " + role_title(role) + " version " + std::to_string(version) +
                        " expired at " + format_time(expires_ms) + " (now " + format_time(now_ms) +
                        "): the server or something between is serving stale metadata");
}

Status check_no_rollback(std::string_view role, int64_t version, int64_t trusted_version) {
  if (version >= trusted_version) return ok();
  return make_error(Errc::kPermissionDenied,
                    "rollback refused: " + role_title(role) + " version " +
                        std::to_string(version) + " is older than version " +
                        std::to_string(trusted_version) + ", which this device already trusts");
}

}  // namespace

std::string key_id(std::string_view public_key) { return sha256_hex(public_key); }

std::string signing_bytes(const json& signed_part) {
  std::string out(kContext);
  out += signed_part.dump();
  return out;
}

std::string sign_document(const json& signed_part, const std::vector<std::string>& secret_keys) {
  const std::string bytes = signing_bytes(signed_part);
  json sigs = json::array();
  for (const auto& secret : secret_keys) {
    // libsodium's secret key ends with its public key.
    const std::string public_key = secret.substr(32);
    sigs.push_back({{"keyid", key_id(public_key)},
                    {"sig", crypto::base64_encode(crypto::ed25519_sign(bytes, secret))}});
  }
  return json{{"signed", signed_part}, {"signatures", sigs}}.dump();
}

Result<Envelope> parse_envelope(std::string_view text, std::string_view expected_type,
                                size_t max_bytes) {
  const std::string what = std::string(expected_type) + " metadata";
  if (text.size() > max_bytes) {
    return make_error(Errc::kPayloadTooLarge,
                      "endless data refused: " + what + " is " + std::to_string(text.size()) +
                          " bytes, over its bound of " + std::to_string(max_bytes));
  }
  OUTPOST_TRY(json_fields::check_nesting(text, what));
  json doc = json::parse(text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) {
    return make_error(Errc::kInvalidArgument, what + ": not a JSON object");
  }
  auto s = doc.find("signed");
  if (s == doc.end() || !s->is_object()) {
    return make_error(field_error(what + ".signed", "missing or not an object"));
  }
  auto type = string_field(*s, "_type", what + ".signed");
  if (!type) return make_error(type.error());
  if (*type != expected_type) {
    return make_error(field_error(what + ".signed._type", "is \"" + *type + "\", expected \"" +
                                                              std::string(expected_type) + "\""));
  }
  auto sigs = doc.find("signatures");
  if (sigs == doc.end() || !sigs->is_array()) {
    return make_error(field_error(what + ".signatures", "missing or not an array"));
  }
  if (sigs->size() > static_cast<size_t>(kMaxKeysPerRole) * 2) {
    return make_error(field_error(
        what + ".signatures", "more than " + std::to_string(kMaxKeysPerRole * 2) + " signatures"));
  }
  Envelope env;
  env.type = *type;
  for (size_t i = 0; i < sigs->size(); ++i) {
    const std::string where = what + ".signatures[" + std::to_string(i) + "]";
    const json& sig = (*sigs)[i];
    if (!sig.is_object()) return make_error(field_error(where, "must be an object"));
    auto keyid = string_field(sig, "keyid", where);
    if (!keyid) return make_error(keyid.error());
    auto value = string_field(sig, "sig", where);
    if (!value) return make_error(value.error());
    auto raw = crypto::base64_decode(*value);
    if (!raw || raw->size() != 64) {
      return make_error(field_error(where + ".sig", "must be a base64 Ed25519 signature"));
    }
    env.signatures.emplace_back(*keyid, *raw);
  }
  env.signed_part = std::move(*s);
  return env;
}

Result<Root> root_from(const Envelope& env) {
  const json& s = env.signed_part;
  const std::string where = "root metadata.signed";
  Root root;
  OUTPOST_TRY(read_version_and_expiry(s, where, root));
  auto keys = s.find("keys");
  if (keys == s.end() || !keys->is_object()) {
    return make_error(field_error(where + ".keys", "missing or not an object"));
  }
  for (const auto& [keyid, key] : keys->items()) {
    const std::string kw = where + ".keys." + keyid;
    if (!key.is_object()) return make_error(field_error(kw, "must be an object"));
    auto scheme = string_field(key, "scheme", kw);
    if (!scheme) return make_error(scheme.error());
    if (*scheme != "ed25519") {
      return make_error(field_error(kw + ".scheme", "\"" + *scheme + "\" is not ed25519"));
    }
    auto pub_b64 = string_field(key, "public", kw);
    if (!pub_b64) return make_error(pub_b64.error());
    auto pub = crypto::base64_decode(*pub_b64);
    if (!pub || pub->size() != 32) {
      return make_error(field_error(kw + ".public", "must be a base64 32-byte Ed25519 key"));
    }
    if (key_id(*pub) != keyid) {
      return make_error(field_error(kw, "the key id is not the SHA-256 of its public key"));
    }
    root.keys[keyid] = *pub;
  }
  auto roles = s.find("roles");
  if (roles == s.end() || !roles->is_object()) {
    return make_error(field_error(where + ".roles", "missing or not an object"));
  }
  for (std::string_view name : {kRoot, kTargets, kTimestamp}) {
    const std::string rw = where + ".roles." + std::string(name);
    auto r = roles->find(std::string(name));
    if (r == roles->end() || !r->is_object()) {
      return make_error(field_error(rw, "missing or not an object"));
    }
    RoleKeys role;
    auto threshold = int_field(*r, "threshold", rw, 1);
    if (!threshold) return make_error(threshold.error());
    auto ids = r->find("keyids");
    if (ids == r->end() || !ids->is_array()) {
      return make_error(field_error(rw + ".keyids", "missing or not an array"));
    }
    if (ids->size() > static_cast<size_t>(kMaxKeysPerRole)) {
      return make_error(
          field_error(rw + ".keyids", "more than " + std::to_string(kMaxKeysPerRole) + " keys"));
    }
    std::set<std::string> seen;
    for (const auto& id : *ids) {
      if (!id.is_string()) return make_error(field_error(rw + ".keyids", "must hold strings"));
      const std::string keyid = id.get<std::string>();
      if (!root.keys.contains(keyid)) {
        return make_error(field_error(rw + ".keyids", keyid + " is not in keys"));
      }
      if (!seen.insert(keyid).second) {
        return make_error(field_error(rw + ".keyids", keyid + " is listed twice"));
      }
      role.keyids.push_back(keyid);
    }
    if (*threshold > static_cast<int64_t>(role.keyids.size())) {
      return make_error(field_error(rw + ".threshold",
                                    std::to_string(*threshold) + " is over the " +
                                        std::to_string(role.keyids.size()) + " keys of the role"));
    }
    role.threshold = static_cast<int>(*threshold);
    root.roles[std::string(name)] = std::move(role);
  }
  return root;
}

Result<Targets> targets_from(const Envelope& env) {
  const json& s = env.signed_part;
  const std::string where = "targets metadata.signed";
  Targets t;
  OUTPOST_TRY(read_version_and_expiry(s, where, t));
  auto list = s.find("targets");
  if (list == s.end() || !list->is_object()) {
    return make_error(field_error(where + ".targets", "missing or not an object"));
  }
  for (const auto& [digest, entry] : list->items()) {
    const std::string tw = where + ".targets." + digest;
    if (!is_digest_ref(digest)) return make_error(field_error(tw, "is not a sha256:<hex> digest"));
    if (!entry.is_object()) return make_error(field_error(tw, "must be an object"));
    auto length = int_field(entry, "length", tw, 0);
    if (!length) return make_error(length.error());
    t.targets[digest] = *length;
  }
  return t;
}

Result<Timestamp> timestamp_from(const Envelope& env) {
  const json& s = env.signed_part;
  const std::string where = "timestamp metadata.signed";
  Timestamp t;
  OUTPOST_TRY(read_version_and_expiry(s, where, t));
  auto meta = s.find("targets");
  if (meta == s.end() || !meta->is_object()) {
    return make_error(field_error(where + ".targets", "missing or not an object"));
  }
  const std::string mw = where + ".targets";
  auto tv = int_field(*meta, "version", mw, 1);
  if (!tv) return make_error(tv.error());
  auto length = int_field(*meta, "length", mw, 1);
  if (!length) return make_error(length.error());
  auto hash = string_field(*meta, "sha256", mw);
  if (!hash) return make_error(hash.error());
  if (!is_hex(*hash, 64)) return make_error(field_error(mw + ".sha256", "must be 64 hex digits"));
  t.targets_version = *tv;
  t.targets_length = *length;
  t.targets_sha256 = *hash;
  return t;
}

json root_signed(const Root& root) {
  json keys = json::object();
  for (const auto& [id, pub] : root.keys) {
    keys[id] = {{"scheme", "ed25519"}, {"public", crypto::base64_encode(pub)}};
  }
  json roles = json::object();
  for (const auto& [name, role] : root.roles) {
    roles[name] = {{"keyids", role.keyids}, {"threshold", role.threshold}};
  }
  return {{"_type", kRoot},
          {"version", root.version},
          {"expires", format_time(root.expires_ms)},
          {"keys", keys},
          {"roles", roles}};
}

json targets_signed(const Targets& targets) {
  json list = json::object();
  for (const auto& [digest, length] : targets.targets) list[digest] = {{"length", length}};
  return {{"_type", kTargets},
          {"version", targets.version},
          {"expires", format_time(targets.expires_ms)},
          {"targets", list}};
}

json timestamp_signed(const Timestamp& t) {
  return {{"_type", kTimestamp},
          {"version", t.version},
          {"expires", format_time(t.expires_ms)},
          {"targets",
           {{"version", t.targets_version},
            {"sha256", t.targets_sha256},
            {"length", t.targets_length}}}};
}

Status verify_signatures(const Envelope& env, const Root& root, std::string_view role) {
  auto r = root.roles.find(std::string(role));
  if (r == root.roles.end()) {
    return make_error(Errc::kInternal, "root version " + std::to_string(root.version) + " has no " +
                                           std::string(role) + " role");
  }
  const std::string bytes = signing_bytes(env.signed_part);
  std::set<std::string> valid;
  for (const auto& [keyid, sig] : env.signatures) {
    if (std::find(r->second.keyids.begin(), r->second.keyids.end(), keyid) ==
        r->second.keyids.end()) {
      continue;
    }
    if (valid.contains(keyid)) continue;  // one key counts once, however often it signs
    if (crypto::ed25519_verify(bytes, sig, root.keys.at(keyid))) valid.insert(keyid);
  }
  if (static_cast<int>(valid.size()) >= r->second.threshold) return ok();
  return make_error(Errc::kPermissionDenied,
                    "signature refused: " + env.type + " metadata has " +
                        std::to_string(valid.size()) + " valid signature(s) from the keys root " +
                        "version " + std::to_string(root.version) + " gives the " +
                        std::string(role) + " role; it needs " +
                        std::to_string(r->second.threshold));
}

std::string format_time(int64_t unix_ms) {
  std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Result<int64_t> parse_time(const std::string& text) {
  std::tm tm{};
  const char* end = strptime(text.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (!end || *end != '\0' || tm.tm_year < 70 || tm.tm_year > 8000) {
    return make_error(Errc::kInvalidArgument,
                      "\"" + text.substr(0, 64) + "\" is not a UTC time like 2027-01-31T12:00:00Z");
  }
  return static_cast<int64_t>(timegm(&tm)) * 1000;
}

Result<Root> verify_first_root(std::string_view text) {
  auto env = parse_envelope(text, kRoot, kMaxRootBytes);
  if (!env) return make_error(env.error());
  auto root = root_from(*env);
  if (!root) return make_error(root.error());
  OUTPOST_TRY(verify_signatures(*env, *root, kRoot));
  return root;
}

Result<Root> verify_next_root(const Root& trusted, std::string_view text) {
  auto env = parse_envelope(text, kRoot, kMaxRootBytes);
  if (!env) return make_error(env.error());
  auto next = root_from(*env);
  if (!next) return make_error(next.error());
  // Both the keys that were trusted and the keys it names must agree: a stolen old key set
  // cannot hand trust to keys nobody holds, nor new keys take over without the old ones.
  OUTPOST_TRY(verify_signatures(*env, trusted, kRoot));
  OUTPOST_TRY(verify_signatures(*env, *next, kRoot));
  if (next->version != trusted.version + 1) {
    return make_error(Errc::kPermissionDenied,
                      "rollback refused: root metadata version " + std::to_string(next->version) +
                          " does not follow version " + std::to_string(trusted.version) +
                          ", the root trusted now (each root must be the next version)");
  }
  return next;
}

Result<Timestamp> verify_timestamp(const Root& root, std::string_view text,
                                   const std::optional<Timestamp>& previous, int64_t now_ms) {
  auto env = parse_envelope(text, kTimestamp, kMaxTimestampBytes);
  if (!env) return make_error(env.error());
  auto ts = timestamp_from(*env);
  if (!ts) return make_error(ts.error());
  OUTPOST_TRY(verify_signatures(*env, root, kTimestamp));
  if (previous) {
    OUTPOST_TRY(check_no_rollback(kTimestamp, ts->version, previous->version));
    if (ts->targets_version < previous->targets_version) {
      return make_error(Errc::kPermissionDenied,
                        "rollback refused: timestamp metadata names targets version " +
                            std::to_string(ts->targets_version) + ", older than version " +
                            std::to_string(previous->targets_version) +
                            ", which this device already trusts");
    }
  }
  OUTPOST_TRY(check_not_expired(kTimestamp, ts->version, ts->expires_ms, now_ms));
  return ts;
}

Result<Targets> verify_targets(const Root& root, const Timestamp& timestamp, std::string_view text,
                               const std::optional<Targets>& previous, int64_t now_ms) {
  if (text.size() > static_cast<size_t>(timestamp.targets_length)) {
    return make_error(Errc::kPermissionDenied,
                      "endless data refused: targets metadata is " + std::to_string(text.size()) +
                          " bytes, longer than the " + std::to_string(timestamp.targets_length) +
                          " bytes timestamp version " + std::to_string(timestamp.version) +
                          " signs");
  }
  const std::string hash = sha256_hex(text);
  if (hash != timestamp.targets_sha256) {
    return make_error(Errc::kPermissionDenied,
                      "mix-and-match refused: targets metadata sha256:" + hash.substr(0, 16) +
                          "… is not the document timestamp version " +
                          std::to_string(timestamp.version) + " names (targets version " +
                          std::to_string(timestamp.targets_version) +
                          ", sha256:" + timestamp.targets_sha256.substr(0, 16) + "…)");
  }
  auto env = parse_envelope(text, kTargets, kMaxTargetsBytes);
  if (!env) return make_error(env.error());
  auto targets = targets_from(*env);
  if (!targets) return make_error(targets.error());
  OUTPOST_TRY(verify_signatures(*env, root, kTargets));
  if (targets->version != timestamp.targets_version) {
    return make_error(Errc::kPermissionDenied,
                      "mix-and-match refused: targets metadata is version " +
                          std::to_string(targets->version) + " but timestamp version " +
                          std::to_string(timestamp.version) + " names version " +
                          std::to_string(timestamp.targets_version));
  }
  if (previous) OUTPOST_TRY(check_no_rollback(kTargets, targets->version, previous->version));
  OUTPOST_TRY(check_not_expired(kTargets, targets->version, targets->expires_ms, now_ms));
  return targets;
}

}  // namespace outpost::release
