#include "agent/serve/tensor.h"

#include <array>
#include <bit>
#include <cstring>
#include <string_view>
#include <utility>

namespace outpost::agent::serve {
namespace {

constexpr std::array<std::pair<DataType, std::string_view>, 14> kNames = {{
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
    {DataType::kBf16, "BF16"},
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
    case DataType::kBf16:
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

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits = 0;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // infinity or NaN (payload kept)
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa != 0) {
    // Subnormal: normalise into float's wider exponent range.
    int e = -1;
    do {
      ++e;
      mantissa <<= 1;
    } while ((mantissa & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mantissa & 0x3ffu) << 13);
  } else {
    bits = sign;
  }
  return std::bit_cast<float>(bits);
}

uint16_t float_to_half(float f) {
  const auto bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (abs < 0x38800000u) {
    // Half subnormals (and zero): the value in units of 2^-24, rounded to nearest even.
    if (abs < 0x33000000u) return sign;  // under half the smallest subnormal
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // 14..24
    uint32_t value = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (value & 1u))) ++value;
    return static_cast<uint16_t>(sign | value);
  }
  uint32_t value = ((abs >> 23) - 112) << 10 | ((abs >> 13) & 0x3ffu);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (value & 1u))) ++value;  // may carry into exponent
  return static_cast<uint16_t>(sign | value);
}

float bf16_to_float(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

uint16_t float_to_bf16(float f) {
  auto bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

void append_bytes_element(std::vector<uint8_t>& data, std::string_view value) {
  const auto n = static_cast<uint32_t>(value.size());
  const uint8_t prefix[4] = {static_cast<uint8_t>(n), static_cast<uint8_t>(n >> 8),
                             static_cast<uint8_t>(n >> 16), static_cast<uint8_t>(n >> 24)};
  data.insert(data.end(), prefix, prefix + 4);
  data.insert(data.end(), value.begin(), value.end());
}

std::optional<std::vector<std::string_view>> bytes_elements(const std::vector<uint8_t>& data) {
  std::vector<std::string_view> out;
  size_t at = 0;
  while (at < data.size()) {
    if (data.size() - at < 4) return std::nullopt;
    const uint32_t n = static_cast<uint32_t>(data[at]) | static_cast<uint32_t>(data[at + 1]) << 8 |
                       static_cast<uint32_t>(data[at + 2]) << 16 |
                       static_cast<uint32_t>(data[at + 3]) << 24;
    at += 4;
    if (data.size() - at < n) return std::nullopt;
    out.emplace_back(reinterpret_cast<const char*>(data.data() + at), n);
    at += n;
  }
  return out;
}

size_t Tensor::element_count() const {
  if (type == DataType::kBytes) {
    auto elements = bytes_elements(data);
    return elements ? elements->size() : 0;
  }
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
      return half_to_float(static_cast<uint16_t>(p[0] | p[1] << 8));
    case DataType::kBf16:
      return bf16_to_float(static_cast<uint16_t>(p[0] | p[1] << 8));
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
