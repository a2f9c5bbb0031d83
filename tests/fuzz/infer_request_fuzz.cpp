// Fuzz target for the Open Inference Protocol request parser: any bytes must give a request
// that keeps parse_infer_request's promises or a kInvalidArgument error -- never a crash, a
// hang, an exception or an allocation sized by a claimed shape -- and an accepted request's
// tensors must survive encode_infer_response and a second parse with the same values.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/serve/inference_protocol.h"
#include "agent/serve/tensor.h"

namespace {

using outpost::agent::serve::DataType;
using outpost::agent::serve::TensorSpec;

void check(bool condition) {
  if (!condition) std::abort();
}

// Silero VAD v5's signature: a batch of frames with a fixed width here, a state, a scalar rate.
const std::vector<TensorSpec>& model_inputs() {
  static const std::vector<TensorSpec> specs = {
      {"input", DataType::kFp32, {-1, 4}, true},
      {"state", DataType::kFp32, {2, -1, 2}, true},
      {"sr", DataType::kInt64, {}, true},
  };
  return specs;
}

const std::vector<TensorSpec>& model_outputs() {
  static const std::vector<TensorSpec> specs = {
      {"output", DataType::kFp32, {-1, 1}, true},
      {"stateN", DataType::kFp32, {2, -1, 2}, true},
  };
  return specs;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace outpost::agent::serve;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  const auto& inputs = model_inputs();
  const auto& outputs = model_outputs();
  auto parsed = parse_infer_request(body, inputs, outputs);
  if (!parsed) {
    check(parsed.error().code == outpost::Errc::kInvalidArgument);
    check(!parsed.error().message.empty());
    return 0;
  }
  check(parsed->inputs.size() == inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = parsed->inputs[i];
    const TensorSpec& spec = inputs[i];
    check(t.name == spec.name && t.type == spec.type);
    check(t.shape.size() == spec.shape.size());
    for (size_t d = 0; d < t.shape.size(); ++d) {
      check(t.shape[d] >= 1);
      check(spec.shape[d] < 0 || spec.shape[d] == t.shape[d]);
    }
    auto count = element_count(t.shape, ProtocolLimits{}.max_elements);
    check(count.has_value());
    check(t.data.size() == *count * datatype_size(t.type));
  }
  for (const auto& name : parsed->outputs) {
    bool known = false;
    for (const auto& spec : outputs) known = known || spec.name == name;
    check(known);
  }

  // What the server would write back is valid JSON, and a valid request for the same values.
  const std::string encoded =
      encode_infer_response("m", "1", parsed->id, parsed->inputs, nlohmann::json::object());
  check(nlohmann::json::accept(encoded));
  const nlohmann::json doc = nlohmann::json::parse(encoded);
  check(doc.value("id", std::string()) == parsed->id);
  nlohmann::json again = {{"inputs", doc["outputs"]}};
  auto reparsed = parse_infer_request(again.dump(), inputs, outputs);
  check(reparsed.has_value());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& a = parsed->inputs[i];
    const Tensor& b = reparsed->inputs[i];
    check(a.shape == b.shape && a.element_count() == b.element_count());
    // Values, not bytes: -0.0 is written "-0", which reads back as 0.
    for (size_t k = 0; k < a.element_count(); ++k) {
      check(a.value_as_double(k) == b.value_as_double(k));
    }
  }
  return 0;
}
