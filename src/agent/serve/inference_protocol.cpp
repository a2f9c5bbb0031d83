#include "agent/serve/inference_protocol.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "common/json_fields.h"

namespace outpost::agent::serve {
namespace {

using json = nlohmann::json;

tl::unexpected<Error> bad(std::string field, std::string message) {
  return make_error(Errc::kInvalidArgument, std::move(message), std::move(field));
}

std::string spec_text(const TensorSpec& spec) {
  return std::string(datatype_name(spec.type)) + " " +
         (spec.rank_known ? shape_text(spec.shape) : std::string("[...]"));
}

// One JSON value stored as an element of `type` at `out`; false when it does not fit.
bool store_element(const json& v, DataType type, uint8_t* out, std::string& why) {
  auto store_int = [&](auto tag) -> bool {
    using T = decltype(tag);
    if (v.is_number_integer()) {
      if (v.is_number_unsigned()) {
        uint64_t u = v.get<uint64_t>();
        if (u > static_cast<uint64_t>(std::numeric_limits<T>::max())) {
          why = "is out of range";
          return false;
        }
        T t = static_cast<T>(u);
        std::memcpy(out, &t, sizeof(T));
        return true;
      }
      int64_t i = v.get<int64_t>();
      if constexpr (std::is_unsigned_v<T>) {
        if (i < 0) {
          why = "is negative";
          return false;
        }
        if (static_cast<uint64_t>(i) > static_cast<uint64_t>(std::numeric_limits<T>::max())) {
          why = "is out of range";
          return false;
        }
      } else {
        if (i < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
            i > static_cast<int64_t>(std::numeric_limits<T>::max())) {
          why = "is out of range";
          return false;
        }
      }
      T t = static_cast<T>(i);
      std::memcpy(out, &t, sizeof(T));
      return true;
    }
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (std::trunc(d) != d) {
        why = "is not an integer";
        return false;
      }
      // max() + 1 is a power of two and exact as a double; max() itself is not for 64-bit
      // types (it rounds up to 2^63 or 2^64, which a `d > max` test lets through to the cast).
      const double past_max = static_cast<double>(std::numeric_limits<T>::max() / 2 + 1) * 2.0;
      if (d < static_cast<double>(std::numeric_limits<T>::min()) || d >= past_max) {
        why = "is out of range";
        return false;
      }
      T t = static_cast<T>(d);
      std::memcpy(out, &t, sizeof(T));
      return true;
    }
    why = "is " + json_fields::type_name(v) + ", expected a number";
    return false;
  };
  switch (type) {
    case DataType::kBool: {
      bool b = false;
      if (v.is_boolean()) {
        b = v.get<bool>();
      } else if (v.is_number_integer() && (v.get<int64_t>() == 0 || v.get<int64_t>() == 1)) {
        b = v.get<int64_t>() == 1;
      } else {
        why = "is " + json_fields::type_name(v) + ", expected true or false";
        return false;
      }
      *out = b ? 1 : 0;
      return true;
    }
    case DataType::kUint8:
      return store_int(uint8_t{});
    case DataType::kUint16:
      return store_int(uint16_t{});
    case DataType::kUint32:
      return store_int(uint32_t{});
    case DataType::kUint64:
      return store_int(uint64_t{});
    case DataType::kInt8:
      return store_int(int8_t{});
    case DataType::kInt16:
      return store_int(int16_t{});
    case DataType::kInt32:
      return store_int(int32_t{});
    case DataType::kInt64:
      return store_int(int64_t{});
    case DataType::kFp32: {
      if (!v.is_number()) {
        why = "is " + json_fields::type_name(v) + ", expected a number";
        return false;
      }
      // Anything under FLT_MAX + half an ulp (2^128 - 2^103) rounds to FLT_MAX, including
      // FLT_MAX's own shortest form 3.4028235e+38 that the encoder writes; beyond, infinity.
      constexpr double kFp32Overflow = 0x1.ffffffp127;
      double d = v.get<double>();
      if (!(std::fabs(d) < kFp32Overflow)) {
        why = "is out of range for FP32";
        return false;
      }
      float f = static_cast<float>(d);
      std::memcpy(out, &f, sizeof(float));
      return true;
    }
    case DataType::kFp64: {
      if (!v.is_number()) {
        why = "is " + json_fields::type_name(v) + ", expected a number";
        return false;
      }
      double d = v.get<double>();
      std::memcpy(out, &d, sizeof(double));
      return true;
    }
    case DataType::kFp16:
    case DataType::kBf16: {
      if (!v.is_number()) {
        why = "is " + json_fields::type_name(v) + ", expected a number";
        return false;
      }
      // FP16 tops out at 65504 (65520 and beyond round to infinity); BF16 has FP32's range.
      const double d = v.get<double>();
      const double overflow = type == DataType::kFp16 ? 65520.0 : 0x1.ffp127;
      if (!(std::fabs(d) < overflow)) {
        why = std::string("is out of range for ") + (type == DataType::kFp16 ? "FP16" : "BF16");
        return false;
      }
      // Through float: for FP16 the double->float rounding cannot change the half it rounds
      // to except at exact ties of float, which JSON's shortest forms do not produce.
      const float f = static_cast<float>(d);
      const uint16_t bits = type == DataType::kFp16 ? float_to_half(f) : float_to_bf16(f);
      out[0] = static_cast<uint8_t>(bits);
      out[1] = static_cast<uint8_t>(bits >> 8);
      return true;
    }
    case DataType::kBytes:
    case DataType::kUnknown:
      why = "has an unsupported datatype";
      return false;
  }
  return false;
}

// Flattens nested arrays (row-major) into `out` without recursion.
Status read_data(const json& data, const std::string& field, const std::string& input,
                 DataType type, size_t expected, const ProtocolLimits& limits, Tensor& out) {
  const size_t size = datatype_size(type);
  // Grown as values arrive, not sized from the shape: a 60-byte body claiming [16777216]
  // doubles must not cost 128 MB before its values are counted.
  out.data.clear();
  size_t count = 0;
  struct Frame {
    const json* array;
    size_t index;
  };
  std::vector<Frame> stack{{&data, 0}};
  while (!stack.empty()) {
    Frame& top = stack.back();
    if (top.index == top.array->size()) {
      stack.pop_back();
      continue;
    }
    const json& v = (*top.array)[top.index++];
    if (v.is_array()) {
      if (stack.size() >= limits.max_nesting) {
        return bad(field, "input '" + input + "': data is nested deeper than " +
                              std::to_string(limits.max_nesting) + " levels");
      }
      stack.push_back({&v, 0});
      continue;
    }
    if (count >= expected) {
      return bad(field, "input '" + input + "': more values than its shape holds (" +
                            std::to_string(expected) + " expected)");
    }
    std::string why;
    if (type == DataType::kBytes) {
      if (!v.is_string()) {
        return bad(field, "input '" + input + "': value " + std::to_string(count) + " is " +
                              json_fields::type_name(v) + ", expected a string (datatype BYTES)");
      }
      append_bytes_element(out.data, v.get_ref<const std::string&>());
      ++count;
      continue;
    }
    out.data.resize((count + 1) * size);
    if (!store_element(v, type, out.data.data() + count * size, why)) {
      return bad(field, "input '" + input + "': value " + std::to_string(count) + " " + why +
                            " (datatype " + std::string(datatype_name(type)) + ")");
    }
    ++count;
  }
  if (count != expected) {
    return bad(field, "input '" + input + "': " + std::to_string(count) + " values for shape " +
                          shape_text(out.shape) + " (" + std::to_string(expected) + " expected)");
  }
  return ok();
}

// The binary part of a request (binary tensor data extension), consumed input by input.
struct BinaryPart {
  bool present = false;  // the request came with Inference-Header-Content-Length
  std::string_view rest;
};

// The bytes of one binary input, checked against its shape: fixed-size types exactly
// count * size bytes, BYTES exactly `count` length-prefixed elements.
Status read_binary(BinaryPart& part, const json& size_value, const std::string& at,
                   const std::string& input, DataType type, size_t count, Tensor& out) {
  const std::string field = at + ".parameters.binary_data_size";
  if (!part.present) {
    return bad(field, "input '" + input +
                          "': binary_data_size needs the Inference-Header-Content-Length header "
                          "(the length of the JSON part of the body)");
  }
  if (!size_value.is_number_unsigned() &&
      !(size_value.is_number_integer() && size_value.get<int64_t>() >= 0)) {
    return bad(field, "input '" + input + "': expected a byte count >= 0");
  }
  const uint64_t size = size_value.get<uint64_t>();
  if (size > part.rest.size()) {
    return bad(field, "input '" + input + "': " + std::to_string(size) +
                          " bytes announced, the body has " + std::to_string(part.rest.size()) +
                          " left");
  }
  const auto* begin = reinterpret_cast<const uint8_t*>(part.rest.data());
  out.data.assign(begin, begin + size);
  part.rest.remove_prefix(static_cast<size_t>(size));
  if (type == DataType::kBytes) {
    auto elements = bytes_elements(out.data);
    if (!elements) {
      return bad(field, "input '" + input +
                            "': BYTES data is not a sequence of 4-byte lengths and strings");
    }
    if (elements->size() != count) {
      return bad(field, "input '" + input + "': " + std::to_string(elements->size()) +
                            " strings for shape " + shape_text(out.shape) + " (" +
                            std::to_string(count) + " expected)");
    }
    return ok();
  }
  const size_t want = count * datatype_size(type);
  if (size != want) {
    return bad(field, "input '" + input + "': " + std::to_string(size) + " bytes for shape " +
                          shape_text(out.shape) + " of " + std::string(datatype_name(type)) + " (" +
                          std::to_string(want) + " expected)");
  }
  if (type == DataType::kBool) {
    for (uint8_t& b : out.data) b = b != 0 ? 1 : 0;  // the runtime reads bools as 0/1 bytes
  }
  return ok();
}

Result<Tensor> read_input(const json& in, size_t index, const std::vector<TensorSpec>& specs,
                          const ProtocolLimits& limits, BinaryPart& binary,
                          const TensorSpec*& matched) {
  const std::string at = "inputs[" + std::to_string(index) + "]";
  if (!in.is_object()) return bad(at, "expected an object, got " + json_fields::type_name(in));
  auto name = json_fields::required_string(in, "name", at + ".name");
  if (!name) return make_error(name.error());
  matched = nullptr;
  for (const auto& spec : specs) {
    if (spec.name == *name) matched = &spec;
  }
  if (!matched) {
    std::string known;
    for (const auto& spec : specs) known += (known.empty() ? "'" : ", '") + spec.name + "'";
    return bad(at + ".name", "the model has no input '" + *name + "' (it has " + known + ")");
  }
  const TensorSpec& spec = *matched;
  auto datatype = json_fields::required_string(in, "datatype", at + ".datatype");
  if (!datatype) return make_error(datatype.error());
  auto type = datatype_from_name(*datatype);
  if (!type) {
    return bad(at + ".datatype",
               "input '" + *name + "': unknown datatype '" + *datatype +
                   "' (BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES)");
  }
  if (*type != spec.type) {
    return bad(at + ".datatype", "input '" + *name + "': datatype " + *datatype +
                                     ", the model expects " +
                                     std::string(datatype_name(spec.type)));
  }

  if (!in.contains("shape") || !in["shape"].is_array()) {
    return bad(at + ".shape",
               "input '" + *name + "': expected a shape array such as " + shape_text(spec.shape));
  }
  Tensor tensor;
  tensor.name = *name;
  tensor.type = *type;
  for (const auto& d : in["shape"]) {
    // 0 is a real dimension: an empty tensor (no axes to reduce over, an empty batch).
    if (!d.is_number_integer() || d.get<int64_t>() < 0) {
      return bad(at + ".shape", "input '" + *name + "': dimensions must be integers >= 0");
    }
    tensor.shape.push_back(d.get<int64_t>());
    if (tensor.shape.size() > 64) {
      return bad(at + ".shape", "input '" + *name + "': more than 64 dimensions");
    }
  }
  bool fits = !spec.rank_known || spec.shape.size() == tensor.shape.size();
  for (size_t i = 0; fits && spec.rank_known && i < spec.shape.size(); ++i) {
    if (spec.shape[i] >= 0 && spec.shape[i] != tensor.shape[i]) fits = false;
  }
  if (!fits) {
    return bad(at + ".shape", "input '" + *name + "': shape " + shape_text(tensor.shape) +
                                  " does not match the model's " + shape_text(spec.shape));
  }
  auto count = element_count(tensor.shape, limits.max_elements);
  if (!count) {
    return bad(at + ".shape", "input '" + *name + "': shape " + shape_text(tensor.shape) +
                                  " holds more than " + std::to_string(limits.max_elements) +
                                  " values");
  }
  const json* binary_size = nullptr;
  if (auto p = in.find("parameters"); p != in.end()) {
    if (!p->is_object()) return bad(at + ".parameters", "expected an object");
    if (auto b = p->find("binary_data_size"); b != p->end()) binary_size = &*b;
  }
  if (binary_size) {
    if (in.contains("data")) {
      return bad(at + ".data", "input '" + *name +
                                   "': give either data or parameters.binary_data_size, not both");
    }
    OUTPOST_TRY(read_binary(binary, *binary_size, at, *name, *type, *count, tensor));
    return tensor;
  }
  if (!in.contains("data") || !in["data"].is_array()) {
    return bad(at + ".data", "input '" + *name + "': expected a data array");
  }
  OUTPOST_TRY(read_data(in["data"], at + ".data", *name, *type, *count, limits, tensor));
  return tensor;
}

void append_number(std::string& out, double value, DataType type) {
  char buf[64];
  std::to_chars_result r{};
  if (type == DataType::kFp32) {
    float f = static_cast<float>(value);
    if (!std::isfinite(f)) {
      out += "null";
      return;
    }
    r = std::to_chars(buf, buf + sizeof(buf), f);
  } else if (!std::isfinite(value)) {
    out += "null";
    return;
  } else {
    r = std::to_chars(buf, buf + sizeof(buf), value);
  }
  out.append(buf, r.ptr);
  // "-0" reads back as the integer 0 in most JSON libraries; "-0.0" keeps the sign (a
  // recurrent state sent back must be the same bits).
  if (r.ptr - buf == 2 && buf[0] == '-' && buf[1] == '0') out += ".0";
}

void append_element(std::string& out, const Tensor& t, size_t i) {
  const uint8_t* p = t.data.data() + i * datatype_size(t.type);
  char buf[32];
  auto integer = [&](auto tag) {
    using T = decltype(tag);
    T v;
    std::memcpy(&v, p, sizeof(T));
    auto r = std::to_chars(buf, buf + sizeof(buf), v);
    out.append(buf, r.ptr);
  };
  switch (t.type) {
    case DataType::kBool:
      out += *p ? "true" : "false";
      return;
    case DataType::kUint8:
      return integer(uint8_t{});
    case DataType::kUint16:
      return integer(uint16_t{});
    case DataType::kUint32:
      return integer(uint32_t{});
    case DataType::kUint64:
      return integer(uint64_t{});
    case DataType::kInt8:
      return integer(int8_t{});
    case DataType::kInt16:
      return integer(int16_t{});
    case DataType::kInt32:
      return integer(int32_t{});
    case DataType::kInt64:
      return integer(int64_t{});
    case DataType::kFp32:
    case DataType::kFp64:
      return append_number(out, t.value_as_double(i), t.type);
    case DataType::kFp16:
    case DataType::kBf16:
      // Every half and bfloat16 is exactly a float: its shortest float form reads back as it.
      return append_number(out, t.value_as_double(i), DataType::kFp32);
    case DataType::kBytes:
    case DataType::kUnknown:
      out += "null";
      return;
  }
}

// One output's "data" array.
void append_data(std::string& out, const Tensor& t) {
  out += '[';
  if (t.type == DataType::kBytes) {
    auto elements = bytes_elements(t.data);
    size_t k = 0;
    for (std::string_view e : elements.value_or(std::vector<std::string_view>{})) {
      if (k++ > 0) out += ',';
      out += json(std::string(e)).dump(-1, ' ', false, json::error_handler_t::replace);
    }
  } else {
    const size_t n = t.element_count();
    for (size_t i = 0; i < n; ++i) {
      if (i > 0) out += ',';
      append_element(out, t, i);
    }
  }
  out += ']';
}

json shape_json(const TensorSpec& spec) {
  return spec.rank_known ? json(spec.shape) : json::array({-1});
}

}  // namespace

bool InferRequest::wants_binary(const std::string& output) const {
  return binary_all_outputs ||
         std::find(binary_outputs.begin(), binary_outputs.end(), output) != binary_outputs.end();
}

Result<InferRequest> parse_infer_request(std::string_view body,
                                         const std::vector<TensorSpec>& inputs,
                                         const std::vector<TensorSpec>& outputs,
                                         const ProtocolLimits& limits,
                                         std::optional<size_t> json_length) {
  BinaryPart binary;
  if (json_length) {
    if (*json_length > body.size()) {
      return bad("", "Inference-Header-Content-Length is " + std::to_string(*json_length) +
                         " but the body has " + std::to_string(body.size()) + " bytes");
    }
    binary.present = true;
    binary.rest = body.substr(*json_length);
    body = body.substr(0, *json_length);
  }
  if (auto nesting = json_fields::check_nesting(body, "request body", json_fields::kStackSafeDepth);
      !nesting) {
    return make_error(nesting.error());
  }
  json doc;
  try {
    doc = json::parse(body);
  } catch (const json::parse_error& e) {
    return bad("", "the request body is not valid JSON (at byte " + std::to_string(e.byte) + ")");
  } catch (const json::exception&) {
    // nlohmann reports a number beyond a double (1e400) as out_of_range, not parse_error.
    return bad("", "the request body has a number out of range for a double");
  }
  if (!doc.is_object()) {
    return bad("", "the request body must be a JSON object, got " + json_fields::type_name(doc));
  }
  InferRequest request;
  if (doc.contains("id")) {
    if (!doc["id"].is_string()) return bad("id", "expected a string");
    request.id = doc["id"].get<std::string>();
  }
  if (!doc.contains("inputs") || !doc["inputs"].is_array()) {
    return bad("inputs", "expected an array of input tensors");
  }
  const json& list = doc["inputs"];
  request.inputs.resize(inputs.size());
  std::vector<bool> seen(inputs.size(), false);
  for (size_t i = 0; i < list.size(); ++i) {
    const TensorSpec* spec = nullptr;
    auto tensor = read_input(list[i], i, inputs, limits, binary, spec);
    if (!tensor) return make_error(tensor.error());
    size_t slot = static_cast<size_t>(spec - inputs.data());
    if (seen[slot]) {
      return bad("inputs[" + std::to_string(i) + "].name",
                 "input '" + spec->name + "' is given twice");
    }
    seen[slot] = true;
    request.inputs[slot] = std::move(*tensor);
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!seen[i]) {
      return bad("inputs", "missing input '" + inputs[i].name + "' (" + spec_text(inputs[i]) + ")");
    }
  }
  if (!binary.rest.empty()) {
    return bad("inputs", std::to_string(binary.rest.size()) +
                             " bytes of binary data after the last input's binary_data_size");
  }
  if (auto p = doc.find("parameters"); p != doc.end()) {
    if (!p->is_object()) return bad("parameters", "expected an object");
    if (auto b = p->find("binary_data_output"); b != p->end()) {
      if (!b->is_boolean()) return bad("parameters.binary_data_output", "expected true or false");
      request.binary_all_outputs = b->get<bool>();
    }
  }
  if (doc.contains("outputs")) {
    if (!doc["outputs"].is_array()) return bad("outputs", "expected an array of {\"name\": ...}");
    for (size_t i = 0; i < doc["outputs"].size(); ++i) {
      const json& o = doc["outputs"][i];
      const std::string at = "outputs[" + std::to_string(i) + "]";
      if (!o.is_object()) return bad(at, "expected an object, got " + json_fields::type_name(o));
      auto name = json_fields::required_string(o, "name", at + ".name");
      if (!name) return make_error(name.error());
      bool known = false;
      for (const auto& spec : outputs) known = known || spec.name == *name;
      if (!known) return bad(at + ".name", "the model has no output '" + *name + "'");
      request.outputs.push_back(*name);
      if (auto p = o.find("parameters"); p != o.end()) {
        if (!p->is_object()) return bad(at + ".parameters", "expected an object");
        if (auto b = p->find("binary_data"); b != p->end()) {
          if (!b->is_boolean())
            return bad(at + ".parameters.binary_data", "expected true or false");
          if (b->get<bool>()) request.binary_outputs.push_back(*name);
        }
      }
    }
  }
  return request;
}

namespace {

std::string encode(std::string_view model_name, std::string_view model_version, std::string_view id,
                   const std::vector<Tensor>& outputs, const json& parameters,
                   const InferRequest* binary_spec, std::string* binary) {
  std::string out;
  size_t values = 0;
  for (const auto& t : outputs) values += t.data.size();
  out.reserve(128 + (binary ? 64 * outputs.size() : values * 4));
  out += "{\"model_name\":";
  out += json(std::string(model_name)).dump();
  out += ",\"model_version\":";
  out += json(std::string(model_version)).dump();
  if (!id.empty()) {
    out += ",\"id\":";
    out += json(std::string(id)).dump(-1, ' ', false, json::error_handler_t::replace);
  }
  if (parameters.is_object() && !parameters.empty()) {
    out += ",\"parameters\":";
    out += parameters.dump(-1, ' ', false, json::error_handler_t::replace);
  }
  out += ",\"outputs\":[";
  for (size_t k = 0; k < outputs.size(); ++k) {
    const Tensor& t = outputs[k];
    if (k > 0) out += ',';
    out += "{\"name\":";
    out += json(t.name).dump(-1, ' ', false, json::error_handler_t::replace);
    out += ",\"datatype\":\"";
    out += datatype_name(t.type);
    out += "\",\"shape\":";
    out += shape_text(t.shape);
    if (binary_spec && binary && binary_spec->wants_binary(t.name)) {
      out += ",\"parameters\":{\"binary_data_size\":";
      out += std::to_string(t.data.size());
      out += "}}";
      binary->append(reinterpret_cast<const char*>(t.data.data()), t.data.size());
      continue;
    }
    out += ",\"data\":";
    append_data(out, t);
    out += '}';
  }
  out += "]}";
  return out;
}

}  // namespace

std::string encode_infer_response(std::string_view model_name, std::string_view model_version,
                                  std::string_view id, const std::vector<Tensor>& outputs,
                                  const json& parameters) {
  return encode(model_name, model_version, id, outputs, parameters, nullptr, nullptr);
}

EncodedAnswer encode_infer_answer(std::string_view model_name, std::string_view model_version,
                                  const InferRequest& request, const std::vector<Tensor>& outputs,
                                  const json& parameters) {
  std::string binary;
  EncodedAnswer answer;
  answer.body =
      encode(model_name, model_version, request.id, outputs, parameters, &request, &binary);
  bool any_binary = false;
  for (const auto& t : outputs) any_binary = any_binary || request.wants_binary(t.name);
  if (any_binary) {
    answer.json_length = answer.body.size();
    answer.body += binary;
  }
  return answer;
}

json model_metadata(const std::string& name, const std::string& version,
                    const std::vector<TensorSpec>& inputs, const std::vector<TensorSpec>& outputs) {
  auto list = [](const std::vector<TensorSpec>& specs) {
    json out = json::array();
    for (const auto& s : specs) {
      out.push_back({{"name", s.name},
                     {"datatype", std::string(datatype_name(s.type))},
                     {"shape", shape_json(s)}});
    }
    return out;
  };
  return {{"name", name},
          {"versions", json::array({version})},
          {"platform", "onnxruntime_onnx"},
          {"inputs", list(inputs)},
          {"outputs", list(outputs)}};
}

std::string protocol_error_body(const Error& error) {
  json body = {{"error", error.describe()}};
  if (!error.field.empty()) body["field"] = error.field;
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace outpost::agent::serve
