// The fleet simulator behind `outpost sim`: many virtual devices in one process against a real
// control plane. Each one enrolls, long-polls (or polls) its desired state, activates what it is
// given with stand-in workloads and models, reports status and ships telemetry, using the
// agent's own code for every request and answer (agent/device_api.h: enrollment, verification
// of the signed desired state, status reports, telemetry batches and acks; the agent's Backoff,
// revision keys, ModelMetrics and inference_delta), over a network that misbehaves on purpose
// (link.h). Only workloads and models are stand-ins: "activating" a revision takes a while and
// then runs (or crashes, when its config says `sim: {crash: true}`), and a served model answers
// `inference_rate` requests a second with `sim: {error_rate, latency_ms, confidence}`.
//
// Devices are sharded over `threads` event loops; each loop owns its devices, a pool of
// keep-alive connections and, in long-poll mode, one connection per device.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "sim/link.h"

namespace outpost::sim {

struct FleetOptions {
  std::string server;          // http://host:port of the control plane
  std::string operator_token;  // mints one enrollment token per site (unless enroll_token)
  std::string enroll_token;    // one token for every device instead (its site wins)
  // The devices' traffic goes here instead of `server` (a site relay, http://HOST:PORT); the
  // operator calls (tokens, the final convergence check) still go to `server`.
  std::string devices_via;
  int64_t devices = 100;
  int64_t sites = 1;
  std::string site_prefix = "sim";
  std::map<std::string, std::string> labels;  // every device's --label
  LinkOptions link;
  int64_t duration_ms = 60'000;  // 0: until stopped
  int64_t ramp_ms = 0;           // devices start spread over this long
  int64_t warmup_ms = 0;         // latencies and request rates are measured after this long
  // 0: long-poll like the agent (one connection per device); else poll every interval on
  // the shared connections (for fleets beyond the open-file limit).
  int64_t sync_interval_ms = 0;
  int64_t long_poll_s = 55;
  int64_t status_period_ms = 60'000;
  int64_t telemetry_interval_ms = 60'000;  // 0: no telemetry
  double inference_rate = 1.0;             // per served model and device, per second
  int64_t activate_ms = 500;               // stand-in time to fetch and start a revision (+-50%)
  int64_t backoff_max_ms = 60'000;         // the agent's default retry cap
  int threads = 1;
  size_t connections = 256;  // shared keep-alive connections per thread
  int source_addresses = 0;  // 127.0.0.x addresses to bind on loopback; 0: as many as needed
  int enroll_parallel = 32;
  std::string state_file;  // identities kept between runs (enroll once, run many times)
};

// A moment of the run, for the live progress line (every count from atomics: approximate
// while devices move).
struct Progress {
  int64_t elapsed_ms = 0;
  std::string phase;  // "enrolling", "running", "checking", "done"
  int64_t devices = 0;
  int64_t enrolled = 0;
  int64_t connected = 0;  // link up and the last exchange with the server succeeded
  int64_t converged = 0;  // running the newest desired state they received
  int64_t updates = 0;    // new desired states received
  int64_t requests = 0;
  int64_t errors = 0;  // failures the simulated network did not cause
  int64_t faults = 0;  // exchanges the simulated network broke on purpose
  double sync_p99_ms = 0;
  // deployment -> revision -> devices running it
  std::map<std::string, std::map<int64_t, int64_t>> running;
};

class Fleet {
 public:
  explicit Fleet(FleetOptions options);
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  // Checks the options against this machine (open files, source addresses) and the server's
  // address; kInvalidArgument naming the option otherwise.
  [[nodiscard]] Status prepare();
  // Enrolls every device (or loads them from state_file), then runs them until the duration
  // is over or `stop` turns true, then asks the server, per device, whether it runs its newest
  // desired state. `on_progress` is called about every `progress_ms` from this thread.
  [[nodiscard]] Status run(const std::atomic<bool>& stop,
                           const std::function<void(const Progress&)>& on_progress,
                           int64_t progress_ms = 1'000);
  // The final figures (after run): devices, enrolled, converged, errors, and the details.
  nlohmann::json summary() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace outpost::sim
