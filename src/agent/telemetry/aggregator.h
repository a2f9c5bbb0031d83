// Turns the model server's cumulative numbers into one `inference` record per model version
// and interval: the deltas of its counters, histograms and input statistics since the interval
// began. The open interval is checkpointed into the buffer every flush period, so a crash
// loses at most one flush period of counts, and nothing is counted twice: closing an interval
// appends its records and clears the checkpoint in one transaction, and the agent's next start
// turns a leftover checkpoint into records (the new process' counters start from zero).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "agent/serve/serving_metrics.h"
#include "agent/telemetry/buffer.h"
#include "common/clock.h"
#include "common/telemetry_batch.h"

namespace outpost::agent::telemetry {

// The part of Welford statistics added between `before` and `after` (cumulative, after
// includes before): its n, mean and m2, as if computed over only those values.
outpost::telemetry::FeatureStats welford_delta(const serve::RunningStats& after,
                                               const serve::RunningStats& before);

// The interval's record of one version: after - before (before may be empty: a version new in
// the interval). nullopt when nothing happened to it in the interval.
std::optional<outpost::telemetry::InferenceRecord> inference_delta(
    const serve::MetricsSnapshot& after, const serve::MetricsSnapshot* before);

class Aggregator {
 public:
  using Source = std::function<std::vector<serve::MetricsSnapshot>()>;

  // `source` gives every version's cumulative numbers (ModelServer::metrics_snapshots).
  Aggregator(Buffer& buffer, const Clock& clock, Source source);

  // At start, before any inference: leftovers of a crashed run become records; the interval
  // starts now. Returns how many records were recovered.
  [[nodiscard]] Result<size_t> start();
  // Writes the open interval's records so far to the buffer (replacing the last checkpoint).
  [[nodiscard]] Status checkpoint();
  // Ends the interval now: appends its records (with seqs) and clears the checkpoint. Returns
  // how many records it made.
  [[nodiscard]] Result<size_t> close();
  int64_t interval_start() const { return interval_start_; }

 private:
  std::vector<outpost::telemetry::Record> records_since_start(
      const std::vector<serve::MetricsSnapshot>& now_snapshots, int64_t now) const;

  Buffer& buffer_;
  const Clock& clock_;
  Source source_;
  int64_t interval_start_ = 0;
  // "<deployment>\n<model>\n<version>\n<role>" -> numbers at the interval's start.
  std::map<std::string, serve::MetricsSnapshot> baseline_;
};

}  // namespace outpost::agent::telemetry
