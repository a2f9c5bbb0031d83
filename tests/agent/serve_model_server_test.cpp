// The model server over an in-memory fake session: routes, fallback on load failure, runtime
// error and low confidence, hot swap with requests in flight, route conflicts, and what the
// server reports (services, metrics, Prometheus text).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "agent/serve/inference_session.h"
#include "agent/serve/model_server.h"
#include "http/http_server.h"

namespace outpost::agent::serve {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

// What one fake model file holds and how its sessions behave. Shared by the test and every
// session loaded from it, so the test can steer a session and see it destroyed.
struct FakeModel {
  explicit FakeModel(int64_t t) : tag(t) {}

  std::vector<TensorSpec> inputs = {{"input", DataType::kFp32, {-1, 4}, true}};
  // "probabilities" first: the server reads confidence from the first output.
  std::vector<TensorSpec> outputs = {{"probabilities", DataType::kFp32, {-1, 3}, true},
                                     {"tag", DataType::kInt64, {1}, true}};
  const int64_t tag;  // answered in output "tag", to tell which model answered

  // Rows of "probabilities", cycled over the batch.
  void set_rows(std::vector<std::vector<float>> rows) {
    std::lock_guard lock(mu);
    rows_ = std::move(rows);
  }
  // Non-empty: run() fails with this message.
  void set_failure(std::string message) {
    std::lock_guard lock(mu);
    failure_ = std::move(message);
  }
  // The next runs wait inside run() until release().
  void block() {
    std::lock_guard lock(mu);
    blocked_ = true;
  }
  void release() {
    {
      std::lock_guard lock(mu);
      blocked_ = false;
    }
    cv.notify_all();
  }
  bool wait_until_entered(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, [&] { return waiting_ > 0; });
  }

  Result<std::vector<Tensor>> run(const std::vector<Tensor>& in,
                                  const std::vector<std::string>& names) {
    runs.fetch_add(1);
    std::unique_lock lock(mu);
    if (blocked_) {
      ++waiting_;
      cv.notify_all();
      cv.wait(lock, [&] { return !blocked_; });
      --waiting_;
    }
    if (!failure_.empty()) return make_error(Errc::kInternal, failure_);
    EXPECT_EQ(in.size(), inputs.size());
    const int64_t batch = in.empty() || in[0].shape.empty() ? 1 : in[0].shape[0];
    std::vector<Tensor> all;
    Tensor probabilities{"probabilities", DataType::kFp32, {batch, 3}, {}};
    for (int64_t r = 0; r < batch; ++r) {
      const auto& row = rows_[static_cast<size_t>(r) % rows_.size()];
      const auto* bytes = reinterpret_cast<const uint8_t*>(row.data());
      probabilities.data.insert(probabilities.data.end(), bytes, bytes + 3 * sizeof(float));
    }
    all.push_back(std::move(probabilities));
    Tensor t{"tag", DataType::kInt64, {1}, std::vector<uint8_t>(sizeof(int64_t))};
    std::memcpy(t.data.data(), &tag, sizeof tag);
    all.push_back(std::move(t));
    if (names.empty()) return all;
    std::vector<Tensor> picked;
    for (const auto& name : names) {
      for (const auto& tensor : all) {
        if (tensor.name == name) picked.push_back(tensor);
      }
    }
    return picked;
  }

  std::atomic<int> runs{0};
  std::atomic<int> alive{0};      // sessions of this model not yet destroyed
  std::atomic<int> destroyed{0};  // sessions of this model destroyed

 private:
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::vector<float>> rows_ = {{0.7f, 0.2f, 0.1f}};
  std::string failure_;
  bool blocked_ = false;
  int waiting_ = 0;
};

class FakeSession final : public InferenceSession {
 public:
  explicit FakeSession(std::shared_ptr<FakeModel> model) : model_(std::move(model)) {
    model_->alive.fetch_add(1);
  }
  ~FakeSession() override {
    model_->alive.fetch_sub(1);
    model_->destroyed.fetch_add(1);
  }
  FakeSession(const FakeSession&) = delete;
  FakeSession& operator=(const FakeSession&) = delete;
  const std::vector<TensorSpec>& inputs() const override { return model_->inputs; }
  const std::vector<TensorSpec>& outputs() const override { return model_->outputs; }
  Result<std::vector<Tensor>> run(const std::vector<Tensor>& inputs,
                                  const std::vector<std::string>& output_names) override {
    return model_->run(inputs, output_names);
  }

 private:
  std::shared_ptr<FakeModel> model_;
};

http::Request request(std::string method, std::string path, std::string body = "") {
  http::Request r;
  r.method = std::move(method);
  r.target = path;
  r.path = std::move(path);
  r.body = std::move(body);
  return r;
}

std::string infer_body(int rows = 1, const std::string& id = "r1") {
  std::string data;
  for (int i = 0; i < rows * 4; ++i) data += (i ? "," : "") + std::to_string(i % 4);
  return R"({"id":")" + id + R"(","inputs":[{"name":"input","datatype":"FP32","shape":[)" +
         std::to_string(rows) + R"(,4],"data":[)" + data + "]}]}";
}

int64_t answered_tag(json response) {
  for (const auto& o : response["outputs"]) {
    if (o["name"] == "tag") return o["data"][0].get<int64_t>();
  }
  ADD_FAILURE() << "no tag output in " << response.dump();
  return -1;
}

class ServeModelServer : public ::testing::Test {
 protected:
  // A model file the fake loader can load; `tag` identifies its answers.
  std::shared_ptr<FakeModel> add_model(const std::string& path, int64_t tag) {
    auto model = std::make_shared<FakeModel>(tag);
    models_[path] = model;
    return model;
  }

  SessionLoader loader() {
    return [this](const std::string& path,
                  const SessionOptions&) -> Result<std::shared_ptr<InferenceSession>> {
      ++loads_;
      auto it = models_.find(path);
      if (it == models_.end()) {
        return make_error(Errc::kInvalidArgument, "model " + path + ": not a model file");
      }
      return std::shared_ptr<InferenceSession>(std::make_shared<FakeSession>(it->second));
    };
  }

  static ServiceConfig config(const std::string& deployment, const std::string& version,
                              const std::string& path, int64_t revision = 1) {
    ServiceConfig c;
    c.deployment = deployment;
    c.route = "/models/" + deployment;
    c.revision = revision;
    c.primary = ModelRef{"clf", version, path};
    return c;
  }

  http::Response must_handle(const http::Request& r) {
    auto response = server_.handle(r);
    EXPECT_TRUE(response.has_value()) << r.method << " " << r.path;
    if (!response) return http::Response::json(599, "{}");
    return std::move(*response);
  }

  json infer_ok(const std::string& path, const std::string& body = infer_body()) {
    auto response = must_handle(request("POST", path, body));
    EXPECT_EQ(response.status, 200) << response.body;
    return json::parse(response.body);
  }

  // The metrics_json() entry of one model version in one role.
  json metrics_of(const std::string& version, const std::string& role,
                  const std::string& model = "clf") {
    for (const auto& m : server_.metrics_json()) {
      if (m["model"] == model && m["version"] == version && m["role"] == role) return m;
    }
    ADD_FAILURE() << "no metrics for " << model << " " << version << " " << role;
    return json::object();
  }

  std::map<std::string, std::shared_ptr<FakeModel>> models_;
  int loads_ = 0;
  ModelServer server_{loader()};
};

TEST_F(ServeModelServer, AnswersItsRouteWithThePrimary) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  auto note = server_.activate(config("clf-dep", "1", "/m/clf-1.onnx", 7));
  ASSERT_TRUE(note.has_value()) << note.error().message;
  EXPECT_EQ(*note, "");
  EXPECT_EQ(server_.serving_revision("clf-dep"), std::optional<int64_t>(7));
  EXPECT_EQ(v1->runs.load(), 1);  // the warm-up

  json answer = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answer["model_name"], "clf");
  EXPECT_EQ(answer["model_version"], "1");
  EXPECT_EQ(answer["id"], "r1");
  EXPECT_EQ(answered_tag(answer), 1);
  EXPECT_EQ(answer["outputs"][0]["name"], "probabilities");
  EXPECT_EQ(answer["outputs"][0]["shape"], json::array({1, 3}));
  EXPECT_DOUBLE_EQ(answer["parameters"]["confidence"].get<double>(), 0.7f);
  EXPECT_FALSE(answer["parameters"].contains("fallback"));
  EXPECT_EQ(v1->runs.load(), 2);

  // Selected outputs only.
  json picked =
      infer_ok("/models/clf-dep/infer",
               R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}],)"
               R"("outputs":[{"name":"tag"}]})");
  ASSERT_EQ(picked["outputs"].size(), 1u);
  EXPECT_EQ(picked["outputs"][0]["name"], "tag");
  EXPECT_FALSE(picked.contains("id"));
}

TEST_F(ServeModelServer, AnswersEveryRouteOfTheProtocol) {
  add_model("/m/clf-1.onnx", 1);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx")).has_value());

  for (const char* path :
       {"/models/clf-dep/infer", "/models/clf-dep/infer/", "/v2/models/clf-dep/infer",
        "/v2/models/clf/infer", "/v2/models/clf/versions/1/infer",
        "/v2/models/clf-dep/versions/1/infer"}) {
    SCOPED_TRACE(path);
    EXPECT_EQ(infer_ok(path)["model_version"], "1");
  }
  for (const char* path : {"/models/clf-dep/ready", "/v2/models/clf-dep/ready",
                           "/v2/models/clf/ready", "/v2/models/clf/versions/1/ready"}) {
    SCOPED_TRACE(path);
    auto response = must_handle(request("GET", path));
    EXPECT_EQ(response.status, 200);
    EXPECT_EQ(json::parse(response.body), (json{{"name", "clf-dep"}, {"ready", true}}));
  }
  for (const char* path : {"/models/clf-dep", "/models/clf-dep/", "/v2/models/clf-dep",
                           "/v2/models/clf", "/v2/models/clf/versions/1"}) {
    SCOPED_TRACE(path);
    auto response = must_handle(request("GET", path));
    ASSERT_EQ(response.status, 200);
    json meta = json::parse(response.body);
    EXPECT_EQ(meta["name"], "clf");
    EXPECT_EQ(meta["versions"], json::array({"1"}));
    EXPECT_EQ(meta["deployment"], "clf-dep");
    EXPECT_EQ(meta["route"], "/models/clf-dep");
    EXPECT_EQ(meta["inputs"][0],
              (json{{"name", "input"}, {"datatype", "FP32"}, {"shape", {-1, 4}}}));
    EXPECT_EQ(meta["outputs"][1]["name"], "tag");
  }

  auto live = must_handle(request("GET", "/v2/health/live"));
  EXPECT_EQ(live.status, 200);
  EXPECT_EQ(json::parse(live.body)["live"], true);
  EXPECT_EQ(must_handle(request("HEAD", "/v2/health/live")).status, 200);
  auto ready = must_handle(request("GET", "/v2/health/ready"));
  EXPECT_EQ(ready.status, 200);
  EXPECT_EQ(json::parse(ready.body), (json{{"ready", true}, {"models", 1}}));
  auto server_meta = must_handle(request("GET", "/v2"));
  EXPECT_EQ(server_meta.status, 200);
  EXPECT_EQ(json::parse(server_meta.body)["name"], "outpost-agent");

  // Unknown models under /v2 are the protocol's 404; other paths are not the server's.
  auto unknown = must_handle(request("GET", "/v2/models/other"));
  EXPECT_EQ(unknown.status, 404);
  EXPECT_NE(json::parse(unknown.body)["error"].get<std::string>().find("other"), std::string::npos);
  auto wrong_version =
      must_handle(request("POST", "/v2/models/clf/versions/2/infer", infer_body()));
  EXPECT_EQ(wrong_version.status, 404);
  EXPECT_NE(wrong_version.body.find("version 2 is not served here (serving 1)"), std::string::npos)
      << wrong_version.body;
  for (const char* path : {"/", "/other", "/models/other/infer", "/models", "/v2/models/a/b",
                           "/v2/models/", "/v2/health", "/v1/services"}) {
    EXPECT_FALSE(server_.handle(request("GET", path)).has_value()) << path;
  }
}

TEST_F(ServeModelServer, RefusesTheWrongMethodWith405) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx")).has_value());
  const int runs = v1->runs.load();
  const std::vector<std::pair<std::string, std::string>> wrong = {
      {"GET", "/models/clf-dep/infer"},
      {"PUT", "/models/clf-dep/infer"},
      {"POST", "/models/clf-dep/ready"},
      {"POST", "/models/clf-dep"},
      {"DELETE", "/v2/models/clf"},
      {"GET", "/v2/models/clf/infer"},
      {"POST", "/v2"},
      {"POST", "/v2/health/live"},
      {"POST", "/v2/health/ready"},
  };
  for (const auto& [method, path] : wrong) {
    SCOPED_TRACE(method + " " + path);
    auto response = must_handle(request(method, path, infer_body()));
    EXPECT_EQ(response.status, 405);
    EXPECT_TRUE(json::parse(response.body).contains("error"));
  }
  EXPECT_EQ(v1->runs.load(), runs);
}

TEST_F(ServeModelServer, BinaryTensorDataInAndOutThroughTheRoute) {
  add_model("/m/clf-1.onnx", 1);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx")).has_value());
  const std::vector<float> row = {1, 2, 3, 4};
  const std::string head =
      R"({"id":"b","parameters":{"binary_data_output":true},"inputs":[{"name":"input",)"
      R"("datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":16}}]})";
  auto req = request("POST", "/models/clf-dep/infer",
                     head + std::string(reinterpret_cast<const char*>(row.data()), 16));
  req.headers["inference-header-content-length"] = std::to_string(head.size());
  auto answer = must_handle(req);
  ASSERT_EQ(answer.status, 200) << answer.body;
  EXPECT_EQ(answer.content_type, "application/octet-stream");
  std::string length;
  for (const auto& [k, v] : answer.headers) {
    if (k == "Inference-Header-Content-Length") length = v;
  }
  ASSERT_FALSE(length.empty());
  const size_t n = std::stoul(length);
  json meta = json::parse(answer.body.substr(0, n));
  EXPECT_EQ(meta["id"], "b");
  ASSERT_EQ(meta["outputs"][0]["parameters"]["binary_data_size"], 12);  // 3 floats
  std::vector<float> probabilities(3);
  std::memcpy(probabilities.data(), answer.body.data() + n, 12);
  EXPECT_FLOAT_EQ(probabilities[0], 0.7f);
  // The extension is advertised; a header that is not a number is refused by name.
  EXPECT_EQ(json::parse(must_handle(request("GET", "/v2")).body)["extensions"],
            json::array({"binary_tensor_data"}));
  req.headers["inference-header-content-length"] = "12abc";
  auto refused = must_handle(req);
  EXPECT_EQ(refused.status, 400);
  EXPECT_EQ(json::parse(refused.body)["field"], "Inference-Header-Content-Length");
}

TEST_F(ServeModelServer, RefusesBadBodiesWith400AndCountsThem) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx")).has_value());
  const int runs = v1->runs.load();

  auto shape = must_handle(request(
      "POST", "/models/clf-dep/infer",
      R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,5],"data":[1,2,3,4,5]}]})"));
  EXPECT_EQ(shape.status, 400);
  json body = json::parse(shape.body);
  EXPECT_EQ(body["field"], "inputs[0].shape");
  EXPECT_NE(body["error"].get<std::string>().find("shape [1,5] does not match the model's [-1,4]"),
            std::string::npos)
      << shape.body;

  auto type = must_handle(request(
      "POST", "/models/clf-dep/infer",
      R"({"inputs":[{"name":"input","datatype":"INT64","shape":[1,4],"data":[1,2,3,4]}]})"));
  EXPECT_EQ(type.status, 400);
  EXPECT_EQ(json::parse(type.body)["field"], "inputs[0].datatype");

  auto not_json = must_handle(request("POST", "/models/clf-dep/infer", "{\"inputs\":"));
  EXPECT_EQ(not_json.status, 400);
  EXPECT_NE(not_json.body.find("not valid JSON"), std::string::npos);

  EXPECT_EQ(v1->runs.load(), runs);  // the model never saw them
  json m = metrics_of("1", "primary");
  EXPECT_EQ(m["invalid_requests"], 3);
  EXPECT_EQ(m["requests"], 3);
  EXPECT_EQ(m["errors"], 0);
  EXPECT_EQ(m["latency_seconds"]["count"], 0);
}

ServiceConfig with_fallback(ServiceConfig c, const std::string& path, double min_confidence = 0) {
  c.fallback = ModelRef{"clf-small", "0.9", path};
  c.min_confidence = min_confidence;
  return c;
}

TEST_F(ServeModelServer, DegradedWhenThePrimaryCannotLoadTheFallbackAnswers) {
  add_model("/m/small.onnx", 9);
  auto note =
      server_.activate(with_fallback(config("clf-dep", "2", "/m/missing.onnx"), "/m/small.onnx"));
  ASSERT_TRUE(note.has_value()) << note.error().message;
  EXPECT_NE(note->find("primary clf 2 cannot be loaded"), std::string::npos) << *note;
  EXPECT_NE(note->find("/m/missing.onnx: not a model file"), std::string::npos) << *note;
  EXPECT_NE(note->find("the fallback clf-small 0.9 answers"), std::string::npos) << *note;

  json services = server_.services("http://127.0.0.1:7410");
  ASSERT_EQ(services.size(), 1u);
  EXPECT_EQ(services[0]["state"], "degraded");
  EXPECT_EQ(services[0]["primary"]["loaded"], false);
  EXPECT_NE(services[0]["primary"]["error"].get<std::string>().find("not a model file"),
            std::string::npos);
  EXPECT_EQ(services[0]["fallback"]["loaded"], true);
  EXPECT_EQ(services[0]["inputs"][0]["name"], "input");  // the fallback's signature

  json answer = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answer["model_name"], "clf-small");
  EXPECT_EQ(answer["model_version"], "0.9");
  EXPECT_EQ(answer["id"], "r1");
  EXPECT_EQ(answered_tag(answer), 9);
  EXPECT_EQ(answer["parameters"]["fallback"], true);
  EXPECT_NE(answer["parameters"]["fallback_reason"].get<std::string>().find("not loaded"),
            std::string::npos)
      << answer.dump();
  EXPECT_EQ(must_handle(request("GET", "/models/clf-dep/ready")).status, 200);
  EXPECT_EQ(json::parse(must_handle(request("GET", "/models/clf-dep")).body)["name"], "clf-small");
  EXPECT_EQ(metrics_of("0.9", "fallback", "clf-small")["requests"], 1);
}

TEST_F(ServeModelServer, WithoutAFallbackAFailedLoadKeepsTheOldVersionServing) {
  // Nothing served yet: the error says which model and why, and nothing answers.
  auto first = server_.activate(config("clf-dep", "1", "/m/missing.onnx"));
  ASSERT_FALSE(first.has_value());
  EXPECT_EQ(first.error().code, Errc::kInvalidArgument);
  EXPECT_NE(first.error().message.find("model clf 1 cannot be loaded"), std::string::npos)
      << first.error().message;
  EXPECT_NE(first.error().message.find("/m/missing.onnx"), std::string::npos);
  EXPECT_EQ(server_.serving_revision("clf-dep"), std::nullopt);
  EXPECT_FALSE(server_.handle(request("POST", "/models/clf-dep/infer", infer_body())));

  auto v1 = add_model("/m/clf-1.onnx", 1);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx", 1)).has_value());
  auto second = server_.activate(config("clf-dep", "2", "/m/missing-2.onnx", 2));
  ASSERT_FALSE(second.has_value());
  EXPECT_NE(second.error().message.find("model clf 2 cannot be loaded"), std::string::npos);
  EXPECT_EQ(server_.serving_revision("clf-dep"), std::optional<int64_t>(1));
  EXPECT_EQ(v1->destroyed.load(), 0);
  json answer = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answer["model_version"], "1");
  EXPECT_EQ(answered_tag(answer), 1);

  // A fallback that cannot load either is no better.
  auto both = server_.activate(
      with_fallback(config("clf-dep", "3", "/m/missing-3.onnx", 3), "/m/missing-small.onnx"));
  ASSERT_FALSE(both.has_value());
  EXPECT_EQ(server_.serving_revision("clf-dep"), std::optional<int64_t>(1));
}

TEST_F(ServeModelServer, ALoadedPrimaryWithABrokenFallbackServesAndSaysSo) {
  add_model("/m/clf-1.onnx", 1);
  auto note = server_.activate(
      with_fallback(config("clf-dep", "1", "/m/clf-1.onnx"), "/m/missing-small.onnx"));
  ASSERT_TRUE(note.has_value());
  EXPECT_NE(note->find("fallback clf-small 0.9 cannot be loaded"), std::string::npos) << *note;
  EXPECT_EQ(server_.services("")[0]["state"], "ready");
  EXPECT_EQ(server_.services("")[0]["fallback"]["loaded"], false);
  EXPECT_EQ(answered_tag(infer_ok("/models/clf-dep/infer")), 1);
}

TEST_F(ServeModelServer, RuntimeErrorGoesToTheFallback) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  auto small = add_model("/m/small.onnx", 9);
  ASSERT_TRUE(
      server_.activate(with_fallback(config("clf-dep", "1", "/m/clf-1.onnx"), "/m/small.onnx"))
          .has_value());
  v1->set_failure("tensor size mismatch in node Gemm_0");

  json answer = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answer["model_name"], "clf-small");
  EXPECT_EQ(answer["model_version"], "0.9");
  EXPECT_EQ(answered_tag(answer), 9);
  EXPECT_EQ(answer["parameters"]["fallback"], true);
  const std::string reason = answer["parameters"]["fallback_reason"];
  EXPECT_NE(reason.find("the primary failed"), std::string::npos) << reason;
  EXPECT_NE(reason.find("Gemm_0"), std::string::npos) << reason;

  json primary = metrics_of("1", "primary");
  EXPECT_EQ(primary["requests"], 1);
  EXPECT_EQ(primary["errors"], 1);
  EXPECT_EQ(primary["fallbacks"], 1);
  json fallback = metrics_of("0.9", "fallback", "clf-small");
  EXPECT_EQ(fallback["requests"], 1);
  EXPECT_EQ(fallback["errors"], 0);
  json services = server_.services("");
  EXPECT_EQ(services[0]["primary"]["errors"], 1);
  EXPECT_EQ(services[0]["primary"]["fallbacks"], 1);

  // Both failing: a 500 that says the fallback failed.
  small->set_failure("out of memory");
  auto both = must_handle(request("POST", "/models/clf-dep/infer", infer_body()));
  EXPECT_EQ(both.status, 500);
  EXPECT_NE(both.body.find("the fallback failed"), std::string::npos) << both.body;
  EXPECT_EQ(metrics_of("0.9", "fallback", "clf-small")["errors"], 1);
}

TEST_F(ServeModelServer, RuntimeErrorWithoutAFallbackIs500) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx")).has_value());
  v1->set_failure("the model failed: bad node");
  auto response = must_handle(request("POST", "/models/clf-dep/infer", infer_body()));
  EXPECT_EQ(response.status, 500);
  EXPECT_NE(json::parse(response.body)["error"].get<std::string>().find("bad node"),
            std::string::npos);
  EXPECT_EQ(metrics_of("1", "primary")["errors"], 1);
  EXPECT_EQ(metrics_of("1", "primary")["fallbacks"], 0);
}

TEST_F(ServeModelServer, LowConfidenceGoesToTheFallback) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  add_model("/m/small.onnx", 9);
  ASSERT_TRUE(
      server_.activate(with_fallback(config("clf-dep", "1", "/m/clf-1.onnx"), "/m/small.onnx", 0.8))
          .has_value());

  v1->set_rows({{0.7f, 0.2f, 0.1f}});
  json low = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answered_tag(low), 9);
  EXPECT_EQ(low["model_name"], "clf-small");
  EXPECT_EQ(low["parameters"]["fallback"], true);
  EXPECT_EQ(low["parameters"]["fallback_reason"], "confidence 0.7 is under 0.8");

  v1->set_rows({{0.05f, 0.9f, 0.05f}});
  json high = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answered_tag(high), 1);
  EXPECT_EQ(high["model_name"], "clf");
  EXPECT_FALSE(high["parameters"].contains("fallback"));
  EXPECT_DOUBLE_EQ(high["parameters"]["confidence"].get<double>(), 0.9f);

  // Exactly at the threshold is confident enough.
  v1->set_rows({{0.8f, 0.1f, 0.1f}});
  EXPECT_EQ(answered_tag(infer_ok("/models/clf-dep/infer")), 1);

  // A batch is as confident as its least confident row.
  v1->set_rows({{0.95f, 0.05f, 0.0f}, {0.5f, 0.3f, 0.2f}});
  EXPECT_EQ(answered_tag(infer_ok("/models/clf-dep/infer", infer_body(2))), 9);
  v1->set_rows({{0.95f, 0.05f, 0.0f}, {0.1f, 0.85f, 0.05f}});
  EXPECT_EQ(answered_tag(infer_ok("/models/clf-dep/infer", infer_body(2))), 1);

  // Outputs that are not probabilities carry no confidence: the primary answers.
  v1->set_rows({{3.0f, -1.0f, 0.1f}});
  json logits = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answered_tag(logits), 1);
  EXPECT_FALSE(logits.contains("parameters"));

  json primary = metrics_of("1", "primary");
  EXPECT_EQ(primary["fallbacks"], 2);
  EXPECT_EQ(primary["errors"], 0);
  EXPECT_EQ(primary["confidence"]["count"], 5);
}

TEST_F(ServeModelServer, LowConfidenceWithAFailingFallbackKeepsThePrimaryAnswer) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  auto small = add_model("/m/small.onnx", 9);
  ASSERT_TRUE(
      server_.activate(with_fallback(config("clf-dep", "1", "/m/clf-1.onnx"), "/m/small.onnx", 0.8))
          .has_value());
  small->set_failure("fallback broke");
  json answer = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answered_tag(answer), 1);
  EXPECT_EQ(answer["model_name"], "clf");
  EXPECT_EQ(answer["id"], "r1");
  EXPECT_NE(answer["parameters"]["fallback_error"].get<std::string>().find("fallback broke"),
            std::string::npos);
  EXPECT_DOUBLE_EQ(answer["parameters"]["confidence"].get<double>(), 0.7f);
}

TEST_F(ServeModelServer, MinConfidenceZeroNeverFallsBack) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  auto small = add_model("/m/small.onnx", 9);
  ASSERT_TRUE(
      server_.activate(with_fallback(config("clf-dep", "1", "/m/clf-1.onnx"), "/m/small.onnx", 0))
          .has_value());
  const int fallback_runs = small->runs.load();
  v1->set_rows({{0.34f, 0.33f, 0.33f}});
  json answer = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(answered_tag(answer), 1);
  EXPECT_DOUBLE_EQ(answer["parameters"]["confidence"].get<double>(), 0.34f);
  EXPECT_EQ(small->runs.load(), fallback_runs);
  EXPECT_EQ(metrics_of("1", "primary")["fallbacks"], 0);
}

TEST_F(ServeModelServer, HotSwapLetsTheRequestInFlightFinishOnTheOldSession) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  auto v2 = add_model("/m/clf-2.onnx", 2);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx", 1)).has_value());

  v1->block();
  std::optional<http::Response> in_flight;
  std::thread client([&] {
    in_flight = server_.handle(request("POST", "/models/clf-dep/infer", infer_body(1, "old")));
  });
  ASSERT_TRUE(v1->wait_until_entered(5s));

  ASSERT_TRUE(server_.activate(config("clf-dep", "2", "/m/clf-2.onnx", 2)).has_value());
  EXPECT_EQ(server_.serving_revision("clf-dep"), std::optional<int64_t>(2));
  EXPECT_EQ(v1->destroyed.load(), 0);  // the request in flight still holds it
  json fresh = infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(fresh["model_version"], "2");
  EXPECT_EQ(answered_tag(fresh), 2);

  v1->release();
  client.join();
  ASSERT_TRUE(in_flight.has_value());
  EXPECT_EQ(in_flight->status, 200) << in_flight->body;
  json old = json::parse(in_flight->body);
  EXPECT_EQ(old["model_version"], "1");
  EXPECT_EQ(old["id"], "old");
  EXPECT_EQ(answered_tag(old), 1);
  // Freed by the last request that held it, and not before.
  EXPECT_EQ(v1->destroyed.load(), 1);
  EXPECT_EQ(v1->alive.load(), 0);
  EXPECT_EQ(v2->alive.load(), 1);

  // With nothing in flight, a swap frees the old session at once.
  add_model("/m/clf-3.onnx", 3);
  ASSERT_TRUE(server_.activate(config("clf-dep", "3", "/m/clf-3.onnx", 3)).has_value());
  EXPECT_EQ(v2->alive.load(), 0);
  EXPECT_EQ(answered_tag(infer_ok("/models/clf-dep/infer")), 3);
  // The old versions' counters stay.
  EXPECT_EQ(metrics_of("1", "primary")["requests"], 1);
  EXPECT_EQ(metrics_of("2", "primary")["requests"], 1);
}

TEST_F(ServeModelServer, SwapsUnderConcurrentRequestsWithoutAFailedAnswer) {
  for (int v = 1; v <= 10; ++v) add_model("/m/clf-" + std::to_string(v) + ".onnx", v);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx", 1)).has_value());
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&] {
      while (!stop.load()) {
        auto response = server_.handle(request("POST", "/models/clf-dep/infer", infer_body()));
        if (!response || response->status != 200) {
          failed.fetch_add(1);
        } else {
          answered.fetch_add(1);
        }
      }
    });
  }
  for (int v = 2; v <= 10; ++v) {
    ASSERT_TRUE(server_
                    .activate(config("clf-dep", std::to_string(v),
                                     "/m/clf-" + std::to_string(v) + ".onnx", v))
                    .has_value());
    std::this_thread::sleep_for(2ms);
  }
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(answered.load(), 0);
  for (int v = 1; v <= 9; ++v)
    EXPECT_EQ(models_["/m/clf-" + std::to_string(v) + ".onnx"]->alive.load(), 0);
  EXPECT_EQ(models_["/m/clf-10.onnx"]->alive.load(), 1);
}

TEST_F(ServeModelServer, RefusesARouteAnotherDeploymentServes) {
  add_model("/m/a.onnx", 1);
  add_model("/m/b.onnx", 2);
  ServiceConfig a = config("dep-a", "1", "/m/a.onnx");
  a.route = "/detect";
  ASSERT_TRUE(server_.activate(a).has_value());
  ServiceConfig b = config("dep-b", "1", "/m/b.onnx");
  b.route = "/detect";
  const int loads = loads_;
  auto conflict = server_.activate(b);
  ASSERT_FALSE(conflict.has_value());
  EXPECT_EQ(conflict.error().code, Errc::kConflict);
  EXPECT_NE(conflict.error().message.find("route /detect is already served for deployment dep-a"),
            std::string::npos)
      << conflict.error().message;
  EXPECT_EQ(loads_, loads);  // refused before loading anything
  EXPECT_EQ(server_.serving_revision("dep-b"), std::nullopt);
  EXPECT_EQ(answered_tag(infer_ok("/detect/infer")), 1);

  // The same deployment may keep its route; another route is fine for the other one.
  ASSERT_TRUE(server_.activate(a).has_value());
  b.route = "/detect-b";
  ASSERT_TRUE(server_.activate(b).has_value());
  EXPECT_EQ(answered_tag(infer_ok("/detect-b/infer")), 2);
  EXPECT_EQ(answered_tag(infer_ok("/v2/models/dep-b/infer")), 2);
}

TEST_F(ServeModelServer, RemoveStopsServing) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  ASSERT_TRUE(server_.activate(config("clf-dep", "1", "/m/clf-1.onnx")).has_value());
  server_.remove("clf-dep");
  server_.remove("never-served");
  EXPECT_EQ(server_.serving_revision("clf-dep"), std::nullopt);
  EXPECT_FALSE(server_.handle(request("POST", "/models/clf-dep/infer", infer_body())));
  EXPECT_EQ(must_handle(request("GET", "/v2/models/clf-dep")).status, 404);
  EXPECT_EQ(json::parse(must_handle(request("GET", "/v2/health/ready")).body)["models"], 0);
  EXPECT_EQ(server_.services(""), json::array());
  EXPECT_EQ(v1->alive.load(), 0);
  // Its counters outlive it.
  EXPECT_EQ(server_.metrics_json().size(), 1u);
}

TEST_F(ServeModelServer, ReportsServicesMetricsAndPrometheus) {
  add_model("/m/clf-1.onnx", 1);
  add_model("/m/small.onnx", 9);
  ServiceConfig c = with_fallback(config("clf-dep", "1", "/m/clf-1.onnx", 4), "/m/small.onnx", 0.5);
  ASSERT_TRUE(server_.activate(c).has_value());
  for (int i = 0; i < 3; ++i) infer_ok("/models/clf-dep/infer");
  EXPECT_EQ(must_handle(request("POST", "/models/clf-dep/infer", "[]")).status, 400);

  json services = server_.services("http://127.0.0.1:7410");
  ASSERT_EQ(services.size(), 1u);
  json& s = services[0];
  EXPECT_EQ(s["deployment"], "clf-dep");
  EXPECT_EQ(s["route"], "/models/clf-dep");
  EXPECT_EQ(s["url"], "http://127.0.0.1:7410/models/clf-dep");
  EXPECT_EQ(s["revision"], 4);
  EXPECT_EQ(s["model"], "clf");
  EXPECT_EQ(s["version"], "1");
  EXPECT_EQ(s["state"], "ready");
  EXPECT_DOUBLE_EQ(s["min_confidence"].get<double>(), 0.5);
  EXPECT_EQ(s["primary"], (json{{"model", "clf"},
                                {"version", "1"},
                                {"loaded", true},
                                {"error", ""},
                                {"requests", 4},
                                {"errors", 0},
                                {"fallbacks", 0}}));
  EXPECT_EQ(s["fallback"]["model"], "clf-small");
  EXPECT_EQ(s["fallback"]["requests"], 0);
  EXPECT_EQ(s["inputs"], json::parse(R"([{"name":"input","datatype":"FP32","shape":[-1,4]}])"));
  EXPECT_EQ(s["outputs"][0]["name"], "probabilities");

  json metrics = server_.metrics_json();
  ASSERT_EQ(metrics.size(), 2u);  // primary and fallback
  json primary = metrics_of("1", "primary");
  EXPECT_EQ(primary["deployment"], "clf-dep");
  EXPECT_EQ(primary["requests"], 4);
  EXPECT_EQ(primary["invalid_requests"], 1);
  EXPECT_EQ(primary["latency_seconds"]["count"], 3);
  EXPECT_EQ(primary["confidence"]["count"], 3);
  EXPECT_EQ(primary["inputs"]["input"]["3"]["n"], 3);
  EXPECT_DOUBLE_EQ(primary["inputs"]["input"]["3"]["mean"].get<double>(), 3.0);

  const std::string text = server_.prometheus();
  EXPECT_NE(text.find("# TYPE outpost_models_served gauge\noutpost_models_served 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("outpost_inference_requests_total{deployment=\"clf-dep\",model=\"clf\","
                      "version=\"1\",role=\"primary\"} 4\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("outpost_inference_invalid_requests_total{deployment=\"clf-dep\","
                      "model=\"clf\",version=\"1\",role=\"primary\"} 1\n"),
            std::string::npos);
  EXPECT_NE(text.find("role=\"fallback\"} 0\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE outpost_inference_latency_seconds histogram"), std::string::npos);
}

TEST_F(ServeModelServer, AppliesItsProtocolLimitsToRequests) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  ProtocolLimits limits;
  limits.max_elements = 4;
  ModelServer small_server(loader(), limits);
  ASSERT_TRUE(small_server.activate(config("clf-dep", "1", "/m/clf-1.onnx")).has_value());
  auto one = small_server.handle(request("POST", "/models/clf-dep/infer", infer_body(1)));
  ASSERT_TRUE(one.has_value());
  EXPECT_EQ(one->status, 200);
  auto two = small_server.handle(request("POST", "/models/clf-dep/infer", infer_body(2)));
  ASSERT_TRUE(two.has_value());
  EXPECT_EQ(two->status, 400);
  EXPECT_NE(two->body.find("holds more than 4 values"), std::string::npos) << two->body;
}

TEST_F(ServeModelServer, WarmUpRunsZerosAndAFailingWarmUpIsNotFatal) {
  auto v1 = add_model("/m/clf-1.onnx", 1);
  v1->set_failure("cannot warm up");
  auto note = server_.activate(config("clf-dep", "1", "/m/clf-1.onnx"));
  ASSERT_TRUE(note.has_value()) << note.error().message;
  EXPECT_EQ(v1->runs.load(), 1);
  v1->set_failure("");
  EXPECT_EQ(answered_tag(infer_ok("/models/clf-dep/infer")), 1);
}

}  // namespace
}  // namespace outpost::agent::serve
