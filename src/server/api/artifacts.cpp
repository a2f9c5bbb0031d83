// /api/v1/artifacts: streamed, content-addressed uploads and ranged downloads.
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "common/request_signature.h"
#include "http/file_response.h"
#include "server/api/api.h"
#include "server/registry/blob_store.h"
#include "server/registry/release_signer.h"
#include "server/sync/sync_hub.h"

namespace outpost::server::api {
namespace {

constexpr uint64_t kMaxArtifactBytes = 64ULL * 1024 * 1024 * 1024;

nlohmann::json artifact_json(const store::Artifact& a) {
  return {{"digest", a.digest},
          {"size", a.size},
          {"media_type", a.media_type},
          {"created_at", a.created_at}};
}

Result<http::Response> push(ApiContext& ctx, const http::Request& req, const Caller& caller) {
  if (req.body_file.empty()) return make_error(Errc::kInternal, "upload body was not streamed");
  auto blob = ctx.blobs.ingest(req.body_file, req.header("x-outpost-digest"));
  if (!blob) return make_error(blob.error());
  store::Artifact artifact;
  artifact.digest = blob->digest;
  artifact.size = blob->size;
  artifact.media_type =
      req.header("content-type").empty() ? "application/octet-stream" : req.header("content-type");
  artifact.created_at = ctx.clock.now_ms();
  auto inserted = ctx.store.put_artifact(artifact);
  if (!inserted) return make_error(inserted.error());
  if (*inserted) {
    audit(ctx, caller, "artifact.push", "artifact/" + artifact.digest, {{"size", artifact.size}});
    // Signed release metadata lists every artifact: sign the new targets before anyone is
    // told to fetch it (a failure is logged; the periodic re-sign retries).
    if (auto signed_now = ctx.release.refresh(); !signed_now) {
      spdlog::error("release metadata after pushing {}: {}", artifact.digest,
                    signed_now.error().message);
    }
  }
  return json_response(
      *inserted ? 201 : 200,
      {{"digest", artifact.digest}, {"size", artifact.size}, {"created", *inserted}});
}

Result<http::Response> download(ApiContext& ctx, const http::Request& req) {
  const std::string digest = req.params.at("digest");
  auto artifact = ctx.store.get_artifact(digest);
  if (!artifact) return make_error(artifact.error());
  auto size = ctx.blobs.size_of(digest);
  if (!*artifact || !size) {
    return make_error(Errc::kNotFound, "artifact " + digest + " does not exist");
  }
  const uint64_t total = static_cast<uint64_t>(*size);
  ctx.artifact_counters->downloads.fetch_add(1, std::memory_order_relaxed);
  http::Response resp = http::blob_response(req, digest, ctx.blobs.path_for(digest), total);
  if (resp.file && req.method != "HEAD") {
    ctx.artifact_counters->bytes_sent.fetch_add(resp.file->length, std::memory_order_relaxed);
  }
  return resp;
}

// Whether `device_id`'s desired state names `digest` (the hub's copy when it has one, else the
// store's). Digests are JSON strings there, so a quoted match is exact.
Result<bool> desired_names(ApiContext& ctx, const std::string& device_id,
                           const std::string& quoted) {
  if (auto held = ctx.hub.current(device_id); held && held->body) {
    return held->body->find(quoted) != std::string::npos;
  }
  auto device = ctx.store.get_device(device_id);
  if (!device) return make_error(device.error());
  return *device && (*device)->desired_json.find(quoted) != std::string::npos;
}

// A device may download only what its own desired state references, or, for a relay, what
// the desired state of a device whose calls it carries references (it fetches for them).
Status device_may_fetch(ApiContext& ctx, const Caller& device, const std::string& digest) {
  const std::string quoted = "\"" + digest + "\"";
  auto own = desired_names(ctx, device.device_id, quoted);
  if (!own) return make_error(own.error());
  if (*own) return ok();
  for (const auto& child : ctx.sessions.behind(device.device_id)) {
    auto theirs = desired_names(ctx, child, quoted);
    if (!theirs) return make_error(theirs.error());
    if (*theirs) return ok();
  }
  return make_error(Errc::kPermissionDenied,
                    "artifact " + digest + " is not assigned to device " + device.device_id +
                        " (nor to a device behind it): devices download only what their desired "
                        "state names");
}

}  // namespace

void register_artifact_routes(http::Router& router, ApiContext& ctx) {
  add_operator_route(
      router, ctx, "POST", "/api/v1/artifacts", Role::kOperator, push,
      http::RouteOptions{.stream_body_to_file = true, .body_limit = kMaxArtifactBytes});
  add_operator_route(
      router, ctx, "GET", "/api/v1/artifacts", Role::kViewer,
      [](ApiContext& c, const http::Request&, const Caller&) -> Result<http::Response> {
        auto list = c.store.list_artifacts();
        if (!list) return make_error(list.error());
        nlohmann::json out = nlohmann::json::array();
        for (const auto& a : *list) out.push_back(artifact_json(a));
        return json_response(200, {{"artifacts", out}});
      });
  // Devices (signed calls, for what is assigned to them) and operators may download.
  router.add("GET", "/api/v1/artifacts/{digest}",
             [&ctx](http::Request&& req, http::Responder respond) {
               run_on_worker(ctx, std::move(respond),
                             [&ctx, req = std::move(req)]() -> Result<http::Response> {
                               // A signed call is a device's; anything else an operator's.
                               if (req.header(std::string(reqsig::kHeaderLower)).empty()) {
                                 auto op = authenticate_operator(ctx, req, Role::kViewer);
                                 if (!op) return make_error(op.error());
                                 return download(ctx, req);
                               }
                               auto dev = authenticate_device(ctx, req);
                               if (!dev) return make_error(dev.error());
                               OUTPOST_TRY(device_may_fetch(ctx, *dev, req.params.at("digest")));
                               return download(ctx, req);
                             });
             });
}

}  // namespace outpost::server::api
