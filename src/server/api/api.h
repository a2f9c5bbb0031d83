// The HTTP API of the control plane (/api/v1): one file per resource registers its routes.
// Handlers authenticate, then hand their blocking work (store, disk) to the worker pool;
// only the long-poll wait stays on the I/O side, as a parked callback.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/thread_pool.hpp>
#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/error.h"
#include "common/json_fields.h"
#include "common/telemetry_batch.h"
#include "http/http_server.h"
#include "server/device_sessions.h"
#include "server/group_writer.h"
#include "server/site_scope.h"
#include "store/store.h"

namespace outpost::server {
class DesiredStateUpdater;
class OperatorAuth;
class SecretVault;
namespace cluster {
class Cluster;
}  // namespace cluster
namespace registry {
class BlobStore;
class DeltaMaker;
class ReleaseSigner;
}  // namespace registry
namespace sync {
class SyncHub;
}
}  // namespace outpost::server

namespace outpost::rollouts {
class RolloutController;
}

namespace outpost::server::api {

// Who made a call: an operator user or a device credential.
struct Caller {
  enum class Kind { kOperator, kDevice } kind = Kind::kOperator;
  std::string name;  // audit actor: "user:alice" or "device:d-1a2b"
  std::string role;  // operators: viewer|operator|admin
  std::string user;  // operators: the user name ("admin" for DATA/admin.token)
  SiteScope scope;   // operators: the sites the user may see and act on (see require_* below)
  std::string device_id;

  bool in_scope(const std::string& site) const { return scope.contains_site(site); }
};

// Telemetry ingest counters for /metrics; shared by the workers.
struct TelemetryIngestCounters {
  std::atomic<uint64_t> batches{0};
  std::atomic<uint64_t> records{0};
  std::atomic<uint64_t> duplicates{0};
  std::atomic<uint64_t> points{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> refused_encoding{0};
  std::atomic<uint64_t> refused_too_large{0};
  std::atomic<uint64_t> refused_invalid{0};
  std::atomic<uint64_t> refused_store{0};
};

// Artifact downloads for /metrics: what the control plane's link carries for the fleet (a
// site behind a relay costs one download per blob, not one per device).
struct ArtifactCounters {
  std::atomic<uint64_t> downloads{0};   // GET and HEAD answers
  std::atomic<uint64_t> bytes_sent{0};  // body bytes of GET answers (ranges counted as sent)
};

// A telemetry upload as the ingest stores it.
struct TelemetryUpload {
  std::string device_id;
  std::string site;
  telemetry::Batch batch;
};
// Group commit of telemetry uploads (group_writer.h): batches that arrive while the store is
// writing the previous group are stored together; a batch that fails fails alone (the store
// retries the group batch by batch).
using TelemetryWriter = GroupWriter<TelemetryUpload, store::TelemetryIngestOutcome>;
std::unique_ptr<TelemetryWriter> make_telemetry_writer(store::Store& store, const Clock& clock);
// Group commit of status reports (the rollouts controller and `device show` read them).
using StatusWriter = GroupWriter<store::DeviceStatusWrite, bool>;
std::unique_ptr<StatusWriter> make_status_writer(store::Store& store);

struct ApiContext {
  store::Store& store;
  registry::BlobStore& blobs;
  sync::SyncHub& hub;
  DesiredStateUpdater& desired;
  rollouts::RolloutController& rollouts;
  DeviceSessions& sessions;
  OperatorAuth& auth;
  registry::ReleaseSigner& release;
  const Clock& clock;
  boost::asio::thread_pool& workers;
  std::string server_public_key_b64;
  int64_t long_poll_ms = 55'000;
  // The CA devices should trust, handed out at GET /api/v1/device/ca and pinned by the
  // fingerprint that enrollment tokens carry ("" when not known or plain HTTP).
  std::string ca_pem;
  std::string ca_pin;
  // Makes deltas of pushed model versions and bundles (null: deltas off).
  registry::DeltaMaker* deltas = nullptr;
  // Replicas: news of revocations for the others (null in tests of one server).
  cluster::Cluster* cluster = nullptr;
  std::unique_ptr<TelemetryIngestCounters> telemetry = std::make_unique<TelemetryIngestCounters>();
  std::unique_ptr<ArtifactCounters> artifact_counters = std::make_unique<ArtifactCounters>();
  std::unique_ptr<TelemetryWriter> telemetry_queue = make_telemetry_writer(store, clock);
  std::unique_ptr<StatusWriter> status_writer = make_status_writer(store);
  // Secrets at rest (issue 18); set by the control plane after construction.
  SecretVault* secrets = nullptr;
};

// A device counts as online when it was seen this recently (a healthy agent long-polls about
// once a minute).
inline constexpr int64_t kOnlineWindowMs = 3 * 60'000;
bool device_online(int64_t last_seen, int64_t now_ms);

// /metrics lines for telemetry ingest and the fleet (devices by site, deployment phases,
// inference totals, latency histograms, drops). Blocking: reads the store.
[[nodiscard]] Result<std::string> fleet_metrics_text(ApiContext& ctx);
// A deployment's fleet numbers over the last `window_ms`: requests, errors, error_rate,
// fallbacks, p95_latency_seconds, devices_reporting. Blocking.
[[nodiscard]] Result<nlohmann::json> deployment_fleet_summary(ApiContext& ctx,
                                                              const std::string& deployment,
                                                              int64_t window_ms);

// Runs `work` on the worker pool and answers with its result (errors as JSON errors).
void run_on_worker(ApiContext& ctx, http::Responder respond,
                   std::function<Result<http::Response>()> work);
// Adds a route whose handler runs on the worker pool and answers through the Responder later
// (a write queued for group commit answers after its commit). An exception before the handler
// handed the Responder on is answered as an internal error naming `what`.
using DeferredHandler = void (*)(ApiContext&, const http::Request&, http::Responder);
void add_deferred_route(http::Router& router, ApiContext& ctx, std::string method,
                        std::string pattern, const char* what, DeferredHandler handler,
                        http::RouteOptions options = {});

// Minimum operator role for a call.
enum class Role { kViewer, kOperator, kAdmin };

// Authenticates an operator call (Bearer token). Blocking (may read the store).
[[nodiscard]] Result<Caller> authenticate_operator(ApiContext& ctx, const http::Request& req,
                                                   Role needed);
// Authenticates a device call (Bearer <device-id>.<secret>). Blocking.
[[nodiscard]] Result<Caller> authenticate_device(ApiContext& ctx, const http::Request& req);
// The same from memory alone, for I/O threads: nullopt when the store would have to be read
// (a device not seen since the server started, or no well-formed credential).
[[nodiscard]] std::optional<Result<Caller>> authenticate_device_from_memory(
    ApiContext& ctx, const http::Request& req);

// The relays a request came through, nearest the device first, from the X-Outpost-Via header
// each relay extends ("d-1a2b3c,d-4d5e6f"); only device-id-shaped names, at most 16. Taken
// from authenticated device calls only: a relay may then fetch the blobs of the devices whose
// calls it carried (a device cannot put a relay on another device's path).
std::vector<std::string> via_list(const http::Request& req);

// Site scope (issue 17), checked here and only here for every operator route. Each refusal is
// kPermissionDenied and says who, their scope and why: "user alice is scoped to sites plant-*;
// device d-12 is in site depot-2". Unscoped users (and so admins) pass every check.
//
// `why` completes the refusal: "device d-12 is in site depot-2".
[[nodiscard]] Status require_site_in_scope(const Caller& caller, const std::string& site,
                                           const std::string& why);
// Loads a device and checks its site; kNotFound when it does not exist.
[[nodiscard]] Result<store::Device> device_in_scope(ApiContext& ctx, const Caller& caller,
                                                    const std::string& id);
// A selector's site patterns must be non-empty and each inside the scope (SiteScope::outside);
// `what` selects them ("deployment web"). The error's field is spec.selector.sites.
[[nodiscard]] Status require_selector_in_scope(const Caller& caller, const std::string& what,
                                               const std::vector<std::string>& sites);
// A deployment is in scope when the site selectors of its current revision and of its stable
// revision (which devices still run during a rollout) both are. Blocking (may read the store).
[[nodiscard]] Status require_deployment_in_scope(ApiContext& ctx, const Caller& caller,
                                                 const store::Deployment& deployment);
// The same as a filter, for lists.
[[nodiscard]] Result<bool> deployment_in_scope(ApiContext& ctx, const Caller& caller,
                                               const store::Deployment& deployment);
// The same by name: for a scoped user, loads the deployment (kNotFound when it does not exist)
// and checks it; for an unscoped one reads nothing.
[[nodiscard]] Status require_deployment_in_scope(ApiContext& ctx, const Caller& caller,
                                                 const std::string& name);
// Fleet-wide things (the audit log): unscoped users only. `what` is the thing refused.
[[nodiscard]] Status require_unscoped(const Caller& caller, const std::string& what);
// spec.selector.sites of a stored (normalized) manifest.
std::vector<std::string> manifest_selector_sites(const std::string& manifest_json);

// Appends an audit entry; failures are logged (the change itself already happened).
void audit(ApiContext& ctx, const Caller& caller, const std::string& action,
           const std::string& target, const nlohmann::json& details = nlohmann::json::object());

// Parses a JSON request body; kInvalidArgument with the parse position otherwise.
[[nodiscard]] Result<nlohmann::json> parse_json_body(const std::string& body);

http::Response json_response(int status, const nlohmann::json& doc);

// A JSON document stored by us (manifest, schedule, status), or {} when it does not parse.
using json_fields::parse_object_or_empty;

// Registers a route whose handler runs on the worker pool after the caller authenticated.
using AuthedHandler =
    std::function<Result<http::Response>(ApiContext&, const http::Request&, const Caller&)>;
void add_operator_route(http::Router& router, ApiContext& ctx, std::string method,
                        std::string pattern, Role needed, AuthedHandler handler,
                        http::RouteOptions options = {});
void add_device_route(http::Router& router, ApiContext& ctx, std::string method,
                      std::string pattern, AuthedHandler handler, http::RouteOptions options = {});

// Route registration, one per resource file.
void register_enrollment_token_routes(http::Router& router, ApiContext& ctx);
void register_device_routes(http::Router& router, ApiContext& ctx);
void register_device_sync_routes(http::Router& router, ApiContext& ctx);
void register_artifact_routes(http::Router& router, ApiContext& ctx);
void register_model_routes(http::Router& router, ApiContext& ctx);
void register_deployment_routes(http::Router& router, ApiContext& ctx);
void register_audit_routes(http::Router& router, ApiContext& ctx);
void register_telemetry_routes(http::Router& router, ApiContext& ctx);
void register_rollout_routes(http::Router& router, ApiContext& ctx);
void register_user_routes(http::Router& router, ApiContext& ctx);
void register_release_routes(http::Router& router, ApiContext& ctx);
void register_secret_routes(http::Router& router, ApiContext& ctx);

}  // namespace outpost::server::api
