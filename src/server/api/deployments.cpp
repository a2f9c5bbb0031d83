// /api/v1/deployments: declarative manifests. Apply validates strictly (field paths in every
// refusal), stores a new revision only on a real change, then reschedules the fleet.
#include <spdlog/spdlog.h>

#include "server/api/api.h"
#include "server/deployments/manifest.h"
#include "server/desired_states.h"
#include "server/registry/delta_maker.h"
#include "server/rollouts/controller.h"

namespace outpost::server::api {
namespace {

nlohmann::json deployment_json(const store::Deployment& d) {
  nlohmann::json manifest = parse_object_or_empty(d.manifest_json);
  nlohmann::json model = manifest.contains("spec")
                             ? manifest["spec"].value("model", nlohmann::json())
                             : nlohmann::json();
  return {{"name", d.name},
          {"revision", d.revision},
          {"stable_revision", d.stable_revision},
          {"created_at", d.created_at},
          {"updated_at", d.updated_at},
          {"model", model},
          {"spec_hash", d.spec_hash}};
}

Result<http::Response> apply(ApiContext& ctx, const http::Request& req, const Caller& caller) {
  auto doc = deployments::parse_document(req.body);
  if (!doc) return make_error(doc.error());
  auto manifest = deployments::validate_manifest(*doc);
  if (!manifest) return make_error(manifest.error());
  // A scoped user applies only what stays inside the scope, and only over a deployment that
  // is inside it already (a new revision replaces it on every device it targets).
  OUTPOST_TRY(
      require_selector_in_scope(caller, "deployment " + manifest->name, manifest->selector.sites));
  if (auto existing = require_deployment_in_scope(ctx, caller, manifest->name);
      !existing && existing.error().code != Errc::kNotFound) {
    return make_error(existing.error().with_context("deployment " + manifest->name +
                                                    " exists and is outside the scope"));
  }
  deployments::ReferenceLookup lookup;
  lookup.model_exists = [&ctx](const std::string& model) -> Result<bool> {
    auto versions = ctx.store.list_model_versions(model);
    if (!versions) return make_error(versions.error());
    return !versions->empty();
  };
  lookup.model_version_exists = [&ctx](const std::string& model,
                                       const std::string& version) -> Result<bool> {
    auto found = ctx.store.get_model_version(model, version);
    if (!found) return make_error(found.error());
    return found->has_value();
  };
  lookup.artifact_exists = [&ctx](const std::string& digest) -> Result<bool> {
    auto found = ctx.store.get_artifact(digest);
    if (!found) return make_error(found.error());
    return found->has_value();
  };
  OUTPOST_TRY(deployments::check_references(*manifest, lookup));

  // A spec that was rolled back is not rolled out again by accident.
  const std::string spec_hash = manifest->spec_hash();
  auto revisions = ctx.store.list_deployment_revisions(manifest->name);
  if (!revisions) return make_error(revisions.error());
  auto current = ctx.store.get_deployment(manifest->name);
  if (!current) return make_error(current.error());
  const bool force = req.query_param("force").value_or("") == "true";
  const bool unchanged = *current && (*current)->spec_hash == spec_hash;
  for (const auto& r : *revisions) {
    if (!unchanged && !force && r.spec_hash == spec_hash && !r.bad_reason.empty()) {
      return make_error(Errc::kFailedPrecondition,
                        "revision " + std::to_string(r.revision) + " of deployment " +
                            manifest->name + " had this spec and was rolled back (" + r.bad_reason +
                            "); apply with --force to roll it out again");
    }
  }
  const int64_t previous = *current ? (*current)->revision : 0;
  auto outcome = ctx.store.apply_deployment(manifest->name, manifest->normalized.dump(), spec_hash,
                                            caller.name, ctx.clock.now_ms());
  if (!outcome) return make_error(outcome.error());
  nlohmann::json out = deployment_json(outcome->deployment);
  out["changed"] = outcome->changed;
  if (outcome->changed && ctx.deltas != nullptr) {
    // Deltas to the new revision's bundle from those before it, made in the background.
    auto all = ctx.store.list_deployment_revisions(manifest->name);
    if (all) ctx.deltas->request_deployment(*all);
  }
  if (outcome->changed) {
    audit(ctx, caller, "deployment.apply", "deployment/" + manifest->name,
          {{"revision", outcome->deployment.revision}, {"spec_hash", spec_hash}, {"force", force}});
    // A first revision goes everywhere at once; a new one starts a staged rollout, whose
    // first step the controller takes on its next tick (a large fleet's first wave would
    // hold this answer for seconds).
    auto rollout = ctx.rollouts.start(manifest->name, previous, caller.name, "apply",
                                      /*first_step=*/false);
    if (!rollout) return make_error(rollout.error().with_context("starting the rollout"));
    out["rollout"] = *rollout;
    if (*rollout > 0) {
      auto row = ctx.store.get_rollout(*rollout);
      if (!row) return make_error(row.error());
      if (*row) {
        const nlohmann::json plan = parse_object_or_empty((*row)->doc_json);
        out["rollout_status"] = {{"waves", plan.value("waves", nlohmann::json::array()).size()},
                                 {"devices", plan.value("devices", nlohmann::json::array()).size()},
                                 {"state", (*row)->state}};
      }
    } else {
      auto devices = ctx.store.list_devices({});
      if (!devices) return make_error(devices.error());
      size_t targeted = 0, unschedulable = 0;
      for (const auto& d : *devices) {
        nlohmann::json schedule = parse_object_or_empty(d.schedule_json);
        if (!schedule.contains("deployments") ||
            !schedule["deployments"].contains(manifest->name)) {
          continue;
        }
        ++targeted;
        if (schedule["deployments"][manifest->name].value("state", "") == "unschedulable")
          ++unschedulable;
      }
      out["devices"] = {
          {"total", devices->size()}, {"targeted", targeted}, {"unschedulable", unschedulable}};
    }
  }
  return json_response(outcome->changed ? (outcome->deployment.revision == 1 ? 201 : 200) : 200,
                       out);
}

Result<http::Response> list_deployments(ApiContext& ctx, const http::Request&,
                                        const Caller& caller) {
  auto all = ctx.store.list_deployments();
  if (!all) return make_error(all.error());
  nlohmann::json out = nlohmann::json::array();
  for (const auto& d : *all) {
    auto visible = deployment_in_scope(ctx, caller, d);
    if (!visible) return make_error(visible.error());
    if (*visible) out.push_back(deployment_json(d));
  }
  return json_response(200, {{"deployments", out}});
}

Result<http::Response> show_deployment(ApiContext& ctx, const http::Request& req,
                                       const Caller& caller) {
  const std::string& name = req.params.at("name");
  auto found = ctx.store.get_deployment(name);
  if (!found) return make_error(found.error());
  if (!*found) return make_error(Errc::kNotFound, "deployment " + name + " does not exist");
  OUTPOST_TRY(require_deployment_in_scope(ctx, caller, **found));
  nlohmann::json out = deployment_json(**found);
  out["manifest"] = parse_object_or_empty((*found)->manifest_json);
  auto revisions = ctx.store.list_deployment_revisions(name);
  if (!revisions) return make_error(revisions.error());
  nlohmann::json revs = nlohmann::json::array();
  for (const auto& r : *revisions) {
    revs.push_back({{"revision", r.revision},
                    {"created_at", r.created_at},
                    {"created_by", r.created_by},
                    {"spec_hash", r.spec_hash},
                    {"bad_reason", r.bad_reason}});
  }
  out["revisions"] = revs;
  // Where it runs: per device, scheduled on which revision, reported, or why not.
  auto devices = ctx.store.list_devices({});
  if (!devices) return make_error(devices.error());
  nlohmann::json targets = nlohmann::json::array();
  size_t scheduled = 0, unschedulable = 0, reported = 0;
  for (const auto& d : *devices) {
    if (!caller.in_scope(d.site)) continue;
    nlohmann::json schedule = parse_object_or_empty(d.schedule_json);
    if (!schedule.contains("deployments") || !schedule["deployments"].contains(name)) continue;
    const auto& entry = schedule["deployments"][name];
    nlohmann::json target = {{"device", d.id},
                             {"site", d.site},
                             {"state", entry.value("state", "")},
                             {"revision", entry.value("revision", int64_t{0})}};
    if (entry.contains("reason")) target["reason"] = entry["reason"];
    if (entry.value("state", "") == "unschedulable") {
      ++unschedulable;
    } else {
      ++scheduled;
    }
    nlohmann::json status = parse_object_or_empty(d.status_json);
    if (status.value("generation", static_cast<int64_t>(-1)) == d.generation) {
      ++reported;
      target["in_sync"] = true;
    } else {
      target["in_sync"] = false;
    }
    targets.push_back(target);
  }
  out["devices"] = targets;
  out["summary"] = {
      {"scheduled", scheduled}, {"unschedulable", unschedulable}, {"in_sync", reported}};
  // What the fleet reported for it in the last hour (telemetry).
  auto fleet = deployment_fleet_summary(ctx, name, 3'600'000);
  if (!fleet) return make_error(fleet.error());
  out["fleet"] = std::move(*fleet);
  if (auto rollout = ctx.rollouts.status(name)) {
    out["rollout"] = {{"id", (*rollout)["id"]},
                      {"state", (*rollout)["state"]},
                      {"from_revision", (*rollout)["from_revision"]},
                      {"to_revision", (*rollout)["to_revision"]},
                      {"wave", (*rollout)["wave"]},
                      {"waves", (*rollout)["waves"].size()},
                      {"counts", (*rollout)["counts"]}};
  }
  return json_response(200, out);
}

Result<http::Response> remove(ApiContext& ctx, const http::Request& req, const Caller& caller) {
  const std::string& name = req.params.at("name");
  OUTPOST_TRY(require_deployment_in_scope(ctx, caller, name));
  OUTPOST_TRY(ctx.store.delete_deployment(name));
  audit(ctx, caller, "deployment.delete", "deployment/" + name);
  auto summary = ctx.desired.reconcile_all();
  if (!summary) return make_error(summary.error().with_context("scheduling devices"));
  return json_response(200, {{"name", name}, {"deleted", true}});
}

}  // namespace

void register_deployment_routes(http::Router& router, ApiContext& ctx) {
  add_operator_route(router, ctx, "POST", "/api/v1/deployments", Role::kOperator, apply);
  add_operator_route(router, ctx, "GET", "/api/v1/deployments", Role::kViewer, list_deployments);
  add_operator_route(router, ctx, "GET", "/api/v1/deployments/{name}", Role::kViewer,
                     show_deployment);
  add_operator_route(router, ctx, "DELETE", "/api/v1/deployments/{name}", Role::kOperator, remove);
}

}  // namespace outpost::server::api
