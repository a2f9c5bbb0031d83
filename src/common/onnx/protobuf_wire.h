// Protocol Buffers wire format, only the subset ONNX files need: a bounds-checked reader
// that walks the fields of one message, and a writer that appends fields to a byte string.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "common/error.h"

namespace outpost::onnx {

// The wire types of the protobuf encoding. Groups (3, 4) are deprecated and never appear in
// ONNX files; the reader refuses them, as it refuses the undefined types 6 and 7.
enum class WireType : uint8_t {
  kVarint = 0,
  kFixed64 = 1,
  kLen = 2,
  kStartGroup = 3,
  kEndGroup = 4,
  kFixed32 = 5,
};

// "varint", "fixed64", "length-delimited", ...
std::string_view wire_type_name(WireType type);

// One field as read off the wire.
struct WireField {
  uint32_t number = 0;
  WireType type = WireType::kVarint;
  uint64_t value = 0;         // kVarint: the decoded varint; kFixed32/kFixed64: the raw bits
  std::string_view bytes;     // kLen: the payload, a view into the reader's buffer
  size_t offset = 0;          // absolute byte offset of the field's tag
  size_t payload_offset = 0;  // absolute byte offset of `bytes`

  // A varint field read as a protobuf int64/int32 (two's complement).
  int64_t as_int64() const { return static_cast<int64_t>(value); }
};

// Reads the fields of one message in order. It never reads outside its buffer: a truncated
// varint, a varint longer than 10 bytes or overflowing 64 bits, a length running past the end
// of the message, a group or undefined wire type, or field number 0 is an error whose message
// names the absolute byte offset ("length 300 of field 7 at byte offset 12 runs past ...").
// Offsets are absolute because nested readers carry the offset of their payload.
class WireReader {
 public:
  // Nested messages deeper than this are refused, so a reader driven by a recursive schema
  // cannot be made to recurse without bound.
  static constexpr int kMaxDepth = 32;

  explicit WireReader(std::string_view message, size_t base_offset = 0, int depth = 0)
      : buf_(message), base_(base_offset), depth_(depth) {}

  bool at_end() const { return pos_ >= buf_.size(); }
  // Absolute byte offset of the next field.
  size_t offset() const { return base_ + pos_; }
  int depth() const { return depth_; }

  // Reads the next field; call only when !at_end(). After an error the reader stays where
  // the bad field started, so callers stop there.
  [[nodiscard]] Result<WireField> next();

  // A reader over a length-delimited field's payload, one nesting level deeper.
  [[nodiscard]] Result<WireReader> nested(const WireField& field) const;

 private:
  std::string_view buf_;
  size_t pos_ = 0;
  size_t base_ = 0;
  int depth_ = 0;
};

// Appends fields to a message, in the order they are added (protobuf readers accept any
// order; callers add them in field-number order to match what libprotobuf writes).
class WireWriter {
 public:
  void add_varint(uint32_t number, uint64_t value);
  // int64/int32/enum fields: negative values take ten bytes, as in libprotobuf.
  void add_int64(uint32_t number, int64_t value) {
    add_varint(number, static_cast<uint64_t>(value));
  }
  void add_fixed32(uint32_t number, uint32_t value);
  void add_float(uint32_t number, float value);
  // string and bytes fields.
  void add_bytes(uint32_t number, std::string_view bytes);
  void add_message(uint32_t number, const WireWriter& message) {
    add_bytes(number, message.bytes());
  }

  const std::string& bytes() const { return out_; }
  std::string release() { return std::move(out_); }

 private:
  void add_tag(uint32_t number, WireType type);
  void put_varint(uint64_t value);

  std::string out_;
};

}  // namespace outpost::onnx
