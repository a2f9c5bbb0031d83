// The device side of the API: enroll, long-poll the desired state, report status.
#include <charconv>
#include <optional>

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/json_fields.h"
#include "server/api/api.h"
#include "server/desired_states.h"
#include "server/sync/sync_hub.h"

namespace outpost::server::api {
namespace {

nlohmann::json via_of(const http::Request& req) { return via_list(req); }

Result<http::Response> enroll(ApiContext& ctx, const http::Request& req) {
  auto doc = parse_json_body(req.body);
  if (!doc) return make_error(doc.error());
  auto token = json_fields::required_string(*doc, "token", "token");
  if (!token) return make_error(token.error());
  auto public_key = json_fields::required_string(*doc, "public_key", "public_key");
  if (!public_key) return make_error(public_key.error());
  auto raw_key = crypto::base64_decode(*public_key);
  if (!raw_key || raw_key->size() != 32) {
    return make_error(Errc::kInvalidArgument,
                      "public_key: expected a base64 Ed25519 public key (32 bytes)", "public_key");
  }
  auto site = json_fields::optional_string(*doc, "site", "site");
  if (!site) return make_error(site.error());
  auto labels = json_fields::string_map(*doc, "labels", "labels");
  if (!labels) return make_error(labels.error());
  nlohmann::json facts = doc->value("facts", nlohmann::json::object());
  if (!facts.is_object()) {
    return make_error(Errc::kInvalidArgument, "facts: expected an object", "facts");
  }

  const std::string token_hash = sha256_hex(*token);
  // The token binds the site and its labels; the agent's --label values add to them and
  // override them (so a device can declare e.g. accelerator=gpu).
  auto found = ctx.store.find_enrollment_token_by_hash(token_hash);
  if (!found) return make_error(found.error());
  if (!*found) return make_error(Errc::kUnauthenticated, "enrollment token is not valid");
  const store::EnrollmentToken* bound = &**found;
  if (*site && !(*site)->empty() && bound->site != **site) {
    return make_error(Errc::kInvalidArgument,
                      "site: the enrollment token is for site " + bound->site + ", not " + **site,
                      "site");
  }

  const int64_t now = ctx.clock.now_ms();
  store::Device device;
  device.id = crypto::random_hex(6, "d-");
  std::string secret = crypto::random_hex(32);
  device.credential_hash = sha256_hex(secret);
  device.public_key = *public_key;
  device.facts_json = facts.dump();
  device.enrolled_at = now;
  device.last_seen = now;
  device.site = bound->site;
  device.labels = bound->labels;
  for (const auto& [k, v] : *labels) device.labels[k] = v;
  auto used = ctx.store.enroll_device(token_hash, now, device);
  if (!used) return make_error(used.error());
  auto stored = ctx.store.get_device(device.id);
  if (!stored || !*stored) return make_error(Errc::kInternal, "enrolled device vanished");
  Caller caller;
  caller.name = "enrollment-token:" + used->id;
  audit(ctx, caller, "device.enroll", "device/" + device.id,
        {{"site", (*stored)->site}, {"labels", (*stored)->labels}, {"via", via_of(req)}});
  auto summary = ctx.desired.reconcile_device(device.id);
  if (!summary) spdlog::warn("scheduling new device {}: {}", device.id, summary.error().message);
  nlohmann::json out = {{"device_id", device.id},
                        {"credential", device.id + "." + secret},
                        {"site", (*stored)->site},
                        {"labels", (*stored)->labels},
                        {"server_public_key", ctx.server_public_key_b64}};
  return json_response(201, out);
}

// The poll once the caller is known: answers at once, or parks the request until the
// device's generation moves or the wait is over. Reads the store only when the device's
// desired state is not in memory yet.
void poll_desired(ApiContext& ctx, const http::Request& req, const http::Responder& respond,
                  const Caller& caller) {
  int64_t known = 0;
  int64_t wait_ms = ctx.long_poll_ms;
  auto integer = [&](const char* name, int64_t min) -> Result<std::optional<int64_t>> {
    auto text = req.query_param(name);
    if (!text) return std::optional<int64_t>();
    int64_t value = 0;
    auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), value);
    if (ec != std::errc() || end != text->data() + text->size() || value < min) {
      return make_error(Errc::kInvalidArgument,
                        std::string(name) + ": expected an integer >= " + std::to_string(min) +
                            ", got \"" + *text + "\"",
                        name);
    }
    return std::optional<int64_t>(value);
  };
  auto generation = integer("generation", -1);
  if (!generation) return respond(http::Response::error(generation.error()));
  if (*generation) known = **generation;
  auto wait_s = integer("wait", 0);
  if (!wait_s) return respond(http::Response::error(wait_s.error()));
  // Seconds, capped by the server's long-poll limit (which also keeps the product small).
  if (*wait_s && **wait_s < ctx.long_poll_ms / 1000) wait_ms = **wait_s * 1000;
  ctx.sessions.seen(caller.device_id, ctx.clock.now_ms());
  if (!ctx.hub.current(caller.device_id)) {
    auto loaded = ctx.desired.signed_desired(caller.device_id);
    if (!loaded) return respond(http::Response::error(loaded.error()));
    ctx.hub.publish(caller.device_id, *loaded);
  }
  uint64_t parked = ctx.hub.wait(
      caller.device_id, known, wait_ms,
      [respond, &sessions = ctx.sessions,
       device = caller.device_id](std::optional<sync::SignedDesired> desired) {
        // Revoked while parked: nothing more reaches it.
        if (sessions.revoked(device)) {
          return respond(http::Response::error(
              Error{Errc::kUnauthenticated, "device " + device + " was revoked", {}}));
        }
        if (!desired) {
          http::Response resp;
          resp.status = 304;
          resp.content_type = "application/json";
          return respond(std::move(resp));
        }
        http::Response resp = http::Response::json(200, *desired->body);
        resp.headers.emplace_back("X-Outpost-Generation", std::to_string(desired->generation));
        resp.headers.emplace_back("X-Outpost-Signature", desired->signature);
        respond(std::move(resp));
      });
  // A device that hangs up (lost link, restart) frees its parked poll and socket now.
  if (parked != 0 && req.hangup) {
    req.hangup->on_hangup(
        [&hub = ctx.hub, device = caller.device_id, parked] { hub.cancel(device, parked); });
  }
}

void get_desired(ApiContext& ctx, http::Request&& req, http::Responder respond) {
  // Fast path: a device whose credential and desired state are both in memory costs no store
  // access, so it is served on the I/O thread, not queued behind the store work (status and
  // telemetry writes) on the workers. Anything else goes to a worker.
  if (auto caller = authenticate_device_from_memory(ctx, req)) {
    if (!*caller) return respond(http::Response::error(caller->error()));
    if (ctx.hub.current((*caller)->device_id)) return poll_desired(ctx, req, respond, **caller);
  }
  boost::asio::post(ctx.workers, [&ctx, req = std::move(req), respond = std::move(respond)]() {
    auto caller = authenticate_device(ctx, req);
    if (!caller) return respond(http::Response::error(caller.error()));
    poll_desired(ctx, req, respond, *caller);
  });
}

// How many reports the server keeps per device (the agent's offline queue is bounded too).
constexpr int64_t kStatusLogKeep = 500;

// The agent sends {"seq":N,"generation":G,"deployments":[...],"facts":{...}?}; facts only
// when they changed (new hardware, a GPU driver installed), which reschedules the device.
// Reports of many devices are stored together (the status writer) and each is answered after
// its commit. Blocking up to the queueing: runs on a worker.
void post_status(ApiContext& ctx, const http::Request& req, http::Responder respond) {
  auto caller = authenticate_device(ctx, req);
  if (!caller) return respond(http::Response::error(caller.error()));
  auto doc = parse_json_body(req.body);
  if (!doc) return respond(http::Response::error(doc.error()));
  if (!doc->is_object()) {
    return respond(
        http::Response::error(Error{Errc::kInvalidArgument, "status: expected an object", ""}));
  }
  int64_t seq = 0;
  if (auto it = doc->find("seq"); it != doc->end()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 1) {
      return respond(http::Response::error(
          Error{Errc::kInvalidArgument, "seq: expected an integer >= 1", "seq"}));
    }
    seq = it->get<int64_t>();
  }
  std::optional<nlohmann::json> facts;
  if (auto it = doc->find("facts"); it != doc->end()) {
    if (!it->is_object()) {
      return respond(http::Response::error(
          Error{Errc::kInvalidArgument, "facts: expected an object", "facts"}));
    }
    facts = std::move(*it);
    doc->erase("facts");
  }
  const int64_t now = ctx.clock.now_ms();
  (*doc)["received_at"] = now;
  (*doc)["via"] = via_of(req);
  ctx.sessions.seen(caller->device_id, now);
  store::DeviceStatusWrite write{caller->device_id, seq, doc->dump(), now};
  auto done = [&ctx, device_id = caller->device_id, seq, facts = std::move(facts),
               respond = std::move(respond)](Result<bool> fresh) {
    if (!fresh) return respond(http::Response::error(fresh.error()));
    if (facts) {
      auto device = ctx.store.get_device(device_id);
      if (!device) return respond(http::Response::error(device.error()));
      if (*device && nlohmann::json::parse((*device)->facts_json, nullptr, false) != *facts) {
        if (auto updated = ctx.store.update_device_facts(device_id, facts->dump()); !updated) {
          return respond(http::Response::error(updated.error()));
        }
        auto summary = ctx.desired.reconcile_device(device_id);
        if (!summary) {
          spdlog::warn("rescheduling device {} after new facts: {}", device_id,
                       summary.error().message);
        }
      }
    }
    respond(json_response(200, {{"ok", true}, {"seq", seq}, {"duplicate", !*fresh}}));
  };
  ctx.status_writer->submit(ctx.workers, std::move(write), std::move(done));
}

}  // namespace

std::unique_ptr<StatusWriter> make_status_writer(store::Store& store) {
  // A group is at most 512 reports: a burst (a fleet reporting a new revision) in a few
  // commits, without holding the store's writer for long.
  return std::make_unique<StatusWriter>(
      "storing status reports", 512, [&store](std::vector<store::DeviceStatusWrite>& group) {
        return store.record_device_statuses(group, kStatusLogKeep);
      });
}

void register_device_sync_routes(http::Router& router, ApiContext& ctx) {
  router.add("POST", "/api/v1/device/enroll", [&ctx](http::Request&& req, http::Responder respond) {
    run_on_worker(ctx, std::move(respond),
                  [&ctx, req = std::move(req)]() { return enroll(ctx, req); });
  });
  http::RouteOptions long_poll;
  long_poll.watch_hangup = true;
  router.add(
      "GET", "/api/v1/device/desired",
      [&ctx](http::Request&& req, http::Responder respond) {
        get_desired(ctx, std::move(req), std::move(respond));
      },
      long_poll);
  add_deferred_route(router, ctx, "POST", "/api/v1/device/status", "status report", post_status);
}

}  // namespace outpost::server::api
