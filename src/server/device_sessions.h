// What the hot device-sync path needs to know about enrolled devices, kept in memory so a
// sync costs no store read and no store write: credentials are checked from memory after
// the first sync, and last_seen is batched and written by flush() in one transaction.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/error.h"
#include "store/store.h"

namespace outpost::server {

// What a device call presents: its bearer credential and its request signature
// (common/request_signature.h) over the request as received.
struct DeviceProof {
  std::string device_id;
  std::string secret;            // after "<device id>." in the bearer credential
  std::string signature_header;  // X-Outpost-Signature
  std::string_view method;
  std::string_view target;  // path and query as received
  std::string_view body;
  // Status and telemetry uploads: the server's per-device seq already makes a replay a no-op
  // (acked as a duplicate), and a relay forwards them late from its backlog, so their
  // signatures are checked but not their age or nonce.
  bool seq_idempotent = false;
};

// How far a signature's time may be from the server's clock, and how far a device's
// requests may arrive out of order (its clients sign in parallel).
inline constexpr int64_t kSignatureWindowMs = 5 * 60'000;
inline constexpr int64_t kSignatureReorderMs = 30'000;

class DeviceSessions {
 public:
  explicit DeviceSessions(store::Store& store) : store_(store) {}

  // Checks a device call: the credential secret (constant time), that the device is not
  // revoked, and its request signature with the device's enrolled key, inside the window,
  // with a nonce not seen before. The store is read the first time a device is seen
  // (credentials and keys never change once issued); unknown devices are read every time.
  // Errors: kUnauthenticated saying which check failed; store errors.
  [[nodiscard]] Status verify(const DeviceProof& proof, int64_t now_ms);

  // verify() from memory alone: nullopt when the device is not in memory yet (verify() must
  // read the store). Never blocks on the store, so it may run on an I/O thread.
  [[nodiscard]] std::optional<Status> verify_known(const DeviceProof& proof, int64_t now_ms);

  // Refuses the device from now on (memory; the caller writes the store first).
  void revoke(const std::string& device_id, int64_t at_ms);
  bool revoked(const std::string& device_id) const;

  // Relays a device's calls came through, nearest the device first (X-Outpost-Via of its
  // last authenticated call). A relay may fetch the blobs of the devices behind it.
  void set_via(const std::string& device_id, std::vector<std::string> via);
  // Devices whose last call came through `relay_id` (directly or further down a chain).
  std::vector<std::string> behind(const std::string& relay_id) const;

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
    std::string public_key;  // raw 32 bytes
    std::string site;
    int64_t last_seen = 0;
    int64_t revoked_at = 0;
    bool dirty = false;
    // Replay defence: the latest signature time accepted, and the nonces accepted within
    // kSignatureReorderMs of it (a handful per device).
    int64_t newest_signed = 0;
    std::vector<std::pair<int64_t, std::string>> nonces;
    std::vector<std::string> via;
  };
  // The checks after the entry is known; mutex_ held.
  Status check(Entry& entry, const DeviceProof& proof, int64_t now_ms);
  store::Store& store_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::set<std::string>>
      behind_;              // relay → devices; GUARDED_BY(mutex_)
  std::mutex flush_mutex_;  // one flush at a time, so times reach the store in order
  std::unordered_map<std::string, Entry> entries_;  // GUARDED_BY(mutex_)
  std::vector<std::string> dirty_;                  // GUARDED_BY(mutex_)
  int64_t seen_count_ = 0;                          // GUARDED_BY(mutex_)
  int64_t rows_written_ = 0;                        // GUARDED_BY(mutex_)
};

}  // namespace outpost::server
