// Numbers kept per served model version: requests, errors, fallbacks, latency and confidence
// histograms, and running mean/variance of each input feature (the base for drift scores).
// Read by GET /metrics (Prometheus text), GET /v1/services and the telemetry pipeline.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/serve/tensor.h"

namespace outpost::agent::serve {

// Fixed-bucket histogram; observe() is lock-free and thread-safe.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);  // ascending; +Inf is implied
  void observe(double value);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> counts;  // per bucket, not cumulative; one more than bounds (+Inf)
    uint64_t count = 0;
    double sum = 0;
    // The value under which `q` (0..1) of observations fall, interpolated inside the bucket;
    // 0 when empty.
    double quantile(double q) const;
  };
  Snapshot snapshot() const;

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;
  std::atomic<uint64_t> count_{0};
  std::atomic<double> sum_{0};
};

// Welford's running mean and variance.
struct RunningStats {
  uint64_t n = 0;
  double mean = 0;
  double m2 = 0;
  void add(double x);
  double variance() const { return n > 1 ? m2 / static_cast<double>(n - 1) : 0.0; }
};

// One input's feature statistics; `aggregated`: one statistic over all values (feature "*").
struct InputFeatureStats {
  std::string input;
  bool aggregated = false;
  std::vector<RunningStats> features;  // by position in a row, or one when aggregated
};

// A model version's cumulative numbers at one moment, for the telemetry aggregator (which
// takes deltas between two of them). Each counter is read atomically, not all together.
struct MetricsSnapshot {
  std::string deployment, model, version, role;
  int64_t revision = 0;  // the revision that last loaded this version
  uint64_t requests = 0, served = 0, errors = 0, invalid = 0, fallbacks = 0;
  Histogram::Snapshot latency;
  Histogram::Snapshot confidence;
  std::vector<InputFeatureStats> inputs;
};

// Inputs whose rows have more values than this are summarised by one statistic over all their
// values (feature "*") instead of one per position (an audio frame is not 512 features).
inline constexpr size_t kMaxTrackedFeatures = 64;

class ModelMetrics {
 public:
  // role: "primary" or "fallback".
  ModelMetrics(std::string deployment, std::string model, std::string version, std::string role);

  void count_request() { requests_.fetch_add(1, std::memory_order_relaxed); }
  void count_error() { errors_.fetch_add(1, std::memory_order_relaxed); }
  void count_invalid() { invalid_.fetch_add(1, std::memory_order_relaxed); }
  void count_fallback() { fallbacks_.fetch_add(1, std::memory_order_relaxed); }
  // The request's answer (or error) came from this version: exactly one version of a
  // deployment counts each request here, so served sums to the deployment's requests.
  void count_served() { served_.fetch_add(1, std::memory_order_relaxed); }
  void set_revision(int64_t revision) { revision_.store(revision, std::memory_order_relaxed); }
  void observe_latency(double seconds) { latency_.observe(seconds); }
  void observe_confidence(double confidence) { confidence_.observe(confidence); }
  // Per input, per feature (the position in a row; rows are along the first dimension).
  // Thread-safe (one short lock).
  void observe_inputs(const std::vector<Tensor>& inputs);

  uint64_t requests() const { return requests_.load(std::memory_order_relaxed); }
  uint64_t errors() const { return errors_.load(std::memory_order_relaxed); }
  uint64_t fallbacks() const { return fallbacks_.load(std::memory_order_relaxed); }
  uint64_t invalid() const { return invalid_.load(std::memory_order_relaxed); }
  uint64_t served() const { return served_.load(std::memory_order_relaxed); }
  int64_t revision() const { return revision_.load(std::memory_order_relaxed); }
  MetricsSnapshot snapshot() const;

  // {"deployment","model","version","role","requests","errors","invalid_requests","fallbacks",
  //  "served", "latency_seconds":{"count","sum","p50","p95","p99","buckets":[[le,count]..]},
  //  "confidence":{..same..}, "inputs":{"<input>":{"<feature>":{"n","mean","variance"}}}}
  nlohmann::json to_json() const;
  // Appends this version's series in Prometheus text format (no HELP/TYPE lines; see
  // prometheus_header()).
  void append_prometheus(std::string& out) const;

  const std::string& deployment() const { return deployment_; }
  const std::string& model() const { return model_; }
  const std::string& version() const { return version_; }
  const std::string& role() const { return role_; }

 private:
  std::string labels() const;

  std::string deployment_, model_, version_, role_;
  std::atomic<uint64_t> requests_{0}, errors_{0}, invalid_{0}, fallbacks_{0}, served_{0};
  std::atomic<int64_t> revision_{0};
  Histogram latency_;
  Histogram confidence_;
  mutable std::mutex mu_;
  // input name -> feature stats; feature "*" = all values of an input with wide rows
  std::vector<std::pair<std::string, std::vector<RunningStats>>> features_;  // guarded by mu_
  std::vector<bool> aggregated_;  // guarded by mu_, parallel to features_
};

// HELP and TYPE lines for every series ModelMetrics writes.
std::string prometheus_header();

}  // namespace outpost::agent::serve
