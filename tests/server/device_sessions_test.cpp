// DeviceSessions: credential checks from memory after the first; last_seen batched in memory
// and written by flush() in one transaction.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/digest.h"
#include "server/device_sessions.h"
#include "store/store.h"

namespace outpost::server {
namespace {

class DeviceSessionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = store::open_memory_store();
    ASSERT_TRUE(opened.has_value()) << opened.error().message;
    store_ = std::move(*opened);
    store::EnrollmentToken token;
    token.id = "et-1";
    token.token_hash = sha256_hex("enroll-secret");
    token.site = "plant-7";
    ASSERT_TRUE(store_->put_enrollment_token(token).has_value());
    for (const char* id : {"d-1", "d-2"}) {
      store::Device device;
      device.id = id;
      device.site = "plant-7";
      device.credential_hash = sha256_hex(std::string(id) + "-secret");
      device.enrolled_at = 1'000;
      device.last_seen = 1'000;
      ASSERT_TRUE(store_->enroll_device(token.token_hash, 1'000, device).has_value());
    }
  }

  int64_t stored_last_seen(const std::string& id) {
    return store_->get_device(id).value().value().last_seen;
  }

  std::unique_ptr<store::Store> store_;
};

TEST_F(DeviceSessionsTest, VerifiesSecretsAndRefusesOthers) {
  DeviceSessions sessions(*store_);
  EXPECT_TRUE(sessions.verify("d-1", "d-1-secret").has_value());
  EXPECT_TRUE(sessions.verify("d-1", "d-1-secret").has_value());  // from memory now
  auto wrong = sessions.verify("d-1", "d-2-secret");
  ASSERT_FALSE(wrong.has_value());
  EXPECT_EQ(wrong.error().code, Errc::kUnauthenticated);
  auto unknown = sessions.verify("d-3", "d-1-secret");
  ASSERT_FALSE(unknown.has_value());
  EXPECT_EQ(unknown.error().code, Errc::kUnauthenticated);
}

TEST_F(DeviceSessionsTest, VerifiesFromMemoryOnlyDevicesItHasSeen) {
  DeviceSessions sessions(*store_);
  EXPECT_FALSE(sessions.verify_known("d-1", "d-1-secret").has_value());  // the store would tell
  ASSERT_TRUE(sessions.verify("d-1", "d-1-secret").has_value());
  auto known = sessions.verify_known("d-1", "d-1-secret");
  ASSERT_TRUE(known.has_value());
  EXPECT_TRUE(known->has_value());
  auto wrong = sessions.verify_known("d-1", "d-2-secret");
  ASSERT_TRUE(wrong.has_value());
  ASSERT_FALSE(wrong->has_value());
  EXPECT_EQ(wrong->error().code, Errc::kUnauthenticated);
  EXPECT_FALSE(sessions.verify_known("d-2", "d-2-secret").has_value());
}

TEST_F(DeviceSessionsTest, KnowsTheSiteOfAVerifiedDevice) {
  DeviceSessions sessions(*store_);
  EXPECT_EQ(sessions.site("d-1"), "");  // not seen yet
  ASSERT_TRUE(sessions.verify("d-1", "d-1-secret").has_value());
  EXPECT_EQ(sessions.site("d-1"), "plant-7");
  EXPECT_EQ(sessions.site("d-2"), "");
}

TEST_F(DeviceSessionsTest, LastSeenIsBatchedUntilFlush) {
  DeviceSessions sessions(*store_);
  for (int64_t t = 2'000; t <= 10'000; t += 1'000) sessions.seen("d-1", t);
  sessions.seen("d-2", 4'000);
  sessions.seen("d-1", 5'000);  // a late request: last_seen must not go back
  EXPECT_EQ(stored_last_seen("d-1"), 1'000) << "seen() must not write";
  auto written = sessions.flush();
  ASSERT_TRUE(written.has_value()) << written.error().message;
  EXPECT_EQ(*written, 2);
  EXPECT_EQ(stored_last_seen("d-1"), 10'000);
  EXPECT_EQ(stored_last_seen("d-2"), 4'000);
  EXPECT_EQ(sessions.writes_saved(), 11 - 2);
  EXPECT_EQ(sessions.flush().value(), 0) << "nothing new to write";
  sessions.seen("gone", 12'000);  // a device deleted meanwhile is skipped, not an error
  EXPECT_EQ(sessions.flush().value(), 0);
}

}  // namespace
}  // namespace outpost::server
