// Serving metrics: histogram buckets and quantiles, Welford's running statistics against a
// direct two-pass computation, per-feature input statistics, and the JSON and Prometheus forms.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "agent/serve/serving_metrics.h"
#include "agent/serve/tensor.h"
#include "test_support.h"

namespace outpost::agent::serve {
namespace {

using json = nlohmann::json;
using test_support::tensor_of;

// "name{labels} value" lines of a Prometheus text, by "name{labels}".
std::map<std::string, std::string> series_of(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    EXPECT_NE(space, std::string::npos) << line;
    if (space == std::string::npos) continue;
    out[line.substr(0, space)] = line.substr(space + 1);
  }
  return out;
}

TEST(ServeMetrics, HistogramCountsEachValueInTheFirstBucketThatHoldsIt) {
  Histogram h({1, 2, 5});
  for (double v : {0.5, 1.0, 1.5, 2.0, 3.0, 10.0, -1.0}) h.observe(v);
  const auto s = h.snapshot();
  EXPECT_EQ(s.bounds, (std::vector<double>{1, 2, 5}));
  // Upper bounds are inclusive (Prometheus "le"); 10 lands in the implied +Inf bucket.
  EXPECT_EQ(s.counts, (std::vector<uint64_t>{3, 2, 1, 1}));
  EXPECT_EQ(s.count, 7u);
  EXPECT_DOUBLE_EQ(s.sum, 17.0);
}

TEST(ServeMetrics, HistogramQuantileInterpolatesInsideTheBucket) {
  Histogram empty({1, 2});
  EXPECT_EQ(empty.snapshot().quantile(0.5), 0.0);

  Histogram h({1, 2, 4});
  for (int i = 0; i < 5; ++i) h.observe(0.5);
  for (int i = 0; i < 5; ++i) h.observe(1.5);
  const auto s = h.snapshot();
  EXPECT_DOUBLE_EQ(s.quantile(0.25), 0.5);  // halfway through (0, 1]
  EXPECT_DOUBLE_EQ(s.quantile(0.5), 1.0);
  EXPECT_DOUBLE_EQ(s.quantile(0.75), 1.5);  // halfway through (1, 2]
  EXPECT_DOUBLE_EQ(s.quantile(1.0), 2.0);

  // Everything above the last bound: the last finite bound is all that is known.
  Histogram high({1, 2, 4});
  for (int i = 0; i < 3; ++i) high.observe(100);
  EXPECT_DOUBLE_EQ(high.snapshot().quantile(0.5), 4.0);
  EXPECT_DOUBLE_EQ(high.snapshot().quantile(0.99), 4.0);
}

TEST(ServeMetrics, HistogramObserveIsThreadSafe) {
  Histogram h({0.5, 1.5});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&h, t] {
      for (int i = 0; i < 5000; ++i) h.observe(t % 2 == 0 ? 1.0 : 2.0);
    });
  }
  for (auto& t : threads) t.join();
  const auto s = h.snapshot();
  EXPECT_EQ(s.count, 20000u);
  EXPECT_EQ(s.counts, (std::vector<uint64_t>{0, 10000, 10000}));
  EXPECT_DOUBLE_EQ(s.sum, 30000.0);
}

TEST(ServeMetrics, RunningStatsMatchesADirectComputation) {
  RunningStats none;
  EXPECT_EQ(none.n, 0u);
  EXPECT_EQ(none.variance(), 0.0);
  RunningStats one;
  one.add(42);
  EXPECT_EQ(one.mean, 42.0);
  EXPECT_EQ(one.variance(), 0.0);

  // A large offset is where a naive sum-of-squares formula loses every digit.
  std::vector<double> xs;
  uint64_t state = 7;
  for (int i = 0; i < 1000; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    xs.push_back(1e6 + static_cast<double>(state >> 40) / static_cast<double>(1u << 24));
  }
  RunningStats stats;
  for (double x : xs) stats.add(x);
  double mean = 0;
  for (double x : xs) mean += x;
  mean /= static_cast<double>(xs.size());
  double ss = 0;
  for (double x : xs) ss += (x - mean) * (x - mean);
  const double variance = ss / static_cast<double>(xs.size() - 1);
  EXPECT_EQ(stats.n, xs.size());
  EXPECT_NEAR(stats.mean, mean, 1e-9 * mean);
  EXPECT_NEAR(stats.variance(), variance, 1e-6 * variance);
  EXPECT_GT(variance, 0.01);  // the data is spread, so the comparison means something
}

json feature(const ModelMetrics& m, const std::string& input, const std::string& f) {
  return m.to_json()["inputs"][input][f];
}

TEST(ServeMetrics, ObserveInputsKeepsOneStatisticPerFeatureAlongRows) {
  ModelMetrics m("dep", "clf", "1", "primary");
  // Rows along the first dimension: feature 0 sees 1, 2, 3 and feature 1 sees 10, 20, 30.
  m.observe_inputs({tensor_of<float>("x", DataType::kFp32, {3, 2}, {1, 10, 2, 20, 3, 30}),
                    tensor_of<int64_t>("sr", DataType::kInt64, {}, {16000})});
  EXPECT_EQ(feature(m, "x", "0")["n"], 3);
  EXPECT_DOUBLE_EQ(feature(m, "x", "0")["mean"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(feature(m, "x", "0")["variance"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(feature(m, "x", "1")["mean"].get<double>(), 20.0);
  EXPECT_DOUBLE_EQ(feature(m, "x", "1")["variance"].get<double>(), 100.0);
  EXPECT_EQ(m.to_json()["inputs"]["x"].size(), 2u);
  EXPECT_EQ(feature(m, "sr", "0")["n"], 1);
  EXPECT_DOUBLE_EQ(feature(m, "sr", "0")["mean"].get<double>(), 16000.0);

  // A second request adds to the same statistics.
  m.observe_inputs({tensor_of<float>("x", DataType::kFp32, {1, 2}, {6, 40})});
  EXPECT_EQ(feature(m, "x", "0")["n"], 4);
  EXPECT_DOUBLE_EQ(feature(m, "x", "0")["mean"].get<double>(), 3.0);
  EXPECT_DOUBLE_EQ(feature(m, "x", "1")["mean"].get<double>(), 25.0);

  // Higher ranks: a row is everything under the first dimension.
  ModelMetrics cube("dep", "clf", "1", "primary");
  cube.observe_inputs(
      {tensor_of<uint8_t>("img", DataType::kUint8, {2, 2, 2}, {0, 1, 2, 3, 4, 5, 6, 7})});
  EXPECT_EQ(cube.to_json()["inputs"]["img"].size(), 4u);
  EXPECT_DOUBLE_EQ(feature(cube, "img", "3")["mean"].get<double>(), 5.0);  // 3 and 7
  // A rank-1 tensor is a column of one-value rows.
  ModelMetrics column("dep", "clf", "1", "primary");
  column.observe_inputs({tensor_of<int32_t>("ids", DataType::kInt32, {4}, {1, 2, 3, 6})});
  EXPECT_EQ(column.to_json()["inputs"]["ids"].size(), 1u);
  EXPECT_EQ(feature(column, "ids", "0")["n"], 4);
  EXPECT_DOUBLE_EQ(feature(column, "ids", "0")["mean"].get<double>(), 3.0);
}

TEST(ServeMetrics, WideRowsAreSummarisedAsOneFeature) {
  ModelMetrics m("vad", "silero", "5", "primary");
  std::vector<float> at_limit(kMaxTrackedFeatures, 1.0f);
  std::vector<float> frame(512);
  for (size_t i = 0; i < frame.size(); ++i) frame[i] = static_cast<float>(i % 4);
  m.observe_inputs({tensor_of<float>("narrow", DataType::kFp32,
                                     {1, static_cast<int64_t>(kMaxTrackedFeatures)}, at_limit),
                    tensor_of<float>("input", DataType::kFp32, {1, 512}, frame)});
  json inputs = m.to_json()["inputs"];
  EXPECT_EQ(inputs["narrow"].size(), kMaxTrackedFeatures);
  EXPECT_FALSE(inputs["narrow"].contains("*"));
  ASSERT_EQ(inputs["input"].size(), 1u);
  json all = inputs["input"]["*"];
  EXPECT_EQ(all["n"], 512);
  EXPECT_DOUBLE_EQ(all["mean"].get<double>(), 1.5);

  // One over the limit is already wide.
  ModelMetrics over("vad", "silero", "5", "primary");
  over.observe_inputs(
      {tensor_of<float>("x", DataType::kFp32, {2, static_cast<int64_t>(kMaxTrackedFeatures + 1)},
                        std::vector<float>(2 * (kMaxTrackedFeatures + 1), 2.0f))});
  EXPECT_EQ(over.to_json()["inputs"]["x"].size(), 1u);
  EXPECT_EQ(over.to_json()["inputs"]["x"]["*"]["n"], 2 * (kMaxTrackedFeatures + 1));
}

TEST(ServeMetrics, ObserveInputsIsThreadSafe) {
  ModelMetrics m("dep", "clf", "1", "primary");
  const Tensor t = tensor_of<float>("x", DataType::kFp32, {2, 3}, {1, 2, 3, 1, 2, 3});
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int k = 0; k < 500; ++k) m.observe_inputs({t});
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(feature(m, "x", "2")["n"], 4000);
  EXPECT_DOUBLE_EQ(feature(m, "x", "2")["mean"].get<double>(), 3.0);
}

TEST(ServeMetrics, ToJsonHasCountersHistogramsAndInputs) {
  ModelMetrics m("dep", "clf", "1.2", "fallback");
  for (int i = 0; i < 3; ++i) m.count_request();
  m.count_error();
  m.count_invalid();
  m.count_invalid();
  m.count_fallback();
  m.observe_latency(0.003);
  m.observe_latency(0.02);
  m.observe_confidence(0.95);
  json j = m.to_json();
  EXPECT_EQ(j["deployment"], "dep");
  EXPECT_EQ(j["model"], "clf");
  EXPECT_EQ(j["version"], "1.2");
  EXPECT_EQ(j["role"], "fallback");
  EXPECT_EQ(j["requests"], 3);
  EXPECT_EQ(j["errors"], 1);
  EXPECT_EQ(j["invalid_requests"], 2);
  EXPECT_EQ(j["fallbacks"], 1);
  json& latency = j["latency_seconds"];
  EXPECT_EQ(latency["count"], 2);
  EXPECT_DOUBLE_EQ(latency["sum"].get<double>(), 0.023);
  for (const char* key : {"p50", "p95", "p99"}) {
    EXPECT_GT(latency[key].get<double>(), 0.0) << key;
    EXPECT_LE(latency[key].get<double>(), 0.025) << key;
  }
  ASSERT_TRUE(latency["buckets"].is_array());
  EXPECT_EQ(latency["buckets"].back()[0], "+Inf");
  uint64_t in_buckets = 0;
  for (const auto& b : latency["buckets"]) in_buckets += b[1].get<uint64_t>();
  EXPECT_EQ(in_buckets, 2u);  // per bucket, not cumulative
  EXPECT_EQ(j["confidence"]["count"], 1);
  EXPECT_EQ(j["confidence"]["buckets"].size(), 11u);  // 0.1 .. 1.0 and +Inf
  EXPECT_EQ(j["inputs"], json::object());
  EXPECT_EQ(m.requests(), 3u);
  EXPECT_EQ(m.errors(), 1u);
  EXPECT_EQ(m.invalid(), 2u);
  EXPECT_EQ(m.fallbacks(), 1u);
}

TEST(ServeMetrics, PrometheusTextHasCumulativeBucketsAndInf) {
  ModelMetrics m("dep", "clf", "1", "primary");
  m.count_request();
  m.count_request();
  m.count_fallback();
  m.observe_confidence(0.15);
  m.observe_confidence(0.15);
  m.observe_confidence(0.95);
  m.observe_latency(0.0002);
  m.observe_inputs({tensor_of<float>("x", DataType::kFp32, {2, 1}, {1, 3})});
  std::string text;
  m.append_prometheus(text);
  const auto series = series_of(text);
  const std::string l = R"(deployment="dep",model="clf",version="1",role="primary")";
  EXPECT_EQ(series.at("outpost_inference_requests_total{" + l + "}"), "2");
  EXPECT_EQ(series.at("outpost_inference_errors_total{" + l + "}"), "0");
  EXPECT_EQ(series.at("outpost_inference_invalid_requests_total{" + l + "}"), "0");
  EXPECT_EQ(series.at("outpost_inference_fallbacks_total{" + l + "}"), "1");
  const std::string c = "outpost_inference_confidence_bucket{" + l + ",le=";
  EXPECT_EQ(series.at(c + "\"0.1\"}"), "0");
  EXPECT_EQ(series.at(c + "\"0.2\"}"), "2");
  EXPECT_EQ(series.at(c + "\"0.9\"}"), "2");
  EXPECT_EQ(series.at(c + "\"1\"}"), "3");
  EXPECT_EQ(series.at(c + "\"+Inf\"}"), "3");
  EXPECT_EQ(series.at("outpost_inference_confidence_count{" + l + "}"), "3");
  EXPECT_EQ(std::stod(series.at("outpost_inference_confidence_sum{" + l + "}")), 1.25);
  const std::string lat = "outpost_inference_latency_seconds_bucket{" + l + ",le=";
  EXPECT_EQ(series.at(lat + "\"0.0001\"}"), "0");
  EXPECT_EQ(series.at(lat + "\"0.00025\"}"), "1");
  EXPECT_EQ(series.at(lat + "\"10\"}"), "1");
  EXPECT_EQ(series.at(lat + "\"+Inf\"}"), "1");
  const std::string fl = l + R"(,input="x",feature="0")";
  EXPECT_EQ(series.at("outpost_inference_input_mean{" + fl + "}"), "2");
  EXPECT_EQ(series.at("outpost_inference_input_variance{" + fl + "}"), "2");

  // Every bucket series is non-decreasing and ends at the count.
  uint64_t last = 0;
  size_t buckets = 0;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("outpost_inference_latency_seconds_bucket", 0) != 0) continue;
    const uint64_t v = std::stoull(line.substr(line.rfind(' ') + 1));
    EXPECT_GE(v, last) << line;
    last = v;
    ++buckets;
  }
  EXPECT_EQ(buckets, 17u);  // 16 bounds and +Inf
  EXPECT_EQ(last, 1u);
}

TEST(ServeMetrics, PrometheusEscapesLabelValues) {
  ModelMetrics m("de\"p", "c\\lf", "1\n2", "primary");
  m.count_request();
  m.observe_inputs({tensor_of<float>("in\"put\\", DataType::kFp32, {1, 1}, {5})});
  std::string text;
  m.append_prometheus(text);
  const std::string l = R"(deployment="de\"p",model="c\\lf",version="1\n2",role="primary")";
  EXPECT_NE(text.find("outpost_inference_requests_total{" + l + "} 1\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find(R"(input="in\"put\\",feature="0"} 5)"), std::string::npos) << text;
  // No raw newline inside a series: every line is a whole sample.
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    EXPECT_EQ(line.rfind("outpost_inference_", 0), 0u) << line;
    EXPECT_NE(line.find("} "), std::string::npos) << line;
  }
}

TEST(ServeMetrics, PrometheusHeaderDeclaresEverySeries) {
  const std::string header = prometheus_header();
  for (const char* name :
       {"outpost_inference_requests_total counter", "outpost_inference_errors_total counter",
        "outpost_inference_invalid_requests_total counter",
        "outpost_inference_fallbacks_total counter", "outpost_inference_latency_seconds histogram",
        "outpost_inference_confidence histogram", "outpost_inference_input_mean gauge",
        "outpost_inference_input_variance gauge"}) {
    EXPECT_NE(header.find(std::string("# TYPE ") + name + "\n"), std::string::npos) << name;
  }
}

}  // namespace
}  // namespace outpost::agent::serve
