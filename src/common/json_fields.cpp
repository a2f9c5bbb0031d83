#include "common/json_fields.h"

namespace outpost::json_fields {

std::string type_name(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::null:
      return "null";
    case nlohmann::json::value_t::object:
      return "an object";
    case nlohmann::json::value_t::array:
      return "a list";
    case nlohmann::json::value_t::string:
      return "a string";
    case nlohmann::json::value_t::boolean:
      return "a boolean";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float:
      return "a number";
    default:
      return "an unsupported value";
  }
}

namespace {
const nlohmann::json* find(const nlohmann::json& obj, const std::string& key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}
}  // namespace

Result<std::optional<std::string>> optional_string(const nlohmann::json& obj,
                                                   const std::string& key,
                                                   const std::string& path) {
  const auto* value = find(obj, key);
  if (!value) return std::optional<std::string>();
  if (!value->is_string()) {
    return make_error(Errc::kInvalidArgument,
                      path + ": expected a string, got " + type_name(*value), path);
  }
  return std::optional<std::string>(value->get<std::string>());
}

Result<std::string> required_string(const nlohmann::json& obj, const std::string& key,
                                    const std::string& path) {
  auto value = optional_string(obj, key, path);
  if (!value) return make_error(value.error());
  if (!*value || (*value)->empty()) {
    return make_error(Errc::kInvalidArgument, path + ": is required", path);
  }
  return **value;
}

Result<std::optional<int64_t>> optional_int(const nlohmann::json& obj, const std::string& key,
                                            const std::string& path) {
  const auto* value = find(obj, key);
  if (!value) return std::optional<int64_t>();
  if (!value->is_number_integer()) {
    return make_error(Errc::kInvalidArgument,
                      path + ": expected an integer, got " + type_name(*value), path);
  }
  return std::optional<int64_t>(value->get<int64_t>());
}

Result<std::map<std::string, std::string>> string_map(const nlohmann::json& obj,
                                                      const std::string& key,
                                                      const std::string& path) {
  std::map<std::string, std::string> out;
  const auto* value = find(obj, key);
  if (!value) return out;
  if (!value->is_object()) {
    return make_error(Errc::kInvalidArgument,
                      path + ": expected an object of strings, got " + type_name(*value), path);
  }
  for (const auto& [k, v] : value->items()) {
    if (!v.is_string()) {
      return make_error(Errc::kInvalidArgument,
                        path + "." + k + ": expected a string, got " + type_name(v),
                        path + "." + k);
    }
    out[k] = v.get<std::string>();
  }
  return out;
}

nlohmann::json parse_object_or_empty(const std::string& text) {
  auto doc = nlohmann::json::parse(text, nullptr, false);
  return doc.is_object() ? doc : nlohmann::json::object();
}

Status check_nesting(std::string_view text, const std::string& what, int limit) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) {
        return make_error(Errc::kInvalidArgument, what + ": nested deeper than " +
                                                      std::to_string(limit) + " levels (at byte " +
                                                      std::to_string(i) + ")");
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return ok();
}

}  // namespace outpost::json_fields
