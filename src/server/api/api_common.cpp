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
    return make_error(Errc::kPermissionDenied, "token " + record->id + " has role " + record->role +
                                                   ", which may not do this");
  }
  Caller caller;
  caller.kind = Caller::Kind::kOperator;
  caller.name = "token:" + record->name;
  caller.role = record->role;
  return caller;
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
    return nlohmann::json::parse(body);
  } catch (const nlohmann::json::parse_error& e) {
    return make_error(Errc::kInvalidArgument,
                      std::string("request body is not valid JSON: ") + e.what());
  }
}

}  // namespace outpost::server::api
