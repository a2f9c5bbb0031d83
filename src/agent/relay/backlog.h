// A relay's store-and-forward queue: the status reports and telemetry batches its children
// sent, each on disk (fsynced) before the child hears "stored", forwarded upstream in the order
// each child sent them. One file per upload under DIR/, named by a global sequence number, so
// a crash loses nothing and a restart resumes the same order. Bounded by bytes: when full the
// relay refuses new uploads with a retryable answer and the child keeps them in its own
// (bounded, drop-counting) buffer, so nothing is dropped silently anywhere on the path.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::agent::relay {

struct BacklogEntry {
  uint64_t id = 0;     // global order of arrival (set by push)
  std::string device;  // the child's device id
  std::string path;    // target as the child sent it: "/api/v1/device/status" or ".../telemetry"
  std::string content_type;
  std::string content_encoding;  // "zstd" for telemetry, else empty
  std::string authorization;     // the child's own "Bearer ..." header, forwarded as sent
  std::string signature;         // the child's X-Outpost-Signature, forwarded as sent
  std::string via;               // X-Outpost-Via to send upstream (this relay included)
  std::string body;
};

class Backlog {
 public:
  Backlog(std::string dir, int64_t limit_bytes);

  // Creates DIR (0700) and reads what a previous run left, in order. Unreadable entries are
  // set aside as DIR/*.bad and counted, never forwarded half.
  [[nodiscard]] Status load();
  // Durable before it returns. kUnavailable (503, retryable; naming the limit) when it does not
  // fit: the child keeps the upload and sends it again later.
  [[nodiscard]] Status push(BacklogEntry entry);
  // The oldest entry of `device`, read from disk.
  [[nodiscard]] Result<std::optional<BacklogEntry>> front(const std::string& device) const;
  // Removes the device's oldest entry (it went upstream, or upstream refused it for good).
  void pop(const std::string& device);
  // Devices with entries, in the order their oldest entry arrived.
  std::vector<std::string> devices() const;

  struct Stats {
    int64_t entries = 0;
    int64_t bytes = 0;
    int64_t limit_bytes = 0;
    int64_t unreadable = 0;  // set aside at load
  };
  Stats stats() const;

 private:
  std::string file_of(uint64_t id) const;

  std::string dir_;
  int64_t limit_bytes_;
  mutable std::mutex mu_;
  struct Item {
    uint64_t id;
    int64_t bytes;
  };
  std::map<std::string, std::deque<Item>> queues_;  // guarded by mu_
  int64_t bytes_ = 0;
  int64_t entries_ = 0;
  int64_t unreadable_ = 0;
  uint64_t next_id_ = 1;
};

}  // namespace outpost::agent::relay
