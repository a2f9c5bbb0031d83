#include "common/onnx/onnx_model.h"

#include <algorithm>
#include <array>
#include <unordered_set>

#include "common/onnx/protobuf_wire.h"

namespace outpost::onnx {

namespace {

// Field numbers from onnx/onnx.proto (onnx/onnx repository). Only the fields read here.
namespace model_field {
constexpr uint32_t kIrVersion = 1;
constexpr uint32_t kProducerName = 2;
constexpr uint32_t kProducerVersion = 3;
constexpr uint32_t kGraph = 7;
constexpr uint32_t kOpsetImport = 8;
}  // namespace model_field
namespace opset_field {
constexpr uint32_t kDomain = 1;
constexpr uint32_t kVersion = 2;
}  // namespace opset_field
namespace graph_field {
constexpr uint32_t kNode = 1;
constexpr uint32_t kName = 2;
constexpr uint32_t kInitializer = 5;
constexpr uint32_t kInput = 11;
constexpr uint32_t kOutput = 12;
constexpr uint32_t kSparseInitializer = 15;
}  // namespace graph_field
namespace tensor_field {
constexpr uint32_t kName = 8;
}  // namespace tensor_field
namespace sparse_tensor_field {
constexpr uint32_t kValues = 1;
}  // namespace sparse_tensor_field
namespace value_info_field {
constexpr uint32_t kName = 1;
constexpr uint32_t kType = 2;
}  // namespace value_info_field
namespace type_field {
constexpr uint32_t kTensorType = 1;
constexpr uint32_t kSequenceType = 4;
constexpr uint32_t kMapType = 5;
constexpr uint32_t kSparseTensorType = 8;
constexpr uint32_t kOptionalType = 9;
}  // namespace type_field
namespace tensor_type_field {
constexpr uint32_t kElemType = 1;
constexpr uint32_t kShape = 2;
}  // namespace tensor_type_field
namespace shape_field {
constexpr uint32_t kDim = 1;
}  // namespace shape_field
namespace dim_field {
constexpr uint32_t kValue = 1;
constexpr uint32_t kParam = 2;
}  // namespace dim_field

// TensorProto.DataType names, indexed by value.
constexpr std::array<std::string_view, 27> kDataTypeNames = {
    "UNDEFINED",      "FLOAT",      "UINT8",          "INT8",       "UINT16",   "INT16",
    "INT32",          "INT64",      "STRING",         "BOOL",       "FLOAT16",  "DOUBLE",
    "UINT32",         "UINT64",     "COMPLEX64",      "COMPLEX128", "BFLOAT16", "FLOAT8E4M3FN",
    "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "UINT4",      "INT4",     "FLOAT4E2M1",
    "FLOAT8E8M0",     "UINT2",      "INT2",
};

std::string data_type_name(int64_t value) {
  if (value >= 0 && static_cast<uint64_t>(value) < kDataTypeNames.size()) {
    return std::string(kDataTypeNames[static_cast<size_t>(value)]);
  }
  return "DATA_TYPE_" + std::to_string(value);
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF): what
// nlohmann::json accepts when it serializes, so to_json(...).dump() cannot throw.
bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto lead = static_cast<uint8_t>(s[i]);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    size_t extra = 0;
    uint32_t code_point = 0;
    if (lead >= 0xc2 && lead <= 0xdf) {
      extra = 1;
      code_point = lead & 0x1f;
    } else if ((lead & 0xf0) == 0xe0) {
      extra = 2;
      code_point = lead & 0x0f;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      extra = 3;
      code_point = lead & 0x07;
    } else {
      return false;
    }
    if (s.size() - i - 1 < extra) return false;
    for (size_t k = 1; k <= extra; ++k) {
      const auto next = static_cast<uint8_t>(s[i + k]);
      if ((next & 0xc0) != 0x80) return false;
      code_point = (code_point << 6) | (next & 0x3f);
    }
    if (extra == 2 && (code_point < 0x800 || (code_point >= 0xd800 && code_point <= 0xdfff))) {
      return false;
    }
    if (extra == 3 && (code_point < 0x10000 || code_point > 0x10ffff)) return false;
    i += extra + 1;
  }
  return true;
}

std::string offset_text(size_t offset) { return " at byte offset " + std::to_string(offset); }

tl::unexpected<Error> not_onnx(const std::string& message) {
  return make_error(Errc::kInvalidArgument, "not an ONNX model: " + message);
}

tl::unexpected<Error> not_onnx(const Error& wire_error) { return not_onnx(wire_error.message); }

// `what` names the field as "Message.field" for error messages.
Status expect_wire_type(const WireField& field, WireType expected, std::string_view what) {
  if (field.type == expected) return ok();
  return not_onnx(std::string(what) + " (field " + std::to_string(field.number) + ")" +
                  offset_text(field.offset) + " has wire type " +
                  std::string(wire_type_name(field.type)) + ", expected " +
                  std::string(wire_type_name(expected)));
}

Result<int64_t> read_int(const WireField& field, std::string_view what) {
  OUTPOST_TRY(expect_wire_type(field, WireType::kVarint, what));
  return field.as_int64();
}

Result<std::string_view> read_string(const WireField& field, std::string_view what) {
  OUTPOST_TRY(expect_wire_type(field, WireType::kLen, what));
  if (!is_valid_utf8(field.bytes)) {
    return not_onnx(std::string(what) + offset_text(field.payload_offset) + " is not valid UTF-8");
  }
  return field.bytes;
}

Result<WireReader> open_message(const WireReader& parent, const WireField& field,
                                std::string_view what) {
  OUTPOST_TRY(expect_wire_type(field, WireType::kLen, what));
  auto nested = parent.nested(field);
  if (!nested) return not_onnx(nested.error());
  return *nested;
}

// Calls on_field(field) for every field of the message; stops at the first error.
template <typename OnField>
Status for_each_field(WireReader& reader, OnField&& on_field) {
  while (!reader.at_end()) {
    auto field = reader.next();
    if (!field) return not_onnx(field.error());
    OUTPOST_TRY(on_field(*field));
  }
  return ok();
}

// What one walk over the main graph collects.
struct GraphScan {
  std::string name;
  std::vector<TensorInfo> inputs;
  std::vector<TensorInfo> outputs;
  size_t node_count = 0;
  size_t initializer_count = 0;
};

class ModelReader {
 public:
  explicit ModelReader(std::string_view bytes) : bytes_(bytes) {}

  Result<ModelInfo> read();

 private:
  Status read_model(WireReader& reader);
  Status read_opset(WireReader& reader, std::pair<std::string, int64_t>& opset);
  Status read_graph(WireReader& reader);
  Status exclude_initializer_inputs();
  Status read_initializer_names(WireReader& graph,
                                const std::unordered_set<std::string_view>& input_names,
                                std::unordered_set<std::string_view>& initializer_inputs);
  Result<std::string_view> read_tensor_name(WireReader& reader);
  Status read_value_info(WireReader& reader, TensorInfo& info);
  Status read_type(WireReader& reader, TensorInfo& info);
  Status read_tensor_type(WireReader& reader, TensorInfo& info);
  Status read_shape(WireReader& reader, TensorInfo& info);
  Status read_dim(WireReader& reader, TensorInfo& info);

  std::string_view bytes_;
  ModelInfo info_;
  bool has_ir_version_ = false;
  std::vector<WireReader> graph_parts_;
  GraphScan graph_;
  size_t recorded_dims_ = 0;
};

Result<ModelInfo> ModelReader::read() {
  if (bytes_.empty()) {
    return make_error(Errc::kInvalidArgument, "file is empty, expected an ONNX model");
  }
  WireReader reader(bytes_);
  OUTPOST_TRY(read_model(reader));
  OUTPOST_TRY(exclude_initializer_inputs());

  // Random bytes can parse as protobuf by accident; a real model has all of these.
  if (!has_ir_version_ || info_.ir_version <= 0) {
    return not_onnx("ModelProto.ir_version is " +
                    (has_ir_version_ ? std::to_string(info_.ir_version) : std::string("missing")) +
                    ", expected a positive IR version");
  }
  if (graph_parts_.empty()) return make_error(Errc::kInvalidArgument, "ONNX model has no graph");
  if (info_.opsets.empty()) {
    return make_error(Errc::kInvalidArgument,
                      "ONNX model has no opset_import, expected at least one operator set "
                      "(e.g. domain \"\" version 13)");
  }
  for (size_t i = 0; i < info_.opsets.size(); ++i) {
    const auto& [domain, version] = info_.opsets[i];
    if (version <= 0) {
      return make_error(Errc::kInvalidArgument, "ONNX model opset_import[" + std::to_string(i) +
                                                    "] (domain '" + domain + "') has version " +
                                                    std::to_string(version) +
                                                    ", expected a positive version");
    }
  }

  const std::string graph_label =
      graph_.name.empty() ? std::string("ONNX graph") : "ONNX graph '" + graph_.name + "'";
  auto unnamed = [&](const std::vector<TensorInfo>& values, std::string_view kind) -> Status {
    for (size_t i = 0; i < values.size(); ++i) {
      if (values[i].name.empty()) {
        return make_error(Errc::kInvalidArgument, graph_label + " " + std::string(kind) + " #" +
                                                      std::to_string(i) + " has no name");
      }
    }
    return ok();
  };
  OUTPOST_TRY(unnamed(graph_.inputs, "input"));
  OUTPOST_TRY(unnamed(graph_.outputs, "output"));

  if (graph_.inputs.empty()) {
    return make_error(Errc::kInvalidArgument,
                      graph_label +
                          " has no inputs, expected at least one graph input that is not an "
                          "initializer");
  }
  if (graph_.outputs.empty()) {
    return make_error(Errc::kInvalidArgument,
                      graph_label + " has no outputs, expected at least one graph output");
  }

  info_.graph_name = std::move(graph_.name);
  info_.inputs = std::move(graph_.inputs);
  info_.outputs = std::move(graph_.outputs);
  info_.node_count = graph_.node_count;
  info_.initializer_count = graph_.initializer_count;
  return std::move(info_);
}

Status ModelReader::read_model(WireReader& reader) {
  return for_each_field(reader, [&](const WireField& field) -> Status {
    switch (field.number) {
      case model_field::kIrVersion: {
        auto value = read_int(field, "ModelProto.ir_version");
        if (!value) return make_error(std::move(value).error());
        info_.ir_version = *value;
        has_ir_version_ = true;
        return ok();
      }
      case model_field::kProducerName: {
        auto value = read_string(field, "ModelProto.producer_name");
        if (!value) return make_error(std::move(value).error());
        info_.producer_name = *value;
        return ok();
      }
      case model_field::kProducerVersion: {
        auto value = read_string(field, "ModelProto.producer_version");
        if (!value) return make_error(std::move(value).error());
        info_.producer_version = *value;
        return ok();
      }
      case model_field::kGraph: {
        auto graph = open_message(reader, field, "ModelProto.graph");
        if (!graph) return make_error(std::move(graph).error());
        // A message field given twice merges, as in libprotobuf: read all parts as one graph.
        graph_parts_.push_back(*graph);
        return read_graph(*graph);
      }
      case model_field::kOpsetImport: {
        auto opset_reader = open_message(reader, field, "ModelProto.opset_import");
        if (!opset_reader) return make_error(std::move(opset_reader).error());
        std::pair<std::string, int64_t> opset{"", 0};
        OUTPOST_TRY(read_opset(*opset_reader, opset));
        info_.opsets.push_back(std::move(opset));
        return ok();
      }
      default:
        return ok();  // unknown or unused field: its bytes are already skipped
    }
  });
}

Status ModelReader::read_opset(WireReader& reader, std::pair<std::string, int64_t>& opset) {
  return for_each_field(reader, [&](const WireField& field) -> Status {
    if (field.number == opset_field::kDomain) {
      auto value = read_string(field, "OperatorSetIdProto.domain");
      if (!value) return make_error(std::move(value).error());
      opset.first = *value;
    } else if (field.number == opset_field::kVersion) {
      auto value = read_int(field, "OperatorSetIdProto.version");
      if (!value) return make_error(std::move(value).error());
      opset.second = *value;
    }
    return ok();
  });
}

// Inputs, outputs and counts. Initializer names are read in a second pass, once all inputs
// are known, and matched against them rather than stored (a file may hold millions).
Status ModelReader::read_graph(WireReader& reader) {
  return for_each_field(reader, [&](const WireField& field) -> Status {
    switch (field.number) {
      case graph_field::kNode:
        OUTPOST_TRY(expect_wire_type(field, WireType::kLen, "GraphProto.node"));
        ++graph_.node_count;
        return ok();
      case graph_field::kName: {
        auto value = read_string(field, "GraphProto.name");
        if (!value) return make_error(std::move(value).error());
        graph_.name = *value;
        return ok();
      }
      case graph_field::kInitializer:
        OUTPOST_TRY(expect_wire_type(field, WireType::kLen, "GraphProto.initializer"));
        ++graph_.initializer_count;
        return ok();
      case graph_field::kSparseInitializer:
        OUTPOST_TRY(expect_wire_type(field, WireType::kLen, "GraphProto.sparse_initializer"));
        ++graph_.initializer_count;
        return ok();
      case graph_field::kInput:
      case graph_field::kOutput: {
        const bool is_input = field.number == graph_field::kInput;
        auto value_reader =
            open_message(reader, field, is_input ? "GraphProto.input" : "GraphProto.output");
        if (!value_reader) return make_error(std::move(value_reader).error());
        auto& values = is_input ? graph_.inputs : graph_.outputs;
        if (values.size() >= kMaxGraphValues) {
          return make_error(Errc::kInvalidArgument, "ONNX graph declares more than " +
                                                        std::to_string(kMaxGraphValues) +
                                                        (is_input ? " inputs" : " outputs"));
        }
        values.emplace_back();
        return read_value_info(*value_reader, values.back());
      }
      default:
        return ok();
    }
  });
}

Status ModelReader::exclude_initializer_inputs() {
  auto& inputs = graph_.inputs;
  if (inputs.empty()) return ok();
  std::unordered_set<std::string_view> input_names;
  for (const auto& input : inputs) input_names.insert(input.name);
  std::unordered_set<std::string_view> initializer_inputs;
  for (WireReader part : graph_parts_) {
    OUTPOST_TRY(read_initializer_names(part, input_names, initializer_inputs));
  }
  // The sets view the names in `inputs`, so decide before moving any of them.
  std::vector<bool> is_initializer(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    is_initializer[i] = initializer_inputs.count(inputs[i].name) > 0;
  }
  std::vector<TensorInfo> kept;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!is_initializer[i]) kept.push_back(std::move(inputs[i]));
  }
  inputs = std::move(kept);
  return ok();
}

Status ModelReader::read_initializer_names(
    WireReader& graph, const std::unordered_set<std::string_view>& input_names,
    std::unordered_set<std::string_view>& initializer_inputs) {
  auto note = [&](std::string_view name) {
    if (auto it = input_names.find(name); it != input_names.end()) initializer_inputs.insert(*it);
  };
  return for_each_field(graph, [&](const WireField& field) -> Status {
    if (field.number == graph_field::kInitializer) {
      auto tensor = open_message(graph, field, "GraphProto.initializer");
      if (!tensor) return make_error(std::move(tensor).error());
      auto name = read_tensor_name(*tensor);
      if (!name) return make_error(std::move(name).error());
      note(*name);
    } else if (field.number == graph_field::kSparseInitializer) {
      auto sparse = open_message(graph, field, "GraphProto.sparse_initializer");
      if (!sparse) return make_error(std::move(sparse).error());
      std::string_view name;
      OUTPOST_TRY(for_each_field(*sparse, [&](const WireField& sparse_field) -> Status {
        if (sparse_field.number != sparse_tensor_field::kValues) return ok();
        auto values = open_message(*sparse, sparse_field, "SparseTensorProto.values");
        if (!values) return make_error(std::move(values).error());
        auto values_name = read_tensor_name(*values);
        if (!values_name) return make_error(std::move(values_name).error());
        name = *values_name;
        return ok();
      }));
      note(name);
    }
    return ok();
  });
}

Result<std::string_view> ModelReader::read_tensor_name(WireReader& reader) {
  std::string_view name;
  Status status = for_each_field(reader, [&](const WireField& field) -> Status {
    if (field.number != tensor_field::kName) return ok();
    name = field.bytes;  // compared as bytes with input names, never recorded
    return expect_wire_type(field, WireType::kLen, "TensorProto.name");
  });
  if (!status) return make_error(std::move(status).error());
  return name;
}

Status ModelReader::read_value_info(WireReader& reader, TensorInfo& info) {
  info.elem_type = "UNDEFINED";
  return for_each_field(reader, [&](const WireField& field) -> Status {
    if (field.number == value_info_field::kName) {
      auto value = read_string(field, "ValueInfoProto.name");
      if (!value) return make_error(std::move(value).error());
      info.name = *value;
    } else if (field.number == value_info_field::kType) {
      auto type = open_message(reader, field, "ValueInfoProto.type");
      if (!type) return make_error(std::move(type).error());
      return read_type(*type, info);
    }
    return ok();
  });
}

Status ModelReader::read_type(WireReader& reader, TensorInfo& info) {
  return for_each_field(reader, [&](const WireField& field) -> Status {
    std::string_view kind;
    switch (field.number) {
      case type_field::kTensorType: {
        auto tensor = open_message(reader, field, "TypeProto.tensor_type");
        if (!tensor) return make_error(std::move(tensor).error());
        return read_tensor_type(*tensor, info);
      }
      case type_field::kSequenceType:
        kind = "SEQUENCE";
        break;
      case type_field::kMapType:
        kind = "MAP";
        break;
      case type_field::kSparseTensorType:
        kind = "SPARSE_TENSOR";
        break;
      case type_field::kOptionalType:
        kind = "OPTIONAL";
        break;
      default:
        return ok();
    }
    OUTPOST_TRY(expect_wire_type(field, WireType::kLen, "TypeProto.value"));
    info.elem_type = kind;
    info.shape.clear();
    info.dim_names.clear();
    info.has_shape = false;
    return ok();
  });
}

Status ModelReader::read_tensor_type(WireReader& reader, TensorInfo& info) {
  return for_each_field(reader, [&](const WireField& field) -> Status {
    if (field.number == tensor_type_field::kElemType) {
      auto value = read_int(field, "TypeProto.Tensor.elem_type");
      if (!value) return make_error(std::move(value).error());
      info.elem_type = data_type_name(*value);
    } else if (field.number == tensor_type_field::kShape) {
      auto shape = open_message(reader, field, "TypeProto.Tensor.shape");
      if (!shape) return make_error(std::move(shape).error());
      info.has_shape = true;
      return read_shape(*shape, info);
    }
    return ok();
  });
}

Status ModelReader::read_shape(WireReader& reader, TensorInfo& info) {
  return for_each_field(reader, [&](const WireField& field) -> Status {
    if (field.number != shape_field::kDim) return ok();
    auto dim = open_message(reader, field, "TensorShapeProto.dim");
    if (!dim) return make_error(std::move(dim).error());
    if (recorded_dims_ >= kMaxRecordedDims) {
      return make_error(Errc::kInvalidArgument, "ONNX graph declares more than " +
                                                    std::to_string(kMaxRecordedDims) +
                                                    " input and output dimensions");
    }
    ++recorded_dims_;
    return read_dim(*dim, info);
  });
}

Status ModelReader::read_dim(WireReader& reader, TensorInfo& info) {
  int64_t size = -1;
  std::string name;
  OUTPOST_TRY(for_each_field(reader, [&](const WireField& field) -> Status {
    // dim_value and dim_param are a oneof: the last one present wins.
    if (field.number == dim_field::kValue) {
      auto value = read_int(field, "TensorShapeProto.Dimension.dim_value");
      if (!value) return make_error(std::move(value).error());
      size = *value < 0 ? -1 : *value;
      name.clear();
    } else if (field.number == dim_field::kParam) {
      auto value = read_string(field, "TensorShapeProto.Dimension.dim_param");
      if (!value) return make_error(std::move(value).error());
      size = -1;
      name = *value;
    }
    return ok();
  }));
  info.shape.push_back(size);
  info.dim_names.push_back(std::move(name));
  return ok();
}

nlohmann::json tensor_json(const TensorInfo& tensor) {
  return {
      {"name", tensor.name},
      {"type", tensor.elem_type},
      {"shape", tensor.has_shape ? nlohmann::json(tensor.shape) : nlohmann::json(nullptr)},
      {"dim_names", tensor.dim_names},
  };
}

}  // namespace

Result<ModelInfo> parse_onnx_model(std::string_view bytes) { return ModelReader(bytes).read(); }

int64_t default_opset(const ModelInfo& info) {
  int64_t version = 0;
  for (const auto& [domain, opset_version] : info.opsets) {
    if (domain.empty() || domain == "ai.onnx") version = std::max(version, opset_version);
  }
  return version;
}

nlohmann::json to_json(const ModelInfo& info) {
  nlohmann::json opsets = nlohmann::json::array();
  for (const auto& [domain, version] : info.opsets) {
    opsets.push_back({{"domain", domain}, {"version", version}});
  }
  nlohmann::json inputs = nlohmann::json::array();
  for (const auto& input : info.inputs) inputs.push_back(tensor_json(input));
  nlohmann::json outputs = nlohmann::json::array();
  for (const auto& output : info.outputs) outputs.push_back(tensor_json(output));
  const int64_t opset = default_opset(info);
  return {
      {"ir_version", info.ir_version},
      {"opset", opset > 0 ? nlohmann::json(opset) : nlohmann::json(nullptr)},
      {"opsets", std::move(opsets)},
      {"producer", info.producer_name},
      {"producer_version", info.producer_version},
      {"graph", info.graph_name},
      {"inputs", std::move(inputs)},
      {"outputs", std::move(outputs)},
      {"nodes", info.node_count},
      {"initializers", info.initializer_count},
  };
}

Status check_servable(const ModelInfo& info) {
  static constexpr std::array<std::string_view, 15> kServable = {
      "FLOAT",  "DOUBLE", "FLOAT16", "BFLOAT16", "BOOL",  "UINT8",  "UINT16",   "UINT32",
      "UINT64", "INT8",   "INT16",   "INT32",    "INT64", "STRING", "UNDEFINED"};
  for (const auto* side : {&info.inputs, &info.outputs}) {
    const char* what = side == &info.inputs ? "input" : "output";
    for (const auto& value : *side) {
      const std::string& t = value.elem_type;
      if (t == "SEQUENCE" || t == "MAP" || t == "OPTIONAL" || t == "SPARSE_TENSOR") {
        const char* article = t == "OPTIONAL" ? "an " : "a ";
        return make_error(Errc::kInvalidArgument, std::string(what) + " '" + value.name + "' is " +
                                                      article + t +
                                                      "; the model server serves tensors only");
      }
      if (std::find(kServable.begin(), kServable.end(), t) == kServable.end()) {
        return make_error(Errc::kInvalidArgument,
                          std::string(what) + " '" + value.name + "' is a " + t +
                              " tensor; the model server cannot carry that type");
      }
    }
  }
  return ok();
}

}  // namespace outpost::onnx
