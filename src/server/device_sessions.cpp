#include "server/device_sessions.h"

#include <algorithm>
#include <cstdlib>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/request_signature.h"

namespace outpost::server {

namespace {

Error refused(const std::string& why) { return Error{Errc::kUnauthenticated, why, {}}; }

}  // namespace

Status DeviceSessions::check(Entry& entry, const DeviceProof& proof, int64_t now_ms) {
  if (!crypto::constant_time_equal(entry.credential_hash, sha256_hex(proof.secret))) {
    return make_error(refused("device credential is not valid"));
  }
  if (entry.revoked_at > 0) {
    return make_error(refused("device " + proof.device_id +
                              " was revoked (outpost device revoke); enroll it again to return"));
  }
  if (proof.signature_header.empty()) {
    return make_error(
        refused("missing X-Outpost-Signature: every device call must be signed with the device key "
                "(a bearer credential alone is not enough; upgrade the agent)"));
  }
  auto sig = reqsig::parse(proof.signature_header);
  if (!sig) return make_error(sig.error());
  if (sig->device_id != proof.device_id) {
    return make_error(refused("X-Outpost-Signature: signed by " + sig->device_id +
                              ", but the credential is " + proof.device_id + "'s"));
  }
  if (!reqsig::verify(*sig, entry.public_key, proof.method, proof.target, proof.body)) {
    return make_error(
        refused("X-Outpost-Signature does not verify with the key device " + proof.device_id +
                " enrolled with (request altered on the way, or signed by another key)"));
  }
  if (proof.seq_idempotent) return ok();
  if (sig->time_ms > now_ms + kSignatureWindowMs || sig->time_ms < now_ms - kSignatureWindowMs) {
    const int64_t skew_s = (sig->time_ms - now_ms) / 1000;
    return make_error(refused("X-Outpost-Signature: signed " + std::to_string(std::abs(skew_s)) +
                              " s " + (skew_s > 0 ? "ahead of" : "behind") +
                              " the server's clock, outside the " +
                              std::to_string(kSignatureWindowMs / 1000) +
                              " s window (a replay, or the device clock is off)"));
  }
  if (sig->time_ms < entry.newest_signed - kSignatureReorderMs) {
    return make_error(
        refused("X-Outpost-Signature: older than this device's latest call by more "
                "than " +
                std::to_string(kSignatureReorderMs / 1000) + " s: a replayed request"));
  }
  for (const auto& [t, nonce] : entry.nonces) {
    if (nonce == sig->nonce) {
      return make_error(refused("X-Outpost-Signature: nonce already used: a replayed request"));
    }
  }
  entry.newest_signed = std::max(entry.newest_signed, sig->time_ms);
  const int64_t keep_from = entry.newest_signed - kSignatureReorderMs;
  std::erase_if(entry.nonces, [keep_from](const auto& n) { return n.first < keep_from; });
  entry.nonces.emplace_back(sig->time_ms, std::move(sig->nonce));
  return ok();
}

Status DeviceSessions::verify(const DeviceProof& proof, int64_t now_ms) {
  if (auto known = verify_known(proof, now_ms)) return std::move(*known);
  auto device = store_.get_device(proof.device_id);
  if (!device) return make_error(device.error());
  if (!*device) return make_error(refused("device credential is not valid"));
  auto key = crypto::base64_decode((*device)->public_key);
  if (!key || key->size() != 32) {
    return make_error(Errc::kInternal, "device " + proof.device_id + " has no valid public key");
  }
  std::lock_guard lock(mutex_);
  auto& entry = entries_[proof.device_id];
  entry.credential_hash = (*device)->credential_hash;
  entry.public_key = std::move(*key);
  entry.site = (*device)->site;
  entry.revoked_at = std::max(entry.revoked_at, (*device)->revoked_at);
  entry.last_seen = std::max(entry.last_seen, (*device)->last_seen);
  return check(entry, proof, now_ms);
}

std::optional<Status> DeviceSessions::verify_known(const DeviceProof& proof, int64_t now_ms) {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(proof.device_id);
  if (it == entries_.end() || it->second.credential_hash.empty()) return std::nullopt;
  return check(it->second, proof, now_ms);
}

void DeviceSessions::revoke(const std::string& device_id, int64_t at_ms) {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(device_id);
  if (it != entries_.end()) it->second.revoked_at = at_ms;
}

bool DeviceSessions::revoked(const std::string& device_id) const {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(device_id);
  return it != entries_.end() && it->second.revoked_at > 0;
}

void DeviceSessions::set_via(const std::string& device_id, std::vector<std::string> via) {
  std::lock_guard lock(mutex_);
  auto& entry = entries_[device_id];
  if (entry.via == via) return;
  for (const auto& relay : entry.via) {
    auto b = behind_.find(relay);
    if (b == behind_.end()) continue;
    b->second.erase(device_id);
    if (b->second.empty()) behind_.erase(b);
  }
  for (const auto& relay : via) {
    if (relay != device_id) behind_[relay].insert(device_id);
  }
  entry.via = std::move(via);
}

std::vector<std::string> DeviceSessions::behind(const std::string& relay_id) const {
  std::lock_guard lock(mutex_);
  auto it = behind_.find(relay_id);
  if (it == behind_.end()) return {};
  return {it->second.begin(), it->second.end()};
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
