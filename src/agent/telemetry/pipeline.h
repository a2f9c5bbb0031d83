// The agent's telemetry, put together: the buffer, the sampler on the inference path, the
// aggregator and health collector ticking on a worker thread, workload events, and the shipper.
// Every flush period the worker moves queued samples into the buffer and checkpoints the open
// aggregates; every interval it closes the aggregates and writes a health record.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "agent/identity.h"
#include "agent/telemetry/aggregator.h"
#include "agent/telemetry/buffer.h"
#include "agent/telemetry/health.h"
#include "agent/telemetry/sampler.h"
#include "agent/telemetry/shipper.h"
#include "common/clock.h"

namespace outpost::agent::telemetry {

struct TelemetryOptions {
  int64_t buffer_bytes = 64 << 20;
  int64_t interval_ms = 60'000;
  int64_t flush_ms = 5'000;
  int64_t rate_bytes_per_s = 32 << 10;
  int64_t max_batch_json = 256 << 10;  // record JSON per batch, before compression
  uint64_t seed = 0;                   // sampling PRNG; 0 = random
  int64_t anomaly_hold_ms = 30'000;
  int64_t retry_initial_ms = 1'000;
  int64_t retry_max_ms = 60'000;
  HealthCollector::Sources health;  // data_dir is filled in by the pipeline
};

class Pipeline {
 public:
  // The database lives at <data_dir>/telemetry.db.
  Pipeline(std::string data_dir, Identity identity, TelemetryOptions options, const Clock& clock,
           Aggregator::Source metrics);
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Opens the buffer and turns a crashed run's open aggregates into records.
  [[nodiscard]] Status init();
  void start();  // the worker and the shipper
  // Closes the interval early (nothing counted so far is lost), then stops both threads.
  void stop();

  Sampler& sampler() { return sampler_; }
  // A workload event; never sampled away. Thread-safe.
  void event(const std::string& deployment, int64_t revision, const std::string& event,
             const std::string& message);
  void set_policies(std::map<std::string, SamplingPolicy> policies) {
    sampler_.set_policies(std::move(policies));
  }
  // The sync link: `online` while the last poll succeeded (a long-poll may be parked now),
  // `last_answer_ms` when the control plane last answered (Unix ms; 0 = never since start).
  // Health records carry the sync lag: 0 while online, else the time since that answer.
  // Thread-safe.
  void set_link(bool online, int64_t last_answer_ms) {
    last_sync_ms_ = last_answer_ms;
    online_ = online;
  }

  // GET /v1/telemetry. Thread-safe.
  nlohmann::json stats_json() const;

  // One tick of the worker, for tests: drains samples, checkpoints or closes the interval.
  void tick();

 private:
  void run();
  void drain_samples();
  void close_interval();

  std::string data_dir_;
  TelemetryOptions options_;
  const Clock& clock_;
  Buffer buffer_;
  Sampler sampler_;
  Aggregator aggregator_;
  HealthCollector health_;
  Shipper shipper_;
  std::atomic<int64_t> last_sync_ms_{0};
  std::atomic<bool> online_{false};
  std::mutex tick_mu_;  // one tick at a time (worker and stop())
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;  // guarded by mu_
  bool started_ = false;
  std::thread worker_;
  std::atomic<int64_t> errors_{0};
  mutable std::mutex error_mu_;
  std::string last_error_;  // guarded by error_mu_
};

}  // namespace outpost::agent::telemetry
