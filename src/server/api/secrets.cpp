// /api/v1/secrets: named key/value sets delivered sealed to the devices whose deployments name
// them (issue 18). Values come in base64 ({"data":{"password":"aHVudGVyMg=="}}), are encrypted
// at rest by the vault, and never come back out: every answer, log line and audit entry carries
// names, key names, versions and times only.
//
// Roles: reading metadata is for viewers. Writing needs an operator, and an unscoped one: a
// secret is fleet-wide (any deployment in any site may name it), so a user scoped to some sites
// could otherwise change what devices outside the scope receive.
#include <spdlog/spdlog.h>

#include "common/crypto.h"
#include "server/api/api.h"
#include "server/deployments/manifest.h"
#include "server/desired_states.h"
#include "server/secrets/secret_vault.h"

namespace outpost::server::api {
namespace {

using json = nlohmann::json;

// active: the version in force; newer ones are staged, older ones superseded (kept until the
// next version is added).
json version_json(const store::SecretVersion& v, int64_t active) {
  const char* state = v.version == active ? "active" : v.version > active ? "staged" : "superseded";
  return {{"version", v.version},         {"keys", v.keys},
          {"activate_at", v.activate_at}, {"created_at", v.created_at},
          {"created_by", v.created_by},   {"state", state}};
}

json secret_json(const store::Secret& s, int64_t now_ms) {
  int64_t active = 0;
  for (const auto& v : s.versions) {
    if (v.activate_at <= now_ms) active = std::max(active, v.version);
  }
  json versions = json::array();
  const store::SecretVersion* staged = nullptr;
  for (const auto& v : s.versions) {
    versions.push_back(version_json(v, active));
    if (v.version > active && (staged == nullptr || v.activate_at < staged->activate_at)) {
      staged = &v;
    }
  }
  json out = {
      {"name", s.name},           {"created_at", s.created_at}, {"updated_at", s.updated_at},
      {"active_version", active}, {"keys", json::array()},      {"versions", std::move(versions)}};
  for (const auto& v : s.versions) {
    if (v.version == active) out["keys"] = v.keys;
  }
  if (staged != nullptr) {
    out["rotate_at"] = staged->activate_at;
    out["staged_version"] = staged->version;
  }
  return out;
}

// {"data":{key:base64}} -> key -> bytes. Never echoes the body (nlohmann's parse errors quote
// the text near the error, which may be a value).
Result<SecretData> read_data(const json& body) {
  if (!body.contains("data") || !body["data"].is_object()) {
    return make_error(Errc::kInvalidArgument, "data: expected a map of key names to base64 values",
                      "data");
  }
  SecretData data;
  for (const auto& [key, value] : body["data"].items()) {
    if (!value.is_string()) {
      return make_error(Errc::kInvalidArgument, "data." + key + ": expected a base64 string",
                        "data." + key);
    }
    auto bytes = crypto::base64_decode(value.get<std::string>());
    if (!bytes) {
      return make_error(Errc::kInvalidArgument, "data." + key + ": not valid base64",
                        "data." + key);
    }
    data[key] = std::move(*bytes);
  }
  return data;
}

Result<json> read_body(const http::Request& req) {
  if (req.body.empty()) return json::object();
  OUTPOST_TRY(json_fields::check_nesting(req.body, "request body", 8));
  json body = json::parse(req.body, nullptr, false);
  if (!body.is_object()) {
    return make_error(Errc::kInvalidArgument, "request body: expected a JSON object");
  }
  return body;
}

void wipe(SecretData& data) {
  for (auto& [key, value] : data) crypto::wipe(value);
}

SecretVault& vault_of(ApiContext& ctx) {
  assert(ctx.secrets != nullptr && "the control plane wires the secret vault");
  return *ctx.secrets;
}

// Devices pick the change up through the normal sync.
Status reschedule(ApiContext& ctx) {
  auto summary = ctx.desired.reconcile_all();
  if (!summary) return make_error(summary.error().with_context("scheduling devices"));
  return ok();
}

Result<http::Response> create_secret(ApiContext& ctx, const http::Request& req,
                                     const Caller& caller) {
  OUTPOST_TRY(require_unscoped(caller, "secrets (fleet-wide)"));
  auto body = read_body(req);
  if (!body) return make_error(body.error());
  const std::string name = body->value("name", "");
  OUTPOST_TRY(deployments::check_secret_name(name, "name"));
  if (body->contains("rotate_at")) {
    return make_error(Errc::kInvalidArgument,
                      "rotate_at: a new secret is active at once; stage later versions with "
                      "`outpost secret update --rotate-at`",
                      "rotate_at");
  }
  auto data = read_data(*body);
  if (!data) return make_error(data.error());
  auto stored = vault_of(ctx).create(name, *data, caller.name, ctx.clock.now_ms());
  wipe(*data);
  if (!stored) return make_error(stored.error());
  audit(ctx, caller, "secret.create", "secret/" + name,
        {{"version", stored->version}, {"activate_at", stored->activate_at}});
  spdlog::info("secret {} version {} created by {}", name, stored->version, caller.name);
  OUTPOST_TRY(reschedule(ctx));
  auto secret = ctx.store.get_secret(name);
  if (!secret) return make_error(secret.error());
  if (!*secret) return make_error(Errc::kNotFound, "secret " + name + " was deleted meanwhile");
  return json_response(201, secret_json(**secret, ctx.clock.now_ms()));
}

Result<http::Response> update_secret(ApiContext& ctx, const http::Request& req,
                                     const Caller& caller) {
  OUTPOST_TRY(require_unscoped(caller, "secrets (fleet-wide)"));
  const std::string& name = req.params.at("name");
  OUTPOST_TRY(deployments::check_secret_name(name, "name"));
  auto body = read_body(req);
  if (!body) return make_error(body.error());
  const int64_t now = ctx.clock.now_ms();
  int64_t activate_at = now;
  if (body->contains("rotate_at")) {
    const json& at = (*body)["rotate_at"];
    if (!at.is_number_integer() || at.get<int64_t>() < 0) {
      return make_error(Errc::kInvalidArgument, "rotate_at: expected a time in Unix milliseconds",
                        "rotate_at");
    }
    if (at.get<int64_t>() < now) {
      return make_error(Errc::kInvalidArgument,
                        "rotate_at: " + format_iso8601(at.get<int64_t>()) +
                            " is in the past; leave it out to switch at once",
                        "rotate_at");
    }
    activate_at = at.get<int64_t>();
  }
  auto data = read_data(*body);
  if (!data) return make_error(data.error());
  auto stored = vault_of(ctx).update(name, *data, activate_at, caller.name, now);
  wipe(*data);
  if (!stored) return make_error(stored.error());
  audit(ctx, caller, "secret.update", "secret/" + name,
        {{"version", stored->version}, {"activate_at", stored->activate_at}});
  spdlog::info("secret {} version {} stored by {}, active from {}", name, stored->version,
               caller.name, format_iso8601(stored->activate_at));
  OUTPOST_TRY(reschedule(ctx));
  auto secret = ctx.store.get_secret(name);
  if (!secret) return make_error(secret.error());
  if (!*secret) return make_error(Errc::kNotFound, "secret " + name + " was deleted meanwhile");
  json out = secret_json(**secret, ctx.clock.now_ms());
  out["version"] = stored->version;
  return json_response(200, out);
}

Result<http::Response> list_secrets(ApiContext& ctx, const http::Request&, const Caller&) {
  auto all = ctx.store.list_secrets();
  if (!all) return make_error(all.error());
  json out = json::array();
  const int64_t now = ctx.clock.now_ms();
  for (const auto& s : *all) out.push_back(secret_json(s, now));
  return json_response(200, {{"secrets", out}});
}

Result<http::Response> show_secret(ApiContext& ctx, const http::Request& req, const Caller&) {
  const std::string& name = req.params.at("name");
  auto found = ctx.store.get_secret(name);
  if (!found) return make_error(found.error());
  if (!*found) return make_error(Errc::kNotFound, "secret " + name + " does not exist", "name");
  json out = secret_json(**found, ctx.clock.now_ms());
  // Which deployments name it (their current revision's spec.secrets).
  auto deployments = ctx.store.list_deployments();
  if (!deployments) return make_error(deployments.error());
  json used_by = json::array();
  for (const auto& d : *deployments) {
    const json manifest = parse_object_or_empty(d.manifest_json);
    const json spec = manifest.value("spec", json::object());
    for (const auto& s : spec.value("secrets", json::array())) {
      if (s.is_string() && s.get<std::string>() == name) used_by.push_back(d.name);
    }
  }
  out["deployments"] = std::move(used_by);
  return json_response(200, out);
}

Result<http::Response> delete_secret(ApiContext& ctx, const http::Request& req,
                                     const Caller& caller) {
  OUTPOST_TRY(require_unscoped(caller, "secrets (fleet-wide)"));
  const std::string& name = req.params.at("name");
  auto found = ctx.store.get_secret(name);
  if (!found) return make_error(found.error());
  if (!*found) return make_error(Errc::kNotFound, "secret " + name + " does not exist", "name");
  OUTPOST_TRY(ctx.store.delete_secret(name));
  const int64_t last = (*found)->versions.empty() ? 0 : (*found)->versions.back().version;
  audit(ctx, caller, "secret.delete", "secret/" + name, {{"version", last}});
  spdlog::info("secret {} deleted by {}", name, caller.name);
  OUTPOST_TRY(reschedule(ctx));
  return json_response(200, {{"name", name}, {"deleted", true}});
}

}  // namespace

void register_secret_routes(http::Router& router, ApiContext& ctx) {
  http::RouteOptions body;
  body.body_limit = 1 << 20;  // kMaxSecretBytes in base64, with room for JSON
  add_operator_route(router, ctx, "POST", "/api/v1/secrets", Role::kOperator, create_secret, body);
  add_operator_route(router, ctx, "GET", "/api/v1/secrets", Role::kViewer, list_secrets);
  add_operator_route(router, ctx, "GET", "/api/v1/secrets/{name}", Role::kViewer, show_secret);
  add_operator_route(router, ctx, "PUT", "/api/v1/secrets/{name}", Role::kOperator, update_secret,
                     body);
  add_operator_route(router, ctx, "DELETE", "/api/v1/secrets/{name}", Role::kOperator,
                     delete_secret);
}

}  // namespace outpost::server::api
