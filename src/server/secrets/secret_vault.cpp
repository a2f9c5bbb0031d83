#include "server/secrets/secret_vault.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "common/crypto.h"
#include "server/deployments/manifest.h"

namespace outpost::server {
namespace {

using json = nlohmann::json;

// Binds a ciphertext to its row: a value copied into another secret or version does not open.
std::string aead_context(const std::string& name, int64_t version) {
  return "outpost secret " + name + " version " + std::to_string(version);
}

bool is_key_name(const std::string& key) {
  if (key.empty() || key.size() > 63 || key.front() == '.') return false;
  return std::all_of(key.begin(), key.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
  });
}

}  // namespace

Status check_secret_data(const SecretData& data) {
  if (data.empty()) {
    return make_error(Errc::kInvalidArgument,
                      "data: expected at least one key (--from-literal K=V or --from-file K=FILE)",
                      "data");
  }
  if (data.size() > kMaxSecretKeys) {
    return make_error(
        Errc::kInvalidArgument,
        "data: " + std::to_string(data.size()) + " keys, at most " + std::to_string(kMaxSecretKeys),
        "data");
  }
  size_t total = 0;
  for (const auto& [key, value] : data) {
    const std::string field = "data." + key;
    if (!is_key_name(key)) {
      return make_error(Errc::kInvalidArgument,
                        "data: key \"" + key.substr(0, 80) +
                            "\" is not a key name (letters, digits, '-', '_' and '.', 1-63 "
                            "characters, not starting with '.'; it becomes a file name)",
                        "data");
    }
    if (value.size() > kMaxSecretValueBytes) {
      return make_error(Errc::kInvalidArgument,
                        field + ": " + std::to_string(value.size()) + " bytes, at most " +
                            std::to_string(kMaxSecretValueBytes),
                        field);
    }
    total += value.size();
  }
  if (total > kMaxSecretBytes) {
    return make_error(Errc::kInvalidArgument,
                      "data: " + std::to_string(total) + " bytes in all, at most " +
                          std::to_string(kMaxSecretBytes),
                      "data");
  }
  return ok();
}

std::vector<const store::SecretVersion*> deliverable_versions(const store::Secret& secret,
                                                              int64_t now_ms) {
  std::vector<const store::SecretVersion*> out;
  int64_t active = 0;
  for (const auto& v : secret.versions) {
    if (v.activate_at <= now_ms) active = std::max(active, v.version);
  }
  for (const auto& v : secret.versions) {
    if (v.version >= active && (v.version == active || v.activate_at > now_ms)) out.push_back(&v);
  }
  std::sort(out.begin(), out.end(), [](auto* a, auto* b) { return a->version < b->version; });
  return out;
}

int64_t next_secret_switch(const store::Secret& secret, int64_t now_ms) {
  int64_t next = 0;
  for (const auto* v : deliverable_versions(secret, now_ms)) {
    if (v->activate_at > now_ms && (next == 0 || v->activate_at < next)) next = v->activate_at;
  }
  return next;
}

SecretVault::SecretVault(store::Store& store, std::string master_key)
    : store_(store), master_key_(std::move(master_key)) {}

SecretVault::~SecretVault() { crypto::wipe(master_key_); }

Result<store::SecretVersion> SecretVault::create(const std::string& name, const SecretData& data,
                                                 const std::string& actor, int64_t now_ms) {
  return put(name, 1, data, now_ms, actor, now_ms);
}

Result<store::SecretVersion> SecretVault::update(const std::string& name, const SecretData& data,
                                                 int64_t activate_at, const std::string& actor,
                                                 int64_t now_ms) {
  auto current = store_.get_secret(name);
  if (!current) return make_error(current.error());
  if (!*current) return make_error(Errc::kNotFound, "secret " + name + " does not exist", "name");
  const int64_t newest = (*current)->versions.empty() ? 0 : (*current)->versions.back().version;
  return put(name, newest + 1, data, std::max(activate_at, now_ms), actor, now_ms);
}

Result<store::SecretVersion> SecretVault::put(const std::string& name, int64_t version,
                                              const SecretData& data, int64_t activate_at,
                                              const std::string& actor, int64_t now_ms) {
  OUTPOST_TRY(deployments::check_secret_name(name, "name"));
  OUTPOST_TRY(check_secret_data(data));
  json encoded = json::object();
  store::SecretVersion v;
  for (const auto& [key, value] : data) {
    encoded[key] = crypto::base64_encode(value);
    v.keys.push_back(key);
  }
  std::string plaintext = encoded.dump();
  v.name = name;
  v.version = version;
  v.ciphertext = crypto::base64_encode(
      crypto::aead_encrypt(plaintext, master_key_, aead_context(name, version)));
  crypto::wipe(plaintext);
  v.activate_at = activate_at;
  v.created_at = now_ms;
  v.created_by = actor;
  OUTPOST_TRY(store_.put_secret_version(v, now_ms));
  return v;
}

Result<std::string> SecretVault::open_raw(const store::SecretVersion& v) const {
  auto sealed = crypto::base64_decode(v.ciphertext);
  if (!sealed) {
    return make_error(Errc::kInternal, "secret " + v.name + " version " +
                                           std::to_string(v.version) +
                                           ": stored ciphertext is not base64");
  }
  auto plain = crypto::aead_decrypt(*sealed, master_key_, aead_context(v.name, v.version));
  if (!plain) {
    return make_error(
        plain.error().with_context("secret " + v.name + " version " + std::to_string(v.version) +
                                   " (is --secrets-key the key it was stored with?)"));
  }
  return plain;
}

Result<std::string> SecretVault::device_payload(const store::SecretVersion& v) const {
  auto plain = open_raw(v);
  if (!plain) return make_error(plain.error());
  json data = json::parse(*plain, nullptr, false);
  crypto::wipe(*plain);
  if (!data.is_object()) {
    return make_error(Errc::kInternal, "secret " + v.name + " version " +
                                           std::to_string(v.version) +
                                           ": not a JSON object inside");
  }
  json payload = {{"name", v.name}, {"version", v.version}, {"data", std::move(data)}};
  return payload.dump();
}

Result<SecretData> SecretVault::open(const store::SecretVersion& v) const {
  auto plain = open_raw(v);
  if (!plain) return make_error(plain.error());
  json data = json::parse(*plain, nullptr, false);
  crypto::wipe(*plain);
  SecretData out;
  if (!data.is_object()) return out;
  for (const auto& [key, value] : data.items()) {
    if (!value.is_string()) continue;
    auto bytes = crypto::base64_decode(value.get<std::string>());
    if (bytes) out[key] = std::move(*bytes);
  }
  return out;
}

}  // namespace outpost::server
