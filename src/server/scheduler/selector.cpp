#include "server/scheduler/selector.h"

#include <fnmatch.h>

#include <algorithm>

#include <nlohmann/json.hpp>

namespace outpost::scheduler {
namespace {

bool is_selector_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_' || c == '/';
}

bool is_selector_text(std::string_view s) {
  return !s.empty() && s.size() <= 128 && std::all_of(s.begin(), s.end(), is_selector_char);
}

}  // namespace

Attributes device_attributes(const store::Device& device) {
  Attributes out;
  auto facts = nlohmann::json::parse(device.facts_json, nullptr, /*allow_exceptions=*/false);
  if (facts.is_object()) {
    for (const auto& [key, value] : facts.items()) {
      if (value.is_string()) {
        out[key] = value.get<std::string>();
      } else if (value.is_boolean()) {
        out[key] = value.get<bool>() ? "true" : "false";
      } else if (value.is_number()) {
        out[key] = value.dump();
      }
    }
  }
  for (const auto& [key, value] : device.labels) out[key] = value;
  out["site"] = device.site;
  if (!out.contains("accelerator")) out["accelerator"] = "cpu";
  return out;
}

bool selector_matches(const deployments::Manifest::Selector& selector,
                      const store::Device& device) {
  if (!selector.sites.empty()) {
    bool any = std::any_of(selector.sites.begin(), selector.sites.end(), [&](const auto& glob) {
      return ::fnmatch(glob.c_str(), device.site.c_str(), 0) == 0;
    });
    if (!any) return false;
  }
  for (const auto& [key, value] : selector.labels) {
    auto it = device.labels.find(key);
    if (it == device.labels.end() || it->second != value) return false;
  }
  if (!selector.devices.empty() && std::find(selector.devices.begin(), selector.devices.end(),
                                             device.id) == selector.devices.end()) {
    return false;
  }
  return true;
}

Result<std::map<std::string, std::string>> parse_selector(std::string_view text) {
  std::map<std::string, std::string> out;
  if (text.empty()) return out;
  const char* rule = "letters, digits, '-', '.', '_' and '/'";
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string_view pair =
        text.substr(start, comma == std::string_view::npos ? comma : comma - start);
    std::string shown = "\"" + std::string(pair) + "\"";
    if (pair.empty()) {
      return make_error(Errc::kInvalidArgument,
                        "selector \"" + std::string(text) +
                            "\": empty entry (expected key=value pairs separated by ',')");
    }
    size_t eq = pair.find('=');
    if (eq == std::string_view::npos) {
      return make_error(Errc::kInvalidArgument,
                        "selector entry " + shown + ": expected key=value, like accelerator=gpu");
    }
    std::string_view key = pair.substr(0, eq);
    std::string_view value = pair.substr(eq + 1);
    if (key.empty() || value.empty()) {
      return make_error(Errc::kInvalidArgument, "selector entry " + shown + ": " +
                                                    (key.empty() ? "empty key" : "empty value") +
                                                    " (expected key=value, like accelerator=gpu)");
    }
    if (!is_selector_text(key) || !is_selector_text(value)) {
      return make_error(Errc::kInvalidArgument, "selector entry " + shown +
                                                    ": keys and values may only use " + rule +
                                                    " (1-128 characters)");
    }
    if (!out.emplace(std::string(key), std::string(value)).second) {
      return make_error(Errc::kInvalidArgument,
                        "selector entry " + shown + ": key " + std::string(key) + " given twice");
    }
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

std::string format_selector(const std::map<std::string, std::string>& selector) {
  std::string out;
  for (const auto& [key, value] : selector) {
    if (!out.empty()) out += ",";
    out += key + "=" + value;
  }
  return out;
}

bool attributes_match(const std::map<std::string, std::string>& selector,
                      const Attributes& attributes) {
  return std::all_of(selector.begin(), selector.end(), [&](const auto& entry) {
    auto it = attributes.find(entry.first);
    return it != attributes.end() && it->second == entry.second;
  });
}

}  // namespace outpost::scheduler
