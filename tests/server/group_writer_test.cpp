// GroupWriter: what is queued while a group is being written is written together next, each
// caller gets its own outcome, and a failing group fails every caller in it (and only them).
#include "server/group_writer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace outpost::server {
namespace {

TEST(GroupWriter, WritesWhatQueuedMeanwhileAsOneGroupWithOwnOutcomes) {
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  std::vector<std::vector<int>> groups;
  GroupWriter<int, int> writer("writing numbers", 100, [&](std::vector<int>& items) {
    std::unique_lock lock(mu);
    groups.push_back(items);
    // The first group waits until the test has queued the rest behind it.
    cv.wait(lock, [&] { return release || groups.size() > 1; });
    std::vector<Result<int>> out;
    for (int v : items) {
      out.push_back(v < 0 ? Result<int>(make_error(Errc::kInvalidArgument, "negative"))
                          : Result<int>(v * 10));
    }
    return Result<std::vector<Result<int>>>(std::move(out));
  });
  boost::asio::thread_pool workers(4);
  std::atomic<int> answered{0};
  std::vector<Result<int>> answers(6, make_error(Errc::kInternal, "unanswered"));
  auto submit = [&](int i, int value) {
    writer.submit(workers, value, [&, i](Result<int> r) {
      answers[static_cast<size_t>(i)] = std::move(r);
      ++answered;
    });
  };
  submit(0, 1);
  while (true) {
    std::lock_guard lock(mu);
    if (!groups.empty()) break;
  }
  submit(1, 2);
  submit(2, -3);
  submit(3, 4);
  submit(4, 5);
  submit(5, 6);
  {
    std::lock_guard lock(mu);
    release = true;
  }
  cv.notify_all();
  workers.join();
  ASSERT_EQ(answered.load(), 6);
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0], (std::vector<int>{1}));
  EXPECT_EQ(groups[1], (std::vector<int>{2, -3, 4, 5, 6}));  // one group, in order
  EXPECT_EQ(*answers[0], 10);
  EXPECT_EQ(*answers[1], 20);
  ASSERT_FALSE(answers[2].has_value());
  EXPECT_EQ(answers[2].error().message, "negative");
  EXPECT_EQ(*answers[5], 60);
}

TEST(GroupWriter, AGroupThatFailsOrThrowsAnswersEveryCallerInIt) {
  int calls = 0;
  GroupWriter<int, int> writer("writing numbers", 2, [&](std::vector<int>& items) {
    ++calls;
    if (items.front() == 7) throw std::runtime_error("disk on fire");
    return Result<std::vector<Result<int>>>(make_error(Errc::kIo, "disk full"));
  });
  boost::asio::thread_pool workers(1);
  std::vector<std::string> messages(3);
  std::mutex mu;
  for (int i = 0; i < 2; ++i) {
    writer.submit(workers, 1, [&, i](Result<int> r) {
      std::lock_guard lock(mu);
      messages[static_cast<size_t>(i)] = r ? "ok" : r.error().message;
    });
  }
  workers.join();
  boost::asio::thread_pool more(1);
  writer.submit(more, 7, [&](Result<int> r) {
    std::lock_guard lock(mu);
    messages[2] = r ? "ok" : r.error().message;
  });
  more.join();
  EXPECT_EQ(messages[0], "disk full");
  EXPECT_EQ(messages[1], "disk full");
  EXPECT_EQ(messages[2], "writing numbers: disk on fire");
}

}  // namespace
}  // namespace outpost::server
