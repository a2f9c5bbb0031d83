#include "common/onnx/onnx_builder.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <string_view>

#include "common/onnx/protobuf_wire.h"

namespace outpost::onnx {

namespace {

constexpr int64_t kIrVersion = 8;
constexpr int64_t kFloatType = 1;     // TensorProto.DataType FLOAT
constexpr int64_t kAttributeInt = 2;  // AttributeProto.AttributeType INT

constexpr std::string_view kW1 = "classifier.w1";
constexpr std::string_view kB1 = "classifier.b1";
constexpr std::string_view kW2 = "classifier.w2";
constexpr std::string_view kB2 = "classifier.b2";
constexpr std::string_view kHiddenLinear = "classifier.hidden_linear";
constexpr std::string_view kHidden = "classifier.hidden";
constexpr std::string_view kLogits = "classifier.logits";

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // The top 24 bits scaled to [-1, 1); exact in float.
  float next_float() { return static_cast<float>(next() >> 40) * (1.0f / 8388608.0f) - 1.0f; }

 private:
  uint64_t state_;
};

struct ClassifierWeights {
  std::vector<float> w1, b1, w2, b2;  // row-major [inputs, hidden], [hidden], ...
};

void check_spec(const ClassifierSpec& spec) {
  assert(spec.inputs > 0 && spec.hidden > 0 && spec.classes > 0);
  assert(spec.opset >= 7);
  assert(!spec.input_name.empty() && !spec.output_name.empty());
  assert(spec.input_name != spec.output_name);
  assert(spec.input_name.rfind("classifier.", 0) != 0);
  assert(spec.output_name.rfind("classifier.", 0) != 0);
  (void)spec;
}

ClassifierWeights classifier_weights(const ClassifierSpec& spec) {
  check_spec(spec);
  SplitMix64 rng(spec.seed);
  auto draw = [&](int64_t count) {
    std::vector<float> values(static_cast<size_t>(count));
    for (auto& value : values) value = rng.next_float();
    return values;
  };
  ClassifierWeights weights;
  weights.w1 = draw(spec.inputs * spec.hidden);
  weights.b1 = draw(spec.hidden);
  weights.w2 = draw(spec.hidden * spec.classes);
  weights.b2 = draw(spec.classes);
  return weights;
}

std::string little_endian_bytes(const std::vector<float>& values) {
  std::string bytes;
  bytes.reserve(values.size() * 4);
  for (float value : values) {
    uint32_t bits = 0;
    std::memcpy(&bits, &value, sizeof(bits));
    for (int i = 0; i < 4; ++i) bytes.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
  }
  return bytes;
}

// TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9.
WireWriter float_initializer(std::string_view name, const std::vector<int64_t>& dims,
                             const std::vector<float>& values) {
  WireWriter tensor;
  for (int64_t dim : dims) tensor.add_int64(1, dim);
  tensor.add_int64(2, kFloatType);
  tensor.add_bytes(8, name);
  tensor.add_bytes(9, little_endian_bytes(values));
  return tensor;
}

// NodeProto: input = 1, output = 2, name = 3, op_type = 4, attribute = 5.
WireWriter node(std::string_view name, std::string_view op_type,
                const std::vector<std::string_view>& inputs, std::string_view output,
                const WireWriter* attribute = nullptr) {
  WireWriter proto;
  for (auto input : inputs) proto.add_bytes(1, input);
  proto.add_bytes(2, output);
  proto.add_bytes(3, name);
  proto.add_bytes(4, op_type);
  if (attribute != nullptr) proto.add_message(5, *attribute);
  return proto;
}

// ValueInfoProto{name = 1, type = 2: TypeProto{tensor_type = 1: {elem_type = 1, shape = 2:
// TensorShapeProto{dim = 1: Dimension{dim_value = 1 | dim_param = 2}}}}} for [batch, width].
WireWriter batch_float_value(std::string_view name, int64_t width) {
  WireWriter batch_dim;
  batch_dim.add_bytes(2, "batch");
  WireWriter width_dim;
  width_dim.add_int64(1, width);
  WireWriter shape;
  shape.add_message(1, batch_dim);
  shape.add_message(1, width_dim);
  WireWriter tensor_type;
  tensor_type.add_int64(1, kFloatType);
  tensor_type.add_message(2, shape);
  WireWriter type;
  type.add_message(1, tensor_type);
  WireWriter value_info;
  value_info.add_bytes(1, name);
  value_info.add_message(2, type);
  return value_info;
}

}  // namespace

std::string build_classifier_onnx(const ClassifierSpec& spec) {
  const ClassifierWeights weights = classifier_weights(spec);

  // AttributeProto: name = 1, i = 3, type = 20.
  WireWriter softmax_axis;
  softmax_axis.add_bytes(1, "axis");
  softmax_axis.add_int64(3, 1);
  softmax_axis.add_int64(20, kAttributeInt);

  // GraphProto: node = 1, name = 2, initializer = 5, input = 11, output = 12.
  WireWriter graph;
  graph.add_message(1, node("gemm_1", "Gemm", {spec.input_name, kW1, kB1}, kHiddenLinear));
  graph.add_message(1, node("relu", "Relu", {kHiddenLinear}, kHidden));
  graph.add_message(1, node("gemm_2", "Gemm", {kHidden, kW2, kB2}, kLogits));
  graph.add_message(1, node("softmax", "Softmax", {kLogits}, spec.output_name, &softmax_axis));
  graph.add_bytes(2, "outpost_classifier");
  graph.add_message(5, float_initializer(kW1, {spec.inputs, spec.hidden}, weights.w1));
  graph.add_message(5, float_initializer(kB1, {spec.hidden}, weights.b1));
  graph.add_message(5, float_initializer(kW2, {spec.hidden, spec.classes}, weights.w2));
  graph.add_message(5, float_initializer(kB2, {spec.classes}, weights.b2));
  graph.add_message(11, batch_float_value(spec.input_name, spec.inputs));
  graph.add_message(12, batch_float_value(spec.output_name, spec.classes));

  // OperatorSetIdProto: domain = 1, version = 2.
  WireWriter opset;
  opset.add_bytes(1, "");
  opset.add_int64(2, spec.opset);

  // ModelProto: ir_version = 1, producer_name = 2, graph = 7, opset_import = 8.
  WireWriter model;
  model.add_int64(1, kIrVersion);
  model.add_bytes(2, "outpost");
  model.add_message(7, graph);
  model.add_message(8, opset);
  return model.release();
}

std::vector<float> classifier_reference(const ClassifierSpec& spec,
                                        const std::vector<float>& input) {
  assert(static_cast<int64_t>(input.size()) == spec.inputs);
  if (static_cast<int64_t>(input.size()) != spec.inputs) return {};
  const ClassifierWeights w = classifier_weights(spec);
  const auto inputs = static_cast<size_t>(spec.inputs);
  const auto hidden = static_cast<size_t>(spec.hidden);
  const auto classes = static_cast<size_t>(spec.classes);

  std::vector<double> activation(hidden);
  for (size_t j = 0; j < hidden; ++j) {
    double sum = w.b1[j];
    for (size_t i = 0; i < inputs; ++i) sum += double{input[i]} * w.w1[i * hidden + j];
    activation[j] = std::max(sum, 0.0);
  }
  std::vector<double> logits(classes);
  for (size_t k = 0; k < classes; ++k) {
    double sum = w.b2[k];
    for (size_t j = 0; j < hidden; ++j) sum += activation[j] * w.w2[j * classes + k];
    logits[k] = sum;
  }
  const double max_logit = *std::max_element(logits.begin(), logits.end());
  double total = 0;
  for (auto& logit : logits) total += (logit = std::exp(logit - max_logit));
  std::vector<float> probabilities(classes);
  for (size_t k = 0; k < classes; ++k) probabilities[k] = static_cast<float>(logits[k] / total);
  return probabilities;
}

}  // namespace outpost::onnx
