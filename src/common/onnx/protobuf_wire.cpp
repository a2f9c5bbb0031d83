#include "common/onnx/protobuf_wire.h"

#include <cstring>

namespace outpost::onnx {

namespace {

constexpr size_t kMaxVarintBytes = 10;
constexpr uint32_t kMaxFieldNumber = (1u << 29) - 1;

std::string at(size_t offset) { return " at byte offset " + std::to_string(offset); }

enum class VarintStatus { kOk, kTruncated, kTooLong, kOverflow };

// Decodes the varint at buf[pos], advancing pos past it on success.
VarintStatus decode_varint(std::string_view buf, size_t& pos, uint64_t& value) {
  size_t p = pos;
  uint64_t result = 0;
  for (size_t i = 0; i < kMaxVarintBytes; ++i) {
    if (p >= buf.size()) return VarintStatus::kTruncated;
    const auto byte = static_cast<uint8_t>(buf[p++]);
    // The tenth byte holds only bit 63; anything more would not fit in 64 bits.
    if (i == kMaxVarintBytes - 1 && (byte & 0x7e) != 0) return VarintStatus::kOverflow;
    result |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
    if ((byte & 0x80) == 0) {
      pos = p;
      value = result;
      return VarintStatus::kOk;
    }
  }
  return VarintStatus::kTooLong;
}

// Built only on the error path, so reading a valid file formats no strings.
Error varint_error(VarintStatus status, const std::string& what, size_t offset) {
  std::string message;
  switch (status) {
    case VarintStatus::kTruncated:
      message = "truncated " + what + at(offset) + ": the data ends inside it";
      break;
    case VarintStatus::kTooLong:
      message = what + at(offset) + " is longer than 10 bytes";
      break;
    case VarintStatus::kOverflow:
    case VarintStatus::kOk:
      message = what + at(offset) + " overflows 64 bits";
      break;
  }
  return Error{Errc::kInvalidArgument, std::move(message), {}};
}

std::string field_name(uint32_t number, size_t offset) {
  return "field " + std::to_string(number) + at(offset);
}

}  // namespace

std::string_view wire_type_name(WireType type) {
  switch (type) {
    case WireType::kVarint:
      return "varint";
    case WireType::kFixed64:
      return "fixed64";
    case WireType::kLen:
      return "length-delimited";
    case WireType::kStartGroup:
      return "start-group";
    case WireType::kEndGroup:
      return "end-group";
    case WireType::kFixed32:
      return "fixed32";
  }
  return "unknown";
}

Result<WireField> WireReader::next() {
  size_t pos = pos_;
  WireField field;
  field.offset = base_ + pos;
  uint64_t tag = 0;
  if (auto status = decode_varint(buf_, pos, tag); status != VarintStatus::kOk) {
    return make_error(varint_error(status, "field tag", field.offset));
  }
  if ((tag >> 3) > kMaxFieldNumber) {
    return make_error(Errc::kInvalidArgument,
                      "field tag " + std::to_string(tag) + at(field.offset) + " is out of range");
  }
  field.number = static_cast<uint32_t>(tag >> 3);
  const auto type = static_cast<uint8_t>(tag & 7);
  if (field.number == 0) {
    return make_error(Errc::kInvalidArgument,
                      "field number 0" + at(field.offset) + " (field numbers start at 1)");
  }
  if (type == 3 || type == 4) {
    return make_error(Errc::kInvalidArgument, field_name(field.number, field.offset) +
                                                  " has wire type " + std::to_string(type) +
                                                  " (group), which ONNX files do not use");
  }
  if (type > 5) {
    return make_error(Errc::kInvalidArgument, field_name(field.number, field.offset) +
                                                  " has unknown wire type " + std::to_string(type));
  }
  field.type = static_cast<WireType>(type);
  switch (field.type) {
    case WireType::kVarint: {
      const size_t value_offset = base_ + pos;
      if (auto status = decode_varint(buf_, pos, field.value); status != VarintStatus::kOk) {
        return make_error(varint_error(
            status, "varint value of field " + std::to_string(field.number), value_offset));
      }
      break;
    }
    case WireType::kFixed64:
    case WireType::kFixed32: {
      const size_t width = field.type == WireType::kFixed64 ? 8 : 4;
      const size_t remaining = buf_.size() - pos;
      if (remaining < width) {
        return make_error(Errc::kInvalidArgument, std::string(wire_type_name(field.type)) + " " +
                                                      field_name(field.number, field.offset) +
                                                      " needs " + std::to_string(width) +
                                                      " bytes but only " +
                                                      std::to_string(remaining) + " remain");
      }
      uint64_t value = 0;
      for (size_t i = 0; i < width; ++i) {
        value |= static_cast<uint64_t>(static_cast<uint8_t>(buf_[pos + i])) << (8 * i);
      }
      pos += width;
      field.value = value;
      break;
    }
    case WireType::kLen: {
      const size_t length_offset = base_ + pos;
      uint64_t length = 0;
      if (auto status = decode_varint(buf_, pos, length); status != VarintStatus::kOk) {
        return make_error(
            varint_error(status, "length of field " + std::to_string(field.number), length_offset));
      }
      const size_t remaining = buf_.size() - pos;
      if (length > remaining) {
        return make_error(Errc::kInvalidArgument, "length " + std::to_string(length) + " of " +
                                                      field_name(field.number, field.offset) +
                                                      " runs past the end of its message (" +
                                                      std::to_string(remaining) + " bytes remain)");
      }
      field.payload_offset = base_ + pos;
      field.bytes = buf_.substr(pos, static_cast<size_t>(length));
      pos += static_cast<size_t>(length);
      break;
    }
    case WireType::kStartGroup:
    case WireType::kEndGroup:
      break;  // refused above
  }
  pos_ = pos;
  return field;
}

Result<WireReader> WireReader::nested(const WireField& field) const {
  if (field.type != WireType::kLen) {
    return make_error(Errc::kInvalidArgument, "field " + std::to_string(field.number) +
                                                  at(field.offset) + " has wire type " +
                                                  std::string(wire_type_name(field.type)) +
                                                  ", expected a length-delimited message");
  }
  if (depth_ + 1 > kMaxDepth) {
    return make_error(Errc::kInvalidArgument, "message" + at(field.payload_offset) +
                                                  " is nested deeper than " +
                                                  std::to_string(kMaxDepth) + " levels");
  }
  return WireReader(field.bytes, field.payload_offset, depth_ + 1);
}

void WireWriter::put_varint(uint64_t value) {
  while (value >= 0x80) {
    out_.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out_.push_back(static_cast<char>(value));
}

void WireWriter::add_tag(uint32_t number, WireType type) {
  put_varint((static_cast<uint64_t>(number) << 3) | static_cast<uint64_t>(type));
}

void WireWriter::add_varint(uint32_t number, uint64_t value) {
  add_tag(number, WireType::kVarint);
  put_varint(value);
}

void WireWriter::add_fixed32(uint32_t number, uint32_t value) {
  add_tag(number, WireType::kFixed32);
  for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

void WireWriter::add_float(uint32_t number, float value) {
  uint32_t bits = 0;
  static_assert(sizeof(bits) == sizeof(value));
  std::memcpy(&bits, &value, sizeof(bits));
  add_fixed32(number, bits);
}

void WireWriter::add_bytes(uint32_t number, std::string_view bytes) {
  add_tag(number, WireType::kLen);
  put_varint(bytes.size());
  out_.append(bytes);
}

}  // namespace outpost::onnx
