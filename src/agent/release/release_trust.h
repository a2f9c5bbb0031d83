// The device's side of signed release metadata (common/release_meta.h): what root it trusts,
// the newest timestamp and targets it verified, and whether an artifact may be installed.
// A background thread fetches and verifies the documents from the server (or a relay); the
// agent's loop only asks check(), which never blocks on the network.
//
// Trust starts at the first root the device sees: fetched over the channel its enrollment
// pinned (HTTPS with the pinned CA), kept in DIR/release/root.json, and from then on replaced
// only by the next version signed by both the old and the new root keys. A device that has a
// root never installs an artifact the current, unexpired targets do not list, nor more bytes of
// it than listed. A server that publishes no release metadata (no `outpost release keys init`
// yet) leaves artifacts checked by digest only, as before; status says so.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "agent/identity.h"
#include "common/clock.h"
#include "common/error.h"
#include "common/release_meta.h"

namespace outpost::agent {

struct ReleaseTrustOptions {
  int64_t min_refresh_ms = 1'000;       // at most one refresh this often while artifacts wait
  int64_t retry_ms = 10'000;            // after a refresh that failed
  int64_t no_root_recheck_ms = 60'000;  // the server published no root: look again this often
};

class ReleaseTrust {
 public:
  // Files under DIR/release/. on_change is called (from the refresh thread) after each refresh.
  ReleaseTrust(std::string data_dir, Identity identity, const Clock& clock,
               ReleaseTrustOptions options, std::function<void()> on_change);
  ~ReleaseTrust();
  ReleaseTrust(const ReleaseTrust&) = delete;
  ReleaseTrust& operator=(const ReleaseTrust&) = delete;

  // Loads what was trusted before (a damaged file is an error: the device must not quietly
  // fall back to trusting less).
  [[nodiscard]] Status init();
  void start();
  void stop();

  struct Verdict {
    enum class Kind {
      kTrusted,    // listed: install at most `length` bytes
      kUnchecked,  // the server publishes no release metadata and none was ever trusted
      kPending,    // a refresh is under way or due
      kRefused,    // not listed by verified metadata, or the metadata was refused: `reason`
    } kind = Kind::kPending;
    int64_t length = -1;
    std::string reason;
  };
  // Thread-safe, non-blocking. Asks for a refresh when the answer needs one.
  Verdict check(const std::string& digest);

  // One synchronous refresh (the thread's body; tests call it directly).
  [[nodiscard]] Status refresh_now();

  // For the status report: root/targets/timestamp versions and expiry, the last error.
  nlohmann::json status() const;

 private:
  [[nodiscard]] Status refresh_once();
  [[nodiscard]] Result<std::optional<std::string>> fetch(const std::string& path, size_t max_bytes);
  void request_refresh_locked(int64_t now);

  std::string dir_;
  Identity identity_;
  const Clock& clock_;
  ReleaseTrustOptions options_;
  std::function<void()> on_change_;

  mutable std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::optional<release::Root> root_;
  std::optional<release::Timestamp> timestamp_;
  std::optional<release::Targets> targets_;
  std::string targets_sha256_;  // of the trusted targets document
  bool server_has_no_root_ = false;
  std::string last_error_;
  bool last_error_transport_ = false;  // the server could not be reached (not a refusal)
  int64_t refresh_due_ = 0;            // steady: when the thread should refresh (0 = not asked)
  int64_t last_refresh_start_ = 0;     // clock ms of the last refresh that started
  int64_t last_refresh_end_ = 0;       // and ended
  bool refreshing_ = false;
  std::map<std::string, int64_t> asked_at_;  // digest -> when check() first missed it
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace outpost::agent
