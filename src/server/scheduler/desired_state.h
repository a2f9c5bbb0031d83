// Computes one device's desired state from the deployments that target it: which model
// variant, workload, config and policies it should run. Pure: the caller loads inputs and
// stores the result (Store::update_desired_state bumps the generation when the hash moves).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "server/deployments/manifest.h"
#include "store/store.h"

namespace outpost::scheduler {

struct DeploymentInput {
  const deployments::Manifest* manifest = nullptr;  // not owned; must outlive the call
  int64_t revision = 0;  // the revision this device should run (rollouts may hold it back)
};

// Finds a model version; nullopt when it does not exist. Errors (store down) abort the
// computation rather than dropping the deployment from the device.
using ModelLookup = std::function<Result<std::optional<store::ModelVersion>>(
    const std::string& model, const std::string& version)>;

// A delta the registry holds: applying `delta` (`size` bytes) to `base` gives the target.
struct DeltaOffer {
  std::string base;
  std::string delta;
  int64_t size = 0;
};
// Ready deltas by target digest.
using DeltaIndex = std::map<std::string, std::vector<DeltaOffer>>;

struct DesiredComputation {
  // {"device":"d-12","deployments":[{"name":..,"revision":..,"model":{..,"variant":{..}},
  //   "serve":{..},"workload":{..},"config":{..},"secrets":[..],"placement":{..},
  //   "telemetry":{..}}]}, deployments sorted by name; no generation in it.
  nlohmann::json desired;
  std::string desired_json;  // desired.dump(): deterministic (object keys sorted)
  std::string desired_hash;  // sha256_hex(desired_json)
  // {"deployments":{"<name>":{"state":"scheduled","revision":2,"variant":0} |
  //   {"state":"unschedulable","revision":2,"reason":"no variant of ... fits ..."}}}
  // A scheduled deployment whose fallback model has no fitting variant (or does not exist)
  // keeps running without the fallback; its entry then carries "fallback_reason".
  nlohmann::json schedule;
};

// Only deployments whose selector matches the device appear. A matching deployment whose
// model is missing or has no variant that fits the device is left out of "deployments" and
// reported "unschedulable" with the reason. Cordoned devices keep their deployments.
// The hash changes exactly when something the device runs changes (revision, variant,
// normalized spec sections); recomputing with the same inputs gives the same hash.
// Delta offers: for each artifact the device's deployments need (model variants, fallback
// variants, workload bundles) that it does not hold, the deltas from bases it does hold, as a
// top-level {"deltas":{"<target>":[{"base","delta","size"}]}} (only when there is one; outside
// the deployment entries, so an offer never changes what a device runs). What a device holds
// is what its last status report listed under "artifacts".
// Errors: a ModelLookup error, with context.
[[nodiscard]] Result<DesiredComputation> compute_desired_state(
    const store::Device& device, const std::vector<DeploymentInput>& deployments,
    const ModelLookup& lookup, const DeltaIndex* deltas = nullptr);

// The digests a device's last status report says it holds (its "artifacts" list).
std::vector<std::string> held_artifacts(const store::Device& device);

}  // namespace outpost::scheduler
