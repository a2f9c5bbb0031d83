// Fuzz target for the `outpost model push` path: any bytes, as an uploaded model file, go
// through the registry's checks (parse_onnx_model, check_servable, to_json) and the CLI's
// summary of the answer built from them; the same bytes read as a server answer (JSON) go
// through the summary too. Nothing may crash, hang or throw: the CLI once aborted on a model
// that imports no default-domain opset ("opset": null in its metadata).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "common/onnx/onnx_model.h"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  using nlohmann::json;
  auto info = outpost::onnx::parse_onnx_model(bytes);
  if (info) {
    auto servable = outpost::onnx::check_servable(*info);
    check(servable || !servable.error().message.empty());
    json metadata = outpost::onnx::to_json(*info);
    check(!metadata.dump().empty());  // every recorded string is UTF-8: dump cannot throw
    json answer = {{"created", true},
                   {"variants", json::array({{{"selector", {{"accelerator", "cpu"}}},
                                              {"artifact", "sha256:00"},
                                              {"metadata", metadata}}})}};
    const std::string text = outpost::cli::describe_pushed_version("m", "1.0.0", answer);
    check(text.find("variant") != std::string::npos);
  }
  json doc = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_discarded()) {
    const std::string text = outpost::cli::describe_pushed_version("m", "1.0.0", doc);
    check(text.rfind("model m 1.0.0", 0) == 0);
  }
  return 0;
}
