#include <unistd.h>

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/request_signature.h"
#include "server/api/api.h"
#include "server/operator_auth.h"

namespace outpost::server::api {

http::Response json_response(int status, const nlohmann::json& doc) {
  return http::Response::json(status, doc.dump());
}

void run_on_worker(ApiContext& ctx, http::Responder respond,
                   std::function<Result<http::Response>()> work) {
  boost::asio::post(ctx.workers, [respond = std::move(respond), work = std::move(work)] {
    Result<http::Response> result = [&]() -> Result<http::Response> {
      try {
        return work();
      } catch (const std::exception& e) {
        spdlog::error("request failed with an exception: {}", e.what());
        return make_error(Errc::kInternal, std::string("internal error: ") + e.what());
      }
    }();
    respond(result ? std::move(*result) : http::Response::error(result.error()));
  });
}

namespace {

std::optional<std::string> bearer(const http::Request& req) {
  std::string value = req.header("authorization");
  constexpr std::string_view kPrefix = "Bearer ";
  if (value.size() <= kPrefix.size() || value.compare(0, kPrefix.size(), kPrefix) != 0) {
    return std::nullopt;
  }
  return value.substr(kPrefix.size());
}

Caller device_caller(const std::string& id) {
  Caller caller;
  caller.kind = Caller::Kind::kDevice;
  caller.name = "device:" + id;
  caller.device_id = id;
  return caller;
}

int role_rank(const std::string& role) {
  if (role == "admin") return 2;
  if (role == "operator") return 1;
  return 0;
}

const char* role_name(Role role) {
  switch (role) {
    case Role::kViewer:
      return "viewer";
    case Role::kOperator:
      return "operator";
    case Role::kAdmin:
      return "admin";
  }
  return "?";
}

// "user alice is scoped to sites plant-*": the start of every scope refusal.
std::string scope_of(const Caller& caller) {
  return "user " + caller.user + " is scoped to sites " + caller.scope.describe();
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

}  // namespace

Result<Caller> authenticate_operator(ApiContext& ctx, const http::Request& req, Role needed) {
  auto token = bearer(req);
  if (!token) {
    return make_error(Errc::kUnauthenticated,
                      "missing bearer token: pass --token or set OUTPOST_TOKEN (the admin token "
                      "is in the server's data directory, admin.token)");
  }
  auto record = ctx.auth.authenticate(*token);
  if (!record) return make_error(record.error());
  if (role_rank(record->role) < static_cast<int>(needed)) {
    return make_error(Errc::kPermissionDenied,
                      "user " + record->name + " has role " + record->role +
                          ", which may not do this (needs " + role_name(needed) + ")");
  }
  Caller caller;
  caller.kind = Caller::Kind::kOperator;
  caller.name = "user:" + record->name;
  caller.role = record->role;
  caller.user = record->name;
  caller.scope = SiteScope(record->sites);
  return caller;
}

Status require_site_in_scope(const Caller& caller, const std::string& site,
                             const std::string& why) {
  if (caller.in_scope(site)) return ok();
  return make_error(Errc::kPermissionDenied, scope_of(caller) + "; " + why);
}

Result<store::Device> device_in_scope(ApiContext& ctx, const Caller& caller,
                                      const std::string& id) {
  auto device = ctx.store.get_device(id);
  if (!device) return make_error(device.error());
  if (!*device) return make_error(Errc::kNotFound, "device " + id + " does not exist");
  OUTPOST_TRY(require_site_in_scope(caller, (*device)->site,
                                    "device " + id + " is in site " + (*device)->site));
  return std::move(**device);
}

Status require_selector_in_scope(const Caller& caller, const std::string& what,
                                 const std::vector<std::string>& sites) {
  const auto outside = caller.scope.outside(sites);
  if (outside.empty()) return ok();
  if (sites.empty()) {
    return make_error(Errc::kPermissionDenied,
                      scope_of(caller) + "; " + what +
                          " selects every site (spec.selector.sites is empty); name sites "
                          "inside the scope",
                      "spec.selector.sites");
  }
  return make_error(
      Errc::kPermissionDenied,
      scope_of(caller) + "; " + what + " selects sites " + joined(outside) + ", outside that scope",
      "spec.selector.sites");
}

std::vector<std::string> manifest_selector_sites(const std::string& manifest_json) {
  const nlohmann::json manifest = parse_object_or_empty(manifest_json);
  std::vector<std::string> sites;
  const auto spec = manifest.find("spec");
  if (spec == manifest.end() || !spec->is_object()) return sites;
  const auto selector = spec->find("selector");
  if (selector == spec->end() || !selector->is_object()) return sites;
  const auto list = selector->find("sites");
  if (list == selector->end() || !list->is_array()) return sites;
  for (const auto& site : *list) {
    // Something we cannot read selects nothing we can vouch for: "*" keeps it out of scope.
    sites.push_back(site.is_string() ? site.get<std::string>() : "*");
  }
  return sites;
}

Status require_deployment_in_scope(ApiContext& ctx, const Caller& caller,
                                   const store::Deployment& deployment) {
  if (caller.scope.unrestricted()) return ok();
  const std::string what = "deployment " + deployment.name;
  OUTPOST_TRY(
      require_selector_in_scope(caller, what, manifest_selector_sites(deployment.manifest_json)));
  if (deployment.stable_revision == 0 || deployment.stable_revision == deployment.revision) {
    return ok();
  }
  auto revisions = ctx.store.list_deployment_revisions(deployment.name);
  if (!revisions) return make_error(revisions.error());
  for (const auto& r : *revisions) {
    if (r.revision != deployment.stable_revision) continue;
    return require_selector_in_scope(
        caller, what + " (its stable revision " + std::to_string(r.revision) + ")",
        manifest_selector_sites(r.manifest_json));
  }
  return ok();
}

Result<bool> deployment_in_scope(ApiContext& ctx, const Caller& caller,
                                 const store::Deployment& deployment) {
  auto checked = require_deployment_in_scope(ctx, caller, deployment);
  if (checked) return true;
  if (checked.error().code == Errc::kPermissionDenied) return false;
  return make_error(checked.error());
}

Status require_deployment_in_scope(ApiContext& ctx, const Caller& caller, const std::string& name) {
  if (caller.scope.unrestricted()) return ok();
  auto found = ctx.store.get_deployment(name);
  if (!found) return make_error(found.error());
  if (!*found) return make_error(Errc::kNotFound, "deployment " + name + " does not exist");
  return require_deployment_in_scope(ctx, caller, **found);
}

Status require_unscoped(const Caller& caller, const std::string& what) {
  if (caller.scope.unrestricted()) return ok();
  return make_error(Errc::kPermissionDenied,
                    scope_of(caller) + "; " + what + " is fleet-wide, for unscoped users only");
}

std::vector<std::string> via_list(const http::Request& req) {
  std::vector<std::string> out;
  const std::string header = req.header("x-outpost-via");
  size_t start = 0;
  while (start <= header.size() && out.size() < 16) {
    size_t comma = header.find(',', start);
    if (comma == std::string::npos) comma = header.size();
    std::string id = header.substr(start, comma - start);
    while (!id.empty() && id.front() == ' ') id.erase(0, 1);
    while (!id.empty() && id.back() == ' ') id.pop_back();
    const bool shaped = id.size() > 2 && id.size() <= 64 && id.rfind("d-", 0) == 0 &&
                        id.find_first_not_of("0123456789abcdef", 2) == std::string::npos;
    if (shaped) out.push_back(id);
    start = comma + 1;
  }
  return out;
}

namespace {

// The proof a device call carries; nullopt without a well-formed bearer credential.
std::optional<DeviceProof> device_proof(const http::Request& req) {
  auto token = bearer(req);
  auto dot = token ? token->find('.') : std::string::npos;
  if (!token || dot == std::string::npos) return std::nullopt;
  DeviceProof proof;
  proof.device_id = token->substr(0, dot);
  proof.secret = token->substr(dot + 1);
  proof.signature_header = req.header(std::string(reqsig::kHeaderLower));
  proof.method = req.method;
  proof.target = req.target;
  proof.body = req.body;
  proof.seq_idempotent = req.method == "POST" && (req.path == "/api/v1/device/status" ||
                                                  req.path == "/api/v1/device/telemetry");
  return proof;
}

Result<Caller> accepted(ApiContext& ctx, const DeviceProof& proof, const http::Request& req) {
  // Only an authenticated call moves the topology (see ApiContext::sessions' behind()).
  ctx.sessions.set_via(proof.device_id, via_list(req));
  return device_caller(proof.device_id);
}

}  // namespace

Result<Caller> authenticate_device(ApiContext& ctx, const http::Request& req) {
  auto proof = device_proof(req);
  if (!proof) {
    return make_error(Errc::kUnauthenticated, "missing device credential (Bearer <id>.<secret>)");
  }
  OUTPOST_TRY(ctx.sessions.verify(*proof, ctx.clock.now_ms()));
  return accepted(ctx, *proof, req);
}

std::optional<Result<Caller>> authenticate_device_from_memory(ApiContext& ctx,
                                                              const http::Request& req) {
  auto proof = device_proof(req);
  if (!proof) return std::nullopt;  // the full check says why
  auto verified = ctx.sessions.verify_known(*proof, ctx.clock.now_ms());
  if (!verified) return std::nullopt;
  if (!*verified) return Result<Caller>(make_error(verified->error()));
  return Result<Caller>(accepted(ctx, *proof, req));
}

void audit(ApiContext& ctx, const Caller& caller, const std::string& action,
           const std::string& target, const nlohmann::json& details) {
  auto entry =
      ctx.store.append_audit(caller.name, action, target, details.dump(), ctx.clock.now_ms());
  if (!entry)
    spdlog::error("audit append failed for {} {}: {}", action, target, entry.error().message);
}

void add_operator_route(http::Router& router, ApiContext& ctx, std::string method,
                        std::string pattern, Role needed, AuthedHandler handler,
                        http::RouteOptions options) {
  router.add(
      std::move(method), std::move(pattern),
      [&ctx, needed, handler = std::move(handler)](http::Request&& req, http::Responder respond) {
        run_on_worker(ctx, std::move(respond),
                      [&ctx, needed, &handler, req = std::move(req)]() -> Result<http::Response> {
                        auto caller = authenticate_operator(ctx, req, needed);
                        if (!caller) {
                          if (!req.body_file.empty()) ::unlink(req.body_file.c_str());
                          return make_error(caller.error());
                        }
                        return handler(ctx, req, *caller);
                      });
      },
      options);
}

void add_device_route(http::Router& router, ApiContext& ctx, std::string method,
                      std::string pattern, AuthedHandler handler, http::RouteOptions options) {
  router.add(
      std::move(method), std::move(pattern),
      [&ctx, handler = std::move(handler)](http::Request&& req, http::Responder respond) {
        run_on_worker(ctx, std::move(respond),
                      [&ctx, &handler, req = std::move(req)]() -> Result<http::Response> {
                        auto caller = authenticate_device(ctx, req);
                        if (!caller) return make_error(caller.error());
                        return handler(ctx, req, *caller);
                      });
      },
      options);
}

void add_deferred_route(http::Router& router, ApiContext& ctx, std::string method,
                        std::string pattern, const char* what, DeferredHandler handler,
                        http::RouteOptions options) {
  router.add(
      std::move(method), std::move(pattern),
      [&ctx, what, handler](http::Request&& req, http::Responder respond) {
        boost::asio::post(ctx.workers, [&ctx, what, handler, req = std::move(req),
                                        respond = std::move(respond)]() mutable {
          // Once queued, the write owns `respond`; an exception before that answers here.
          auto shared = std::make_shared<http::Responder>(std::move(respond));
          try {
            handler(ctx, req, [shared](http::Response resp) { (*shared)(std::move(resp)); });
          } catch (const std::exception& e) {
            spdlog::error("{} failed with an exception: {}", what, e.what());
            (*shared)(http::Response::error(
                Error{Errc::kInternal, std::string("internal error: ") + e.what(), ""}));
          }
        });
      },
      options);
}

Result<nlohmann::json> parse_json_body(const std::string& body) {
  try {
    if (body.empty()) return nlohmann::json::object();
    OUTPOST_TRY(json_fields::check_nesting(body, "request body"));
    return nlohmann::json::parse(body);
  } catch (const nlohmann::json::parse_error& e) {
    return make_error(Errc::kInvalidArgument,
                      std::string("request body is not valid JSON: ") + e.what());
  }
}

}  // namespace outpost::server::api
