// Reads the facts the model registry records about an uploaded ONNX file (IR version, opsets,
// graph inputs and outputs with types and shapes) and refuses anything that is not one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace outpost::onnx {

// A graph input or output.
struct TensorInfo {
  std::string name;
  // ONNX TensorProto.DataType name: "FLOAT", "INT64", "FLOAT16", "UINT8", ... "UNDEFINED" when
  // the type is missing, "DATA_TYPE_<n>" for a number newer than this reader. Values that are
  // not tensors are named by their kind: "SEQUENCE", "MAP", "OPTIONAL", "SPARSE_TENSOR".
  std::string elem_type;
  // Dimensions; -1 for a symbolic or unknown dimension. Empty with has_shape == true is a
  // scalar; has_shape == false means the rank itself is unknown.
  std::vector<int64_t> shape;
  std::vector<std::string> dim_names;  // dim_param per dimension, "" where there is none
  bool has_shape = false;
};

struct ModelInfo {
  int64_t ir_version = 0;
  std::string producer_name;
  std::string producer_version;
  // opset_import in file order: domain ("" = ai.onnx) and version.
  std::vector<std::pair<std::string, int64_t>> opsets;
  std::string graph_name;
  std::vector<TensorInfo> inputs;  // graph inputs that are not initializers
  std::vector<TensorInfo> outputs;
  size_t node_count = 0;         // nodes of the main graph (subgraphs not counted)
  size_t initializer_count = 0;  // dense plus sparse initializers of the main graph
};

// Limits on what one file may declare, so a small hostile file cannot make the reader
// allocate without bound; files over them are refused. Real models are far below them.
// Initializers are not limited: they are counted and matched, never stored.
inline constexpr size_t kMaxGraphValues = 1 << 16;   // graph inputs, and graph outputs
inline constexpr size_t kMaxRecordedDims = 1 << 20;  // dimensions across inputs and outputs

// Parses a serialized ONNX ModelProto. Every string recorded is valid UTF-8. Errors, all
// kInvalidArgument:
//   "file is empty, expected an ONNX model"
//   "not an ONNX model: <what went wrong at byte offset N>" (not protobuf, a known field of
//     the wrong wire type, a recorded string that is not UTF-8, ir_version missing or <= 0)
//   "ONNX model has no graph", "ONNX model has no opset_import ...",
//   "ONNX graph '<name>' has no inputs ...", "ONNX graph '<name>' has no outputs", and
//   errors naming an unnamed or malformed input, output or opset.
[[nodiscard]] Result<ModelInfo> parse_onnx_model(std::string_view bytes);

// Whether the agent's model server can serve the graph: every input and output a tensor of a
// type the Open Inference Protocol carries (FLOAT, DOUBLE, FLOAT16, BFLOAT16, BOOL, the
// integer types, STRING). kInvalidArgument otherwise, naming the first value that is not:
//   "input 'seq' is a SEQUENCE; the model server serves tensors only"
//   "output 'z' is a COMPLEX64 tensor; the model server cannot send that type"
// A missing type (UNDEFINED) passes: the runtime infers it at load.
[[nodiscard]] Status check_servable(const ModelInfo& info);

// Version imported for the default domain ("" or "ai.onnx"), or 0 when there is none.
int64_t default_opset(const ModelInfo& info);

// {"ir_version":8,"opset":13,"opsets":[{"domain":"","version":13}],"producer":"outpost",
//  "producer_version":"","graph":"g","inputs":[{"name":"input","type":"FLOAT",
//  "shape":[-1,4],"dim_names":["batch",""]}],"outputs":[...],"nodes":4,"initializers":4}
// "opset" is null without a default-domain opset; "shape" is null when the rank is unknown.
nlohmann::json to_json(const ModelInfo& info);

}  // namespace outpost::onnx
