// /api/v1/audit: the hash-chained record of every change, and its verification.
#include "common/units.h"
#include "server/api/api.h"

namespace outpost::server::api {
namespace {

nlohmann::json entry_json(const store::AuditEntry& e) {
  nlohmann::json details = nlohmann::json::parse(e.details_json, nullptr, false);
  return {{"seq", e.seq},
          {"time", e.time},
          {"actor", e.actor},
          {"action", e.action},
          {"target", e.target},
          {"details", details.is_discarded() ? nlohmann::json::object() : details},
          {"prev_hash", e.prev_hash},
          {"hash", e.hash}};
}

Result<int64_t> since_param(ApiContext& ctx, const http::Request& req) {
  auto since = req.query_param("since");
  if (!since || since->empty()) return 0;
  auto ms = parse_duration_ms(*since);
  if (!ms) return make_error(Errc::kInvalidArgument, "since: " + ms.error().message, "since");
  return ctx.clock.now_ms() - *ms;
}

// The audit log covers the whole fleet (and every user): unscoped users only.
Result<http::Response> list_audit(ApiContext& ctx, const http::Request& req, const Caller& caller) {
  OUTPOST_TRY(require_unscoped(caller, "the audit log"));
  auto since = since_param(ctx, req);
  if (!since) return make_error(since.error());
  int64_t limit = 1000;
  if (auto l = req.query_param("limit")) {
    try {
      limit = std::clamp<int64_t>(std::stoll(*l), 1, 100000);
    } catch (...) {
      return make_error(Errc::kInvalidArgument, "limit: expected an integer", "limit");
    }
  }
  auto entries = ctx.store.list_audit(*since, limit);
  if (!entries) return make_error(entries.error());
  nlohmann::json out = nlohmann::json::array();
  for (const auto& e : *entries) out.push_back(entry_json(e));
  return json_response(200, {{"entries", out}});
}

Result<http::Response> verify(ApiContext& ctx, const http::Request&, const Caller& caller) {
  OUTPOST_TRY(require_unscoped(caller, "the audit log"));
  auto entries = ctx.store.list_audit(0, INT64_MAX);
  if (!entries) return make_error(entries.error());
  std::string prev;
  for (const auto& e : *entries) {
    if (e.prev_hash != prev || store::audit_entry_hash(e) != e.hash) {
      return json_response(
          200, {{"ok", false},
                {"entries", entries->size()},
                {"broken_at", e.seq},
                {"message", "audit entry " + std::to_string(e.seq) +
                                (e.prev_hash != prev ? " does not link to the entry before it"
                                                     : " does not match its hash")}});
    }
    prev = e.hash;
  }
  return json_response(200, {{"ok", true}, {"entries", entries->size()}, {"head", prev}});
}

}  // namespace

void register_audit_routes(http::Router& router, ApiContext& ctx) {
  add_operator_route(router, ctx, "GET", "/api/v1/audit", Role::kViewer, list_audit);
  add_operator_route(router, ctx, "GET", "/api/v1/audit/verify", Role::kViewer, verify);
}

}  // namespace outpost::server::api
