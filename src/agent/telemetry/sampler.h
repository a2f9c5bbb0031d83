// Raw inference samples by deployment policy: each inference is kept with probability
// `sample`, or `on_anomaly` while an anomaly holds (error burst, latency or confidence out of
// its recent band). Runs on the inference path, so it only touches memory: kept samples wait
// in a bounded queue that the telemetry worker drains into the buffer.
//
// Anomaly rule, per deployment, over its last kWindow inferences:
//   - error burst: at least kBurstCount of them are errors, and at least kBurstShare;
//   - slow: at least kBurstCount (and kOutlierShare) had a latency above the band, EWMA mean
//     + 4 sigma, sigma at least 0.25 ms and 5% of the mean (sub-millisecond jitter of a fast
//     model is not an anomaly);
//   - unsure: at least kBurstCount (and kOutlierShare) had a confidence under the band, EWMA
//     mean - 4 sigma, sigma at least 0.02.
// One slow or unsure answer is not an anomaly: tails are normal, a shift is not. Values out of
// the band do not move it, so a shift stays visible; when most of a full window is out of it,
// the shift is the new normal and the band starts again from there.
// An anomaly holds until hold_ms after the last inference that found one.
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
  static constexpr size_t kBurstCount = 5;
  static constexpr double kBurstShare = 0.2;
  static constexpr double kOutlierShare = 0.1;
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
    // True when `x` is out of the band (above when `upper`, else below); a value in the band
    // (or any while warming up) is taken in.
    bool out_and_add(double x, bool upper, double min_sigma_abs, double min_sigma_rel);
  };
  enum Flag : uint8_t { kError = 1, kSlow = 2, kUnsure = 4 };
  struct Detector {
    std::deque<uint8_t> recent;  // flags of the last kWindow inferences
    size_t errors = 0, slow = 0, unsure = 0;
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
