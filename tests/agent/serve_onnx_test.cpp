// ONNX Runtime behind InferenceSession, for real: generated classifiers with known answers
// (single rows, batches, many threads), refused files, the model server end to end over JSON,
// and the Silero VAD models that scripts/install-onnxruntime installs beside the runtime.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "agent/serve/inference_protocol.h"
#include "agent/serve/model_server.h"
#include "agent/serve/onnx_session.h"
#include "common/onnx/onnx_builder.h"
#include "test_support.h"

namespace outpost::agent::serve {
namespace {

using json = nlohmann::json;
using test_support::TempDir;

constexpr double kTolerance = 1e-5;

Tensor fp32(std::string name, std::vector<int64_t> shape, const std::vector<float>& values) {
  Tensor t;
  t.name = std::move(name);
  t.type = DataType::kFp32;
  t.shape = std::move(shape);
  t.data.resize(values.size() * sizeof(float));
  if (!values.empty()) std::memcpy(t.data.data(), values.data(), t.data.size());
  return t;
}

std::vector<float> floats_of(const Tensor& t) {
  EXPECT_EQ(t.type, DataType::kFp32);
  std::vector<float> out(t.data.size() / sizeof(float));
  if (!out.empty()) std::memcpy(out.data(), t.data.data(), out.size() * sizeof(float));
  return out;
}

// Row r of a deterministic input, `width` values in [-2, 2).
std::vector<float> row_of(int r, int64_t width) {
  std::vector<float> row;
  for (int64_t i = 0; i < width; ++i) {
    row.push_back(static_cast<float>(((r * 7 + i * 3) % 16) - 8) / 4.0f);
  }
  return row;
}

std::string signature(const std::vector<TensorSpec>& specs) {
  std::string out;
  for (const auto& s : specs) {
    out += s.name + " " + std::string(datatype_name(s.type)) + " " +
           (s.rank_known ? shape_text(s.shape) : "[...]") + "; ";
  }
  return out;
}

class ServeOnnx : public ::testing::Test {
 protected:
  // Writes a generated classifier to the temp dir and loads it.
  std::shared_ptr<InferenceSession> load_classifier(const onnx::ClassifierSpec& spec,
                                                    const std::string& file = "clf.onnx") {
    const std::string path = dir_.file(file);
    test_support::write_text(path, onnx::build_classifier_onnx(spec));
    auto session = load_onnx_session(path, SessionOptions{});
    EXPECT_TRUE(session.has_value()) << session.error().message;
    return session ? *session : nullptr;
  }

  // Runs rows through the session as one batch and checks each against the reference.
  void expect_reference_answers(InferenceSession& session, const onnx::ClassifierSpec& spec,
                                const std::vector<int>& rows) {
    std::vector<float> batch;
    for (int r : rows) {
      const auto row = row_of(r, spec.inputs);
      batch.insert(batch.end(), row.begin(), row.end());
    }
    const auto n = static_cast<int64_t>(rows.size());
    auto out = session.run({fp32(spec.input_name, {n, spec.inputs}, batch)}, {});
    ASSERT_TRUE(out.has_value()) << out.error().message;
    ASSERT_EQ(out->size(), 1u);
    EXPECT_EQ((*out)[0].name, spec.output_name);
    EXPECT_EQ((*out)[0].shape, (std::vector<int64_t>{n, spec.classes}));
    const auto got = floats_of((*out)[0]);
    ASSERT_EQ(got.size(), static_cast<size_t>(n * spec.classes));
    for (size_t k = 0; k < rows.size(); ++k) {
      const auto want = onnx::classifier_reference(spec, row_of(rows[k], spec.inputs));
      ASSERT_EQ(want.size(), static_cast<size_t>(spec.classes));
      for (int64_t c = 0; c < spec.classes; ++c) {
        EXPECT_NEAR(got[k * static_cast<size_t>(spec.classes) + static_cast<size_t>(c)],
                    want[static_cast<size_t>(c)], kTolerance)
            << "row " << rows[k] << " class " << c;
      }
    }
  }

  TempDir dir_;
};

TEST_F(ServeOnnx, RuntimeIsTheBundledVersion) {
  auto version = onnxruntime_version();
  ASSERT_TRUE(version.has_value()) << version.error().message;
  EXPECT_EQ(*version, "1.30.0");
  EXPECT_TRUE(onnxruntime_loaded());
}

TEST_F(ServeOnnx, DeclaresTheClassifiersInputsAndOutputs) {
  const onnx::ClassifierSpec spec;
  auto session = load_classifier(spec);
  ASSERT_TRUE(session);
  ASSERT_EQ(session->inputs().size(), 1u);
  const TensorSpec& in = session->inputs()[0];
  EXPECT_EQ(in.name, "input");
  EXPECT_EQ(in.type, DataType::kFp32);
  EXPECT_EQ(in.shape, (std::vector<int64_t>{-1, 4}));
  EXPECT_TRUE(in.rank_known);
  ASSERT_EQ(session->outputs().size(), 1u);
  const TensorSpec& out = session->outputs()[0];
  EXPECT_EQ(out.name, "probabilities");
  EXPECT_EQ(out.type, DataType::kFp32);
  EXPECT_EQ(out.shape, (std::vector<int64_t>{-1, 3}));

  onnx::ClassifierSpec other;
  other.inputs = 6;
  other.classes = 5;
  other.input_name = "features";
  other.output_name = "scores";
  auto renamed = load_classifier(other, "other.onnx");
  ASSERT_TRUE(renamed);
  EXPECT_EQ(signature(renamed->inputs()), "features FP32 [-1,6]; ");
  EXPECT_EQ(signature(renamed->outputs()), "scores FP32 [-1,5]; ");
}

TEST_F(ServeOnnx, RunsRowsAndBatchesLikeTheReference) {
  const onnx::ClassifierSpec spec;
  auto session = load_classifier(spec);
  ASSERT_TRUE(session);
  for (int r : {0, 1, 2, 5, 11}) expect_reference_answers(*session, spec, {r});
  expect_reference_answers(*session, spec, {3, 4, 9});

  // Another shape and seed, so no single fixed answer passes.
  onnx::ClassifierSpec wide;
  wide.inputs = 10;
  wide.hidden = 16;
  wide.classes = 7;
  wide.seed = 42;
  wide.input_name = "features";
  wide.output_name = "scores";
  auto other = load_classifier(wide, "wide.onnx");
  ASSERT_TRUE(other);
  expect_reference_answers(*other, wide, {0, 1, 2, 3, 4, 5, 6, 7});

  // The same row alone or inside a batch gives the same floats.
  auto alone = session->run({fp32("input", {1, 4}, row_of(4, 4))}, {"probabilities"});
  auto batch_rows = row_of(3, 4);
  for (float v : row_of(4, 4)) batch_rows.push_back(v);
  auto together = session->run({fp32("input", {2, 4}, batch_rows)}, {});
  ASSERT_TRUE(alone && together);
  const auto a = floats_of((*alone)[0]);
  const auto t = floats_of((*together)[0]);
  for (size_t c = 0; c < 3; ++c) EXPECT_NEAR(a[c], t[3 + c], kTolerance);
}

TEST_F(ServeOnnx, RunsFromManyThreadsAtOnce) {
  const onnx::ClassifierSpec spec;
  auto session = load_classifier(spec);
  ASSERT_TRUE(session);
  std::atomic<int> wrong{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        const int r = t * 50 + i;
        auto out = session->run({fp32("input", {1, 4}, row_of(r, 4))}, {});
        if (!out) {
          failed.fetch_add(1);
          continue;
        }
        const auto got = floats_of((*out)[0]);
        const auto want = onnx::classifier_reference(spec, row_of(r, 4));
        for (size_t c = 0; c < want.size(); ++c) {
          if (got.size() != want.size() || std::fabs(got[c] - want[c]) > kTolerance) {
            wrong.fetch_add(1);
            break;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
}

TEST_F(ServeOnnx, ReportsRunErrorsInsteadOfCrashing) {
  auto session = load_classifier(onnx::ClassifierSpec{});
  ASSERT_TRUE(session);
  auto none = session->run({}, {});
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code, Errc::kInvalidArgument);
  EXPECT_NE(none.error().message.find("expected 1 inputs, got 0"), std::string::npos);
  // Five values a row where the model takes four: the runtime refuses, the session says so.
  auto wide = session->run({fp32("input", {1, 5}, {1, 2, 3, 4, 5})}, {});
  ASSERT_FALSE(wide.has_value());
  EXPECT_EQ(wide.error().code, Errc::kInternal);
  EXPECT_NE(wide.error().message.find("the model failed"), std::string::npos)
      << wide.error().message;
}

TEST_F(ServeOnnx, RefusesFilesThatAreNotModelsNamingThePath) {
  const std::string garbage = dir_.file("garbage.onnx");
  test_support::write_text(garbage, "this is not a protobuf \x01\x02\x03 at all");
  auto refused = load_onnx_session(garbage, SessionOptions{});
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(refused.error().message.rfind("model " + garbage + ": ", 0), 0u)
      << refused.error().message;

  const std::string truncated = dir_.file("truncated.onnx");
  const std::string whole = onnx::build_classifier_onnx(onnx::ClassifierSpec{});
  test_support::write_text(truncated, whole.substr(0, whole.size() / 2));
  auto cut = load_onnx_session(truncated, SessionOptions{});
  ASSERT_FALSE(cut.has_value());
  EXPECT_EQ(cut.error().code, Errc::kInvalidArgument);
  EXPECT_NE(cut.error().message.find(truncated), std::string::npos);

  const std::string missing = dir_.file("missing.onnx");
  auto absent = load_onnx_session(missing, SessionOptions{});
  ASSERT_FALSE(absent.has_value());
  EXPECT_NE(absent.error().message.find(missing), std::string::npos);
}

http::Request post(const std::string& path, std::string body) {
  http::Request r;
  r.method = "POST";
  r.path = path;
  r.target = path;
  r.body = std::move(body);
  return r;
}

TEST_F(ServeOnnx, ModelServerAnswersJsonWithTheReferenceProbabilities) {
  onnx::ClassifierSpec spec;
  spec.seed = 7;
  const std::string path = dir_.file("clf.onnx");
  test_support::write_text(path, onnx::build_classifier_onnx(spec));
  ModelServer server(load_onnx_session);
  ServiceConfig config;
  config.deployment = "clf-dep";
  config.route = "/models/clf-dep";
  config.primary = ModelRef{"clf", "1.0.0", path};
  auto note = server.activate(config);
  ASSERT_TRUE(note.has_value()) << note.error().message;
  EXPECT_EQ(*note, "");

  std::vector<float> rows = row_of(1, 4);
  for (float v : row_of(2, 4)) rows.push_back(v);
  json body = {{"id", "e2e"},
               {"inputs",
                {{{"name", "input"},
                  {"datatype", "FP32"},
                  {"shape", {2, 4}},
                  {"data", {row_of(1, 4), row_of(2, 4)}}}}}};
  auto response = server.handle(post("/models/clf-dep/infer", body.dump()));
  ASSERT_TRUE(response.has_value());
  ASSERT_EQ(response->status, 200) << response->body;
  json answer = json::parse(response->body);
  EXPECT_EQ(answer["model_name"], "clf");
  EXPECT_EQ(answer["model_version"], "1.0.0");
  EXPECT_EQ(answer["id"], "e2e");
  json& out = answer["outputs"][0];
  EXPECT_EQ(out["name"], "probabilities");
  EXPECT_EQ(out["datatype"], "FP32");
  EXPECT_EQ(out["shape"], json::array({2, 3}));
  ASSERT_EQ(out["data"].size(), 6u);
  double lowest_top = 1.0;
  for (int r = 0; r < 2; ++r) {
    const auto want = onnx::classifier_reference(spec, row_of(r + 1, 4));
    float top = 0;
    for (size_t c = 0; c < 3; ++c) {
      EXPECT_NEAR(out["data"][static_cast<size_t>(r) * 3 + c].get<double>(), want[c], kTolerance);
      top = std::max(top, want[c]);
    }
    lowest_top = std::min<double>(lowest_top, top);
  }
  EXPECT_NEAR(answer["parameters"]["confidence"].get<double>(), lowest_top, kTolerance);

  // The JSON answer is the session's own floats, bit for bit.
  auto session = load_onnx_session(path, SessionOptions{});
  ASSERT_TRUE(session.has_value());
  auto direct = (*session)->run({fp32("input", {2, 4}, rows)}, {});
  ASSERT_TRUE(direct.has_value());
  const auto expected = floats_of((*direct)[0]);
  for (size_t i = 0; i < expected.size(); ++i) {
    const float got = static_cast<float>(out["data"][i].get<double>());
    EXPECT_EQ(std::memcmp(&got, &expected[i], sizeof got), 0) << i;
  }

  // A malformed body is the protocol's 400, not a runtime error.
  auto bad = server.handle(
      post("/v2/models/clf/infer",
           R"({"inputs":[{"name":"input","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]})"));
  ASSERT_TRUE(bad.has_value());
  EXPECT_EQ(bad->status, 400);
  EXPECT_EQ(json::parse(bad->body)["field"], "inputs[0].shape");
}

// ---------------------------------------------------------------------------------------------
// Silero VAD

std::string model_path(const std::string& name) {
  return std::string(OUTPOST_MODELS_DIR) + "/" + name;
}

// A request of zeros for every input (dynamic dimensions 1, "input" 512 samples) and sr=16000,
// as JSON and as the tensors it stands for.
struct ZeroRequest {
  std::string body;
  std::vector<Tensor> tensors;
};

ZeroRequest zero_request(const std::vector<TensorSpec>& inputs) {
  ZeroRequest out;
  json list = json::array();
  for (const auto& spec : inputs) {
    Tensor t;
    t.name = spec.name;
    t.type = spec.type;
    for (size_t i = 0; i < spec.shape.size(); ++i) {
      const int64_t d = spec.shape[i];
      t.shape.push_back(d >= 0 ? d : (spec.name == "input" && i == 1 ? 512 : 1));
    }
    size_t count = 1;
    for (int64_t d : t.shape) count *= static_cast<size_t>(d);
    t.data.assign(count * datatype_size(t.type), 0);
    json data = json::array();
    if (spec.name == "sr") {
      EXPECT_EQ(spec.type, DataType::kInt64);
      const int64_t rate = 16000;
      for (size_t i = 0; i < count; ++i) {
        std::memcpy(t.data.data() + i * sizeof rate, &rate, sizeof rate);
        data.push_back(rate);
      }
    } else {
      for (size_t i = 0; i < count; ++i) data.push_back(0.0);
    }
    list.push_back({{"name", t.name},
                    {"datatype", std::string(datatype_name(t.type))},
                    {"shape", t.shape},
                    {"data", data}});
    out.tensors.push_back(std::move(t));
  }
  out.body = json{{"inputs", list}}.dump();
  return out;
}

// Serves `file` through the model server and checks the answer to 512 zeros against the
// session run directly on the same tensors.
void check_silero(const std::string& file, const std::string& expected_inputs,
                  const std::string& expected_outputs, json expected_shapes) {
  const std::string path = model_path(file);
  ASSERT_TRUE(std::filesystem::exists(path))
      << path << " is missing: run scripts/install-onnxruntime";
  auto session = load_onnx_session(path, SessionOptions{});
  ASSERT_TRUE(session.has_value()) << session.error().message;
  EXPECT_EQ(signature((*session)->inputs()), expected_inputs);
  EXPECT_EQ(signature((*session)->outputs()), expected_outputs);

  ModelServer server(load_onnx_session);
  ServiceConfig config;
  config.deployment = "vad";
  config.route = "/vad";
  config.primary = ModelRef{"silero-vad", file, path};
  ASSERT_TRUE(server.activate(config).has_value());

  const ZeroRequest request = zero_request((*session)->inputs());
  auto response = server.handle(post("/vad/infer", request.body));
  ASSERT_TRUE(response.has_value());
  ASSERT_EQ(response->status, 200) << response->body;
  json answer = json::parse(response->body);
  ASSERT_EQ(answer["outputs"].size(), (*session)->outputs().size());

  auto direct = (*session)->run(request.tensors, {});
  ASSERT_TRUE(direct.has_value()) << direct.error().message;
  for (size_t k = 0; k < direct->size(); ++k) {
    const Tensor& want = (*direct)[k];
    json& got = answer["outputs"][k];
    SCOPED_TRACE(want.name);
    EXPECT_EQ(got["name"], want.name);
    EXPECT_EQ(got["datatype"], "FP32");
    EXPECT_EQ(got["shape"], json(want.shape));
    const auto values = floats_of(want);
    ASSERT_EQ(got["data"].size(), values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      // Bit for bit, the sign of zero included (written "-0.0": "-0" would read as the
      // integer 0).
      const float f = static_cast<float>(got["data"][i].get<double>());
      ASSERT_EQ(std::memcmp(&f, &values[i], sizeof f), 0)
          << i << ": " << got["data"][i].dump() << " vs " << values[i];
    }
  }
  for (size_t k = 0; k < expected_shapes.size(); ++k) {
    EXPECT_EQ(answer["outputs"][k]["shape"], expected_shapes[k]) << k;
  }
  // The speech probability of silence: one value per batch row, a probability.
  json& probability = answer["outputs"][0];
  EXPECT_EQ(probability["name"], "output");
  EXPECT_EQ(probability["shape"], json::array({1, 1}));
  const double p = probability["data"][0].get<double>();
  EXPECT_GE(p, 0.0);
  EXPECT_LE(p, 1.0);
  EXPECT_LT(p, 0.5) << "silence should not read as speech";
}

TEST(ServeOnnxSilero, V5AnswersThroughTheModelServerLikeTheSession) {
  check_silero("silero_vad_v5.onnx", "input FP32 [-1,-1]; state FP32 [2,-1,128]; sr INT64 []; ",
               "output FP32 [-1,1]; stateN FP32 [-1,-1,-1]; ", json::parse("[[1,1],[2,1,128]]"));
}

TEST(ServeOnnxSilero, V4AnswersThroughTheModelServerLikeTheSession) {
  check_silero("silero_vad_v4.onnx",
               "input FP32 [-1,-1]; sr INT64 []; h FP32 [2,-1,64]; c FP32 [2,-1,64]; ",
               "output FP32 [-1,1]; hn FP32 [2,-1,64]; cn FP32 [2,-1,64]; ",
               json::parse("[[1,1],[2,1,64],[2,1,64]]"));
}

}  // namespace
}  // namespace outpost::agent::serve
