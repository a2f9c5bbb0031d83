// Secrets on the device (issue 18). The sealed versions travel in the signed desired state and
// stay sealed at rest (desired.json is all the agent keeps); they are opened with the device key
// only to write a workload's files, $OUTPOST_SECRETS_DIR/<secret>/<key>, in a private directory
// on tmpfs, and switched on time from the local copy (the rotate time needs no network).
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/crypto.h"
#include "common/error.h"

namespace outpost::agent {

struct SealedSecretVersion {
  int64_t version = 0;
  int64_t activate_at = 0;  // Unix ms (server clock); the device compares its own clock
  std::string sealed;       // base64 crypto_box_seal to this device's key
};
// Secret name -> versions, ascending.
using SealedSecrets = std::map<std::string, std::vector<SealedSecretVersion>>;
// Key name -> value bytes.
using SecretValues = std::map<std::string, std::string>;

// The desired document's "secrets" section; entries of the wrong shape or with unsafe names are
// left out (their name is logged, never a value).
SealedSecrets sealed_secrets_of(const nlohmann::json& doc);
// The version in force at now_ms: the newest whose activate_at has come; nullptr when none.
const SealedSecretVersion* active_secret_version(const std::vector<SealedSecretVersion>& versions,
                                                 int64_t now_ms);
// The next version after the active one (staged for a rotate time); nullptr when none.
const SealedSecretVersion* staged_secret_version(const std::vector<SealedSecretVersion>& versions,
                                                 int64_t now_ms);
// The earliest activate_at after now_ms of any version that is not superseded (0 = none): the
// agent's loop wakes then.
int64_t next_secret_activation(const SealedSecrets& secrets, int64_t now_ms);

// Opens one version with the device key and checks it names `name` and its version.
// kPermissionDenied when it was sealed to another key or altered.
[[nodiscard]] Result<SecretValues> open_secret_version(const std::string& name,
                                                       const SealedSecretVersion& version,
                                                       const crypto::Ed25519KeyPair& device_key);

// Where this agent puts workloads' secret files: `preferred` when given, else a private
// "outpost-agent-<device id>" folder on tmpfs ($XDG_RUNTIME_DIR, then /dev/shm), else (no tmpfs)
// DATA/secrets-run. Creates it 0700 and refuses one that is a symlink or not ours. `on_tmpfs`
// tells which it was.
[[nodiscard]] Result<std::string> prepare_secrets_base(const std::string& preferred,
                                                       const std::string& data_dir,
                                                       const std::string& device_id,
                                                       bool* on_tmpfs);

// One deployment's $OUTPOST_SECRETS_DIR (0700). Each secret is a symlink <dir>/<secret> to
// <dir>/.<secret>.v<N>/ holding one 0400 file per key: a version switch writes the new folder,
// then renames a new symlink over the old one, so a reader sees all of one version or all of the
// other, never a mix.
class SecretFiles {
 public:
  explicit SecretFiles(std::string dir) : dir_(std::move(dir)) {}
  const std::string& dir() const { return dir_; }

  [[nodiscard]] Status write(const std::string& secret, int64_t version,
                             const SecretValues& values) const;
  // Removes every secret not in `keep`, and versions of kept ones other than their current.
  void remove_except(const std::set<std::string>& keep) const;
  // Removes the whole directory.
  void remove_all() const;

 private:
  std::string dir_;
};

// OUTPOST_SECRET_<NAME>_<KEY>: upper case, other characters '_'.
std::string secret_env_name(const std::string& secret, const std::string& key);

}  // namespace outpost::agent
