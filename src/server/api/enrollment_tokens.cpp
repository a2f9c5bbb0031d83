// POST/GET /api/v1/enrollment-tokens: tokens that let a device join a site.
#include "common/crypto.h"
#include "common/digest.h"
#include "common/json_fields.h"
#include "common/units.h"
#include "server/api/api.h"

namespace outpost::server::api {
namespace {

nlohmann::json token_json(const store::EnrollmentToken& t) {
  nlohmann::json doc = {{"id", t.id},
                        {"site", t.site},
                        {"labels", t.labels},
                        {"created_at", t.created_at},
                        {"created_by", t.created_by}};
  doc["uses_left"] = t.uses_left ? nlohmann::json(*t.uses_left) : nlohmann::json();
  doc["expires_at"] = t.expires_at ? nlohmann::json(*t.expires_at) : nlohmann::json();
  return doc;
}

bool valid_site_name(const std::string& site) {
  if (site.empty() || site.size() > 63) return false;
  for (char c : site) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}

Result<http::Response> create_token(ApiContext& ctx, const Caller& caller,
                                    const std::string& body) {
  auto doc = parse_json_body(body);
  if (!doc) return make_error(doc.error());
  for (const auto& [key, value] : doc->items()) {
    if (key != "site" && key != "labels" && key != "uses" && key != "ttl") {
      return make_error(Errc::kInvalidArgument,
                        key + ": unknown field (expected one of: site, labels, uses, ttl)", key);
    }
  }
  auto site = json_fields::required_string(*doc, "site", "site");
  if (!site) return make_error(site.error());
  if (!valid_site_name(*site)) {
    return make_error(
        Errc::kInvalidArgument,
        "site: \"" + *site + "\" is not a valid site name (letters, digits, '-', '_', '.')",
        "site");
  }
  OUTPOST_TRY(require_site_in_scope(caller, *site,
                                    "an enrollment token for site " + *site + " is outside it"));
  auto labels = json_fields::string_map(*doc, "labels", "labels");
  if (!labels) return make_error(labels.error());
  auto uses = json_fields::optional_int(*doc, "uses", "uses");
  if (!uses) return make_error(uses.error());
  if (*uses && **uses < 1) {
    return make_error(Errc::kInvalidArgument, "uses: must be at least 1", "uses");
  }
  auto ttl_text = json_fields::optional_string(*doc, "ttl", "ttl");
  if (!ttl_text) return make_error(ttl_text.error());

  const int64_t now = ctx.clock.now_ms();
  store::EnrollmentToken token;
  token.id = crypto::random_hex(4, "et-");
  std::string secret = crypto::random_hex(24, "oet_");
  token.token_hash = sha256_hex(secret);
  token.site = *site;
  token.labels = *labels;
  token.uses_left = *uses;
  if (*ttl_text) {
    auto ttl = parse_duration_ms(**ttl_text);
    if (!ttl) return make_error(Errc::kInvalidArgument, "ttl: " + ttl.error().message, "ttl");
    if (*ttl <= 0) return make_error(Errc::kInvalidArgument, "ttl: must be positive", "ttl");
    token.expires_at = now + *ttl;
  } else {
    token.expires_at = now + 24LL * 3600 * 1000;  // a day, unless told otherwise
  }
  token.created_at = now;
  token.created_by = caller.name;
  OUTPOST_TRY(ctx.store.put_enrollment_token(token));
  audit(ctx, caller, "enrollment_token.create", "enrollment-token/" + token.id,
        {{"site", token.site}, {"labels", token.labels}});
  nlohmann::json out = token_json(token);
  out["token"] = secret;  // shown once; only its hash is stored
  // The pin a device checks the CA against before it trusts the server with the token.
  if (!ctx.ca_pin.empty()) out["ca_pin"] = ctx.ca_pin;
  return json_response(201, out);
}

}  // namespace

void register_enrollment_token_routes(http::Router& router, ApiContext& ctx) {
  add_operator_route(router, ctx, "POST", "/api/v1/enrollment-tokens", Role::kOperator,
                     [](ApiContext& c, const http::Request& req, const Caller& caller) {
                       return create_token(c, caller, req.body);
                     });
  add_operator_route(
      router, ctx, "GET", "/api/v1/enrollment-tokens", Role::kViewer,
      [](ApiContext& c, const http::Request&, const Caller& caller) -> Result<http::Response> {
        auto tokens = c.store.list_enrollment_tokens();
        if (!tokens) return make_error(tokens.error());
        nlohmann::json list = nlohmann::json::array();
        for (const auto& t : *tokens) {
          if (caller.in_scope(t.site)) list.push_back(token_json(t));
        }
        return json_response(200, {{"tokens", list}});
      });
}

}  // namespace outpost::server::api
