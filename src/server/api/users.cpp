// /api/v1/users: named operator users (admin only). A user is a role and a site scope; its
// secret is shown once, at creation, and only its hash is stored. Revoking takes effect on
// the user's next call.
#include "server/api/api.h"
#include "server/cluster/cluster.h"
#include "server/operator_auth.h"

namespace outpost::server::api {
namespace {

nlohmann::json user_json(const store::OperatorToken& u) {
  return {{"name", u.name},
          {"role", u.role},
          {"sites", u.sites},
          {"created_at", u.created_at},
          {"revoked_at", u.revoked_at}};
}

Result<http::Response> create_user(ApiContext& ctx, const http::Request& req,
                                   const Caller& caller) {
  auto body = parse_json_body(req.body);
  if (!body) return make_error(body.error());
  auto user = parse_new_user(*body);
  if (!user) return make_error(user.error());
  auto created = ctx.auth.create_user(*user, ctx.clock.now_ms());
  if (!created) return make_error(created.error());
  audit(ctx, caller, "user.create", "user/" + user->name,
        {{"role", user->role}, {"sites", user->sites}});
  nlohmann::json out = user_json(created->user);
  out["token"] = created->secret;  // shown once; only its hash is stored
  return json_response(201, out);
}

Result<http::Response> list_users(ApiContext& ctx, const http::Request&, const Caller&) {
  auto users = ctx.store.list_operator_tokens();
  if (!users) return make_error(users.error());
  nlohmann::json list = nlohmann::json::array();
  for (const auto& u : *users) list.push_back(user_json(u));
  return json_response(200, {{"users", list}});
}

Result<http::Response> revoke_user(ApiContext& ctx, const http::Request& req,
                                   const Caller& caller) {
  const std::string& name = req.params.at("name");
  auto revoked = ctx.auth.revoke_user(name, ctx.clock.now_ms());
  if (!revoked) return make_error(revoked.error());
  if (ctx.cluster != nullptr) (void)ctx.cluster->publish(cluster::kUsersChannel, name);
  audit(ctx, caller, "user.revoke", "user/" + name, {{"revoked_at", revoked->revoked_at}});
  return json_response(200, user_json(*revoked));
}

}  // namespace

void register_user_routes(http::Router& router, ApiContext& ctx) {
  add_operator_route(router, ctx, "POST", "/api/v1/users", Role::kAdmin, create_user);
  add_operator_route(router, ctx, "GET", "/api/v1/users", Role::kAdmin, list_users);
  add_operator_route(router, ctx, "POST", "/api/v1/users/{name}/revoke", Role::kAdmin, revoke_user);
}

}  // namespace outpost::server::api
