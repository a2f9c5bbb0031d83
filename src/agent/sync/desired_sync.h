// The agent's side of sync: verifying the server's signed desired state, keeping the last
// good one on disk (so a reboot without network still runs everything), and the long-poll
// loop that fetches new generations with capped, jittered backoff while the link is down.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "agent/identity.h"
#include "common/error.h"

namespace outpost::agent {

struct DesiredState {
  int64_t generation = 0;
  std::string body;       // the exact signed bytes
  std::string signature;  // base64 Ed25519 over body
  nlohmann::json doc;     // body parsed: {"generation":G,"device":..,"deployments":[..]}
};

// Checks the signature with the server's key, that the body parses, names this device and
// carries `generation`. Anything else is kPermissionDenied or kInvalidArgument with the reason;
// such a document is never acted on.
[[nodiscard]] Result<DesiredState> verify_desired(std::string body, std::string signature,
                                                  int64_t generation, const Identity& identity);

// DIR/desired.json, replaced atomically (temp, fsync, rename, fsync dir).
[[nodiscard]] Status persist_desired(const std::string& data_dir, const DesiredState& state);
// The persisted state, verified again; nullopt when there is none yet. A file that fails
// verification (tampered, truncated) is an error: the agent then waits for the server.
[[nodiscard]] Result<std::optional<DesiredState>> load_desired(const std::string& data_dir,
                                                               const Identity& identity);

// Backoff for retries: doubles from `initial_ms` up to `max_ms`, with +-20% jitter so a
// fleet that lost its server does not come back in lockstep.
class Backoff {
 public:
  Backoff(int64_t initial_ms, int64_t max_ms) : initial_ms_(initial_ms), max_ms_(max_ms) {}
  int64_t next_ms();  // the delay to wait now; grows each call
  // The delay before retry number `attempt` (0 = first), with jitter, without moving state.
  int64_t delay_for(int attempt) const;
  // initial_ms doubled `attempt` times, capped at max_ms; no jitter.
  static int64_t capped_ms(int attempt, int64_t initial_ms, int64_t max_ms);
  void reset() { attempt_ = 0; }
  int attempts() const { return attempt_; }

 private:
  int64_t initial_ms_;
  int64_t max_ms_;
  int attempt_ = 0;
};

// Long-polls GET /api/v1/device/desired on its own thread. Every verified new generation is
// persisted first, then handed to on_desired. on_link reports whether the server answered.
class DesiredSync {
 public:
  struct Options {
    int64_t wait_s = 55;  // how long the server may hold a poll
    int64_t backoff_initial_ms = 1'000;
    int64_t backoff_max_ms = 60'000;
  };
  DesiredSync(std::string data_dir, Identity identity, int64_t known_generation, Options options,
              std::function<void(const DesiredState&)> on_desired,
              std::function<void(bool online, const std::string& error)> on_link);
  ~DesiredSync();
  void start();
  void stop();  // returns within ~1 s even while a poll is held

 private:
  void run();
  bool sleep_for(int64_t ms);  // false when stopping

  std::string data_dir_;
  Identity identity_;
  int64_t generation_;
  Options options_;
  std::function<void(const DesiredState&)> on_desired_;
  std::function<void(bool, const std::string&)> on_link_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;  // guards the sleep below
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace outpost::agent
