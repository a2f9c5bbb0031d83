// The aggregator: per-interval deltas that add up to the requests made, the checkpoint that a
// crash turns into a record (nothing lost beyond it, nothing counted twice), the Welford delta
// against a direct computation; and the model server's side of it: one `served` per request,
// on the version whose answer went back, and one observer call per inference.
#include "agent/telemetry/aggregator.h"

#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "test_support.h"

#include "agent/serve/model_server.h"

namespace outpost::agent::telemetry {
namespace {

using namespace test_support;  // TempDir, tensor_of
using json = nlohmann::json;

// The inference records in the buffer, parsed, oldest first.
std::vector<json> inference_records_in(Buffer& buffer) {
  std::vector<json> out;
  auto pending = buffer.read(10'000, 64 << 20);
  EXPECT_TRUE(pending);
  if (!pending) return out;
  for (const auto& text : pending->texts) {
    auto doc = json::parse(text);
    if (doc.value("kind", "") == "inference") out.push_back(doc);
  }
  return out;
}

// Counts `n` answered requests on `m` with latencies 10 ms and one input feature.
void serve_requests(serve::ModelMetrics& m, int n, float base = 1.0f) {
  for (int i = 0; i < n; ++i) {
    m.count_request();
    m.count_served();
    m.observe_latency(0.010);
    m.observe_confidence(0.85);
    m.observe_inputs({tensor_of<float>("x", serve::DataType::kFp32, {1, 2},
                                       {base + static_cast<float>(i), 2.0f})});
  }
}

TEST(TelemetryAggregator, WelfordDeltaMatchesADirectComputation) {
  std::mt19937 rng(5);
  std::normal_distribution<double> first(3.0, 2.0), second(10.0, 0.5);
  serve::RunningStats before, after, only_second;
  for (int i = 0; i < 500; ++i) {
    const double x = first(rng);
    before.add(x);
    after.add(x);
  }
  for (int i = 0; i < 300; ++i) {
    const double x = second(rng);
    after.add(x);
    only_second.add(x);
  }
  auto delta = welford_delta(after, before);
  EXPECT_EQ(delta.n, 300u);
  EXPECT_NEAR(delta.mean, only_second.mean, 1e-9);
  EXPECT_NEAR(delta.m2, only_second.m2, 1e-6 * only_second.m2);
  // Nothing new: nothing.
  EXPECT_EQ(welford_delta(after, after).n, 0u);
}

TEST(TelemetryAggregator, DeltasOverTwoIntervalsEqualTheRequestsMade) {
  TempDir dir;
  ManualClock clock;
  Buffer buffer(dir.file("telemetry.db"), 1 << 20);
  ASSERT_TRUE(buffer.open());
  auto primary = std::make_shared<serve::ModelMetrics>("cam", "m", "1.0.0", "primary");
  auto fallback = std::make_shared<serve::ModelMetrics>("cam", "small", "0.1.0", "fallback");
  primary->set_revision(4);
  Aggregator aggregator(buffer, clock, [&] {
    return std::vector<serve::MetricsSnapshot>{primary->snapshot(), fallback->snapshot()};
  });
  serve_requests(*primary, 3);  // before start: not this run's first interval
  ASSERT_TRUE(aggregator.start());

  serve_requests(*primary, 7);
  primary->count_error();
  clock.advance_ms(60'000);
  ASSERT_EQ(*aggregator.close(), 1u);  // the fallback did nothing: no record
  serve_requests(*primary, 5, 100.0f);
  serve_requests(*fallback, 2);
  clock.advance_ms(60'000);
  ASSERT_EQ(*aggregator.close(), 2u);
  clock.advance_ms(60'000);
  ASSERT_EQ(*aggregator.close(), 0u);  // an idle interval makes nothing

  auto records = inference_records_in(buffer);
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].value("requests", 0), 7);
  EXPECT_EQ(records[0].value("served", 0), 7);
  EXPECT_EQ(records[0].value("errors", 0), 1);
  EXPECT_EQ(records[0].value("revision", 0), 4);
  EXPECT_EQ(records[0].value("interval_ms", 0), 60'000);
  EXPECT_EQ(records[0]["latency"].value("count", 0), 7);
  EXPECT_EQ(records[1].value("requests", 0), 5);
  EXPECT_EQ(records[1]["latency"].value("count", 0), 5);
  EXPECT_EQ(records[1].value("t", int64_t{0}), records[0].value("t", int64_t{0}) + 60'000);
  // Input statistics of the interval alone: x[0] = 100..104 -> mean 102.
  EXPECT_EQ(records[1]["inputs"]["x"]["0"][0], 5);
  EXPECT_NEAR(records[1]["inputs"]["x"]["0"][1].get<double>(), 102.0, 1e-4);
  EXPECT_NEAR(records[1]["inputs"]["x"]["0"][2].get<double>(), 10.0, 1e-3);  // m2 of 100..104
  EXPECT_EQ(records[2].value("role", ""), "fallback");
  EXPECT_EQ(records[2].value("requests", 0), 2);
  // Only the buckets that moved, with per-bucket counts.
  ASSERT_EQ(records[2]["confidence"]["buckets"].size(), 1u);
  EXPECT_EQ(records[2]["confidence"]["buckets"][0][1], 2);
}

TEST(TelemetryAggregator, ACrashAfterACheckpointLosesOnlyWhatCameAfterIt) {
  TempDir dir;
  ManualClock clock;
  const std::string path = dir.file("telemetry.db");
  {
    auto buffer = std::make_unique<Buffer>(path, 1 << 20);
    ASSERT_TRUE(buffer->open());
    auto metrics = std::make_shared<serve::ModelMetrics>("cam", "m", "1.0.0", "primary");
    Aggregator aggregator(*buffer, clock,
                          [&] { return std::vector<serve::MetricsSnapshot>{metrics->snapshot()}; });
    ASSERT_TRUE(aggregator.start());
    serve_requests(*metrics, 4);
    clock.advance_ms(5'000);
    ASSERT_TRUE(aggregator.checkpoint());
    serve_requests(*metrics, 6);
    clock.advance_ms(5'000);
    ASSERT_TRUE(aggregator.checkpoint());  // replaces the first: 10 so far
    serve_requests(*metrics, 3);           // after the last checkpoint: lost in the crash
    EXPECT_TRUE(inference_records_in(*buffer).empty());  // nothing shipped before the close
    // "kill -9": no close(); the process' counters are gone with it.
  }
  Buffer buffer(path, 1 << 20);
  ASSERT_TRUE(buffer.open());
  auto metrics = std::make_shared<serve::ModelMetrics>("cam", "m", "1.0.0", "primary");
  Aggregator aggregator(buffer, clock,
                        [&] { return std::vector<serve::MetricsSnapshot>{metrics->snapshot()}; });
  ASSERT_EQ(*aggregator.start(), 1u);
  serve_requests(*metrics, 2);
  clock.advance_ms(60'000);
  ASSERT_EQ(*aggregator.close(), 1u);
  // A second restart finds nothing open: the recovered aggregate is not counted again.
  Aggregator again(buffer, clock, [&] { return std::vector<serve::MetricsSnapshot>{}; });
  ASSERT_EQ(*again.start(), 0u);

  auto records = inference_records_in(buffer);
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0].value("requests", 0), 10);
  EXPECT_EQ(records[0].value("interval_ms", 0), 10'000);
  EXPECT_EQ(records[1].value("requests", 0), 2);
  EXPECT_LT(records[0].value("seq", 0), records[1].value("seq", 0));
}

// A one-input, one-output classifier; fails when told to.
class TelemetryFakeSession final : public serve::InferenceSession {
 public:
  explicit TelemetryFakeSession(bool* fail) : fail_(fail) {}
  const std::vector<serve::TensorSpec>& inputs() const override { return inputs_; }
  const std::vector<serve::TensorSpec>& outputs() const override { return outputs_; }
  Result<std::vector<serve::Tensor>> run(const std::vector<serve::Tensor>& in,
                                         const std::vector<std::string>&) override {
    if (*fail_) return make_error(Errc::kInternal, "the model failed");
    const int64_t rows = in.empty() || in[0].shape.empty() ? 1 : in[0].shape[0];
    std::vector<float> values;
    for (int64_t r = 0; r < rows; ++r) values.insert(values.end(), {0.8f, 0.2f});
    return std::vector<serve::Tensor>{
        tensor_of<float>("p", serve::DataType::kFp32, {rows, 2}, values)};
  }

 private:
  bool* fail_;
  std::vector<serve::TensorSpec> inputs_ = {{"x", serve::DataType::kFp32, {-1, 2}, true}};
  std::vector<serve::TensorSpec> outputs_ = {{"p", serve::DataType::kFp32, {-1, 2}, true}};
};

TEST(TelemetryAggregator, ModelServerCountsEachRequestServedOnceAndTellsTheObserver) {
  bool primary_fails = false;
  bool fallback_fails = false;
  serve::ModelServer server(
      [&](const std::string& path,
          const serve::SessionOptions&) -> Result<std::shared_ptr<serve::InferenceSession>> {
        return std::make_shared<TelemetryFakeSession>(path == "primary.onnx" ? &primary_fails
                                                                             : &fallback_fails);
      });
  std::vector<serve::InferenceOutcome> seen;
  std::mutex seen_mu;
  server.set_observer([&](const serve::InferenceOutcome& o) {
    std::lock_guard lock(seen_mu);
    seen.push_back(o);
  });
  serve::ServiceConfig config;
  config.deployment = "cam";
  config.route = "/models/cam";
  config.revision = 9;
  config.primary = {"m", "1.0.0", "primary.onnx"};
  config.fallback = serve::ModelRef{"small", "0.1.0", "fallback.onnx"};
  ASSERT_TRUE(server.activate(config));
  auto infer = [&](const std::string& body) {
    http::Request request;
    request.method = "POST";
    request.path = "/models/cam/infer";
    request.body = body;
    return server.handle(request)->status;
  };
  const std::string good =
      R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]})";
  EXPECT_EQ(infer(good), 200);
  EXPECT_EQ(infer(good), 200);
  EXPECT_EQ(infer(R"({"inputs":[]})"), 400);
  primary_fails = true;
  EXPECT_EQ(infer(good), 200);  // the fallback answers
  fallback_fails = true;
  EXPECT_EQ(infer(good), 500);  // both fail: the fallback's error goes back

  uint64_t served = 0;
  for (const auto& s : server.metrics_snapshots()) {
    served += s.served;
    EXPECT_EQ(s.revision, 9);
    if (s.role == "primary") {
      EXPECT_EQ(s.served, 3u);  // two answers and the refusal
      EXPECT_EQ(s.requests, 5u);
    } else {
      EXPECT_EQ(s.served, 2u);
    }
  }
  EXPECT_EQ(served, 5u);  // one per request: the deployment's requests, counted once

  ASSERT_EQ(seen.size(), 5u);
  EXPECT_EQ(seen[0].outcome, "ok");
  EXPECT_EQ(seen[0].role, "primary");
  EXPECT_EQ(seen[0].revision, 9);
  ASSERT_TRUE(seen[0].confidence.has_value());
  EXPECT_NEAR(*seen[0].confidence, 0.8, 1e-6);
  EXPECT_EQ(seen[2].outcome, "invalid");
  EXPECT_EQ(seen[3].outcome, "fallback");
  EXPECT_EQ(seen[3].role, "fallback");
  EXPECT_EQ(seen[3].model, "small");
  EXPECT_EQ(seen[4].outcome, "error");
  EXPECT_EQ(seen[4].role, "fallback");
  EXPECT_GT(seen[0].latency_s, 0.0);
}

}  // namespace
}  // namespace outpost::agent::telemetry
