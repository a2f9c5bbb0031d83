// Signed release metadata (server/registry/release_signer.h):
//   /api/v1/device/release/...  the documents devices verify; unauthenticated like the CA
//                               (they are public, and their signatures are what counts), so
//                               relays and mirrors can serve them as they are;
//   /api/v1/release...          the operator's side: status, the next online key, a new root.
#include <charconv>

#include "server/api/api.h"
#include "server/registry/release_signer.h"

namespace outpost::server::api {
namespace {

http::Response document(std::optional<std::string> text, const std::string& what) {
  if (!text) {
    return http::Response::error(Error{
        Errc::kNotFound,
        what + " does not exist: this server has no release keys yet (`outpost release keys init`)",
        {}});
  }
  http::Response resp = http::Response::json(200, std::move(*text));
  resp.headers.emplace_back("Cache-Control", "no-cache");
  return resp;
}

void add_document_route(http::Router& router, ApiContext& ctx, const std::string& pattern,
                        std::function<http::Response(const http::Request&)> serve) {
  router.add("GET", pattern, [&ctx, serve](http::Request&& req, http::Responder respond) {
    // The root may come from the store: not on an I/O thread.
    run_on_worker(ctx, std::move(respond),
                  [req = std::move(req), serve]() -> Result<http::Response> { return serve(req); });
  });
}

Result<http::Response> status(ApiContext& ctx, const http::Request&, const Caller&) {
  return json_response(200, ctx.release.status());
}

Result<http::Response> pending_key(ApiContext& ctx, const http::Request&, const Caller& caller) {
  auto key = ctx.release.pending_online_key();
  if (!key) return make_error(key.error());
  audit(ctx, caller, "release.online_key", "release/online-key", {{"keyid", (*key)["keyid"]}});
  return json_response(200, *key);
}

Result<http::Response> put_root(ApiContext& ctx, const http::Request& req, const Caller& caller) {
  auto root = ctx.release.accept_root(req.body);
  if (!root) return make_error(root.error());
  audit(ctx, caller, "release.root", "release/root/" + std::to_string(root->version),
        {{"version", root->version},
         {"expires", release::format_time(root->expires_ms)},
         {"threshold", root->roles.at(std::string(release::kRoot)).threshold}});
  return json_response(201, ctx.release.status());
}

}  // namespace

void register_release_routes(http::Router& router, ApiContext& ctx) {
  add_document_route(router, ctx, "/api/v1/device/release/root", [&ctx](const http::Request&) {
    return document(ctx.release.root(0), "root metadata");
  });
  add_document_route(
      router, ctx, "/api/v1/device/release/root/{version}", [&ctx](const http::Request& req) {
        const std::string& text = req.params.at("version");
        int64_t version = 0;
        auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), version);
        if (ec != std::errc{} || end != text.data() + text.size() || version < 1) {
          return http::Response::error(Error{Errc::kInvalidArgument,
                                             "root version \"" + text + "\" is not a number ≥ 1",
                                             "version"});
        }
        return document(ctx.release.root(version), "root metadata version " + text);
      });
  add_document_route(router, ctx, "/api/v1/device/release/timestamp", [&ctx](const http::Request&) {
    return document(ctx.release.timestamp(), "timestamp metadata");
  });
  add_document_route(router, ctx, "/api/v1/device/release/targets", [&ctx](const http::Request&) {
    return document(ctx.release.targets(), "targets metadata");
  });

  add_operator_route(router, ctx, "GET", "/api/v1/release", Role::kViewer, status);
  add_operator_route(router, ctx, "POST", "/api/v1/release/online-key", Role::kAdmin, pending_key);
  add_operator_route(router, ctx, "PUT", "/api/v1/release/root", Role::kAdmin, put_root,
                     http::RouteOptions{.body_limit = release::kMaxRootBytes});
}

}  // namespace outpost::server::api
