#include "server/deployments/manifest.h"
#include "common/json_fields.h"
#include "common/units.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <iterator>
#include <limits>
#include <set>
#include <utility>

#include <yaml-cpp/yaml.h>

#include "common/digest.h"

namespace outpost::deployments {
namespace {

using json = nlohmann::json;

// Bounds for hostile input: manifests are small, so these only stop resource abuse
// (deep nesting, alias bombs that expand into millions of nodes).
constexpr int kMaxDepth = 64;
// Before parsing at all: what the parsers may build recursively without harm; the finer
// kMaxDepth check (with the path) runs while parsing.
using json_fields::kStackSafeDepth;
constexpr size_t kMaxNodes = 100'000;

// ---------------------------------------------------------------------------------------
// Document parsing

tl::unexpected<Error> syntax_error(std::string message) {
  return make_error(Errc::kInvalidArgument, std::move(message));
}

std::string at_mark(const YAML::Mark& mark) {
  return "line " + std::to_string(mark.line + 1) + ", column " + std::to_string(mark.column + 1);
}

// Offset of the first byte that is not part of valid UTF-8, or npos.
size_t invalid_utf8_offset(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t min = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, min = 0x80, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, min = 0x800, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, min = 0x10000, cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > s.size()) return i;
    for (size_t k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

bool all_of_chars(std::string_view s, bool (*pred)(char)) {
  return !s.empty() && std::all_of(s.begin(), s.end(), pred);
}
bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_octal(char c) { return c >= '0' && c <= '7'; }
bool is_hex(char c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
bool is_lower(char c) { return c >= 'a' && c <= 'z'; }
bool is_alpha(char c) { return is_lower(c) || (c >= 'A' && c <= 'Z'); }

// YAML 1.2 core schema resolution of a plain scalar: null, bool, int, float, else string.
json resolve_plain_scalar(const std::string& s) {
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;

  std::string_view body = s;
  bool negative = false;
  if (!body.empty() && (body[0] == '-' || body[0] == '+')) {
    negative = body[0] == '-';
    body.remove_prefix(1);
  }
  // Integers: [-+]?[0-9]+ | 0o[0-7]+ | 0x[0-9a-fA-F]+
  int base = 0;
  std::string_view digits;
  if (all_of_chars(body, is_digit)) {
    base = 10, digits = body;
  } else if (s.size() > 2 && s[0] == '0' && s[1] == 'o' && all_of_chars(s.substr(2), is_octal)) {
    base = 8, digits = std::string_view(s).substr(2);
  } else if (s.size() > 2 && s[0] == '0' && s[1] == 'x' && all_of_chars(s.substr(2), is_hex)) {
    base = 16, digits = std::string_view(s).substr(2);
  }
  if (base != 0) {
    uint64_t magnitude = 0;
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), magnitude, base);
    if (ec == std::errc() && end == digits.data() + digits.size()) {
      constexpr auto kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      if (!negative && magnitude <= kMax) return static_cast<int64_t>(magnitude);
      if (!negative) return magnitude;
      if (magnitude <= kMax + 1) {
        return magnitude == kMax + 1 ? std::numeric_limits<int64_t>::min()
                                     : -static_cast<int64_t>(magnitude);
      }
    }
    // Too large for 64 bits: fall through and read it as a float.
  }
  // Floats: [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
  // (.inf and .nan have no JSON form; they stay strings.)
  size_t i = 0;
  size_t int_digits = 0;
  size_t frac_digits = 0;
  while (i < body.size() && is_digit(body[i])) ++i, ++int_digits;
  if (i < body.size() && body[i] == '.') {
    ++i;
    while (i < body.size() && is_digit(body[i])) ++i, ++frac_digits;
  }
  bool mantissa_ok = int_digits > 0 || frac_digits > 0;
  if (mantissa_ok && i < body.size() && (body[i] == 'e' || body[i] == 'E')) {
    ++i;
    if (i < body.size() && (body[i] == '-' || body[i] == '+')) ++i;
    size_t exp_digits = 0;
    while (i < body.size() && is_digit(body[i])) ++i, ++exp_digits;
    if (exp_digits == 0) mantissa_ok = false;
  }
  if (mantissa_ok && i == body.size()) {
    double value = 0;
    auto [end, ec] =
        std::from_chars(body.data(), body.data() + body.size(), value, std::chars_format::general);
    if (ec == std::errc() && end == body.data() + body.size() && std::isfinite(value)) {
      return negative ? -value : value;
    }
  }
  return s;
}

class YamlToJson {
 public:
  Result<json> convert(const YAML::Node& node, int depth) {
    if (++nodes_ > kMaxNodes) {
      return syntax_error("invalid YAML at " + at_mark(node.Mark()) +
                          ": the document is too large (over " + std::to_string(kMaxNodes) +
                          " values; are aliases expanding?)");
    }
    if (depth > kMaxDepth) {
      return syntax_error("invalid YAML at " + at_mark(node.Mark()) + ": nested more than " +
                          std::to_string(kMaxDepth) + " levels deep");
    }
    switch (node.Type()) {
      case YAML::NodeType::Undefined:
      case YAML::NodeType::Null:
        return nullptr;
      case YAML::NodeType::Scalar:
        return scalar(node);
      case YAML::NodeType::Sequence: {
        json out = json::array();
        for (const auto& item : node) {
          auto value = convert(item, depth + 1);
          if (!value) return value;
          out.push_back(std::move(*value));
        }
        return out;
      }
      case YAML::NodeType::Map: {
        json out = json::object();
        for (auto it = node.begin(); it != node.end(); ++it) {
          // Copies: the iterator hands out a temporary pair, references to it would dangle.
          const YAML::Node key = it->first;
          const YAML::Node value_node = it->second;
          if (!key.IsScalar()) {
            return syntax_error("invalid YAML at " + at_mark(key.Mark()) +
                                ": map keys must be plain text");
          }
          const std::string& name = key.Scalar();
          if (out.contains(name)) {
            return syntax_error("invalid YAML at " + at_mark(key.Mark()) + ": duplicate key \"" +
                                name + "\"");
          }
          auto value = convert(value_node, depth + 1);
          if (!value) return value;
          out[name] = std::move(*value);
        }
        return out;
      }
    }
    return nullptr;
  }

 private:
  static Result<json> scalar(const YAML::Node& node) {
    const std::string& tag = node.Tag();
    const std::string& text = node.Scalar();
    static const std::string kCore = "tag:yaml.org,2002:";
    if (tag == "!" || tag == kCore + "str") return json(text);
    if (tag == "?" || tag.empty()) return resolve_plain_scalar(text);
    json value = resolve_plain_scalar(text);
    bool fits = (tag == kCore + "int" && value.is_number_integer()) ||
                (tag == kCore + "float" && value.is_number()) ||
                (tag == kCore + "bool" && value.is_boolean()) ||
                (tag == kCore + "null" && value.is_null());
    if (fits) {
      if (tag == kCore + "float") return json(value.get<double>());
      return value;
    }
    if (tag.rfind(kCore, 0) == 0 && tag != kCore + "str") {
      return syntax_error("invalid YAML at " + at_mark(node.Mark()) + ": \"" + text +
                          "\" is not a valid !!" + tag.substr(kCore.size()));
    }
    return syntax_error("invalid YAML at " + at_mark(node.Mark()) + ": unsupported tag " + tag);
  }

  size_t nodes_ = 0;
};

Result<json> parse_yaml(std::string_view text) {
  // yaml-cpp parses flow collections ([[[...) recursively: bound them before it runs.
  if (auto nesting = json_fields::check_nesting(text, "invalid YAML", kStackSafeDepth); !nesting) {
    return make_error(nesting.error());
  }
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(std::string(text));
  } catch (const YAML::Exception& e) {
    return syntax_error("invalid YAML at " + at_mark(e.mark) + ": " + e.msg);
  }
  if (documents.size() > 1) {
    return syntax_error("invalid YAML: expected one document, found " +
                        std::to_string(documents.size()) + " (separated by ---)");
  }
  if (documents.empty() || documents[0].IsNull()) {
    return syntax_error("the document is empty");
  }
  YamlToJson converter;
  return converter.convert(documents[0], 0);
}

// nlohmann reports syntax errors by byte offset; tell the user line and column instead.
std::string line_column(std::string_view text, size_t byte) {
  size_t line = 1;
  size_t column = 1;
  for (size_t i = 0; i + 1 < byte && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(column);
}

// `syntax_failed` tells a syntax error (the text may still be YAML) from a refusal of valid
// JSON (duplicate keys, nesting).
Result<json> parse_json(std::string_view text, bool& syntax_failed) {
  // nlohmann silently keeps the last of duplicate keys; a strict parser refuses them. The
  // callback sees every key with the object nesting, which is enough to find the path.
  struct Frame {
    bool object = false;
    std::set<std::string> keys;
    std::string key;
    size_t index = 0;
  };
  std::vector<Frame> frames;
  std::string problem;
  auto path = [&frames] {
    std::string out;
    for (const auto& frame : frames) {
      if (frame.object) {
        out += (out.empty() ? "" : ".") + frame.key;
      } else {
        out += "[" + std::to_string(frame.index) + "]";
      }
    }
    return out;
  };
  auto element_done = [&frames] {
    if (!frames.empty() && !frames.back().object) ++frames.back().index;
  };
  json::parser_callback_t callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if (!problem.empty()) return true;
    if (depth > kMaxDepth) {
      problem = "invalid JSON: nested more than " + std::to_string(kMaxDepth) + " levels deep";
      return true;
    }
    switch (event) {
      case json::parse_event_t::object_start:
        frames.push_back(Frame{true, {}, {}, 0});
        break;
      case json::parse_event_t::array_start:
        frames.push_back(Frame{false, {}, {}, 0});
        break;
      case json::parse_event_t::key: {
        if (frames.empty()) break;
        const auto& name = parsed.get_ref<const std::string&>();
        frames.back().key = name;
        if (!frames.back().keys.insert(name).second) {
          problem = "invalid JSON: duplicate key \"" + name + "\" at " + path();
        }
        break;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!frames.empty()) frames.pop_back();
        element_done();
        break;
      case json::parse_event_t::value:
        element_done();
        break;
    }
    return true;
  };
  // The callback sees the depth only while nlohmann builds (recursively) what it parsed.
  if (auto nesting = json_fields::check_nesting(text, "invalid JSON", kStackSafeDepth); !nesting) {
    syntax_failed = true;
    return syntax_error(nesting.error().message);
  }
  json out;
  try {
    out = json::parse(text.begin(), text.end(), callback);
  } catch (const json::parse_error& e) {
    syntax_failed = true;
    std::string reason = e.what();
    // "[json.exception.parse_error.101] parse error at line 1, column 9: syntax error ..."
    auto colon = reason.find(": ", reason.find("column"));
    if (colon != std::string::npos) reason = reason.substr(colon + 2);
    return syntax_error("invalid JSON at " + line_column(text, e.byte) + ": " + reason);
  } catch (const json::exception& e) {
    syntax_failed = true;
    return syntax_error(std::string("invalid JSON: ") + e.what());
  }
  if (!problem.empty()) return syntax_error(problem);
  return out;
}

// ---------------------------------------------------------------------------------------
// Validation helpers. Every error names the field's path and what was expected.

tl::unexpected<Error> field_error(const std::string& path, const std::string& what) {
  return make_error(Errc::kInvalidArgument, path.empty() ? what : path + ": " + what, path);
}

std::string child(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}

std::string item(const std::string& path, size_t index) {
  return path + "[" + std::to_string(index) + "]";
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float:
      return "a number";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "a list";
    case json::value_t::object:
      return "a map";
    default:
      return "something else";
  }
}

std::string quote_text(std::string_view s) {
  std::string out = "\"";
  out += s.size() > 80 ? std::string(s.substr(0, 77)) + "..." : std::string(s);
  out += "\"";
  return out;
}

// How a value is shown in a message: strings quoted, scalars as written, others by type.
std::string shown(const json& v) {
  if (v.is_string()) return quote_text(v.get_ref<const std::string&>());
  if (v.is_number() || v.is_boolean() || v.is_null()) {
    return v.dump(-1, ' ', false, json::error_handler_t::replace);
  }
  return type_name(v);
}

tl::unexpected<Error> wrong_type(const std::string& path, std::string_view expected,
                                 const json& v) {
  std::string got = type_name(v);
  if (v.is_number() || v.is_boolean()) got += " (" + shown(v) + ")";
  return field_error(path, "expected " + std::string(expected) + ", got " + got);
}

std::string join(const std::vector<std::string_view>& names) {
  std::string out;
  for (const auto& name : names) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

// Checks that `v` is a map whose keys are all in `allowed` (listed in schema order).
Status expect_map(const json& v, const std::string& path,
                  const std::vector<std::string_view>& allowed) {
  if (!v.is_object()) return wrong_type(path, "a map", v);
  for (const auto& [key, value] : v.items()) {
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
      return field_error(child(path, key),
                         "unknown field (expected one of: " + join(allowed) + ")");
    }
  }
  return ok();
}

const json* find(const json& object, std::string_view key) {
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

Result<const json*> required(const json& object, const std::string& path, std::string_view key,
                             std::string_view expected) {
  const json* v = find(object, key);
  if (v == nullptr) {
    return field_error(child(path, key),
                       "missing required field (expected " + std::string(expected) + ")");
  }
  return v;
}

Result<std::string> get_string(const json& v, const std::string& path) {
  if (!v.is_string()) return wrong_type(path, "a string", v);
  return v.get<std::string>();
}

Result<bool> get_bool(const json& v, const std::string& path) {
  if (!v.is_boolean()) return wrong_type(path, "true or false", v);
  return v.get<bool>();
}

// Integers; a float with an integral value (3.0) is accepted as that integer.
Result<int64_t> get_int(const json& v, const std::string& path, int64_t min) {
  std::string expected = "an integer of at least " + std::to_string(min);
  int64_t value = 0;
  if (v.is_number_unsigned()) {
    auto u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return field_error(path, "expected " + expected + ", got " + shown(v) + " (too large)");
    }
    value = static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    value = v.get<int64_t>();
  } else if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::trunc(d) != d || std::fabs(d) > 9.0e15) {
      return field_error(path, "expected " + expected + ", got " + shown(v));
    }
    value = static_cast<int64_t>(d);
  } else {
    return wrong_type(path, expected, v);
  }
  if (value < min) return field_error(path, "expected " + expected + ", got " + shown(v));
  return value;
}

Result<double> get_fraction(const json& v, const std::string& path) {
  if (!v.is_number()) return wrong_type(path, "a number from 0 to 1", v);
  double d = v.get<double>();
  if (!(d >= 0.0 && d <= 1.0)) {
    return field_error(path, "expected a number from 0 to 1, got " + shown(v));
  }
  return d;
}

Result<double> get_positive_number(const json& v, const std::string& path) {
  if (!v.is_number()) return wrong_type(path, "a number over 0", v);
  double d = v.get<double>();
  if (!(d > 0.0) || !std::isfinite(d)) {
    return field_error(path, "expected a number over 0, got " + shown(v));
  }
  return d;
}

Result<std::string> get_enum(const json& v, const std::string& path,
                             const std::vector<std::string_view>& choices) {
  std::string expected = "one of " + join(choices);
  if (!v.is_string()) return wrong_type(path, expected, v);
  const auto& s = v.get_ref<const std::string&>();
  if (std::find(choices.begin(), choices.end(), s) == choices.end()) {
    return field_error(path, "expected " + expected + ", got " + quote_text(s));
  }
  return s;
}

Result<int64_t> get_duration(const json& v, const std::string& path) {
  if (!v.is_string()) {
    std::string got = v.is_number() ? shown(v) + " (a number without a unit)" : type_name(v);
    return field_error(path, "expected a duration like 10m, got " + got);
  }
  auto ms = parse_duration(v.get_ref<const std::string&>());
  if (!ms) return field_error(path, ms.error().message);
  return *ms;
}

// ---- name rules

// DNS label: lowercase letters, digits and '-', 1-63 characters, starting with a letter and
// not ending with '-'.
bool is_dns_label(std::string_view s) {
  if (s.empty() || s.size() > 63 || !is_lower(s.front()) || s.back() == '-') return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return is_lower(c) || is_digit(c) || c == '-'; });
}

// Model and secret names: like a DNS label but '.' and '_' are allowed too.
bool is_object_name(std::string_view s) {
  if (s.empty() || s.size() > 63 || !is_lower(s.front())) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return is_lower(c) || is_digit(c) || c == '-' || c == '.' || c == '_';
  });
}

bool is_label_text(std::string_view s) {
  if (s.empty() || s.size() > 128) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_' || c == '/';
  });
}

bool is_env_name(std::string_view s) {
  if (s.empty() || is_digit(s.front())) return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return is_alpha(c) || is_digit(c) || c == '_'; });
}

// Site globs and device ids: printable, no spaces.
bool is_token(std::string_view s) {
  if (s.empty() || s.size() > 128) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return u > 0x20 && u != 0x7F;
  });
}

bool is_numeric_identifier(std::string_view s) {
  return all_of_chars(s, is_digit) && (s.size() == 1 || s[0] != '0');
}

// MAJOR.MINOR.PATCH with an optional -prerelease (dot-separated [0-9A-Za-z-] identifiers,
// numeric ones without leading zeros).
bool is_semver(std::string_view s) {
  if (s.size() > 128) return false;
  auto dash = s.find('-');
  std::string_view core = s.substr(0, dash);
  for (int part = 0; part < 3; ++part) {
    auto dot = core.find('.');
    if ((part < 2) == (dot == std::string_view::npos)) return false;
    if (!is_numeric_identifier(core.substr(0, dot))) return false;
    core = dot == std::string_view::npos ? std::string_view() : core.substr(dot + 1);
  }
  if (dash == std::string_view::npos) return true;
  std::string_view pre = s.substr(dash + 1);
  while (true) {
    auto dot = pre.find('.');
    std::string_view ident = pre.substr(0, dot);
    bool ok_chars =
        all_of_chars(ident, [](char c) { return is_alpha(c) || is_digit(c) || c == '-'; });
    if (!ok_chars) return false;
    if (all_of_chars(ident, is_digit) && !is_numeric_identifier(ident)) return false;
    if (dot == std::string_view::npos) return true;
    pre = pre.substr(dot + 1);
  }
}

const char* const kNameRule =
    "lowercase letters, digits and '-', 1-63 characters, starting with a letter";
const char* const kObjectNameRule =
    "lowercase letters, digits, '-', '.' and '_', 1-63 characters, starting with a letter";

Result<std::string> get_named(const json& v, const std::string& path,
                              bool (*rule)(std::string_view), const char* what,
                              const char* rule_text) {
  auto s = get_string(v, path);
  if (!s) return s;
  if (!rule(*s)) {
    return field_error(
        path, quote_text(*s) + " is not a valid " + what + " (expected " + rule_text + ")");
  }
  return s;
}

Result<std::string> get_semver(const json& v, const std::string& path) {
  if (!v.is_string()) {
    return field_error(path, std::string("expected a semver version like 1.4.0 (a string), got ") +
                                 type_name(v) + (v.is_number() ? " (" + shown(v) + ")" : ""));
  }
  const auto& s = v.get_ref<const std::string&>();
  if (!is_semver(s)) {
    return field_error(path,
                       "expected a semver version like 1.4.0 or 2.0.0-rc.1, got " + quote_text(s));
  }
  return s;
}

// A map of string to string; keys and values checked by `valid` (nullptr: any string).
Result<std::map<std::string, std::string>> get_string_map(const json& v, const std::string& path,
                                                          bool (*key_rule)(std::string_view),
                                                          const char* key_text,
                                                          bool (*value_rule)(std::string_view),
                                                          const char* value_text) {
  if (!v.is_object()) return wrong_type(path, "a map of names to strings", v);
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : v.items()) {
    std::string at = child(path, key);
    if (key_rule != nullptr && !key_rule(key)) {
      return field_error(at, quote_text(key) + " is not a valid key (expected " + key_text + ")");
    }
    auto s = get_string(value, at);
    if (!s) return make_error(s.error());
    if (value_rule != nullptr && !value_rule(*s)) {
      return field_error(at,
                         quote_text(*s) + " is not a valid value (expected " + value_text + ")");
    }
    out.emplace(key, std::move(*s));
  }
  return out;
}

const char* const kLabelRule = "letters, digits, '-', '.', '_' and '/', 1-128 characters";

Result<std::map<std::string, std::string>> get_labels(const json& v, const std::string& path) {
  return get_string_map(v, path, is_label_text, kLabelRule, is_label_text, kLabelRule);
}

// A list of unique strings, each checked by `rule`; returned sorted when `sort` is set.
Result<std::vector<std::string>> get_string_set(const json& v, const std::string& path,
                                                bool (*rule)(std::string_view), const char* what,
                                                const char* rule_text) {
  if (!v.is_array()) return wrong_type(path, std::string("a list of ") + what + "s", v);
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (size_t i = 0; i < v.size(); ++i) {
    std::string at = item(path, i);
    auto s = get_named(v[i], at, rule, what, rule_text);
    if (!s) return make_error(s.error());
    if (!seen.insert(*s).second)
      return field_error(at, "duplicate " + std::string(what) + " " + quote_text(*s));
    out.push_back(std::move(*s));
  }
  std::sort(out.begin(), out.end());
  return out;
}

Result<std::vector<std::string>> get_string_list(const json& v, const std::string& path) {
  if (!v.is_array()) return wrong_type(path, "a list of strings", v);
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) {
    auto s = get_string(v[i], item(path, i));
    if (!s) return make_error(s.error());
    out.push_back(std::move(*s));
  }
  return out;
}

// "N%" (a percentage, 1..100) or a positive integer count; `what` names it in messages.
Result<Manifest::Amount> get_amount(const json& v, const std::string& path, const char* what) {
  std::string expected = std::string("a percentage like 10% or a ") + what;
  if (v.is_number()) {
    auto n = get_int(v, path, 1);
    if (!n) {
      return field_error(path, "expected " + expected + " (a positive integer), got " + shown(v));
    }
    return Manifest::Amount{false, *n};
  }
  if (!v.is_string()) return wrong_type(path, expected, v);
  const auto& s = v.get_ref<const std::string&>();
  std::string_view digits(s);
  if (digits.empty() || digits.back() != '%') {
    return field_error(path, "expected " + expected + ", got " + quote_text(s));
  }
  digits.remove_suffix(1);
  if (!all_of_chars(digits, is_digit) || digits.size() > 9) {
    return field_error(path, "expected " + expected + ", got " + quote_text(s));
  }
  int64_t value = 0;
  std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (value > 100) return field_error(path, std::to_string(value) + "% is over 100%");
  if (value == 0) return field_error(path, "0% is not over 0% (expected 1% to 100%)");
  return Manifest::Amount{true, value};
}

json amount_json(const Manifest::Amount& amount) {
  if (amount.percent) return std::to_string(amount.value) + "%";
  return amount.value;
}

std::string amount_text(const Manifest::Amount& amount) {
  return std::to_string(amount.value) + (amount.percent ? "%" : "");
}

// "HH:MM" -> minutes since midnight.
std::optional<int> parse_clock(std::string_view s) {
  if (s.size() != 5 || s[2] != ':' || !is_digit(s[0]) || !is_digit(s[1]) || !is_digit(s[3]) ||
      !is_digit(s[4])) {
    return std::nullopt;
  }
  int hours = (s[0] - '0') * 10 + (s[1] - '0');
  int minutes = (s[3] - '0') * 10 + (s[4] - '0');
  if (hours > 23 || minutes > 59) return std::nullopt;
  return hours * 60 + minutes;
}

Result<Manifest::Window> get_window(const json& v, const std::string& path) {
  const char* expected = "a daily window like \"02:00-04:00\" (HH:MM-HH:MM, 24-hour)";
  if (!v.is_string()) return wrong_type(path, expected, v);
  const auto& s = v.get_ref<const std::string&>();
  std::optional<int> start;
  std::optional<int> end;
  if (s.size() == 11 && s[5] == '-') {
    start = parse_clock(std::string_view(s).substr(0, 5));
    end = parse_clock(std::string_view(s).substr(6));
  }
  if (!start || !end)
    return field_error(path, std::string("expected ") + expected + ", got " + quote_text(s));
  if (*start == *end) {
    return field_error(path, quote_text(s) +
                                 " is empty: start and end are the same (leave window out to allow "
                                 "any time)");
  }
  return Manifest::Window{*start, *end};
}

std::string window_text(const Manifest::Window& window) {
  auto two = [](int n) {
    return std::string(1, static_cast<char>('0' + n / 10)) + static_cast<char>('0' + n % 10);
  };
  return two(window.start_minute / 60) + ":" + two(window.start_minute % 60) + "-" +
         two(window.end_minute / 60) + ":" + two(window.end_minute % 60);
}

// ---------------------------------------------------------------------------------------
// Sections. Each validates its part of the document, fills the typed Manifest and writes
// its normalized form.

const std::vector<std::string_view> kTopFields = {"apiVersion", "kind", "metadata", "spec"};
const std::vector<std::string_view> kSpecFields = {"selector",  "model",   "serve",
                                                   "workload",  "config",  "secrets",
                                                   "placement", "rollout", "telemetry"};

Status validate_metadata(const json& v, Manifest& m, json& out) {
  const std::string path = "metadata";
  OUTPOST_TRY(expect_map(v, path, {"name", "labels"}));
  auto name_v = required(v, path, "name", "a name like defect-detector");
  if (!name_v) return make_error(name_v.error());
  auto name = get_named(**name_v, "metadata.name", is_dns_label, "deployment name", kNameRule);
  if (!name) return make_error(name.error());
  m.name = *name;
  if (const json* labels = find(v, "labels")) {
    auto parsed = get_labels(*labels, "metadata.labels");
    if (!parsed) return make_error(parsed.error());
    m.labels = std::move(*parsed);
  }
  out = {{"name", m.name}, {"labels", m.labels}};
  return ok();
}

Status validate_selector(const json& v, Manifest& m, json& out) {
  const std::string path = "spec.selector";
  OUTPOST_TRY(expect_map(v, path, {"sites", "labels", "devices"}));
  if (const json* sites = find(v, "sites")) {
    auto parsed = get_string_set(*sites, child(path, "sites"), is_token, "site pattern",
                                 "a site name or glob like plant-*, without spaces");
    if (!parsed) return make_error(parsed.error());
    m.selector.sites = std::move(*parsed);
  }
  if (const json* labels = find(v, "labels")) {
    auto parsed = get_labels(*labels, child(path, "labels"));
    if (!parsed) return make_error(parsed.error());
    m.selector.labels = std::move(*parsed);
  }
  if (const json* devices = find(v, "devices")) {
    auto parsed = get_string_set(*devices, child(path, "devices"), is_token, "device id",
                                 "a device id without spaces");
    if (!parsed) return make_error(parsed.error());
    m.selector.devices = std::move(*parsed);
  }
  out = {
      {"sites", m.selector.sites}, {"labels", m.selector.labels}, {"devices", m.selector.devices}};
  return ok();
}

Status validate_model(const json& v, Manifest& m, json& out) {
  const std::string path = "spec.model";
  OUTPOST_TRY(expect_map(v, path, {"name", "version"}));
  auto name_v = required(v, path, "name", "a model name like defect-net");
  if (!name_v) return make_error(name_v.error());
  auto name =
      get_named(**name_v, child(path, "name"), is_object_name, "model name", kObjectNameRule);
  if (!name) return make_error(name.error());
  auto version_v = required(v, path, "version", "a semver version like 1.4.0");
  if (!version_v) return make_error(version_v.error());
  auto version = get_semver(**version_v, child(path, "version"));
  if (!version) return make_error(version.error());
  m.model = Manifest::ModelRef{*name, *version};
  out = {{"name", *name}, {"version", *version}};
  return ok();
}

Status validate_serve(const json& v, Manifest& m, json& out) {
  const std::string path = "spec.serve";
  OUTPOST_TRY(expect_map(v, path, {"route", "fallback"}));
  Manifest::Serve serve;
  serve.route = "/models/" + m.name;
  if (const json* route_v = find(v, "route")) {
    std::string at = child(path, "route");
    auto route = get_string(*route_v, at);
    if (!route) return make_error(route.error());
    bool has_space = std::any_of(route->begin(), route->end(), [](char c) {
      auto u = static_cast<unsigned char>(c);
      return u <= 0x20 || u == 0x7F;
    });
    if (route->empty() || route->front() != '/' || has_space ||
        route->find("..") != std::string::npos || route->size() > 200) {
      return field_error(at,
                         "expected a path starting with '/', without spaces or \"..\", at most "
                         "200 characters, like /models/defect-detector; got " +
                             quote_text(*route));
    }
    serve.route = *route;
  }
  out = {{"route", serve.route}};
  if (const json* fb = find(v, "fallback")) {
    std::string at = child(path, "fallback");
    OUTPOST_TRY(expect_map(*fb, at, {"model", "version", "min_confidence"}));
    Manifest::Fallback fallback;
    auto model_v = required(*fb, at, "model", "a model name like defect-net-tiny");
    if (!model_v) return make_error(model_v.error());
    auto model =
        get_named(**model_v, child(at, "model"), is_object_name, "model name", kObjectNameRule);
    if (!model) return make_error(model.error());
    fallback.model = *model;
    auto version_v = required(*fb, at, "version", "a semver version like 1.0.0");
    if (!version_v) return make_error(version_v.error());
    auto version = get_semver(**version_v, child(at, "version"));
    if (!version) return make_error(version.error());
    fallback.version = *version;
    if (const json* mc = find(*fb, "min_confidence")) {
      auto value = get_fraction(*mc, child(at, "min_confidence"));
      if (!value) return make_error(value.error());
      fallback.min_confidence = *value;
    }
    out["fallback"] = {{"model", fallback.model},
                       {"version", fallback.version},
                       {"min_confidence", fallback.min_confidence}};
    serve.fallback = std::move(fallback);
  }
  m.serve = std::move(serve);
  return ok();
}

Status validate_health(const json& v, Manifest::Workload& w, json& out) {
  const std::string path = "spec.workload.health";
  OUTPOST_TRY(expect_map(v, path, {"http", "exec", "period", "timeout", "deadline"}));
  Manifest::Health health;
  const json* http = find(v, "http");
  const json* exec = find(v, "exec");
  if ((http == nullptr) == (exec == nullptr)) {
    return field_error(
        path, http == nullptr ? "expected a check: http (a path like /healthz) or exec (a command)"
                              : "expected one check, http or exec, not both");
  }
  out = json::object();
  if (http != nullptr) {
    std::string at = child(path, "http");
    auto s = get_string(*http, at);
    if (!s) return make_error(s.error());
    if (s->empty() || s->front() != '/' || s->find(' ') != std::string::npos) {
      return field_error(at,
                         "expected a path starting with '/' like /healthz, got " + quote_text(*s));
    }
    health.http = *s;
    out["http"] = *s;
  } else {
    std::string at = child(path, "exec");
    auto command = get_string_list(*exec, at);
    if (!command) return make_error(command.error());
    if (command->empty() || command->front().empty()) {
      return field_error(at, "expected a non-empty command like [\"bin/check\"]");
    }
    health.exec = *command;
    out["exec"] = *command;
  }
  if (const json* period = find(v, "period")) {
    auto ms = get_duration(*period, child(path, "period"));
    if (!ms) return make_error(ms.error());
    if (*ms <= 0) return field_error(child(path, "period"), "expected a duration over 0s");
    health.period_ms = *ms;
  }
  if (const json* timeout = find(v, "timeout")) {
    auto ms = get_duration(*timeout, child(path, "timeout"));
    if (!ms) return make_error(ms.error());
    if (*ms <= 0) return field_error(child(path, "timeout"), "expected a duration over 0s");
    health.timeout_ms = *ms;
  }
  if (const json* deadline = find(v, "deadline")) {
    auto ms = get_duration(*deadline, child(path, "deadline"));
    if (!ms) return make_error(ms.error());
    if (*ms <= 0) return field_error(child(path, "deadline"), "expected a duration over 0s");
    health.deadline_ms = *ms;
  }
  out["period"] = format_duration(health.period_ms);
  out["timeout"] = format_duration(health.timeout_ms);
  out["deadline"] = format_duration(health.deadline_ms);
  w.health = std::move(health);
  return ok();
}

Status validate_workload(const json& v, Manifest& m, json& out) {
  const std::string path = "spec.workload";
  OUTPOST_TRY(expect_map(v, path,
                         {"bundle", "command", "env", "health", "restart", "port", "stop_grace",
                          "resources", "secret_env", "on_secret_rotate"}));
  Manifest::Workload w;
  out = json::object();
  if (const json* bundle = find(v, "bundle")) {
    std::string at = child(path, "bundle");
    auto s = get_string(*bundle, at);
    if (!s) return make_error(s.error());
    if (!is_digest_ref(*s)) {
      return field_error(at,
                         "expected an artifact digest like sha256:<64 lowercase hex digits>, "
                         "got " +
                             quote_text(*s));
    }
    w.bundle = *s;
    out["bundle"] = *s;
  }
  auto command_v = required(v, path, "command", "a command like [\"bin/app\", \"--flag\"]");
  if (!command_v) return make_error(command_v.error());
  auto command = get_string_list(**command_v, child(path, "command"));
  if (!command) return make_error(command.error());
  if (command->empty() || command->front().empty()) {
    return field_error(child(path, "command"),
                       "expected a non-empty command like [\"bin/app\", \"--flag\"]");
  }
  w.command = std::move(*command);
  out["command"] = w.command;
  if (const json* env = find(v, "env")) {
    auto parsed = get_string_map(*env, child(path, "env"), is_env_name,
                                 "an environment variable name: letters, digits and '_', not "
                                 "starting with a digit",
                                 nullptr, nullptr);
    if (!parsed) return make_error(parsed.error());
    w.env = std::move(*parsed);
  }
  out["env"] = w.env;
  if (const json* health = find(v, "health")) {
    json health_out;
    OUTPOST_TRY(validate_health(*health, w, health_out));
    out["health"] = std::move(health_out);
  }
  std::string restart = "on-failure";
  if (const json* r = find(v, "restart")) {
    auto value = get_enum(*r, child(path, "restart"), {"always", "on-failure", "never"});
    if (!value) return make_error(value.error());
    restart = *value;
  }
  w.restart = restart == "always"  ? Manifest::Restart::kAlways
              : restart == "never" ? Manifest::Restart::kNever
                                   : Manifest::Restart::kOnFailure;
  out["restart"] = restart;
  if (const json* port = find(v, "port")) {
    auto n = get_int(*port, child(path, "port"), 1);
    if (!n) return make_error(n.error());
    if (*n > 65535) return field_error(child(path, "port"), "expected a port from 1 to 65535");
    w.port = *n;
    out["port"] = *n;
  }
  if (const json* grace = find(v, "stop_grace")) {
    auto ms = get_duration(*grace, child(path, "stop_grace"));
    if (!ms) return make_error(ms.error());
    w.stop_grace_ms = *ms;
  }
  out["stop_grace"] = format_duration(w.stop_grace_ms);
  if (const json* res = find(v, "resources")) {
    const std::string at = child(path, "resources");
    OUTPOST_TRY(expect_map(*res, at, {"memory", "cpus", "open_files"}));
    json res_out = json::object();
    if (const json* mem = find(*res, "memory")) {
      auto text = get_string(*mem, child(at, "memory"));
      if (!text) return make_error(text.error());
      auto bytes = parse_size_bytes(*text);
      if (!bytes || *bytes < (1 << 20)) {
        return field_error(child(at, "memory"),
                           "expected a size of at least 1M like 256M, got " + quote_text(*text));
      }
      w.resources.memory_bytes = *bytes;
      res_out["memory"] = std::to_string(*bytes);  // canonical: bytes
    }
    if (const json* cpus = find(*res, "cpus")) {
      auto n = get_positive_number(*cpus, child(at, "cpus"));
      if (!n) return make_error(n.error());
      w.resources.cpus = *n;
      res_out["cpus"] = *n;
    }
    if (const json* files = find(*res, "open_files")) {
      auto n = get_int(*files, child(at, "open_files"), 16);
      if (!n) return make_error(n.error());
      w.resources.open_files = *n;
      res_out["open_files"] = *n;
    }
    out["resources"] = std::move(res_out);
  }
  // Both normalized only when not the default, so manifests from before they existed keep
  // their spec hash (no new revision on upgrade).
  if (const json* env = find(v, "secret_env")) {
    auto b = get_bool(*env, child(path, "secret_env"));
    if (!b) return make_error(b.error());
    w.secret_env = *b;
    if (w.secret_env) out["secret_env"] = true;
  }
  if (const json* r = find(v, "on_secret_rotate")) {
    auto value = get_enum(*r, child(path, "on_secret_rotate"), {"restart", "sighup"});
    if (!value) return make_error(value.error());
    if (*value == "sighup") {
      if (w.secret_env) {
        return field_error(child(path, "on_secret_rotate"),
                           "sighup cannot change the environment of a running process; with "
                           "secret_env: true use restart");
      }
      w.on_secret_rotate = Manifest::SecretRotate::kSighup;
      out["on_secret_rotate"] = "sighup";
    }
  }
  m.workload = std::move(w);
  return ok();
}

Status validate_placement(const json& v, Manifest& m, json& out) {
  const std::string path = "spec.placement";
  OUTPOST_TRY(expect_map(v, path, {"per_device", "replicas_per_site", "migrate_after"}));
  const json* per_device_v = find(v, "per_device");
  const json* replicas_v = find(v, "replicas_per_site");
  const json* migrate_v = find(v, "migrate_after");
  std::optional<bool> per_device;
  if (per_device_v != nullptr) {
    auto b = get_bool(*per_device_v, child(path, "per_device"));
    if (!b) return make_error(b.error());
    per_device = *b;
  }
  Manifest::Placement p;
  if (replicas_v != nullptr) {
    if (per_device.value_or(false)) {
      return field_error(path, "choose one mode: per_device: true or replicas_per_site, not both");
    }
    auto n = get_int(*replicas_v, child(path, "replicas_per_site"), 1);
    if (!n) return make_error(n.error());
    p.per_device = false;
    p.replicas_per_site = *n;
    p.migrate_after_ms = 5 * 60'000;
    if (migrate_v != nullptr) {
      auto ms = get_duration(*migrate_v, child(path, "migrate_after"));
      if (!ms) return make_error(ms.error());
      p.migrate_after_ms = *ms;
    }
    out = {{"per_device", false},
           {"replicas_per_site", p.replicas_per_site},
           {"migrate_after", format_duration(p.migrate_after_ms)}};
  } else {
    if (migrate_v != nullptr) {
      return field_error(child(path, "migrate_after"), "only applies with replicas_per_site");
    }
    if (per_device.has_value() && !*per_device) {
      return field_error(child(path, "per_device"),
                         "per_device: false needs replicas_per_site (how many devices per site)");
    }
    out = {{"per_device", true}};
  }
  m.placement = p;
  return ok();
}

Status validate_gates(const json& v, Manifest::Gates& g, json& out) {
  const std::string path = "spec.rollout.gates";
  OUTPOST_TRY(
      expect_map(v, path,
                 {"max_error_rate", "max_p95_latency_ms", "max_restarts", "max_fallback_rate",
                  "max_confidence_shift", "max_failed_devices", "min_requests"}));
  out = json::object();
  auto fraction = [&](const char* key, std::optional<double>& slot) -> Status {
    if (const json* x = find(v, key)) {
      auto d = get_fraction(*x, child(path, key));
      if (!d) return make_error(d.error());
      slot = *d;
      out[key] = *d;
    }
    return ok();
  };
  OUTPOST_TRY(fraction("max_error_rate", g.max_error_rate));
  if (const json* x = find(v, "max_p95_latency_ms")) {
    auto d = get_positive_number(*x, child(path, "max_p95_latency_ms"));
    if (!d) return make_error(d.error());
    g.max_p95_latency_ms = *d;
    out["max_p95_latency_ms"] = *d;
  }
  if (const json* x = find(v, "max_restarts")) {
    auto n = get_int(*x, child(path, "max_restarts"), 0);
    if (!n) return make_error(n.error());
    g.max_restarts = *n;
    out["max_restarts"] = *n;
  }
  OUTPOST_TRY(fraction("max_fallback_rate", g.max_fallback_rate));
  OUTPOST_TRY(fraction("max_confidence_shift", g.max_confidence_shift));
  for (auto [key, slot] :
       {std::pair<const char*, int64_t*>{"max_failed_devices", &g.max_failed_devices},
        {"min_requests", &g.min_requests}}) {
    if (const json* x = find(v, key)) {
      auto n = get_int(*x, child(path, key), 0);
      if (!n) return make_error(n.error());
      *slot = *n;
      out[key] = *n;
    }
  }
  return ok();
}

Status validate_waves(const json& v, Manifest::Rollout& r, json& out) {
  const std::string path = "spec.rollout.waves";
  if (!v.is_array()) return wrong_type(path, "a list of waves like [1%, 10%, 100%]", v);
  if (v.empty()) return field_error(path, "expected at least one wave, like [100%]");
  out = json::array();
  std::optional<Manifest::Amount> last_percent;
  std::optional<Manifest::Amount> last_count;
  bool all_percent = true;
  for (size_t i = 0; i < v.size(); ++i) {
    std::string at = item(path, i);
    auto wave = get_amount(v[i], at, "device count");
    if (!wave) return make_error(wave.error());
    auto& last = wave->percent ? last_percent : last_count;
    if (last && wave->value <= last->value) {
      return field_error(at, amount_text(*wave) + " is not more than the wave before it (" +
                                 amount_text(*last) + "); waves must grow");
    }
    last = *wave;
    all_percent = all_percent && wave->percent;
    r.waves.push_back(*wave);
    out.push_back(amount_json(*wave));
  }
  if (all_percent && r.waves.back().value != 100) {
    return field_error(path, "the last wave must be 100%");
  }
  return ok();
}

Status validate_rollout(const json& v, Manifest& m, json& out) {
  const std::string path = "spec.rollout";
  OUTPOST_TRY(expect_map(
      v, path,
      {"waves", "bake", "max_unavailable", "gates", "on_failure", "window", "offline_grace"}));
  Manifest::Rollout r;
  out = json::object();
  if (const json* waves = find(v, "waves")) {
    json waves_out;
    OUTPOST_TRY(validate_waves(*waves, r, waves_out));
    out["waves"] = std::move(waves_out);
  } else {
    r.waves = {Manifest::Amount{true, 100}};
    out["waves"] = json::array({"100%"});
  }
  if (const json* bake = find(v, "bake")) {
    auto ms = get_duration(*bake, child(path, "bake"));
    if (!ms) return make_error(ms.error());
    r.bake_ms = *ms;
  }
  out["bake"] = format_duration(r.bake_ms);
  if (const json* mu = find(v, "max_unavailable")) {
    auto amount = get_amount(*mu, child(path, "max_unavailable"), "device count");
    if (!amount) return make_error(amount.error());
    r.max_unavailable = *amount;
  }
  out["max_unavailable"] = amount_json(r.max_unavailable);
  json gates_out = json::object();
  if (const json* gates = find(v, "gates")) OUTPOST_TRY(validate_gates(*gates, r.gates, gates_out));
  out["gates"] = std::move(gates_out);
  std::string on_failure = "rollback";
  if (const json* of = find(v, "on_failure")) {
    auto value = get_enum(*of, child(path, "on_failure"), {"rollback", "pause"});
    if (!value) return make_error(value.error());
    on_failure = *value;
  }
  r.on_failure =
      on_failure == "pause" ? Manifest::OnFailure::kPause : Manifest::OnFailure::kRollback;
  out["on_failure"] = on_failure;
  if (const json* window = find(v, "window")) {
    auto parsed = get_window(*window, child(path, "window"));
    if (!parsed) return make_error(parsed.error());
    r.window = *parsed;
    out["window"] = window_text(*parsed);
  }
  if (const json* grace = find(v, "offline_grace")) {
    auto ms = get_duration(*grace, child(path, "offline_grace"));
    if (!ms) return make_error(ms.error());
    r.offline_grace_ms = *ms;
    out["offline_grace"] = format_duration(*ms);
  }
  m.rollout = std::move(r);
  return ok();
}

Status validate_telemetry(const json& v, Manifest& m, json& out) {
  const std::string path = "spec.telemetry";
  OUTPOST_TRY(expect_map(v, path, {"sample", "on_anomaly"}));
  if (const json* sample = find(v, "sample")) {
    auto d = get_fraction(*sample, child(path, "sample"));
    if (!d) return make_error(d.error());
    m.telemetry.sample = *d;
  }
  if (const json* anomaly = find(v, "on_anomaly")) {
    auto d = get_fraction(*anomaly, child(path, "on_anomaly"));
    if (!d) return make_error(d.error());
    m.telemetry.on_anomaly = *d;
  }
  out = {{"sample", m.telemetry.sample}, {"on_anomaly", m.telemetry.on_anomaly}};
  return ok();
}

Status validate_spec(const json& v, Manifest& m, json& out) {
  const std::string path = "spec";
  OUTPOST_TRY(expect_map(v, path, kSpecFields));
  if (!v.contains("model") && !v.contains("workload")) {
    return field_error(path, "expected at least one of model or workload");
  }
  out = json::object();
  json section;
  if (const json* s = find(v, "selector")) {
    OUTPOST_TRY(validate_selector(*s, m, section));
  } else {
    section = {{"sites", json::array()}, {"labels", json::object()}, {"devices", json::array()}};
  }
  out["selector"] = std::move(section);
  if (const json* s = find(v, "model")) {
    OUTPOST_TRY(validate_model(*s, m, section));
    out["model"] = std::move(section);
  }
  if (const json* s = find(v, "serve")) {
    if (!m.model)
      return field_error(path + ".serve", "serving needs spec.model (which model to serve)");
    OUTPOST_TRY(validate_serve(*s, m, section));
    out["serve"] = std::move(section);
  }
  if (const json* s = find(v, "workload")) {
    OUTPOST_TRY(validate_workload(*s, m, section));
    out["workload"] = std::move(section);
  }
  if (const json* s = find(v, "config")) {
    if (!s->is_object()) return wrong_type(child(path, "config"), "a map", *s);
    m.config = *s;
  }
  out["config"] = m.config;
  if (const json* s = find(v, "secrets")) {
    auto names =
        get_string_set(*s, child(path, "secrets"), is_object_name, "secret name", kObjectNameRule);
    if (!names) return make_error(names.error());
    m.secrets = std::move(*names);
  }
  out["secrets"] = m.secrets;
  if (m.workload && m.secrets.empty()) {
    if (m.workload->secret_env) {
      return field_error("spec.workload.secret_env",
                         "needs spec.secrets (which secrets to export)");
    }
    if (m.workload->on_secret_rotate != Manifest::SecretRotate::kRestart) {
      return field_error("spec.workload.on_secret_rotate",
                         "needs spec.secrets (there is no secret to rotate)");
    }
  }
  if (const json* s = find(v, "placement")) {
    OUTPOST_TRY(validate_placement(*s, m, section));
  } else {
    section = {{"per_device", true}};
  }
  out["placement"] = std::move(section);
  if (const json* s = find(v, "rollout")) {
    OUTPOST_TRY(validate_rollout(*s, m, section));
  } else {
    OUTPOST_TRY(validate_rollout(json::object(), m, section));
  }
  out["rollout"] = std::move(section);
  if (const json* s = find(v, "telemetry")) {
    OUTPOST_TRY(validate_telemetry(*s, m, section));
  } else {
    section = {{"sample", m.telemetry.sample}, {"on_anomaly", m.telemetry.on_anomaly}};
  }
  out["telemetry"] = std::move(section);
  return ok();
}

Result<Manifest> validate(const json& doc) {
  if (!doc.is_object()) {
    return make_error(Errc::kInvalidArgument,
                      std::string("expected a manifest (a map with apiVersion, kind, metadata and "
                                  "spec), got ") +
                          type_name(doc));
  }
  OUTPOST_TRY(expect_map(doc, "", kTopFields));
  auto api = required(doc, "", "apiVersion", "\"outpost/v1\"");
  if (!api) return make_error(api.error());
  if (!(*api)->is_string() || **api != "outpost/v1") {
    return field_error("apiVersion", "expected \"outpost/v1\", got " + shown(**api));
  }
  auto kind = required(doc, "", "kind", "\"Deployment\"");
  if (!kind) return make_error(kind.error());
  if (!(*kind)->is_string() || **kind != "Deployment") {
    return field_error("kind", "expected \"Deployment\", got " + shown(**kind));
  }
  Manifest m;
  json normalized = {{"apiVersion", "outpost/v1"}, {"kind", "Deployment"}};
  auto metadata = required(doc, "", "metadata", "a map with name");
  if (!metadata) return make_error(metadata.error());
  json section;
  OUTPOST_TRY(validate_metadata(**metadata, m, section));
  normalized["metadata"] = std::move(section);
  auto spec = required(doc, "", "spec", "a map with model and/or workload");
  if (!spec) return make_error(spec.error());
  OUTPOST_TRY(validate_spec(**spec, m, section));
  normalized["spec"] = std::move(section);
  m.normalized = std::move(normalized);
  return m;
}

}  // namespace

// ---------------------------------------------------------------------------------------

bool is_site_pattern(std::string_view text) { return is_token(text); }

Result<nlohmann::json> parse_document(std::string_view text) {
  try {
    size_t bad = invalid_utf8_offset(text);
    if (bad != std::string_view::npos) {
      return syntax_error("the document is not valid UTF-8 (at " + line_column(text, bad + 1) +
                          ")");
    }
    auto first = text.find_first_not_of(" \t\r\n");
    if (first == std::string_view::npos) return syntax_error("the document is empty");
    if (text[first] != '{') return parse_yaml(text);
    // JSON first, for its exact messages; a YAML flow mapping ({name: x}) also starts with '{'.
    bool syntax = false;
    auto from_json = parse_json(text, syntax);
    if (from_json || !syntax) return from_json;
    auto from_yaml = parse_yaml(text);
    return from_yaml ? from_yaml : from_json;
  } catch (const std::exception& e) {
    return make_error(Errc::kInvalidArgument, std::string("cannot read the document: ") + e.what());
  }
}

Status check_secret_name(std::string_view name, const std::string& field) {
  if (is_object_name(name)) return ok();
  return field_error(field, std::string("expected a secret name (") + kObjectNameRule + "), got " +
                                quote_text(std::string(name)));
}

Result<Manifest> validate_manifest(const nlohmann::json& doc) {
  try {
    return validate(doc);
  } catch (const std::exception& e) {
    // Only reachable through a bug in the checks above (nlohmann throws on type mismatch).
    return make_error(Errc::kInternal, std::string("validating the manifest: ") + e.what());
  }
}

Result<Manifest> parse_manifest(std::string_view text) {
  auto doc = parse_document(text);
  if (!doc) return make_error(doc.error());
  return validate_manifest(*doc);
}

std::string Manifest::spec_hash() const {
  return sha256_hex(normalized.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

bool Manifest::Window::contains(int minute_of_day) const {
  if (start_minute <= end_minute) {
    return minute_of_day >= start_minute && minute_of_day < end_minute;
  }
  return minute_of_day >= start_minute || minute_of_day < end_minute;
}

Result<int64_t> parse_duration(std::string_view text) { return parse_duration_ms(text); }

std::string format_duration(int64_t ms) { return format_duration_ms(ms); }

Status check_references(const Manifest& manifest, const ReferenceLookup& lookup) {
  auto check_model = [&](const std::string& model, const std::string& version,
                         const std::string& name_field,
                         const std::string& version_field) -> Status {
    if (lookup.model_exists) {
      auto exists = lookup.model_exists(model);
      if (!exists) return make_error(exists.error().with_context("looking up model " + model));
      if (!*exists) {
        return field_error(name_field,
                           "model " + model + " does not exist; push it with 'outpost model push'");
      }
    }
    auto exists = lookup.model_version_exists(model, version);
    if (!exists) {
      return make_error(
          exists.error().with_context("looking up model " + model + " version " + version));
    }
    if (!*exists) {
      return field_error(version_field,
                         "model " + model + " version " + version + " does not exist");
    }
    return ok();
  };
  if (manifest.model) {
    OUTPOST_TRY(check_model(manifest.model->name, manifest.model->version, "spec.model.name",
                            "spec.model.version"));
  }
  if (manifest.serve && manifest.serve->fallback) {
    const auto& fb = *manifest.serve->fallback;
    OUTPOST_TRY(check_model(fb.model, fb.version, "spec.serve.fallback.model",
                            "spec.serve.fallback.version"));
  }
  if (manifest.workload && manifest.workload->bundle) {
    const std::string& digest = *manifest.workload->bundle;
    auto exists = lookup.artifact_exists(digest);
    if (!exists) return make_error(exists.error().with_context("looking up artifact " + digest));
    if (!*exists) {
      return field_error(
          "spec.workload.bundle",
          "artifact " + digest + " does not exist; push it with 'outpost artifact push'");
    }
  }
  return ok();
}

}  // namespace outpost::deployments
