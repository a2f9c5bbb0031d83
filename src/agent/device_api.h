// The device side of the control plane's API as plain functions: the requests a device sends
// (enroll, sync, status, telemetry) and what it makes of the answers. The agent's threads send
// them with the blocking HttpClient; the fleet simulator (src/sim/) sends the very same
// requests from its event loop for thousands of virtual devices, so a simulated device speaks
// exactly as a real one does.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/identity.h"
#include "agent/sync/desired_sync.h"
#include "common/error.h"
#include "common/http_client.h"
#include "common/telemetry_batch.h"

namespace outpost::agent {

// One request to the control plane, transport-neutral. Paths are relative to the server URL.
struct ApiRequest {
  std::string method;
  std::string path;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  int64_t timeout_ms = 30'000;
};

// Sends `request` with the agent's blocking client (`cancel` ends a held request early).
[[nodiscard]] Result<HttpResponse> send(HttpClient& client, const ApiRequest& request,
                                        const std::atomic<bool>* cancel = nullptr,
                                        bool count_bytes = false);

// The agent's blocking client to the server of identity.servers in use now. A request that
// cannot reach it, or is answered 502/503/504, moves every client of the identity to the next
// URL (for the next request: this one's failure is returned as it was, and the caller backs
// off as it would with one server). Not thread-safe: one per thread, like HttpClient.
class UpstreamClient {
 public:
  // with_credential false: no Bearer credential (release metadata is public).
  explicit UpstreamClient(Identity identity, bool with_credential = true);
  [[nodiscard]] Result<HttpResponse> request(const std::string& method, const std::string& path,
                                             const std::string& body = {},
                                             const std::string& content_type = "application/json",
                                             const HttpRequestOptions& options = {});
  // The URL the last request went to.
  const std::string& url() const { return url_; }

 private:
  Identity identity_;
  bool with_credential_;
  std::string url_;
  std::unique_ptr<HttpClient> client_;
};

[[nodiscard]] Result<HttpResponse> send(UpstreamClient& client, const ApiRequest& request,
                                        const std::atomic<bool>* cancel = nullptr,
                                        bool count_bytes = false);

// --- Enrollment: POST /api/v1/device/enroll (no credential yet) ---
ApiRequest enroll_request(const EnrollRequest& request, const std::string& public_key_b64);
// The identity the server granted (201/200), or the refusal with the server's reason.
// `server_url` is what the identity records as the server.
[[nodiscard]] Result<Identity> enroll_answer(const Result<HttpResponse>& response,
                                             const EnrollRequest& request,
                                             const std::string& server_url);

// --- Sync: GET /api/v1/device/desired?generation=G&wait=S (long-poll) ---
ApiRequest desired_request(int64_t known_generation, int64_t wait_s);
struct SyncAnswer {
  enum class Kind {
    kUnchanged,  // 304: nothing newer within the wait
    kNew,        // a verified, newer desired state in `state`
    kProblem,    // transport failure, refusal, or a document that must not be acted on
  };
  Kind kind = Kind::kProblem;
  std::optional<DesiredState> state;
  std::string problem;   // for kProblem: what went wrong, for logs and the device's status
  bool link_up = false;  // the server answered (even if with something unusable)
};
// Verifies a 200 (signature, device, generation, entries) and never accepts a generation at
// or below `known_generation` (a replay, or a server restored from a backup).
[[nodiscard]] SyncAnswer desired_answer(Result<HttpResponse> response, int64_t known_generation,
                                        const Identity& identity);

// --- Uploads (status reports, telemetry batches): what to do with the answer ---
enum class Delivery {
  kDelivered,  // 2xx
  kRefused,    // 4xx other than 401/408/429: malformed for the server, never retried
  kRetry,      // transport failure, 5xx, 401 (credential may come back), 408, 429
};
Delivery upload_delivery(const Result<HttpResponse>& response);

// --- Status: POST /api/v1/device/status ---
// One deployment as the device reports it (the rollouts controller reads revision, phase,
// current_revision and revision_restarts).
struct DeploymentReport {
  std::string name;
  int64_t revision = 0;  // desired revision
  std::string key;       // "r<revision>-<hash>" of the desired revision
  std::string phase;  // pending|downloading|verifying|starting|running|failed|rolled-back|completed
  std::string message;
  int64_t restarts = 0;
  int64_t revision_restarts = 0;  // restarts of the revision running now
  int64_t bytes_downloaded = 0;
  std::optional<int64_t> current_revision;  // what runs now
  std::optional<int64_t> previous_revision;
};
nlohmann::json deployment_report_json(const DeploymentReport& report);
// The report a device would send now ({"generation","at","agent_version","deployments"}; the
// outbox adds "seq"), and its signature: what decides whether it changed (the generation and
// each deployment's name, key, phase, restarts and current revision, and its message unless
// downloading; not the byte counters).
struct StatusReportDraft {
  nlohmann::json report;
  std::string signature;
};
// `held`: digests of the verified blobs on the device (sorted; at most the first 64 are
// sent), so the server can offer deltas from them; part of the signature.
StatusReportDraft draft_status_report(int64_t generation, int64_t at_ms,
                                      const std::string& agent_version,
                                      const std::vector<DeploymentReport>& deployments,
                                      const std::vector<std::string>& held = {});
// A report goes when it changed since the last one queued, or, periodically, when nothing is
// queued (so the server hears from an idle device).
bool report_due(const std::string& signature, const std::string& last_signature, bool periodic,
                bool queue_empty);
ApiRequest status_request(std::string body);

// --- Telemetry: POST /api/v1/device/telemetry (zstd) ---
// The compressed batch of records already in JSON text form (seqs first_seq..last_seq).
struct TelemetryBody {
  std::string json;        // uncompressed
  std::string compressed;  // what goes on the wire
};
[[nodiscard]] Result<TelemetryBody> telemetry_body(int64_t first_seq, int64_t last_seq,
                                                   const outpost::telemetry::DropCounts& dropped,
                                                   const std::vector<std::string>& record_texts);
ApiRequest telemetry_request(std::string compressed, int64_t timeout_ms = 30'000);
// The highest seq the server stored, from a 200 answer to a batch starting at `first_seq`; an
// answer that acknowledges nothing of the batch is an error (resending it would loop forever).
[[nodiscard]] Result<int64_t> telemetry_acked(const HttpResponse& response, int64_t first_seq,
                                              int64_t last_seq);

}  // namespace outpost::agent
