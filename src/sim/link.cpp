#include "sim/link.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace outpost::sim {
namespace {

// splitmix64: spreads (seed, index) into independent-looking values.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

Result<Profile> parse_profile(const std::string& text) {
  if (text == "steady") return Profile::kSteady;
  if (text == "flaky") return Profile::kFlaky;
  if (text == "offline-daily") return Profile::kOfflineDaily;
  if (text == "partition") return Profile::kPartition;
  return make_error(
      Errc::kInvalidArgument,
      "--profile: expected steady, flaky, offline-daily or partition, got \"" + text + "\"",
      "profile");
}

std::string profile_name(Profile profile) {
  switch (profile) {
    case Profile::kSteady:
      return "steady";
    case Profile::kFlaky:
      return "flaky";
    case Profile::kOfflineDaily:
      return "offline-daily";
    case Profile::kPartition:
      return "partition";
  }
  return "steady";
}

LinkModel::LinkModel(LinkOptions options, int64_t sites) : options_(options) {
  sites = std::max<int64_t>(sites, 1);
  partitioned_.assign(static_cast<size_t>(sites), false);
  if (options_.profile == Profile::kPartition) {
    // A seeded shuffle of the sites; the first share of it is cut off.
    std::vector<int64_t> order(static_cast<size_t>(sites));
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(mix(options_.seed ^ 0x5157e5ULL));
    std::shuffle(order.begin(), order.end(), rng);
    const auto chosen = std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil(options_.partition_sites * static_cast<double>(sites))), 1,
        sites);
    for (int64_t i = 0; i < chosen; ++i) partitioned_[static_cast<size_t>(order[i])] = true;
  }
}

bool LinkModel::site_partitioned(int64_t site_index) const {
  return site_index >= 0 && static_cast<size_t>(site_index) < partitioned_.size() &&
         partitioned_[static_cast<size_t>(site_index)];
}

int64_t LinkModel::phase_ms(int64_t device_index) const {
  const int64_t period =
      std::max<int64_t>(options_.day_ms / std::max(options_.windows_per_day, 1), 1);
  return static_cast<int64_t>(
      mix(options_.seed * 1'000'003ULL + static_cast<uint64_t>(device_index)) %
      static_cast<uint64_t>(period));
}

bool LinkModel::up(int64_t device_index, int64_t site_index, int64_t t_ms) const {
  switch (options_.profile) {
    case Profile::kSteady:
    case Profile::kFlaky:
      return true;
    case Profile::kOfflineDaily: {
      const int64_t period =
          std::max<int64_t>(options_.day_ms / std::max(options_.windows_per_day, 1), 1);
      const int64_t at = (t_ms + phase_ms(device_index)) % period;
      return at < std::min(options_.window_ms, period);
    }
    case Profile::kPartition:
      if (!site_partitioned(site_index)) return true;
      return t_ms < options_.partition_start_ms ||
             t_ms >= options_.partition_start_ms + options_.partition_length_ms;
  }
  return true;
}

Faults LinkModel::draw(std::mt19937_64& rng) const {
  Faults f;
  if (options_.profile != Profile::kFlaky) return f;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const double roll = unit(rng);
  if (roll < options_.drop_rate / 2) {
    f.lost_before = true;
  } else if (roll < options_.drop_rate) {
    f.lost_after = true;
  }
  const int64_t lo = std::min(options_.latency_min_ms, options_.latency_max_ms);
  const int64_t hi = std::max(options_.latency_min_ms, options_.latency_max_ms);
  f.delay_ms = std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  return f;
}

int64_t LinkModel::transfer_ms(int64_t bytes) const {
  if (options_.bandwidth_bytes_per_s <= 0 || bytes <= 0) return 0;
  return bytes * 1000 / options_.bandwidth_bytes_per_s;
}

}  // namespace outpost::sim
