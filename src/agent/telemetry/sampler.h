// Raw inference samples by deployment policy: each inference is kept with probability
// `sample`, or `on_anomaly` while an anomaly holds (error burst, latency or confidence out of
// its recent band). Runs on the inference path, so it only touches memory: kept samples wait
// in a bounded queue that the telemetry worker drains into the buffer.
//
// Anomaly rule, per deployment, over its inferences:
//   - error burst: of the last kWindow outcomes, at least kBurstErrors are errors and they are
//     at least kBurstShare of them;
//   - latency above its band: after kWarmup inferences, latency > EWMA mean + 4 sigma (sigma at
//     least 5% of the mean, so a perfectly steady model does not flag its first jitter);
//   - confidence below its band: after kWarmup answers with a confidence, confidence < EWMA
//     mean - 4 sigma (sigma at least 0.02).
// The band moves with every observation (alpha 0.05), so a lasting shift becomes the new normal.
// An anomaly holds until hold_ms after the last anomalous inference.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "agent/serve/model_server.h"
#include "common/clock.h"
#include "common/telemetry_batch.h"

namespace outpost::agent::telemetry {

struct SamplingPolicy {
  double sample = 0.1;      // the manifest's default
  double on_anomaly = 1.0;  // the manifest's default
  bool operator==(const SamplingPolicy&) const = default;
};

class Sampler {
 public:
  struct Options {
    int64_t hold_ms = 30'000;
    size_t max_queued = 10'000;  // beyond this, samples are dropped (and counted)
    uint64_t seed = 0;           // 0: from std::random_device
  };
  static constexpr size_t kWindow = 50;
  static constexpr size_t kBurstErrors = 5;
  static constexpr double kBurstShare = 0.2;
  static constexpr uint64_t kWarmup = 30;

  Sampler(const Clock& clock, Options options);

  // Replaces the policies (deployments absent get the defaults). Thread-safe.
  void set_policies(std::map<std::string, SamplingPolicy> policies);
  std::map<std::string, SamplingPolicy> policies() const;

  // One inference: updates its deployment's detector and maybe queues a sample. Thread-safe,
  // one short lock, no I/O.
  void observe(const serve::InferenceOutcome& outcome);

  // Takes the queued samples (oldest first) and the count dropped since the last call.
  std::vector<outpost::telemetry::Record> drain(int64_t* dropped);

  // Whether an anomaly holds for the deployment now.
  bool anomalous(const std::string& deployment) const;
  int64_t queued() const;

 private:
  struct Band {
    uint64_t n = 0;
    double mean = 0;
    double var = 0;
    // True when `x` is out of the band (above when `upper`, else below); then takes x in.
    bool out_and_add(double x, bool upper, double min_sigma_abs, double min_sigma_rel);
  };
  struct Detector {
    std::deque<bool> recent_errors;  // last kWindow outcomes: true = error
    size_t errors = 0;
    Band latency;
    Band confidence;
    int64_t anomaly_until = 0;  // ms; 0 = none yet
  };

  const Clock& clock_;
  Options options_;
  mutable std::mutex mu_;
  std::mt19937_64 rng_;                             // guarded by mu_
  std::map<std::string, SamplingPolicy> policies_;  // guarded by mu_
  std::map<std::string, Detector> detectors_;       // guarded by mu_
  std::vector<outpost::telemetry::Record> queue_;   // guarded by mu_
  int64_t dropped_ = 0;                             // guarded by mu_
};

}  // namespace outpost::agent::telemetry
