#include "server/desired_states.h"

#include <cassert>
#include <map>
#include <optional>
#include <set>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/crypto.h"
#include "common/digest.h"
#include "server/deployments/manifest.h"
#include "server/scheduler/desired_state.h"
#include "server/secrets/secret_vault.h"

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

Status DesiredStateUpdater::refresh_from_store(const std::vector<std::string>& device_ids) {
  for (const auto& id : device_ids) {
    auto device = store_.get_device(id);
    if (!device) return make_error(device.error().with_context("refreshing device " + id));
    if (!*device) continue;  // deleted meanwhile
    hub_.publish(id, sign((*device)->generation, (*device)->desired_json));
  }
  return ok();
}

Result<DesiredStateUpdater::Summary> DesiredStateUpdater::reconcile_all() {
  auto devices = store_.list_devices({});
  if (!devices) return make_error(devices.error());
  return reconcile(*devices);
}

Result<bool> DesiredStateUpdater::reconcile_if_secret_switched(int64_t now_ms) {
  const int64_t next = next_secret_switch_ms_.load();
  if (next == 0 || now_ms < next) return false;
  // The pass sets it again when a device still needs a staged version.
  int64_t expected = next;
  next_secret_switch_ms_.compare_exchange_strong(expected, 0);
  auto summary = reconcile_all();
  if (!summary) return make_error(summary.error().with_context("after a secret rotation"));
  spdlog::info("secret rotation at {}: {} device(s) rescheduled, {} changed", format_iso8601(next),
               summary->devices, summary->changed);
  return true;
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

  // Secrets: loaded once per pass when a device needs one; each version a device gets is opened
  // once per pass (payloads below), then sealed per device. Plaintext stays in this frame.
  const int64_t now = clock_ != nullptr ? clock_->now_ms() : 0;
  std::optional<std::map<std::string, store::Secret>> secrets;
  std::map<std::pair<std::string, int64_t>, std::string> payloads;
  struct WipePayloads {
    std::map<std::pair<std::string, int64_t>, std::string>& p;
    ~WipePayloads() {
      for (auto& [key, text] : p) crypto::wipe(text);
    }
  } wipe_payloads{payloads};
  auto load_secrets = [&]() -> Status {
    if (secrets) return ok();
    auto all = store_.list_secrets();
    if (!all) return make_error(all.error().with_context("loading secrets"));
    secrets.emplace();
    int64_t next = 0;
    for (auto& secret : *all) {
      const int64_t at = next_secret_switch(secret, now);
      if (at != 0 && (next == 0 || at < next)) next = at;
      std::string name = secret.name;
      secrets->emplace(std::move(name), std::move(secret));
    }
    next_secret_switch_ms_ = next;
    return ok();
  };
  // Adds "secrets" to a device's document when its deployments name any; returns the hash to
  // store. The hash covers name, version and activate_at only: sealing is randomized, and the
  // store keeps the old document (and its ciphertexts) while the hash holds still.
  auto add_secrets = [&](const store::Device& device,
                         scheduler::DesiredComputation& computed) -> Status {
    std::set<std::string> names;
    for (const auto& entry : computed.desired["deployments"]) {
      for (const auto& name : entry.value("secrets", nlohmann::json::array())) {
        if (name.is_string()) names.insert(name.get<std::string>());
      }
    }
    // A revoked device gets nothing new: no section, so nothing is sealed for it.
    if (names.empty() || vault_ == nullptr || device.revoked_at != 0) return ok();
    OUTPOST_TRY(load_secrets());
    nlohmann::json section = nlohmann::json::object();
    for (const auto& name : names) {
      auto it = secrets->find(name);
      if (it == secrets->end()) continue;  // not created yet: the agent waits for it
      nlohmann::json versions = nlohmann::json::array();
      for (const auto* v : deliverable_versions(it->second, now)) {
        versions.push_back({{"version", v->version}, {"activate_at", v->activate_at}});
      }
      section[name] = std::move(versions);
    }
    if (section.empty()) return ok();
    computed.desired["secrets"] = section;
    computed.desired_json =
        computed.desired.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    computed.desired_hash = sha256_hex(computed.desired_json);
    if (computed.desired_hash == device.desired_hash) {
      computed.desired_json = device.desired_json;  // unchanged: the store keeps the old one
      return ok();
    }
    auto device_key = crypto::base64_decode(device.public_key);
    if (!device_key) {
      return make_error(Errc::kInternal,
                        "device " + device.id + ": stored public key is not base64");
    }
    for (auto& [name, versions] : computed.desired["secrets"].items()) {
      for (auto& v : versions) {
        const int64_t version = v["version"].get<int64_t>();
        auto key = std::make_pair(name, version);
        auto payload = payloads.find(key);
        if (payload == payloads.end()) {
          const store::SecretVersion* row = nullptr;
          for (const auto& sv : secrets->at(name).versions) {
            if (sv.version == version) row = &sv;
          }
          assert(row != nullptr);
          auto opened = vault_->device_payload(*row);
          if (!opened) return make_error(opened.error());
          payload = payloads.emplace(key, std::move(*opened)).first;
        }
        auto sealed = crypto::seal_to_ed25519(payload->second, *device_key);
        if (!sealed) {
          return make_error(sealed.error().with_context("sealing secret " + name + " version " +
                                                        std::to_string(version) + " to device " +
                                                        device.id));
        }
        v["sealed"] = crypto::base64_encode(*sealed);
      }
    }
    computed.desired_json =
        computed.desired.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    return ok();
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
    std::vector<std::string> changed;
    for (size_t i = 0; i < writes.size(); ++i) {
      if ((*generations)[i] != old_generations[i]) {
        ++summary.changed;
        hub_.publish(writes[i].device_id, sign((*generations)[i], writes[i].desired_json));
        if (news_) changed.push_back(writes[i].device_id);
      }
    }
    if (news_ && !changed.empty()) news_(changed);
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
    OUTPOST_TRY(add_secrets(device, *computed));
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
