// End-to-end: the real server and the real CLI, as an operator and a device would use them.
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include <gtest/gtest.h>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/http_client.h"
#include "common/onnx/onnx_builder.h"
#include "common/telemetry_batch.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;

const char* kManifest = R"(apiVersion: outpost/v1
kind: Deployment
metadata: {name: defect-detector}
spec:
  selector: {sites: ["plant-*"]}
  model: {name: defect-net, version: 1.0.0}
  serve: {route: /models/defect-detector}
  config: {threshold: 0.8}
  rollout: {waves: [10%, 100%], bake: 1m}
)";

class ControlPlaneE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/data");
    server_->start();
    ASSERT_TRUE(server_->running());
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(root_);
  }

  std::string write(const std::string& name, const std::string& contents) {
    std::string path = root_ + "/" + name;
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }

  std::string model_file(const std::string& name, uint64_t seed) {
    onnx::ClassifierSpec spec;
    spec.seed = seed;
    return write(name, onnx::build_classifier_onnx(spec));
  }

  std::string create_token(const std::string& site, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"token", "create", "--site", site, "-o", "json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = server_->cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.json().value("token", "");
  }

  std::string root_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(ControlPlaneE2E, FirstStartCreatesDataDirAndHealthz) {
  const std::string data = server_->data_dir();
  // The database file, unless the store is elsewhere (OUTPOST_TEST_DB=postgres).
  EXPECT_EQ(fs::exists(data + "/outpost.db"), server_->db_url().empty());
  EXPECT_TRUE(fs::is_directory(data + "/blobs/sha256"));
  EXPECT_TRUE(fs::exists(data + "/server.key"));
  struct stat st {};
  ASSERT_EQ(::stat((data + "/admin.token").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  EXPECT_NE(server_->log().find("admin.token"), std::string::npos)
      << "server must say where the token is";
}

TEST_F(ControlPlaneE2E, OperatorCallsNeedTheToken) {
  HttpClient anonymous(server_->url(), "");
  auto r = anonymous.request("GET", "/api/v1/deployments");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  HttpClient wrong(server_->url(), "opt_wrong");
  r = wrong.request("GET", "/api/v1/devices");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  auto doc = nlohmann::json::parse(r->body);
  EXPECT_EQ(doc["error"]["code"], "unauthenticated");
}

TEST_F(ControlPlaneE2E, EnrollAndTokenLimits) {
  std::string token = create_token("plant-7", {"--label", "line=assembly", "--uses", "1"});
  ASSERT_FALSE(token.empty());
  auto device = FakeDevice::enroll(server_->url(), token, {{"arch", "x86_64"}, {"memory_mb", 4096}},
                                   {{"camera", "yes"}});
  ASSERT_FALSE(device.id.empty());
  EXPECT_EQ(device.enroll_response["site"], "plant-7");
  EXPECT_EQ(device.enroll_response["labels"]["line"], "assembly");
  EXPECT_EQ(device.enroll_response["labels"]["camera"], "yes");
  EXPECT_FALSE(device.server_public_key.empty());

  // The token had one use: a second device is refused with the reason.
  HttpClient client(server_->url(), "");
  auto key = crypto::ed25519_generate();
  nlohmann::json body = {{"token", token}, {"public_key", crypto::base64_encode(key.public_key)}};
  auto again = client.request("POST", "/api/v1/device/enroll", body.dump());
  ASSERT_TRUE(again);
  EXPECT_EQ(again->status, 412) << again->body;
  EXPECT_NE(again->body.find("no uses left"), std::string::npos) << again->body;
  body["token"] = "oet_not_a_token";
  auto bad = client.request("POST", "/api/v1/device/enroll", body.dump());
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 401);

  // Devices list filters by site and labels; -o json is a list of devices.
  auto list = server_->cli({"device", "list", "--site", "plant-7", "-o", "json"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  ASSERT_EQ(list.json().size(), 1u);
  EXPECT_EQ(list.json()[0]["id"], device.id);
  auto other_site = server_->cli({"device", "list", "--site", "plant-8", "-o", "json"});
  EXPECT_EQ(other_site.json().size(), 0u);
  auto by_label = server_->cli({"device", "list", "--selector", "line=assembly", "-o", "json"});
  EXPECT_EQ(by_label.json().size(), 1u);
  auto no_label = server_->cli({"device", "list", "--selector", "line=paint", "-o", "json"});
  EXPECT_EQ(no_label.json().size(), 0u);
  auto show = server_->cli({"device", "show", device.id, "-o", "json"});
  ASSERT_EQ(show.exit_code, 0) << show.err;
  EXPECT_EQ(show.json()["facts"]["memory_mb"], 4096);
}

TEST_F(ControlPlaneE2E, ArtifactPushDedupesAndServesRanges) {
  std::string contents(300'000, '\0');
  for (size_t i = 0; i < contents.size(); ++i) contents[i] = static_cast<char>((i * 7919) % 251);
  std::string file = write("blob.bin", contents);
  auto pushed = server_->cli({"artifact", "push", file});
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  std::string digest = "sha256:" + sha256_hex(contents);
  EXPECT_EQ(pushed.out, digest + "\n");
  auto again = server_->cli({"artifact", "push", file, "-o", "json"});
  ASSERT_EQ(again.exit_code, 0);
  EXPECT_FALSE(again.json()["created"].get<bool>()) << "same content must dedupe";
  EXPECT_TRUE(fs::exists(server_->data_dir() + "/blobs/sha256/" + digest.substr(7)));
  EXPECT_TRUE(fs::is_empty(server_->data_dir() + "/blobs/tmp")) << "no temp files left behind";

  HttpClient client(server_->url(), server_->admin_token());
  HttpRequestOptions range;
  range.headers = {{"Range", "bytes=1000-1999"}};
  auto part = client.request("GET", "/api/v1/artifacts/" + digest, {}, "", range);
  ASSERT_TRUE(part);
  EXPECT_EQ(part->status, 206);
  EXPECT_EQ(part->body, contents.substr(1000, 1000));
  EXPECT_EQ(part->headers["content-range"], "bytes 1000-1999/300000");
  range.headers = {{"Range", "bytes=299000-"}};
  auto tail = client.request("GET", "/api/v1/artifacts/" + digest, {}, "", range);
  ASSERT_TRUE(tail);
  EXPECT_EQ(tail->body, contents.substr(299000));
  range.headers = {{"Range", "bytes=400000-"}};
  auto outside = client.request("GET", "/api/v1/artifacts/" + digest, {}, "", range);
  ASSERT_TRUE(outside);
  EXPECT_EQ(outside->status, 416);
  auto whole = client.request("GET", "/api/v1/artifacts/" + digest);
  ASSERT_TRUE(whole);
  EXPECT_EQ(whole->status, 200);
  EXPECT_EQ(whole->body, contents);
  auto head = client.request("HEAD", "/api/v1/artifacts/" + digest);
  ASSERT_TRUE(head);
  EXPECT_EQ(head->status, 200);
  EXPECT_EQ(head->headers["content-length"], "300000");
  EXPECT_TRUE(head->body.empty());
  auto missing = client.request("GET", "/api/v1/artifacts/sha256:" + std::string(64, '0'));
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
}

TEST_F(ControlPlaneE2E, ModelPushValidatesAndIsImmutable) {
  std::string cpu = model_file("cpu.onnx", 1);
  std::string gpu = model_file("gpu.onnx", 2);
  auto pushed = server_->cli({"model", "push", "defect-net", "1.0.0", "--variant",
                              "accelerator=gpu,min_memory=2G=" + gpu, "--variant",
                              "accelerator=cpu=" + cpu, "-o", "json"});
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  auto doc = pushed.json();
  ASSERT_EQ(doc["variants"].size(), 2u);
  EXPECT_EQ(doc["variants"][0]["selector"]["accelerator"], "gpu");
  EXPECT_EQ(doc["variants"][0]["needs"]["min_memory_mb"], 2048);
  EXPECT_EQ(doc["variants"][1]["metadata"]["opset"], 13);
  EXPECT_EQ(doc["variants"][1]["metadata"]["inputs"][0]["name"], "input");

  // Same content: a no-op. Different content: refused.
  auto same = server_->cli({"model", "push", "defect-net", "1.0.0", "--variant",
                            "accelerator=gpu,min_memory=2G=" + gpu, "--variant",
                            "accelerator=cpu=" + cpu, "-o", "json"});
  ASSERT_EQ(same.exit_code, 0) << same.err;
  EXPECT_FALSE(same.json()["created"].get<bool>());
  auto changed =
      server_->cli({"model", "push", "defect-net", "1.0.0", "--variant", "accelerator=cpu=" + gpu});
  EXPECT_NE(changed.exit_code, 0);
  EXPECT_NE(changed.err.find("already exists with different content"), std::string::npos)
      << changed.err;

  // Not a model: refused with a clear message.
  std::string text = write("notes.onnx", "this is not a model\n");
  auto refused =
      server_->cli({"model", "push", "notes", "1.0.0", "--variant", "accelerator=cpu=" + text});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.err.find("not a usable ONNX model"), std::string::npos) << refused.err;
  auto bad_version = server_->cli({"model", "push", "defect-net", "one", "--variant", cpu});
  EXPECT_NE(bad_version.exit_code, 0);
  EXPECT_NE(bad_version.err.find("semantic version"), std::string::npos) << bad_version.err;

  auto list = server_->cli({"model", "list", "-o", "json"});
  ASSERT_EQ(list.exit_code, 0);
  ASSERT_EQ(list.json().size(), 1u);
  EXPECT_EQ(list.json()[0]["name"], "defect-net");
}

TEST_F(ControlPlaneE2E, ApplyRevisionsRestartAndLongPoll) {
  auto pushed = server_->cli({"model", "push", "defect-net", "1.0.0", "--variant",
                              "accelerator=cpu=" + model_file("m1.onnx", 1)});
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  auto pushed2 = server_->cli({"model", "push", "defect-net", "1.1.0", "--variant",
                               "accelerator=cpu=" + model_file("m2.onnx", 2)});
  ASSERT_EQ(pushed2.exit_code, 0) << pushed2.err;

  auto device = FakeDevice::enroll(server_->url(), create_token("plant-7"),
                                   {{"arch", "x86_64"}, {"accelerator", "cpu"}});
  ASSERT_FALSE(device.id.empty());

  // A refused manifest names the field and stores nothing.
  std::string bad = kManifest;
  bad.replace(bad.find("[10%, 100%]"), 11, "[10%, 150%]");
  auto refused = server_->cli({"apply", "-f", write("bad.yaml", bad)});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.err.find("spec.rollout.waves[1]"), std::string::npos) << refused.err;
  auto none = server_->cli({"deployment", "list", "-o", "json"});
  EXPECT_EQ(none.json().size(), 0u) << "a refused manifest must store nothing";
  std::string missing = kManifest;
  missing.replace(missing.find("1.0.0"), 5, "9.9.9");
  auto unknown_version = server_->cli({"apply", "-f", write("missing.yaml", missing)});
  EXPECT_NE(unknown_version.exit_code, 0);
  EXPECT_NE(unknown_version.err.find("spec.model.version"), std::string::npos)
      << unknown_version.err;

  // The device's first poll answers at once with generation 0 (nothing to run yet).
  auto first = device.desired(server_->url(), -1, 5);
  ASSERT_EQ(first.status, 200) << first.body;
  int64_t known = std::stoll(first.headers["x-outpost-generation"]);
  // A bad wait is refused by name; a huge one is capped, not overflowed.
  auto negative = device.desired(server_->url(), known, -1);
  EXPECT_EQ(negative.status, 400) << negative.body;
  EXPECT_NE(negative.body.find("wait"), std::string::npos) << negative.body;
  // Now that the server knows the device (its polls are answered from memory, on the I/O
  // thread), a wrong secret is still refused.
  FakeDevice impostor = device;
  impostor.credential = device.id + ".not-the-secret";
  auto wrong = impostor.desired(server_->url(), known, 0);
  EXPECT_EQ(wrong.status, 401) << wrong.body;
  EXPECT_NE(wrong.body.find("credential is not valid"), std::string::npos) << wrong.body;

  // Park a long-poll, then apply: the poll must return with the new state.
  auto poll =
      std::async(std::launch::async, [&] { return device.desired(server_->url(), known, 30); });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto start = std::chrono::steady_clock::now();
  auto applied = server_->cli({"apply", "-f", write("m.yaml", kManifest), "-o", "json"});
  ASSERT_EQ(applied.exit_code, 0) << applied.err;
  EXPECT_EQ(applied.json()["revision"], 1);
  auto woke = poll.get();
  auto waited = std::chrono::steady_clock::now() - start;
  ASSERT_EQ(woke.status, 200) << woke.body;
  EXPECT_LT(waited, std::chrono::seconds(10)) << "the long-poll must return when the change lands";
  int64_t gen1 = std::stoll(woke.headers["x-outpost-generation"]);
  EXPECT_GT(gen1, known);
  auto desired = nlohmann::json::parse(woke.body);
  EXPECT_EQ(desired["generation"], gen1);
  ASSERT_EQ(desired["deployments"].size(), 1u);
  EXPECT_EQ(desired["deployments"][0]["model"]["version"], "1.0.0");
  // The document is signed with the key the device got at enrollment.
  auto sig = crypto::base64_decode(woke.headers["x-outpost-signature"]);
  auto pub = crypto::base64_decode(device.server_public_key);
  ASSERT_TRUE(sig && pub);
  EXPECT_TRUE(crypto::ed25519_verify(woke.body, *sig, *pub));
  EXPECT_FALSE(crypto::ed25519_verify(woke.body + " ", *sig, *pub));
  // /metrics counts the poll answered at once and the one a publish woke.
  auto metrics = HttpClient(server_->url(), "").request("GET", "/metrics");
  ASSERT_TRUE(metrics.has_value());
  EXPECT_NE(metrics->body.find("outpost_sync_answers_total{how=\"woken\"} 1\n"), std::string::npos)
      << metrics->body;
  EXPECT_NE(metrics->body.find("outpost_sync_answers_total{how=\"at_once\"} 1\n"),
            std::string::npos)
      << metrics->body;
  // A device that hangs up while parked frees its poll at once, not at the deadline.
  {
    HttpClient impatient(server_->url(), device.credential);
    impatient.set_signer(device.signer);
    HttpRequestOptions quick;
    quick.timeout_ms = 300;
    auto gave_up = impatient.request(
        "GET", "/api/v1/device/desired?generation=" + std::to_string(gen1) + "&wait=50", {}, "",
        quick);
    EXPECT_FALSE(gave_up.has_value()) << "the poll should have been parked past the timeout";
  }
  bool freed = false;
  std::string last;
  for (int i = 0; i < 100 && !freed; ++i) {
    auto m = HttpClient(server_->url(), "").request("GET", "/metrics");
    ASSERT_TRUE(m.has_value());
    last = m->body;
    freed = last.find("outpost_sync_waiting 0\n") != std::string::npos &&
            last.find("outpost_sync_answers_total{how=\"hung_up\"} 1\n") != std::string::npos;
    if (!freed) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(freed) << last;

  // Changed manifest: revision 2. Same again: still 2.
  std::string v2 = kManifest;
  v2.replace(v2.find("1.0.0"), 5, "1.1.0");
  auto applied2 = server_->cli({"apply", "-f", write("m2.yaml", v2), "-o", "json"});
  ASSERT_EQ(applied2.exit_code, 0) << applied2.err;
  EXPECT_EQ(applied2.json()["revision"], 2);
  auto applied3 = server_->cli({"apply", "-f", write("m3.yaml", v2), "-o", "json"});
  ASSERT_EQ(applied3.exit_code, 0) << applied3.err;
  EXPECT_EQ(applied3.json()["revision"], 2);
  EXPECT_FALSE(applied3.json()["changed"].get<bool>());
  auto show = server_->cli({"deployment", "show", "defect-detector", "-o", "json"});
  ASSERT_EQ(show.exit_code, 0) << show.err;
  EXPECT_EQ(show.json()["revision"], 2);
  auto after_v2 = device.desired(server_->url(), gen1, 5);
  ASSERT_EQ(after_v2.status, 200);
  int64_t gen2 = std::stoll(after_v2.headers["x-outpost-generation"]);
  EXPECT_GT(gen2, gen1);
  // No change: the poll is held and answers 304 at its deadline.
  auto held = device.desired(server_->url(), gen2, 1);
  EXPECT_EQ(held.status, 304);

  // Restart: everything is still there, and the generation did not move.
  server_->stop();
  server_->start();
  auto after = server_->cli({"deployment", "show", "defect-detector", "-o", "json"});
  ASSERT_EQ(after.exit_code, 0) << after.err;
  EXPECT_EQ(after.json()["revision"], 2);
  EXPECT_EQ(after.json()["revisions"].size(), 2u);
  auto models = server_->cli({"model", "list", "-o", "json"});
  EXPECT_EQ(models.json()[0]["versions"].size(), 2u);
  auto devices = server_->cli({"device", "list", "-o", "json"});
  ASSERT_EQ(devices.json().size(), 1u);
  EXPECT_EQ(devices.json()[0]["generation"], gen2);
  auto after_restart = device.desired(server_->url(), gen2, 1);
  EXPECT_EQ(after_restart.status, 304) << "a restart must not change the generation";

  // Every change is audited, chained, and verifiable.
  auto audit = server_->cli({"audit", "list", "-o", "json"});
  ASSERT_EQ(audit.exit_code, 0) << audit.err;
  auto entries = audit.json();
  std::vector<std::string> actions;
  for (const auto& e : entries) {
    actions.push_back(e["action"]);
    EXPECT_TRUE(e.contains("actor") && e.contains("target") && e.contains("time") &&
                e.contains("hash"));
  }
  EXPECT_EQ(std::count(actions.begin(), actions.end(), "deployment.apply"), 2);
  EXPECT_EQ(std::count(actions.begin(), actions.end(), "model.push"), 2);
  EXPECT_EQ(std::count(actions.begin(), actions.end(), "device.enroll"), 1);
  for (size_t i = 1; i < entries.size(); ++i)
    EXPECT_EQ(entries[i]["prev_hash"], entries[i - 1]["hash"]);
  auto verify = server_->cli({"audit", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.out << verify.err;

  // Delete: the device's desired state drops it.
  auto deleted = server_->cli({"deployment", "delete", "defect-detector"});
  ASSERT_EQ(deleted.exit_code, 0) << deleted.err;
  auto emptied = device.desired(server_->url(), gen2, 5);
  ASSERT_EQ(emptied.status, 200);
  EXPECT_EQ(nlohmann::json::parse(emptied.body)["deployments"].size(), 0u);
}

// Telemetry from a device as the agent would send it: zstd batches, acknowledged by seq,
// counted once however often they arrive; malformed ones refused; visible in queries,
// /metrics, `device list` and `deployment show`.
TEST_F(ControlPlaneE2E, TelemetryIsStoredOnceAndShowsInQueriesMetricsAndCli) {
  auto device = FakeDevice::enroll(server_->url(), create_token("plant-7"),
                                   {{"arch", "x86_64"}, {"memory_mb", 4096}});
  HttpClient client(server_->url(), device.credential);
  client.set_signer(device.signer);
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  auto record = [&](int64_t seq, uint64_t served) {
    nlohmann::json r = {{"seq", seq},
                        {"t", now - 120'000 + seq * 1000},
                        {"kind", "inference"},
                        {"deployment", "defect-detector"},
                        {"revision", 1},
                        {"model", "defect-net"},
                        {"version", "1.0.0"},
                        {"role", "primary"},
                        {"interval_ms", 1000},
                        {"requests", served},
                        {"served", served},
                        {"errors", 1},
                        {"invalid", 0},
                        {"fallbacks", 0},
                        {"latency",
                         {{"count", served},
                          {"sum", 0.02 * static_cast<double>(served)},
                          {"buckets", {{0.01, served / 2}, {0.05, served - served / 2}}}}},
                        {"confidence",
                         {{"count", served},
                          {"sum", 0.9 * static_cast<double>(served)},
                          {"buckets", {{1.0, served}}}}}};
    return r.dump();
  };
  auto send = [&](int64_t first, int64_t last, const std::string& encoding = "zstd") {
    std::vector<std::string> records;
    for (int64_t seq = first; seq <= last; ++seq) records.push_back(record(seq, 10));
    auto body = telemetry::compress(
        telemetry::batch_json(first, last, telemetry::DropCounts{.samples = 2}, records));
    EXPECT_TRUE(body.has_value());
    HttpRequestOptions options;
    options.headers.emplace_back("Content-Encoding", encoding);
    auto resp = client.request("POST", "/api/v1/device/telemetry", body ? *body : "",
                               "application/json", options);
    EXPECT_TRUE(resp.has_value());
    return resp ? *resp : HttpResponse{};
  };

  auto first = send(1, 5);
  ASSERT_EQ(first.status, 200) << first.body;
  auto doc = nlohmann::json::parse(first.body);
  EXPECT_EQ(doc["acked"], 5);
  EXPECT_EQ(doc["stored"], 5);
  auto replay = send(1, 5);
  ASSERT_EQ(replay.status, 200);
  EXPECT_EQ(nlohmann::json::parse(replay.body)["duplicates"], 5);
  auto overlap = send(4, 7);
  ASSERT_EQ(overlap.status, 200);
  EXPECT_EQ(nlohmann::json::parse(overlap.body)["stored"], 2);

  // Not zstd: 415 saying so. Garbage: 400. Over the size limit: 413. None stores anything.
  auto plain = send(8, 9, "identity");
  EXPECT_EQ(plain.status, 415) << plain.body;
  EXPECT_NE(plain.body.find("zstd"), std::string::npos) << plain.body;
  HttpRequestOptions zstd;
  zstd.headers.emplace_back("Content-Encoding", "zstd");
  auto garbage =
      client.request("POST", "/api/v1/device/telemetry", "not zstd", "application/json", zstd);
  ASSERT_TRUE(garbage.has_value());
  EXPECT_EQ(garbage->status, 400) << garbage->body;
  auto huge = client.request("POST", "/api/v1/device/telemetry",
                             std::string(telemetry::kMaxCompressedBatch + 1, 'x'),
                             "application/json", zstd);
  ASSERT_TRUE(huge.has_value());
  EXPECT_EQ(huge->status, 413) << huge->body;

  // 7 records of 10 requests each, once.
  HttpClient op(server_->url(), server_->admin_token());
  auto q =
      op.request("GET", "/api/v1/telemetry/query?metric=inference_requests&since=1h&by=deployment");
  ASSERT_TRUE(q.has_value());
  ASSERT_EQ(q->status, 200) << q->body;
  auto result = nlohmann::json::parse(q->body);
  EXPECT_EQ(result["aggregate"]["sum"], 70.0) << q->body;
  EXPECT_EQ(result["series"][0]["deployment"], "defect-detector");
  auto unknown = op.request("GET", "/api/v1/telemetry/query?metric=latency");
  ASSERT_TRUE(unknown.has_value());
  EXPECT_EQ(unknown->status, 400);
  EXPECT_NE(unknown->body.find("inference_latency_seconds"), std::string::npos) << unknown->body;

  auto metrics = HttpClient(server_->url(), "").request("GET", "/metrics");
  ASSERT_TRUE(metrics.has_value());
  EXPECT_NE(metrics->body.find("outpost_inference_requests_total{deployment=\"defect-detector\","
                               "model=\"defect-net\",version=\"1.0.0\",role=\"primary\"} 70\n"),
            std::string::npos)
      << metrics->body;
  EXPECT_NE(metrics->body.find("outpost_devices{site=\"plant-7\",state=\"online\"} 1\n"),
            std::string::npos)
      << metrics->body;
  EXPECT_NE(metrics->body.find("outpost_telemetry_dropped_total{class=\"samples\"} 2\n"),
            std::string::npos);
  EXPECT_NE(metrics->body.find("outpost_telemetry_refused_batches_total{reason=\"encoding\"} 1\n"),
            std::string::npos);
  EXPECT_NE(metrics->body.find("outpost_inference_latency_seconds_bucket{deployment=\"defect-"
                               "detector\",model=\"defect-net\",version=\"1.0.0\",role=\"primary\","
                               "le=\"+Inf\"} 70\n"),
            std::string::npos)
      << metrics->body;

  auto cli = server_->cli({"telemetry", "query", "inference_latency_seconds", "--by", "version"});
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  EXPECT_NE(cli.out.find("1.0.0"), std::string::npos) << cli.out;
  EXPECT_NE(cli.out.find("P95"), std::string::npos) << cli.out;
  auto cli_json = server_->cli({"telemetry", "query", "inference_requests", "-o", "json"});
  EXPECT_EQ(cli_json.exit_code, 0) << cli_json.err;
  EXPECT_EQ(cli_json.json()["aggregate"]["sum"], 70.0);
  auto list = server_->cli({"device", "list"});
  EXPECT_EQ(list.exit_code, 0) << list.err;
  EXPECT_NE(list.out.find("ONLINE"), std::string::npos) << list.out;
  EXPECT_NE(list.out.find("telemetry dropped 2"), std::string::npos) << list.out;
  auto help = server_->cli({"telemetry", "query", "--help"});
  EXPECT_NE(help.out.find("sync_lag_seconds"), std::string::npos) << help.out;

  ASSERT_EQ(server_
                ->cli({"model", "push", "defect-net", "1.0.0", "--variant",
                       "accelerator=cpu=" + model_file("m.onnx", 1)})
                .exit_code,
            0);
  ASSERT_EQ(server_->cli({"apply", "-f", write("d.yaml", kManifest)}).exit_code, 0);
  auto show = server_->cli({"deployment", "show", "defect-detector"});
  EXPECT_EQ(show.exit_code, 0) << show.err;
  EXPECT_NE(show.out.find("Last hour:  70 requests, 10.00% errors"), std::string::npos) << show.out;
}

TEST_F(ControlPlaneE2E, VariantsPerHardwareAndUnschedulable) {
  auto pushed =
      server_->cli({"model", "push", "defect-net", "1.0.0", "--variant",
                    "accelerator=gpu=" + model_file("gpu.onnx", 3), "--variant",
                    "accelerator=cpu,min_memory=1G=" + model_file("cpu.onnx", 4), "-o", "json"});
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  std::string gpu_digest = pushed.json()["variants"][0]["artifact"];
  std::string cpu_digest = pushed.json()["variants"][1]["artifact"];
  std::string token = create_token("plant-1");
  auto gpu = FakeDevice::enroll(server_->url(), token, {{"arch", "x86_64"}, {"memory_mb", 16000}},
                                {{"accelerator", "gpu"}});
  auto cpu = FakeDevice::enroll(server_->url(), token,
                                {{"arch", "arm64"}, {"memory_mb", 4000}, {"accelerator", "cpu"}});
  auto tiny = FakeDevice::enroll(server_->url(), token,
                                 {{"arch", "arm64"}, {"memory_mb", 512}, {"accelerator", "cpu"}});
  auto applied = server_->cli({"apply", "-f", write("m.yaml", kManifest)});
  ASSERT_EQ(applied.exit_code, 0) << applied.err;

  auto artifact_of = [&](const FakeDevice& d) {
    auto r = d.desired(server_->url(), 0, 5);
    auto doc = nlohmann::json::parse(r.body);
    if (doc["deployments"].empty()) return std::string("none");
    return doc["deployments"][0]["model"]["variant"]["artifact"].get<std::string>();
  };
  EXPECT_EQ(artifact_of(gpu), gpu_digest);
  EXPECT_EQ(artifact_of(cpu), cpu_digest);
  EXPECT_EQ(artifact_of(tiny), "none");
  auto show = server_->cli({"device", "show", tiny.id, "-o", "json"});
  auto reason = show.json()["unschedulable"][0]["reason"].get<std::string>();
  EXPECT_NE(reason.find("1024 MB"), std::string::npos) << reason;
  auto table = server_->cli({"deployment", "show", "defect-detector"});
  EXPECT_NE(table.out.find("unschedulable"), std::string::npos) << table.out;
}

}  // namespace
}  // namespace outpost::e2e
