// Writes of one kind that arrive at the same time, stored together: callers queue items, one
// writer on the worker pool takes what is queued (up to max_group) and stores it in one
// transaction, and each caller is answered after the commit with its own outcome. One commit
// (one fsync) per group instead of one per request is what lets thousands of devices report
// and upload telemetry every second. Used for status reports and telemetry batches.
//
// Thread-safe. `write` runs on one worker at a time, so the store sees one writer.
#pragma once

#include <exception>
#include <functional>
#include <iterator>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include "common/error.h"

namespace outpost::server {

template <typename Item, typename Outcome>
class GroupWriter {
 public:
  using Done = std::function<void(Result<Outcome>)>;  // called once, on a worker thread
  // Stores a group: one outcome per item, in order, or an error for the whole group.
  using Write = std::function<Result<std::vector<Result<Outcome>>>(std::vector<Item>& items)>;

  GroupWriter(std::string what, size_t max_group, Write write)
      : what_(std::move(what)), max_group_(max_group), write_(std::move(write)) {}

  // Queues `item`; starts a writer on `workers` unless one is running.
  void submit(boost::asio::thread_pool& workers, Item item, Done done) {
    {
      std::lock_guard lock(mu_);
      queued_.push_back({std::move(item), std::move(done)});
      if (writing_) return;  // the running writer takes it with its next group
      writing_ = true;
    }
    boost::asio::post(workers, [this] { drain(); });
  }

 private:
  struct Entry {
    Item item;
    Done done;
  };

  // Stores queued groups until the queue is empty.
  void drain() {
    std::vector<Entry> group;
    std::vector<Item> items;
    while (true) {
      group.clear();
      {
        std::lock_guard lock(mu_);
        if (queued_.empty()) {
          writing_ = false;
          return;
        }
        if (queued_.size() <= max_group_) {
          group.swap(queued_);
        } else {
          const auto end = queued_.begin() + static_cast<std::ptrdiff_t>(max_group_);
          group.assign(std::make_move_iterator(queued_.begin()), std::make_move_iterator(end));
          queued_.erase(queued_.begin(), end);
        }
      }
      items.clear();
      for (Entry& e : group) items.push_back(std::move(e.item));
      auto outcomes = [&]() -> Result<std::vector<Result<Outcome>>> {
        try {
          return write_(items);
        } catch (const std::exception& e) {
          return make_error(Errc::kInternal, what_ + ": " + e.what());
        }
      }();
      for (size_t i = 0; i < group.size(); ++i) {
        if (!outcomes) {
          group[i].done(make_error(outcomes.error()));
        } else if (i < outcomes->size()) {
          group[i].done(std::move((*outcomes)[i]));
        } else {
          group[i].done(make_error(Errc::kInternal, what_ + ": no outcome for this write"));
        }
      }
    }
  }

  const std::string what_;
  const size_t max_group_;
  const Write write_;
  std::mutex mu_;
  std::vector<Entry> queued_;  // guarded by mu_
  bool writing_ = false;       // guarded by mu_: a writer is draining queued_
};

}  // namespace outpost::server
