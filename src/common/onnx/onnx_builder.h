// Builds tiny but real ONNX classifiers (Gemm-Relu-Gemm-Softmax) with seeded weights, and
// computes what they output, so tests and demos have models with known answers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace outpost::onnx {

// Sizes, seed and names of a generated classifier. Sizes must be positive, opset at least 7
// (the first where Gemm broadcasts its bias without an attribute), and the two names must
// differ from each other and from the internal names ("classifier.*"); all asserted.
struct ClassifierSpec {
  int64_t inputs = 4;
  int64_t hidden = 8;
  int64_t classes = 3;
  uint64_t seed = 1;
  std::string input_name = "input";
  std::string output_name = "probabilities";
  int64_t opset = 13;
};

// A serialized ONNX ModelProto (IR version 8, producer "outpost", opset_import {"", opset}):
//   input [batch, inputs] FLOAT -> Gemm(W1 [inputs, hidden], b1 [hidden]) -> Relu
//   -> Gemm(W2 [hidden, classes], b2 [classes]) -> Softmax(axis=1) -> output [batch, classes]
// "batch" is a dim_param. Weights are FLOAT initializers in little-endian raw_data, drawn
// from splitmix64(seed) as floats in [-1, 1) in the order W1, b1, W2, b2 (row-major), each
// value (next() >> 40) / 2^23 - 1 -- exact in float, so other languages can regenerate them.
std::string build_classifier_onnx(const ClassifierSpec& spec);

// softmax(relu(x * W1 + b1) * W2 + b2) for one input row of spec.inputs values (asserted;
// an empty result in release builds if the size is wrong), with the same weights as
// build_classifier_onnx. Computed in double and rounded to float: compare a runtime's
// output with a tolerance (1e-5 is ample).
std::vector<float> classifier_reference(const ClassifierSpec& spec,
                                        const std::vector<float>& input);

}  // namespace outpost::onnx
