#include "agent/serve/tensor.h"

#include <array>
#include <cstring>
#include <utility>

namespace outpost::agent::serve {
namespace {

constexpr std::array<std::pair<DataType, std::string_view>, 13> kNames = {{
    {DataType::kBool, "BOOL"},
    {DataType::kUint8, "UINT8"},
    {DataType::kUint16, "UINT16"},
    {DataType::kUint32, "UINT32"},
    {DataType::kUint64, "UINT64"},
    {DataType::kInt8, "INT8"},
    {DataType::kInt16, "INT16"},
    {DataType::kInt32, "INT32"},
    {DataType::kInt64, "INT64"},
    {DataType::kFp16, "FP16"},
    {DataType::kFp32, "FP32"},
    {DataType::kFp64, "FP64"},
    {DataType::kBytes, "BYTES"},
}};

template <typename T>
double load_as_double(const uint8_t* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return static_cast<double>(value);
}

}  // namespace

std::string_view datatype_name(DataType type) {
  for (const auto& [t, name] : kNames) {
    if (t == type) return name;
  }
  return "UNKNOWN";
}

std::optional<DataType> datatype_from_name(std::string_view name) {
  for (const auto& [t, n] : kNames) {
    if (n == name) return t;
  }
  return std::nullopt;
}

size_t datatype_size(DataType type) {
  switch (type) {
    case DataType::kBool:
    case DataType::kUint8:
    case DataType::kInt8:
      return 1;
    case DataType::kUint16:
    case DataType::kInt16:
    case DataType::kFp16:
      return 2;
    case DataType::kUint32:
    case DataType::kInt32:
    case DataType::kFp32:
      return 4;
    case DataType::kUint64:
    case DataType::kInt64:
    case DataType::kFp64:
      return 8;
    case DataType::kBytes:
    case DataType::kUnknown:
      return 0;
  }
  return 0;
}

std::optional<size_t> element_count(const std::vector<int64_t>& shape, size_t limit) {
  size_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (dim == 0) return size_t{0};
  }
  for (int64_t dim : shape) {
    if (static_cast<uint64_t>(dim) > limit / count) return std::nullopt;
    count *= static_cast<size_t>(dim);
  }
  return count;
}

size_t Tensor::element_count() const {
  size_t size = datatype_size(type);
  return size == 0 ? 0 : data.size() / size;
}

double Tensor::value_as_double(size_t i) const {
  const uint8_t* p = data.data() + i * datatype_size(type);
  switch (type) {
    case DataType::kBool:
      return *p != 0 ? 1.0 : 0.0;
    case DataType::kUint8:
      return load_as_double<uint8_t>(p);
    case DataType::kUint16:
      return load_as_double<uint16_t>(p);
    case DataType::kUint32:
      return load_as_double<uint32_t>(p);
    case DataType::kUint64:
      return load_as_double<uint64_t>(p);
    case DataType::kInt8:
      return load_as_double<int8_t>(p);
    case DataType::kInt16:
      return load_as_double<int16_t>(p);
    case DataType::kInt32:
      return load_as_double<int32_t>(p);
    case DataType::kInt64:
      return load_as_double<int64_t>(p);
    case DataType::kFp32:
      return load_as_double<float>(p);
    case DataType::kFp64:
      return load_as_double<double>(p);
    case DataType::kFp16:
    case DataType::kBytes:
    case DataType::kUnknown:
      return 0.0;
  }
  return 0.0;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ",";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

}  // namespace outpost::agent::serve
