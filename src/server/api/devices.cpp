// /api/v1/devices: what the fleet looks like, device by device.
#include <algorithm>
#include <cstdlib>
#include <map>

#include "server/api/api.h"
#include "server/cluster/cluster.h"
#include "server/desired_states.h"
#include "server/sync/sync_hub.h"

namespace outpost::server::api {
namespace {

// Fleet health from the device's telemetry stream (null when it never sent any).
nlohmann::json telemetry_summary(const store::TelemetryDeviceState* t) {
  if (t == nullptr) return nlohmann::json();
  const int64_t dropped =
      t->dropped.samples + t->dropped.health + t->dropped.aggregates + t->dropped.events;
  return {{"acked_seq", t->acked_seq},
          {"batches", t->batches},
          {"records", t->records},
          {"last_ingest_at", t->last_ingest_at},
          {"last_health_at", t->last_health_at},
          {"sync_lag_s", t->sync_lag_s ? nlohmann::json(*t->sync_lag_s) : nlohmann::json()},
          {"dropped", dropped},
          {"dropped_by_class",
           {{"samples", t->dropped.samples},
            {"health", t->dropped.health},
            {"aggregates", t->dropped.aggregates},
            {"events", t->dropped.events}}}};
}

nlohmann::json device_summary(const store::Device& d, int64_t now_ms,
                              const store::TelemetryDeviceState* telemetry) {
  nlohmann::json schedule = parse_object_or_empty(d.schedule_json);
  nlohmann::json unschedulable = nlohmann::json::array();
  size_t scheduled = 0;
  if (schedule.contains("deployments") && schedule["deployments"].is_object()) {
    for (const auto& [name, entry] : schedule["deployments"].items()) {
      if (entry.value("state", "") == "unschedulable") {
        unschedulable.push_back({{"deployment", name}, {"reason", entry.value("reason", "")}});
      } else {
        ++scheduled;
      }
    }
  }
  nlohmann::json status = parse_object_or_empty(d.status_json);
  nlohmann::json via =
      status.contains("via") && status["via"].is_array() ? status["via"] : nlohmann::json::array();
  return {{"id", d.id},
          {"via", via},
          {"relay", status.contains("relay") && status["relay"].is_object()},
          {"site", d.site},
          {"labels", d.labels},
          {"facts", parse_object_or_empty(d.facts_json)},
          {"enrolled_at", d.enrolled_at},
          {"last_seen", d.last_seen},
          {"seen_seconds_ago", d.last_seen > 0 ? (now_ms - d.last_seen) / 1000 : -1},
          {"generation", d.generation},
          {"reported_generation", status.value("generation", static_cast<int64_t>(0))},
          {"deployments_scheduled", scheduled},
          {"unschedulable", unschedulable},
          {"cordoned", d.cordoned},
          {"revoked_at", d.revoked_at},
          {"online", device_online(d.last_seen, now_ms)},
          {"telemetry", telemetry_summary(telemetry)}};
}

// Telemetry state of every device that sent some, by id.
Result<std::map<std::string, store::TelemetryDeviceState>> telemetry_states(ApiContext& ctx) {
  auto states = ctx.store.list_telemetry_devices();
  if (!states) return make_error(states.error());
  std::map<std::string, store::TelemetryDeviceState> out;
  for (auto& s : *states) out.emplace(s.device_id, std::move(s));
  return out;
}

Result<store::Labels> parse_label_selector(const std::string& text) {
  store::Labels labels;
  size_t start = 0;
  while (start < text.size()) {
    size_t comma = text.find(',', start);
    std::string pair =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    auto eq = pair.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 >= pair.size()) {
      return make_error(Errc::kInvalidArgument,
                        "selector: expected k=v[,k=v...], got \"" + text + "\"", "selector");
    }
    labels[pair.substr(0, eq)] = pair.substr(eq + 1);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return labels;
}

// A scoped user sees the devices of the sites in scope only (`--site` outside it: none).
Result<http::Response> list_devices(ApiContext& ctx, const http::Request& req,
                                    const Caller& caller) {
  store::DeviceFilter filter;
  if (auto site = req.query_param("site"); site && !site->empty()) filter.site = *site;
  if (auto selector = req.query_param("selector"); selector && !selector->empty()) {
    auto labels = parse_label_selector(*selector);
    if (!labels) return make_error(labels.error());
    filter.labels = *labels;
  }
  auto devices = ctx.store.list_devices(filter);
  if (!devices) return make_error(devices.error());
  auto states = telemetry_states(ctx);
  if (!states) return make_error(states.error());
  nlohmann::json out = nlohmann::json::array();
  const int64_t now = ctx.clock.now_ms();
  for (const auto& d : *devices) {
    if (!caller.in_scope(d.site)) continue;
    auto it = states->find(d.id);
    out.push_back(device_summary(d, now, it == states->end() ? nullptr : &it->second));
  }
  return json_response(200, {{"devices", out}});
}

Result<http::Response> show_device(ApiContext& ctx, const http::Request& req,
                                   const Caller& caller) {
  const std::string& id = req.params.at("id");
  auto device = device_in_scope(ctx, caller, id);
  if (!device) return make_error(device.error());
  const auto& d = *device;
  auto states = telemetry_states(ctx);
  if (!states) return make_error(states.error());
  auto state = states->find(id);
  nlohmann::json out =
      device_summary(d, ctx.clock.now_ms(), state == states->end() ? nullptr : &state->second);
  out["public_key"] = d.public_key;
  out["desired"] = parse_object_or_empty(d.desired_json);
  // Sealed secret values are for the device alone; show which versions it gets, not the bytes.
  if (auto secrets = out["desired"].find("secrets");
      secrets != out["desired"].end() && secrets->is_object()) {
    for (auto& [name, versions] : secrets->items()) {
      if (!versions.is_array()) continue;
      for (auto& v : versions) {
        if (v.is_object()) v.erase("sealed");
      }
    }
  }
  out["schedule"] = parse_object_or_empty(d.schedule_json);
  out["status"] = parse_object_or_empty(d.status_json);
  out["status_at"] = d.status_at;
  // A relay's children: the devices whose last report came through it first; "behind" also
  // counts those further down a chain of relays.
  if (out["relay"].get<bool>()) {
    auto all = ctx.store.list_devices({});
    if (!all) return make_error(all.error());
    nlohmann::json children = nlohmann::json::array();
    int64_t behind = 0;
    for (const auto& other : *all) {
      if (!caller.in_scope(other.site)) continue;
      nlohmann::json st = parse_object_or_empty(other.status_json);
      if (!st.contains("via") || !st["via"].is_array() || st["via"].empty()) continue;
      const auto& chain = st["via"];
      if (std::find(chain.begin(), chain.end(), nlohmann::json(id)) != chain.end()) ++behind;
      if (chain[0] == id) children.push_back(other.id);
    }
    out["children"] = children;
    out["behind"] = behind;
  }
  return json_response(200, out);
}

// The device's status reports in its own order (what happened while it was offline).
Result<http::Response> status_log(ApiContext& ctx, const http::Request& req, const Caller& caller) {
  const std::string& id = req.params.at("id");
  int64_t limit = 50;
  if (auto text = req.query_param("limit")) {
    char* end = nullptr;
    limit = std::strtoll(text->c_str(), &end, 10);
    if (text->empty() || *end != '\0' || limit < 1 || limit > 500) {
      return make_error(Errc::kInvalidArgument,
                        "limit: expected an integer from 1 to 500, got \"" + *text + "\"", "limit");
    }
  }
  auto device = device_in_scope(ctx, caller, id);
  if (!device) return make_error(device.error());
  auto log = ctx.store.list_device_status_log(id, limit);
  if (!log) return make_error(log.error());
  nlohmann::json reports = nlohmann::json::array();
  for (const auto& r : *log) {
    reports.push_back({{"seq", r.seq},
                       {"received_at", r.received_at},
                       {"status", parse_object_or_empty(r.status_json)}});
  }
  return json_response(200, {{"device", id}, {"reports", reports}});
}

Result<http::Response> set_cordon(ApiContext& ctx, const http::Request& req, const Caller& caller,
                                  bool cordoned) {
  const std::string& id = req.params.at("id");
  auto device = device_in_scope(ctx, caller, id);
  if (!device) return make_error(device.error());
  OUTPOST_TRY(ctx.store.set_device_cordoned(id, cordoned));
  audit(ctx, caller, cordoned ? "device.cordon" : "device.uncordon", "device/" + id);
  return json_response(200, {{"id", id}, {"cordoned", cordoned}});
}

// Refuses the device's credential from the next call on (the in-memory session too); the
// device row stays for its history. A revoked device must enroll again with a new token.
Result<http::Response> revoke_device(ApiContext& ctx, const http::Request& req,
                                     const Caller& caller) {
  const std::string& id = req.params.at("id");
  const int64_t now = ctx.clock.now_ms();
  auto device = device_in_scope(ctx, caller, id);
  if (!device) return make_error(device.error());
  const int64_t revoked_at = device->revoked_at == 0 ? now : device->revoked_at;
  if (device->revoked_at == 0) {
    OUTPOST_TRY(ctx.store.set_device_revoked(id, now));
    audit(ctx, caller, "device.revoke", "device/" + id, {{"site", device->site}});
  }
  ctx.sessions.revoke(id, revoked_at);
  ctx.hub.release(id);           // its held long-poll ends now, refused
  if (ctx.cluster != nullptr) {  // and on the other replicas
    (void)ctx.cluster->publish(cluster::kRevokedChannel, id + ":" + std::to_string(revoked_at));
  }
  return json_response(200, {{"id", id}, {"revoked_at", revoked_at}});
}

}  // namespace

void register_device_routes(http::Router& router, ApiContext& ctx) {
  add_operator_route(router, ctx, "GET", "/api/v1/devices", Role::kViewer, list_devices);
  add_operator_route(router, ctx, "GET", "/api/v1/devices/{id}", Role::kViewer, show_device);
  add_operator_route(router, ctx, "GET", "/api/v1/devices/{id}/status-log", Role::kViewer,
                     status_log);
  add_operator_route(router, ctx, "POST", "/api/v1/devices/{id}/cordon", Role::kOperator,
                     [](ApiContext& c, const http::Request& r, const Caller& caller) {
                       return set_cordon(c, r, caller, true);
                     });
  add_operator_route(router, ctx, "POST", "/api/v1/devices/{id}/uncordon", Role::kOperator,
                     [](ApiContext& c, const http::Request& r, const Caller& caller) {
                       return set_cordon(c, r, caller, false);
                     });
  add_operator_route(router, ctx, "POST", "/api/v1/devices/{id}/revoke", Role::kOperator,
                     revoke_device);
}

}  // namespace outpost::server::api
