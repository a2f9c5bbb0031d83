// The Open Inference Protocol (KServe v2) JSON codec: turns an infer request body into
// tensors checked against what the model declares, and tensors into the response body.
// Pure functions over bytes, so every malformed body can be tested without a runtime.
#pragma once

#include <cstddef>
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
// FP32/FP64 any number, BOOL true/false (or 0/1). FP16 and BYTES are refused as unsupported.
[[nodiscard]] Result<InferRequest> parse_infer_request(std::string_view body,
                                                       const std::vector<TensorSpec>& inputs,
                                                       const std::vector<TensorSpec>& outputs,
                                                       const ProtocolLimits& limits = {});

// {"model_name":..,"model_version":..,"id":..,"parameters":{..},"outputs":[{"name":..,
//  "datatype":"FP32","shape":[1,3],"data":[..]}]}; floats in their shortest exact form,
// NaN and infinities as null (JSON has no spelling for them). "id" only when non-empty,
// "parameters" only when it is a non-empty object.
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
