// Tensors as the model server passes them between the wire (Open Inference Protocol JSON) and
// the runtime: a name, a datatype, a shape and the elements as raw little-endian bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace outpost::agent::serve {

// The protocol's tensor datatypes. kBytes and kFp16 are named (a model may declare them)
// but the JSON codec refuses them with a clear error.
enum class DataType {
  kBool,
  kUint8,
  kUint16,
  kUint32,
  kUint64,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
  kFp16,
  kFp32,
  kFp64,
  kBytes,
  kUnknown,
};

// "FP32", "INT64", "BOOL", ... (the protocol's spelling); "UNKNOWN" for kUnknown.
std::string_view datatype_name(DataType type);
// Inverse of datatype_name for the protocol's names; nullopt for anything else.
std::optional<DataType> datatype_from_name(std::string_view name);
// Bytes per element; 0 for kBytes and kUnknown.
size_t datatype_size(DataType type);

// What a model declares for one input or output. -1 marks a dynamic dimension;
// `rank_known` is false when the model does not say how many dimensions there are.
struct TensorSpec {
  std::string name;
  DataType type = DataType::kUnknown;
  std::vector<int64_t> shape;
  bool rank_known = true;

  bool operator==(const TensorSpec&) const = default;
};

struct Tensor {
  std::string name;
  DataType type = DataType::kFp32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // element_count(shape) * datatype_size(type) bytes, row-major

  size_t element_count() const;
  // Element i as a double (bools as 0/1); i must be < element_count().
  double value_as_double(size_t i) const;
};

// Product of the dimensions (1 for a scalar); nullopt when a dimension is negative or the
// product overflows `limit`.
std::optional<size_t> element_count(const std::vector<int64_t>& shape, size_t limit);

// "[-1,4]" for messages.
std::string shape_text(const std::vector<int64_t>& shape);

}  // namespace outpost::agent::serve
