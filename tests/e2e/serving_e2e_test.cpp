// End-to-end serving: the real server and a real `outpost-agent`; models pushed and applied
// with the CLI, inferences posted to the agent's Open Inference Protocol routes as a line
// application would, while versions change underneath.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "agent/serve/onnx_session.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/onnx/onnx_builder.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

json infer_body(const std::vector<std::vector<float>>& rows) {
  json data = json::array();
  for (const auto& row : rows) data.push_back(row);
  return {{"id", "req-1"},
          {"inputs",
           {{{"name", "input"},
             {"datatype", "FP32"},
             {"shape", {static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}},
             {"data", data}}}}};
}

// The answer's probabilities, row after row.
std::vector<float> answer_values(const json& answer) {
  std::vector<float> out;
  for (const auto& v : answer["outputs"][0]["data"]) out.push_back(v.get<float>());
  return out;
}

void expect_near_all(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5) << "value " << i;
}

float top(const std::vector<float>& v) { return *std::max_element(v.begin(), v.end()); }

class ServingE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-serving-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/server");
    server_->start();
    ASSERT_TRUE(server_->running());
    auto r = server_->cli({"token", "create", "--site", "plant-1", "--uses", "2", "-o", "json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    agent_ = std::make_unique<AgentProcess>(root_ + "/agent");
    agent_->start({"--server", server_->url(), "--enroll-token", r.json().value("token", "")});
    ASSERT_TRUE(agent_->running());
  }
  void TearDown() override {
    agent_.reset();
    server_.reset();
    if (!HasFailure()) fs::remove_all(root_);
  }

  std::string write(const std::string& name, const std::string& contents) {
    std::string path = root_ + "/" + name;
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }

  void push(const std::string& model, const std::string& version, const std::string& file) {
    auto r =
        server_->cli({"model", "push", model, version, "--variant", "accelerator=cpu=" + file});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }

  void push_classifier(const std::string& model, const std::string& version,
                       const onnx::ClassifierSpec& spec) {
    push(model, version, write(model + "-" + version + ".onnx", onnx::build_classifier_onnx(spec)));
  }

  void apply(const std::string& name, const std::string& model, const std::string& version,
             const std::string& route, const json& fallback = nullptr) {
    json serve = {{"route", route}};
    if (!fallback.is_null()) serve["fallback"] = fallback;
    json manifest = {{"apiVersion", "outpost/v1"},
                     {"kind", "Deployment"},
                     {"metadata", {{"name", name}}},
                     {"spec",
                      {{"selector", {{"sites", {"plant-1"}}}},
                       {"model", {{"name", model}, {"version", version}}},
                       {"serve", serve}}}};
    auto r = server_->cli({"apply", "-f", "-"}, manifest.dump());
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }

  // GET /v1/services until `deployment` serves `version` ready (or degraded when allowed).
  json wait_serving(const std::string& deployment, const std::string& version, int timeout_s = 60) {
    HttpClient client(agent_->url(), "");
    json last;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    while (std::chrono::steady_clock::now() < deadline) {
      auto r = client.request("GET", "/v1/services");
      if (r && r->status == 200) {
        last = json::parse(r->body, nullptr, false);
        for (const auto& s : last) {
          if (s.value("deployment", "") == deployment && s.value("version", "") == version &&
              s.value("state", "") != "unavailable") {
            return s;
          }
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ADD_FAILURE() << deployment << " never served " << version << ": " << last.dump(2) << "\n"
                  << agent_->log();
    return nullptr;
  }

  // Polls the agent's status until the deployment is in `phase`; says what it saw if not.
  bool wait_phase(const std::string& deployment, const std::string& phase, int timeout_s) {
    json last;
    const bool reached = agent_->wait_for(
        [&](const json& status) {
          for (const auto& d : status.value("deployments", json::array())) {
            if (d.value("name", "") == deployment && d.value("phase", "") == phase) return true;
          }
          return false;
        },
        timeout_s, &last);
    if (!reached) ADD_FAILURE() << deployment << " never " << phase << ": " << last.dump(2);
    return reached;
  }

  HttpResponse post(HttpClient& client, const std::string& path, const std::string& body) {
    auto r = client.request("POST", path, body);
    EXPECT_TRUE(r) << (r ? "" : r.error().message);
    return r ? *r : HttpResponse{};
  }

  std::string root_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<AgentProcess> agent_;
};

TEST_F(ServingE2E, ServesKnownOutputsAndSwapsVersionsUnderLoadWithoutAFailedRequest) {
  onnx::ClassifierSpec v1;
  v1.seed = 1;
  onnx::ClassifierSpec v2 = v1;
  v2.seed = 2;
  push_classifier("defect-net", "1.0.0", v1);
  push_classifier("defect-net", "1.1.0", v2);
  apply("detector", "defect-net", "1.0.0", "/models/detector");
  json service = wait_serving("detector", "1.0.0");
  ASSERT_FALSE(service.is_null());
  EXPECT_EQ(service["url"], agent_->url() + "/models/detector");
  EXPECT_EQ(service["inputs"][0]["shape"], json({-1, 4}));

  // Known outputs for a batch of three rows.
  const std::vector<std::vector<float>> rows = {
      {0.5f, -1.0f, 2.0f, 0.25f}, {0.0f, 0.0f, 0.0f, 0.0f}, {-3.0f, 1.5f, 0.75f, -0.5f}};
  HttpClient client(agent_->url(), "");
  HttpResponse r = post(client, "/models/detector/infer", infer_body(rows).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  json answer = json::parse(r.body);
  EXPECT_EQ(answer["model_name"], "defect-net");
  EXPECT_EQ(answer["model_version"], "1.0.0");
  EXPECT_EQ(answer["id"], "req-1");
  EXPECT_EQ(answer["outputs"][0]["shape"], json({3, 3}));
  std::vector<float> want;
  for (const auto& row : rows) {
    auto ref = onnx::classifier_reference(v1, row);
    want.insert(want.end(), ref.begin(), ref.end());
  }
  expect_near_all(answer_values(answer), want);

  // The other doors to the same model.
  auto ready = client.request("GET", "/models/detector/ready");
  ASSERT_TRUE(ready);
  EXPECT_EQ(ready->status, 200);
  auto meta = client.request("GET", "/v2/models/defect-net");
  ASSERT_TRUE(meta);
  EXPECT_EQ(meta->status, 200);
  EXPECT_EQ(json::parse(meta->body)["outputs"][0]["name"], "probabilities");
  auto health = client.request("GET", "/v2/health/ready");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  HttpResponse via_v2 = post(client, "/v2/models/detector/infer", infer_body({rows[0]}).dump());
  ASSERT_EQ(via_v2.status, 200) << via_v2.body;
  expect_near_all(answer_values(json::parse(via_v2.body)), onnx::classifier_reference(v1, rows[0]));

  // A client loops requests while 1.1.0 is applied: none may fail, and once the new version
  // answers the old one never does again.
  std::atomic<bool> stop{false};
  std::atomic<int> sent{0}, failed{0}, new_answers{0}, old_after_new{0};
  std::string first_failure;
  std::vector<float> last_new;
  std::thread looper([&] {
    HttpClient c(agent_->url(), "");
    const std::string body = infer_body({rows[0]}).dump();
    while (!stop) {
      ++sent;
      auto res = c.request("POST", "/models/detector/infer", body);
      if (!res || res->status != 200) {
        if (failed++ == 0) first_failure = res ? res->body : res.error().message;
        continue;
      }
      json a = json::parse(res->body, nullptr, false);
      if (a.value("model_version", "") == "1.1.0") {
        ++new_answers;
        last_new = answer_values(a);
      } else if (new_answers > 0) {
        ++old_after_new;
      }
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  apply("detector", "defect-net", "1.1.0", "/models/detector");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (new_answers < 200 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  stop = true;
  looper.join();
  EXPECT_EQ(failed.load(), 0) << first_failure;
  EXPECT_GE(new_answers.load(), 200) << agent_->log();
  EXPECT_EQ(old_after_new.load(), 0);
  EXPECT_GT(sent.load() - new_answers.load(), 0) << "the old version never answered under load";
  expect_near_all(last_new, onnx::classifier_reference(v2, rows[0]));
  auto status = agent_->deployment("detector");
  EXPECT_EQ(status.value("phase", ""), "running") << status.dump();
  EXPECT_EQ(status.value("current_revision", 0), 2);

  // Every request counted once, on the version that ran it.
  auto metrics = client.request("GET", "/metrics");
  ASSERT_TRUE(metrics);
  auto count_of = [&](const std::string& version) {
    const std::string key = "outpost_inference_requests_total{deployment=\"detector\",model=\"" +
                            std::string("defect-net\",version=\"") + version +
                            "\",role=\"primary\"} ";
    auto at = metrics->body.find(key);
    return at == std::string::npos ? -1L : std::atol(metrics->body.c_str() + at + key.size());
  };
  EXPECT_EQ(count_of("1.0.0") + count_of("1.1.0"), sent.load() + 2) << metrics->body;
  EXPECT_NE(metrics->body.find("outpost_inference_latency_seconds_bucket"), std::string::npos);
}

TEST_F(ServingE2E, FallbackAnswersWhenThePrimaryIsUnderMinConfidence) {
  // A 40-class primary is unsure of many rows; the 3-class fallback is sure of most.
  onnx::ClassifierSpec primary;
  primary.classes = 40;
  primary.seed = 7;
  onnx::ClassifierSpec fallback;
  fallback.seed = 3;
  // Two rows: one the primary is clearly surer of than the other; the threshold between.
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  std::vector<float> low, high;
  for (int i = 0; i < 200 && (low.empty() || top(onnx::classifier_reference(primary, high)) -
                                                     top(onnx::classifier_reference(primary, low)) <
                                                 0.2f);
       ++i) {
    std::vector<float> row = {dist(rng), dist(rng), dist(rng), dist(rng)};
    float t = top(onnx::classifier_reference(primary, row));
    if (low.empty() || t < top(onnx::classifier_reference(primary, low))) low = row;
    if (high.empty() || t > top(onnx::classifier_reference(primary, high))) high = row;
  }
  const float low_top = top(onnx::classifier_reference(primary, low));
  const float high_top = top(onnx::classifier_reference(primary, high));
  ASSERT_GT(high_top - low_top, 0.2f);
  const double threshold = std::round((low_top + high_top) / 2 * 100) / 100;

  push_classifier("defect-net", "2.0.0", primary);
  push_classifier("defect-net-tiny", "1.0.0", fallback);
  apply("detector", "defect-net", "2.0.0", "/models/detector",
        {{"model", "defect-net-tiny"}, {"version", "1.0.0"}, {"min_confidence", threshold}});
  json service = wait_serving("detector", "2.0.0");
  ASSERT_FALSE(service.is_null());
  EXPECT_EQ(service["fallback"]["model"], "defect-net-tiny");
  EXPECT_TRUE(service["fallback"]["loaded"].get<bool>()) << service.dump(2);

  HttpClient client(agent_->url(), "");
  HttpResponse r = post(client, "/models/detector/infer", infer_body({low}).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  json answer = json::parse(r.body);
  EXPECT_EQ(answer["model_name"], "defect-net-tiny");
  EXPECT_EQ(answer["model_version"], "1.0.0");
  EXPECT_TRUE(answer["parameters"].value("fallback", false));
  EXPECT_NE(answer["parameters"].value("fallback_reason", "").find("confidence"), std::string::npos)
      << answer.dump();
  expect_near_all(answer_values(answer), onnx::classifier_reference(fallback, low));

  r = post(client, "/models/detector/infer", infer_body({high}).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  answer = json::parse(r.body);
  EXPECT_EQ(answer["model_name"], "defect-net");
  EXPECT_FALSE(answer.contains("parameters") && answer["parameters"].value("fallback", false));
  expect_near_all(answer_values(answer), onnx::classifier_reference(primary, high));

  auto metrics = client.request("GET", "/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("outpost_inference_fallbacks_total{deployment=\"detector\","
                               "model=\"defect-net\",version=\"2.0.0\",role=\"primary\"} 1"),
            std::string::npos)
      << metrics->body;
  EXPECT_NE(metrics->body.find("outpost_inference_requests_total{deployment=\"detector\","
                               "model=\"defect-net-tiny\",version=\"1.0.0\",role=\"fallback\"} 1"),
            std::string::npos)
      << metrics->body;
}

// A model the registry accepts (valid ONNX) but the runtime refuses: an operator that does
// not exist. Same length as "Softmax", so the protobuf stays well-formed.
std::string broken_model(const onnx::ClassifierSpec& spec) {
  std::string bytes = onnx::build_classifier_onnx(spec);
  auto at = bytes.find("Softmax");
  EXPECT_NE(at, std::string::npos);
  if (at != std::string::npos) bytes.replace(at, 7, "Softmix");
  return bytes;
}

TEST_F(ServingE2E, AModelTheRuntimeRefusesRollsBackAndTheOldVersionKeepsServing) {
  onnx::ClassifierSpec spec;
  spec.seed = 4;
  push_classifier("defect-net", "1.0.0", spec);
  push("defect-net", "1.1.0", write("broken.onnx", broken_model(spec)));
  apply("detector", "defect-net", "1.0.0", "/models/detector");
  ASSERT_FALSE(wait_serving("detector", "1.0.0").is_null());

  apply("detector", "defect-net", "1.1.0", "/models/detector");
  ASSERT_TRUE(wait_phase("detector", "rolled-back", 60));
  const json d = agent_->deployment("detector");
  EXPECT_NE(d.value("message", "").find("cannot be loaded"), std::string::npos) << d.dump();
  EXPECT_NE(d.value("message", "").find("Softmix"), std::string::npos) << d.dump();
  EXPECT_EQ(d.value("current_revision", 0), 1);

  HttpClient client(agent_->url(), "");
  HttpResponse r = post(client, "/models/detector/infer", infer_body({{1, 2, 3, 4}}).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(json::parse(r.body)["model_version"], "1.0.0");
  expect_near_all(answer_values(json::parse(r.body)),
                  onnx::classifier_reference(spec, {1, 2, 3, 4}));
  // The operator sees it too.
  auto shown = server_->cli({"device", "show", agent_->device_id()});
  EXPECT_NE(shown.out.find("rolled-back"), std::string::npos) << shown.out;
}

TEST_F(ServingE2E, APrimaryThatCannotLoadLeavesTheFallbackAnswering) {
  onnx::ClassifierSpec spec;
  spec.seed = 8;
  onnx::ClassifierSpec tiny;
  tiny.seed = 9;
  push("defect-net", "3.0.0", write("broken.onnx", broken_model(spec)));
  push_classifier("defect-net-tiny", "1.0.0", tiny);
  apply("detector", "defect-net", "3.0.0", "/models/detector",
        {{"model", "defect-net-tiny"}, {"version", "1.0.0"}});
  json service = wait_serving("detector", "3.0.0");
  ASSERT_FALSE(service.is_null());
  EXPECT_EQ(service["state"], "degraded") << service.dump(2);
  EXPECT_FALSE(service["primary"]["loaded"].get<bool>());

  HttpClient client(agent_->url(), "");
  HttpResponse r = post(client, "/models/detector/infer", infer_body({{1, 0, 0, 1}}).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  json answer = json::parse(r.body);
  EXPECT_EQ(answer["model_name"], "defect-net-tiny");
  EXPECT_NE(answer["parameters"].value("fallback_reason", "").find("not loaded"), std::string::npos)
      << r.body;
  expect_near_all(answer_values(answer), onnx::classifier_reference(tiny, {1, 0, 0, 1}));
  ASSERT_TRUE(wait_phase("detector", "running", 30));
  EXPECT_NE(agent_->deployment("detector").value("message", "").find("fallback"),
            std::string::npos);
}

TEST_F(ServingE2E, AnAgentRestartedWithoutTheServerServesAgain) {
  onnx::ClassifierSpec spec;
  spec.seed = 12;
  push_classifier("defect-net", "1.0.0", spec);
  apply("detector", "defect-net", "1.0.0", "/models/detector");
  ASSERT_FALSE(wait_serving("detector", "1.0.0").is_null());
  server_->stop();
  agent_->stop();
  agent_->start();
  ASSERT_FALSE(wait_serving("detector", "1.0.0", 30).is_null());
  HttpClient client(agent_->url(), "");
  HttpResponse r =
      post(client, "/models/detector/infer", infer_body({{0.1f, 0.2f, 0.3f, 0.4f}}).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  expect_near_all(answer_values(json::parse(r.body)),
                  onnx::classifier_reference(spec, {0.1f, 0.2f, 0.3f, 0.4f}));
  EXPECT_FALSE(agent_->status().value("online", true));
}

TEST_F(ServingE2E, SileroVadIsServedAndAnswersLikeTheRuntimeDirectly) {
  const std::string model =
      std::string(OUTPOST_SOURCE_DIR) + "/third_party/models/silero_vad_v5.onnx";
  ASSERT_TRUE(fs::exists(model)) << "run scripts/install-deps";
  push("silero-vad", "5.0.0", model);
  apply("vad", "silero-vad", "5.0.0", "/models/vad");
  json service = wait_serving("vad", "5.0.0");
  ASSERT_FALSE(service.is_null());

  // 32 ms of a 440 Hz tone at 16 kHz, a zero state, the sample rate.
  std::vector<float> audio(512);
  for (size_t i = 0; i < audio.size(); ++i) {
    audio[i] =
        0.5f * static_cast<float>(std::sin(2 * M_PI * 440.0 * static_cast<double>(i) / 16000));
  }
  std::vector<float> state(2 * 128, 0.0f);
  json body = {
      {"inputs",
       {{{"name", "input"}, {"datatype", "FP32"}, {"shape", {1, 512}}, {"data", audio}},
        {{"name", "state"}, {"datatype", "FP32"}, {"shape", {2, 1, 128}}, {"data", state}},
        {{"name", "sr"}, {"datatype", "INT64"}, {"shape", json::array()}, {"data", {16000}}}}}};
  HttpClient client(agent_->url(), "");
  HttpResponse r = post(client, "/models/vad/infer", body.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  json answer = json::parse(r.body);
  EXPECT_EQ(answer["model_name"], "silero-vad");
  ASSERT_EQ(answer["outputs"].size(), 2u) << r.body;
  EXPECT_EQ(answer["outputs"][0]["name"], "output");
  EXPECT_EQ(answer["outputs"][0]["shape"], json({1, 1}));
  EXPECT_EQ(answer["outputs"][1]["shape"], json({2, 1, 128}));
  const float probability = answer["outputs"][0]["data"][0].get<float>();
  EXPECT_GE(probability, 0.0f);
  EXPECT_LE(probability, 1.0f);

  // The same tensors through ONNX Runtime in this process: the same floats, bit for bit.
  auto session = agent::serve::load_onnx_session(model, {});
  ASSERT_TRUE(session) << session.error().message;
  using agent::serve::DataType;
  auto tensor = [](std::string name, DataType type, std::vector<int64_t> shape, const void* p,
                   size_t bytes) {
    agent::serve::Tensor t;
    t.name = std::move(name);
    t.type = type;
    t.shape = std::move(shape);
    t.data.assign(static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + bytes);
    return t;
  };
  const int64_t sr = 16000;
  std::vector<agent::serve::Tensor> inputs;
  for (const auto& spec : (*session)->inputs()) {
    if (spec.name == "input")
      inputs.push_back(tensor("input", DataType::kFp32, {1, 512}, audio.data(), 2048));
    if (spec.name == "state")
      inputs.push_back(tensor("state", DataType::kFp32, {2, 1, 128}, state.data(), 1024));
    if (spec.name == "sr") inputs.push_back(tensor("sr", DataType::kInt64, {}, &sr, 8));
  }
  auto direct = (*session)->run(inputs, {});
  ASSERT_TRUE(direct) << direct.error().message;
  float direct_probability = 0;
  std::memcpy(&direct_probability, (*direct)[0].data.data(), sizeof(float));
  EXPECT_EQ(probability, direct_probability);

  // Silence is not speech.
  std::fill(audio.begin(), audio.end(), 0.0f);
  body["inputs"][0]["data"] = audio;
  r = post(client, "/models/vad/infer", body.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_LT(json::parse(r.body)["outputs"][0]["data"][0].get<float>(), 0.5f);
}

TEST_F(ServingE2E, HundredsOfMalformedBodiesAllGet4xxAndServingGoesOn) {
  onnx::ClassifierSpec spec;
  spec.seed = 5;
  push_classifier("defect-net", "1.0.0", spec);
  apply("detector", "defect-net", "1.0.0", "/models/detector");
  ASSERT_FALSE(wait_serving("detector", "1.0.0").is_null());

  const std::string valid = infer_body({{1.0f, 2.0f, 3.0f, 4.0f}}).dump();
  std::vector<std::string> bodies = {
      "",
      "null",
      "[]",
      "{}",
      "\"x\"",
      "42",
      "{\"inputs\":null}",
      "{\"inputs\":{}}",
      "{\"inputs\":[1]}",
      "{\"inputs\":[{}]}",
      "{\"inputs\":[{\"name\":7}]}",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4,5]}]})",
      R"({"inputs":[{"name":"input","datatype":"INT64","shape":[1,4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP99","shape":[1,4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,5],"data":[1,2,3,4,5]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[0,4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[-1,4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[4294967296,4294967296,4],"data":[1]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":["a","b","c","d"]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1e39,0,0,0]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[null,0,0,0]}]})",
      R"({"inputs":[{"name":"nope","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]},{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}],"outputs":[{"name":"nope"}]})",
      R"({"id":5,"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]})",
      R"({"inputs":[{"name":"input","datatype":"BYTES","shape":[1,4],"data":["a","b","c","d"]}]})",
      "{\"inputs\":[{\"name\":\"input\",\"datatype\":\"FP32\",\"shape\":[1,4],\"data\":" +
          std::string(100000, '[') + std::string(100000, ']') + "}]}",
      std::string(1000, '{'),
      "\xff\xfe\x00garbage",
  };
  // Every prefix of a valid body is malformed JSON.
  for (size_t cut = 1; cut < valid.size(); cut += 2) bodies.push_back(valid.substr(0, cut));
  // Random bytes and random single-byte corruptions of a valid body.
  std::mt19937 rng(2026);
  for (int i = 0; i < 150; ++i) {
    std::string junk(rng() % 200, '\0');
    for (char& c : junk) c = static_cast<char>(rng() % 256);
    bodies.push_back(junk);
  }
  for (int i = 0; i < 150; ++i) {
    std::string mutated = valid;
    mutated[rng() % mutated.size()] = "{}[]\",:x9-e."[rng() % 12];
    if (json::parse(mutated, nullptr, false).is_discarded() || mutated != valid) {
      // A corruption may still be a valid request (a digit changed): only count the others.
      auto doc = json::parse(mutated, nullptr, false);
      if (!doc.is_discarded() && doc.is_object() && doc.contains("inputs")) continue;
      bodies.push_back(mutated);
    }
  }
  ASSERT_GT(bodies.size(), 300u);

  HttpClient client(agent_->url(), "");
  int refused = 0;
  for (const auto& body : bodies) {
    auto r = client.request("POST", "/models/detector/infer", body);
    ASSERT_TRUE(r) << "no answer for body of " << body.size() << " bytes: " << r.error().message;
    EXPECT_GE(r->status, 400) << body.substr(0, 200) << "\n-> " << r->body;
    EXPECT_LT(r->status, 500) << body.substr(0, 200) << "\n-> " << r->body;
    EXPECT_TRUE(json::parse(r->body, nullptr, false).contains("error")) << r->body;
    ++refused;
  }
  // Still serving, still right.
  EXPECT_EQ(::kill(agent_->pid(), 0), 0);
  HttpResponse r = post(client, "/models/detector/infer", valid);
  ASSERT_EQ(r.status, 200) << r.body;
  expect_near_all(answer_values(json::parse(r.body)),
                  onnx::classifier_reference(spec, {1.0f, 2.0f, 3.0f, 4.0f}));
  auto metrics = client.request("GET", "/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("outpost_inference_invalid_requests_total{deployment=\"detector\","
                               "model=\"defect-net\",version=\"1.0.0\",role=\"primary\"} " +
                               std::to_string(refused)),
            std::string::npos)
      << metrics->body.substr(0, 2000);
}

}  // namespace
}  // namespace outpost::e2e
