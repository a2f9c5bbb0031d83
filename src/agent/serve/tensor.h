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

// The protocol's tensor datatypes (BF16 as Triton spells it). Every one is carried by the
// JSON encoding and by the binary tensor data extension; kUnknown (a type the runtime has and
// the protocol does not) is refused.
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
  kBf16,
  kFp32,
  kFp64,
  kBytes,  // strings: each element a 4-byte little-endian length, then its bytes
  kUnknown,
};

// "FP32", "INT64", "BOOL", ... (the protocol's spelling); "UNKNOWN" for kUnknown.
std::string_view datatype_name(DataType type);
// Inverse of datatype_name for the protocol's names; nullopt for anything else.
std::optional<DataType> datatype_from_name(std::string_view name);
// Bytes per element; 0 for kBytes (variable) and kUnknown.
size_t datatype_size(DataType type);

// IEEE half and bfloat16 from and to float, rounding to nearest even (NaN stays NaN; a value
// past the type's range becomes infinity).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);

// Appends one kBytes element (length prefix and bytes) to `data`.
void append_bytes_element(std::vector<uint8_t>& data, std::string_view value);
// The elements of a kBytes buffer, or nullopt when it is not a whole sequence of
// length-prefixed elements. Views point into `data`.
std::optional<std::vector<std::string_view>> bytes_elements(const std::vector<uint8_t>& data);

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
  // Row-major: element_count(shape) * datatype_size(type) bytes, little-endian; for kBytes
  // the length-prefixed elements one after another.
  std::vector<uint8_t> data;

  // Elements held (for kBytes, those whose prefixes read whole).
  size_t element_count() const;
  // Element i as a double (bools as 0/1, 0 for kBytes); i must be < element_count().
  double value_as_double(size_t i) const;
};

// Product of the dimensions (1 for a scalar); nullopt when a dimension is negative or the
// product overflows `limit`.
std::optional<size_t> element_count(const std::vector<int64_t>& shape, size_t limit);

// "[-1,4]" for messages.
std::string shape_text(const std::vector<int64_t>& shape);

}  // namespace outpost::agent::serve
