// See json_columns.h.
#include "store/internal/json_columns.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>

#include <nlohmann/json.hpp>

namespace outpost::store::internal {

std::string iso_time(int64_t ms) {
  int64_t secs = ms / 1000;
  int64_t millis = ms % 1000;
  if (millis < 0) {
    secs -= 1;
    millis += 1000;
  }
  const std::time_t t = static_cast<std::time_t>(secs);
  std::tm tm{};
  char buf[64];
  if (gmtime_r(&t, &tm) == nullptr ||
      std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
    return std::to_string(ms) + " ms";
  }
  std::string out(buf);
  if (millis != 0) {
    char frac[8];
    std::snprintf(frac, sizeof frac, ".%03d", static_cast<int>(millis));
    out += frac;
  }
  return out + "Z";
}

int64_t wall_clock_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Result<std::string> labels_to_json(const Labels& labels) {
  try {
    return nlohmann::json(labels).dump();
  } catch (const nlohmann::json::exception& e) {
    return make_error(Errc::kInvalidArgument,
                      std::string("labels must be valid UTF-8 strings: ") + e.what(), "labels");
  }
}

Result<Labels> labels_from_json(const std::string& text, const std::string& owner) {
  const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!json.is_object()) {
    return make_error(Errc::kInternal,
                      owner + ": stored labels are not a JSON object of strings: " + text);
  }
  Labels labels;
  for (const auto& [key, value] : json.items()) {
    if (!value.is_string()) {
      return make_error(Errc::kInternal,
                        owner + ": stored label " + key + " is not a string: " + value.dump());
    }
    labels.emplace(key, value.get<std::string>());
  }
  return labels;
}

bool labels_match(const Labels& have, const Labels& want) {
  return std::all_of(want.begin(), want.end(), [&](const auto& entry) {
    const auto it = have.find(entry.first);
    return it != have.end() && it->second == entry.second;
  });
}

Result<std::string> strings_to_json(const std::vector<std::string>& strings,
                                    const std::string& field) {
  try {
    return nlohmann::json(strings).dump();
  } catch (const nlohmann::json::exception& e) {
    return make_error(Errc::kInvalidArgument,
                      field + " must be valid UTF-8 strings: " + std::string(e.what()), field);
  }
}

Result<std::vector<std::string>> strings_from_json(const std::string& text,
                                                   const std::string& owner,
                                                   const std::string& what) {
  const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!json.is_array()) {
    return make_error(Errc::kInternal,
                      owner + ": stored " + what + " are not a JSON array: " + text);
  }
  std::vector<std::string> out;
  for (const auto& item : json) {
    if (!item.is_string()) {
      return make_error(Errc::kInternal,
                        owner + ": stored " + what + " entry is not a string: " + item.dump());
    }
    out.push_back(item.get<std::string>());
  }
  return out;
}

}  // namespace outpost::store::internal
