// `outpost server`: wires the store, blob store, scheduler, sync hub and HTTP API together,
// owns the data directory, and runs until stopped.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "common/error.h"
#include "server/registry/delta_maker.h"
#include "server/registry/release_signer.h"
#include "server/tls_setup.h"

namespace outpost::server {

struct ControlPlaneOptions {
  std::string listen = "127.0.0.1:7400";
  std::string data_dir = "./outpost-data";
  std::string db_url;  // default: sqlite:DATA/outpost.db
  int io_threads = 2;
  int worker_threads = 4;
  int64_t long_poll_ms = 55'000;
  // Devices' last_seen times are written to the store in one batch this often (a sync itself
  // costs no store write); `device list` may lag by this much.
  int64_t last_seen_flush_ms = 2'000;
  // Telemetry: raw points and events are kept this long, hourly rollups this long; the
  // rollup and expiry job runs this often.
  int64_t telemetry_retention_ms = 7LL * 24 * 3'600'000;
  int64_t telemetry_rollup_retention_ms = 400LL * 24 * 3'600'000;
  int64_t telemetry_maintenance_ms = 60'000;
  // Rollouts: how often the controller advances them, and reads telemetry gates at most.
  int64_t rollout_tick_ms = 1'000;
  int64_t rollout_gate_interval_ms = 5'000;
  // A client that started a request must finish its header within this (slowloris).
  int64_t header_timeout_ms = 10'000;
  // HTTPS by default (a development CA under DATA/tls/ unless a certificate is given).
  TlsOptions tls;
  // The master key that encrypts secrets at rest (32 bytes, base64, 0600), made on first start;
  // "" = DATA/secrets.key. Keep it apart from the database's backups.
  std::string secrets_key_file;
  // Signed release metadata: how long targets and timestamp documents stay valid.
  registry::ReleaseOptions release;
  // Delta updates: how many earlier versions of a model or bundle get a delta, at what level.
  registry::DeltaOptions deltas;
};

class ControlPlane {
 public:
  explicit ControlPlane(ControlPlaneOptions options);
  ~ControlPlane();
  ControlPlane(const ControlPlane&) = delete;
  ControlPlane& operator=(const ControlPlane&) = delete;

  // Prepares the data directory (first start creates the database, blobs/, admin.token and
  // the signing key), opens the store, and starts listening.
  [[nodiscard]] Status start();
  // Answers held long-polls, stops listening, drains workers. Idempotent.
  void stop();
  uint16_t port() const;
  const std::string& admin_token_path() const;
  const TlsSetup& tls() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Runs a control plane until SIGINT/SIGTERM; prints where it listens and the token path.
int run_server(const ControlPlaneOptions& options);

}  // namespace outpost::server
