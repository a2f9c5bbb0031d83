// What the hot device-sync path needs to know about enrolled devices, kept in memory so a
// sync costs no store read and no store write: credentials are checked from memory after
// the first sync, and last_seen is batched and written by flush() in one transaction.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/error.h"
#include "store/store.h"

namespace outpost::server {

class DeviceSessions {
 public:
  explicit DeviceSessions(store::Store& store) : store_(store) {}

  // Checks a device's credential secret. The store is read the first time a device is seen
  // (credentials never change once issued); unknown devices are read again every time.
  // Errors: kUnauthenticated for an unknown device or a wrong secret; store errors.
  [[nodiscard]] Status verify(const std::string& device_id, const std::string& secret);

  // verify() from memory alone: nullopt when the device's credential is not in memory yet
  // (verify() must read the store). Never blocks on the store, so it may run on an I/O thread.
  [[nodiscard]] std::optional<Status> verify_known(const std::string& device_id,
                                                   const std::string& secret) const;

  // The site of a device verify() has seen (sites are fixed at enrollment), so telemetry
  // ingest reads no device row; "" when not known yet.
  std::string site(const std::string& device_id) const;

  // Records that the device was seen at `now_ms` (memory only; flush() writes it).
  void seen(const std::string& device_id, int64_t now_ms);

  // Writes every last_seen recorded since the previous flush in one transaction. On a store
  // error the times stay pending for the next flush. Returns how many devices were written.
  [[nodiscard]] Result<int64_t> flush();

  // Syncs that cost no store write so far: seen() calls minus rows written (for /metrics).
  int64_t writes_saved() const;

 private:
  struct Entry {
    std::string credential_hash;
    std::string site;
    int64_t last_seen = 0;
    bool dirty = false;
  };
  store::Store& store_;
  mutable std::mutex mutex_;
  std::mutex flush_mutex_;  // one flush at a time, so times reach the store in order
  std::unordered_map<std::string, Entry> entries_;  // GUARDED_BY(mutex_)
  std::vector<std::string> dirty_;                  // GUARDED_BY(mutex_)
  int64_t seen_count_ = 0;                          // GUARDED_BY(mutex_)
  int64_t rows_written_ = 0;                        // GUARDED_BY(mutex_)
};

}  // namespace outpost::server
