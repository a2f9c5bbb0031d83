#include "server/device_sessions.h"

#include "common/crypto.h"
#include "common/digest.h"

namespace outpost::server {

Status DeviceSessions::verify(const std::string& device_id, const std::string& secret) {
  const std::string presented = sha256_hex(secret);
  std::string expected;
  {
    std::lock_guard lock(mutex_);
    if (auto it = entries_.find(device_id); it != entries_.end()) {
      expected = it->second.credential_hash;
    }
  }
  if (expected.empty()) {
    auto device = store_.get_device(device_id);
    if (!device) return make_error(device.error());
    if (!*device) return make_error(Errc::kUnauthenticated, "device credential is not valid");
    expected = (*device)->credential_hash;
    std::lock_guard lock(mutex_);
    auto& entry = entries_[device_id];
    entry.credential_hash = expected;
    entry.written_ms = std::max(entry.written_ms, (*device)->last_seen);
  }
  if (!crypto::constant_time_equal(expected, presented)) {
    return make_error(Errc::kUnauthenticated, "device credential is not valid");
  }
  return ok();
}

Status DeviceSessions::seen(const std::string& device_id, int64_t now_ms) {
  {
    std::lock_guard lock(mutex_);
    auto& entry = entries_[device_id];
    if (now_ms - entry.written_ms < touch_interval_ms_) {
      ++skipped_;
      return ok();
    }
    entry.written_ms = now_ms;
  }
  return store_.touch_device(device_id, now_ms);
}

int64_t DeviceSessions::touches_skipped() const {
  std::lock_guard lock(mutex_);
  return skipped_;
}

}  // namespace outpost::server
