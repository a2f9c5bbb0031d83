// The device agent: wires sync, fetch, activation, supervision, status and the local API
// together around one event loop that owns every deployment's state. Everything it acts on is
// verified and on disk first, so it keeps the site running offline and after any crash.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "agent/activate/revisions.h"
#include "agent/device_api.h"
#include "agent/fetch/fetcher.h"
#include "agent/identity.h"
#include "agent/release/release_trust.h"
#include "agent/secrets/secret_files.h"
#include "agent/serve/model_server.h"
#include "agent/status/outbox.h"
#include "agent/supervise/supervisor.h"
#include "agent/sync/desired_sync.h"
#include "agent/telemetry/pipeline.h"
#include "common/clock.h"
#include "common/error.h"

namespace outpost::http {
class HttpServer;
class Router;
}  // namespace outpost::http

namespace outpost::agent {

inline constexpr const char* kAgentVersion = "0.1.0";

struct AgentOptions {
  std::string data_dir;
  std::string listen = "127.0.0.1:7410";  // local API; port 0 picks a free one
  FetchOptions fetch;
  std::string cgroup_parent;  // delegated cgroup v2 dir for workload limits ("" = rlimits)
  int64_t status_period_ms = 60'000;
  int64_t facts_period_ms = 600'000;
  int64_t retry_initial_ms = 5'000;  // a failed first install is tried again after this, doubling
  int64_t retry_max_ms = 600'000;
  DesiredSync::Options sync;
  ReleaseTrustOptions release;
  int serve_threads = 2;      // HTTP threads of the local API, which also run inferences
  int inference_threads = 1;  // ONNX Runtime intra-op threads per inference
  // Loads model files for serving; empty = ONNX Runtime (tests swap in a fake).
  serve::SessionLoader session_loader;
  telemetry::TelemetryOptions telemetry;
  // A relay agent's numbers (children, cache, backlog, upstream), sent with each status report
  // as "relay" and shown by the local API; empty for an ordinary device.
  std::function<nlohmann::json()> relay_stats;
  // Where artifacts are downloaded from when not identity.server (a relay's own cache).
  std::string artifact_source;
  std::string artifact_source_ca_file;  // the CA to trust for an https:// artifact_source
  // Where workloads' secret files go ("" = a private folder on tmpfs: $XDG_RUNTIME_DIR or
  // /dev/shm, else DATA/secrets-run). See agent/secrets/secret_files.h.
  std::string secrets_dir;
};

class Agent {
 public:
  Agent(AgentOptions options, Identity identity);
  ~Agent();

  // Loads the persisted desired state and pointers, starts every workload from local state
  // (no network needed), then the sync, fetch and status threads and the local API.
  [[nodiscard]] Status start();
  // Runs the event loop until `stop` turns true, then stops workloads gracefully.
  void run(const std::atomic<bool>& stop);
  uint16_t local_port() const;

  // What GET /v1/status answers (thread-safe).
  nlohmann::json status() const;
  // What GET /v1/telemetry answers (thread-safe).
  nlohmann::json telemetry_status() const;

 private:
  struct Runtime;
  void post(std::function<void()> fn);
  bool settled() const;  // nothing waits on a timer: the loop may sleep longer
  void on_desired(const DesiredState& state);
  void apply_desired(const nlohmann::json& doc, int64_t generation);
  void reconcile();
  void reconcile_one(Runtime& rt);
  // The delta offered for a blob whose base this device holds (and, with release metadata on,
  // that the signed targets list), if any; *pending: the metadata is being refreshed for it.
  std::optional<DeltaPlan> delta_plan_for(const std::string& digest, bool* pending = nullptr);
  void ensure_running(Runtime& rt, const std::string& key);
  bool ensure_serving(Runtime& rt, const std::string& key);
  void check_current(Runtime& rt);
  void fail_revision(Runtime& rt, const std::string& reason);
  void stop_process(Runtime& rt);
  // Writes the deployment's secret files (active versions now) and adds OUTPOST_SECRETS_DIR (and
  // OUTPOST_SECRET_* with workload.secret_env) to `env`. False when a secret is not here yet or
  // does not open: rt.phase/message say which, and the workload is not started.
  bool materialize_secrets(Runtime& rt, const nlohmann::json& entry,
                           std::map<std::string, std::string>* env);
  // Switches running workloads to the secret versions active now: rewrites the files, then
  // restarts the process or sends it SIGHUP (workload.on_secret_rotate).
  void rotate_secrets();
  // Active (and staged) versions of the secrets the deployments name: names and versions only.
  nlohmann::json secrets_report() const;
  // A workload event for the telemetry buffer (never sampled away).
  void record_event(const std::string& deployment, int64_t revision, const std::string& event,
                    const std::string& message);
  void collect_garbage();
  Status save_pointers(Runtime& rt);
  DeploymentReport deployment_report(const Runtime& rt) const;
  void report_if_changed(bool periodic);
  void publish_snapshot();
  int64_t now_ms() const;

  AgentOptions options_;
  Identity identity_;
  ArtifactStore artifacts_;
  std::unique_ptr<Fetcher> fetcher_;
  std::unique_ptr<ReleaseTrust> release_;
  std::unique_ptr<DesiredSync> sync_;
  std::unique_ptr<StatusOutbox> outbox_;
  std::unique_ptr<serve::ModelServer> models_;
  SystemClock clock_;
  // After models_ (its aggregator reads their numbers until it stops).
  std::unique_ptr<telemetry::Pipeline> telemetry_;
  std::unique_ptr<http::Router> router_;
  std::unique_ptr<http::HttpServer> http_;

  // Event loop inbox, filled from other threads.
  std::mutex inbox_mu_;
  std::condition_variable inbox_cv_;
  std::deque<std::function<void()>> inbox_;  // guarded by inbox_mu_

  // Owned by the event loop thread.
  int64_t generation_ = 0;
  // Delta offers of the current desired state: target digest -> deltas from bases.
  std::map<std::string, std::vector<DeltaPlan>> delta_offers_;
  std::map<std::string, std::unique_ptr<Runtime>> deployments_;
  nlohmann::json facts_;
  nlohmann::json reported_facts_;  // stable facts the server has (persisted)
  std::string last_report_;        // deployments part of the last report, to detect change
  int64_t last_report_at_ = 0;
  int64_t last_facts_at_ = 0;
  bool online_ = false;
  std::string link_error_;
  int64_t last_sync_ms_ = 0;
  // Secrets: the sealed versions of the current desired state (they stay sealed in memory too),
  // the key that opens them, and where plaintext files for workloads go.
  SealedSecrets sealed_;
  crypto::Ed25519KeyPair device_key_;
  std::string secrets_base_;

  mutable std::mutex snapshot_mu_;
  nlohmann::json snapshot_;  // guarded by snapshot_mu_
};

}  // namespace outpost::agent
