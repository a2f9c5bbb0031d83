// /api/v1/artifacts: streamed, content-addressed uploads and ranged downloads.
#include <unistd.h>

#include "server/api/api.h"
#include "server/registry/blob_store.h"

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
  }
  return json_response(
      *inserted ? 201 : 200,
      {{"digest", artifact.digest}, {"size", artifact.size}, {"created", *inserted}});
}

struct ByteRange {
  uint64_t first = 0;
  uint64_t length = 0;
};

// Parses a single "bytes=a-b" / "bytes=a-" / "bytes=-n" range. nullopt: ignore the header
// (serve the whole body); error: unsatisfiable.
Result<std::optional<ByteRange>> parse_range(const std::string& header, uint64_t size) {
  constexpr std::string_view kPrefix = "bytes=";
  if (header.empty() || header.compare(0, kPrefix.size(), kPrefix) != 0) return std::nullopt;
  std::string spec = header.substr(kPrefix.size());
  if (spec.find(',') != std::string::npos) return std::nullopt;  // multi-range: send it all
  auto dash = spec.find('-');
  if (dash == std::string::npos) return std::nullopt;
  auto unsatisfiable = [&] {
    return make_error(Errc::kRangeNotSatisfiable, "range " + header + " is outside the artifact (" +
                                                      std::to_string(size) + " bytes)");
  };
  try {
    std::string a = spec.substr(0, dash), b = spec.substr(dash + 1);
    ByteRange range;
    if (a.empty()) {  // suffix: last n bytes
      uint64_t n = std::stoull(b);
      if (n == 0 || size == 0) return unsatisfiable();
      n = std::min(n, size);
      range.first = size - n;
      range.length = n;
    } else {
      uint64_t first = std::stoull(a);
      if (first >= size) return unsatisfiable();
      uint64_t last = b.empty() ? size - 1 : std::min<uint64_t>(std::stoull(b), size - 1);
      if (last < first) return std::nullopt;
      range.first = first;
      range.length = last - first + 1;
    }
    return std::optional<ByteRange>(range);
  } catch (...) {
    return std::nullopt;
  }
}

Result<http::Response> download(ApiContext& ctx, const http::Request& req) {
  const std::string digest = req.params.at("digest");
  auto artifact = ctx.store.get_artifact(digest);
  if (!artifact) return make_error(artifact.error());
  auto size = ctx.blobs.size_of(digest);
  if (!*artifact || !size) {
    return make_error(Errc::kNotFound, "artifact " + digest + " does not exist");
  }
  http::Response resp;
  resp.content_type = "application/octet-stream";
  resp.headers.emplace_back("Accept-Ranges", "bytes");
  resp.headers.emplace_back("ETag", "\"" + digest + "\"");
  resp.headers.emplace_back("Cache-Control", "public, max-age=31536000, immutable");
  const uint64_t total = static_cast<uint64_t>(*size);
  auto range = parse_range(req.header("range"), total);
  if (!range) {
    http::Response err = http::Response::error(range.error());
    err.headers.emplace_back("Content-Range", "bytes */" + std::to_string(total));
    return err;
  }
  if (*range && req.header("if-range").size() > 0 &&
      req.header("if-range") != "\"" + digest + "\"") {
    *range = std::nullopt;  // client holds another version: send all
  }
  http::FileRange file{ctx.blobs.path_for(digest), 0, total};
  if (*range) {
    resp.status = 206;
    file.offset = (*range)->first;
    file.length = (*range)->length;
    resp.headers.emplace_back("Content-Range", "bytes " + std::to_string(file.offset) + "-" +
                                                   std::to_string(file.offset + file.length - 1) +
                                                   "/" + std::to_string(total));
  }
  resp.file = file;
  return resp;
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
  // Devices and operators may both download: try the operator token, then the device one.
  router.add("GET", "/api/v1/artifacts/{digest}",
             [&ctx](http::Request&& req, http::Responder respond) {
               run_on_worker(ctx, std::move(respond),
                             [&ctx, req = std::move(req)]() -> Result<http::Response> {
                               auto op = authenticate_operator(ctx, req, Role::kViewer);
                               if (!op) {
                                 auto dev = authenticate_device(ctx, req);
                                 if (!dev) return make_error(op.error());
                               }
                               return download(ctx, req);
                             });
             });
}

}  // namespace outpost::server::api
