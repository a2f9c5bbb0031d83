// Makes delta artifacts in the background: when a model version or an app bundle is pushed,
// zstd patch-from deltas from the versions it replaces (common/zstd_delta.h), so a device that
// holds one of those downloads the delta instead of the whole blob. Each delta is stored as
// an ordinary artifact (devices and relays fetch and cache it like any blob; signed release
// metadata lists it) and recorded in the store's artifact_deltas; the scheduler then offers it
// to devices that report holding the base.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/error.h"
#include "server/registry/blob_store.h"
#include "store/store.h"

namespace outpost::server::registry {

struct DeltaOptions {
  int bases = 2;            // earlier versions per blob to make deltas from; 0 turns deltas off
  int level = 19;           // zstd level
  double max_ratio = 0.75;  // a delta above this share of its target is not kept
  int64_t max_blob_bytes = 1LL << 30;  // base and target each at most this (zstd's window)
};

// Thread-safe. One worker thread between start() and stop(); requests made before start()
// wait for it.
class DeltaMaker {
 public:
  // on_made runs on the worker once the queue has drained and at least one delta was stored
  // since the last call (the control plane re-signs release metadata and reschedules).
  DeltaMaker(store::Store& store, BlobStore& blobs, const Clock& clock, DeltaOptions options,
             std::function<void()> on_made);
  ~DeltaMaker();
  void start();
  void stop();
  bool running() const;
  // Replicas: only the leader makes deltas. A request on a follower is told here (the leader
  // then catches up: catch_up_soon()). Set before the first request.
  void set_on_follower_request(std::function<void()> poke) { poke_ = std::move(poke); }
  // Queues a catch-up pass on the worker (another replica took a push).
  void catch_up_soon();

  const DeltaOptions& options() const { return options_; }

  // Queues deltas to `target` from each base (newest first; the first options().bases of them
  // that differ from it). Pairs already made or skipped are not made again.
  void request(const std::string& target, const std::vector<std::string>& bases);
  // For a new model version: per variant, the matching variant (same selector, else the same
  // index) of each earlier version, newest first. `versions` is the model's list, oldest first,
  // and may contain `added`.
  void request_model_version(const std::vector<store::ModelVersion>& versions,
                             const store::ModelVersion& added);

  // For a deployment's newest revision (last in `revisions`, oldest first): deltas to its app
  // bundle from the bundles of the revisions before it, newest first. No bundle: nothing.
  void request_deployment(const std::vector<store::DeploymentRevision>& revisions);

  // {"queued":N,"making":"<target>"|null,"made":N,"skipped":N,"failed":N,"last_error":".."}
  nlohmann::json status();
  // True when nothing is queued or being made (tests and `model push --wait-deltas`), and the
  // catch-up of a started worker has queued what it found.
  bool idle();

 private:
  struct Job {
    std::string target;
    std::string base;
  };
  std::function<void()> poke_;
  bool catch_up_due_ = false;
  std::atomic<bool> running_{false};
  void worker();
  // At start: queues what a stop may have left unmade, for each model's newest version and
  // each deployment's newest revision (made or skipped pairs are not queued again).
  void catch_up();
  // Makes and stores one delta; a skipped one is recorded with its reason.
  Status make_one(const Job& job, bool& stored);

  store::Store& store_;
  BlobStore& blobs_;
  const Clock& clock_;
  DeltaOptions options_;
  std::function<void()> on_made_;

  std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::set<std::pair<std::string, std::string>> pending_;  // queued or being made
  std::string making_;
  uint64_t made_ = 0, skipped_ = 0, failed_ = 0;
  std::string last_error_;
  bool made_since_notify_ = false;
  bool catching_up_ = false;  // from start() until catch_up() has queued its jobs
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace outpost::server::registry
