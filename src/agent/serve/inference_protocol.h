// The Open Inference Protocol (KServe v2) JSON codec: turns an infer request body into
// tensors checked against what the model declares, and tensors into the response body.
// Pure functions over bytes, so every malformed body can be tested without a runtime.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/serve/tensor.h"
#include "common/error.h"

namespace outpost::agent::serve {

struct InferRequest {
  std::string id;                    // echoed in the response ("" when absent)
  std::vector<Tensor> inputs;        // in the model's input order, one per model input
  std::vector<std::string> outputs;  // requested outputs; empty = all
  // Binary tensor data extension: outputs to send as raw bytes after the JSON header, asked
  // with "parameters": {"binary_data_output": true} (all) or per output "binary_data": true.
  bool binary_all_outputs = false;
  std::vector<std::string> binary_outputs;
  bool wants_binary(const std::string& output) const;
};

struct ProtocolLimits {
  size_t max_elements = 16u << 20;  // per input tensor
  size_t max_nesting = 32;          // nested "data" arrays
};

// Parses and checks a request against the model's inputs and outputs. Every error is
// kInvalidArgument with the field's path (`inputs[1].shape`) and a message naming the input
// and what was expected, e.g.
//   "input 'input': shape [1,5] does not match the model's [-1,4]"
//   "input 'sr': datatype FP32, the model expects INT64"
//   "missing input 'state' (FP32 [2,-1,128])"
//   "input 'input': 3 values for shape [1,4] (4 expected)"
// Data may be flat or nested row-major arrays. Integer types take integral numbers in range,
// FP32/FP64/FP16/BF16 any number in the type's range (rounded to nearest), BOOL true/false (or
// 0/1), BYTES strings. JSON has no NaN or infinity: such values need the binary extension.
//
// The binary tensor data extension (as Triton and KServe clients send it): with
// `json_length` (the Inference-Header-Content-Length header) the body is that many bytes of
// JSON followed by raw tensors; an input with "parameters": {"binary_data_size": N} and no
// "data" takes the next N bytes: little-endian elements, BOOL one byte each, BYTES each a
// 4-byte little-endian length and its bytes. Sizes must match the shape exactly and the
// binary part must be used up (errors name the input and both sizes).
[[nodiscard]] Result<InferRequest> parse_infer_request(
    std::string_view body, const std::vector<TensorSpec>& inputs,
    const std::vector<TensorSpec>& outputs, const ProtocolLimits& limits = {},
    std::optional<size_t> json_length = std::nullopt);

// An answer ready to send: with binary outputs, `json_length` is the JSON header's length
// (for the Inference-Header-Content-Length header) and the body is application/octet-stream.
struct EncodedAnswer {
  std::string body;
  std::optional<size_t> json_length;
};
// encode_infer_response, sending as raw bytes the outputs `request` asks binary.
EncodedAnswer encode_infer_answer(std::string_view model_name, std::string_view model_version,
                                  const InferRequest& request, const std::vector<Tensor>& outputs,
                                  const nlohmann::json& parameters);

// {"model_name":..,"model_version":..,"id":..,"parameters":{..},"outputs":[{"name":..,
//  "datatype":"FP32","shape":[1,3],"data":[..]}]}; floats in their shortest exact form (FP16
// and BF16 as the float they hold), NaN and infinities as null (JSON has no spelling for
// them), BYTES as strings (bytes that are not UTF-8 replaced: ask binary for exact bytes).
// "id" only when non-empty, "parameters" only when it is a non-empty object.
std::string encode_infer_response(std::string_view model_name, std::string_view model_version,
                                  std::string_view id, const std::vector<Tensor>& outputs,
                                  const nlohmann::json& parameters);

// {"name","versions":[..],"platform":"onnxruntime_onnx","inputs":[{"name","datatype","shape"}],
//  "outputs":[..]} -- the protocol's model metadata. Unknown ranks are reported as shape [-1].
nlohmann::json model_metadata(const std::string& name, const std::string& version,
                              const std::vector<TensorSpec>& inputs,
                              const std::vector<TensorSpec>& outputs);

// {"error": "..."}: the protocol's error body, for 4xx/5xx answers on inference routes.
std::string protocol_error_body(const Error& error);

}  // namespace outpost::agent::serve
