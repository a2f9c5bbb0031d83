// Ships the telemetry buffer to the control plane: batches of the oldest unacknowledged
// records, zstd-compressed, POSTed to /api/v1/device/telemetry; the server answers the highest
// seq it stored ({"acked": N}) and only then are records deleted. Runs on its own thread, once
// per interval and back to back while a backlog remains, paced to a byte rate so a day-long
// backlog does not starve the sync link.
//
// Answers: 200 -> ack; transport failure, 5xx, 401, 408, 429 -> retry with backoff (the batch
// stays); any other 4xx (a batch the server refuses as malformed or too large) -> its records
// are given up and counted as dropped in their classes, so one bad batch does not block the
// rest forever.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "agent/device_api.h"
#include "agent/identity.h"
#include "agent/telemetry/buffer.h"
#include "common/telemetry_batch.h"

namespace outpost {
class HttpClient;
}  // namespace outpost

namespace outpost::agent::telemetry {

class Shipper {
 public:
  struct Options {
    int64_t interval_ms = 60'000;
    int64_t rate_bytes_per_s = 32 << 10;  // compressed body bytes per second, at most
    int64_t max_batch_json = 256 << 10;   // record JSON per batch (before compression)
    size_t max_records = 10'000;          // per batch (< kMaxRecordsPerBatch)
    int64_t retry_initial_ms = 1'000;
    int64_t retry_max_ms = 60'000;
    int64_t timeout_ms = 30'000;
  };
  struct Stats {
    int64_t batches_sent = 0;     // acknowledged
    int64_t records_sent = 0;     // acknowledged
    int64_t bytes_sent = 0;       // compressed bodies of acknowledged batches
    int64_t wire_bytes = 0;       // HTTP bytes both ways of every try (heads and bodies)
    int64_t json_bytes = 0;       // uncompressed bodies of acknowledged batches
    int64_t batches_refused = 0;  // 4xx: given up
    int64_t records_refused = 0;
    int64_t failures = 0;       // tries that will be retried
    int64_t last_acked_at = 0;  // Unix ms
    std::string last_error;
  };

  Shipper(Buffer& buffer, Identity identity, Options options);
  ~Shipper();
  Shipper(const Shipper&) = delete;
  Shipper& operator=(const Shipper&) = delete;

  void start();
  void stop();
  // Ships now rather than at the end of the interval (e.g. after a flush on stop).
  void wake();
  Stats stats() const;

 private:
  enum class Outcome { kDone, kSent, kRetry };
  void run();
  // Sends the oldest unacknowledged records; `body_bytes` = the compressed body's size.
  Outcome ship_one(UpstreamClient& client, int64_t& body_bytes);
  // Sleeps up to `ms`; stop() ends it, and so does wake() when `wakeable`.
  void wait_for(int64_t ms, bool wakeable);

  Buffer& buffer_;
  Identity identity_;
  Options options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool woken_ = false;  // guarded by mu_
  Stats stats_;         // guarded by mu_
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace outpost::agent::telemetry
