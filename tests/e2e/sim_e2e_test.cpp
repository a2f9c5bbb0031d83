// End-to-end: `outpost sim` as a user runs it, against the real `outpost server` on SQLite:
// hundreds of virtual devices enroll, sync, go through a staged rollout (a good revision to
// everyone, a crashing one rolled back at its first wave), and converge over flaky links and
// after a partition. The assertions read the simulator's JSON summary and the server's views.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include <gtest/gtest.h>

#include "common/onnx/onnx_builder.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class SimE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-sim-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/server");
    server_->start({"--rollout-tick", "200ms", "--rollout-gate-interval", "1s"});
    ASSERT_TRUE(server_->running());
    onnx::ClassifierSpec spec;
    spec.seed = 3;
    const std::string model = root_ + "/m.onnx";
    std::ofstream(model, std::ios::binary) << onnx::build_classifier_onnx(spec);
    auto pushed =
        server_->cli({"model", "push", "clf", "1.0.0", "--variant", "accelerator=cpu=" + model});
    ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  }
  void TearDown() override {
    if (sim_.joinable()) sim_.join();
    if (HasFailure()) std::cerr << "outpost sim said:\n" << sim_result_.out << sim_result_.err;
    server_.reset();
    if (!HasFailure()) fs::remove_all(root_);
  }

  // Applies deployment "app" (every sim site, the model, a stand-in workload) with `config`
  // and `rollout`.
  CommandResult apply(const json& config, const json& rollout = json::object()) {
    json spec = {{"selector", {{"sites", {"sim-*"}}}},
                 {"model", {{"name", "clf"}, {"version", "1.0.0"}}},
                 {"workload", {{"command", {"bin/app"}}}},
                 {"config", config}};
    if (!rollout.empty()) spec["rollout"] = rollout;
    json manifest = {{"apiVersion", "outpost/v1"},
                     {"kind", "Deployment"},
                     {"metadata", {{"name", "app"}}},
                     {"spec", spec}};
    return server_->cli({"apply", "-f", "-"}, manifest.dump());
  }

  // Runs `outpost sim ARGS -o json --progress 0` on its own thread.
  void start_sim(std::vector<std::string> args) {
    std::vector<std::string> argv = {"sim", "-o", "json", "--progress", "0"};
    argv.insert(argv.end(), args.begin(), args.end());
    sim_ = std::thread([this, argv] { sim_result_ = server_->cli(argv); });
  }
  json finish_sim() {
    sim_.join();
    EXPECT_EQ(sim_result_.exit_code, 0) << sim_result_.out << sim_result_.err;
    json summary = json::parse(sim_result_.out, nullptr, false);
    EXPECT_TRUE(summary.is_object()) << sim_result_.out << sim_result_.err;
    // One JSON line, as scripts read it.
    EXPECT_EQ(std::count(sim_result_.out.begin(), sim_result_.out.end(), '\n'), 1)
        << sim_result_.out;
    return summary.is_object() ? summary : json::object();
  }

  int64_t enrolled_devices() {
    auto r = server_->cli({"device", "list", "-o", "json"});
    auto doc = json::parse(r.out, nullptr, false);
    if (doc.is_object() && doc.contains("devices"))
      return static_cast<int64_t>(doc["devices"].size());
    return doc.is_array() ? static_cast<int64_t>(doc.size()) : 0;
  }
  bool wait_enrolled(int64_t n, int timeout_s) {
    for (int i = 0; i < timeout_s * 5; ++i) {
      if (enrolled_devices() >= n) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }
  json rollout_status() {
    auto r = server_->cli({"rollout", "status", "app", "-o", "json"});
    return json::parse(r.out, nullptr, false);
  }
  bool wait_rollout(const std::string& state, int timeout_s, json* last) {
    for (int i = 0; i < timeout_s * 5; ++i) {
      *last = rollout_status();
      if (last->is_object() && last->value("state", "") == state) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }

  std::string root_;
  std::unique_ptr<ServerProcess> server_;
  std::thread sim_;
  CommandResult sim_result_;
};

TEST_F(SimE2E, TwoHundredDevicesConvergeThroughAStagedRollout) {
  ASSERT_EQ(apply({{"tag", 1}}).exit_code, 0);
  start_sim({"--devices", "200", "--sites", "4", "--duration", "16s", "--telemetry-interval", "4s",
             "--activate", "200ms"});
  ASSERT_TRUE(wait_enrolled(200, 60)) << enrolled_devices();
  std::this_thread::sleep_for(std::chrono::seconds(2));
  auto updated =
      apply({{"tag", 2}}, {{"waves", {"10%", "50%", "100%"}}, {"max_unavailable", "25%"}});
  ASSERT_EQ(updated.exit_code, 0) << updated.err;
  json status;
  EXPECT_TRUE(wait_rollout("completed", 15, &status)) << status.dump(2);
  // Waves went one after another.
  std::string history;
  for (const auto& h : status["history"]) history += h["event"].get<std::string>() + "\n";
  EXPECT_NE(history.find("wave 1 settled (20 devices)"), std::string::npos) << history;
  EXPECT_NE(history.find("wave 2 started (100 devices in all)"), std::string::npos) << history;
  EXPECT_EQ(status["counts"].value("healthy", 0), 200) << status.dump(2);

  const json s = finish_sim();
  EXPECT_EQ(s["devices"], 200);
  EXPECT_EQ(s["enrolled"], 200);
  EXPECT_EQ(s["converged"], 200) << s.dump(2);
  EXPECT_EQ(s["errors"], 0) << s.dump(2);
  EXPECT_EQ(s["running"]["app"]["2"], 200) << s.dump(2);
  EXPECT_GE(s["updates"].get<int64_t>(), 400);  // revision 1, then revision 2, each device
  EXPECT_GT(s["telemetry_batches"].get<int64_t>(), 0);
  // The stand-in models' telemetry went through the real ingest: the fleet's inferences are
  // in the server's query, and every device reported running revision 2.
  auto q = server_->cli({"telemetry", "query", "inference_requests", "--deployment", "app",
                         "--since", "10m", "-o", "json"});
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_GT(q.json()["aggregate"].value("sum", 0.0), 0.0) << q.out;
  EXPECT_GT(q.json().value("devices", 0), 100) << q.out;
  auto shown = server_->cli({"deployment", "show", "app", "-o", "json"});
  EXPECT_EQ(shown.json()["stable_revision"], 2);
}

TEST_F(SimE2E, ACrashingRevisionStopsAtTheFirstWaveAndRollsBackAcrossTheFleet) {
  ASSERT_EQ(apply({{"tag", 1}}).exit_code, 0);
  start_sim({"--devices", "100", "--sites", "5", "--duration", "12s", "--telemetry-interval", "0s",
             "--activate", "100ms"});
  ASSERT_TRUE(wait_enrolled(100, 60));
  std::this_thread::sleep_for(std::chrono::seconds(2));
  ASSERT_EQ(apply({{"tag", 2}, {"sim", {{"crash", true}}}},
                  {{"waves", {"5%", "100%"}}, {"max_unavailable", "100%"}})
                .exit_code,
            0);
  json status;
  ASSERT_TRUE(wait_rollout("rolled_back", 15, &status)) << status.dump(2);
  EXPECT_EQ(status["breach"]["name"], "max_failed_devices");
  EXPECT_NE(status["reason"].get<std::string>().find("simulated crash"), std::string::npos)
      << status.dump(2);
  const json s = finish_sim();
  EXPECT_EQ(s["converged"], 100) << s.dump(2);
  EXPECT_EQ(s["errors"], 0) << s.dump(2);
  // Only the first wave (5 devices) ever tried revision 2 (the rollback can overtake some of
  // them while they still start it); every device runs revision 1.
  EXPECT_GE(s["crashes"].get<int64_t>(), 1) << s.dump(2);
  EXPECT_LE(s["crashes"].get<int64_t>(), 5) << s.dump(2);
  EXPECT_EQ(s["running"]["app"]["1"], 100) << s.dump(2);
  EXPECT_FALSE(s["running"]["app"].contains("2")) << s.dump(2);
}

TEST_F(SimE2E, ARevisionWhoseModelErrorsIsRolledBackByTheTelemetryGate) {
  ASSERT_EQ(apply({{"tag", 1}}).exit_code, 0);
  // Every device ships its model's numbers each second; revision 2's model fails half of
  // its requests (the stand-in model's config.sim.error_rate), revision 1's none.
  start_sim({"--devices", "40", "--sites", "4", "--duration", "16s", "--telemetry-interval", "1s",
             "--inference-rate", "20", "--activate", "100ms"});
  ASSERT_TRUE(wait_enrolled(40, 60));
  std::this_thread::sleep_for(std::chrono::seconds(3));
  ASSERT_EQ(apply({{"tag", 2}, {"sim", {{"error_rate", 0.5}}}},
                  {{"waves", {"10%", "100%"}},
                   {"max_unavailable", "100%"},
                   {"bake", "20s"},
                   {"gates", {{"max_error_rate", 0.05}, {"min_requests", 50}}}})
                .exit_code,
            0);
  json status;
  ASSERT_TRUE(wait_rollout("rolled_back", 20, &status)) << status.dump(2);
  EXPECT_EQ(status["breach"]["name"], "max_error_rate") << status.dump(2);
  const double rate = status["breach"]["value"].get<double>();
  EXPECT_GT(rate, 0.3) << status.dump(2);  // about half of revision 2's requests failed
  EXPECT_LT(rate, 0.7) << status.dump(2);
  EXPECT_LT(status["breach"]["baseline"].get<double>(), 0.01) << status.dump(2);  // revision 1
  // Only the first wave (4 devices) ever ran revision 2, and it is back on revision 1.
  EXPECT_EQ(status["waves"][1]["counts"]["pending"], 36) << status.dump(2);
  const json s = finish_sim();
  EXPECT_EQ(s["errors"], 0) << s.dump(2);
  EXPECT_EQ(s["converged"], 40) << s.dump(2);
  EXPECT_EQ(s["running"]["app"]["1"], 40) << s.dump(2);
}

TEST_F(SimE2E, FlakyLinksLoseRequestsYetEveryDeviceConvergesWithoutErrors) {
  ASSERT_EQ(apply({{"tag", 1}}).exit_code, 0);
  start_sim({"--devices", "60", "--sites", "3", "--duration", "14s", "--profile", "flaky",
             "--drop-rate", "0.2", "--latency", "5ms-60ms", "--telemetry-interval", "2s", "--seed",
             "42", "--backoff-max", "2s"});
  ASSERT_TRUE(wait_enrolled(60, 60));
  std::this_thread::sleep_for(std::chrono::seconds(3));
  ASSERT_EQ(apply({{"tag", 2}}, {{"max_unavailable", "100%"}}).exit_code, 0);
  const json s = finish_sim();
  EXPECT_EQ(s["profile"], "flaky");
  EXPECT_EQ(s["converged"], 60) << s.dump(2);
  EXPECT_EQ(s["errors"], 0) << s.dump(2);
  EXPECT_GT(s["faults"].get<int64_t>(), 10) << s.dump(2);  // the link really was flaky
  EXPECT_EQ(s["running"]["app"]["2"], 60) << s.dump(2);
}

TEST_F(SimE2E, APartitionedSiteCatchesUpWhenItReturns) {
  ASSERT_EQ(apply({{"tag", 1}}).exit_code, 0);
  // Half of the 4 sites are cut off from 3 s to 11 s of the run; retries back off to 2 s at
  // most (the agent's 60 s would outlast the test).
  start_sim({"--devices", "40", "--sites", "4", "--duration", "18s", "--profile", "partition",
             "--partition-start", "3s", "--partition-length", "8s", "--partition-sites", "50%",
             "--telemetry-interval", "0s", "--backoff-max", "2s"});
  ASSERT_TRUE(wait_enrolled(40, 60));
  std::this_thread::sleep_for(std::chrono::seconds(5));  // inside the partition
  ASSERT_EQ(apply({{"tag", 2}}, {{"max_unavailable", "100%"}, {"offline_grace", "2s"}}).exit_code,
            0);
  json status;
  ASSERT_TRUE(wait_rollout("completed", 20, &status)) << status.dump(2);
  EXPECT_GT(status["counts"].value("deferred", 0), 0) << status.dump(2);  // the cut-off sites
  const json s = finish_sim();
  EXPECT_EQ(s["converged"], 40) << s.dump(2);
  EXPECT_EQ(s["errors"], 0) << s.dump(2);
  EXPECT_GT(s["faults"].get<int64_t>(), 0);
  EXPECT_EQ(s["running"]["app"]["2"], 40) << s.dump(2);  // they caught up after the partition
}

TEST_F(SimE2E, AStateFileKeepsDevicesASmallerRunDidNotUse) {
  ASSERT_EQ(apply({{"tag", 1}}).exit_code, 0);
  const std::string state = root_ + "/fleet.state";
  const std::vector<std::string> common = {
      "--sites", "2", "--duration", "1s", "--telemetry-interval", "0s", "--state", state};
  auto run = [&](const std::string& devices) {
    std::vector<std::string> args = {"--devices", devices};
    args.insert(args.end(), common.begin(), common.end());
    start_sim(args);
    return finish_sim();
  };
  EXPECT_EQ(run("30")["enrolled_before"], 0);
  EXPECT_EQ(run("10")["enrolled_before"], 10);
  // The 20 devices the second run left out are still in the file: nobody enrolls again.
  const json third = run("30");
  EXPECT_EQ(third["enrolled_before"], 30) << third.dump(2);
  EXPECT_EQ(third["errors"], 0) << third.dump(2);
  EXPECT_EQ(enrolled_devices(), 30);
}

TEST_F(SimE2E, BadOptionsAreRefusedNamingTheOption) {
  auto r = server_->cli({"sim", "--devices", "10", "--profile", "lossy"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--profile"), std::string::npos) << r.err;
  r = server_->cli({"sim", "--devices", "10", "--sites", "20"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--sites"), std::string::npos) << r.err;
  r = server_->cli({"sim", "--devices", "10", "--latency", "fast"});
  EXPECT_NE(r.err.find("--latency"), std::string::npos) << r.err;
  r = server_->cli({"sim", "--devices", "100000000"});
  EXPECT_NE(r.err.find("--sync-interval"), std::string::npos) << r.err;  // open-file advice
}

}  // namespace
}  // namespace outpost::e2e
