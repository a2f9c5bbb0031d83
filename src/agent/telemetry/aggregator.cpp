#include "agent/telemetry/aggregator.h"

#include <algorithm>
#include <limits>

namespace outpost::agent::telemetry {
namespace {

std::string version_key(const serve::MetricsSnapshot& s) {
  return s.deployment + "\n" + s.model + "\n" + s.version + "\n" + s.role;
}

uint64_t minus(uint64_t a, uint64_t b) { return a > b ? a - b : 0; }

outpost::telemetry::Histogram histogram_delta(const serve::Histogram::Snapshot& after,
                                              const serve::Histogram::Snapshot* before) {
  outpost::telemetry::Histogram out;
  const bool same = before && before->counts.size() == after.counts.size();
  for (size_t i = 0; i < after.counts.size(); ++i) {
    const uint64_t n = minus(after.counts[i], same ? before->counts[i] : 0);
    if (n == 0) continue;
    const double le =
        i < after.bounds.size() ? after.bounds[i] : std::numeric_limits<double>::infinity();
    out.buckets.emplace_back(le, n);
    out.count += n;
  }
  out.sum = after.sum - (same ? before->sum : 0.0);
  if (out.count == 0) out.sum = 0;
  return out;
}

}  // namespace

outpost::telemetry::FeatureStats welford_delta(const serve::RunningStats& after,
                                               const serve::RunningStats& before) {
  outpost::telemetry::FeatureStats out;
  if (after.n <= before.n) return out;
  const double n = static_cast<double>(after.n);
  const double n1 = static_cast<double>(before.n);
  const double n2 = n - n1;
  out.n = after.n - before.n;
  // Reverse of Chan et al.'s merge: mean = (n1 mean1 + n2 mean2) / n and
  // m2 = m2_1 + m2_2 + n1 n2 / n (mean1 - mean2)^2.
  out.mean = (n * after.mean - n1 * before.mean) / n2;
  const double d = before.mean - out.mean;
  out.m2 = std::max(0.0, after.m2 - before.m2 - n1 * n2 / n * d * d);
  return out;
}

std::optional<outpost::telemetry::InferenceRecord> inference_delta(
    const serve::MetricsSnapshot& after, const serve::MetricsSnapshot* before) {
  outpost::telemetry::InferenceRecord r;
  r.deployment = after.deployment;
  r.revision = after.revision;
  r.model = after.model;
  r.version = after.version;
  r.role = after.role;
  r.requests = minus(after.requests, before ? before->requests : 0);
  r.served = minus(after.served, before ? before->served : 0);
  r.errors = minus(after.errors, before ? before->errors : 0);
  r.invalid = minus(after.invalid, before ? before->invalid : 0);
  r.fallbacks = minus(after.fallbacks, before ? before->fallbacks : 0);
  r.latency = histogram_delta(after.latency, before ? &before->latency : nullptr);
  r.confidence = histogram_delta(after.confidence, before ? &before->confidence : nullptr);
  for (const auto& input : after.inputs) {
    const serve::InputFeatureStats* old = nullptr;
    if (before) {
      for (const auto& b : before->inputs) {
        if (b.input == input.input) old = &b;
      }
    }
    std::map<std::string, outpost::telemetry::FeatureStats> features;
    for (size_t i = 0; i < input.features.size(); ++i) {
      const serve::RunningStats none;
      const serve::RunningStats& was =
          old && i < old->features.size() && old->aggregated == input.aggregated ? old->features[i]
                                                                                 : none;
      auto delta = welford_delta(input.features[i], was);
      if (delta.n == 0) continue;
      features[input.aggregated ? "*" : std::to_string(i)] = delta;
    }
    if (!features.empty()) r.inputs[input.input] = std::move(features);
  }
  if (r.requests == 0 && r.served == 0 && r.errors == 0 && r.invalid == 0 && r.fallbacks == 0 &&
      r.latency.count == 0 && r.confidence.count == 0 && r.inputs.empty()) {
    return std::nullopt;
  }
  return r;
}

Aggregator::Aggregator(Buffer& buffer, const Clock& clock, Source source)
    : buffer_(buffer), clock_(clock), source_(std::move(source)) {}

Result<size_t> Aggregator::start() {
  auto recovered = buffer_.recover_open();
  if (!recovered) return recovered;
  interval_start_ = clock_.now_ms();
  baseline_.clear();
  for (auto& s : source_()) baseline_[version_key(s)] = std::move(s);
  return recovered;
}

std::vector<outpost::telemetry::Record> Aggregator::records_since_start(
    const std::vector<serve::MetricsSnapshot>& now_snapshots, int64_t now) const {
  std::vector<outpost::telemetry::Record> out;
  for (const auto& s : now_snapshots) {
    auto it = baseline_.find(version_key(s));
    auto delta = inference_delta(s, it == baseline_.end() ? nullptr : &it->second);
    if (!delta) continue;
    delta->interval_ms = std::max<int64_t>(now - interval_start_, 1);
    out.push_back(outpost::telemetry::Record{0, interval_start_, std::move(*delta)});
  }
  return out;
}

Status Aggregator::checkpoint() {
  const int64_t now = clock_.now_ms();
  return buffer_.replace_open(records_since_start(source_(), now));
}

Result<size_t> Aggregator::close() {
  const int64_t now = clock_.now_ms();
  auto snapshots = source_();
  auto records = records_since_start(snapshots, now);
  const size_t n = records.size();
  auto closed = buffer_.close_open(std::move(records));
  if (!closed) return make_error(closed.error());
  // The same snapshots the records came from: what happened since is the next interval's.
  baseline_.clear();
  for (auto& s : snapshots) baseline_[version_key(s)] = std::move(s);
  interval_start_ = now;
  return n;
}

}  // namespace outpost::agent::telemetry
