#include "server/desired_states.h"

#include <map>
#include <set>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/crypto.h"
#include "server/deployments/manifest.h"
#include "server/scheduler/desired_state.h"

namespace outpost::server {

DesiredStateUpdater::DesiredStateUpdater(store::Store& store, sync::SyncHub& hub,
                                         std::string signing_secret_key)
    : store_(store), hub_(hub), signing_secret_key_(std::move(signing_secret_key)) {}

std::string DesiredStateUpdater::document_body(int64_t generation,
                                               const std::string& desired_json) {
  // The generation is part of the signed bytes, so a replayed old document cannot pass for a
  // newer one. desired_json is an object ("{...}").
  std::string body = "{\"generation\":" + std::to_string(generation);
  if (desired_json.size() > 2)
    body += "," + desired_json.substr(1);
  else
    body += "}";
  return body;
}

sync::SignedDesired DesiredStateUpdater::sign(int64_t generation,
                                              const std::string& desired_json) const {
  sync::SignedDesired out;
  out.generation = generation;
  auto body = std::make_shared<std::string>(document_body(generation, desired_json));
  out.signature = crypto::base64_encode(crypto::ed25519_sign(*body, signing_secret_key_));
  out.body = std::move(body);
  return out;
}

Result<sync::SignedDesired> DesiredStateUpdater::signed_desired(const std::string& device_id) {
  if (auto held = hub_.current(device_id)) return *held;
  auto device = store_.get_device(device_id);
  if (!device) return make_error(device.error());
  if (!*device) return make_error(Errc::kNotFound, "device " + device_id + " does not exist");
  return sign((*device)->generation, (*device)->desired_json);
}

Result<DesiredStateUpdater::Summary> DesiredStateUpdater::reconcile_all() {
  auto devices = store_.list_devices({});
  if (!devices) return make_error(devices.error());
  return reconcile(*devices);
}

Result<DesiredStateUpdater::Summary> DesiredStateUpdater::reconcile_device(
    const std::string& device_id) {
  auto device = store_.get_device(device_id);
  if (!device) return make_error(device.error());
  if (!*device) return make_error(Errc::kNotFound, "device " + device_id + " does not exist");
  return reconcile({**device});
}

Result<DesiredStateUpdater::Summary> DesiredStateUpdater::reconcile(
    const std::vector<store::Device>& devices) {
  std::lock_guard lock(mu_);
  auto stored = store_.list_deployments();
  if (!stored) return make_error(stored.error());
  auto assigned = store_.list_revision_assignments("");
  if (!assigned) return make_error(assigned.error());
  // (deployment, device) -> revision, for devices a rollout moved or holds back.
  std::map<std::pair<std::string, std::string>, int64_t> assignments;
  for (auto& a : *assigned) assignments[{a.deployment, a.device_id}] = a.revision;

  // Manifests are stored normalized; validating them again yields the typed form. Each
  // revision any device runs is parsed once for the whole pass.
  std::map<std::pair<std::string, int64_t>, deployments::Manifest> manifests;
  auto add_manifest = [&](const std::string& name, int64_t revision,
                          const std::string& manifest_json) -> Status {
    auto doc = nlohmann::json::parse(manifest_json, nullptr, false);
    if (doc.is_discarded()) {
      return make_error(Errc::kInternal, "stored manifest of " + name + " revision " +
                                             std::to_string(revision) + " is not JSON");
    }
    auto manifest = deployments::validate_manifest(doc);
    if (!manifest) {
      return make_error(manifest.error().with_context("stored deployment " + name + " revision " +
                                                      std::to_string(revision)));
    }
    manifests.emplace(std::make_pair(name, revision), std::move(*manifest));
    return ok();
  };
  // Which revision of `d` a device runs: its assignment, else the stable revision.
  auto revision_for = [&](const store::Deployment& d, const std::string& device) {
    auto it = assignments.find({d.name, device});
    if (it != assignments.end()) return it->second;
    return d.stable_revision > 0 ? d.stable_revision : d.revision;
  };
  for (const auto& d : *stored) {
    OUTPOST_TRY(add_manifest(d.name, d.revision, d.manifest_json));
    std::set<int64_t> others;
    if (d.stable_revision > 0 && d.stable_revision != d.revision) others.insert(d.stable_revision);
    for (const auto& [key, revision] : assignments) {
      if (key.first == d.name && revision != d.revision) others.insert(revision);
    }
    if (others.empty()) continue;
    auto revisions = store_.list_deployment_revisions(d.name);
    if (!revisions) return make_error(revisions.error());
    for (const auto& r : *revisions) {
      if (others.contains(r.revision))
        OUTPOST_TRY(add_manifest(d.name, r.revision, r.manifest_json));
    }
  }
  // One lookup per model version for the whole pass, not one per device.
  std::map<std::pair<std::string, std::string>, std::optional<store::ModelVersion>> cache;
  scheduler::ModelLookup lookup =
      [&](const std::string& model,
          const std::string& version) -> Result<std::optional<store::ModelVersion>> {
    auto key = std::make_pair(model, version);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
    auto found = store_.get_model_version(model, version);
    if (!found) return make_error(found.error());
    cache[key] = *found;
    return *found;
  };

  // Ready deltas, offered to devices that hold their bases.
  scheduler::DeltaIndex deltas;
  auto delta_rows = store_.list_artifact_deltas("");
  if (!delta_rows) return make_error(delta_rows.error());
  for (const auto& d : *delta_rows) {
    if (d.state == "ready") deltas[d.target].push_back({d.base, d.delta, d.delta_size});
  }

  Summary summary;
  std::vector<scheduler::DeploymentInput> inputs;
  // Written in groups: one transaction (one fsync) per kWriteGroup devices, so a rollout step
  // or a new revision for a large fleet is not one commit per device.
  constexpr size_t kWriteGroup = 512;
  std::vector<store::DesiredStateWrite> writes;
  std::vector<int64_t> old_generations;
  auto flush = [&]() -> Status {
    if (writes.empty()) return ok();
    auto generations = store_.update_desired_states(writes);
    if (!generations) return make_error(generations.error());
    for (size_t i = 0; i < writes.size(); ++i) {
      if ((*generations)[i] != old_generations[i]) {
        ++summary.changed;
        hub_.publish(writes[i].device_id, sign((*generations)[i], writes[i].desired_json));
      }
    }
    writes.clear();
    old_generations.clear();
    return ok();
  };
  for (const auto& device : devices) {
    ++summary.devices;
    inputs.clear();
    for (const auto& d : *stored) {
      const int64_t revision = revision_for(d, device.id);
      auto it = manifests.find({d.name, revision});
      if (it == manifests.end()) {
        return make_error(Errc::kInternal, "deployment " + d.name + " has no revision " +
                                               std::to_string(revision) + " (device " + device.id +
                                               ")");
      }
      inputs.push_back({&it->second, revision});
    }
    auto computed = scheduler::compute_desired_state(device, inputs, lookup, &deltas);
    if (!computed) return make_error(computed.error().with_context("device " + device.id));
    const nlohmann::json scheduled =
        computed->schedule.value("deployments", nlohmann::json::object());
    for (const auto& [name, entry] : scheduled.items()) {
      if (entry.value("state", "") == "unschedulable") {
        ++summary.unschedulable;
        spdlog::info("device {} cannot run {}: {}", device.id, name, entry.value("reason", ""));
      }
    }
    writes.push_back({device.id, std::move(computed->desired_json),
                      std::move(computed->desired_hash), computed->schedule.dump()});
    old_generations.push_back(device.generation);
    if (writes.size() >= kWriteGroup) OUTPOST_TRY(flush());
  }
  OUTPOST_TRY(flush());
  return summary;
}

}  // namespace outpost::server
