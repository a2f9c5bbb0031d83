// End-to-end telemetry: the real server, real agents serving a generated model, and batches
// posted by hand as a misbehaving device would. What is counted on the server must equal what
// happened on the device: once each, whatever the link and the process did in between.
#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
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
    client.set_signer(device.signer);
    HttpRequestOptions options;
    if (!encoding.empty()) options.headers = {{"Content-Encoding", encoding}};
    auto r = client.request("POST", "/api/v1/device/telemetry", body, "application/json", options);
    EXPECT_TRUE(r.has_value());
    if (!r) return {0, nullptr};
    return {r->status, json::parse(r->body, nullptr, false)};
  }

  // Pushes a generated classifier and applies a model-only deployment `app` with the telemetry
  // policy given, then waits until the agent serves it.
  void deploy(const json& telemetry_policy) {
    std::string file = root_ + "/m.onnx";
    std::ofstream(file, std::ios::binary) << onnx::build_classifier_onnx({});
    auto r = server_->cli({"model", "push", "m", "1.0.0", "--variant", "accelerator=cpu=" + file});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    json manifest = {{"apiVersion", "outpost/v1"},
                     {"kind", "Deployment"},
                     {"metadata", {{"name", "app"}}},
                     {"spec",
                      {{"selector", {{"sites", {"plant-1"}}}},
                       {"model", {{"name", "m"}, {"version", "1.0.0"}}},
                       {"telemetry", telemetry_policy}}}};
    r = server_->cli({"apply", "-f", "-"}, manifest.dump());
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    json last;
    ASSERT_TRUE(agent_->wait_for(
        [](const json& s) {
          for (const auto& d : s.value("deployments", json::array())) {
            if (d.value("name", "") == "app" && d.value("phase", "") == "running") return true;
          }
          return false;
        },
        60, &last))
        << last.dump();
  }

  // `n` inferences on the agent's route; every one must be answered.
  void infer(int n) {
    HttpClient client(agent_->url(), "");
    const std::string body = json{{"inputs",
                                   {{{"name", "input"},
                                     {"datatype", "FP32"},
                                     {"shape", {1, 4}},
                                     {"data", {0.5, -1, 2, 0.25}}}}}}
                                 .dump();
    for (int i = 0; i < n; ++i) {
      auto r = client.request("POST", "/models/app/infer", body);
      ASSERT_TRUE(r.has_value() && r->status == 200) << (r ? r->body : r.error().describe());
    }
  }

  // The agent's GET /v1/telemetry (null when it does not answer).
  json agent_telemetry() const {
    HttpClient client(agent_->url(), "");
    auto r = client.request("GET", "/v1/telemetry");
    if (!r || r->status != 200) return nullptr;
    return json::parse(r->body, nullptr, false);
  }

  // Polls until `done` holds for the agent's telemetry stats; false after timeout_s.
  bool wait_telemetry(const std::function<bool(const json&)>& done, int timeout_s, json* last) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    while (std::chrono::steady_clock::now() < deadline) {
      *last = agent_telemetry();
      if (last->is_object() && done(*last)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  // The server's view of one device (`outpost device show ID -o json`).
  json device_telemetry(const std::string& id) {
    auto r = server_->cli({"device", "show", id, "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.json().value("telemetry", json());
  }

  // Sum of a query's aggregate field over the fleet (`outpost telemetry query`).
  double query(const std::string& metric, const std::string& field,
               const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {"telemetry", "query", metric, "--since", "1h", "-o", "json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = server_->cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    json doc = r.json();
    return doc["aggregate"].value(field, -1.0);
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

// The "done when": inferences served while the server is down, a kill -9 of the agent
// with the backlog on disk, and another in the middle of shipping it; when everything has
// drained, every inference is counted once, every sampled inference is stored once, and the
// server holds exactly the records the agent numbered.
TEST_F(TelemetryE2E, ServedWhileOfflineArrivesOnceAcrossKill9sInTheMiddleOfShipping) {
  const std::vector<std::string> args = {
      "--telemetry-interval", "1s", "--telemetry-flush", "200ms",
      // Small, paced batches: the backlog takes several uploads, so a kill lands among them.
      "--telemetry-batch", "8K", "--telemetry-rate", "6K"};
  std::vector<std::string> first = {"--server", server_->url(), "--enroll-token", token(1)};
  first.insert(first.end(), args.begin(), args.end());
  agent_ = std::make_unique<AgentProcess>(root_ + "/agent");
  agent_->start(first);
  ASSERT_TRUE(agent_->running());
  deploy({{"sample", 1.0}, {"on_anomaly", 1.0}});
  const std::string id = agent_->device_id();

  // 1. Online.
  int sent = 100;
  infer(sent);
  json t;
  ASSERT_TRUE(wait_telemetry([&](const json&) { return served_total("app") == sent; }, 30, &t))
      << served_total("app") << " " << t.dump();

  // 2. Server down: served and buffered on the device, then a crash with all of it on disk.
  server_->stop();
  infer(300);
  sent += 300;
  // Two intervals with no traffic: every count is in a closed aggregate record.
  std::this_thread::sleep_for(std::chrono::milliseconds(2'500));
  t = agent_telemetry();
  const int64_t offline_acked = t["buffer"].value("acked_seq", int64_t{0});
  ASSERT_GT(t["buffer"].value("last_seq", int64_t{0}), offline_acked + 300) << t.dump();
  agent_->stop(/*hard=*/true);
  // A copy of the buffer as it is now, all of the backlog unacknowledged (step 5 restores it).
  const std::string snapshot = root_ + "/telemetry-snapshot";
  fs::create_directories(snapshot);
  for (const char* f : {"telemetry.db", "telemetry.db-wal"}) {
    if (fs::exists(agent_->data_dir() + "/" + f)) {
      fs::copy_file(agent_->data_dir() + "/" + f, snapshot + "/" + f);
    }
  }
  agent_->start(args);

  // 3. Server back: kill -9 while the backlog is part way up.
  server_->start();
  ASSERT_TRUE(wait_telemetry(
      [&](const json& s) { return s["buffer"].value("acked_seq", int64_t{0}) > offline_acked; }, 30,
      &t))
      << t.dump();
  const int64_t acked_at_kill = t["buffer"].value("acked_seq", int64_t{0});
  const int64_t last_at_kill = t["buffer"].value("last_seq", int64_t{0});
  agent_->stop(/*hard=*/true);
  EXPECT_LT(acked_at_kill, last_at_kill) << "the kill came after shipping ended: " << t.dump();
  EXPECT_LT(served_total("app"), sent) << "the kill came after shipping ended";

  // 4. Back for good, and a little more traffic.
  agent_->start(args);
  infer(50);
  sent += 50;
  ASSERT_TRUE(wait_telemetry(
      [&](const json& s) {
        return served_total("app") >= sent &&
               s["buffer"].value("acked_seq", int64_t{0}) ==
                   s["buffer"].value("last_seq", int64_t{-1}) &&
               s["buffer"].value("samples_queued", int64_t{-1}) == 0;
      },
      60, &t))
      << served_total("app") << " of " << sent << ": " << t.dump();
  std::this_thread::sleep_for(std::chrono::milliseconds(1'500));  // nothing late doubles up
  t = agent_telemetry();

  // Every inference counted once, on /metrics and in a query.
  EXPECT_DOUBLE_EQ(served_total("app"), sent);
  EXPECT_DOUBLE_EQ(query("inference_requests", "sum", {"--deployment", "app"}), sent);
  // Sampled at 1.0: every inference's sample stored once.
  EXPECT_DOUBLE_EQ(query("sample_latency_seconds", "points", {"--deployment", "app"}), sent);
  // One activation, once.
  EXPECT_DOUBLE_EQ(query("events", "sum", {"--deployment", "app"}), 1);
  // Nothing dropped, and the server holds exactly the records the agent numbered. Health
  // records keep coming every second, so read both sides until they agree at a quiet moment:
  // a record lost or stored twice would keep them apart for good.
  EXPECT_EQ(t["dropped"], json({{"samples", 0}, {"health", 0}, {"aggregates", 0}, {"events", 0}}))
      << t.dump();
  json server_view;
  int64_t last_seq = -1;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    t = agent_telemetry();
    last_seq = t["buffer"].value("last_seq", int64_t{-1});
    server_view = device_telemetry(id);
    if (server_view.value("records", int64_t{-2}) == last_seq &&
        server_view.value("acked_seq", int64_t{-2}) == last_seq &&
        t["buffer"].value("last_seq", int64_t{-1}) ==
            agent_telemetry()["buffer"].value("last_seq", int64_t{-3})) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(server_view.value("acked_seq", int64_t{-1}), last_seq) << server_view.dump();
  EXPECT_EQ(server_view.value("records", int64_t{-1}), last_seq) << server_view.dump();

  // 5. The device comes back from the snapshot (a restored disk image; acknowledgements lost):
  // it sends its backlog again, and the server counts none of it twice.
  agent_->stop(/*hard=*/true);
  for (const char* f : {"telemetry.db", "telemetry.db-wal", "telemetry.db-shm"}) {
    fs::remove(agent_->data_dir() + "/" + f);
    if (fs::exists(snapshot + "/" + f)) {
      fs::copy_file(snapshot + "/" + f, agent_->data_dir() + "/" + f);
    }
  }
  const double duplicates_before =
      prometheus_sum(server_metrics(*server_), "outpost_telemetry_duplicate_records_total");
  agent_->start(args);
  // It resends its oldest batch; the answer (acked up to what the server has) lets it drop the
  // rest of the old backlog without sending it. The shipper's counters move just after the
  // buffer's ack (which may checkpoint a large WAL in between), so wait for both.
  ASSERT_TRUE(wait_telemetry(
      [&](const json& s) {
        return s["buffer"].value("acked_seq", int64_t{0}) >= last_seq &&
               s["shipper"].value("batches_sent", int64_t{0}) >= 1;
      },
      30, &t))
      << t.dump();
  EXPECT_GT(prometheus_sum(server_metrics(*server_), "outpost_telemetry_duplicate_records_total"),
            duplicates_before);
  EXPECT_DOUBLE_EQ(served_total("app"), sent);
  EXPECT_DOUBLE_EQ(query("sample_latency_seconds", "points", {"--deployment", "app"}), sent);
  EXPECT_DOUBLE_EQ(query("events", "sum", {"--deployment", "app"}), 1);
}

// A flood far beyond the buffer's bound while the server is away: the files stay within the
// bound, raw samples go first and are counted, and every aggregate still arrives.
TEST_F(TelemetryE2E, AFloodBeyondTheBufferBoundDropsSamplesFirstAndReportsIt) {
  constexpr int64_t kBound = 256 * 1024;
  agent_ = std::make_unique<AgentProcess>(root_ + "/agent");
  agent_->start({"--server", server_->url(), "--enroll-token", token(1), "--telemetry-buffer",
                 "256K", "--telemetry-interval", "1s", "--telemetry-flush", "200ms"});
  ASSERT_TRUE(agent_->running());
  deploy({{"sample", 1.0}, {"on_anomaly", 1.0}});
  const std::string id = agent_->device_id();

  server_->stop();
  // About 300 bytes of buffer each: 7,000 samples are eight times the bound.
  constexpr int kRequests = 7'000;
  int64_t largest = 0;
  for (int i = 0; i < kRequests / 1000; ++i) {
    infer(1000);
    int64_t files = 0;
    for (const char* f : {"/telemetry.db", "/telemetry.db-wal"}) {
      struct stat st {};
      if (::stat((agent_->data_dir() + f).c_str(), &st) == 0) files += st.st_size;
    }
    largest = std::max(largest, files);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(2'000));
  json t = agent_telemetry();
  ASSERT_TRUE(t.is_object());
  const int64_t dropped_samples = t["dropped"].value("samples", int64_t{0});
  EXPECT_GT(dropped_samples, kRequests / 2) << t.dump();
  EXPECT_EQ(t["dropped"].value("aggregates", int64_t{-1}), 0) << t.dump();
  EXPECT_EQ(t["dropped"].value("events", int64_t{-1}), 0) << t.dump();
  EXPECT_LE(t["buffer"].value("used_bytes", kBound * 10), kBound) << t.dump();
  // The files on disk: the bound plus the WAL's small, fixed allowance.
  EXPECT_LE(largest, 2 * kBound) << t.dump();

  server_->start();
  ASSERT_TRUE(wait_telemetry(
      [&](const json& s) {
        return s["buffer"].value("acked_seq", int64_t{0}) ==
                   s["buffer"].value("last_seq", int64_t{-1}) &&
               served_total("app") >= kRequests;
      },
      60, &t))
      << t.dump();
  // Every aggregate arrived: each inference counted once despite the drops.
  EXPECT_DOUBLE_EQ(served_total("app"), kRequests);
  // The drops are reported upstream, as the device counted them.
  json server_view = device_telemetry(id);
  EXPECT_EQ(server_view["dropped_by_class"].value("samples", int64_t{-1}),
            t["dropped"].value("samples", int64_t{-2}))
      << server_view.dump();
  EXPECT_GT(prometheus_sum(server_metrics(*server_), "outpost_telemetry_dropped_total",
                           {"class=\"samples\""}),
            0);
  auto list = server_->cli({"device", "list"});
  EXPECT_NE(list.out.find("dropped"), std::string::npos) << list.out;
  auto show = server_->cli({"device", "show", id});
  EXPECT_NE(show.out.find("dropped on the device: " +
                          std::to_string(t["dropped"].value("samples", int64_t{-1})) + " samples"),
            std::string::npos)
      << show.out;
}

// Workload events reach the operator: a companion process that runs (healthy after the 2 s
// settle time), then crashes, shows up as start, crash and restart events of its deployment;
// one that crashes before it was ever healthy as a failed revision.
TEST_F(TelemetryE2E, WorkloadCrashesAndRestartsArriveAsEvents) {
  agent_ = std::make_unique<AgentProcess>(root_ + "/agent");
  agent_->start({"--server", server_->url(), "--enroll-token", token(1), "--telemetry-interval",
                 "1s", "--telemetry-flush", "200ms"});
  ASSERT_TRUE(agent_->running());
  json manifest = {
      {"apiVersion", "outpost/v1"},
      {"kind", "Deployment"},
      {"metadata", {{"name", "flaky"}}},
      {"spec",
       {{"selector", {{"sites", {"plant-1"}}}},
        {"workload",
         {{"command", {"/bin/sh", "-c", "sleep 2.5; exit 3"}}, {"restart", "always"}}}}}};
  auto r = server_->cli({"apply", "-f", "-"}, manifest.dump());
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;

  auto events_by_kind = [&] {
    auto q = server_->cli({"telemetry", "query", "events", "--deployment", "flaky", "--since", "1h",
                           "--by", "detail", "-o", "json"});
    EXPECT_EQ(q.exit_code, 0) << q.err;
    std::map<std::string, double> out;
    for (const auto& series : q.json().value("series", json::array())) {
      out[series.value("detail", "")] = series["aggregate"].value("sum", 0.0);
    }
    return out;
  };
  std::map<std::string, double> seen;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    seen = events_by_kind();
    if (seen["start"] >= 1 && seen["crash"] >= 2 && seen["restart"] >= 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  // The agent starts the revision once; the supervisor restarts it after each crash.
  EXPECT_EQ(seen["start"], 1) << json(seen).dump();
  EXPECT_GE(seen["crash"], 2) << json(seen).dump();
  EXPECT_GE(seen["restart"], 1) << json(seen).dump();
  EXPECT_LE(seen["restart"], seen["crash"]) << json(seen).dump();
  EXPECT_EQ(seen["activate"], 1) << json(seen).dump();
  EXPECT_EQ(seen["failed"], 0) << json(seen).dump();  // it was healthy before each crash
}

}  // namespace
}  // namespace outpost::e2e
