// End-to-end telemetry: the real server, real agents serving a generated model, and batches
// posted by hand as a misbehaving device would. What is counted on the server must equal what
// happened on the device: once each, whatever the link and the process did in between.
#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "common/http_client.h"
#include "common/onnx/onnx_builder.h"
#include "common/telemetry_batch.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Sum of the samples of a Prometheus family whose labels contain every `label="value"` given.
double prometheus_sum(const std::string& text, const std::string& name,
                      const std::vector<std::string>& labels = {}) {
  double sum = 0;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#' || line.rfind(name, 0) != 0) continue;
    char next = line.size() > name.size() ? line[name.size()] : '\0';
    if (next != ' ' && next != '{') continue;
    bool match = true;
    for (const auto& l : labels) match = match && line.find(l) != std::string::npos;
    if (match) sum += std::strtod(line.substr(line.rfind(' ') + 1).c_str(), nullptr);
  }
  return sum;
}

std::string server_metrics(const ServerProcess& server) {
  HttpClient client(server.url(), "");
  auto r = client.request("GET", "/metrics");
  EXPECT_TRUE(r.has_value() && r->status == 200);
  return r ? r->body : "";
}

// Records stamped a minute ago (inside the server's raw retention).
int64_t recent_ms(int64_t offset) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
             .count() -
         60'000 + offset;
}

telemetry::Record event_record(int64_t seq, const std::string& event) {
  return {seq, recent_ms(seq), telemetry::EventRecord{"app", 1, event, ""}};
}

telemetry::Record inference_record(int64_t seq, uint64_t served) {
  telemetry::InferenceRecord a;
  a.deployment = "app";
  a.revision = 1;
  a.model = "m";
  a.version = "1.0.0";
  a.interval_ms = 60'000;
  a.requests = a.served = served;
  a.latency = {served, 0.002 * static_cast<double>(served), {{0.0025, served}}};
  return {seq, recent_ms(seq), a};
}

std::string batch_body(const std::vector<telemetry::Record>& records, int64_t first, int64_t last) {
  std::vector<std::string> texts;
  for (const auto& r : records) texts.push_back(telemetry::record_to_json(r).dump());
  return *telemetry::compress(telemetry::batch_json(first, last, {}, texts));
}

class TelemetryE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-telemetry-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/server");
    server_->start();
    ASSERT_TRUE(server_->running());
  }
  void TearDown() override {
    agent_.reset();
    server_.reset();
    if (!HasFailure()) fs::remove_all(root_);
  }

  std::string token(int uses) {
    auto r = server_->cli(
        {"token", "create", "--site", "plant-1", "--uses", std::to_string(uses), "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.json().value("token", "");
  }

  // POST a batch as `device`; the answer's status and JSON body.
  std::pair<long, json> post(const FakeDevice& device, const std::string& body,
                             const std::string& encoding = "zstd") {
    HttpClient client(server_->url(), device.credential);
    HttpRequestOptions options;
    if (!encoding.empty()) options.headers = {{"Content-Encoding", encoding}};
    auto r = client.request("POST", "/api/v1/device/telemetry", body, "application/json", options);
    EXPECT_TRUE(r.has_value());
    if (!r) return {0, nullptr};
    return {r->status, json::parse(r->body, nullptr, false)};
  }

  double served_total(const std::string& deployment) {
    return prometheus_sum(server_metrics(*server_), "outpost_inference_requests_total",
                          {"deployment=\"" + deployment + "\""});
  }

  std::string root_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<AgentProcess> agent_;
};

TEST_F(TelemetryE2E, MalformedTruncatedOversizedAndReplayedBatchesLeaveTheStoreConsistent) {
  FakeDevice device = FakeDevice::enroll(server_->url(), token(1), {{"arch", "x86_64"}});
  ASSERT_FALSE(device.id.empty());

  // A good batch: seqs 1..3, 10 + 5 inferences.
  const std::string good =
      batch_body({event_record(1, "start"), inference_record(2, 10), inference_record(3, 5)}, 1, 3);
  auto [status, answer] = post(device, good);
  ASSERT_EQ(status, 200) << answer.dump();
  EXPECT_EQ(answer.value("acked", -1), 3);
  EXPECT_EQ(answer.value("stored", -1), 3);
  EXPECT_DOUBLE_EQ(served_total("app"), 15);

  // Replayed whole (the answer was lost, or an attacker replays it): nothing counted twice.
  std::tie(status, answer) = post(device, good);
  ASSERT_EQ(status, 200) << answer.dump();
  EXPECT_EQ(answer.value("acked", -1), 3);
  EXPECT_EQ(answer.value("stored", -1), 0);
  EXPECT_EQ(answer.value("duplicates", -1), 3);
  EXPECT_DOUBLE_EQ(served_total("app"), 15);

  // Refused whole, each with a 4xx, and nothing of them stored:
  // truncated frame,
  std::tie(status, answer) = post(device, good.substr(0, good.size() / 2));
  EXPECT_EQ(status, 400) << answer.dump();
  EXPECT_EQ(answer["error"].value("field", ""), "body");
  // a record that breaks the format after valid ones (seq 4 good, seq 5 bad),
  json bad_record = telemetry::record_to_json(inference_record(5, 1000));
  bad_record["served"] = -1;
  std::string mixed = *telemetry::compress(telemetry::batch_json(
      4, 5, {}, {telemetry::record_to_json(inference_record(4, 1000)).dump(), bad_record.dump()}));
  std::tie(status, answer) = post(device, mixed);
  EXPECT_EQ(status, 400) << answer.dump();
  EXPECT_EQ(answer["error"].value("field", ""), "records[1].served");
  // not compressed,
  std::tie(status, answer) = post(device, "{\"v\":1}", "");
  EXPECT_EQ(status, 415) << answer.dump();
  // over the size limit on the wire,
  std::tie(status, answer) = post(device, std::string(telemetry::kMaxCompressedBatch + 10, 'x'));
  EXPECT_EQ(status, 413) << answer.dump();
  // a small frame that inflates past the limit,
  std::tie(status, answer) = post(device, *telemetry::compress(std::string(64 << 20, ' '), 3));
  EXPECT_EQ(status, 413) << answer.dump();
  // and no credential at all.
  {
    HttpClient anonymous(server_->url(), "");
    HttpRequestOptions options;
    options.headers = {{"Content-Encoding", "zstd"}};
    auto r =
        anonymous.request("POST", "/api/v1/device/telemetry", good, "application/json", options);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->status, 401);
  }
  EXPECT_DOUBLE_EQ(served_total("app"), 15);

  // The refused batches poisoned nothing: the next batch is taken, and a batch that overlaps
  // what was stored (2..4) stores only seq 4.
  std::tie(status, answer) = post(
      device,
      batch_body({inference_record(2, 10), inference_record(3, 5), inference_record(4, 7)}, 2, 4));
  ASSERT_EQ(status, 200) << answer.dump();
  EXPECT_EQ(answer.value("acked", -1), 4);
  EXPECT_EQ(answer.value("stored", -1), 1);
  EXPECT_EQ(answer.value("duplicates", -1), 2);
  EXPECT_DOUBLE_EQ(served_total("app"), 22);

  // Queried as an operator would: the CLI agrees with /metrics.
  auto q = server_->cli({"telemetry", "query", "inference_requests", "--deployment", "app",
                         "--since", "30d", "-o", "json"});
  ASSERT_EQ(q.exit_code, 0) << q.out << q.err;
  EXPECT_NE(q.out.find("22"), std::string::npos) << q.out;
}

}  // namespace
}  // namespace outpost::e2e
