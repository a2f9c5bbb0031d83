// /api/v1/models: the model registry. A version is immutable once pushed; each variant is a
// verified artifact plus the hardware it is meant for.
#include <regex>

#include "common/digest.h"
#include "common/durable_file.h"
#include "common/json_fields.h"
#include "common/onnx/onnx_model.h"
#include "server/api/api.h"
#include "server/registry/blob_store.h"
#include "server/registry/delta_maker.h"
#include "server/scheduler/variant.h"

namespace outpost::server::api {
namespace {

constexpr int64_t kMaxModelParseBytes = 2LL * 1024 * 1024 * 1024;

bool valid_model_name(const std::string& name) {
  static const std::regex kName("^[a-z0-9][a-z0-9._-]{0,62}$");
  return std::regex_match(name, kName);
}

bool valid_semver(const std::string& version) {
  static const std::regex kSemver(
      R"(^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$)");
  return std::regex_match(version, kSemver);
}

nlohmann::json variant_json(const store::ModelVariant& v) {
  auto parse = [](const std::string& text) {
    auto doc = nlohmann::json::parse(text, nullptr, false);
    return doc.is_discarded() ? nlohmann::json::object() : doc;
  };
  return {{"selector", parse(v.selector_json)},
          {"needs", parse(v.needs_json)},
          {"artifact", v.artifact_digest},
          {"format", v.format},
          {"metadata", parse(v.metadata_json)}};
}

// Deltas to each variant's artifact, as the registry has them (state ready or skipped).
Result<nlohmann::json> deltas_json(ApiContext& ctx, const std::string& target) {
  auto rows = ctx.store.list_artifact_deltas(target);
  if (!rows) return make_error(rows.error());
  nlohmann::json out = nlohmann::json::array();
  for (const auto& d : *rows) {
    nlohmann::json row = {{"base", d.base}, {"state", d.state}, {"detail", d.detail}};
    if (d.state == "ready") {
      row["delta"] = d.delta;
      row["size"] = d.delta_size;
      row["target_size"] = d.target_size;
    }
    out.push_back(std::move(row));
  }
  return out;
}

nlohmann::json version_json(const store::ModelVersion& v, ApiContext* ctx = nullptr) {
  nlohmann::json variants = nlohmann::json::array();
  for (const auto& variant : v.variants) {
    nlohmann::json item = variant_json(variant);
    if (ctx != nullptr) {
      auto deltas = deltas_json(*ctx, variant.artifact_digest);
      item["deltas"] = deltas ? *deltas : nlohmann::json::array();
    }
    variants.push_back(std::move(item));
  }
  return {{"model", v.model},
          {"version", v.version},
          {"created_at", v.created_at},
          {"variants", variants}};
}

// Reads the artifact and checks it is a model we can serve; returns its metadata.
Result<nlohmann::json> inspect_model_artifact(ApiContext& ctx, const std::string& digest,
                                              const std::string& field) {
  auto size = ctx.blobs.size_of(digest);
  if (!size) {
    return make_error(Errc::kInvalidArgument,
                      field + ": artifact " + digest + " does not exist; push it first", field);
  }
  if (*size > kMaxModelParseBytes) {
    return make_error(Errc::kInvalidArgument, field + ": model file is over 2 GiB", field);
  }
  auto bytes = read_file(ctx.blobs.path_for(digest));
  if (!bytes) return make_error(bytes.error());
  auto info = onnx::parse_onnx_model(*bytes);
  if (!info) {
    return make_error(
        Errc::kInvalidArgument,
        field + ": artifact " + digest + " is not a usable ONNX model: " + info.error().message,
        field);
  }
  if (auto servable = onnx::check_servable(*info); !servable) {
    return make_error(
        Errc::kInvalidArgument,
        field + ": artifact " + digest + " cannot be served: " + servable.error().message, field);
  }
  return onnx::to_json(*info);
}

Result<http::Response> push_version(ApiContext& ctx, const http::Request& req,
                                    const Caller& caller) {
  const std::string& name = req.params.at("name");
  if (!valid_model_name(name)) {
    return make_error(Errc::kInvalidArgument,
                      "name: \"" + name +
                          "\" is not a valid model name (lowercase letters, digits, "
                          "'.', '_', '-'; at most 63)",
                      "name");
  }
  auto doc = parse_json_body(req.body);
  if (!doc) return make_error(doc.error());
  auto version = json_fields::required_string(*doc, "version", "version");
  if (!version) return make_error(version.error());
  if (!valid_semver(*version)) {
    return make_error(Errc::kInvalidArgument,
                      "version: \"" + *version + "\" is not a semantic version like 1.4.0",
                      "version");
  }
  if (!doc->contains("variants") || !(*doc)["variants"].is_array() || (*doc)["variants"].empty()) {
    return make_error(Errc::kInvalidArgument, "variants: at least one variant is required",
                      "variants");
  }
  store::ModelVersion mv;
  mv.model = name;
  mv.version = *version;
  mv.created_at = ctx.clock.now_ms();
  nlohmann::json identity = nlohmann::json::array();
  size_t index = 0;
  for (const auto& item : (*doc)["variants"]) {
    const std::string path = "variants[" + std::to_string(index++) + "]";
    if (!item.is_object()) {
      return make_error(Errc::kInvalidArgument, path + ": expected an object", path);
    }
    nlohmann::json selector = nlohmann::json::object();
    if (item.contains("selector") && item["selector"].is_string()) {
      auto parsed = scheduler::parse_selector(item["selector"].get<std::string>());
      if (!parsed) {
        return make_error(Errc::kInvalidArgument, path + ".selector: " + parsed.error().message,
                          path + ".selector");
      }
      selector = *parsed;
    } else if (item.contains("selector")) {
      auto parsed = json_fields::string_map(item, "selector", path + ".selector");
      if (!parsed) return make_error(parsed.error());
      selector = *parsed;
    }
    nlohmann::json needs = item.value("needs", nlohmann::json::object());
    if (!needs.is_object()) {
      return make_error(Errc::kInvalidArgument, path + ".needs: expected an object",
                        path + ".needs");
    }
    auto artifact = json_fields::required_string(item, "artifact", path + ".artifact");
    if (!artifact) return make_error(artifact.error());
    auto format = json_fields::optional_string(item, "format", path + ".format");
    if (!format) return make_error(format.error());
    if (*format && **format != "onnx") {
      return make_error(Errc::kInvalidArgument,
                        path + ".format: \"" + **format + "\" is not supported (expected onnx)",
                        path + ".format");
    }
    auto metadata = inspect_model_artifact(ctx, *artifact, path + ".artifact");
    if (!metadata) return make_error(metadata.error());
    store::ModelVariant variant;
    variant.selector_json = selector.dump();
    variant.needs_json = needs.dump();
    variant.artifact_digest = *artifact;
    variant.format = "onnx";
    variant.metadata_json = metadata->dump();
    mv.variants.push_back(variant);
    identity.push_back({{"selector", selector}, {"needs", needs}, {"artifact", *artifact}});
  }
  mv.content_hash = sha256_hex(identity.dump());
  auto created = ctx.store.put_model_version(mv);
  if (!created) return make_error(created.error());
  if (*created) {
    audit(ctx, caller, "model.push", "model/" + name + "@" + *version, {{"variants", identity}});
    // Deltas from the versions before it, made in the background.
    if (ctx.deltas != nullptr) {
      auto versions = ctx.store.list_model_versions(name);
      if (!versions) return make_error(versions.error());
      ctx.deltas->request_model_version(*versions, mv);
    }
  }
  nlohmann::json out = version_json(mv);
  out["created"] = *created;
  if (ctx.deltas != nullptr) out["deltas"] = ctx.deltas->status();
  return json_response(*created ? 201 : 200, out);
}

Result<http::Response> list_models(ApiContext& ctx, const http::Request&, const Caller&) {
  auto names = ctx.store.list_models();
  if (!names) return make_error(names.error());
  nlohmann::json out = nlohmann::json::array();
  for (const auto& name : *names) {
    auto versions = ctx.store.list_model_versions(name);
    if (!versions) return make_error(versions.error());
    nlohmann::json list = nlohmann::json::array();
    for (const auto& v : *versions) list.push_back(v.version);
    out.push_back({{"name", name},
                   {"versions", list},
                   {"latest", versions->empty() ? "" : versions->back().version}});
  }
  return json_response(200, {{"models", out}});
}

Result<http::Response> show_model(ApiContext& ctx, const http::Request& req, const Caller&) {
  const std::string& name = req.params.at("name");
  auto versions = ctx.store.list_model_versions(name);
  if (!versions) return make_error(versions.error());
  if (versions->empty()) return make_error(Errc::kNotFound, "model " + name + " does not exist");
  nlohmann::json list = nlohmann::json::array();
  for (const auto& v : *versions) list.push_back(version_json(v, &ctx));
  return json_response(200, {{"name", name}, {"versions", list}});
}

}  // namespace

void register_model_routes(http::Router& router, ApiContext& ctx) {
  // Models (and artifacts, artifacts.cpp) are fleet-wide, not scoped to sites: any viewer reads
  // them, any operator pushes a version (versions are immutable, so a push never changes what a
  // deployment runs; which devices run it is the deployments' business, and those are scoped).
  add_operator_route(router, ctx, "GET", "/api/v1/models", Role::kViewer, list_models);
  add_operator_route(router, ctx, "GET", "/api/v1/models/{name}", Role::kViewer, show_model);
  add_operator_route(router, ctx, "GET", "/api/v1/models/{name}/versions", Role::kViewer,
                     show_model);
  add_operator_route(router, ctx, "POST", "/api/v1/models/{name}/versions", Role::kOperator,
                     push_version);
}

}  // namespace outpost::server::api
