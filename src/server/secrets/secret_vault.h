// Secrets at rest on the control plane (issue 18): values are encrypted under the server's master
// key before they reach the store, and opened only to be sealed again to a device's own key.
// No plaintext value is ever logged, returned by the API, or written anywhere but memory.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/error.h"
#include "store/store.h"

namespace outpost::server {

// Key name -> value bytes (any bytes: a certificate, a password).
using SecretData = std::map<std::string, std::string>;

inline constexpr size_t kMaxSecretKeys = 32;
inline constexpr size_t kMaxSecretValueBytes = 64 * 1024;
inline constexpr size_t kMaxSecretBytes = 256 * 1024;  // all values of one version together

// Key names become file names on the device ($OUTPOST_SECRETS_DIR/<secret>/<key>): letters,
// digits, '-', '_' and '.', 1-63 characters, not starting with '.'. Checks the sizes above too.
// kInvalidArgument naming the field ("data.<key>").
[[nodiscard]] Status check_secret_data(const SecretData& data);

// The versions a device should hold at `now_ms`: the active one (the newest whose activate_at
// has come) and every newer, staged one, ascending. Older versions are superseded.
std::vector<const store::SecretVersion*> deliverable_versions(const store::Secret& secret,
                                                              int64_t now_ms);
// When that set changes next (the earliest activate_at after now_ms); 0 when nothing is staged.
int64_t next_secret_switch(const store::Secret& secret, int64_t now_ms);

// Thread-safe: holds only the key; every call goes to the store, which is thread-safe.
class SecretVault {
 public:
  // `master_key`: 32 raw bytes (crypto::load_or_create_secret_key_file).
  SecretVault(store::Store& store, std::string master_key);
  ~SecretVault();

  // Stores version 1 of a new secret, active at once. kAlreadyExists when it exists.
  [[nodiscard]] Result<store::SecretVersion> create(const std::string& name, const SecretData& data,
                                                    const std::string& actor, int64_t now_ms);
  // Stores the next version, active at `activate_at` (<= now: at once). kNotFound when the
  // secret does not exist; kConflict when another update won the race.
  [[nodiscard]] Result<store::SecretVersion> update(const std::string& name, const SecretData& data,
                                                    int64_t activate_at, const std::string& actor,
                                                    int64_t now_ms);

  // What a device receives sealed for one version: {"name":..,"version":N,"data":{key:base64}}.
  // kPermissionDenied when the stored ciphertext does not open with this master key.
  [[nodiscard]] Result<std::string> device_payload(const store::SecretVersion& version) const;
  // The values of a version (tests; never sent anywhere by the server).
  [[nodiscard]] Result<SecretData> open(const store::SecretVersion& version) const;

 private:
  [[nodiscard]] Result<store::SecretVersion> put(const std::string& name, int64_t version,
                                                 const SecretData& data, int64_t activate_at,
                                                 const std::string& actor, int64_t now_ms);
  [[nodiscard]] Result<std::string> open_raw(const store::SecretVersion& version) const;

  store::Store& store_;
  std::string master_key_;
};

}  // namespace outpost::server
