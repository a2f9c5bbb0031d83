// The relay's store-and-forward queue: durable order per child, the byte bound, a restart that
// resumes where it was, and damaged files set aside rather than forwarded.
#include "agent/relay/backlog.h"

#include <gtest/gtest.h>

#include <fstream>

#include "common/durable_file.h"
#include "test_support.h"

namespace outpost::agent::relay {
namespace {

using test_support::TempDir;

BacklogEntry upload(const std::string& device, const std::string& body) {
  BacklogEntry e;
  e.device = device;
  e.path = "/api/v1/device/status";
  e.content_type = "application/json";
  e.authorization = "Bearer " + device + ".secret";
  e.via = "d-relay";
  e.body = body;
  return e;
}

std::vector<std::string> drain(Backlog& backlog, const std::string& device) {
  std::vector<std::string> out;
  for (;;) {
    auto front = backlog.front(device);
    EXPECT_TRUE(front.has_value());
    if (!front || !*front) return out;
    out.push_back((*front)->body);
    backlog.pop(device);
  }
}

TEST(RelayBacklog, KeepsEachChildsOrderAndEveryField) {
  TempDir dir;
  Backlog backlog(dir.file("backlog"), 1 << 20);
  ASSERT_TRUE(backlog.load().has_value());
  ASSERT_TRUE(backlog.push(upload("d-aa", "a1")).has_value());
  ASSERT_TRUE(backlog.push(upload("d-bb", "b1")).has_value());
  BacklogEntry binary = upload("d-aa", std::string("\0zstd\n\xff", 7));
  binary.path = "/api/v1/device/telemetry";
  binary.content_encoding = "zstd";
  ASSERT_TRUE(backlog.push(binary).has_value());
  EXPECT_EQ(backlog.devices(), (std::vector<std::string>{"d-aa", "d-bb"}));
  EXPECT_EQ(backlog.stats().entries, 3);

  auto first = backlog.front("d-aa");
  ASSERT_TRUE(first && *first);
  EXPECT_EQ((*first)->authorization, "Bearer d-aa.secret");
  EXPECT_EQ((*first)->via, "d-relay");
  backlog.pop("d-aa");
  auto second = backlog.front("d-aa");
  ASSERT_TRUE(second && *second);
  EXPECT_EQ((*second)->body, std::string("\0zstd\n\xff", 7));  // bytes exactly
  EXPECT_EQ((*second)->content_encoding, "zstd");
  EXPECT_EQ((*second)->path, "/api/v1/device/telemetry");
  backlog.pop("d-aa");
  EXPECT_EQ(backlog.devices(), (std::vector<std::string>{"d-bb"}));
  EXPECT_EQ(drain(backlog, "d-bb"), (std::vector<std::string>{"b1"}));
  EXPECT_EQ(backlog.stats().entries, 0);
  EXPECT_EQ(backlog.stats().bytes, 0);
  EXPECT_TRUE(list_directory(dir.file("backlog")).empty());  // popped means deleted
}

TEST(RelayBacklog, ARestartResumesTheSameOrder) {
  TempDir dir;
  {
    Backlog backlog(dir.file("backlog"), 1 << 20);
    ASSERT_TRUE(backlog.load().has_value());
    for (int i = 0; i < 12; ++i) {
      ASSERT_TRUE(
          backlog.push(upload(i % 2 ? "d-bb" : "d-aa", "m" + std::to_string(i))).has_value());
    }
    backlog.pop("d-aa");  // m0 went upstream before the "crash"
  }
  Backlog again(dir.file("backlog"), 1 << 20);
  ASSERT_TRUE(again.load().has_value());
  EXPECT_EQ(again.stats().entries, 11);
  EXPECT_EQ(drain(again, "d-aa"), (std::vector<std::string>{"m2", "m4", "m6", "m8", "m10"}));
  EXPECT_EQ(drain(again, "d-bb"), (std::vector<std::string>{"m1", "m3", "m5", "m7", "m9", "m11"}));
  // New entries after a restart come after the old ones.
  ASSERT_TRUE(again.push(upload("d-aa", "after")).has_value());
  EXPECT_EQ(drain(again, "d-aa"), (std::vector<std::string>{"after"}));
}

TEST(RelayBacklog, RefusesWhatWouldPassTheBoundWithAReason) {
  TempDir dir;
  Backlog backlog(dir.file("backlog"), 8 * 1024);
  ASSERT_TRUE(backlog.load().has_value());
  int stored = 0;
  Status last;
  for (int i = 0; i < 20; ++i) {
    last = backlog.push(upload("d-aa", std::string(1000, 'x')));
    if (!last) break;
    ++stored;
  }
  ASSERT_FALSE(last.has_value());
  EXPECT_EQ(last.error().code, Errc::kUnavailable);  // retryable: the child keeps it
  EXPECT_NE(last.error().message.find("backlog is full"), std::string::npos);
  EXPECT_GT(stored, 3);
  EXPECT_LE(backlog.stats().bytes, 8 * 1024);
  backlog.pop("d-aa");
  EXPECT_TRUE(backlog.push(upload("d-aa", std::string(1000, 'y'))).has_value());
}

TEST(RelayBacklog, DamagedFilesAreSetAsideNotForwarded) {
  TempDir dir;
  {
    Backlog backlog(dir.file("backlog"), 1 << 20);
    ASSERT_TRUE(backlog.load().has_value());
    ASSERT_TRUE(backlog.push(upload("d-aa", "good")).has_value());
    ASSERT_TRUE(backlog.push(upload("d-aa", "will be cut")).has_value());
  }
  // Truncate the second file: its body no longer has the length its header says.
  std::string second;
  for (const auto& name : list_directory(dir.file("backlog"))) {
    if (name > second) second = name;
  }
  auto text = outpost::read_file(dir.file("backlog/" + second));
  ASSERT_TRUE(text.has_value());
  ASSERT_TRUE(write_file_durably(dir.file("backlog/" + second), text->substr(0, text->size() - 3))
                  .has_value());
  std::ofstream(dir.file("backlog/00000000000000000099.req.tmp.1")) << "half a write";
  Backlog again(dir.file("backlog"), 1 << 20);
  ASSERT_TRUE(again.load().has_value());
  EXPECT_EQ(again.stats().unreadable, 1);
  EXPECT_EQ(drain(again, "d-aa"), (std::vector<std::string>{"good"}));
  auto names = list_directory(dir.file("backlog"));
  ASSERT_EQ(names.size(), 1u);  // the .bad file; the temp file is gone
  EXPECT_TRUE(names[0].ends_with(".bad"));
}

}  // namespace
}  // namespace outpost::agent::relay
