// Typed reads of JSON request fields with errors that name the field's path.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace outpost::json_fields {

// Each returns nullopt when the key is absent (or null), the value when it has the right
// type, and kInvalidArgument naming `path` ("labels.line: expected a string, got a number").
[[nodiscard]] Result<std::optional<std::string>> optional_string(const nlohmann::json& obj,
                                                                 const std::string& key,
                                                                 const std::string& path);
[[nodiscard]] Result<std::string> required_string(const nlohmann::json& obj, const std::string& key,
                                                  const std::string& path);
[[nodiscard]] Result<std::optional<int64_t>> optional_int(const nlohmann::json& obj,
                                                          const std::string& key,
                                                          const std::string& path);
[[nodiscard]] Result<std::map<std::string, std::string>> string_map(const nlohmann::json& obj,
                                                                    const std::string& key,
                                                                    const std::string& path);
// A JSON object we stored ourselves (a manifest, schedule, status, rollout plan), or {} when
// the text is not a JSON object.
nlohmann::json parse_object_or_empty(const std::string& text);

// How deep JSON from outside may nest. nlohmann::json builds and frees nested values
// recursively, so a body of a million '[' would overflow the stack before any check of ours.
inline constexpr int kMaxJsonDepth = 64;
// For parsers with a finer depth check of their own (with the path): only what would hurt.
inline constexpr int kStackSafeDepth = 1024;

// Scans `text` (any bytes, JSON or flow-style YAML) before it is parsed: kInvalidArgument
// naming `what` and the byte where brackets nest deeper than `limit` (strings skipped).
[[nodiscard]] Status check_nesting(std::string_view text, const std::string& what,
                                   int limit = kMaxJsonDepth);

// "a string", "a number", "an object"... for messages.
std::string type_name(const nlohmann::json& value);

}  // namespace outpost::json_fields
