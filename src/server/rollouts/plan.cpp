#include "server/rollouts/plan.h"

#include <algorithm>
#include <chrono>
#include <map>

#include <cctz/civil_time.h>
#include <cctz/time_zone.h>

#include "common/digest.h"

namespace outpost::rollouts {

std::vector<PlannedDevice> order_devices(const std::string& deployment,
                                         std::vector<PlannedDevice> devices) {
  std::map<std::string, std::vector<std::pair<std::string, PlannedDevice>>> by_site;
  for (auto& d : devices) {
    std::string key = sha256_hex(deployment + "/" + d.id);
    by_site[d.site].emplace_back(std::move(key), std::move(d));
  }
  for (auto& [site, list] : by_site) std::sort(list.begin(), list.end(), [](auto& a, auto& b) {
      return a.first < b.first;
    });
  std::vector<PlannedDevice> out;
  out.reserve(devices.size());
  for (size_t round = 0; out.size() < devices.size(); ++round) {
    for (auto& [site, list] : by_site) {
      if (round < list.size()) out.push_back(std::move(list[round].second));
    }
  }
  return out;
}

std::vector<int64_t> wave_sizes(const std::vector<deployments::Manifest::Amount>& waves,
                                int64_t n) {
  std::vector<int64_t> out;
  if (n <= 0) return out;
  for (const auto& w : waves) {
    int64_t count = w.percent ? (n * w.value + 99) / 100 : w.value;
    count = std::clamp<int64_t>(count, 1, n);
    if (out.empty() || count > out.back()) out.push_back(count);
  }
  if (out.empty() || out.back() < n) out.push_back(n);
  return out;
}

int64_t max_unavailable_count(const deployments::Manifest::Amount& amount, int64_t n) {
  const int64_t count = amount.percent ? n * amount.value / 100 : amount.value;
  return std::max<int64_t>(count, 1);
}

Result<int> local_minute_of_day(const std::string& time_zone, int64_t unix_ms) {
  cctz::time_zone tz;
  if (!cctz::load_time_zone(time_zone, &tz)) {
    return make_error(Errc::kInvalidArgument,
                      "time zone " + time_zone +
                          " is not known (expected an IANA name like Europe/Berlin or UTC)",
                      "timezone");
  }
  const auto at = std::chrono::system_clock::time_point(std::chrono::milliseconds(unix_ms));
  const cctz::civil_second local = cctz::convert(
      std::chrono::time_point_cast<cctz::seconds>(at), tz);
  return static_cast<int>(local.hour() * 60 + local.minute());
}

}  // namespace outpost::rollouts
