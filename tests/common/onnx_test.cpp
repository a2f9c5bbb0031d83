#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/onnx/onnx_builder.h"
#include "common/onnx/onnx_model.h"
#include "common/onnx/protobuf_wire.h"

namespace outpost::onnx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// ---- Hand-built models, for the cases the builder never produces ----

struct Dim {
  int64_t value = -1;  // written as dim_value when >= 0
  std::string param;   // written as dim_param when not empty
};

WireWriter value_info(std::string_view name, int64_t elem_type, const std::vector<Dim>& dims,
                      bool with_shape = true) {
  WireWriter shape;
  for (const auto& dim : dims) {
    WireWriter d;
    if (dim.value >= 0) d.add_int64(1, dim.value);
    if (!dim.param.empty()) d.add_bytes(2, dim.param);
    shape.add_message(1, d);
  }
  WireWriter tensor_type;
  tensor_type.add_int64(1, elem_type);
  if (with_shape) tensor_type.add_message(2, shape);
  WireWriter type;
  type.add_message(1, tensor_type);
  WireWriter info;
  info.add_bytes(1, name);
  info.add_message(2, type);
  return info;
}

WireWriter opset(std::string_view domain, int64_t version) {
  WireWriter w;
  w.add_bytes(1, domain);
  w.add_int64(2, version);
  return w;
}

WireWriter initializer(std::string_view name) {
  WireWriter w;
  w.add_int64(1, 1);
  w.add_int64(2, 1);
  w.add_bytes(8, name);
  w.add_bytes(9, std::string(4, '\0'));
  return w;
}

WireWriter relu_node(std::string_view in, std::string_view out) {
  WireWriter w;
  w.add_bytes(1, in);
  w.add_bytes(2, out);
  w.add_bytes(4, "Relu");
  return w;
}

struct ModelParts {
  bool has_ir_version = true;
  int64_t ir_version = 8;
  bool has_graph = true;
  std::vector<WireWriter> opsets = {opset("", 13)};
  std::vector<WireWriter> inputs = {value_info("x", 1, {{-1, "n"}, {3, ""}})};
  std::vector<WireWriter> outputs = {value_info("y", 1, {{-1, "n"}, {3, ""}})};
  std::vector<WireWriter> initializers;
  std::vector<WireWriter> nodes = {relu_node("x", "y")};
};

std::string model_bytes(const ModelParts& parts) {
  WireWriter graph;
  for (const auto& node : parts.nodes) graph.add_message(1, node);
  graph.add_bytes(2, "g");
  for (const auto& init : parts.initializers) graph.add_message(5, init);
  for (const auto& input : parts.inputs) graph.add_message(11, input);
  for (const auto& output : parts.outputs) graph.add_message(12, output);
  WireWriter model;
  if (parts.has_ir_version) model.add_int64(1, parts.ir_version);
  model.add_bytes(2, "test");
  if (parts.has_graph) model.add_message(7, graph);
  for (const auto& o : parts.opsets) model.add_message(8, o);
  return model.release();
}

std::string refusal(std::string_view bytes) {
  auto info = parse_onnx_model(bytes);
  EXPECT_FALSE(info) << "accepted " << bytes.size() << " bytes";
  if (info) return {};
  EXPECT_EQ(info.error().code, Errc::kInvalidArgument);
  return info.error().message;
}

// ---- Protobuf wire format ----

TEST(ProtobufWire, VarintsRoundTripAtEveryWidth) {
  const std::vector<uint64_t> values = {0,
                                        1,
                                        127,
                                        128,
                                        300,
                                        16383,
                                        16384,
                                        (1ull << 35) + 7,
                                        1ull << 63,
                                        UINT64_MAX,
                                        static_cast<uint64_t>(-1LL)};
  WireWriter w;
  for (size_t i = 0; i < values.size(); ++i) w.add_varint(static_cast<uint32_t>(i + 1), values[i]);
  w.add_int64(100, -5);
  WireReader r(w.bytes());
  for (size_t i = 0; i < values.size(); ++i) {
    auto f = r.next();
    ASSERT_TRUE(f) << f.error().message;
    EXPECT_EQ(f->number, i + 1);
    EXPECT_EQ(f->type, WireType::kVarint);
    EXPECT_EQ(f->value, values[i]);
  }
  auto negative = r.next();
  ASSERT_TRUE(negative);
  EXPECT_EQ(negative->number, 100u);
  EXPECT_EQ(negative->as_int64(), -5);
  EXPECT_TRUE(r.at_end());
}

TEST(ProtobufWire, ReadsEveryWireTypeWithAbsoluteOffsets) {
  WireWriter inner;
  inner.add_varint(1, 42);
  WireWriter w;
  w.add_fixed32(2, 0xdeadbeef);
  w.add_float(3, 1.5f);
  w.add_bytes(4, "hi");
  w.add_message(5, inner);
  WireReader r(w.bytes());
  auto fixed = r.next();
  ASSERT_TRUE(fixed);
  EXPECT_EQ(fixed->type, WireType::kFixed32);
  EXPECT_EQ(fixed->value, 0xdeadbeefu);
  auto f = r.next();
  ASSERT_TRUE(f);
  float decoded = 0;
  const auto bits = static_cast<uint32_t>(f->value);
  std::memcpy(&decoded, &bits, sizeof(decoded));
  EXPECT_EQ(decoded, 1.5f);
  auto s = r.next();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->bytes, "hi");
  EXPECT_EQ(s->offset, 10u);  // 5 (fixed32) + 5 (float)
  EXPECT_EQ(s->payload_offset, 12u);
  auto m = r.next();
  ASSERT_TRUE(m);
  auto nested = r.nested(*m);
  ASSERT_TRUE(nested);
  EXPECT_EQ(nested->offset(), m->payload_offset);
  auto v = nested->next();
  ASSERT_TRUE(v);
  EXPECT_EQ(v->value, 42u);
  EXPECT_EQ(v->offset, m->payload_offset);
}

TEST(ProtobufWire, RefusesMalformedInputNamingTheOffset) {
  struct Case {
    std::string bytes;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {std::string("\x08", 1), "truncated varint value of field 1 at byte offset 1"},
      {std::string("\x08\x80\x80", 3), "the data ends inside it"},
      {"\x08" + std::string(10, '\x80') + "\x01", "longer than 10 bytes"},
      {"\x08" + std::string(9, '\xff') + "\x02", "overflows 64 bits"},
      {std::string("\x0a\x05"
                   "abc",
                   5),
       "length 5 of field 1 at byte offset 0 runs past"},
      {std::string("\x0a\xff\xff\xff\xff\x0f", 6), "runs past the end"},
      {std::string("\x0b", 1), "wire type 3 (group)"},
      {std::string("\x0c", 1), "wire type 4 (group)"},
      {std::string("\x0e", 1), "unknown wire type 6"},
      {std::string("\x0f", 1), "unknown wire type 7"},
      {std::string("\x00\x00", 2), "field number 0 at byte offset 0"},
      {std::string("\x0d\x01\x02", 3), "fixed32 field 1 at byte offset 0 needs 4 bytes"},
      {std::string("\x09\x01\x02\x03", 4), "fixed64 field 1 at byte offset 0 needs 8 bytes"},
      {std::string("\xf8\xff\xff\xff\xff\x01", 6), "out of range"},
  };
  for (const auto& c : cases) {
    WireReader r(c.bytes);
    auto f = r.next();
    ASSERT_FALSE(f) << c.expected;
    EXPECT_THAT(f.error().message, HasSubstr(c.expected));
    EXPECT_EQ(r.offset(), 0u) << "a failed read must not advance";
  }
}

TEST(ProtobufWire, OffsetsInNestedErrorsAreAbsolute) {
  WireWriter w;
  w.add_varint(1, 7);
  w.add_bytes(2, std::string("\x12\x09", 2));  // nested field claims 9 bytes, has 0
  WireReader r(w.bytes());
  ASSERT_TRUE(r.next());
  auto m = r.next();
  ASSERT_TRUE(m);
  auto nested = r.nested(*m);
  ASSERT_TRUE(nested);
  auto bad = nested->next();
  ASSERT_FALSE(bad);
  EXPECT_THAT(bad.error().message, HasSubstr("field 2 at byte offset 4"));
}

TEST(ProtobufWire, RefusesNestingDeeperThanTheLimit) {
  std::string message = std::string("\x08\x01", 2);
  for (int i = 0; i < WireReader::kMaxDepth + 1; ++i) {
    WireWriter outer;
    outer.add_bytes(1, message);
    message = outer.release();
  }
  WireReader reader(message);
  std::string error;
  for (int depth = 0;; ++depth) {
    ASSERT_LE(depth, WireReader::kMaxDepth + 1);
    auto field = reader.next();
    ASSERT_TRUE(field);
    if (field->type != WireType::kLen) break;
    auto nested = reader.nested(*field);
    if (!nested) {
      error = nested.error().message;
      EXPECT_EQ(depth, WireReader::kMaxDepth);
      break;
    }
    reader = *nested;
  }
  EXPECT_THAT(error, HasSubstr("nested deeper than 32 levels"));
}

TEST(ProtobufWire, NestedRefusesNonMessageFields) {
  WireWriter w;
  w.add_varint(7, 1);
  WireReader r(w.bytes());
  auto f = r.next();
  ASSERT_TRUE(f);
  auto nested = r.nested(*f);
  ASSERT_FALSE(nested);
  EXPECT_THAT(nested.error().message, HasSubstr("expected a length-delimited message"));
}

// ---- Builder round trip ----

TEST(OnnxBuilder, DefaultClassifierRoundTripsThroughTheReader) {
  const std::string bytes = build_classifier_onnx({});
  auto info = parse_onnx_model(bytes);
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(info->ir_version, 8);
  EXPECT_EQ(info->producer_name, "outpost");
  ASSERT_EQ(info->opsets.size(), 1u);
  EXPECT_EQ(info->opsets[0].first, "");
  EXPECT_EQ(info->opsets[0].second, 13);
  EXPECT_EQ(default_opset(*info), 13);
  EXPECT_EQ(info->node_count, 4u);
  EXPECT_EQ(info->initializer_count, 4u);
  ASSERT_EQ(info->inputs.size(), 1u) << "initializers are not graph inputs";
  EXPECT_EQ(info->inputs[0].name, "input");
  EXPECT_EQ(info->inputs[0].elem_type, "FLOAT");
  EXPECT_TRUE(info->inputs[0].has_shape);
  EXPECT_THAT(info->inputs[0].shape, ElementsAre(-1, 4));
  EXPECT_THAT(info->inputs[0].dim_names, ElementsAre("batch", ""));
  ASSERT_EQ(info->outputs.size(), 1u);
  EXPECT_EQ(info->outputs[0].name, "probabilities");
  EXPECT_EQ(info->outputs[0].elem_type, "FLOAT");
  EXPECT_THAT(info->outputs[0].shape, ElementsAre(-1, 3));

  const nlohmann::json json = to_json(*info);
  EXPECT_EQ(json["ir_version"], 8);
  EXPECT_EQ(json["opset"], 13);
  EXPECT_EQ(json["opsets"], nlohmann::json::parse(R"([{"domain":"","version":13}])"));
  EXPECT_EQ(json["producer"], "outpost");
  EXPECT_EQ(json["nodes"], 4);
  EXPECT_EQ(json["initializers"], 4);
  EXPECT_EQ(json["inputs"][0], nlohmann::json::parse(
                                   R"({"name":"input","type":"FLOAT","shape":[-1,4],
                                       "dim_names":["batch",""]})"));
  EXPECT_EQ(json["outputs"][0]["shape"], nlohmann::json::parse("[-1,3]"));
}

TEST(OnnxBuilder, CustomSizesNamesAndOpsetRoundTrip) {
  ClassifierSpec spec;
  spec.inputs = 17;
  spec.hidden = 5;
  spec.classes = 11;
  spec.seed = 99;
  spec.input_name = "pixels";
  spec.output_name = "scores";
  spec.opset = 17;
  auto info = parse_onnx_model(build_classifier_onnx(spec));
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(default_opset(*info), 17);
  ASSERT_EQ(info->inputs.size(), 1u);
  EXPECT_EQ(info->inputs[0].name, "pixels");
  EXPECT_THAT(info->inputs[0].shape, ElementsAre(-1, 17));
  ASSERT_EQ(info->outputs.size(), 1u);
  EXPECT_EQ(info->outputs[0].name, "scores");
  EXPECT_THAT(info->outputs[0].shape, ElementsAre(-1, 11));
}

TEST(OnnxBuilder, SameSpecGivesSameBytesAndSeedsDiffer) {
  ClassifierSpec a;
  ClassifierSpec b;
  b.seed = 2;
  EXPECT_EQ(build_classifier_onnx(a), build_classifier_onnx(a));
  EXPECT_NE(build_classifier_onnx(a), build_classifier_onnx(b));
}

// Decodes the built model with the wire reader alone and checks the graph an ONNX runtime
// will see: node order and op types, Softmax's axis, initializer names, dims and data.
struct DecodedClassifier {
  std::vector<std::string> op_types;
  std::vector<std::vector<std::string>> node_inputs;
  std::vector<std::string> node_outputs;
  int64_t softmax_axis = 0;
  int64_t softmax_axis_type = 0;
  std::map<std::string, std::vector<int64_t>> dims;
  std::map<std::string, std::vector<float>> data;
  std::map<std::string, int64_t> data_type;
};

DecodedClassifier decode(const std::string& bytes) {
  DecodedClassifier out;
  WireReader model(bytes);
  while (!model.at_end()) {
    auto f = model.next();
    EXPECT_TRUE(f);
    if (!f) return out;
    if (f->number != 7) continue;
    auto graph = model.nested(*f);
    while (!graph->at_end()) {
      auto g = graph->next();
      EXPECT_TRUE(g);
      if (!g) return out;
      if (g->number == 1) {  // node
        auto node = graph->nested(*g);
        std::vector<std::string> inputs;
        while (!node->at_end()) {
          auto n = node->next();
          if (n->number == 1) inputs.emplace_back(n->bytes);
          if (n->number == 2) out.node_outputs.emplace_back(n->bytes);
          if (n->number == 4) out.op_types.emplace_back(n->bytes);
          if (n->number == 5) {
            auto attr = node->nested(*n);
            while (!attr->at_end()) {
              auto a = attr->next();
              if (a->number == 1) {
                EXPECT_EQ(a->bytes, "axis");
              }
              if (a->number == 3) out.softmax_axis = a->as_int64();
              if (a->number == 20) out.softmax_axis_type = a->as_int64();
            }
          }
        }
        out.node_inputs.push_back(inputs);
      } else if (g->number == 5) {  // initializer
        auto tensor = graph->nested(*g);
        std::string name;
        std::vector<int64_t> dims;
        std::vector<float> values;
        int64_t type = 0;
        while (!tensor->at_end()) {
          auto t = tensor->next();
          if (t->number == 1) dims.push_back(t->as_int64());
          if (t->number == 2) type = t->as_int64();
          if (t->number == 8) name = t->bytes;
          if (t->number == 9) {
            EXPECT_EQ(t->bytes.size() % 4, 0u);
            for (size_t i = 0; i + 4 <= t->bytes.size(); i += 4) {
              uint32_t bits = 0;
              for (int k = 0; k < 4; ++k) {
                bits |= static_cast<uint32_t>(static_cast<uint8_t>(t->bytes[i + k])) << (8 * k);
              }
              float v = 0;
              std::memcpy(&v, &bits, sizeof(v));
              values.push_back(v);
            }
          }
        }
        out.dims[name] = dims;
        out.data[name] = values;
        out.data_type[name] = type;
      }
    }
  }
  return out;
}

TEST(OnnxBuilder, GraphIsGemmReluGemmSoftmaxWithCorrectInitializers) {
  ClassifierSpec spec;
  spec.inputs = 6;
  spec.hidden = 5;
  spec.classes = 4;
  const DecodedClassifier model = decode(build_classifier_onnx(spec));
  EXPECT_THAT(model.op_types, ElementsAre("Gemm", "Relu", "Gemm", "Softmax"));
  ASSERT_EQ(model.node_inputs.size(), 4u);
  EXPECT_THAT(model.node_inputs[0], ElementsAre("input", "classifier.w1", "classifier.b1"));
  EXPECT_EQ(model.node_inputs[1][0], model.node_outputs[0]);
  EXPECT_THAT(model.node_inputs[2],
              ElementsAre(model.node_outputs[1], "classifier.w2", "classifier.b2"));
  EXPECT_EQ(model.node_inputs[3][0], model.node_outputs[2]);
  EXPECT_EQ(model.node_outputs[3], "probabilities");
  EXPECT_EQ(model.softmax_axis, 1);
  EXPECT_EQ(model.softmax_axis_type, 2);  // AttributeProto.INT
  EXPECT_THAT(model.dims.at("classifier.w1"), ElementsAre(6, 5));
  EXPECT_THAT(model.dims.at("classifier.b1"), ElementsAre(5));
  EXPECT_THAT(model.dims.at("classifier.w2"), ElementsAre(5, 4));
  EXPECT_THAT(model.dims.at("classifier.b2"), ElementsAre(4));
  for (const auto& [name, values] : model.data) {
    EXPECT_EQ(model.data_type.at(name), 1) << name << " is FLOAT";
    const auto& dims = model.dims.at(name);
    EXPECT_EQ(values.size(), static_cast<size_t>(std::accumulate(dims.begin(), dims.end(), 1LL,
                                                                 std::multiplies<>())));
    for (float v : values) {
      EXPECT_GE(v, -1.0f);
      EXPECT_LT(v, 1.0f);
    }
  }
}

// The reference must compute what the model's own weights compute.
TEST(OnnxBuilder, ReferenceMatchesAForwardPassOverTheSerializedWeights) {
  for (uint64_t seed : {1u, 2u, 3u, 12345u}) {
    ClassifierSpec spec;
    spec.seed = seed;
    const DecodedClassifier model = decode(build_classifier_onnx(spec));
    const std::vector<float> x = {0.5f, -1.25f, 2.0f, 0.125f};
    const auto& w1 = model.data.at("classifier.w1");
    const auto& b1 = model.data.at("classifier.b1");
    const auto& w2 = model.data.at("classifier.w2");
    const auto& b2 = model.data.at("classifier.b2");
    std::vector<double> h(8);
    for (size_t j = 0; j < 8; ++j) {
      double s = b1[j];
      for (size_t i = 0; i < 4; ++i) s += x[i] * double{w1[i * 8 + j]};
      h[j] = s > 0 ? s : 0;
    }
    std::vector<double> z(3);
    double total = 0;
    for (size_t k = 0; k < 3; ++k) {
      double s = b2[k];
      for (size_t j = 0; j < 8; ++j) s += h[j] * w2[j * 3 + k];
      z[k] = std::exp(s);
      total += z[k];
    }
    const std::vector<float> reference = classifier_reference(spec, x);
    ASSERT_EQ(reference.size(), 3u);
    for (size_t k = 0; k < 3; ++k) EXPECT_NEAR(reference[k], z[k] / total, 1e-6) << seed;
  }
}

TEST(OnnxBuilder, ReferenceOutputsAreProbabilitiesThatDifferAcrossSeeds) {
  const std::vector<float> x = {1.0f, 0.5f, -0.5f, 2.0f};
  std::vector<std::vector<float>> outputs;
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    ClassifierSpec spec;
    spec.seed = seed;
    const auto probabilities = classifier_reference(spec, x);
    ASSERT_EQ(probabilities.size(), 3u);
    float sum = 0;
    for (float p : probabilities) {
      EXPECT_GE(p, 0.0f);
      EXPECT_LE(p, 1.0f);
      sum += p;
    }
    EXPECT_NEAR(sum, 1.0f, 1e-5f);
    EXPECT_EQ(probabilities, classifier_reference(spec, x)) << "deterministic";
    for (const auto& earlier : outputs) EXPECT_NE(probabilities, earlier) << "seed " << seed;
    outputs.push_back(probabilities);
  }
}

TEST(OnnxBuilder, ReferenceHandlesLargeLogitsWithoutOverflow) {
  ClassifierSpec spec;
  spec.inputs = 64;
  spec.hidden = 64;
  spec.classes = 10;
  const auto probabilities = classifier_reference(spec, std::vector<float>(64, 1000.0f));
  ASSERT_EQ(probabilities.size(), 10u);
  float sum = 0;
  for (float p : probabilities) {
    EXPECT_TRUE(std::isfinite(p));
    sum += p;
  }
  EXPECT_NEAR(sum, 1.0f, 1e-5f);
}

// ---- Reader: what it records ----

TEST(OnnxModel, InputsThatAreInitializersAreExcluded) {
  ModelParts parts;
  parts.inputs.push_back(value_info("weight", 1, {{3, ""}}));
  parts.inputs.push_back(value_info("bias", 1, {{3, ""}}));
  parts.initializers = {initializer("weight"), initializer("bias"), initializer("unused")};
  auto info = parse_onnx_model(model_bytes(parts));
  ASSERT_TRUE(info) << info.error().message;
  ASSERT_EQ(info->inputs.size(), 1u);
  EXPECT_EQ(info->inputs[0].name, "x");
  EXPECT_EQ(info->initializer_count, 3u);
}

TEST(OnnxModel, SparseInitializersAreCountedAndExcludedFromInputs) {
  WireWriter sparse;
  sparse.add_message(1, initializer("table"));
  WireWriter graph;
  graph.add_message(1, relu_node("x", "y"));
  graph.add_message(11, value_info("x", 1, {{2, ""}}));
  graph.add_message(11, value_info("table", 1, {{2, ""}}));
  graph.add_message(12, value_info("y", 1, {{2, ""}}));
  graph.add_message(15, sparse);
  WireWriter model;
  model.add_int64(1, 8);
  model.add_message(7, graph);
  model.add_message(8, opset("", 13));
  auto info = parse_onnx_model(model.bytes());
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(info->initializer_count, 1u);
  ASSERT_EQ(info->inputs.size(), 1u);
  EXPECT_EQ(info->inputs[0].name, "x");
}

TEST(OnnxModel, RecordsTypesSymbolicDimsAndUnknownShapes) {
  ModelParts parts;
  parts.inputs = {
      value_info("ids", 7, {{-1, "batch"}, {-1, "seq"}}),
      value_info("mask", 9, {{-1, ""}, {128, ""}}),  // a dim with neither value nor param
      value_info("half", 10, {}),                    // a scalar
      value_info("bytes", 2, {}, /*with_shape=*/false),
      value_info("future", 99, {{1, ""}}),
  };
  WireWriter sequence_type;
  sequence_type.add_message(4, WireWriter{});
  WireWriter seq;
  seq.add_bytes(1, "tokens");
  seq.add_message(2, sequence_type);
  parts.outputs.push_back(seq);
  auto info = parse_onnx_model(model_bytes(parts));
  ASSERT_TRUE(info) << info.error().message;
  ASSERT_EQ(info->inputs.size(), 5u);
  EXPECT_EQ(info->inputs[0].elem_type, "INT64");
  EXPECT_THAT(info->inputs[0].shape, ElementsAre(-1, -1));
  EXPECT_THAT(info->inputs[0].dim_names, ElementsAre("batch", "seq"));
  EXPECT_EQ(info->inputs[1].elem_type, "BOOL");
  EXPECT_THAT(info->inputs[1].shape, ElementsAre(-1, 128));
  EXPECT_THAT(info->inputs[1].dim_names, ElementsAre("", ""));
  EXPECT_EQ(info->inputs[2].elem_type, "FLOAT16");
  EXPECT_TRUE(info->inputs[2].has_shape);
  EXPECT_TRUE(info->inputs[2].shape.empty());
  EXPECT_EQ(info->inputs[3].elem_type, "UINT8");
  EXPECT_FALSE(info->inputs[3].has_shape);
  EXPECT_EQ(info->inputs[4].elem_type, "DATA_TYPE_99");
  ASSERT_EQ(info->outputs.size(), 2u);
  EXPECT_EQ(info->outputs[1].elem_type, "SEQUENCE");
  EXPECT_FALSE(info->outputs[1].has_shape);

  const nlohmann::json json = to_json(*info);
  EXPECT_EQ(json["inputs"][2]["shape"], nlohmann::json::array());
  EXPECT_TRUE(json["inputs"][3]["shape"].is_null());
}

TEST(OnnxModel, CheckServableNamesTheFirstValueTheModelServerCannotCarry) {
  ModelInfo info;
  info.inputs = {TensorInfo{"x", "FLOAT", {-1, 4}, {"", ""}, true},
                 TensorInfo{"h", "FLOAT16", {}, {}, true},
                 TensorInfo{"b", "BFLOAT16", {}, {}, true}, TensorInfo{"s", "STRING", {}, {}, true},
                 TensorInfo{"u", "UNDEFINED", {}, {}, false}};
  info.outputs = {TensorInfo{"y", "INT64", {-1}, {""}, true}};
  EXPECT_TRUE(check_servable(info).has_value());
  info.outputs.push_back(TensorInfo{"tokens", "SEQUENCE", {}, {}, false});
  auto refused = check_servable(info);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().message,
            "output 'tokens' is a SEQUENCE; the model server serves tensors only");
  info.outputs.pop_back();
  info.inputs.push_back(TensorInfo{"maybe", "OPTIONAL", {}, {}, false});
  EXPECT_EQ(check_servable(info).error().message,
            "input 'maybe' is an OPTIONAL; the model server serves tensors only");
  info.inputs.back() = TensorInfo{"z", "COMPLEX64", {2}, {""}, true};
  EXPECT_EQ(check_servable(info).error().message,
            "input 'z' is a COMPLEX64 tensor; the model server cannot carry that type");
  info.inputs.back() = TensorInfo{"n", "DATA_TYPE_99", {2}, {""}, true};
  EXPECT_THAT(check_servable(info).error().message, HasSubstr("DATA_TYPE_99"));
}

TEST(OnnxModel, SkipsUnknownFieldsOfEveryWireType) {
  const std::string plain = model_bytes(ModelParts{});
  auto expected = parse_onnx_model(plain);
  ASSERT_TRUE(expected);

  auto add_unknowns = [](WireWriter& w) {
    w.add_varint(1000, 123456789);
    w.add_fixed32(1001, 7);
    w.add_bytes(1002, std::string("\x0b\xff\x0e garbage that is never parsed", 32));
    w.add_varint(536870911, 1);  // the largest field number
  };
  WireWriter input = value_info("x", 1, {{-1, "n"}, {3, ""}});
  add_unknowns(input);
  WireWriter graph;
  add_unknowns(graph);
  graph.add_message(1, relu_node("x", "y"));
  graph.add_bytes(10, "doc string");
  graph.add_message(11, input);
  graph.add_message(12, value_info("y", 1, {{-1, "n"}, {3, ""}}));
  WireWriter model;
  add_unknowns(model);
  model.add_int64(1, 8);
  model.add_bytes(6, "model doc string");
  model.add_message(7, graph);
  model.add_message(8, opset("", 13));
  // A fixed64 field can only be added by hand: tag (field 1003, wire type 1) + 8 bytes.
  std::string bytes = model.release() + "\xd9\x3e" + std::string(8, '\x42');
  auto info = parse_onnx_model(bytes);
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(to_json(*info)["inputs"], to_json(*expected)["inputs"]);
  EXPECT_EQ(info->node_count, 1u);
}

TEST(OnnxModel, AiOnnxDomainCountsAsTheDefaultOpset) {
  ModelParts parts;
  parts.opsets = {opset("ai.onnx.ml", 3), opset("ai.onnx", 15)};
  auto info = parse_onnx_model(model_bytes(parts));
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(default_opset(*info), 15);
  const nlohmann::json json = to_json(*info);
  EXPECT_EQ(json["opset"], 15);
  EXPECT_EQ(json["opsets"].size(), 2u);

  parts.opsets = {opset("ai.onnx.ml", 3)};
  info = parse_onnx_model(model_bytes(parts));
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_TRUE(to_json(*info)["opset"].is_null());
}

// ---- Reader: what it refuses ----

TEST(OnnxModel, RefusesAnEmptyFile) {
  EXPECT_EQ(refusal(""), "file is empty, expected an ONNX model");
}

TEST(OnnxModel, RefusesTextJsonPngAndGarbage) {
  EXPECT_THAT(refusal("hello, this is a plain text file\n"), StartsWith("not an ONNX model: "));
  EXPECT_THAT(refusal(R"({"name": "defect-net", "version": "1.2.0"})"),
              StartsWith("not an ONNX model: "));
  static const char kPng[] = "\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0";
  EXPECT_THAT(refusal(std::string(kPng, sizeof(kPng) - 1)), StartsWith("not an ONNX model: "));
  EXPECT_THAT(refusal(std::string(1000, '\0')), StartsWith("not an ONNX model: "));
  EXPECT_THAT(refusal(std::string(1000, '\xff')), StartsWith("not an ONNX model: "));

  // Random bytes sometimes parse as protobuf; they must still be refused.
  uint64_t state = 42;
  for (int i = 0; i < 2000; ++i) {
    std::string bytes(1 + i % 300, '\0');
    for (auto& b : bytes) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      b = static_cast<char>(state >> 56);
    }
    EXPECT_FALSE(parse_onnx_model(bytes)) << "random buffer " << i;
  }
}

TEST(OnnxModel, ErrorsNameTheByteOffset) {
  std::string bytes = build_classifier_onnx({});
  bytes.push_back('\x0b');  // a group tag after a valid model
  EXPECT_EQ(refusal(bytes), "not an ONNX model: field 1 at byte offset " +
                                std::to_string(bytes.size() - 1) +
                                " has wire type 3 (group), which ONNX files do not use");
}

TEST(OnnxModel, EveryTruncationIsRefusedAndNeverCrashes) {
  const std::string bytes = build_classifier_onnx({});
  for (size_t length = 0; length < bytes.size(); ++length) {
    // A buffer of exactly `length` bytes, so a sanitizer sees any read past it.
    const std::vector<char> prefix(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(length));
    auto info = parse_onnx_model(std::string_view(prefix.data(), prefix.size()));
    EXPECT_FALSE(info) << "prefix of " << length << " bytes";
    if (!info) {
      EXPECT_FALSE(info.error().message.empty());
    }
  }
  EXPECT_TRUE(parse_onnx_model(bytes));
}

TEST(OnnxModel, EverySingleBitFlipGivesAnErrorOrAValidModel) {
  ClassifierSpec spec;
  spec.inputs = 2;
  spec.hidden = 2;
  spec.classes = 2;
  const std::string bytes = build_classifier_onnx(spec);
  for (size_t bit = 0; bit < bytes.size() * 8; ++bit) {
    std::string flipped = bytes;
    flipped[bit / 8] = static_cast<char>(flipped[bit / 8] ^ (1 << (bit % 8)));
    auto info = parse_onnx_model(flipped);
    if (info) {
      EXPECT_FALSE(info->inputs.empty());
      EXPECT_FALSE(info->outputs.empty());
      EXPECT_NO_THROW((void)to_json(*info).dump());
    } else {
      EXPECT_FALSE(info.error().message.empty());
    }
  }
}

TEST(OnnxModel, RefusesAGraphWithoutOutputs) {
  ModelParts parts;
  parts.outputs.clear();
  EXPECT_EQ(refusal(model_bytes(parts)),
            "ONNX graph 'g' has no outputs, expected at least one graph output");
}

TEST(OnnxModel, RefusesAGraphWithoutInputsOrWhoseInputsAreAllInitializers) {
  ModelParts parts;
  parts.inputs.clear();
  EXPECT_THAT(refusal(model_bytes(parts)), HasSubstr("has no inputs"));
  parts.inputs = {value_info("w", 1, {{3, ""}})};
  parts.initializers = {initializer("w")};
  EXPECT_THAT(refusal(model_bytes(parts)), HasSubstr("has no inputs"));
}

TEST(OnnxModel, RefusesAModelWithoutGraph) {
  ModelParts parts;
  parts.has_graph = false;
  EXPECT_EQ(refusal(model_bytes(parts)), "ONNX model has no graph");
}

TEST(OnnxModel, RefusesAModelWithoutOpsetImport) {
  ModelParts parts;
  parts.opsets.clear();
  EXPECT_THAT(refusal(model_bytes(parts)), StartsWith("ONNX model has no opset_import"));
  parts.opsets = {opset("", 0)};
  EXPECT_THAT(refusal(model_bytes(parts)), HasSubstr("opset_import[0] (domain '') has version 0"));
}

TEST(OnnxModel, RefusesMissingOrNonPositiveIrVersion) {
  ModelParts parts;
  parts.has_ir_version = false;
  EXPECT_EQ(refusal(model_bytes(parts)),
            "not an ONNX model: ModelProto.ir_version is missing, expected a positive IR version");
  parts.has_ir_version = true;
  parts.ir_version = -3;
  EXPECT_THAT(refusal(model_bytes(parts)), HasSubstr("ir_version is -3"));
}

TEST(OnnxModel, RefusesKnownFieldsWithTheWrongWireType) {
  WireWriter model;
  model.add_int64(1, 8);
  model.add_varint(7, 5);  // graph must be a message
  EXPECT_EQ(refusal(model.bytes()),
            "not an ONNX model: ModelProto.graph (field 7) at byte offset 2 has wire type "
            "varint, expected length-delimited");
}

TEST(OnnxModel, RefusesNamesThatAreNotUtf8OrMissing) {
  ModelParts parts;
  parts.inputs = {value_info("bad\xc3\x28name", 1, {{1, ""}})};
  EXPECT_THAT(refusal(model_bytes(parts)),
              ::testing::AllOf(StartsWith("not an ONNX model: ValueInfoProto.name"),
                               HasSubstr("is not valid UTF-8")));
  parts.inputs = {value_info("x", 1, {{1, ""}})};
  parts.outputs = {value_info("", 1, {{1, ""}})};
  EXPECT_EQ(refusal(model_bytes(parts)), "ONNX graph 'g' output #0 has no name");
  // Overlong encodings and surrogates are not UTF-8 either.
  for (const char* bad : {"\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xff"}) {
    parts.outputs = {value_info(bad, 1, {{1, ""}})};
    EXPECT_THAT(refusal(model_bytes(parts)), HasSubstr("not valid UTF-8")) << bad;
  }
  parts.outputs = {value_info("\xe2\x82\xac \xf0\x9f\x98\x80", 1, {{1, ""}})};  // € 😀
  EXPECT_TRUE(parse_onnx_model(model_bytes(parts)));
}

TEST(OnnxModel, MergesAGraphGivenTwiceAsProtobufDoes) {
  WireWriter first;
  first.add_message(11, value_info("x", 1, {{1, ""}}));
  first.add_message(11, value_info("w", 1, {{1, ""}}));
  WireWriter second;
  second.add_message(1, relu_node("x", "y"));
  second.add_message(5, initializer("w"));
  second.add_message(12, value_info("y", 1, {{1, ""}}));
  WireWriter model;
  model.add_int64(1, 8);
  model.add_message(7, first);
  model.add_message(8, opset("", 13));
  model.add_message(7, second);
  auto info = parse_onnx_model(model.bytes());
  ASSERT_TRUE(info) << info.error().message;
  ASSERT_EQ(info->inputs.size(), 1u);
  EXPECT_EQ(info->inputs[0].name, "x");
  EXPECT_EQ(info->outputs.size(), 1u);
  EXPECT_EQ(info->node_count, 1u);
}

TEST(OnnxModel, RefusesMoreInputsThanTheLimit) {
  WireWriter graph;
  const WireWriter input = value_info("x", 1, {});
  for (size_t i = 0; i <= kMaxGraphValues; ++i) graph.add_message(11, input);
  graph.add_message(12, value_info("y", 1, {}));
  WireWriter model;
  model.add_int64(1, 8);
  model.add_message(7, graph);
  model.add_message(8, opset("", 13));
  EXPECT_THAT(refusal(model.bytes()), HasSubstr("more than 65536 inputs"));
}

}  // namespace
}  // namespace outpost::onnx
