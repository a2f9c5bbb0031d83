#include "server/scheduler/desired_state.h"

#include <algorithm>
#include <cassert>

#include "common/digest.h"
#include "server/scheduler/selector.h"
#include "server/scheduler/variant.h"

namespace outpost::scheduler {
namespace {

using json = nlohmann::json;

json variant_json(const VariantChoice& choice) {
  json selector = json::parse(choice.variant.selector_json, nullptr, false);
  if (!selector.is_object()) selector = json::object();
  return {{"index", choice.index},
          {"selector", std::move(selector)},
          {"artifact", choice.variant.artifact_digest},
          {"format", choice.variant.format}};
}

// A section of the normalized spec; null when absent (a Manifest not made by validate_manifest).
const json& spec_section(const deployments::Manifest& m, const char* key) {
  static const json kAbsent;
  auto spec = m.normalized.find("spec");
  if (spec == m.normalized.end() || !spec->is_object()) return kAbsent;
  auto it = spec->find(key);
  return it == spec->end() ? kAbsent : *it;
}

// Resolves a model version's variant for this device: the choice, or the reason it cannot
// run there. Lookup failures are errors.
struct Resolution {
  std::optional<VariantChoice> choice;
  std::string reason;
};

Result<Resolution> resolve(const std::string& model, const std::string& version,
                           const std::string& device_id, const Attributes& attributes,
                           const ModelLookup& lookup) {
  auto found = lookup(model, version);
  if (!found) {
    return make_error(
        found.error().with_context("looking up model " + model + " version " + version));
  }
  if (!*found) {
    return Resolution{std::nullopt, "model " + model + " version " + version + " does not exist"};
  }
  auto choice = choose_variant(**found, device_id, attributes);
  if (!choice) return Resolution{std::nullopt, choice.error().message};
  return Resolution{std::move(*choice), {}};
}

}  // namespace

std::vector<std::string> held_artifacts(const store::Device& device) {
  std::vector<std::string> out;
  if (device.status_json.find("\"artifacts\"") == std::string::npos) return out;
  json status = json::parse(device.status_json, nullptr, false);
  if (!status.is_object()) return out;
  auto it = status.find("artifacts");
  if (it == status.end() || !it->is_array()) return out;
  for (const auto& d : *it) {
    if (d.is_string()) out.push_back(d.get<std::string>());
  }
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

// Digests a desired entry makes the device fetch (as the agent's needed_artifacts reads them).
void entry_digests(const json& entry, std::vector<std::string>& out) {
  auto add = [&](const json& obj, const char* key) {
    if (obj.is_object() && obj.contains(key) && obj[key].is_string()) {
      out.push_back(obj[key].get<std::string>());
    }
  };
  if (entry.contains("model")) add(entry["model"].value("variant", json()), "artifact");
  if (entry.contains("serve") && entry["serve"].contains("fallback")) {
    add(entry["serve"]["fallback"].value("variant", json()), "artifact");
  }
  if (entry.contains("workload")) add(entry["workload"], "bundle");
}

json delta_offers(const json& entries, const store::Device& device, const DeltaIndex& deltas) {
  json offers = json::object();
  if (deltas.empty()) return offers;
  const std::vector<std::string> held = held_artifacts(device);
  if (held.empty()) return offers;
  auto holds = [&](const std::string& d) {
    return std::binary_search(held.begin(), held.end(), d);
  };
  std::vector<std::string> needed;
  for (const auto& entry : entries) entry_digests(entry, needed);
  for (const auto& target : needed) {
    if (holds(target) || offers.contains(target)) continue;
    auto it = deltas.find(target);
    if (it == deltas.end()) continue;
    json list = json::array();
    for (const auto& offer : it->second) {
      if (holds(offer.base)) {
        list.push_back({{"base", offer.base}, {"delta", offer.delta}, {"size", offer.size}});
      }
    }
    if (!list.empty()) offers[target] = std::move(list);
  }
  return offers;
}

}  // namespace

Result<DesiredComputation> compute_desired_state(const store::Device& device,
                                                 const std::vector<DeploymentInput>& deployments,
                                                 const ModelLookup& lookup,
                                                 const DeltaIndex* deltas) {
  std::vector<const DeploymentInput*> ordered;
  for (const auto& input : deployments) {
    assert(input.manifest != nullptr);
    if (input.manifest != nullptr) ordered.push_back(&input);
  }
  std::stable_sort(ordered.begin(), ordered.end(), [](const auto* a, const auto* b) {
    return a->manifest->name < b->manifest->name;
  });

  const Attributes attributes = device_attributes(device);
  json entries = json::array();
  json schedule = json::object();
  for (const DeploymentInput* input : ordered) {
    const deployments::Manifest& m = *input->manifest;
    if (!selector_matches(m.selector, device)) continue;
    json entry = {{"name", m.name}, {"revision", input->revision}};
    json outcome = {{"state", "scheduled"}, {"revision", input->revision}};

    if (m.model) {
      auto primary = resolve(m.model->name, m.model->version, device.id, attributes, lookup);
      if (!primary) return make_error(primary.error().with_context("deployment " + m.name));
      if (!primary->choice) {
        schedule[m.name] = {
            {"state", "unschedulable"}, {"revision", input->revision}, {"reason", primary->reason}};
        continue;
      }
      entry["model"] = {{"name", m.model->name},
                        {"version", m.model->version},
                        {"variant", variant_json(*primary->choice)}};
      outcome["variant"] = primary->choice->index;
    }
    if (m.serve) {
      json serve = spec_section(m, "serve");
      if (!serve.is_object()) serve = json::object();
      if (m.serve->fallback) {
        const auto& fb = *m.serve->fallback;
        auto fallback = resolve(fb.model, fb.version, device.id, attributes, lookup);
        if (!fallback) return make_error(fallback.error().with_context("deployment " + m.name));
        if (fallback->choice) {
          serve["fallback"]["variant"] = variant_json(*fallback->choice);
          outcome["fallback_variant"] = fallback->choice->index;
        } else {
          // The primary still serves; say why there is no fallback instead of hiding it.
          serve.erase("fallback");
          outcome["fallback_reason"] = fallback->reason;
        }
      }
      entry["serve"] = std::move(serve);
    }
    if (m.workload) entry["workload"] = spec_section(m, "workload");
    for (const char* key : {"config", "secrets", "placement", "telemetry"}) {
      entry[key] = spec_section(m, key);
    }
    entries.push_back(std::move(entry));
    schedule[m.name] = std::move(outcome);
  }

  DesiredComputation out;
  json offers = deltas != nullptr ? delta_offers(entries, device, *deltas) : json::object();
  out.desired = {{"device", device.id}, {"deployments", std::move(entries)}};
  if (!offers.empty()) out.desired["deltas"] = std::move(offers);
  out.desired_json = out.desired.dump(-1, ' ', false, json::error_handler_t::replace);
  out.desired_hash = sha256_hex(out.desired_json);
  out.schedule = {{"deployments", std::move(schedule)}};
  return out;
}

}  // namespace outpost::scheduler
