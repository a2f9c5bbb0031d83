// Artifacts on the device: a content-addressed store (only verified blobs enter it) and the
// fetcher that fills it from the control plane with libcurl: resumable Range downloads, a
// rate cap, a disk budget checked before any byte is fetched, and SHA-256 checked before use.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "agent/identity.h"
#include "common/error.h"

namespace outpost::agent {

// DIR/artifacts/sha256/<hex> holds verified blobs; DIR/artifacts/partial/<hex> downloads in
// progress. Thread-safe (every method works on the file system only).
class ArtifactStore {
 public:
  explicit ArtifactStore(std::string data_dir);
  [[nodiscard]] Status init();  // creates the folders, removes stray temp files
  bool has(const std::string& digest) const;
  std::string path(const std::string& digest) const;          // verified blob
  std::string partial_path(const std::string& digest) const;  // download in progress
  std::vector<std::string> list() const;                      // digests of verified blobs
  int64_t used_bytes() const;                                 // verified + partial
  void remove(const std::string& digest) const;               // both forms

 private:
  std::string dir_;
};

struct FetchOptions {
  int64_t max_rate_bytes_per_s = 0;  // 0: no cap; shared by the parallel downloads
  int64_t disk_budget_bytes = 0;     // 0: no budget (free disk is still checked)
  int max_parallel = 2;
  int64_t retry_initial_ms = 2'000;
  int64_t retry_max_ms = 120'000;
  int64_t free_disk_reserve_bytes = 64LL << 20;  // never fill the disk past this
};

struct FetchProgress {
  enum class Phase { kQueued, kDownloading, kVerifying, kDone, kWaitingRetry };
  Phase phase = Phase::kQueued;
  int64_t total_bytes = 0;    // from the server; 0 until known
  int64_t have_bytes = 0;     // on disk now (resumed downloads start above 0)
  int64_t fetched_bytes = 0;  // transferred over the network for it, all attempts
  int attempts = 0;
  std::string last_error;  // why the last attempt failed ("" when none)
  // Its kind: kUnavailable when the server could not be reached or was busy (the same request
  // may work later); anything else means the server answered and the answer was no good.
  Errc last_code = Errc::kUnavailable;
  int64_t retry_at_ms = 0;  // steady-clock ms of the next attempt (kWaitingRetry)
  // The length signed release metadata gives the blob (-1: none): no byte past it is read, and
  // a server that offers more is refused ("endless data").
  int64_t signed_length = -1;
  // Delta updates: the delta being fetched and applied instead of the whole blob ("" when the
  // whole blob is fetched), and why the last delta was given up for the whole blob.
  std::string via_delta;
  std::string delta_error;
};

// A delta the desired state offers for a blob: fetch `delta` (`delta_length` signed bytes, -1
// when release metadata is off) and apply it to `base`, which the device holds verified.
struct DeltaPlan {
  std::string delta;
  std::string base;
  int64_t delta_length = -1;
};

class Fetcher {
 public:
  // on_change is called (from a fetch thread) when a job changes phase or fails.
  Fetcher(ArtifactStore& store, Identity identity, FetchOptions options,
          std::function<void()> on_change);
  ~Fetcher();
  void start();
  void stop();  // abandons transfers (partials stay for resume) and joins the threads

  // Asks for a blob; no-op when it is verified already or being fetched. Failed attempts are
  // retried with backoff until the blob arrives or forget() is called.
  // With a plan, the blob is rebuilt from a delta against a base it holds; the result must
  // hash to `digest`. Any failure other than an unreachable server (a corrupt delta, a base
  // that does not rebuild it, a refusal), or three unreachable tries, gives the delta up for
  // the whole blob in the same attempt; a delta given up is not tried again for that blob.
  void want(const std::string& digest, int64_t signed_length = -1,
            std::optional<DeltaPlan> plan = std::nullopt);
  void forget(const std::string& digest);  // no longer needed (the partial is kept)
  std::optional<FetchProgress> progress(const std::string& digest) const;
  // Digests being fetched or waiting (GC must keep their partials).
  std::vector<std::string> wanted() const;

 private:
  void worker();
  Status fetch_once(const std::string& digest);
  // Downloads `blob` (resuming) into its partial file and verifies its SHA-256; progress is
  // booked on job `key`. into_store: rename it into the verified store (else it stays, whole
  // and verified, at its partial path for the caller).
  Status download(const std::string& key, const std::string& blob, int64_t signed_length,
                  bool into_store);
  Status fetch_by_delta(const std::string& digest, const DeltaPlan& plan, int64_t signed_length);
  void set_progress(const std::string& digest, const std::function<void(FetchProgress&)>& edit);
  void pace(int64_t bytes);  // sleeps as the shared rate cap needs

  ArtifactStore& store_;
  Identity identity_;
  FetchOptions options_;
  std::function<void()> on_change_;
  mutable std::mutex mu_;  // guards queue_, jobs_, active_, stopping cv
  std::condition_variable cv_;
  std::deque<std::string> queue_;
  std::map<std::string, FetchProgress> jobs_;
  int active_ = 0;
  std::set<std::string> forgotten_;  // in flight, but no longer wanted
  struct PlanState {
    DeltaPlan plan;
    int unreachable = 0;  // tries that found the server unreachable
  };
  std::map<std::string, PlanState> plans_;                  // by target digest
  std::set<std::pair<std::string, std::string>> given_up_;  // (target, delta)
  std::mutex rate_mu_;
  int64_t rate_clock_us_ = 0;  // guarded by rate_mu_: when the bytes booked so far are due
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> threads_;
};

}  // namespace outpost::agent
