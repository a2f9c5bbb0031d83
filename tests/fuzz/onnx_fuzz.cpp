// Fuzz target for the ONNX model reader: any bytes must give a valid ModelInfo or an error,
// never a crash, a hang or an exception, and a ModelInfo must keep the reader's promises.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "common/onnx/onnx_model.h"
#include "common/onnx/protobuf_wire.h"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

// Walks every field and tries every length-delimited payload as a nested message, which
// drives WireReader through its bounds and depth checks on arbitrary bytes.
void walk(const outpost::onnx::WireReader& start) {
  outpost::onnx::WireReader reader = start;
  while (!reader.at_end()) {
    const size_t before = reader.offset();
    auto field = reader.next();
    if (!field) {
      check(!field.error().message.empty() && reader.offset() == before);
      return;
    }
    check(reader.offset() > before);
    if (field->type == outpost::onnx::WireType::kLen) {
      auto nested = reader.nested(*field);
      if (nested) {
        walk(*nested);
      } else {
        check(reader.depth() + 1 > outpost::onnx::WireReader::kMaxDepth);
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  walk(outpost::onnx::WireReader(bytes));

  auto info = outpost::onnx::parse_onnx_model(bytes);
  if (!info) {
    check(info.error().code == outpost::Errc::kInvalidArgument);
    check(!info.error().message.empty());
    return 0;
  }
  check(info->ir_version > 0);
  check(!info->opsets.empty() && !info->inputs.empty() && !info->outputs.empty());
  for (const auto* values : {&info->inputs, &info->outputs}) {
    for (const auto& value : *values) {
      check(!value.name.empty() && !value.elem_type.empty());
      check(value.shape.size() == value.dim_names.size());
      check(value.has_shape || value.shape.empty());
      for (int64_t dim : value.shape) check(dim >= -1);
    }
  }
  // Every recorded string is valid UTF-8, so serializing cannot throw (it would abort here).
  const std::string json = outpost::onnx::to_json(*info).dump();
  check(!json.empty());
  return 0;
}
