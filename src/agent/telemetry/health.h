// The device's own health, one record per telemetry interval: CPU over the interval, memory,
// disk of the data dir, temperature where the kernel exposes it, uptime, the agent's RSS, the
// buffer's size and how long ago the control plane last answered.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/telemetry_batch.h"

namespace outpost::agent::telemetry {

class HealthCollector {
 public:
  struct Sources {
    std::string proc = "/proc";  // stat, meminfo, uptime, self/statm
    std::string sys = "/sys";    // class/thermal/thermal_zone*/temp
    std::string data_dir = "/";  // the disk whose free space counts
  };
  explicit HealthCollector(Sources sources);

  // cpu_percent is over the time since the previous call (since construction for the first).
  // buffer_bytes and sync_lag_s come from the caller.
  outpost::telemetry::HealthRecord collect(int64_t buffer_bytes, std::optional<double> sync_lag_s);

 private:
  // Jiffies of all cores from the "cpu" line of /proc/stat: busy and total.
  bool read_cpu(uint64_t& busy, uint64_t& total) const;

  Sources sources_;
  uint64_t last_busy_ = 0;
  uint64_t last_total_ = 0;
};

}  // namespace outpost::agent::telemetry
