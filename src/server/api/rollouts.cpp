// /api/v1/deployments/{name}/rollout[/pause|resume|abort|undo] and /api/v1/sites: operator
// control of staged rollouts, and the sites whose time zones maintenance windows use. The
// controller audits every action itself.
#include "server/api/api.h"
#include "server/rollouts/controller.h"
#include "server/rollouts/plan.h"

namespace outpost::server::api {
namespace {

using json = nlohmann::json;

json site_json(const store::Site& s) {
  return {{"name", s.name},
          {"timezone", s.timezone},
          {"region", s.region},
          {"updated_at", s.updated_at}};
}

Result<http::Response> put_site(ApiContext& ctx, const http::Request& req, const Caller& caller) {
  const std::string& name = req.params.at("name");
  OUTPOST_TRY(require_site_in_scope(caller, name, "site " + name + " is outside it"));
  auto doc = parse_json_body(req.body.empty() ? "{}" : req.body);
  if (!doc) return make_error(doc.error());
  if (!doc->is_object()) return make_error(Errc::kInvalidArgument, "site: expected an object");
  for (const auto& [key, value] : doc->items()) {
    if (key != "timezone" && key != "region") {
      return make_error(Errc::kInvalidArgument, key + ": unknown field (expected timezone, region)",
                        key);
    }
    if (!value.is_string()) {
      return make_error(Errc::kInvalidArgument, key + ": expected a string", key);
    }
  }
  store::Site site;
  auto existing = ctx.store.get_site(name);
  if (!existing) return make_error(existing.error());
  if (*existing) site = **existing;
  site.name = name;
  if (doc->contains("timezone")) site.timezone = (*doc)["timezone"].get<std::string>();
  if (doc->contains("region")) site.region = (*doc)["region"].get<std::string>();
  if (auto checked = rollouts::local_minute_of_day(site.timezone, ctx.clock.now_ms()); !checked) {
    return make_error(checked.error());
  }
  site.updated_at = ctx.clock.now_ms();
  OUTPOST_TRY(ctx.store.put_site(site));
  audit(ctx, caller, "site.put", "site/" + name,
        {{"timezone", site.timezone}, {"region", site.region}});
  return json_response(200, site_json(site));
}

// A scoped user sees the sites in scope only.
Result<http::Response> list_sites(ApiContext& ctx, const http::Request&, const Caller& caller) {
  auto sites = ctx.store.list_sites();
  if (!sites) return make_error(sites.error());
  auto devices = ctx.store.list_devices({});
  if (!devices) return make_error(devices.error());
  // Sites devices name but no one configured yet are listed too, on UTC.
  std::map<std::string, json> out;
  for (const auto& s : *sites) out[s.name] = site_json(s);
  std::map<std::string, int64_t> counts;
  for (const auto& d : *devices) ++counts[d.site];
  for (const auto& [name, n] : counts) {
    if (!out.contains(name)) out[name] = site_json(store::Site{name, "UTC", "", 0});
  }
  json list = json::array();
  for (auto& [name, s] : out) {
    if (!caller.in_scope(name)) continue;
    s["devices"] = counts[name];
    list.push_back(std::move(s));
  }
  return json_response(200, {{"sites", list}});
}

using Action = Result<json> (rollouts::RolloutController::*)(const std::string&,
                                                             const std::string&);

void add_action(http::Router& router, ApiContext& ctx, const std::string& verb, Action action) {
  add_operator_route(router, ctx, "POST", "/api/v1/deployments/{name}/rollout/" + verb,
                     Role::kOperator,
                     [action](ApiContext& c, const http::Request& req,
                              const Caller& caller) -> Result<http::Response> {
                       const std::string& name = req.params.at("name");
                       OUTPOST_TRY(require_deployment_in_scope(c, caller, name));
                       auto out = (c.rollouts.*action)(name, caller.name);
                       if (!out) return make_error(out.error());
                       return json_response(200, *out);
                     });
}

}  // namespace

void register_rollout_routes(http::Router& router, ApiContext& ctx) {
  add_operator_route(
      router, ctx, "GET", "/api/v1/deployments/{name}/rollout", Role::kViewer,
      [](ApiContext& c, const http::Request& req, const Caller& caller) -> Result<http::Response> {
        const std::string& name = req.params.at("name");
        OUTPOST_TRY(require_deployment_in_scope(c, caller, name));
        auto out = c.rollouts.status(name);
        if (!out) return make_error(out.error());
        return json_response(200, *out);
      });
  add_action(router, ctx, "pause", &rollouts::RolloutController::pause);
  add_action(router, ctx, "resume", &rollouts::RolloutController::resume);
  add_action(router, ctx, "abort", &rollouts::RolloutController::abort);
  add_action(router, ctx, "undo", &rollouts::RolloutController::undo);
  add_operator_route(router, ctx, "GET", "/api/v1/sites", Role::kViewer, list_sites);
  add_operator_route(router, ctx, "PUT", "/api/v1/sites/{name}", Role::kOperator, put_site);
}

}  // namespace outpost::server::api
