// Device sync state held in memory: each device's current desired-state generation and its
// signed document, plus the long-poll waiters parked on it. A parked request costs a timer
// entry, not a thread; publishing a new generation wakes exactly the waiters behind it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/asio/io_context.hpp>

namespace outpost::server::sync {

// What a device receives: the exact body bytes and their Ed25519 signature (base64).
struct SignedDesired {
  int64_t generation = 0;
  std::shared_ptr<const std::string> body;
  std::string signature;
};

// Thread-safe: every method may be called from any thread. Guarded by mu_.
class SyncHub {
 public:
  using Callback = std::function<void(std::optional<SignedDesired>)>;  // nullopt: timed out

  explicit SyncHub(boost::asio::io_context& io) : io_(io) {}

  // Records a device's current document; wakes waiters whose known generation is older.
  // A publish with a generation not newer than the held one is ignored.
  void publish(const std::string& device_id, SignedDesired desired);
  std::optional<SignedDesired> current(const std::string& device_id) const;

  // Calls back at once when the device's generation is newer than `known`, else parks the
  // request until a newer one is published (callback with it) or `wait_ms` passes
  // (callback with nullopt). The callback runs on an I/O thread or the publishing thread.
  // Returns the parked request's id for cancel(), or 0 when it was answered at once.
  uint64_t wait(const std::string& device_id, int64_t known, int64_t wait_ms, Callback callback);

  // Drops a parked request without answering it (its client hung up). No-op when it was
  // answered already.
  void cancel(const std::string& device_id, uint64_t waiter_id);

  // Answers the device's parked requests at once with nullopt (a revoked device: its
  // callbacks then refuse it).
  void release(const std::string& device_id);

  // Answers every parked request with nullopt and refuses new waits (server stopping).
  void shutdown();

  size_t waiting() const;
  // Devices with a parked request now (a replica back on the database re-reads these).
  std::vector<std::string> parked_devices() const;

  // Answers given since start, by kind (for /metrics).
  struct Counts {
    int64_t at_once = 0;    // newer state already there
    int64_t woken = 0;      // parked, then a publish answered it
    int64_t timed_out = 0;  // parked until wait_ms passed (or shutdown)
    int64_t hung_up = 0;    // parked, then the client went away (not answered)
  };
  Counts counts() const;

 private:
  struct Waiter;
  struct DeviceSlot {
    std::optional<SignedDesired> desired;
    std::map<uint64_t, std::shared_ptr<Waiter>> waiters;
  };
  void expire(const std::string& device_id, uint64_t waiter_id);
  // Removes a parked waiter from its slot; nullptr when it is gone already.
  std::shared_ptr<Waiter> take_waiter(const std::string& device_id, uint64_t waiter_id);

  boost::asio::io_context& io_;
  mutable std::mutex mu_;
  std::unordered_map<std::string, DeviceSlot> slots_;  // GUARDED_BY(mu_)
  uint64_t next_waiter_id_ = 1;                        // GUARDED_BY(mu_)
  size_t waiting_ = 0;                                 // GUARDED_BY(mu_)
  bool shut_down_ = false;                             // GUARDED_BY(mu_)
  std::atomic<int64_t> at_once_{0}, woken_{0}, timed_out_{0}, hung_up_{0};
};

}  // namespace outpost::server::sync
