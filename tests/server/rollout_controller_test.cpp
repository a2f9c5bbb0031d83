// Rollout scenarios with many simulated devices: the real controller, store and desired-state
// pass, a manual clock, and devices that read their desired state from the store and report
// back as agents would (or fail, or stay offline).
#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>

#include <map>
#include <set>

#include "common/clock.h"
#include "common/digest.h"
#include "server/deployments/manifest.h"
#include "server/desired_states.h"
#include "server/rollouts/controller.h"
#include "server/rollouts/plan.h"
#include "server/sync/sync_hub.h"
#include "store/store.h"

namespace outpost::rollouts {
namespace {

using json = nlohmann::json;

#define ASSERT_OK(expr)                                           \
  do {                                                            \
    auto assert_ok_result_ = (expr);                              \
    ASSERT_TRUE(assert_ok_result_.has_value())                    \
        << #expr << ": " << assert_ok_result_.error().describe(); \
  } while (0)

class RolloutScenario : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = store::open_memory_store();
    ASSERT_TRUE(opened.has_value());
    store_ = std::move(*opened);
    hub_ = std::make_unique<server::sync::SyncHub>(io_);
    desired_ =
        std::make_unique<server::DesiredStateUpdater>(*store_, *hub_, std::string(64, '\x01'));
    ControllerOptions options;
    options.gate_interval_ms = 0;
    options.default_offline_grace_ms = 60'000;
    controller_ = std::make_unique<RolloutController>(*store_, *desired_, clock_, options);
  }

  void enroll(int n, const std::string& site) {
    store::EnrollmentToken token;
    token.id = "t-" + site;
    token.token_hash = sha256_hex("secret-" + site);
    token.site = site;
    token.created_at = clock_.now_ms();
    token.created_by = "test";
    ASSERT_OK(store_->put_enrollment_token(token));
    for (int i = 0; i < n; ++i) {
      store::Device d;
      d.id = site + "-" + std::to_string(i);
      d.site = site;
      d.public_key = "k";
      d.credential_hash = "h";
      d.enrolled_at = d.last_seen = clock_.now_ms();
      ASSERT_OK(store_->enroll_device(token.token_hash, clock_.now_ms(), d));
      ids_.push_back(d.id);
    }
  }

  // Applies revision `tag` of deployment "app" with the given rollout block; returns the
  // revision, after the controller took its first step.
  int64_t apply(int tag, const json& rollout = json::object()) {
    json spec = {{"selector", json::object()},
                 {"workload", {{"command", {"/bin/true"}}}},
                 {"config", {{"tag", tag}}}};
    if (!rollout.empty()) spec["rollout"] = rollout;
    json doc = {{"apiVersion", "outpost/v1"},
                {"kind", "Deployment"},
                {"metadata", {{"name", "app"}}},
                {"spec", spec}};
    auto m = deployments::validate_manifest(doc);
    EXPECT_TRUE(m.has_value()) << (m ? "" : m.error().describe());
    auto before = store_->get_deployment("app");
    const int64_t previous = before && *before ? (*before)->revision : 0;
    auto applied = store_->apply_deployment("app", m->normalized.dump(), m->spec_hash(), "test",
                                            clock_.now_ms());
    EXPECT_TRUE(applied.has_value());
    auto started = controller_->start("app", previous, "test");
    EXPECT_TRUE(started.has_value()) << (started ? "" : started.error().describe());
    return applied->deployment.revision;
  }

  // The revision of "app" in the device's desired state (0: none).
  int64_t desired_revision(const std::string& id) {
    auto d = store_->get_device(id);
    json doc = json::parse((*d)->desired_json);
    for (const auto& e : doc.value("deployments", json::array())) {
      if (e["name"] == "app") return e["revision"].get<int64_t>();
    }
    return 0;
  }

  // Every online device acts on its desired state: a revision in `bad` fails (the agent rolls
  // back to what it ran), any other runs. Offline devices do nothing.
  void devices_act() {
    for (const auto& id : ids_) {
      if (offline_.contains(id)) continue;
      const int64_t want = desired_revision(id);
      if (want == 0) continue;
      json entry = {{"name", "app"}, {"revision", want}};
      if (bad_.contains(want)) {
        entry["phase"] = "rolled-back";
        entry["current_revision"] = running_[id];
        entry["message"] = "revision " + std::to_string(want) + " failed: exited with code 3";
      } else {
        entry["phase"] = "running";
        entry["current_revision"] = want;
        running_[id] = want;
      }
      json report = {{"generation", 1}, {"deployments", json::array({entry})}};
      ASSERT_OK(store_->record_device_status(id, 0, report.dump(), clock_.now_ms(), 10));
      ASSERT_OK(store_->touch_device(id, clock_.now_ms()));
    }
  }

  // One second of fleet life: the controller steps, then the devices act.
  void second() {
    clock_.advance_ms(1'000);
    ASSERT_OK(controller_->tick());
    devices_act();
  }

  json status() {
    auto s = controller_->status("app");
    EXPECT_TRUE(s.has_value()) << (s ? "" : s.error().describe());
    return s ? *s : json();
  }

  int count_on(int64_t revision) {
    int n = 0;
    for (const auto& id : ids_) n += desired_revision(id) == revision ? 1 : 0;
    return n;
  }

  boost::asio::io_context io_;
  ManualClock clock_{1'700'000'000'000};
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<server::sync::SyncHub> hub_;
  std::unique_ptr<server::DesiredStateUpdater> desired_;
  std::unique_ptr<RolloutController> controller_;
  std::vector<std::string> ids_;
  std::set<std::string> offline_;
  std::set<int64_t> bad_;
  std::map<std::string, int64_t> running_;
};

TEST(RolloutPlan, WavesRoundUpAndEndWithEveryone) {
  using A = deployments::Manifest::Amount;
  EXPECT_EQ(wave_sizes({A{true, 1}, A{true, 10}, A{true, 50}, A{true, 100}}, 200),
            (std::vector<int64_t>{2, 20, 100, 200}));
  EXPECT_EQ(wave_sizes({A{true, 1}, A{true, 10}, A{true, 100}}, 5),
            (std::vector<int64_t>{1, 5}));  // 1% and 10% of 5 are both one device
  EXPECT_EQ(wave_sizes({A{false, 2}, A{false, 10}}, 30), (std::vector<int64_t>{2, 10, 30}));
  EXPECT_TRUE(wave_sizes({A{true, 100}}, 0).empty());
  EXPECT_EQ(max_unavailable_count(A{true, 10}, 5), 1);
  EXPECT_EQ(max_unavailable_count(A{true, 10}, 100), 10);
  EXPECT_EQ(max_unavailable_count(A{false, 3}, 100), 3);
}

TEST(RolloutPlan, OrderIsDeterministicAndSpreadsAcrossSites) {
  std::vector<PlannedDevice> devices;
  for (int i = 0; i < 6; ++i) devices.push_back({"a-" + std::to_string(i), "a"});
  for (int i = 0; i < 2; ++i) devices.push_back({"b-" + std::to_string(i), "b"});
  auto first = order_devices("app", devices);
  std::reverse(devices.begin(), devices.end());
  auto second = order_devices("app", devices);
  ASSERT_EQ(first.size(), 8u);
  for (size_t i = 0; i < first.size(); ++i) EXPECT_EQ(first[i].id, second[i].id);
  EXPECT_NE(first[0].site, first[1].site);  // sites take turns
  EXPECT_NE(first[2].site, first[3].site);
}

TEST(RolloutPlan, LocalMinuteOfDayFollowsTheTimeZone) {
  const int64_t noon_utc = 1'700'000'000'000 - (1'700'000'000'000 % 86'400'000) + 12 * 3'600'000;
  EXPECT_EQ(*local_minute_of_day("UTC", noon_utc), 12 * 60);
  EXPECT_EQ(*local_minute_of_day("Asia/Kolkata", noon_utc), 17 * 60 + 30);
  auto bad = local_minute_of_day("Mars/Olympus", noon_utc);
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("Mars/Olympus"), std::string::npos);
}

TEST_F(RolloutScenario, AGoodRevisionMovesWaveByWaveToEveryDevice) {
  enroll(60, "plant-1");
  enroll(40, "plant-2");
  ASSERT_EQ(apply(1), 1);  // a first revision goes everywhere at once
  EXPECT_EQ(count_on(1), 100);
  devices_act();
  const int64_t rev = apply(2, {{"waves", {"10%", "50%", "100%"}}, {"max_unavailable", "100%"}});
  ASSERT_EQ(rev, 2);
  // Wave 1 only: 10 devices, from both sites.
  EXPECT_EQ(count_on(2), 10);
  json s = status();
  EXPECT_EQ(s["state"], "running");
  EXPECT_EQ(s["waves"][0]["counts"]["updating"], 10);
  std::set<std::string> sites;
  for (const auto& id : ids_) {
    if (desired_revision(id) == 2) sites.insert(id.substr(0, 7));
  }
  EXPECT_EQ(sites.size(), 2u);
  std::vector<int> seen;
  for (int i = 0; i < 10 && status()["state"] == "running"; ++i) {
    devices_act();
    second();
    seen.push_back(count_on(2));
  }
  EXPECT_EQ(status()["state"], "completed") << status().dump(2);
  EXPECT_EQ(count_on(2), 100);
  // It went 10 -> 50 -> 100, never straight to everyone.
  EXPECT_NE(std::find(seen.begin(), seen.end(), 50), seen.end()) << ::testing::PrintToString(seen);
  auto d = store_->get_deployment("app");
  EXPECT_EQ((*d)->stable_revision, 2);
  EXPECT_TRUE(store_->list_revision_assignments("app")->empty());
}

TEST_F(RolloutScenario, MaxUnavailableLimitsHowManyUpdateAtOnce) {
  enroll(20, "s");
  apply(1);
  devices_act();
  apply(2, {{"max_unavailable", 2}});
  EXPECT_EQ(count_on(2), 2);
  devices_act();
  second();  // the two reported healthy; two more go
  EXPECT_EQ(count_on(2), 4);
  for (int i = 0; i < 20 && status()["state"] == "running"; ++i) second();
  EXPECT_EQ(status()["state"], "completed");
  EXPECT_EQ(count_on(2), 20);
}

TEST_F(RolloutScenario, ABadRevisionStopsAtTheFirstWaveAndRollsBack) {
  enroll(100, "s");
  apply(1);
  devices_act();
  bad_.insert(2);
  apply(2, {{"waves", {"5%", "100%"}}, {"max_unavailable", "100%"}});
  EXPECT_EQ(count_on(2), 5);
  devices_act();  // the five fail
  second();
  json s = status();
  EXPECT_EQ(s["state"], "rolled_back") << s.dump(2);
  EXPECT_EQ(s["breach"]["name"], "max_failed_devices");
  EXPECT_EQ(s["breach"]["value"], 5);
  EXPECT_NE(s["reason"].get<std::string>().find("exited with code 3"), std::string::npos);
  EXPECT_EQ(count_on(2), 0);  // nobody beyond the first wave ever got it, and those are back
  EXPECT_EQ(count_on(1), 100);
  // Back on revision 1, the devices report only it; the status still says what happened.
  devices_act();
  s = status();
  EXPECT_EQ(s["waves"][0]["counts"]["failed"], 5) << s.dump(2);
  EXPECT_EQ(s["waves"][0]["state"], "rolled_back");
  EXPECT_EQ(s["failed"].size(), 5u) << s.dump(2);
  EXPECT_EQ(s["counts"].value("updating", 0), 0) << s.dump(2);
  auto d = store_->get_deployment("app");
  EXPECT_EQ((*d)->revision, 1);  // the deployment is back at revision 1
  auto revisions = store_->list_deployment_revisions("app");
  EXPECT_NE(revisions->back().bad_reason.find("max_failed_devices"), std::string::npos);
  // An audit entry says which gate broke.
  auto audit = store_->list_audit(0, 100);
  bool found = false;
  for (const auto& e : *audit) found = found || e.action == "rollout.rollback";
  EXPECT_TRUE(found);
}

TEST_F(RolloutScenario, ATelemetryGateComparesTheNewRevisionWithTheOld) {
  enroll(10, "s");
  apply(1);
  devices_act();
  apply(2, {{"waves", {"20%", "100%"}},
            {"max_unavailable", "100%"},
            {"bake", "1m"},
            {"gates", {{"max_error_rate", 0.05}, {"min_requests", 50}}}});
  devices_act();
  second();
  EXPECT_EQ(status()["waves"][0]["state"], "baking");
  // Two waves that bake a minute each: the estimate counts both bakes.
  EXPECT_GE(status()["eta_ms"].get<int64_t>() - clock_.now_ms(), 110'000) << status().dump(2);
  // Devices on revision 2 error on 30% of requests; those on revision 1 on 1%.
  int64_t seq = 0;
  for (const auto& id : ids_) {
    const int64_t rev = desired_revision(id);
    telemetry::InferenceRecord a;
    a.deployment = "app";
    a.revision = rev;
    a.model = "m";
    a.version = "1";
    a.interval_ms = 60'000;
    a.served = a.requests = 100;  // served includes the failed requests
    a.errors = rev == 2 ? 30 : 1;
    telemetry::Batch batch;
    batch.first_seq = batch.last_seq = ++seq;
    batch.records.push_back({1, clock_.now_ms(), a});
    ASSERT_OK(store_->ingest_telemetry(id, "s", batch, clock_.now_ms()));
  }
  second();
  json s = status();
  EXPECT_EQ(s["state"], "rolled_back") << s.dump(2);
  EXPECT_EQ(s["breach"]["name"], "max_error_rate");
  EXPECT_NEAR(s["breach"]["value"].get<double>(), 0.3, 1e-9);
  EXPECT_NEAR(s["breach"]["baseline"].get<double>(), 0.01, 1e-9);
  EXPECT_EQ(count_on(1), 10);
}

TEST_F(RolloutScenario, TooFewRequestsWaitForDataAndDoNotStopTheWave) {
  enroll(4, "s");
  apply(1);
  devices_act();
  apply(2, {{"max_unavailable", "100%"}, {"gates", {{"max_error_rate", 0.05}}}});
  for (int i = 0; i < 5 && status()["state"] == "running"; ++i) {
    devices_act();
    second();
  }
  json s = status();
  EXPECT_EQ(s["state"], "completed") << s.dump(2);
  bool waiting = false;
  for (const auto& g : s["gates"]) waiting = waiting || g["state"] == "waiting for data";
  EXPECT_TRUE(waiting) << s.dump(2);
}

TEST_F(RolloutScenario, OfflineDevicesAreDeferredAndNeverGetARolledBackRevision) {
  enroll(10, "s");
  apply(1);
  devices_act();
  offline_ = {ids_[0], ids_[1], ids_[2], ids_[3], ids_[4],
              ids_[5], ids_[6], ids_[7], ids_[8], ids_[9]};
  // Every device goes quiet; a wave does not wait for them forever.
  clock_.advance_ms(5'000);
  apply(2, {{"max_unavailable", "100%"}, {"offline_grace", "30s"}, {"waves", {"50%", "100%"}}});
  // Each wave waits out the 30 s grace once: about a minute for both.
  for (int i = 0; i < 120 && status()["state"] == "running"; ++i) second();
  json s = status();
  EXPECT_EQ(s["counts"]["deferred"], 10) << s.dump(2);
  EXPECT_EQ(s["state"], "completed") << s.dump(2);
  // A revision 3 that the first devices back fail: it rolls back while the rest are away.
  offline_.clear();
  for (const auto& id : ids_) running_[id] = 1;
  bad_.insert(3);
  offline_ = {ids_[5], ids_[6], ids_[7], ids_[8], ids_[9]};
  apply(3, {{"max_unavailable", "100%"}, {"offline_grace", "30s"}});
  devices_act();
  second();
  EXPECT_EQ(status()["state"], "rolled_back") << status().dump(2);
  // The devices that were away come back: what they are given is revision 2, never 3.
  offline_.clear();
  devices_act();
  EXPECT_EQ(count_on(3), 0);
  EXPECT_EQ(count_on(2), 10);
}

TEST_F(RolloutScenario, AMaintenanceWindowHoldsASiteUntilItOpens) {
  enroll(3, "berlin");
  enroll(3, "kolkata");
  ASSERT_OK(store_->put_site({"berlin", "Europe/Berlin", "", 0}));
  ASSERT_OK(store_->put_site({"kolkata", "Asia/Kolkata", "", 0}));
  // 2023-11-14 00:00 UTC: 01:00 in Berlin, 05:30 in Kolkata.
  clock_.set_ms(1'699'920'000'000);
  apply(1);
  devices_act();
  apply(2, {{"max_unavailable", "100%"}, {"window", "01:00-02:00"}});
  EXPECT_EQ(count_on(2), 3);
  for (int i = 0; i < 5; ++i) second();
  json s = status();
  EXPECT_EQ(s["counts"]["held"], 3) << s.dump(2);
  EXPECT_NE(s["held"][0]["message"].get<std::string>().find("Asia/Kolkata"), std::string::npos);
  EXPECT_EQ(s["state"], "running");
  for (const auto& id : ids_) {
    EXPECT_EQ(desired_revision(id), id.rfind("berlin", 0) == 0 ? 2 : 1) << id;
  }
  // 19:30 UTC is 01:00 in Kolkata: the window opens there.
  clock_.set_ms(1'699'920'000'000 + (19 * 60 + 30) * 60'000);
  for (int i = 0; i < 5 && status()["state"] == "running"; ++i) second();
  EXPECT_EQ(status()["state"], "completed") << status().dump(2);
  EXPECT_EQ(count_on(2), 6);
}

TEST_F(RolloutScenario, PauseResumeAbortAndUndo) {
  enroll(10, "s");
  apply(1);
  devices_act();
  apply(2, {{"max_unavailable", 1}});
  ASSERT_OK(controller_->pause("app", "token:admin"));
  const int before = count_on(2);
  for (int i = 0; i < 5; ++i) second();
  EXPECT_EQ(count_on(2), before);  // paused: nobody else gets it
  EXPECT_EQ(status()["state"], "paused");
  EXPECT_FALSE(controller_->pause("app", "x").has_value());  // not running
  ASSERT_OK(controller_->resume("app", "token:admin"));
  second();
  second();
  EXPECT_GT(count_on(2), before);
  ASSERT_OK(controller_->abort("app", "token:admin"));
  const int at_abort = count_on(2);
  for (int i = 0; i < 5; ++i) second();
  EXPECT_EQ(count_on(2), at_abort);  // stopped where it was
  EXPECT_EQ(status()["state"], "aborted");
  // Undo: revision 1's spec again, as revision 3, rolled out like any other.
  auto undone = controller_->undo("app", "token:admin");
  ASSERT_OK(undone);
  EXPECT_EQ((*undone)["to_revision"], 3);
  EXPECT_EQ((*undone)["kind"], "undo");
  for (int i = 0; i < 30 && status()["state"] == "running"; ++i) second();
  EXPECT_EQ(status()["state"], "completed");
  EXPECT_EQ(count_on(3), 10);
  auto revisions = store_->list_deployment_revisions("app");
  EXPECT_EQ((*revisions)[2].spec_hash, (*revisions)[0].spec_hash);
  // Nothing left to undo once the fleet is back where it was... but undo of this rollout goes
  // to revision 2's spec (its start).
  auto audit = store_->list_audit(0, 100);
  std::set<std::string> actions;
  for (const auto& e : *audit) actions.insert(e.action);
  for (const char* a : {"rollout.start", "rollout.pause", "rollout.resume", "rollout.abort",
                        "rollout.undo", "rollout.complete"}) {
    EXPECT_TRUE(actions.contains(a)) << a;
  }
}

TEST_F(RolloutScenario, ANewControllerOnTheSameStoreContinuesARollout) {
  enroll(10, "s");
  apply(1);
  devices_act();
  apply(2, {{"max_unavailable", 2}});
  second();
  const int mid = count_on(2);
  EXPECT_GT(mid, 0);
  EXPECT_LT(mid, 10);
  // The server restarts: a fresh controller with nothing in memory.
  controller_ = std::make_unique<RolloutController>(*store_, *desired_, clock_);
  for (int i = 0; i < 20 && status()["state"] == "running"; ++i) second();
  EXPECT_EQ(status()["state"], "completed");
  EXPECT_EQ(count_on(2), 10);
}

TEST_F(RolloutScenario, CordonedDevicesAreSkippedAndKeepTheirRevision) {
  enroll(5, "s");
  apply(1);
  devices_act();
  ASSERT_OK(store_->set_device_cordoned(ids_[0], true));
  apply(2, {{"max_unavailable", "100%"}});
  for (int i = 0; i < 5 && status()["state"] == "running"; ++i) second();
  EXPECT_EQ(status()["state"], "completed");
  EXPECT_EQ(desired_revision(ids_[0]), 1);
  EXPECT_EQ(count_on(2), 4);
}

}  // namespace
}  // namespace outpost::rollouts
