// DeviceSessions: credential checks from memory after the first, last_seen written through
// at most once per interval.
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
    store::Device device;
    device.id = "d-1";
    device.site = "plant-7";
    device.credential_hash = sha256_hex("device-secret");
    device.enrolled_at = 1'000;
    device.last_seen = 1'000;
    ASSERT_TRUE(store_->enroll_device(token.token_hash, 1'000, device).has_value());
  }

  int64_t stored_last_seen() { return store_->get_device("d-1").value().value().last_seen; }

  std::unique_ptr<store::Store> store_;
};

TEST_F(DeviceSessionsTest, VerifiesSecretsAndRefusesOthers) {
  DeviceSessions sessions(*store_, 15'000);
  EXPECT_TRUE(sessions.verify("d-1", "device-secret").has_value());
  EXPECT_TRUE(sessions.verify("d-1", "device-secret").has_value());  // from memory now
  auto wrong = sessions.verify("d-1", "guess");
  ASSERT_FALSE(wrong.has_value());
  EXPECT_EQ(wrong.error().code, Errc::kUnauthenticated);
  auto unknown = sessions.verify("d-2", "device-secret");
  ASSERT_FALSE(unknown.has_value());
  EXPECT_EQ(unknown.error().code, Errc::kUnauthenticated);
}

TEST_F(DeviceSessionsTest, WritesLastSeenAtMostOncePerInterval) {
  DeviceSessions sessions(*store_, 15'000);
  ASSERT_TRUE(sessions.verify("d-1", "device-secret").has_value());
  ASSERT_TRUE(sessions.seen("d-1", 5'000).has_value());  // within 15 s of enrollment
  EXPECT_EQ(stored_last_seen(), 1'000);
  ASSERT_TRUE(sessions.seen("d-1", 16'000).has_value());
  EXPECT_EQ(stored_last_seen(), 16'000);
  for (int64_t t = 17'000; t < 31'000; t += 1'000) ASSERT_TRUE(sessions.seen("d-1", t).has_value());
  EXPECT_EQ(stored_last_seen(), 16'000);
  ASSERT_TRUE(sessions.seen("d-1", 31'000).has_value());
  EXPECT_EQ(stored_last_seen(), 31'000);
  EXPECT_EQ(sessions.touches_skipped(), 15);
}

}  // namespace
}  // namespace outpost::server
