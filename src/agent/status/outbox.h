// Status reports on their way to the control plane: each is numbered (seq), written to disk
// before it is sent, and sent strictly in order, so a device that was offline for a day
// delivers what happened, in the order it happened, when the link returns.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "agent/identity.h"
#include "common/error.h"

namespace outpost::agent {

class StatusOutbox {
 public:
  struct Options {
    int64_t max_queued = 1'000;  // oldest reports are dropped beyond this (counted in the next)
    int64_t retry_initial_ms = 1'000;
    int64_t retry_max_ms = 60'000;
  };
  // Files live in DIR/outbox/<seq>.json; DIR/outbox/last_seq keeps numbering across restarts.
  StatusOutbox(std::string data_dir, Identity identity, Options options);
  ~StatusOutbox();
  [[nodiscard]] Status init();  // reads the queue left by the last run
  void start();                 // the sender thread
  void stop();

  // Numbers the report ("seq"), persists it and wakes the sender. Returns the seq.
  [[nodiscard]] Result<int64_t> enqueue(nlohmann::json report);
  int64_t pending() const;
  int64_t sent() const { return sent_; }

 private:
  void run();
  std::string file_for(int64_t seq) const;

  std::string dir_;
  Identity identity_;
  Options options_;
  mutable std::mutex mu_;  // guards first_, last_seq_, dropped_
  std::condition_variable cv_;
  int64_t first_ = 1;     // oldest queued seq (== last_seq_ + 1 when empty)
  int64_t last_seq_ = 0;  // newest seq handed out
  int64_t dropped_ = 0;   // reports dropped for the bound since the last one sent
  std::atomic<int64_t> sent_{0};
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace outpost::agent
