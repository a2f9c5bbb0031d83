// The Open Inference Protocol codec: every datatype through parse -> bytes -> encode -> parse,
// shapes (scalar, dynamic, fixed), and each malformed body refused with the field's path and
// a message naming the input and what was expected -- without allocating for values never sent.
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "agent/serve/inference_protocol.h"
#include "agent/serve/tensor.h"
#include "test_support.h"

namespace outpost::agent::serve {
namespace {

using json = nlohmann::json;
using test_support::tensor_of;

TensorSpec spec(std::string name, DataType type, std::vector<int64_t> shape) {
  return TensorSpec{std::move(name), type, std::move(shape), true};
}

// The Silero-like signature most tests use: a batch of 4-wide rows and a scalar rate.
const std::vector<TensorSpec> kInputs = {spec("input", DataType::kFp32, {-1, 4}),
                                         spec("sr", DataType::kInt64, {})};
const std::vector<TensorSpec> kOutputs = {spec("probabilities", DataType::kFp32, {-1, 3}),
                                          spec("state", DataType::kFp32, {2, -1})};

std::string sr_input(const std::string& sr = "16000") {
  return R"({"name":"sr","datatype":"INT64","shape":[],"data":[)" + sr + "]}";
}

std::string body_with(const std::vector<std::string>& inputs, const std::string& extra = "") {
  std::string body = "{" + extra + (extra.empty() ? "" : ",") + "\"inputs\":[";
  for (size_t i = 0; i < inputs.size(); ++i) body += (i ? "," : "") + inputs[i];
  return body + "]}";
}

// One "input" tensor (FP32 [-1,4] unless told) plus the sr scalar.
std::string input_body(const std::string& shape, const std::string& data,
                       const std::string& datatype = "FP32") {
  return body_with({R"({"name":"input","datatype":")" + datatype + R"(","shape":)" + shape +
                        R"(,"data":)" + data + "}",
                    sr_input()});
}

template <typename T>
std::vector<T> values_of(const Tensor& t) {
  EXPECT_EQ(t.data.size() % sizeof(T), 0u);
  std::vector<T> out(t.data.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), t.data.data(), t.data.size());
  return out;
}

// Checks a refusal: kInvalidArgument, exactly this field, and every fragment in the message.
void expect_refused(const Result<InferRequest>& parsed, const std::string& field,
                    const std::vector<std::string>& fragments) {
  ASSERT_FALSE(parsed.has_value()) << "accepted, expected an error on " << field;
  EXPECT_EQ(parsed.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(parsed.error().field, field) << parsed.error().message;
  for (const auto& fragment : fragments) {
    EXPECT_NE(parsed.error().message.find(fragment), std::string::npos)
        << "'" << parsed.error().message << "' does not mention '" << fragment << "'";
  }
}

// ---------------------------------------------------------------------------------------------
// Valid requests

TEST(ServeProtocol, ParsesFlatAndNestedDataToTheSameRowMajorBytes) {
  auto flat = parse_infer_request(input_body("[2,4]", "[1,2,3,4,5,6,7,8]"), kInputs, kOutputs);
  auto nested =
      parse_infer_request(input_body("[2,4]", "[[1,2,3,4],[5,6,7,8]]"), kInputs, kOutputs);
  ASSERT_TRUE(flat.has_value()) << flat.error().message;
  ASSERT_TRUE(nested.has_value()) << nested.error().message;
  const std::vector<float> expected = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_EQ(values_of<float>(flat->inputs[0]), expected);
  EXPECT_EQ(flat->inputs[0].data, nested->inputs[0].data);
  EXPECT_EQ(flat->inputs[0].shape, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(flat->inputs[0].type, DataType::kFp32);
  EXPECT_EQ(flat->inputs[0].name, "input");
  EXPECT_TRUE(flat->outputs.empty());
  EXPECT_EQ(flat->id, "");

  // Three levels for a rank-3 input.
  const std::vector<TensorSpec> cube = {spec("x", DataType::kInt32, {2, 2, 2})};
  auto deep = parse_infer_request(R"({"inputs":[{"name":"x","datatype":"INT32","shape":[2,2,2],)"
                                  R"("data":[[[1,2],[3,4]],[[5,6],[7,8]]]}]})",
                                  cube, {});
  ASSERT_TRUE(deep.has_value()) << deep.error().message;
  EXPECT_EQ(values_of<int32_t>(deep->inputs[0]), (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}));
}

TEST(ServeProtocol, PutsInputsInTheModelsOrderWhateverTheRequestsOrder) {
  auto parsed = parse_infer_request(
      body_with({sr_input("8000"), R"({"name":"input","datatype":"FP32","shape":[1,4],)"
                                   R"("data":[0.5,0.25,0,-1]})"},
                R"("id":"req-7")"),
      kInputs, kOutputs);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  ASSERT_EQ(parsed->inputs.size(), 2u);
  EXPECT_EQ(parsed->inputs[0].name, "input");
  EXPECT_EQ(parsed->inputs[1].name, "sr");
  EXPECT_EQ(values_of<int64_t>(parsed->inputs[1]), (std::vector<int64_t>{8000}));
  EXPECT_EQ(parsed->id, "req-7");
}

TEST(ServeProtocol, ScalarShapeHoldsOneValue) {
  auto parsed = parse_infer_request(input_body("[1,4]", "[1,2,3,4]"), kInputs, kOutputs);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_TRUE(parsed->inputs[1].shape.empty());
  EXPECT_EQ(parsed->inputs[1].data.size(), sizeof(int64_t));
  EXPECT_EQ(parsed->inputs[1].element_count(), 1u);
  EXPECT_EQ(parsed->inputs[1].value_as_double(0), 16000.0);

  auto two = parse_infer_request(
      body_with({R"({"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]})",
                 R"({"name":"sr","datatype":"INT64","shape":[],"data":[16000,8000]})"}),
      kInputs, kOutputs);
  expect_refused(two, "inputs[1].data", {"'sr'", "1 expected"});
  auto ranked = parse_infer_request(
      body_with({R"({"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]})",
                 R"({"name":"sr","datatype":"INT64","shape":[1],"data":[16000]})"}),
      kInputs, kOutputs);
  expect_refused(ranked, "inputs[1].shape", {"'sr'", "[1]", "[]"});
}

TEST(ServeProtocol, DynamicDimensionsTakeAnyPositiveSizeFixedOnesMustMatch) {
  for (int rows : {1, 2, 7}) {
    std::string data = "[";
    for (int i = 0; i < rows * 4; ++i) data += (i ? "," : "") + std::to_string(i);
    data += "]";
    auto parsed = parse_infer_request(input_body("[" + std::to_string(rows) + ",4]", data), kInputs,
                                      kOutputs);
    ASSERT_TRUE(parsed.has_value()) << rows << ": " << parsed.error().message;
    EXPECT_EQ(parsed->inputs[0].shape, (std::vector<int64_t>{rows, 4}));
    EXPECT_EQ(parsed->inputs[0].element_count(), static_cast<size_t>(rows * 4));
  }
  expect_refused(
      parse_infer_request(input_body("[2,5]", "[1,2,3,4,5,6,7,8,9,10]"), kInputs, kOutputs),
      "inputs[0].shape", {"input 'input'", "shape [2,5] does not match the model's [-1,4]"});
  for (const char* bad_dim : {"[-1,4]", "[1.5,4]", "[\"1\",4]", "[null,4]"}) {
    expect_refused(parse_infer_request(input_body(bad_dim, "[1,2,3,4]"), kInputs, kOutputs),
                   "inputs[0].shape", {"input 'input'", "integers >= 0"});
  }
  // An empty batch is a tensor too: shape [0,4] holds no values.
  auto empty = parse_infer_request(input_body("[0,4]", "[]"), kInputs, kOutputs);
  ASSERT_TRUE(empty.has_value()) << empty.error().message;
  EXPECT_EQ(empty->inputs[0].shape, (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(empty->inputs[0].element_count(), 0u);
  expect_refused(parse_infer_request(input_body("[0,4]", "[1,2,3,4]"), kInputs, kOutputs),
                 "inputs[0].data", {"more values than its shape holds (0 expected)"});
}

TEST(ServeProtocol, WrongRankIsRefusedWithBothShapes) {
  expect_refused(parse_infer_request(input_body("[4]", "[1,2,3,4]"), kInputs, kOutputs),
                 "inputs[0].shape", {"input 'input'", "[4]", "[-1,4]"});
  expect_refused(parse_infer_request(input_body("[1,1,4]", "[1,2,3,4]"), kInputs, kOutputs),
                 "inputs[0].shape", {"input 'input'", "[1,1,4]", "[-1,4]"});
}

TEST(ServeProtocol, UnknownRankAcceptsAnyShape) {
  const std::vector<TensorSpec> any = {TensorSpec{"x", DataType::kUint8, {}, false}};
  auto parsed = parse_infer_request(
      R"({"inputs":[{"name":"x","datatype":"UINT8","shape":[2,1,3],"data":[1,2,3,4,5,6]}]})", any,
      {});
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->inputs[0].shape, (std::vector<int64_t>{2, 1, 3}));
  // Its missing-input message says the rank is not known.
  expect_refused(parse_infer_request(R"({"inputs":[]})", any, {}), "inputs",
                 {"missing input 'x' (UINT8 [...])"});
}

TEST(ServeProtocol, SelectsRequestedOutputs) {
  auto parsed = parse_infer_request(
      input_body("[1,4]", "[1,2,3,4]").insert(1, R"("outputs":[{"name":"state"}],)"), kInputs,
      kOutputs);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(parsed->outputs, (std::vector<std::string>{"state"}));

  auto unknown =
      parse_infer_request(input_body("[1,4]", "[1,2,3,4]")
                              .insert(1, R"("outputs":[{"name":"state"},{"name":"logits"}],)"),
                          kInputs, kOutputs);
  expect_refused(unknown, "outputs[1].name", {"no output 'logits'"});
  expect_refused(
      parse_infer_request(input_body("[1,4]", "[1,2,3,4]").insert(1, R"("outputs":"state",)"),
                          kInputs, kOutputs),
      "outputs", {"expected an array"});
  expect_refused(
      parse_infer_request(input_body("[1,4]", "[1,2,3,4]").insert(1, R"("outputs":["state"],)"),
                          kInputs, kOutputs),
      "outputs[0]", {"expected an object"});
  expect_refused(
      parse_infer_request(input_body("[1,4]", "[1,2,3,4]").insert(1, R"("outputs":[{}],)"), kInputs,
                          kOutputs),
      "outputs[0].name", {"required"});
}

// ---------------------------------------------------------------------------------------------
// Every datatype round-trips: request JSON -> bytes -> response JSON -> request JSON -> bytes.

struct RoundTrip {
  DataType type;
  const char* data;     // as a client sends it
  const char* encoded;  // as the server writes it back
};

std::vector<uint8_t> parse_one(DataType type, const std::string& data, int64_t count) {
  const std::string name(datatype_name(type));
  const std::vector<TensorSpec> specs = {spec("x", type, {-1})};
  auto parsed =
      parse_infer_request(R"({"inputs":[{"name":"x","datatype":")" + name + R"(","shape":[)" +
                              std::to_string(count) + R"(],"data":)" + data + "}]}",
                          specs, {});
  EXPECT_TRUE(parsed.has_value()) << name << " " << data << ": " << parsed.error().message;
  if (!parsed) return {};
  return parsed->inputs[0].data;
}

std::vector<float> as_floats(const std::vector<uint8_t>& bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

template <typename T>
void check_round_trip(DataType type, const char* data, const char* encoded,
                      const std::vector<T>& expected) {
  const std::string name(datatype_name(type));
  SCOPED_TRACE(name);
  const auto count = static_cast<int64_t>(expected.size());
  const std::vector<uint8_t> bytes = parse_one(type, data, count);
  ASSERT_EQ(bytes.size(), expected.size() * sizeof(T));
  EXPECT_EQ(std::memcmp(bytes.data(), expected.data(), bytes.size()), 0);

  Tensor out;
  out.name = "y";
  out.type = type;
  out.shape = {count};
  out.data = bytes;
  const std::string response = encode_infer_response("m", "1", "", {out}, json::object());
  EXPECT_NE(response.find(std::string("\"data\":") + encoded), std::string::npos) << response;
  json doc = json::parse(response);
  json& o = doc["outputs"][0];
  EXPECT_EQ(o["name"], "y");
  EXPECT_EQ(o["datatype"], name);
  EXPECT_EQ(o["shape"], json::array({count}));
  // What the server wrote is a valid request for the same bytes.
  EXPECT_EQ(parse_one(type, o["data"].dump(), count), bytes);
}

TEST(ServeProtocol, EveryDatatypeRoundTrips) {
  check_round_trip<uint8_t>(DataType::kBool, "[true,false,1,0]", "[true,false,true,false]",
                            {1, 0, 1, 0});
  check_round_trip<uint8_t>(DataType::kUint8, "[0,7,255]", "[0,7,255]", {0, 7, 255});
  check_round_trip<uint16_t>(DataType::kUint16, "[0,65535]", "[0,65535]", {0, 65535});
  check_round_trip<uint32_t>(DataType::kUint32, "[0,4294967295]", "[0,4294967295]",
                             {0, 4294967295u});
  check_round_trip<uint64_t>(DataType::kUint64, "[0,18446744073709551615]",
                             "[0,18446744073709551615]", {0, std::numeric_limits<uint64_t>::max()});
  check_round_trip<int8_t>(DataType::kInt8, "[-128,0,127]", "[-128,0,127]", {-128, 0, 127});
  check_round_trip<int16_t>(DataType::kInt16, "[-32768,32767]", "[-32768,32767]", {-32768, 32767});
  check_round_trip<int32_t>(DataType::kInt32, "[-2147483648,2147483647]",
                            "[-2147483648,2147483647]",
                            {std::numeric_limits<int32_t>::min(), 2147483647});
  check_round_trip<int64_t>(
      DataType::kInt64, "[-9223372036854775808,9223372036854775807]",
      "[-9223372036854775808,9223372036854775807]",
      {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()});
  check_round_trip<float>(DataType::kFp32, "[0.1,-2.5,1,0.333333343267]", "[0.1,-2.5,1,0.33333334]",
                          {0.1f, -2.5f, 1.0f, 1.0f / 3.0f});
  check_round_trip<double>(DataType::kFp64, "[0.1,-2.5,1e308,5e-324]", "[0.1,-2.5,1e+308,5e-324]",
                           {0.1, -2.5, 1e308, 5e-324});
}

TEST(ServeProtocol, IntegralFloatsAreAcceptedForIntegerTypes) {
  const std::vector<uint8_t> bytes = parse_one(DataType::kInt32, "[3.0,-4.0,1e3]", 3);
  ASSERT_EQ(bytes.size(), 12u);
  int32_t values[3];
  std::memcpy(values, bytes.data(), sizeof values);
  EXPECT_EQ(values[0], 3);
  EXPECT_EQ(values[1], -4);
  EXPECT_EQ(values[2], 1000);
}

// The encoder's largest and smallest floats must be accepted back: a client may echo an
// output as the next input (a recurrent state does exactly that).
TEST(ServeProtocol, Fp32ExtremesRoundTrip) {
  const std::vector<float> extremes = {
      std::numeric_limits<float>::max(), std::numeric_limits<float>::lowest(),
      std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min()};
  check_round_trip<float>(DataType::kFp32, "[3.4028235e+38,-3.4028235e+38,1.1754944e-38,1e-45]",
                          "[3.4028235e+38,-3.4028235e+38,1.1754944e-38,1e-45]", extremes);
}

// ---------------------------------------------------------------------------------------------
// Refusals

TEST(ServeProtocol, RefusesTheWrongDatatypeNamingBoth) {
  auto parsed = parse_infer_request(
      body_with({R"({"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]})",
                 R"({"name":"sr","datatype":"FP32","shape":[],"data":[16000]})"}),
      kInputs, kOutputs);
  expect_refused(parsed, "inputs[1].datatype",
                 {"input 'sr'", "datatype FP32, the model expects INT64"});
}

TEST(ServeProtocol, RefusesAnUnknownDatatype) {
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,3,4]", "FP8"), kInputs, kOutputs),
                 "inputs[0].datatype", {"input 'input'", "unknown datatype 'FP8'", "FP32"});
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,3,4]", "fp32"), kInputs, kOutputs),
                 "inputs[0].datatype", {"unknown datatype 'fp32'"});
}

// ---------------------------------------------------------------------------------------------
// FP16, BF16 and BYTES in JSON; the binary tensor data extension.

uint16_t u16_at(const std::vector<uint8_t>& d, size_t i) {
  return static_cast<uint16_t>(d[2 * i] | d[2 * i + 1] << 8);
}

TEST(ServeProtocol, HalfAndBfloat16ConversionsRoundToNearestEven) {
  EXPECT_EQ(float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);  // the tie past the largest half: infinity
  EXPECT_EQ(float_to_half(0.1f), 0x2e66);
  EXPECT_EQ(float_to_half(5.9604645e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(float_to_half(2.9802322e-08f), 0x0000);  // exactly half of it: ties to even (0)
  EXPECT_EQ(float_to_half(6.1035156e-05f), 0x0400);  // smallest normal
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(std::nanf("")))));
  // Every half reads back as itself through float.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const float f = half_to_float(bits);
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_half(f), bits) << std::hex << h;
  }
  EXPECT_FLOAT_EQ(half_to_float(0x0001), 5.9604645e-08f);
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.00390625f), 0x3f80);  // halfway between 0x3f80 and 0x3f81: even
  EXPECT_EQ(float_to_bf16(1.01171875f), 0x3f82);  // halfway between 0x3f81 and 0x3f82: even
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

TEST(ServeProtocol, Fp16AndBf16TakeNumbersAndAnswerWithTheFloatTheyHold) {
  for (DataType type : {DataType::kFp16, DataType::kBf16}) {
    const std::string name(datatype_name(type));
    SCOPED_TRACE(name);
    const std::vector<TensorSpec> specs = {spec("h", type, {-1})};
    auto parsed = parse_infer_request(R"({"inputs":[{"name":"h","datatype":")" + name +
                                          R"(","shape":[3],"data":[1, -0.5, 0.1]}]})",
                                      specs, {});
    ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
    const auto& d = parsed->inputs[0].data;
    ASSERT_EQ(d.size(), 6u);
    if (type == DataType::kFp16) {
      EXPECT_EQ(u16_at(d, 0), 0x3c00);
      EXPECT_EQ(u16_at(d, 1), 0xb800);
      EXPECT_EQ(u16_at(d, 2), 0x2e66);
    } else {
      EXPECT_EQ(u16_at(d, 0), 0x3f80);
      EXPECT_EQ(u16_at(d, 1), 0xbf00);
      EXPECT_EQ(u16_at(d, 2), 0x3dcd);
    }
    EXPECT_DOUBLE_EQ(parsed->inputs[0].value_as_double(1), -0.5);
    auto answer = json::parse(encode_infer_response("m", "1", "", parsed->inputs, json::object()));
    EXPECT_EQ(answer["outputs"][0]["datatype"], name);
    // The answer's numbers parse back to the very same bits.
    auto again = parse_infer_request(json({{"inputs",
                                            {{{"name", "h"},
                                              {"datatype", name},
                                              {"shape", {3}},
                                              {"data", answer["outputs"][0]["data"]}}}}})
                                         .dump(),
                                     specs, {});
    ASSERT_TRUE(again.has_value()) << again.error().message;
    EXPECT_EQ(again->inputs[0].data, d);
  }
  const std::vector<TensorSpec> half = {spec("h", DataType::kFp16, {-1})};
  expect_refused(
      parse_infer_request(
          R"({"inputs":[{"name":"h","datatype":"FP16","shape":[1],"data":[70000]}]})", half, {}),
      "inputs[0].data", {"input 'h'", "out of range for FP16"});
  // Asked of an FP32 input, FP16 is simply the wrong datatype.
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,3,4]", "FP16"), kInputs, kOutputs),
                 "inputs[0].datatype", {"datatype FP16, the model expects FP32"});
}

TEST(ServeProtocol, BytesTakeStringsAndAnswerWithThem) {
  const std::vector<TensorSpec> text = {spec("t", DataType::kBytes, {-1, 2})};
  auto parsed = parse_infer_request(
      R"({"inputs":[{"name":"t","datatype":"BYTES","shape":[2,2],"data":[["a",""],["héllo","x y"]]}]})",
      text, {});
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  const Tensor& t = parsed->inputs[0];
  EXPECT_EQ(t.element_count(), 4u);
  auto elements = bytes_elements(t.data);
  ASSERT_TRUE(elements.has_value());
  EXPECT_EQ(*elements, (std::vector<std::string_view>{"a", "", "héllo", "x y"}));
  EXPECT_EQ(t.data.size(), 4u * 4 + 1 + 0 + 6 + 3);
  auto answer = json::parse(encode_infer_response("m", "1", "", {t}, json::object()));
  EXPECT_EQ(answer["outputs"][0]["data"], json({"a", "", "héllo", "x y"}));
  EXPECT_EQ(answer["outputs"][0]["shape"], json({2, 2}));
  expect_refused(
      parse_infer_request(
          R"({"inputs":[{"name":"t","datatype":"BYTES","shape":[1,2],"data":["a",3]}]})", text, {}),
      "inputs[0].data", {"input 't'", "value 1 is a number, expected a string"});
  expect_refused(
      parse_infer_request(
          R"({"inputs":[{"name":"t","datatype":"BYTES","shape":[1,2],"data":["a"]}]})", text, {}),
      "inputs[0].data", {"1 values for shape [1,2] (2 expected)"});
}

// A body in the binary tensor data extension: JSON header, then the raw tensors.
struct BinaryBody {
  std::string body;
  size_t json_length = 0;
};
BinaryBody binary_body(const json& header, const std::string& raw) {
  BinaryBody b;
  b.body = header.dump();
  b.json_length = b.body.size();
  b.body += raw;
  return b;
}
std::string raw_of(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

TEST(ServeProtocol, BinaryExtensionCarriesExactBitsIncludingNanAndInfinity) {
  const std::vector<float> rows = {1.5f, std::numeric_limits<float>::quiet_NaN(),
                                   -std::numeric_limits<float>::infinity(), -0.0f};
  const int64_t sr = 8000;
  const std::string raw = raw_of(rows) + std::string(reinterpret_cast<const char*>(&sr), 8);
  json header = {{"id", "b1"},
                 {"parameters", {{"binary_data_output", true}}},
                 {"inputs",
                  {{{"name", "input"},
                    {"datatype", "FP32"},
                    {"shape", {1, 4}},
                    {"parameters", {{"binary_data_size", 16}}}},
                   {{"name", "sr"},
                    {"datatype", "INT64"},
                    {"shape", json::array()},
                    {"parameters", {{"binary_data_size", 8}}}}}}};
  auto b = binary_body(header, raw);
  auto parsed = parse_infer_request(b.body, kInputs, kOutputs, {}, b.json_length);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(std::memcmp(parsed->inputs[0].data.data(), rows.data(), 16), 0);
  EXPECT_EQ(values_of<int64_t>(parsed->inputs[1]), (std::vector<int64_t>{8000}));
  EXPECT_TRUE(parsed->binary_all_outputs);

  // The answer: JSON header with binary_data_size per output, then the bytes.
  Tensor out = parsed->inputs[0];
  out.name = "probabilities";
  EncodedAnswer answer = encode_infer_answer("m", "1", *parsed, {out}, json::object());
  ASSERT_TRUE(answer.json_length.has_value());
  auto head = json::parse(answer.body.substr(0, *answer.json_length));
  EXPECT_EQ(head["id"], "b1");
  EXPECT_EQ(head["outputs"][0]["parameters"]["binary_data_size"], 16);
  EXPECT_FALSE(head["outputs"][0].contains("data"));
  EXPECT_EQ(answer.body.substr(*answer.json_length), raw_of(rows));

  // Without binary outputs asked, the answer is plain JSON.
  parsed->binary_all_outputs = false;
  EXPECT_FALSE(encode_infer_answer("m", "1", *parsed, {out}, json::object()).json_length);
  parsed->binary_outputs = {"probabilities"};
  EXPECT_TRUE(encode_infer_answer("m", "1", *parsed, {out}, json::object()).json_length);
}

TEST(ServeProtocol, BinaryExtensionRefusesSizesThatDoNotFit) {
  json header = {
      {"inputs",
       {{{"name", "input"},
         {"datatype", "FP32"},
         {"shape", {1, 4}},
         {"parameters", {{"binary_data_size", 12}}}},
        {{"name", "sr"}, {"datatype", "INT64"}, {"shape", json::array()}, {"data", {16000}}}}}};
  auto b = binary_body(header, std::string(12, '\0'));
  expect_refused(parse_infer_request(b.body, kInputs, kOutputs, {}, b.json_length),
                 "inputs[0].parameters.binary_data_size",
                 {"input 'input'", "12 bytes for shape [1,4] of FP32 (16 expected)"});
  header["inputs"][0]["parameters"]["binary_data_size"] = 16;
  b = binary_body(header, std::string(12, '\0'));
  expect_refused(parse_infer_request(b.body, kInputs, kOutputs, {}, b.json_length),
                 "inputs[0].parameters.binary_data_size", {"16 bytes announced", "12 left"});
  b = binary_body(header, std::string(20, '\0'));
  expect_refused(parse_infer_request(b.body, kInputs, kOutputs, {}, b.json_length), "inputs",
                 {"4 bytes of binary data after the last input"});
  // binary_data_size needs the header that says where the JSON ends.
  expect_refused(parse_infer_request(header.dump(), kInputs, kOutputs),
                 "inputs[0].parameters.binary_data_size", {"Inference-Header-Content-Length"});
  expect_refused(parse_infer_request("{}", kInputs, kOutputs, {}, 3), "",
                 {"Inference-Header-Content-Length is 3 but the body has 2 bytes"});
  auto both = header;
  both["inputs"][0]["data"] = {1, 2, 3, 4};
  b = binary_body(both, std::string(16, '\0'));
  expect_refused(parse_infer_request(b.body, kInputs, kOutputs, {}, b.json_length),
                 "inputs[0].data", {"either data or parameters.binary_data_size"});
  // BYTES: length-prefixed strings, as many as the shape holds.
  const std::vector<TensorSpec> text = {spec("t", DataType::kBytes, {-1})};
  std::vector<uint8_t> strings;
  append_bytes_element(strings, std::string("a\0b", 3));
  append_bytes_element(strings, "");
  const std::string raw(strings.begin(), strings.end());
  json text_header = {{"inputs",
                       {{{"name", "t"},
                         {"datatype", "BYTES"},
                         {"shape", {2}},
                         {"parameters", {{"binary_data_size", raw.size()}}}}}}};
  b = binary_body(text_header, raw);
  auto parsed = parse_infer_request(b.body, text, {}, {}, b.json_length);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().message;
  EXPECT_EQ(*bytes_elements(parsed->inputs[0].data),
            (std::vector<std::string_view>{std::string_view("a\0b", 3), ""}));
  text_header["inputs"][0]["shape"] = {3};
  b = binary_body(text_header, raw);
  expect_refused(parse_infer_request(b.body, text, {}, {}, b.json_length),
                 "inputs[0].parameters.binary_data_size", {"2 strings for shape [3] (3 expected)"});
  text_header["inputs"][0]["shape"] = {2};
  text_header["inputs"][0]["parameters"]["binary_data_size"] = raw.size() - 1;
  b = binary_body(text_header, raw.substr(0, raw.size() - 1));
  expect_refused(parse_infer_request(b.body, text, {}, {}, b.json_length),
                 "inputs[0].parameters.binary_data_size", {"not a sequence of 4-byte lengths"});
}

TEST(ServeProtocol, RefusesMissingUnknownAndDuplicateInputs) {
  expect_refused(
      parse_infer_request(
          body_with({R"({"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]})"}),
          kInputs, kOutputs),
      "inputs", {"missing input 'sr' (INT64 [])"});
  expect_refused(parse_infer_request(body_with({sr_input()}), kInputs, kOutputs), "inputs",
                 {"missing input 'input' (FP32 [-1,4])"});
  expect_refused(
      parse_infer_request(
          body_with({sr_input(), R"({"name":"audio","datatype":"FP32","shape":[1],"data":[1]})"}),
          kInputs, kOutputs),
      "inputs[1].name", {"no input 'audio'", "'input', 'sr'"});
  expect_refused(
      parse_infer_request(
          body_with({sr_input(),
                     R"({"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]})",
                     sr_input("8000")}),
          kInputs, kOutputs),
      "inputs[2].name", {"input 'sr' is given twice"});
}

TEST(ServeProtocol, RefusesMalformedBodiesWithTheirField) {
  expect_refused(parse_infer_request("{\"inputs\":[", kInputs, kOutputs), "", {"not valid JSON"});
  expect_refused(parse_infer_request("", kInputs, kOutputs), "", {"not valid JSON"});
  expect_refused(parse_infer_request("[1,2]", kInputs, kOutputs), "",
                 {"must be a JSON object", "a list"});
  expect_refused(parse_infer_request(R"({"id":7,"inputs":[]})", kInputs, kOutputs), "id",
                 {"expected a string"});
  expect_refused(parse_infer_request(R"({"id":"x"})", kInputs, kOutputs), "inputs",
                 {"expected an array"});
  expect_refused(parse_infer_request(R"({"inputs":{"name":"input"}})", kInputs, kOutputs), "inputs",
                 {"expected an array"});
  expect_refused(parse_infer_request(R"({"inputs":[42]})", kInputs, kOutputs), "inputs[0]",
                 {"expected an object, got a number"});
  expect_refused(parse_infer_request(R"({"inputs":[{"datatype":"FP32"}]})", kInputs, kOutputs),
                 "inputs[0].name", {"required"});
  expect_refused(
      parse_infer_request(R"({"inputs":[{"name":"input","shape":[1,4]}]})", kInputs, kOutputs),
      "inputs[0].datatype", {"required"});
  expect_refused(
      parse_infer_request(
          body_with({sr_input(), R"({"name":"input","datatype":"FP32","data":[1,2,3,4]})"}),
          kInputs, kOutputs),
      "inputs[1].shape", {"input 'input'", "shape array", "[-1,4]"});
  expect_refused(
      parse_infer_request(body_with({R"({"name":"input","datatype":"FP32","shape":[1,4]})"}),
                          kInputs, kOutputs),
      "inputs[0].data", {"input 'input'", "data array"});
  expect_refused(parse_infer_request(input_body("[1,4]", "\"1,2,3,4\""), kInputs, kOutputs),
                 "inputs[0].data", {"input 'input'", "data array"});
}

// nlohmann reports a number beyond a double as out_of_range, not parse_error: it must come
// back as an error like any other bad body, not escape as an exception.
TEST(ServeProtocol, RefusesNumbersBeyondADoubleWithoutThrowing) {
  for (const char* body : {R"({"inputs":[],"x":1e400})", R"({"inputs":[{"name":"input",)"
                                                         R"("datatype":"FP32","shape":[1,4],)"
                                                         R"("data":[1,-1e400,3,4]}]})"}) {
    Result<InferRequest> parsed = make_error(Errc::kInternal, "not run");
    EXPECT_NO_THROW(parsed = parse_infer_request(body, kInputs, kOutputs)) << body;
    expect_refused(parsed, "", {"out of range"});
  }
}

TEST(ServeProtocol, RefusesTooFewAndTooManyValues) {
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,3]"), kInputs, kOutputs),
                 "inputs[0].data", {"input 'input'", "3 values for shape [1,4] (4 expected)"});
  expect_refused(parse_infer_request(input_body("[1,4]", "[]"), kInputs, kOutputs),
                 "inputs[0].data", {"0 values for shape [1,4] (4 expected)"});
  expect_refused(parse_infer_request(input_body("[1,4]", "[[1,2],[3,4],[5]]"), kInputs, kOutputs),
                 "inputs[0].data",
                 {"input 'input'", "more values than its shape holds", "4 expected"});
}

TEST(ServeProtocol, RefusesValuesThatAreNotNumbers) {
  expect_refused(parse_infer_request(input_body("[1,4]", R"([1,"2",3,4])"), kInputs, kOutputs),
                 "inputs[0].data",
                 {"input 'input'", "value 1 is a string, expected a number", "FP32"});
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,null,4]"), kInputs, kOutputs),
                 "inputs[0].data", {"value 2 is null"});
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,3,true]"), kInputs, kOutputs),
                 "inputs[0].data", {"value 3 is a boolean"});
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,3,{}]"), kInputs, kOutputs),
                 "inputs[0].data", {"value 3 is an object"});
  const std::vector<TensorSpec> flags = {spec("f", DataType::kBool, {2})};
  expect_refused(
      parse_infer_request(
          R"({"inputs":[{"name":"f","datatype":"BOOL","shape":[2],"data":[true,2]}]})", flags, {}),
      "inputs[0].data", {"input 'f'", "value 1", "expected true or false"});
  expect_refused(parse_infer_request(
                     R"({"inputs":[{"name":"f","datatype":"BOOL","shape":[2],"data":["true",1]}]})",
                     flags, {}),
                 "inputs[0].data", {"value 0 is a string"});
  expect_refused(
      parse_infer_request(body_with({R"({"name":"input","datatype":"FP32","shape":[1,4],)"
                                     R"("data":[1,2,3,4]})",
                                     sr_input("\"16000\"")}),
                          kInputs, kOutputs),
      "inputs[1].data", {"input 'sr'", "value 0 is a string", "INT64"});
}

struct OutOfRange {
  DataType type;
  const char* value;
  const char* why;
};

TEST(ServeProtocol, RefusesIntegersOutOfRangeOrNotIntegral) {
  const std::vector<OutOfRange> cases = {
      {DataType::kUint8, "300", "is out of range"},
      {DataType::kUint8, "256", "is out of range"},
      {DataType::kUint8, "-1", "is negative"},
      {DataType::kUint16, "65536", "is out of range"},
      {DataType::kUint32, "-1", "is negative"},
      {DataType::kUint32, "4294967296", "is out of range"},
      {DataType::kUint64, "-1", "is negative"},
      {DataType::kInt8, "128", "is out of range"},
      {DataType::kInt8, "-129", "is out of range"},
      {DataType::kInt16, "32768", "is out of range"},
      {DataType::kInt32, "2147483648", "is out of range"},
      {DataType::kInt32, "-2147483649", "is out of range"},
      {DataType::kInt64, "9223372036854775808", "is out of range"},
      {DataType::kInt64, "1.5", "is not an integer"},
      {DataType::kInt32, "-0.25", "is not an integer"},
      {DataType::kUint8, "255.5", "is not an integer"},
      {DataType::kUint8, "256.0", "is out of range"},
      {DataType::kInt8, "-129.0", "is out of range"},
      {DataType::kUint16, "-1.0", "is out of range"},
      {DataType::kInt64, "1e19", "is out of range"},
      // Exactly 2^63 and 2^64 as floats: one past the largest value, and not representable.
      {DataType::kInt64, "9223372036854775808.0", "is out of range"},
      {DataType::kInt64, "9.223372036854775807e18", "is out of range"},
      {DataType::kUint64, "18446744073709551616", "is out of range"},
      {DataType::kUint64, "1.8446744073709552e19", "is out of range"},
      {DataType::kInt64, "-9.3e18", "is out of range"},
  };
  for (const auto& c : cases) {
    const std::string name(datatype_name(c.type));
    SCOPED_TRACE(name + " " + c.value);
    const std::vector<TensorSpec> specs = {spec("n", c.type, {2})};
    auto parsed = parse_infer_request(R"({"inputs":[{"name":"n","datatype":")" + name +
                                          R"(","shape":[2],"data":[0,)" + c.value + "]}]}",
                                      specs, {});
    expect_refused(parsed, "inputs[0].data",
                   {"input 'n'", std::string("value 1 ") + c.why, "datatype " + name});
  }
  // The edges themselves are in range.
  EXPECT_EQ(parse_one(DataType::kInt64, "[-9223372036854775808.0]", 1).size(), 8u);
  EXPECT_EQ(parse_one(DataType::kUint64, "[1.8446744073709550e19]", 1).size(), 8u);
}

TEST(ServeProtocol, RefusesFp32Overflow) {
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,1e39,3,4]"), kInputs, kOutputs),
                 "inputs[0].data", {"input 'input'", "value 1 is out of range for FP32"});
  expect_refused(parse_infer_request(input_body("[1,4]", "[1,2,3,-1e39]"), kInputs, kOutputs),
                 "inputs[0].data", {"value 3 is out of range for FP32"});
  // Halfway between FLT_MAX and 2^128 already rounds to infinity; just under it, to FLT_MAX.
  const double halfway = std::ldexp(1.0, 128) - std::ldexp(1.0, 103);
  auto text = [](double d) {
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, d);
    return std::string(buf, r.ptr);
  };
  expect_refused(
      parse_infer_request(input_body("[1,4]", "[" + text(halfway) + ",0,0,0]"), kInputs, kOutputs),
      "inputs[0].data", {"value 0 is out of range for FP32"});
  expect_refused(
      parse_infer_request(input_body("[1,4]", "[0,0,0," + text(-halfway) + "]"), kInputs, kOutputs),
      "inputs[0].data", {"value 3 is out of range for FP32"});
  EXPECT_EQ(
      as_floats(parse_one(DataType::kFp32, "[" + text(std::nextafter(halfway, 0.0)) + "]", 1)),
      std::vector<float>{std::numeric_limits<float>::max()});
  // FP64 takes what FP32 cannot.
  EXPECT_EQ(parse_one(DataType::kFp64, "[1e39]", 1).size(), 8u);
  // Tiny values round towards zero, as a float conversion does.
  EXPECT_EQ(as_floats(parse_one(DataType::kFp32, "[1e-50,-1e-50]", 2)),
            (std::vector<float>{0.0f, -0.0f}));
}

std::string nested_data(size_t depth) {
  return std::string(depth, '[') + "1" + std::string(depth, ']');
}

TEST(ServeProtocol, RefusesDataNestedDeeperThanTheLimit) {
  const std::vector<TensorSpec> one = {TensorSpec{"x", DataType::kFp32, {}, false}};
  auto request = [](size_t depth) {
    return R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":)" + nested_data(depth) +
           "}]}";
  };
  // The data array itself is the first level.
  auto at_limit = parse_infer_request(request(32), one, {});
  ASSERT_TRUE(at_limit.has_value()) << at_limit.error().message;
  EXPECT_EQ(values_of<float>(at_limit->inputs[0]), std::vector<float>{1.0f});
  expect_refused(parse_infer_request(request(33), one, {}), "inputs[0].data",
                 {"input 'x'", "nested deeper than 32 levels"});
  // Far deeper than the limit: refused before the JSON parser runs (nlohmann builds and frees
  // nested values recursively: a million levels overflowed the stack).
  auto far = parse_infer_request(request(20000), one, {});
  ASSERT_FALSE(far.has_value());
  EXPECT_EQ(far.error().code, Errc::kInvalidArgument);
  EXPECT_NE(far.error().message.find("nested deeper than 1024 levels"), std::string::npos)
      << far.error().message;

  ProtocolLimits shallow;
  shallow.max_nesting = 2;
  EXPECT_TRUE(parse_infer_request(request(2), one, {}, shallow).has_value());
  expect_refused(parse_infer_request(request(3), one, {}, shallow), "inputs[0].data",
                 {"nested deeper than 2 levels"});
}

TEST(ServeProtocol, RefusesShapesOverTheElementLimitWithoutAllocating) {
  const std::vector<TensorSpec> any = {spec("x", DataType::kFp64, {-1, -1})};
  auto request = [](const std::string& shape) {
    return R"({"inputs":[{"name":"x","datatype":"FP64","shape":)" + shape + R"(,"data":[1]}]})";
  };
  // The product overflows 64 bits.
  expect_refused(parse_infer_request(request("[4294967296,4294967296]"), any, {}),
                 "inputs[0].shape",
                 {"input 'x'", "shape [4294967296,4294967296] holds more than 16777216 values"});
  expect_refused(parse_infer_request(request("[9223372036854775807,9223372036854775807]"), any, {}),
                 "inputs[0].shape", {"holds more than"});
  // Just over the limit.
  expect_refused(parse_infer_request(request("[4097,4096]"), any, {}), "inputs[0].shape",
                 {"[4097,4096] holds more than 16777216 values"});
  // A dimension past int64 reads as negative: refused as a dimension.
  expect_refused(parse_infer_request(request("[18446744073709551615,1]"), any, {}),
                 "inputs[0].shape", {"integers >= 0"});
  ProtocolLimits tight;
  tight.max_elements = 10;
  expect_refused(parse_infer_request(request("[3,4]"), any, {}, tight), "inputs[0].shape",
                 {"holds more than 10 values"});

  const std::vector<TensorSpec> unranked = {TensorSpec{"x", DataType::kFp32, {}, false}};
  std::string shape = "[1";
  for (int i = 0; i < 64; ++i) shape += ",1";
  shape += "]";
  expect_refused(parse_infer_request(R"({"inputs":[{"name":"x","datatype":"FP32","shape":)" +
                                         shape + R"(,"data":[1]}]})",
                                     unranked, {}),
                 "inputs[0].shape", {"more than 64 dimensions"});
}

// Memory follows the values a request sends, not the shape it claims: a 100-byte body that
// declares a shape of 2^37 doubles within a (generous) limit must be refused for its two
// values, not first cost a terabyte.
TEST(ServeProtocol, ClaimedShapeDoesNotAllocateBeforeTheValuesArrive) {
  ProtocolLimits generous;
  generous.max_elements = size_t{1} << 40;
  const std::vector<TensorSpec> any = {spec("x", DataType::kFp64, {-1})};
  Result<InferRequest> parsed = make_error(Errc::kInternal, "not run");
  EXPECT_NO_THROW(parsed = parse_infer_request(
                      R"({"inputs":[{"name":"x","datatype":"FP64","shape":[137438953472],)"
                      R"("data":[1,2]}]})",
                      any, {}, generous));
  expect_refused(parsed, "inputs[0].data", {"2 values for shape [137438953472]"});
}

// ---------------------------------------------------------------------------------------------
// Encoding

TEST(ServeProtocol, EncodesFloatsInTheirShortestForm) {
  const Tensor f32 =
      tensor_of<float>("p", DataType::kFp32, {1, 5}, {0.1f, 1.0f, -2.5f, 1e-7f, 123456.79f});
  const Tensor f64 = tensor_of<double>("d", DataType::kFp64, {2}, {0.1, 1.0 / 3.0});
  const std::string out = encode_infer_response("m", "1", "", {f32, f64}, json::object());
  EXPECT_NE(out.find(R"("data":[0.1,1,-2.5,1e-07,123456.79])"), std::string::npos) << out;
  EXPECT_NE(out.find(R"("data":[0.1,0.3333333333333333])"), std::string::npos) << out;
  EXPECT_NE(out.find(R"("shape":[1,5])"), std::string::npos) << out;
}

TEST(ServeProtocol, NegativeZeroKeepsItsSign) {
  const Tensor f32 = tensor_of<float>("p", DataType::kFp32, {3}, {-0.0f, 0.0f, -1.0f});
  const Tensor f64 = tensor_of<double>("d", DataType::kFp64, {1}, {-0.0});
  const json doc = json::parse(encode_infer_response("m", "1", "", {f32, f64}, json::object()));
  EXPECT_EQ(doc["outputs"][0]["data"].dump(), "[-0.0,0,-1]");
  EXPECT_TRUE(std::signbit(doc["outputs"][0]["data"][0].get<double>()));
  EXPECT_TRUE(std::signbit(doc["outputs"][1]["data"][0].get<double>()));
}

TEST(ServeProtocol, EncodedFloatsReadBackBitForBit) {
  // A spread of float bit patterns, including subnormals and values near the extremes.
  uint32_t state = 12345;
  std::vector<float> values;
  while (values.size() < 2000) {
    state = state * 1664525u + 1013904223u;
    float f;
    std::memcpy(&f, &state, sizeof f);
    if (std::isfinite(f)) values.push_back(f);
  }
  const Tensor t =
      tensor_of<float>("p", DataType::kFp32, {static_cast<int64_t>(values.size())}, values);
  json doc = json::parse(encode_infer_response("m", "1", "", {t}, json::object()));
  json& data = doc["outputs"][0]["data"];
  ASSERT_EQ(data.size(), values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    const float back = static_cast<float>(data[i].get<double>());
    ASSERT_EQ(std::memcmp(&back, &values[i], sizeof back), 0)
        << i << ": " << values[i] << " printed as " << data[i].dump();
  }
}

TEST(ServeProtocol, EncodesNanAndInfinityAsNull) {
  const float inf = std::numeric_limits<float>::infinity();
  const Tensor f32 = tensor_of<float>("p", DataType::kFp32, {4}, {std::nanf(""), inf, -inf, 0.5f});
  const Tensor f64 = tensor_of<double>(
      "d", DataType::kFp64, {3}, {std::nan(""), -std::numeric_limits<double>::infinity(), 2.0});
  const std::string out = encode_infer_response("m", "1", "", {f32, f64}, json::object());
  EXPECT_NE(out.find(R"("data":[null,null,null,0.5])"), std::string::npos) << out;
  EXPECT_NE(out.find(R"("data":[null,null,2])"), std::string::npos) << out;
  EXPECT_TRUE(json::accept(out)) << out;
}

TEST(ServeProtocol, EchoesTheIdOnlyWhenGivenAndIncludesParameters) {
  const Tensor t = tensor_of<int64_t>("n", DataType::kInt64, {}, {42});
  json without = json::parse(encode_infer_response("m", "2", "", {t}, json::object()));
  EXPECT_FALSE(without.contains("id"));
  EXPECT_FALSE(without.contains("parameters"));
  EXPECT_EQ(without["model_name"], "m");
  EXPECT_EQ(without["model_version"], "2");
  EXPECT_EQ(without["outputs"][0]["shape"], json::array());
  EXPECT_EQ(without["outputs"][0]["data"], json::array({42}));
  EXPECT_FALSE(
      json::parse(encode_infer_response("m", "2", "", {t}, json(nullptr))).contains("parameters"));

  json params = {{"fallback", true}, {"fallback_reason", "say \"why\"\n"}};
  json with = json::parse(encode_infer_response("m\"odel", "2", "r-1\\", {t}, params));
  EXPECT_EQ(with["id"], "r-1\\");
  EXPECT_EQ(with["model_name"], "m\"odel");
  EXPECT_EQ(with["parameters"], params);

  // No outputs is still a well-formed answer.
  json empty = json::parse(encode_infer_response("m", "2", "", {}, json::object()));
  EXPECT_EQ(empty["outputs"], json::array());
}

TEST(ServeProtocol, ModelMetadataAndErrorBody) {
  const std::vector<TensorSpec> in = {spec("input", DataType::kFp32, {-1, 4}),
                                      TensorSpec{"any", DataType::kUint8, {}, false}};
  json meta = model_metadata("clf", "3", in, kOutputs);
  EXPECT_EQ(meta["name"], "clf");
  EXPECT_EQ(meta["versions"], json::array({"3"}));
  EXPECT_EQ(meta["platform"], "onnxruntime_onnx");
  EXPECT_EQ(meta["inputs"][0], (json{{"name", "input"}, {"datatype", "FP32"}, {"shape", {-1, 4}}}));
  EXPECT_EQ(meta["inputs"][1]["shape"], json::array({-1}));
  EXPECT_EQ(meta["outputs"][1]["name"], "state");

  json body = json::parse(
      protocol_error_body(Error{Errc::kInvalidArgument, "input 'x': bad", "inputs[0].shape"}));
  EXPECT_EQ(body["error"], "inputs[0].shape: input 'x': bad");
  EXPECT_EQ(body["field"], "inputs[0].shape");
  EXPECT_FALSE(
      json::parse(protocol_error_body(Error{Errc::kInternal, "boom", ""})).contains("field"));
}

TEST(ServeProtocol, ElementCountAndShapeText) {
  EXPECT_EQ(element_count({}, 10), std::optional<size_t>(1));
  EXPECT_EQ(element_count({2, 3}, 10), std::optional<size_t>(6));
  EXPECT_EQ(element_count({2, 0, 4294967296}, 10), std::optional<size_t>(0));
  EXPECT_EQ(element_count({11}, 10), std::nullopt);
  EXPECT_EQ(element_count({-1, 4}, 100), std::nullopt);
  EXPECT_EQ(element_count({4294967296, 4294967296}, SIZE_MAX), std::nullopt);
  EXPECT_EQ(shape_text({-1, 4}), "[-1,4]");
  EXPECT_EQ(shape_text({}), "[]");
  EXPECT_EQ(datatype_from_name("INT64"), DataType::kInt64);
  EXPECT_EQ(datatype_from_name("int64"), std::nullopt);
  EXPECT_EQ(datatype_name(DataType::kUnknown), "UNKNOWN");
  EXPECT_EQ(datatype_size(DataType::kBytes), 0u);
}

}  // namespace
}  // namespace outpost::agent::serve
