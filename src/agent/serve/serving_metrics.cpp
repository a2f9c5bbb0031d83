#include "agent/serve/serving_metrics.h"

#include <algorithm>
#include <cmath>

#include "common/prometheus_text.h"

namespace outpost::agent::serve {
namespace {

using json = nlohmann::json;

const std::vector<double> kLatencyBounds = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                            0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                            1,      2.5,     5,      10};
const std::vector<double> kConfidenceBounds = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0};

json histogram_json(const Histogram::Snapshot& s) {
  json buckets = json::array();
  for (size_t i = 0; i < s.counts.size(); ++i) {
    json le = i < s.bounds.size() ? json(s.bounds[i]) : json("+Inf");
    buckets.push_back({le, s.counts[i]});
  }
  return {{"count", s.count},        {"sum", s.sum},
          {"p50", s.quantile(0.5)},  {"p95", s.quantile(0.95)},
          {"p99", s.quantile(0.99)}, {"buckets", std::move(buckets)}};
}

void append_histogram(std::string& out, const std::string& name, const std::string& labels,
                      const Histogram::Snapshot& s) {
  std::vector<std::pair<double, uint64_t>> buckets;
  for (size_t i = 0; i < s.counts.size(); ++i) {
    buckets.emplace_back(i < s.bounds.size() ? s.bounds[i] : INFINITY, s.counts[i]);
  }
  prometheus::append_histogram(out, name, labels, buckets, s.sum, s.count);
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)),
      counts_(std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1)) {}

void Histogram::observe(double value) {
  size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) -
                                 bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.bounds = bounds_;
  s.counts.resize(bounds_.size() + 1);
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    s.counts[i] = counts_[i].load(std::memory_order_relaxed);
    s.count += s.counts[i];
  }
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

double Histogram::Snapshot::quantile(double q) const {
  if (count == 0) return 0;
  const double rank = q * static_cast<double>(count);
  uint64_t seen = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] == 0) continue;
    if (static_cast<double>(seen + counts[i]) >= rank) {
      double lower = i == 0 ? 0.0 : bounds[i - 1];
      if (i >= bounds.size()) return lower;  // in +Inf: the last finite bound is all we know
      double upper = bounds[i];
      double within = (rank - static_cast<double>(seen)) / static_cast<double>(counts[i]);
      return lower + (upper - lower) * std::clamp(within, 0.0, 1.0);
    }
    seen += counts[i];
  }
  return bounds.empty() ? 0 : bounds.back();
}

void RunningStats::add(double x) {
  ++n;
  const double delta = x - mean;
  mean += delta / static_cast<double>(n);
  m2 += delta * (x - mean);
}

ModelMetrics::ModelMetrics(std::string deployment, std::string model, std::string version,
                           std::string role)
    : deployment_(std::move(deployment)),
      model_(std::move(model)),
      version_(std::move(version)),
      role_(std::move(role)),
      latency_(kLatencyBounds),
      confidence_(kConfidenceBounds) {}

void ModelMetrics::observe_inputs(const std::vector<Tensor>& inputs) {
  std::lock_guard lock(mu_);
  for (const Tensor& t : inputs) {
    if (t.type == DataType::kBytes) continue;  // strings have no mean to drift
    const size_t count = t.element_count();
    if (count == 0) continue;
    const size_t rows = t.shape.empty() ? 1 : static_cast<size_t>(std::max<int64_t>(t.shape[0], 1));
    const size_t width = count / rows;
    const bool aggregate = width > kMaxTrackedFeatures;
    auto it = std::find_if(features_.begin(), features_.end(),
                           [&](const auto& f) { return f.first == t.name; });
    size_t slot = 0;
    if (it == features_.end()) {
      features_.emplace_back(t.name, std::vector<RunningStats>(aggregate ? 1 : width));
      aggregated_.push_back(aggregate);
      slot = features_.size() - 1;
    } else {
      slot = static_cast<size_t>(it - features_.begin());
    }
    auto& stats = features_[slot].second;
    if (aggregated_[slot]) {
      for (size_t i = 0; i < count; ++i) stats[0].add(t.value_as_double(i));
    } else {
      for (size_t i = 0; i < count; ++i) {
        const size_t feature = i % width;
        if (feature < stats.size()) stats[feature].add(t.value_as_double(i));
      }
    }
  }
}

std::string ModelMetrics::labels() const {
  return "deployment=\"" + prometheus::label_value(deployment_) + "\",model=\"" +
         prometheus::label_value(model_) + "\",version=\"" + prometheus::label_value(version_) +
         "\",role=\"" + prometheus::label_value(role_) + "\"";
}

json ModelMetrics::to_json() const {
  json inputs = json::object();
  {
    std::lock_guard lock(mu_);
    for (size_t k = 0; k < features_.size(); ++k) {
      json per = json::object();
      const auto& stats = features_[k].second;
      for (size_t i = 0; i < stats.size(); ++i) {
        per[aggregated_[k] ? "*" : std::to_string(i)] = {
            {"n", stats[i].n}, {"mean", stats[i].mean}, {"variance", stats[i].variance()}};
      }
      inputs[features_[k].first] = std::move(per);
    }
  }
  return {{"deployment", deployment_},
          {"model", model_},
          {"version", version_},
          {"role", role_},
          {"requests", requests()},
          {"errors", errors()},
          {"invalid_requests", invalid()},
          {"fallbacks", fallbacks()},
          {"served", served()},
          {"latency_seconds", histogram_json(latency_.snapshot())},
          {"confidence", histogram_json(confidence_.snapshot())},
          {"inputs", std::move(inputs)}};
}

MetricsSnapshot ModelMetrics::snapshot() const {
  MetricsSnapshot s;
  s.deployment = deployment_;
  s.model = model_;
  s.version = version_;
  s.role = role_;
  s.revision = revision();
  s.requests = requests();
  s.served = served();
  s.errors = errors();
  s.invalid = invalid();
  s.fallbacks = fallbacks();
  s.latency = latency_.snapshot();
  s.confidence = confidence_.snapshot();
  std::lock_guard lock(mu_);
  for (size_t k = 0; k < features_.size(); ++k) {
    s.inputs.push_back(
        {features_[k].first, static_cast<bool>(aggregated_[k]), features_[k].second});
  }
  return s;
}

void ModelMetrics::append_prometheus(std::string& out) const {
  const std::string l = labels();
  out += "outpost_inference_requests_total{" + l + "} " + std::to_string(requests()) + "\n";
  out += "outpost_inference_errors_total{" + l + "} " + std::to_string(errors()) + "\n";
  out += "outpost_inference_invalid_requests_total{" + l + "} " + std::to_string(invalid()) + "\n";
  out += "outpost_inference_fallbacks_total{" + l + "} " + std::to_string(fallbacks()) + "\n";
  append_histogram(out, "outpost_inference_latency_seconds", l, latency_.snapshot());
  append_histogram(out, "outpost_inference_confidence", l, confidence_.snapshot());
  std::lock_guard lock(mu_);
  for (size_t k = 0; k < features_.size(); ++k) {
    const auto& stats = features_[k].second;
    for (size_t i = 0; i < stats.size(); ++i) {
      const std::string fl = l + ",input=\"" + prometheus::label_value(features_[k].first) +
                             "\",feature=\"" +
                             (aggregated_[k] ? std::string("*") : std::to_string(i)) + "\"";
      out += "outpost_inference_input_mean{" + fl + "} " + prometheus::number(stats[i].mean) + "\n";
      out += "outpost_inference_input_variance{" + fl + "} " +
             prometheus::number(stats[i].variance()) + "\n";
    }
  }
}

std::string prometheus_header() {
  return "# HELP outpost_inference_requests_total Inference requests a model version ran.\n"
         "# TYPE outpost_inference_requests_total counter\n"
         "# HELP outpost_inference_errors_total Requests the model failed on.\n"
         "# TYPE outpost_inference_errors_total counter\n"
         "# HELP outpost_inference_invalid_requests_total Requests refused as malformed (4xx).\n"
         "# TYPE outpost_inference_invalid_requests_total counter\n"
         "# HELP outpost_inference_fallbacks_total Requests handed to the fallback model.\n"
         "# TYPE outpost_inference_fallbacks_total counter\n"
         "# HELP outpost_inference_latency_seconds Time from request to answer.\n"
         "# TYPE outpost_inference_latency_seconds histogram\n"
         "# HELP outpost_inference_confidence Top-class probability of classifier answers.\n"
         "# TYPE outpost_inference_confidence histogram\n"
         "# HELP outpost_inference_input_mean Running mean of an input feature.\n"
         "# TYPE outpost_inference_input_mean gauge\n"
         "# HELP outpost_inference_input_variance Running variance of an input feature.\n"
         "# TYPE outpost_inference_input_variance gauge\n";
}

}  // namespace outpost::agent::serve
