#include "server/device_sessions.h"

#include <algorithm>

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
    entry.site = (*device)->site;
    entry.last_seen = std::max(entry.last_seen, (*device)->last_seen);
  }
  if (!crypto::constant_time_equal(expected, presented)) {
    return make_error(Errc::kUnauthenticated, "device credential is not valid");
  }
  return ok();
}

std::optional<Status> DeviceSessions::verify_known(const std::string& device_id,
                                                   const std::string& secret) const {
  std::string expected;
  {
    std::lock_guard lock(mutex_);
    auto it = entries_.find(device_id);
    if (it == entries_.end() || it->second.credential_hash.empty()) return std::nullopt;
    expected = it->second.credential_hash;
  }
  if (!crypto::constant_time_equal(expected, sha256_hex(secret))) {
    return Status(make_error(Errc::kUnauthenticated, "device credential is not valid"));
  }
  return Status(ok());
}

std::string DeviceSessions::site(const std::string& device_id) const {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(device_id);
  return it == entries_.end() ? std::string() : it->second.site;
}

void DeviceSessions::seen(const std::string& device_id, int64_t now_ms) {
  std::lock_guard lock(mutex_);
  ++seen_count_;
  auto& entry = entries_[device_id];
  entry.last_seen = std::max(entry.last_seen, now_ms);
  if (!entry.dirty) {
    entry.dirty = true;
    dirty_.push_back(device_id);
  }
}

Result<int64_t> DeviceSessions::flush() {
  std::lock_guard flushing(flush_mutex_);
  std::vector<std::pair<std::string, int64_t>> batch;
  {
    std::lock_guard lock(mutex_);
    batch.reserve(dirty_.size());
    for (auto& id : dirty_) {
      auto& entry = entries_[id];
      entry.dirty = false;
      batch.emplace_back(std::move(id), entry.last_seen);
    }
    dirty_.clear();
  }
  auto written = store_.touch_devices(batch);
  std::lock_guard lock(mutex_);
  if (!written) {
    for (auto& [id, when] : batch) {
      auto& entry = entries_[id];
      if (!entry.dirty) {
        entry.dirty = true;
        dirty_.push_back(id);
      }
    }
    return make_error(written.error().with_context("writing last_seen of " +
                                                   std::to_string(batch.size()) + " devices"));
  }
  rows_written_ += *written;
  return *written;
}

int64_t DeviceSessions::writes_saved() const {
  std::lock_guard lock(mutex_);
  return seen_count_ - rows_written_;
}

}  // namespace outpost::server
