#include "agent/telemetry/sampler.h"

#include <algorithm>
#include <cmath>

namespace outpost::agent::telemetry {

namespace {
constexpr double kBandAlpha = 0.05;
constexpr double kBandSigmas = 4.0;
}  // namespace

bool Sampler::Band::out_and_add(double x, bool upper, double min_sigma_abs, double min_sigma_rel) {
  bool out = false;
  if (n >= kWarmup) {
    const double sigma =
        std::max({std::sqrt(std::max(var, 0.0)), min_sigma_abs, min_sigma_rel * std::abs(mean)});
    out = upper ? x > mean + kBandSigmas * sigma : x < mean - kBandSigmas * sigma;
  }
  if (out) return true;
  if (n == 0) {
    mean = x;
    var = 0;
  } else if (n < kWarmup) {
    // Plain running mean/variance while warming up: the EWMA would lean on the first values.
    const double delta = x - mean;
    mean += delta / static_cast<double>(n + 1);
    var += (delta * (x - mean) - var) / static_cast<double>(n + 1);
  } else {
    const double delta = x - mean;
    mean += kBandAlpha * delta;
    var = (1 - kBandAlpha) * (var + kBandAlpha * delta * delta);
  }
  ++n;
  return out;
}

Sampler::Sampler(const Clock& clock, Options options)
    : clock_(clock),
      options_(options),
      rng_(options.seed != 0 ? options.seed : std::random_device{}()) {}

void Sampler::set_policies(std::map<std::string, SamplingPolicy> policies) {
  std::lock_guard lock(mu_);
  policies_ = std::move(policies);
  std::erase_if(detectors_, [&](const auto& kv) { return !policies_.contains(kv.first); });
}

std::map<std::string, SamplingPolicy> Sampler::policies() const {
  std::lock_guard lock(mu_);
  return policies_;
}

void Sampler::observe(const serve::InferenceOutcome& o) {
  const int64_t now = clock_.now_ms();
  std::lock_guard lock(mu_);
  Detector& d = detectors_[o.deployment];
  uint8_t flags = o.outcome == "error" ? kError : 0;
  // Errors and refusals say nothing about the model's speed or certainty.
  if (o.outcome == "ok" || o.outcome == "fallback") {
    if (d.latency.out_and_add(o.latency_s, true, 0.00025, 0.05)) flags |= kSlow;
    if (o.confidence && d.confidence.out_and_add(*o.confidence, false, 0.02, 0.0)) {
      flags |= kUnsure;
    }
  }
  auto count = [&](uint8_t f, int step) {
    d.errors += (f & kError) ? step : 0;
    d.slow += (f & kSlow) ? step : 0;
    d.unsure += (f & kUnsure) ? step : 0;
  };
  d.recent.push_back(flags);
  count(flags, 1);
  if (d.recent.size() > kWindow) {
    count(d.recent.front(), -1);
    d.recent.pop_front();
  }
  const double window = static_cast<double>(d.recent.size());
  auto burst = [&](size_t n, double share) {
    return n >= kBurstCount && static_cast<double>(n) >= share * window;
  };
  const bool anomalous = burst(d.errors, kBurstShare) || burst(d.slow, kOutlierShare) ||
                         burst(d.unsure, kOutlierShare);
  // A shift that fills most of a full window is the new normal: learn the band again.
  if (d.recent.size() == kWindow) {
    if (d.slow * 2 > kWindow) {
      d.latency = Band{};
      d.slow = 0;
      for (auto& f : d.recent) f &= static_cast<uint8_t>(~kSlow);
    }
    if (d.unsure * 2 > kWindow) {
      d.confidence = Band{};
      d.unsure = 0;
      for (auto& f : d.recent) f &= static_cast<uint8_t>(~kUnsure);
    }
  }
  if (anomalous) d.anomaly_until = now + options_.hold_ms;
  const bool holds = d.anomaly_until > now;

  SamplingPolicy policy;
  if (auto it = policies_.find(o.deployment); it != policies_.end()) policy = it->second;
  const double rate = holds ? std::max(policy.on_anomaly, policy.sample) : policy.sample;
  if (rate <= 0) return;
  if (rate < 1) {
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    if (unit(rng_) >= rate) return;
  }
  if (queue_.size() >= options_.max_queued) {
    ++dropped_;
    return;
  }
  outpost::telemetry::SampleRecord s;
  s.deployment = o.deployment;
  s.revision = o.revision;
  s.model = o.model;
  s.version = o.version;
  s.role = o.role;
  s.latency_s = o.latency_s;
  s.outcome = o.outcome;
  s.confidence = o.confidence;
  s.anomaly = holds;
  queue_.push_back(outpost::telemetry::Record{0, now, std::move(s)});
}

std::vector<outpost::telemetry::Record> Sampler::drain(int64_t* dropped) {
  std::lock_guard lock(mu_);
  std::vector<outpost::telemetry::Record> out;
  out.swap(queue_);
  if (dropped) *dropped = dropped_;
  dropped_ = 0;
  return out;
}

bool Sampler::anomalous(const std::string& deployment) const {
  const int64_t now = clock_.now_ms();
  std::lock_guard lock(mu_);
  auto it = detectors_.find(deployment);
  return it != detectors_.end() && it->second.anomaly_until > now;
}

int64_t Sampler::queued() const {
  std::lock_guard lock(mu_);
  return static_cast<int64_t>(queue_.size());
}

}  // namespace outpost::agent::telemetry
