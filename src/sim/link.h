// The fleet simulator's network, misbehaving on purpose: whether a virtual device's link is up
// at a moment (offline-daily windows, a partitioned site), and the faults one request meets on
// a flaky link (dropped, delayed) or a slow one (a bandwidth cap). Pure and seeded: the same
// seed gives every device the same windows and the same faults, run after run.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::sim {

enum class Profile {
  kSteady,        // always up, no faults
  kFlaky,         // always up; requests dropped (before or after the server saw them) and delayed
  kOfflineDaily,  // connected a few windows a day
  kPartition,     // a share of the sites cut off for a while, then back all at once
};

// "steady", "flaky", "offline-daily", "partition"; kInvalidArgument listing them otherwise.
[[nodiscard]] Result<Profile> parse_profile(const std::string& text);
std::string profile_name(Profile profile);

struct LinkOptions {
  Profile profile = Profile::kSteady;
  uint64_t seed = 1;
  // flaky: each request is lost with this probability (half before it reaches the server, half
  // on the way back) and delayed uniformly in [latency_min_ms, latency_max_ms].
  double drop_rate = 0.05;
  int64_t latency_min_ms = 20;
  int64_t latency_max_ms = 400;
  // Any profile: bytes per second each device's link carries (0 = no cap). Modelled as the time
  // a request and its answer take to cross the link, added to the exchange.
  int64_t bandwidth_bytes_per_s = 0;
  // offline-daily: `windows_per_day` windows of `window_ms` each, evenly spaced over a day of
  // `day_ms` (shorten the day to see several in one run); each device has its own phase.
  int64_t day_ms = 86'400'000;
  int windows_per_day = 3;
  int64_t window_ms = 20 * 60'000;
  // partition: the chosen sites are down during [partition_start_ms, +partition_length_ms) of
  // the run; `partition_sites` is the share of sites chosen (at least one).
  int64_t partition_start_ms = 15'000;
  int64_t partition_length_ms = 15'000;
  double partition_sites = 0.25;
};

// What one request meets on its way.
struct Faults {
  int64_t delay_ms = 0;      // before it leaves
  bool lost_before = false;  // never reaches the server
  bool lost_after = false;   // the server handled it; the answer is lost
};

class LinkModel {
 public:
  LinkModel(LinkOptions options, int64_t sites);

  // Is the device's link up `t_ms` after the run started?
  bool up(int64_t device_index, int64_t site_index, int64_t t_ms) const;
  // Faults for one request, drawn from the device's own generator.
  Faults draw(std::mt19937_64& rng) const;
  // Time `bytes` take on the device's link (0 without a cap).
  int64_t transfer_ms(int64_t bytes) const;
  bool site_partitioned(int64_t site_index) const;
  // The offline-daily phase of a device: where in its window cycle it starts.
  int64_t phase_ms(int64_t device_index) const;
  const LinkOptions& options() const { return options_; }

 private:
  LinkOptions options_;
  std::vector<bool> partitioned_;  // per site
};

}  // namespace outpost::sim
