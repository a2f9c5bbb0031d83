// The shape of a rollout, decided once when it starts: the order in which devices get the new
// revision, how many each wave holds, and how many may be updating at once. Pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "server/deployments/manifest.h"

namespace outpost::rollouts {

struct PlannedDevice {
  std::string id;
  std::string site;
};

// Deterministic order that spreads across sites: sites take turns (by name), and within a site
// devices are ordered by sha256(deployment "/" device id), so the same devices lead every
// rollout of a deployment (stable canaries) while no site gets all of the first wave.
std::vector<PlannedDevice> order_devices(const std::string& deployment,
                                         std::vector<PlannedDevice> devices);

// Cumulative device counts per wave for `n` devices: a percentage rounds up (a wave is never
// empty while devices are left), a count is capped at n, and when the waves end short of n a
// last wave of everything is added. Waves that would not add a device are dropped. n = 0: {}.
std::vector<int64_t> wave_sizes(const std::vector<deployments::Manifest::Amount>& waves,
                                int64_t n);

// How many devices may be updating at once: a percentage of n rounded down, a count as is;
// at least 1, so a rollout always moves.
int64_t max_unavailable_count(const deployments::Manifest::Amount& amount, int64_t n);

// Minute of the day (0..1439) at `unix_ms` in the IANA time zone `time_zone`
// ("Europe/Berlin", "UTC"). kInvalidArgument naming the zone when the system does not know it.
[[nodiscard]] Result<int> local_minute_of_day(const std::string& time_zone, int64_t unix_ms);

}  // namespace outpost::rollouts
