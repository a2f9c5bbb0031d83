#include "agent/telemetry/health.h"

#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "common/durable_file.h"

namespace outpost::agent::telemetry {
namespace {

// The value (kB) of `key` in /proc/meminfo, in bytes; -1 when absent.
int64_t meminfo_bytes(const std::string& text, const std::string& key) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      return std::atoll(line.c_str() + key.size() + 1) * 1024;
    }
  }
  return -1;
}

}  // namespace

HealthCollector::HealthCollector(Sources sources) : sources_(std::move(sources)) {
  (void)read_cpu(last_busy_, last_total_);
}

bool HealthCollector::read_cpu(uint64_t& busy, uint64_t& total) const {
  auto text = read_file(sources_.proc + "/stat");
  if (!text || text->rfind("cpu ", 0) != 0) return false;
  std::istringstream in(text->substr(4, text->find('\n') - 4));
  // user nice system idle iowait irq softirq steal (guest time is already in user/nice)
  uint64_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (auto& x : v) {
    if (!(in >> x)) break;
  }
  const uint64_t idle = v[3] + v[4];
  total = v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
  busy = total - idle;
  return true;
}

outpost::telemetry::HealthRecord HealthCollector::collect(int64_t buffer_bytes,
                                                          std::optional<double> sync_lag_s) {
  outpost::telemetry::HealthRecord h;
  uint64_t busy = 0, total = 0;
  if (read_cpu(busy, total)) {
    if (total > last_total_ && busy >= last_busy_) {
      h.cpu_percent = std::clamp(
          100.0 * static_cast<double>(busy - last_busy_) / static_cast<double>(total - last_total_),
          0.0, 100.0);
    }
    last_busy_ = busy;
    last_total_ = total;
  }
  if (auto text = read_file(sources_.proc + "/meminfo")) {
    const int64_t mem_total = meminfo_bytes(*text, "MemTotal");
    const int64_t available = meminfo_bytes(*text, "MemAvailable");
    if (mem_total > 0) {
      h.mem_total = mem_total;
      h.mem_used = available >= 0 ? std::max<int64_t>(0, mem_total - available) : 0;
    }
  }
  struct statvfs fs {};
  if (::statvfs(sources_.data_dir.c_str(), &fs) == 0) {
    h.disk_total = static_cast<int64_t>(fs.f_blocks) * static_cast<int64_t>(fs.f_frsize);
    h.disk_free = static_cast<int64_t>(fs.f_bavail) * static_cast<int64_t>(fs.f_frsize);
  }
  std::optional<double> hottest;
  for (const auto& name : list_directory(sources_.sys + "/class/thermal")) {
    if (name.rfind("thermal_zone", 0) != 0) continue;
    auto text = read_file(sources_.sys + "/class/thermal/" + name + "/temp");
    if (!text || text->empty()) continue;
    char* end = nullptr;
    const double milli = std::strtod(text->c_str(), &end);
    if (end == text->c_str()) continue;
    const double c = milli / 1000.0;
    // Sensors that are absent or broken report nonsense (-273, 0 on some boards is real).
    if (c < -60 || c > 200) continue;
    hottest = std::max(hottest.value_or(c), c);
  }
  h.temp_c = hottest;
  if (auto text = read_file(sources_.proc + "/uptime")) h.uptime_s = std::atof(text->c_str());
  if (auto text = read_file(sources_.proc + "/self/statm")) {
    std::istringstream in(*text);
    int64_t size = 0, resident = 0;
    if (in >> size >> resident)
      h.agent_rss = resident * static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
  }
  h.buffer_bytes = buffer_bytes;
  h.sync_lag_s = sync_lag_s;
  return h;
}

}  // namespace outpost::agent::telemetry
