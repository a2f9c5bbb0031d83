// The control plane's side of signed release metadata (common/release_meta.h): it keeps the
// root versions the operator signed offline, holds the one online key that root gives the
// targets and timestamp roles, and re-signs those two documents whenever the registry's
// artifacts change and before they expire. Versions come from the store, so they only grow.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/crypto.h"
#include "common/error.h"
#include "common/release_meta.h"
#include "store/store.h"

namespace outpost::server::registry {

struct ReleaseOptions {
  int64_t targets_ttl_ms = 30LL * 24 * 3600 * 1000;  // targets expire 30 days after signing
  int64_t timestamp_ttl_ms = 24LL * 3600 * 1000;     // timestamp a day after
};

// Thread-safe (one mutex); the re-signing thread runs between start() and stop().
class ReleaseSigner {
 public:
  // Keys under DATA/release/: online.key (in use), pending.key (made for the next root).
  ReleaseSigner(store::Store& store, const Clock& clock, std::string data_dir,
                ReleaseOptions options);
  ~ReleaseSigner();

  [[nodiscard]] Status init();  // loads or makes the online key, reads the newest root, signs
  void start();                 // re-signs before expiry, checking every ttl/4 (1 s..60 s)
  void stop();

  // Re-signs targets when the artifacts differ from what it lists, when it is past half its
  // lifetime, or when root no longer gives its key the role; the timestamp likewise, and
  // whenever targets changed. No-op (ok) while no root is installed.
  [[nodiscard]] Status refresh();
  // Replicas: re-reads the newest documents from the store (another replica signed them).
  [[nodiscard]] Status reload();
  // Called (under the signer's lock; keep it short) after a new targets or timestamp version
  // was stored, so other replicas reload. Set before init().
  void set_on_signed(std::function<void()> on_signed) { on_signed_ = std::move(on_signed); }

  // For `outpost release status` and `keys init`: root version and expiry, the online key
  // (and a pending one), the current targets and timestamp versions and expiries.
  nlohmann::json status();
  // Makes (or returns, when one is waiting) the key the next root should name for the online
  // roles: {"keyid", "public"}. It is used once a root naming it is accepted.
  [[nodiscard]] Result<nlohmann::json> pending_online_key();
  // Accepts root version N+1 (or the first root): verified as a device would, and it must give
  // the targets and timestamp roles exactly one key, threshold 1, that this server holds (the
  // online key or the pending one). Returns the accepted root.
  [[nodiscard]] Result<release::Root> accept_root(std::string_view text);

  // Documents as served to devices (nullopt when there is none). root(0) is the newest.
  std::optional<std::string> root(int64_t version);
  std::optional<std::string> timestamp();
  std::optional<std::string> targets();

 private:
  [[nodiscard]] Status refresh_locked();
  [[nodiscard]] Status refresh_and_tell_locked();  // and on_signed_ when it stored a version
  [[nodiscard]] Status load_latest_locked();

  store::Store& store_;
  const Clock& clock_;
  std::string dir_;
  ReleaseOptions options_;
  std::mutex mu_;  // guards everything below
  crypto::Ed25519KeyPair online_;
  std::optional<crypto::Ed25519KeyPair> pending_;
  std::optional<release::Root> root_;
  std::string root_text_;
  std::optional<release::Targets> targets_;
  std::string targets_text_;
  std::optional<release::Timestamp> timestamp_;
  std::string timestamp_text_;
  std::string signed_by_;  // key id that signed targets_/timestamp_
  std::string last_error_;
  std::function<void()> on_signed_;
  bool signed_new_ = false;
  bool stopping_ = false;
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace outpost::server::registry
