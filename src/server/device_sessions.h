// What the hot device-sync path needs to know about enrolled devices, kept in memory so a
// sync costs no store read and at most one store write per touch interval.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common/error.h"
#include "store/store.h"

namespace outpost::server {

class DeviceSessions {
 public:
  // last_seen is written to the store when it is older than `touch_interval_ms` there.
  DeviceSessions(store::Store& store, int64_t touch_interval_ms)
      : store_(store), touch_interval_ms_(touch_interval_ms) {}

  // Checks a device's credential secret. The store is read the first time a device is seen
  // (credentials never change once issued); unknown devices are read again every time.
  // Errors: kUnauthenticated for an unknown device or a wrong secret; store errors.
  [[nodiscard]] Status verify(const std::string& device_id, const std::string& secret);

  // Records that the device was seen at `now_ms`; writes through to the store at most once
  // per interval. Errors: the store's (the in-memory time is kept either way).
  [[nodiscard]] Status seen(const std::string& device_id, int64_t now_ms);

  // How many store writes seen() saved (for /metrics and tests).
  int64_t touches_skipped() const;

 private:
  struct Entry {
    std::string credential_hash;
    int64_t written_ms = 0;  // last_seen as last written to the store
  };
  store::Store& store_;
  const int64_t touch_interval_ms_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, Entry> entries_;
  int64_t skipped_ = 0;
};

}  // namespace outpost::server
