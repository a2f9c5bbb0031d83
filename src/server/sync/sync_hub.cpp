#include "server/sync/sync_hub.h"

#include <atomic>
#include <vector>

#include <boost/asio/steady_timer.hpp>

namespace outpost::server::sync {

struct SyncHub::Waiter {
  explicit Waiter(boost::asio::io_context& io) : timer(io) {}
  boost::asio::steady_timer timer;
  int64_t known = 0;
  Callback callback;
  std::atomic<bool> answered{false};
};

void SyncHub::publish(const std::string& device_id, SignedDesired desired) {
  std::vector<std::shared_ptr<Waiter>> wake;
  {
    std::lock_guard lock(mu_);
    auto& slot = slots_[device_id];
    if (slot.desired && slot.desired->generation >= desired.generation) return;
    slot.desired = desired;
    for (auto it = slot.waiters.begin(); it != slot.waiters.end();) {
      if (it->second->known < desired.generation) {
        wake.push_back(it->second);
        it = slot.waiters.erase(it);
        --waiting_;
      } else {
        ++it;
      }
    }
  }
  for (auto& waiter : wake) {
    if (waiter->answered.exchange(true)) continue;
    waiter->timer.cancel();
    woken_.fetch_add(1, std::memory_order_relaxed);
    waiter->callback(desired);
  }
}

std::optional<SignedDesired> SyncHub::current(const std::string& device_id) const {
  std::lock_guard lock(mu_);
  auto it = slots_.find(device_id);
  if (it == slots_.end()) return std::nullopt;
  return it->second.desired;
}

uint64_t SyncHub::wait(const std::string& device_id, int64_t known, int64_t wait_ms,
                       Callback callback) {
  std::optional<SignedDesired> ready;
  std::shared_ptr<Waiter> waiter;
  uint64_t id = 0;
  {
    std::lock_guard lock(mu_);
    auto& slot = slots_[device_id];
    if (shut_down_) {
      // fall through: answered with nullopt below
    } else if (slot.desired && slot.desired->generation > known) {
      ready = slot.desired;
    } else {
      waiter = std::make_shared<Waiter>(io_);
      waiter->known = known;
      waiter->callback = std::move(callback);
      id = next_waiter_id_++;
      // Armed under the lock so a concurrent publish() cannot cancel a timer not yet armed.
      waiter->timer.expires_after(std::chrono::milliseconds(wait_ms));
      waiter->timer.async_wait([this, device_id, id](const boost::system::error_code& ec) {
        if (ec == boost::asio::error::operation_aborted) return;
        expire(device_id, id);
      });
      slot.waiters.emplace(id, waiter);
      ++waiting_;
    }
  }
  if (!waiter) {
    (ready ? at_once_ : timed_out_).fetch_add(1, std::memory_order_relaxed);
    callback(ready);
  }
  return id;
}

std::shared_ptr<SyncHub::Waiter> SyncHub::take_waiter(const std::string& device_id,
                                                      uint64_t waiter_id) {
  std::lock_guard lock(mu_);
  auto it = slots_.find(device_id);
  if (it == slots_.end()) return nullptr;
  auto w = it->second.waiters.find(waiter_id);
  if (w == it->second.waiters.end()) return nullptr;
  std::shared_ptr<Waiter> waiter = std::move(w->second);
  it->second.waiters.erase(w);
  --waiting_;
  return waiter;
}

void SyncHub::cancel(const std::string& device_id, uint64_t waiter_id) {
  std::shared_ptr<Waiter> waiter = take_waiter(device_id, waiter_id);
  if (!waiter) return;
  if (waiter->answered.exchange(true)) return;
  hung_up_.fetch_add(1, std::memory_order_relaxed);
  waiter->timer.cancel();
  // The callback (and the connection it holds) is released with the waiter.
}

void SyncHub::expire(const std::string& device_id, uint64_t waiter_id) {
  std::shared_ptr<Waiter> waiter = take_waiter(device_id, waiter_id);
  if (!waiter) return;
  if (!waiter->answered.exchange(true)) {
    timed_out_.fetch_add(1, std::memory_order_relaxed);
    waiter->callback(std::nullopt);
  }
}

void SyncHub::shutdown() {
  std::vector<std::shared_ptr<Waiter>> all;
  {
    std::lock_guard lock(mu_);
    shut_down_ = true;
    for (auto& [id, slot] : slots_) {
      for (auto& [wid, waiter] : slot.waiters) all.push_back(waiter);
      slot.waiters.clear();
    }
    waiting_ = 0;
  }
  for (auto& waiter : all) {
    if (waiter->answered.exchange(true)) continue;
    waiter->timer.cancel();
    timed_out_.fetch_add(1, std::memory_order_relaxed);
    waiter->callback(std::nullopt);
  }
}

void SyncHub::release(const std::string& device_id) {
  std::vector<std::shared_ptr<Waiter>> parked;
  {
    std::lock_guard lock(mu_);
    auto it = slots_.find(device_id);
    if (it == slots_.end()) return;
    for (auto& [wid, waiter] : it->second.waiters) parked.push_back(waiter);
    waiting_ -= it->second.waiters.size();
    it->second.waiters.clear();
  }
  for (auto& waiter : parked) {
    if (waiter->answered.exchange(true)) continue;
    waiter->timer.cancel();
    timed_out_.fetch_add(1, std::memory_order_relaxed);
    waiter->callback(std::nullopt);
  }
}

std::vector<std::string> SyncHub::parked_devices() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [id, slot] : slots_) {
    if (!slot.waiters.empty()) out.push_back(id);
  }
  return out;
}

size_t SyncHub::waiting() const {
  std::lock_guard lock(mu_);
  return waiting_;
}

SyncHub::Counts SyncHub::counts() const {
  return {at_once_.load(std::memory_order_relaxed), woken_.load(std::memory_order_relaxed),
          timed_out_.load(std::memory_order_relaxed), hung_up_.load(std::memory_order_relaxed)};
}

}  // namespace outpost::server::sync
