// End-to-end staged rollouts: the real server and a handful of real `outpost-agent` processes on
// two sites, driven with the CLI as an operator would. What is checked is what a user sees:
// `outpost rollout status -o json`, `outpost deployment show`, each agent's /v1/status and the
// marker files the companion app leaves on start.
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "agent/activate/bundle.h"
#include "common/digest.h"
#include "common/onnx/onnx_builder.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The companion app: leaves MARKER_DIR/ran-<revision>-<device> as soon as it starts (so a
// revision that crashes leaves one too), dies at once with CRASH=1, else becomes "ready" (its
// exec health check) and stops on SIGTERM.
const char* kAppScript = R"SH(#!/bin/sh
echo "app revision $OUTPOST_REVISION starting on $OUTPOST_DEVICE_ID"
[ -n "$MARKER_DIR" ] && touch "$MARKER_DIR/ran-$OUTPOST_REVISION-$OUTPOST_DEVICE_ID"
if [ -n "$CRASH" ]; then echo "crashing on purpose"; exit 3; fi
trap 'echo stopping; exit 0' TERM
touch ready
while :; do sleep 0.2; done
)SH";

// Short timings so that a rollout of a few waves takes seconds: the controller steps five
// times a second.
const std::vector<std::string> kServerArgs = {"--rollout-tick", "200ms", "--rollout-gate-interval",
                                              "1s"};

// Polls `done` every 100 ms until it holds; false after timeout_s.
bool eventually(const std::function<bool()>& done, int timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return done();
}

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// The events of a rollout status's history, oldest first.
std::vector<std::string> history(const json& status) {
  std::vector<std::string> out;
  for (const auto& h : status.value("history", json::array())) out.push_back(h["event"]);
  return out;
}

// Index of the first history event that starts with `prefix`, or -1.
int event_index(const json& status, const std::string& prefix) {
  const auto events = history(status);
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].rfind(prefix, 0) == 0) return static_cast<int>(i);
  }
  return -1;
}

int event_count(const json& status, const std::string& prefix) {
  int n = 0;
  for (const auto& e : history(status)) n += e.rfind(prefix, 0) == 0 ? 1 : 0;
  return n;
}

class RolloutE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-rollout-e2e");
    fs::create_directories(root_ + "/markers");
    server_ = std::make_unique<ServerProcess>(root_ + "/server");
    server_->start(kServerArgs);
    ASSERT_TRUE(server_->running());
    bundle_ = push_bundle();
  }
  void TearDown() override {
    agents_.clear();
    server_.reset();
    if (!HasFailure()) fs::remove_all(root_);
  }

  // The app as a tar.zst bundle, pushed; returns its digest.
  std::string push_bundle() {
    const std::string dir = root_ + "/bundle";
    fs::create_directories(dir + "/bin");
    std::ofstream(dir + "/bin/app", std::ios::binary) << kAppScript;
    fs::permissions(dir + "/bin/app", fs::perms::owner_all | fs::perms::group_read |
                                          fs::perms::group_exec | fs::perms::others_read |
                                          fs::perms::others_exec);
    const std::string archive = root_ + "/app.tar.zst";
    auto made = agent::create_bundle(dir, archive);
    EXPECT_TRUE(made) << made.error().message;
    auto pushed = server_->cli({"artifact", "push", archive});
    EXPECT_EQ(pushed.exit_code, 0) << pushed.err;
    std::string digest = pushed.out.substr(0, pushed.out.find('\n'));
    EXPECT_TRUE(is_digest_ref(digest)) << pushed.out;
    return digest;
  }

  // Enrolls `count` real agents on `site` (named <site>-<i>) and starts them.
  void start_agents(const std::string& site, int count) {
    auto r = server_->cli(
        {"token", "create", "--site", site, "--uses", std::to_string(count), "-o", "json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const std::string token = r.json().value("token", "");
    for (int i = 0; i < count; ++i) {
      auto agent = std::make_unique<AgentProcess>(root_ + "/" + site + "-" + std::to_string(i));
      agent->start({"--server", server_->url(), "--enroll-token", token});
      ASSERT_TRUE(agent->running());
      site_of_[agent->device_id()] = site;
      agents_.push_back(std::move(agent));
    }
  }

  // The manifest of deployment "line" on plant-a and plant-b: the app with env TAG=tag (and
  // CRASH=1 when `crash`), and the given rollout block (none when empty).
  json manifest(const std::string& tag, const json& rollout, bool crash = false) const {
    json env = {{"TAG", tag}, {"MARKER_DIR", root_ + "/markers"}};
    if (crash) env["CRASH"] = "1";
    json spec = {
        {"selector", {{"sites", {"plant-a", "plant-b"}}}},
        {"workload",
         {{"bundle", bundle_},
          {"command", {"bin/app"}},
          {"env", env},
          {"health", {{"exec", {"test", "-f", "ready"}}, {"period", "300ms"}, {"deadline", "15s"}}},
          {"stop_grace", "2s"}}},
        {"config", {{"tag", tag}}}};
    if (!rollout.is_null()) spec["rollout"] = rollout;
    return {{"apiVersion", "outpost/v1"},
            {"kind", "Deployment"},
            {"metadata", {{"name", "line"}}},
            {"spec", spec}};
  }

  CommandResult apply(const json& doc, bool force = false) {
    std::vector<std::string> args = {"apply", "-f", "-"};
    if (force) args.push_back("--force");
    return server_->cli(args, doc.dump());
  }

  // Applies revision 1 (every device gets it at once: nothing to roll from) and waits until
  // every agent runs it.
  void apply_first(const json& rollout = nullptr) {
    auto r = apply(manifest("one", rollout));
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    expect_all_running(1);
  }

  json rollout_status() const {
    auto r = server_->cli({"rollout", "status", "line", "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    return r.exit_code == 0 ? r.json() : json::object();
  }

  // Polls `outpost rollout status` until `done` holds; the last status is returned either way
  // (and the test fails with it when `done` never held).
  json wait_rollout(const std::function<bool(const json&)>& done, int timeout_s,
                    const std::string& what) {
    json last;
    const bool ok = eventually(
        [&] {
          last = rollout_status();
          return done(last);
        },
        timeout_s);
    EXPECT_TRUE(ok) << "rollout never " << what << ":\n" << last.dump(2) << "\n" << server_->log();
    return last;
  }

  json wait_state(const std::string& state, int timeout_s = 60) {
    return wait_rollout([&](const json& s) { return s.value("state", "") == state; }, timeout_s,
                        "reached state " + state);
  }

  // The revision the agent runs for "line" (its pointer), 0 when none or it does not answer.
  static int64_t current_revision(const AgentProcess& a) {
    json d = a.deployment("line");
    if (!d.is_object() || !d["current_revision"].is_number_integer()) return 0;
    return d["current_revision"].get<int64_t>();
  }

  // True when the agent runs `revision` of "line" healthy and wants nothing else.
  static bool runs(const json& status, int64_t revision) {
    for (const auto& d : status.value("deployments", json::array())) {
      if (d.value("name", "") == "line" && d.value("phase", "") == "running" &&
          d.value("revision", int64_t{0}) == revision && d["current_revision"] == revision &&
          d.contains("process") && d["process"].value("state", "") == "healthy") {
        return true;
      }
    }
    return false;
  }

  void expect_all_running(int64_t revision, int timeout_s = 60) {
    for (const auto& a : agents_) {
      json last;
      EXPECT_TRUE(a->wait_for([&](const json& s) { return runs(s, revision); }, timeout_s, &last))
          << a->device_id() << " does not run revision " << revision << ":\n"
          << last.dump(2) << "\n"
          << a->log();
    }
  }

  // Agents whose pointer is at `revision` now.
  int count_on(int64_t revision) const {
    int n = 0;
    for (const auto& a : agents_) n += current_revision(*a) == revision ? 1 : 0;
    return n;
  }

  bool ran(const std::string& device, int64_t revision) const {
    return fs::exists(root_ + "/markers/ran-" + std::to_string(revision) + "-" + device);
  }

  // Every revision of "line" a device's status reports mentioned (the server keeps them).
  std::set<int64_t> reported_revisions(const std::string& device) const {
    auto r = server_->cli({"device", "status-log", device, "--limit", "500", "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::set<int64_t> out;
    if (r.exit_code != 0) return out;
    for (const auto& report : r.json().value("reports", json::array())) {
      for (const auto& d : report["status"].value("deployments", json::array())) {
        if (d.value("name", "") == "line") out.insert(d.value("revision", int64_t{0}));
      }
    }
    return out;
  }

  json deployment_show() const {
    auto r = server_->cli({"deployment", "show", "line", "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? r.json() : json::object();
  }

  // Devices that `deployment show` schedules on another revision than `revision`.
  std::vector<std::string> scheduled_elsewhere(int64_t revision) const {
    std::vector<std::string> out;
    for (const auto& d : deployment_show().value("devices", json::array())) {
      if (d.value("revision", int64_t{0}) != revision) out.push_back(d.dump());
    }
    return out;
  }

  std::string root_;
  std::string bundle_;
  std::unique_ptr<ServerProcess> server_;
  std::vector<std::unique_ptr<AgentProcess>> agents_;
  std::map<std::string, std::string> site_of_;  // device id -> site
};

// The rollout block most tests use: one canary, then half, then all, one device at a time.
json waves_rollout(const std::string& bake, const json& max_unavailable = 1) {
  return {{"waves", {1, "50%", "100%"}}, {"bake", bake}, {"max_unavailable", max_unavailable}};
}

TEST_F(RolloutE2E, AGoodRevisionMovesWaveByWaveToEveryDevice) {
  start_agents("plant-a", 3);
  start_agents("plant-b", 2);
  apply_first();

  // Five devices in waves of 1, 3 and 5 (cumulative), two updating at once, 2 s of bake.
  auto applied = apply(manifest("two", waves_rollout("2s", 2)));
  ASSERT_EQ(applied.exit_code, 0) << applied.out << applied.err;

  // Watch it as an operator would, and each agent's pointer at the same moments.
  struct Sample {
    int64_t at = 0;
    json status;
    std::map<std::string, int64_t> revisions;  // device -> revision it runs
  };
  std::vector<Sample> samples;
  std::map<std::string, int64_t> first_on_two;  // device -> when it was first seen on rev 2
  const bool completed = eventually(
      [&] {
        Sample s;
        s.status = rollout_status();
        s.at = wall_ms();
        for (const auto& a : agents_) {
          s.revisions[a->device_id()] = current_revision(*a);
          if (s.revisions[a->device_id()] == 2) first_on_two.emplace(a->device_id(), s.at);
        }
        samples.push_back(s);
        return s.status.value("state", "") == "completed" && first_on_two.size() == agents_.size();
      },
      90);
  const json final_status = samples.back().status;
  ASSERT_TRUE(completed) << final_status.dump(2) << "\n" << server_->log();

  // While wave 1 baked, only its one device ran revision 2; while wave 2 baked, exactly three
  // did, from both sites (the order takes sites in turns).
  auto seen_baking = [&](size_t wave, size_t on_two, std::set<std::string>* sites) {
    for (const auto& s : samples) {
      const json& waves = s.status["waves"];
      if (waves.size() != 3 || waves[wave]["state"] != "baking") continue;
      if (wave + 1 < waves.size() && waves[wave + 1]["state"] != "waiting") continue;
      if (waves[wave]["counts"]["healthy"] != waves[wave]["devices"]) continue;
      size_t n = 0;
      std::set<std::string> on;
      bool others_on_one = true;
      for (const auto& [device, revision] : s.revisions) {
        if (revision == 2) {
          ++n;
          on.insert(site_of_[device]);
        } else {
          others_on_one = others_on_one && revision == 1;
        }
      }
      if (n != on_two || !others_on_one) continue;
      if (sites) *sites = on;
      return true;
    }
    return false;
  };
  EXPECT_TRUE(seen_baking(0, 1, nullptr)) << "never saw wave 1 baking with one device on rev 2";
  std::set<std::string> wave2_sites;
  EXPECT_TRUE(seen_baking(1, 3, &wave2_sites)) << "never saw wave 2 baking with three on rev 2";
  EXPECT_EQ(wave2_sites, (std::set<std::string>{"plant-a", "plant-b"}));

  // The devices took revision 2 in three groups (1, 2, 2), the bake apart.
  std::vector<int64_t> times;
  for (const auto& [device, at] : first_on_two) times.push_back(at);
  std::sort(times.begin(), times.end());
  ASSERT_EQ(times.size(), 5u);
  EXPECT_GE(times[1] - times[0], 1'000) << "wave 2 began before wave 1 baked";
  EXPECT_GE(times[3] - times[2], 1'000) << "wave 3 began before wave 2 baked";

  // What `rollout status` says at the end: every wave done in order, all healthy.
  EXPECT_EQ(final_status["from_revision"], 1);
  EXPECT_EQ(final_status["to_revision"], 2);
  EXPECT_EQ(final_status["kind"], "apply");
  EXPECT_EQ(final_status["counts"], json({{"healthy", 5}})) << final_status.dump(2);
  for (const auto& w : final_status["waves"]) EXPECT_EQ(w["state"], "done") << w.dump();
  std::vector<int> order = {event_index(final_status, "started: revision 1 -> 2"),
                            event_index(final_status, "wave 1 settled"),
                            event_index(final_status, "wave 2 started"),
                            event_index(final_status, "wave 2 settled"),
                            event_index(final_status, "wave 3 started"),
                            event_index(final_status, "wave 3 settled"),
                            event_index(final_status, "completed: revision 2 is stable")};
  for (size_t i = 0; i < order.size(); ++i) {
    EXPECT_GE(order[i], 0) << i << "\n" << final_status.dump(2);
    if (i > 0) {
      EXPECT_GT(order[i], order[i - 1]) << final_status.dump(2);
    }
  }
  const json& h = final_status["history"];
  EXPECT_GE(h[order[2]]["at"].get<int64_t>() - h[order[1]]["at"].get<int64_t>(), 2'000)
      << "wave 2 started before wave 1's bake was over";

  // The deployment, and every device.
  const json shown = deployment_show();
  EXPECT_EQ(shown["revision"], 2) << shown.dump(2);
  EXPECT_EQ(shown["stable_revision"], 2) << shown.dump(2);
  EXPECT_TRUE(scheduled_elsewhere(2).empty());
  expect_all_running(2, 30);
  for (const auto& a : agents_) EXPECT_TRUE(ran(a->device_id(), 2)) << a->device_id();
}

TEST_F(RolloutE2E, ACrashingRevisionStopsAtTheFirstWaveAndRollsBack) {
  start_agents("plant-a", 3);
  start_agents("plant-b", 2);
  apply_first();

  const json bad = manifest("two", waves_rollout("1s"), /*crash=*/true);
  auto applied = apply(bad);
  ASSERT_EQ(applied.exit_code, 0) << applied.out << applied.err;
  const json status = wait_state("rolled_back");

  // The gate, its numbers and the device that broke it.
  ASSERT_TRUE(status.contains("breach")) << status.dump(2);
  EXPECT_EQ(status["breach"]["name"], "max_failed_devices");
  EXPECT_EQ(status["breach"]["value"], 1.0);
  EXPECT_EQ(status["breach"]["limit"], 0.0);
  const std::string reason = status.value("reason", "");
  EXPECT_TRUE(contains(reason, "gate max_failed_devices breached: 1 over the limit 0")) << reason;
  EXPECT_TRUE(contains(reason, "exited with code 3")) << reason;
  ASSERT_EQ(status["failed"].size(), 1u) << status.dump(2);
  const std::string canary = status["failed"][0]["device"];
  EXPECT_EQ(status["failed"][0]["wave"], 1);
  EXPECT_EQ(status["wave"], 1) << "stopped at the first wave";
  EXPECT_EQ(status["waves"][0]["counts"]["failed"], 1);
  EXPECT_EQ(status["waves"][0]["state"], "rolled_back");
  EXPECT_EQ(status["waves"][1]["counts"]["pending"], 2);
  EXPECT_EQ(status["waves"][2]["counts"]["pending"], 2);
  EXPECT_TRUE(contains(history(status).back(), "rolled back")) << status.dump(2);

  // Only the canary ever started revision 2; every agent runs revision 1 again.
  expect_all_running(1, 30);
  for (const auto& a : agents_) {
    const std::string id = a->device_id();
    if (id == canary) {
      EXPECT_TRUE(ran(id, 2)) << "the canary did try revision 2";
      continue;
    }
    EXPECT_FALSE(ran(id, 2)) << id << " is outside wave 1 and must never start revision 2";
    EXPECT_EQ(reported_revisions(id), std::set<int64_t>{1}) << id;
  }
  const json shown = deployment_show();
  EXPECT_EQ(shown["revision"], 1) << shown.dump(2);
  EXPECT_EQ(shown["stable_revision"], 1) << shown.dump(2);
  EXPECT_TRUE(scheduled_elsewhere(1).empty());
  ASSERT_EQ(shown["revisions"].size(), 2u) << shown.dump(2);
  EXPECT_TRUE(contains(shown["revisions"][1]["bad_reason"], "max_failed_devices")) << shown.dump(2);

  // The same spec again is refused; with --force it is rolled out (and fails) again.
  auto refused = apply(bad);
  EXPECT_EQ(refused.exit_code, 1) << refused.out;
  EXPECT_TRUE(contains(refused.err, "was rolled back")) << refused.err;
  EXPECT_TRUE(contains(refused.err, "--force")) << refused.err;
  EXPECT_EQ(deployment_show()["revision"], 1);
  auto forced = apply(bad, /*force=*/true);
  EXPECT_EQ(forced.exit_code, 0) << forced.out << forced.err;
  const json again = wait_rollout(
      [&](const json& s) { return s.value("to_revision", 0) == 3 && s["state"] == "rolled_back"; },
      60, "rolled back revision 3");
  EXPECT_NE(again["id"], status["id"]);
  EXPECT_EQ(again["failed"][0]["device"], canary) << "the same canary leads every rollout";
  expect_all_running(1, 30);
}

// A model version that ONNX Runtime refuses to load (an operator that does not exist): the
// canary's agent rolls it back, and so does the rollout.
TEST_F(RolloutE2E, AModelVersionTheRuntimeRefusesRollsBackAtTheFirstWave) {
  start_agents("plant-a", 2);
  start_agents("plant-b", 1);
  onnx::ClassifierSpec spec;
  spec.seed = 5;
  std::string good = onnx::build_classifier_onnx(spec);
  std::string broken = good;
  const auto at = broken.find("Softmax");
  ASSERT_NE(at, std::string::npos);
  broken.replace(at, 7, "Softmix");  // same length: the protobuf stays well-formed
  for (auto [version, bytes] : {std::pair{"1.0.0", good}, std::pair{"1.1.0", broken}}) {
    const std::string file = root_ + "/defect-net-" + version + ".onnx";
    std::ofstream(file, std::ios::binary) << bytes;
    auto r = server_->cli(
        {"model", "push", "defect-net", version, "--variant", "accelerator=cpu=" + file});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }
  auto detector = [&](const std::string& version) {
    return json{{"apiVersion", "outpost/v1"},
                {"kind", "Deployment"},
                {"metadata", {{"name", "line"}}},
                {"spec",
                 {{"selector", {{"sites", {"plant-a", "plant-b"}}}},
                  {"model", {{"name", "defect-net"}, {"version", version}}},
                  {"serve", {{"route", "/models/detector"}}},
                  {"rollout", waves_rollout("1s")}}}};
  };
  auto first = apply(detector("1.0.0"));
  ASSERT_EQ(first.exit_code, 0) << first.out << first.err;
  for (const auto& a : agents_) {
    json last;
    EXPECT_TRUE(a->wait_for(
        [](const json& s) {
          for (const auto& d : s.value("deployments", json::array())) {
            if (d.value("phase", "") == "running" && d["current_revision"] == 1) return true;
          }
          return false;
        },
        60, &last))
        << last.dump(2) << "\n"
        << a->log();
  }

  auto applied = apply(detector("1.1.0"));
  ASSERT_EQ(applied.exit_code, 0) << applied.out << applied.err;
  const json status = wait_state("rolled_back");
  EXPECT_EQ(status["breach"]["name"], "max_failed_devices") << status.dump(2);
  EXPECT_EQ(status["breach"]["value"], 1.0);
  EXPECT_TRUE(contains(status.value("reason", ""), "Softmix")) << status.dump(2);
  ASSERT_EQ(status["failed"].size(), 1u) << status.dump(2);
  EXPECT_EQ(status["failed"][0]["wave"], 1);
  const std::string canary = status["failed"][0]["device"];
  for (const auto& a : agents_) {
    if (a->device_id() != canary) {
      EXPECT_EQ(reported_revisions(a->device_id()), std::set<int64_t>{1});
    }
  }
  // Every agent serves 1.0.0 again.
  for (const auto& a : agents_) {
    json last;
    EXPECT_TRUE(a->wait_for(
        [](const json& s) {
          for (const auto& d : s.value("deployments", json::array())) {
            if (d.value("revision", 0) == 1 && d.value("phase", "") == "running" &&
                d["current_revision"] == 1) {
              return true;
            }
          }
          return false;
        },
        30, &last))
        << last.dump(2);
    HttpClient client(a->url(), "");
    auto ready = client.request("GET", "/models/detector/ready");
    ASSERT_TRUE(ready.has_value());
    EXPECT_EQ(ready->status, 200) << ready->body;
  }
  EXPECT_EQ(deployment_show()["revision"], 1);
}

TEST_F(RolloutE2E, PauseResumeAbortAndUndoFromTheCli) {
  start_agents("plant-a", 3);
  start_agents("plant-b", 2);
  // Revision 1 rolls out two at a time, in one wave, when it is undone to.
  apply_first({{"max_unavailable", 2}});

  auto applied = apply(manifest("two", waves_rollout("2s")));
  ASSERT_EQ(applied.exit_code, 0) << applied.out << applied.err;
  // Pause once the canary is healthy: no device joins while paused.
  wait_rollout([](const json& s) { return s["counts"].value("healthy", 0) >= 1; }, 30,
               "got a healthy canary");
  auto paused = server_->cli({"rollout", "pause", "line", "-o", "json"});
  ASSERT_EQ(paused.exit_code, 0) << paused.out << paused.err;
  EXPECT_EQ(paused.json()["state"], "paused");
  EXPECT_TRUE(contains(paused.json().value("reason", ""), "paused by")) << paused.out;
  auto admitted = [](const json& s) {
    return s["devices"].get<int>() - s["counts"].value("pending", 0);
  };
  // Paused while the canary's wave bakes: the canary is all it has.
  const int admitted_at_pause = admitted(paused.json());
  EXPECT_EQ(admitted_at_pause, 1) << paused.out;
  EXPECT_EQ(paused.json()["waves"][0]["state"], "paused") << paused.out;
  // Paused for 3 s: nobody new gets the revision, though the 2 s bake ran out meanwhile.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (std::chrono::steady_clock::now() < until) {
    const json s = rollout_status();
    EXPECT_EQ(s["state"], "paused");
    EXPECT_EQ(admitted(s), admitted_at_pause) << s.dump(2);
    EXPECT_LE(count_on(2), admitted_at_pause);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  // A paused rollout cannot be paused again; it can be resumed.
  auto twice = server_->cli({"rollout", "pause", "line"});
  EXPECT_NE(twice.exit_code, 0);
  EXPECT_TRUE(contains(twice.err, "is paused, not running")) << twice.err;
  auto resumed = server_->cli({"rollout", "resume", "line", "-o", "json"});
  ASSERT_EQ(resumed.exit_code, 0) << resumed.out << resumed.err;
  EXPECT_EQ(resumed.json()["state"], "running");

  // Abort once wave 2 is done: it stays where it is, for good.
  wait_rollout([](const json& s) { return s["counts"].value("healthy", 0) >= 3; }, 30,
               "reached three healthy devices");
  auto aborted = server_->cli({"rollout", "abort", "line", "-o", "json"});
  ASSERT_EQ(aborted.exit_code, 0) << aborted.out << aborted.err;
  EXPECT_EQ(aborted.json()["state"], "aborted");
  const int admitted_at_abort = admitted(aborted.json());
  EXPECT_GE(admitted_at_abort, 3);
  EXPECT_LT(admitted_at_abort, 5);
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const json after_abort = rollout_status();
  EXPECT_EQ(after_abort["state"], "aborted");
  EXPECT_EQ(admitted(after_abort), admitted_at_abort) << after_abort.dump(2);
  EXPECT_LE(count_on(2), admitted_at_abort);
  EXPECT_GE(count_on(1), 5 - admitted_at_abort) << "the devices not reached keep revision 1";
  auto resume_aborted = server_->cli({"rollout", "resume", "line"});
  EXPECT_NE(resume_aborted.exit_code, 0);
  EXPECT_TRUE(contains(resume_aborted.err, "is aborted, not paused")) << resume_aborted.err;
  EXPECT_EQ(deployment_show()["stable_revision"], 1);

  // Undo: revision 1's spec again, as revision 3, rolled out like any other until it is done.
  auto undone = server_->cli({"rollout", "undo", "line", "-o", "json"});
  ASSERT_EQ(undone.exit_code, 0) << undone.out << undone.err;
  EXPECT_EQ(undone.json()["kind"], "undo");
  EXPECT_EQ(undone.json()["to_revision"], 3);
  const json done = wait_state("completed");
  EXPECT_EQ(done["kind"], "undo");
  EXPECT_EQ(done["to_revision"], 3);
  EXPECT_EQ(done["counts"], json({{"healthy", 5}})) << done.dump(2);
  expect_all_running(3, 30);
  const json shown = deployment_show();
  EXPECT_EQ(shown["revision"], 3);
  EXPECT_EQ(shown["stable_revision"], 3);
  EXPECT_EQ(shown["manifest"]["spec"]["config"]["tag"], "one") << shown.dump(2);
  for (const auto& a : agents_) EXPECT_TRUE(ran(a->device_id(), 3)) << a->device_id();
  // The newest rollout (the undo) started from revision 1, whose spec the deployment has now:
  // nothing to undo.
  auto nothing = server_->cli({"rollout", "undo", "line"});
  EXPECT_NE(nothing.exit_code, 0);
  EXPECT_TRUE(contains(nothing.err, "nothing to undo")) << nothing.err;

  // Every step is in the audit log, with who did it.
  auto audit = server_->cli({"audit", "list", "-o", "json"});
  ASSERT_EQ(audit.exit_code, 0) << audit.err;
  std::vector<std::string> actions;
  for (const auto& e : audit.json()) {  // -o json prints the entries
    if (e.value("target", "") == "deployment/line" && contains(e.value("action", ""), "rollout.")) {
      actions.push_back(e.value("action", "") + " by " + e.value("actor", ""));
    }
  }
  EXPECT_EQ(actions, (std::vector<std::string>{
                         "rollout.start by user:admin", "rollout.pause by user:admin",
                         "rollout.resume by user:admin", "rollout.abort by user:admin",
                         "rollout.undo by user:admin", "rollout.complete by rollouts-controller"}))
      << audit.out;
}

TEST_F(RolloutE2E, AnOfflineDeviceThatReturnsAfterARollbackGetsTheOldRevision) {
  // The offline device is alone on plant-a: sites take turns, so it leads the rollout.
  start_agents("plant-a", 1);
  start_agents("plant-b", 3);
  apply_first();
  AgentProcess& away = *agents_[0];
  const std::string away_id = away.device_id();
  away.stop();

  json rollout = {{"waves", {1, "100%"}}, {"max_unavailable", 1}, {"offline_grace", "2s"}};
  auto applied = apply(manifest("two", rollout, /*crash=*/true));
  ASSERT_EQ(applied.exit_code, 0) << applied.out << applied.err;
  // It is given the revision, not heard from within the grace, and deferred: the wave goes on.
  const json deferred = wait_rollout(
      [](const json& s) { return s["counts"].value("deferred", 0) == 1; }, 30, "deferred one");
  ASSERT_EQ(deferred["deferred"].size(), 1u) << deferred.dump(2);
  EXPECT_EQ(deferred["deferred"][0]["device"], away_id);
  EXPECT_TRUE(contains(deferred["deferred"][0]["message"], "offline")) << deferred.dump(2);
  // The online ones fail it.
  const json status = wait_state("rolled_back");
  EXPECT_EQ(status["breach"]["name"], "max_failed_devices") << status.dump(2);
  EXPECT_TRUE(contains(status.value("reason", ""), "exited with code 3")) << status.dump(2);
  EXPECT_EQ(status["waves"][0]["counts"]["deferred"], 1) << status.dump(2);
  ASSERT_EQ(status["deferred"].size(), 1u) << status.dump(2);
  EXPECT_TRUE(contains(status["deferred"][0]["message"], "gets revision 1 back when it returns"))
      << status.dump(2);
  for (size_t i = 1; i < agents_.size(); ++i) {
    EXPECT_TRUE(agents_[i]->wait_for([](const json& s) { return runs(s, 1); }, 30));
  }

  // It returns: revision 1, and it never started revision 2.
  away.start();
  json last;
  ASSERT_TRUE(away.wait_for([](const json& s) { return s.value("online", false) && runs(s, 1); },
                            30, &last))
      << last.dump(2) << "\n"
      << away.log();
  // Once it reported on the newest desired state (in sync), it still runs revision 1.
  json entry;
  ASSERT_TRUE(eventually(
      [&] {
        const json shown = deployment_show();
        for (const auto& d : shown["devices"]) {
          if (d["device"] == away_id) entry = d;
        }
        return entry.is_object() && entry.value("in_sync", false);
      },
      30))
      << deployment_show().dump(2) << "\n"
      << away.log();
  EXPECT_TRUE(runs(away.status(), 1)) << away.status().dump(2);
  EXPECT_FALSE(ran(away_id, 2)) << "the returning device must not run the rolled-back revision";
  EXPECT_EQ(reported_revisions(away_id), std::set<int64_t>{1});
  EXPECT_EQ(deployment_show()["revision"], 1);
}

// Window "HH:MM-HH:MM" from now-30m to now+30m in UTC, so it is open in UTC and closed in
// Etc/GMT-12 (UTC+12) whatever the time of day.
std::string window_around_now_utc() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  const int minute = utc.tm_hour * 60 + utc.tm_min;
  auto clock = [](int m) {
    m = (m + 1440) % 1440;
    char buf[8];
    std::snprintf(buf, sizeof buf, "%02d:%02d", m / 60, m % 60);
    return std::string(buf);
  };
  return clock(minute - 30) + "-" + clock(minute + 30);
}

TEST_F(RolloutE2E, AMaintenanceWindowHoldsASiteUntilItOpens) {
  start_agents("plant-a", 2);
  start_agents("plant-b", 2);
  apply_first();
  // plant-a's clock says the window is twelve hours away; plant-b is in it.
  auto set = server_->cli({"site", "set", "plant-a", "--timezone", "Etc/GMT-12"});
  ASSERT_EQ(set.exit_code, 0) << set.err;
  set = server_->cli({"site", "set", "plant-b", "--timezone", "UTC"});
  ASSERT_EQ(set.exit_code, 0) << set.err;
  auto sites = server_->cli({"site", "list", "-o", "json"});
  ASSERT_EQ(sites.exit_code, 0) << sites.err;
  EXPECT_TRUE(contains(sites.out, "Etc/GMT-12")) << sites.out;

  const std::string window = window_around_now_utc();
  auto applied = apply(
      manifest("two", {{"waves", {"100%"}}, {"max_unavailable", "100%"}, {"window", window}}));
  ASSERT_EQ(applied.exit_code, 0) << applied.out << applied.err;

  // plant-b updates; plant-a is held, and keeps revision 1 while the window is shut.
  const json held = wait_rollout(
      [](const json& s) {
        return s["counts"].value("healthy", 0) == 2 && s["counts"].value("held", 0) == 2;
      },
      30, "held plant-a while plant-b updated");
  for (const auto& h : held["held"]) {
    EXPECT_EQ(h["site"], "plant-a");
    EXPECT_TRUE(
        contains(h["message"], "outside the maintenance window " + window + " (Etc/GMT-12)"))
        << h.dump();
  }
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const json still = rollout_status();
  EXPECT_EQ(still["state"], "running");
  EXPECT_EQ(still["counts"].value("held", 0), 2) << still.dump(2);
  for (const auto& a : agents_) {
    EXPECT_EQ(current_revision(*a), site_of_[a->device_id()] == "plant-a" ? 1 : 2)
        << a->device_id();
    EXPECT_EQ(ran(a->device_id(), 2), site_of_[a->device_id()] == "plant-b") << a->device_id();
  }

  // plant-a moves into a time zone where the window is open: its devices proceed.
  set = server_->cli({"site", "set", "plant-a", "--timezone", "UTC"});
  ASSERT_EQ(set.exit_code, 0) << set.err;
  const json done = wait_state("completed", 30);
  EXPECT_EQ(done["counts"], json({{"healthy", 4}})) << done.dump(2);
  expect_all_running(2, 30);
  EXPECT_EQ(deployment_show()["stable_revision"], 2);
}

TEST_F(RolloutE2E, AServerRestartMidRolloutContinues) {
  start_agents("plant-a", 3);
  start_agents("plant-b", 2);
  apply_first();
  auto applied = apply(manifest("two", waves_rollout("1s")));
  ASSERT_EQ(applied.exit_code, 0) << applied.out << applied.err;

  // Graceful stop in wave 2, and start again on the same data.
  const json in_wave2 = wait_rollout(
      [](const json& s) { return event_index(s, "wave 2 started") >= 0; }, 30, "began wave 2");
  const int64_t id = in_wave2["id"];
  server_->stop();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  server_->start(kServerArgs);
  ASSERT_TRUE(server_->running());
  EXPECT_EQ(rollout_status()["id"], id);

  // kill -9 in wave 3, and start again.
  wait_rollout([](const json& s) { return event_index(s, "wave 3 started") >= 0; }, 30,
               "began wave 3");
  server_->stop(/*hard=*/true);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  server_->start(kServerArgs);
  ASSERT_TRUE(server_->running());

  const json done = wait_state("completed");
  EXPECT_EQ(done["id"], id) << "the same rollout continued";
  EXPECT_EQ(done["counts"], json({{"healthy", 5}})) << done.dump(2);
  for (const char* event : {"started: revision 1 -> 2", "wave 1 settled", "wave 2 started",
                            "wave 2 settled", "wave 3 started", "wave 3 settled", "completed"}) {
    EXPECT_EQ(event_count(done, event), 1) << event << "\n" << done.dump(2);
  }
  expect_all_running(2, 30);
  const json shown = deployment_show();
  EXPECT_EQ(shown["revision"], 2);
  EXPECT_EQ(shown["stable_revision"], 2);
  EXPECT_TRUE(scheduled_elsewhere(2).empty());
}

}  // namespace
}  // namespace outpost::e2e
