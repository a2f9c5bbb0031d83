// End-to-end: the real server and real `outpost-agent` processes on loopback, driven as an
// operator would (CLI) and abused as the field would (dead links, tampered blobs, kill -9).
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "agent/activate/bundle.h"
#include "common/digest.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/onnx/onnx_builder.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The companion app used by these tests: records what it was given, becomes "ready" (its
// exec health check), and stops on SIGTERM. CRASH=1 makes it die at start.
const char* kAppScript = R"SH(#!/bin/sh
echo "app revision $OUTPOST_REVISION starting in $(pwd)"
if [ -n "$CRASH" ]; then echo "crashing on purpose"; exit 3; fi
echo "$OUTPOST_MODEL_PATH" > model_path.txt
cp "$OUTPOST_CONFIG" config_seen.json
[ -n "$MARKER_DIR" ] && touch "$MARKER_DIR/ran-$OUTPOST_REVISION"
trap 'echo stopping; exit 0' TERM
touch ready
while :; do sleep 0.2; done
)SH";

// Whole file, or "" when it cannot be read (the assertions then say what was expected).
std::string slurp(const std::string& path) { return read_file(path).value_or(""); }

class AgentE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-agent-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/server");
    server_->start();
    ASSERT_TRUE(server_->running());
  }
  void TearDown() override {
    agents_.clear();
    server_.reset();
    if (!HasFailure()) fs::remove_all(root_);
  }

  std::string write(const std::string& name, const std::string& contents) {
    std::string path = root_ + "/" + name;
    fs::create_directories(fs::path(path).parent_path());
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }

  // Makes a tar.zst app bundle with bin/app (and optional extra files), pushes it; returns
  // its digest.
  std::string push_bundle(const std::string& name,
                          const std::map<std::string, std::string>& extra = {}) {
    const std::string dir = root_ + "/bundles/" + name;
    write("bundles/" + name + "/bin/app", kAppScript);
    fs::permissions(dir + "/bin/app", fs::perms::owner_all | fs::perms::group_read |
                                          fs::perms::group_exec | fs::perms::others_read |
                                          fs::perms::others_exec);
    for (const auto& [path, contents] : extra) write("bundles/" + name + "/" + path, contents);
    const std::string archive = root_ + "/" + name + ".tar.zst";
    auto made = agent::create_bundle(dir, archive);
    EXPECT_TRUE(made) << made.error().message;
    auto pushed = server_->cli({"artifact", "push", archive});
    EXPECT_EQ(pushed.exit_code, 0) << pushed.err;
    std::string digest = pushed.out.substr(0, pushed.out.find('\n'));
    EXPECT_TRUE(is_digest_ref(digest)) << pushed.out;
    return digest;
  }

  // defect-net 1.0.0 with a GPU and a CPU variant; returns {gpu digest, cpu digest}.
  std::pair<std::string, std::string> push_model() {
    onnx::ClassifierSpec spec;
    spec.seed = 1;
    std::string cpu = onnx::build_classifier_onnx(spec);
    spec.seed = 2;
    spec.hidden = 16;
    std::string gpu = onnx::build_classifier_onnx(spec);
    auto r = server_->cli({"model", "push", "defect-net", "1.0.0", "--variant",
                           "accelerator=gpu=" + write("gpu.onnx", gpu), "--variant",
                           "accelerator=cpu=" + write("cpu.onnx", cpu)});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return {"sha256:" + sha256_hex(gpu), "sha256:" + sha256_hex(cpu)};
  }

  // Applies the "line" deployment: optional model, the bundle's app, env REV_TAG=tag.
  void apply(const std::string& bundle, const std::string& tag, bool with_model,
             const json& extra_env = json::object()) {
    json env = {{"REV_TAG", tag}, {"MARKER_DIR", root_ + "/markers"}};
    for (const auto& [k, v] : extra_env.items()) env[k] = v;
    json spec = {
        {"selector", {{"sites", {"plant-1"}}}},
        {"workload",
         {{"bundle", bundle},
          {"command", {"bin/app"}},
          {"env", env},
          {"health", {{"exec", {"test", "-f", "ready"}}, {"period", "1s"}, {"deadline", "15s"}}},
          {"stop_grace", "2s"}}},
        {"config", {{"threshold", 0.8}, {"tag", tag}}}};
    if (with_model) spec["model"] = {{"name", "defect-net"}, {"version", "1.0.0"}};
    json manifest = {{"apiVersion", "outpost/v1"},
                     {"kind", "Deployment"},
                     {"metadata", {{"name", "line"}}},
                     {"spec", spec}};
    auto r = server_->cli({"apply", "-f", "-"}, manifest.dump());
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }

  std::string token(int uses = 5) {
    auto r = server_->cli(
        {"token", "create", "--site", "plant-1", "--uses", std::to_string(uses), "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.json().value("token", "");
  }

  AgentProcess& start_agent(const std::string& name, const std::string& enroll_token,
                            std::vector<std::string> extra = {}) {
    fs::create_directories(root_ + "/markers");
    auto agent = std::make_unique<AgentProcess>(root_ + "/" + name);
    std::vector<std::string> args = {"--server", server_->url(), "--enroll-token", enroll_token};
    args.insert(args.end(), extra.begin(), extra.end());
    agent->start(args);
    agents_.push_back(std::move(agent));
    return *agents_.back();
  }

  static bool phase_is(const json& status, const std::string& phase, int64_t revision) {
    for (const auto& d : status.value("deployments", json::array())) {
      if (d.value("name", "") == "line" && d.value("phase", "") == phase &&
          d.value("revision", 0) == revision && d["current_revision"] == revision) {
        return true;
      }
    }
    return false;
  }

  // The revision directory the agent runs for "line", from its pointer file.
  static std::string current_dir(const AgentProcess& agent) {
    std::string base = agent.data_dir() + "/deployments/line/";
    auto state = json::parse(slurp(base + "state.json"), nullptr, false);
    if (!state.is_object() || state.value("current", "").empty()) return "";
    return base + state.value("current", "");
  }

  std::string root_;
  std::unique_ptr<ServerProcess> server_;
  std::vector<std::unique_ptr<AgentProcess>> agents_;
};

TEST_F(AgentE2E, RefusedEnrollmentExitsWithTheServersReason) {
  AgentProcess agent(root_ + "/refused");
  agent.start({"--server", server_->url(), "--enroll-token", "not-a-token"}, /*may_exit=*/true);
  EXPECT_FALSE(agent.running());
  EXPECT_EQ(agent.exit_code(), 2);
  EXPECT_NE(agent.log().find("enrollment token is not valid"), std::string::npos) << agent.log();
  EXPECT_FALSE(fs::exists(root_ + "/refused/identity.json"));

  AgentProcess unenrolled(root_ + "/bare");
  unenrolled.start({}, /*may_exit=*/true);
  EXPECT_EQ(unenrolled.exit_code(), 2);
  EXPECT_NE(unenrolled.log().find("--enroll-token"), std::string::npos) << unenrolled.log();
}

TEST_F(AgentE2E, GpuAndCpuAgentsRunTheirVariantAndDeviceShowReportsTheNewRevision) {
  auto [gpu_digest, cpu_digest] = push_model();
  std::string bundle = push_bundle("app");
  std::string t = token();
  AgentProcess& gpu = start_agent("gpu", t, {"--label", "accelerator=gpu"});
  AgentProcess& cpu = start_agent("cpu", t);
  // Key 0600, identity persisted, facts reported at enroll.
  struct stat st {};
  ASSERT_EQ(::stat((gpu.data_dir() + "/device.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto shown = server_->cli({"device", "show", cpu.device_id(), "-o", "json"});
  ASSERT_EQ(shown.exit_code, 0);
  EXPECT_GT(shown.json()["facts"].value("cores", 0), 0);
  EXPECT_GT(shown.json()["facts"].value("memory_mb", 0), 0);

  apply(bundle, "one", /*with_model=*/true);
  json last;
  for (AgentProcess* a : {&gpu, &cpu}) {
    ASSERT_TRUE(a->wait_for([](const json& s) { return phase_is(s, "running", 1); }, 60, &last))
        << last.dump(2) << "\n"
        << a->log();
  }
  // Each runs the variant for its hardware, verified, and its workload saw it.
  for (auto [a, digest] : {std::pair{&gpu, gpu_digest}, std::pair{&cpu, cpu_digest}}) {
    std::string dir = current_dir(*a);
    std::string model = dir + "/model/defect-net.onnx";
    ASSERT_TRUE(fs::exists(model)) << dir;
    EXPECT_EQ("sha256:" + *sha256_file_hex(model), digest);
    EXPECT_EQ(slurp(dir + "/app/model_path.txt"), model + "\n");
    EXPECT_EQ(json::parse(slurp(dir + "/app/config_seen.json"))["tag"], "one");
  }

  apply(bundle, "two", /*with_model=*/true);
  for (AgentProcess* a : {&gpu, &cpu}) {
    ASSERT_TRUE(a->wait_for([](const json& s) { return phase_is(s, "running", 2); }, 60, &last))
        << last.dump(2) << "\n"
        << a->log();
  }
  // The operator's view: both devices report revision 2 running.
  for (AgentProcess* a : {&gpu, &cpu}) {
    bool seen = false;
    for (int i = 0; i < 100 && !seen; ++i) {
      auto r = server_->cli({"device", "show", a->device_id()});
      ASSERT_EQ(r.exit_code, 0) << r.err;
      seen = r.out.find("line  revision 2  scheduled  | device: running revision 2") !=
             std::string::npos;
      if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (i == 99) ADD_FAILURE() << r.out;
    }
  }
  // Old revision kept for rollback; nothing else lingers.
  auto state = json::parse(slurp(gpu.data_dir() + "/deployments/line/state.json"));
  EXPECT_FALSE(state.value("previous", "").empty());
  EXPECT_TRUE(fs::exists(gpu.data_dir() + "/deployments/line/" + state.value("previous", "")));
}

TEST_F(AgentE2E, DownloadCutMidwayResumesWithoutFetchingBytesTwice) {
  // 6 MB that zstd cannot shrink, at 1 MB/s: the server dies mid-download.
  std::string noise(6 << 20, '\0');
  std::mt19937_64 rng(42);
  for (auto& c : noise) c = static_cast<char>(rng());
  std::string bundle = push_bundle("big", {{"data/weights.bin", noise}});
  const int64_t size = static_cast<int64_t>(
      fs::file_size(server_->data_dir() + "/blobs/sha256/" + bundle.substr(7)));
  AgentProcess& agent = start_agent("edge", token(), {"--max-download-rate", "1M"});
  apply(bundle, "big", /*with_model=*/false);

  json last;
  ASSERT_TRUE(agent.wait_for(
      [](const json& s) {
        for (const auto& d : s["deployments"]) {
          if (d.value("bytes_downloaded", 0) >= (3 << 19)) return true;
        }
        return false;
      },
      60, &last))
      << last.dump(2);
  server_->stop(/*hard=*/true);
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const std::string partial = agent.data_dir() + "/artifacts/partial/" + bundle.substr(7);
  ASSERT_TRUE(fs::exists(partial));
  const auto cut_at = static_cast<int64_t>(fs::file_size(partial));
  EXPECT_GT(cut_at, 0);
  EXPECT_LT(cut_at, size);
  auto during = agent.deployment("line");
  EXPECT_NE(during.value("phase", ""), "running") << during.dump();

  server_->start();
  ASSERT_TRUE(agent.wait_for([](const json& s) { return phase_is(s, "running", 1); }, 90, &last))
      << last.dump(2) << "\n"
      << agent.log();
  auto done = agent.deployment("line");
  // Every byte crossed the network once: what was on disk at the cut was not fetched again.
  EXPECT_EQ(done.value("bytes_downloaded", 0), size) << done.dump();
  EXPECT_EQ(slurp(current_dir(agent) + "/app/data/weights.bin"), noise);
  EXPECT_FALSE(fs::exists(partial));
}

TEST_F(AgentE2E, TamperedBlobIsRefusedAndNeverActivated) {
  std::string bundle = push_bundle("app");
  // Someone alters the blob on the server (same size, one byte).
  const std::string blob = server_->data_dir() + "/blobs/sha256/" + bundle.substr(7);
  std::string bytes = slurp(blob);
  bytes[bytes.size() / 2] ^= 0x5a;
  std::ofstream(blob, std::ios::binary | std::ios::trunc) << bytes;

  AgentProcess& agent = start_agent("edge", token());
  apply(bundle, "evil", /*with_model=*/false);
  json last;
  ASSERT_TRUE(agent.wait_for(
      [](const json& s) {
        for (const auto& d : s["deployments"]) {
          if (d.value("phase", "") == "failed" &&
              d.value("message", "").find("sha256 mismatch") != std::string::npos) {
            return true;
          }
        }
        return false;
      },
      60, &last))
      << last.dump(2) << "\n"
      << agent.log();
  std::this_thread::sleep_for(std::chrono::seconds(2));
  auto d = agent.deployment("line");
  EXPECT_TRUE(d["current_revision"].is_null()) << d.dump();
  EXPECT_FALSE(fs::exists(root_ + "/markers/ran-1")) << "the tampered app must never run";
  EXPECT_TRUE(fs::is_empty(agent.data_dir() + "/artifacts/sha256"));
  EXPECT_EQ(current_dir(agent), "");
  // The operator sees why.
  auto shown = server_->cli({"device", "show", agent.device_id()});
  EXPECT_NE(shown.out.find("sha256 mismatch"), std::string::npos) << shown.out;
}

TEST_F(AgentE2E, OfflineRestartRunsFromLocalStateAndQueuedStatusesArriveInOrder) {
  std::string bundle = push_bundle("app");
  AgentProcess& agent = start_agent("edge", token());
  apply(bundle, "one", /*with_model=*/false);
  json last;
  ASSERT_TRUE(agent.wait_for([](const json& s) { return phase_is(s, "running", 1); }, 60, &last))
      << last.dump(2);
  ASSERT_TRUE(agent.wait_for([](const json& s) { return s.value("status_queued", 1) == 0; }, 30));

  server_->stop();
  agent.stop();  // graceful: the workload stops with it
  fs::remove(root_ + "/markers/ran-1");
  agent.start();  // no --server, no token: everything from the data directory
  ASSERT_TRUE(agent.wait_for([](const json& s) { return phase_is(s, "running", 1); }, 30, &last))
      << last.dump(2) << "\n"
      << agent.log();
  EXPECT_TRUE(fs::exists(root_ + "/markers/ran-1")) << "the workload really started again";
  EXPECT_FALSE(last.value("online", true));
  ASSERT_TRUE(
      agent.wait_for([](const json& s) { return s.value("status_queued", 0) >= 2; }, 10, &last))
      << last.dump(2);
  const int64_t queued = last.value("status_queued", 0);

  server_->start();
  ASSERT_TRUE(
      agent.wait_for([](const json& s) { return s.value("status_queued", 1) == 0; }, 60, &last))
      << last.dump(2) << "\n"
      << agent.log();
  auto log = server_->cli({"device", "status-log", agent.device_id(), "-o", "json"});
  ASSERT_EQ(log.exit_code, 0) << log.err;
  auto reports = log.json()["reports"];
  ASSERT_GE(static_cast<int64_t>(reports.size()), queued + 2);
  // Strictly in the device's order, with no gap, and the offline ones stamped while offline.
  for (size_t i = 1; i < reports.size(); ++i) {
    EXPECT_EQ(reports[i]["seq"].get<int64_t>(), reports[i - 1]["seq"].get<int64_t>() + 1);
    EXPECT_GE(reports[i]["status"]["at"].get<int64_t>(),
              reports[i - 1]["status"]["at"].get<int64_t>());
  }
  const auto& newest = reports.back()["status"];
  EXPECT_LT(newest["at"].get<int64_t>(), newest["received_at"].get<int64_t>() + 1);
  bool saw_restart = false;
  for (size_t i = reports.size() - static_cast<size_t>(queued); i < reports.size(); ++i) {
    auto phase = reports[i]["status"]["deployments"][0].value("phase", "");
    if (phase == "starting" || phase == "running") saw_restart = true;
  }
  EXPECT_TRUE(saw_restart) << reports.dump(2);
}

TEST_F(AgentE2E, CrashingRevisionIsRolledBackAutomatically) {
  std::string bundle = push_bundle("app");
  AgentProcess& agent = start_agent("edge", token());
  apply(bundle, "good", /*with_model=*/false);
  json last;
  ASSERT_TRUE(agent.wait_for([](const json& s) { return phase_is(s, "running", 1); }, 60, &last))
      << last.dump(2);
  const std::string good_dir = current_dir(agent);

  apply(bundle, "bad", /*with_model=*/false, {{"CRASH", "1"}});
  ASSERT_TRUE(agent.wait_for(
      [](const json& s) {
        for (const auto& d : s["deployments"]) {
          if (d.value("phase", "") == "rolled-back" && d.value("revision", 0) == 2 &&
              d["current_revision"] == 1) {
            return true;
          }
        }
        return false;
      },
      60, &last))
      << last.dump(2) << "\n"
      << agent.log();
  // The report that showed the local rollback says why (the server may already have moved on).
  json d;
  for (const auto& dep : last["deployments"]) {
    if (dep.value("name", "") == "line") d = dep;
  }
  EXPECT_NE(d.value("message", "").find("failed to start"), std::string::npos) << d.dump();
  EXPECT_NE(d.value("message", "").find("exited with code 3"), std::string::npos) << d.dump();
  EXPECT_EQ(current_dir(agent), good_dir);
  // The control plane's rollout saw the failed device and rolled the revision back: the device's
  // desired state is revision 1 again, and it runs it healthy (the bad one is not retried).
  ASSERT_TRUE(agent.wait_for(
      [](const json& s) {
        const auto& dep = s["deployments"][0];
        return dep.value("revision", 0) == 1 && dep.value("phase", "") == "running" &&
               dep.contains("process") && dep["process"].value("state", "") == "healthy";
      },
      30, &last))
      << last.dump(2);
  EXPECT_EQ(current_dir(agent), good_dir);
  auto status = server_->cli({"rollout", "status", "line", "-o", "json"});
  ASSERT_EQ(status.exit_code, 0) << status.err;
  const json rollout = status.json();
  EXPECT_EQ(rollout["state"], "rolled_back") << rollout.dump(2);
  EXPECT_EQ(rollout["breach"]["name"], "max_failed_devices") << rollout.dump(2);
  EXPECT_NE(rollout["reason"].get<std::string>().find("exited with code 3"), std::string::npos)
      << rollout.dump(2);
  auto shown = server_->cli({"deployment", "show", "line", "-o", "json"});
  EXPECT_EQ(shown.json()["revision"], 1) << shown.out;
  // The rolled-back spec is refused when applied again by accident.
  json env = {{"REV_TAG", "bad"}, {"MARKER_DIR", root_ + "/markers"}, {"CRASH", "1"}};
  json again = {{"apiVersion", "outpost/v1"},
                {"kind", "Deployment"},
                {"metadata", {{"name", "line"}}},
                {"spec",
                 {{"selector", {{"sites", {"plant-1"}}}},
                  {"workload",
                   {{"bundle", bundle},
                    {"command", {"bin/app"}},
                    {"env", env},
                    {"health",
                     {{"exec", {"test", "-f", "ready"}}, {"period", "1s"}, {"deadline", "15s"}}},
                    {"stop_grace", "2s"}}},
                  {"config", {{"threshold", 0.8}, {"tag", "bad"}}}}}};
  auto refused = server_->cli({"apply", "-f", "-"}, again.dump());
  EXPECT_EQ(refused.exit_code, 1) << refused.out;
  EXPECT_NE(refused.err.find("was rolled back"), std::string::npos) << refused.err;
  EXPECT_NE(refused.err.find("--force"), std::string::npos) << refused.err;
}

TEST_F(AgentE2E, KillNineAtRandomPointsOfUpdatesNeverBreaksTheAgent) {
  auto [gpu_digest, cpu_digest] = push_model();
  std::string bundle = push_bundle("app");
  AgentProcess& agent = start_agent("edge", token());
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> pause_ms(0, 700);
  json last;
  int64_t revision = 0;
  const int rounds = 50;
  for (int round = 0; round < rounds; ++round) {
    apply(bundle, "round-" + std::to_string(round), /*with_model=*/round % 2 == 0);
    ++revision;
    std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms(rng)));
    agent.stop(/*hard=*/true);
    // Whatever the moment, the agent must come back, and only verified bytes are in use.
    agent.start();
    ASSERT_TRUE(agent.running()) << "round " << round << "\n" << agent.log();
    for (const auto& entry : fs::directory_iterator(agent.data_dir() + "/artifacts/sha256")) {
      auto hex = sha256_file_hex(entry.path().string());
      ASSERT_TRUE(hex);
      ASSERT_EQ(*hex, entry.path().filename().string()) << "unverified artifact in the store";
    }
    std::string dir = current_dir(agent);
    if (!dir.empty()) {
      ASSERT_TRUE(fs::exists(dir + "/entry.json")) << "pointer names an incomplete revision";
      auto entry = json::parse(slurp(dir + "/entry.json"));
      if (entry.contains("model")) {
        EXPECT_EQ("sha256:" + *sha256_file_hex(dir + "/model/defect-net.onnx"),
                  entry["model"]["variant"]["artifact"].get<std::string>());
      }
    }
  }
  ASSERT_TRUE(
      agent.wait_for([&](const json& s) { return phase_is(s, "running", revision); }, 60, &last))
      << last.dump(2) << "\n"
      << agent.log();
  EXPECT_EQ(json::parse(slurp(current_dir(agent) + "/app/config_seen.json"))["tag"],
            "round-" + std::to_string(rounds - 1));
}

}  // namespace
}  // namespace outpost::e2e
