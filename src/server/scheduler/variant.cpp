#include "server/scheduler/variant.h"

#include <charconv>
#include <optional>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

namespace outpost::scheduler {
namespace {

using json = nlohmann::json;

std::optional<double> as_number(const std::string& text) {
  double value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// Selector and needs values may be JSON strings, numbers or booleans; compare them as text,
// the way device attributes are written.
std::optional<std::string> as_text(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_boolean()) return value.get<bool>() ? "true" : "false";
  if (value.is_number()) return value.dump();
  return std::nullopt;
}

std::string number_text(double value) {
  if (value == static_cast<double>(static_cast<int64_t>(value)) && value > -9.0e15 &&
      value < 9.0e15) {
    return std::to_string(static_cast<int64_t>(value));
  }
  return json(value).dump();
}

int precision_rank(const std::string& precision) {
  if (precision == "fp32") return 3;
  if (precision == "fp16" || precision == "bf16") return 2;
  if (precision == "int8") return 1;
  return 0;
}

struct Assessment {
  std::string label;                 // "[0] accelerator=gpu"
  std::vector<std::string> misfits;  // empty = eligible
  bool accelerator_match = false;
  int precision = 0;
  std::string precision_name;
  int matched_keys = 0;
};

std::string attribute_text(const Attributes& attributes, const std::string& key) {
  auto it = attributes.find(key);
  return it == attributes.end() ? "device has no " + key : "device has " + key + "=" + it->second;
}

Assessment assess(size_t index, const store::ModelVariant& variant, const Attributes& attributes) {
  Assessment a;
  json selector = json::parse(variant.selector_json, nullptr, false);
  json needs = json::parse(variant.needs_json, nullptr, false);
  std::map<std::string, std::string> selector_text;
  if (selector.is_object()) {
    for (const auto& [key, value] : selector.items()) {
      selector_text[key] = as_text(value).value_or(value.dump());
    }
  }
  std::string shown = format_selector(selector_text);
  a.label = "[" + std::to_string(index) + "] " + (shown.empty() ? "(any device)" : shown);
  if (!selector.is_object()) a.misfits.push_back("its selector is not a JSON object");
  if (!needs.is_object()) {
    a.misfits.push_back("its needs are not a JSON object");
    needs = json::object();
  }
  const std::string& accelerator = attributes.at("accelerator");

  for (const auto& [key, value] : selector_text) {
    auto it = attributes.find(key);
    if (key == "precision") {
      a.precision_name = value;
      if (it == attributes.end()) continue;  // describes the variant, not the device
    }
    // Every device has a CPU: a CPU variant fits an accelerated device too, ranked below a
    // variant made for its accelerator.
    bool cpu_on_any = key == "accelerator" && value == "cpu";
    if (!cpu_on_any && (it == attributes.end() || it->second != value)) {
      a.misfits.push_back(attribute_text(attributes, key));
      continue;
    }
    ++a.matched_keys;
    if (key == "accelerator" && value != "cpu") a.accelerator_match = true;
  }

  for (const auto& [key, value] : needs.items()) {
    auto text = as_text(value);
    if (key == "precision") {
      if (a.precision_name.empty() && text) a.precision_name = *text;
      continue;
    }
    if (key == "accelerator") {
      if (!text || (*text != accelerator && *text != "cpu")) {
        a.misfits.push_back("needs accelerator " + text.value_or(value.dump()) + ", device has " +
                            accelerator);
      } else if (*text != "cpu") {
        a.accelerator_match = true;
      }
      continue;
    }
    if (key.rfind("min_", 0) == 0) {
      if (!value.is_number()) {
        a.misfits.push_back("its need " + key + " is not a number");
        continue;
      }
      std::string fact = key.substr(4);
      double need = value.get<double>();
      auto it = attributes.find(fact);
      std::optional<double> have = it == attributes.end() ? std::nullopt : as_number(it->second);
      if (have && *have < need) {  // unknown amounts do not exclude
        if (fact == "memory_mb") {
          a.misfits.push_back("needs " + number_text(need) + " MB memory, device has " +
                              number_text(*have) + " MB");
        } else {
          a.misfits.push_back("needs " + fact + " >= " + number_text(need) + ", device has " +
                              number_text(*have));
        }
      }
      continue;
    }
    auto it = attributes.find(key);
    if (!text || it == attributes.end() || it->second != *text) {
      a.misfits.push_back("needs " + key + "=" + text.value_or(value.dump()) + ", " +
                          attribute_text(attributes, key));
    }
  }
  a.precision = precision_rank(a.precision_name);
  return a;
}

std::string join(const std::vector<std::string>& parts, const char* separator) {
  std::string out;
  for (const auto& part : parts) {
    if (!out.empty()) out += separator;
    out += part;
  }
  return out;
}

}  // namespace

Result<VariantChoice> choose_variant(const store::ModelVersion& version,
                                     const std::string& device_id, const Attributes& attributes) {
  Attributes attrs = attributes;
  if (!attrs.contains("accelerator")) attrs["accelerator"] = "cpu";

  std::vector<Assessment> assessments;
  std::optional<size_t> best;
  auto rank = [](const Assessment& a, size_t index) {
    // Higher is better; the negated index makes the earlier variant win a tie.
    return std::make_tuple(a.accelerator_match, a.precision, a.matched_keys,
                           -static_cast<int64_t>(index));
  };
  for (size_t i = 0; i < version.variants.size(); ++i) {
    assessments.push_back(assess(i, version.variants[i], attrs));
    if (!assessments[i].misfits.empty()) continue;
    if (!best || rank(assessments[i], i) > rank(assessments[*best], *best)) best = i;
  }

  std::string what = version.model + " " + version.version;
  if (!best) {
    std::vector<std::string> reasons;
    for (const auto& a : assessments) reasons.push_back(a.label + ": " + join(a.misfits, ", "));
    std::string why = reasons.empty() ? "the version has no variants" : join(reasons, "; ");
    return make_error(Errc::kFailedPrecondition,
                      "no variant of " + what + " fits device " + device_id + ": " + why);
  }

  const Assessment& chosen = assessments[*best];
  std::vector<std::string> reasons;
  if (chosen.accelerator_match) reasons.push_back("matches accelerator " + attrs["accelerator"]);
  reasons.push_back("precision " +
                    (chosen.precision_name.empty() ? "unspecified" : chosen.precision_name));
  reasons.push_back(std::to_string(chosen.matched_keys) + " selector key" +
                    (chosen.matched_keys == 1 ? "" : "s") + " matched");
  std::string explanation = "variant " + chosen.label + " of " + what + " for device " + device_id +
                            ": " + join(reasons, ", ");
  std::vector<std::string> others;
  for (size_t i = 0; i < assessments.size(); ++i) {
    if (i == *best) continue;
    const auto& a = assessments[i];
    others.push_back(a.label +
                     (a.misfits.empty() ? ": ranked lower" : ": " + join(a.misfits, ", ")));
  }
  if (!others.empty()) explanation += "; others: " + join(others, "; ");
  return VariantChoice{*best, version.variants[*best], std::move(explanation)};
}

Result<VariantChoice> choose_variant(const store::ModelVersion& version,
                                     const store::Device& device) {
  return choose_variant(version, device.id, device_attributes(device));
}

}  // namespace outpost::scheduler
