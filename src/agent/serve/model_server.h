// The agent's built-in model server: one loaded session per active model (plus its fallback),
// served with the Open Inference Protocol (KServe v2) on the agent's local listener.
//
//   GET  /v2, /v2/health/live, /v2/health/ready
//   GET  /v2/models/{name}[/versions/{v}]           metadata ({name}: deployment or model)
//   GET  /v2/models/{name}[/versions/{v}]/ready
//   POST /v2/models/{name}[/versions/{v}]/infer
//   GET  {route}, GET {route}/ready, POST {route}/infer   (the deployment's serve.route)
//
// A new version is loaded and warmed up beside the old one, then swapped in with one pointer
// store; requests in flight finish on the session they started with, which is freed when the
// last of them returns. Thread-safe: activate/remove from the agent's event loop, handle()
// from the HTTP threads.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/serve/inference_protocol.h"
#include "agent/serve/inference_session.h"
#include "agent/serve/serving_metrics.h"
#include "common/error.h"
#include "http/http_server.h"

namespace outpost::agent::serve {

struct ModelRef {
  std::string name;
  std::string version;
  std::string path;  // model file on disk
};

struct ServiceConfig {
  std::string deployment;
  std::string route;  // "/models/<deployment>" unless the manifest names one
  int64_t revision = 0;
  ModelRef primary;
  std::optional<ModelRef> fallback;
  // For classifier outputs: an answer whose confidence is under this goes to the fallback.
  // Confidence = the top value of each row of the first output, when every value of it lies
  // in [0, 1]; a batch's confidence is its lowest row's. 0 = never.
  double min_confidence = 0;
  SessionOptions session;
};

// What one call to infer came to, for the telemetry sampler: the version and role whose answer
// (or error) went back, and how it went.
struct InferenceOutcome {
  std::string deployment;
  int64_t revision = 0;
  std::string model;
  std::string version;
  std::string role = "primary";
  double latency_s = 0;
  std::optional<double> confidence;  // of the answer that went back, when it has one
  // "ok" (the primary's answer), "fallback" (the fallback's answer), "error" (5xx: the model
  // failed or none could answer), "invalid" (4xx: a malformed request).
  std::string outcome = "ok";
};
using InferenceObserver = std::function<void(const InferenceOutcome&)>;

class ModelServer {
 public:
  explicit ModelServer(SessionLoader loader, ProtocolLimits limits = {});
  ~ModelServer();
  ModelServer(const ModelServer&) = delete;
  ModelServer& operator=(const ModelServer&) = delete;

  // Loads the primary and the fallback, warms each up with one inference of zeros (a failing
  // warm-up is logged, not fatal), then swaps them in for the deployment. When the primary
  // cannot load but the fallback can, the fallback serves alone (state "degraded") and the
  // result says so. Errors: the primary cannot load and there is no fallback that can (the
  // old version, if any, keeps serving); a route another deployment serves (kConflict).
  // Returns a one-line note for the deployment's status ("" when all is well).
  [[nodiscard]] Result<std::string> activate(const ServiceConfig& config);
  // Stops serving a deployment (in-flight requests finish).
  void remove(const std::string& deployment);
  // The revision a deployment serves now, if any.
  std::optional<int64_t> serving_revision(const std::string& deployment) const;

  // Called once per inference, on the HTTP thread that ran it, after the answer is built; it
  // must be cheap (no disk I/O). Set once, before the first request.
  void set_observer(InferenceObserver observer) { observer_ = std::move(observer); }

  // Answers the paths listed above; nullopt for any other path (the caller's 404).
  std::optional<http::Response> handle(const http::Request& request);

  // GET /v1/services: [{"deployment","route","revision","state","primary":{model,version,
  //   loaded,error},"fallback":{..}|null,"min_confidence","inputs","outputs","requests",
  //   "errors","fallbacks"}]; `base_url` ("http://127.0.0.1:7410") is prefixed to each route.
  nlohmann::json services(const std::string& base_url) const;
  // Every model version's metrics, including versions no longer served (their counters stay).
  nlohmann::json metrics_json() const;
  // Every model version's numbers as structured values (for the telemetry aggregator).
  std::vector<MetricsSnapshot> metrics_snapshots() const;
  // Prometheus text for GET /metrics.
  std::string prometheus() const;

 private:
  struct Loaded {
    ModelRef ref;
    std::shared_ptr<InferenceSession> session;  // null when it failed to load
    std::shared_ptr<ModelMetrics> metrics;
    std::string error;
  };
  struct Service {
    ServiceConfig config;
    Loaded primary;
    std::optional<Loaded> fallback;
  };
  using ServicePtr = std::shared_ptr<const Service>;

  Loaded load(const ServiceConfig& config, const ModelRef& ref, const std::string& role);
  std::shared_ptr<ModelMetrics> metrics_for(const std::string& deployment, const ModelRef& ref,
                                            const std::string& role);
  ServicePtr find_by_route(const std::string& route) const;
  ServicePtr find_by_name(const std::string& name) const;
  http::Response infer(const Service& service, const http::Request& request);
  // infer() without the bookkeeping: says who answered and how in `outcome` / `served_by`.
  http::Response run_inference(const Service& service, const std::string& body,
                               std::optional<size_t> json_length, InferenceOutcome& outcome,
                               const Loaded*& served_by);
  http::Response metadata(const Service& service) const;
  static http::Response ready(const Service& service);

  SessionLoader loader_;
  ProtocolLimits limits_;
  InferenceObserver observer_;
  mutable std::mutex mu_;
  std::map<std::string, ServicePtr> services_;  // by deployment; guarded by mu_
  // "<deployment>\n<model>\n<version>\n<role>" -> metrics; guarded by mu_
  std::map<std::string, std::shared_ptr<ModelMetrics>> metrics_;
};

}  // namespace outpost::agent::serve
