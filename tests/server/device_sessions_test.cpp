// DeviceSessions: credential and signature checks (from memory after the first), replay and
// revocation refusals, the relay topology; last_seen batched in memory and written by flush()
// in one transaction.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/request_signature.h"
#include "server/device_sessions.h"
#include "store/store.h"

#include <deque>
#include <map>

namespace outpost::server {
namespace {

class DeviceSessionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    crypto::init();
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
      keys_[id] = crypto::ed25519_generate();
      device.public_key = crypto::base64_encode(keys_[id].public_key);
      device.enrolled_at = 1'000;
      device.last_seen = 1'000;
      ASSERT_TRUE(store_->enroll_device(token.token_hash, 1'000, device).has_value());
    }
  }

  // A call as device `signer` signs it, presenting `id`'s credential secret `secret`.
  DeviceProof proof(const std::string& id, const std::string& secret, int64_t signed_at,
                    const std::string& signer = {}, const std::string& target = "/api/v1/x") {
    const std::string& by = signer.empty() ? id : signer;
    DeviceProof p;
    p.device_id = id;
    p.secret = secret;
    p.method = "GET";
    targets_.push_back(target);
    p.target = targets_.back();
    p.body = "";
    headers_.push_back(reqsig::sign(by, keys_[by].secret_key, signed_at, "GET", target, ""));
    p.signature_header = headers_.back();
    return p;
  }
  DeviceProof good(const std::string& id, int64_t signed_at = kNow) {
    return proof(id, id + "-secret", signed_at);
  }

  static constexpr int64_t kNow = 1'800'000'000'000;
  int64_t stored_last_seen(const std::string& id) {
    return store_->get_device(id).value().value().last_seen;
  }

  std::unique_ptr<store::Store> store_;
  std::map<std::string, crypto::Ed25519KeyPair> keys_;
  std::deque<std::string> headers_;  // the proofs point into these
  std::deque<std::string> targets_;
};

TEST_F(DeviceSessionsTest, VerifiesSecretsAndRefusesOthers) {
  DeviceSessions sessions(*store_);
  EXPECT_TRUE(sessions.verify(good("d-1"), kNow).has_value());
  EXPECT_TRUE(sessions.verify(good("d-1"), kNow).has_value());  // from memory now
  auto wrong = sessions.verify(proof("d-1", "d-2-secret", kNow), kNow);
  ASSERT_FALSE(wrong.has_value());
  EXPECT_EQ(wrong.error().code, Errc::kUnauthenticated);
  auto unknown = sessions.verify(proof("d-3", "d-1-secret", kNow, "d-1"), kNow);
  ASSERT_FALSE(unknown.has_value());
  EXPECT_EQ(unknown.error().code, Errc::kUnauthenticated);
}

TEST_F(DeviceSessionsTest, VerifiesFromMemoryOnlyDevicesItHasSeen) {
  DeviceSessions sessions(*store_);
  EXPECT_FALSE(sessions.verify_known(good("d-1"), kNow).has_value());  // the store would tell
  ASSERT_TRUE(sessions.verify(good("d-1"), kNow).has_value());
  auto known = sessions.verify_known(good("d-1"), kNow);
  ASSERT_TRUE(known.has_value());
  EXPECT_TRUE(known->has_value());
  auto wrong = sessions.verify_known(proof("d-1", "d-2-secret", kNow), kNow);
  ASSERT_TRUE(wrong.has_value());
  ASSERT_FALSE(wrong->has_value());
  EXPECT_EQ(wrong->error().code, Errc::kUnauthenticated);
  EXPECT_FALSE(sessions.verify_known(good("d-2"), kNow).has_value());
}

TEST_F(DeviceSessionsTest, ABearerCredentialAloneIsNotEnough) {
  DeviceSessions sessions(*store_);
  DeviceProof unsigned_call = good("d-1");
  unsigned_call.signature_header.clear();
  auto missing = sessions.verify(unsigned_call, kNow);
  ASSERT_FALSE(missing.has_value());
  EXPECT_THAT(missing.error().message, ::testing::HasSubstr("missing X-Outpost-Signature"));

  // d-2's key signing a call that presents d-1's stolen credential.
  DeviceProof stolen = proof("d-1", "d-1-secret", kNow, "d-2");
  auto other = sessions.verify(stolen, kNow);
  ASSERT_FALSE(other.has_value());
  EXPECT_THAT(other.error().message, ::testing::HasSubstr("signed by d-2"));

  // A signature made for another request (target changed on the way).
  DeviceProof altered = good("d-1");
  altered.target = "/api/v1/artifacts/sha256:00";
  auto changed = sessions.verify(altered, kNow);
  ASSERT_FALSE(changed.has_value());
  EXPECT_THAT(changed.error().message, ::testing::HasSubstr("does not verify"));
}

TEST_F(DeviceSessionsTest, RefusesReplaysAndStaleSignatures) {
  DeviceSessions sessions(*store_);
  DeviceProof call = good("d-1");
  ASSERT_TRUE(sessions.verify(call, kNow).has_value());
  auto replay = sessions.verify(call, kNow + 1'000);
  ASSERT_FALSE(replay.has_value());
  EXPECT_THAT(replay.error().message, ::testing::HasSubstr("nonce already used"));

  auto stale = sessions.verify(good("d-1", kNow - kSignatureWindowMs - 1'000), kNow);
  ASSERT_FALSE(stale.has_value());
  EXPECT_THAT(stale.error().message, ::testing::HasSubstr("behind the server's clock"));
  auto ahead = sessions.verify(good("d-1", kNow + kSignatureWindowMs + 1'000), kNow);
  ASSERT_FALSE(ahead.has_value());
  EXPECT_THAT(ahead.error().message, ::testing::HasSubstr("ahead of the server's clock"));

  // Calls signed in parallel may arrive a little out of order, not much.
  ASSERT_TRUE(sessions.verify(good("d-1", kNow + 60'000), kNow + 60'000).has_value());
  EXPECT_TRUE(sessions.verify(good("d-1", kNow + 50'000), kNow + 60'000).has_value());
  auto old = sessions.verify(good("d-1", kNow + 20'000), kNow + 60'000);
  ASSERT_FALSE(old.has_value());
  EXPECT_THAT(old.error().message, ::testing::HasSubstr("replayed request"));

  // Uploads are made idempotent by their seq: a relay's backlog may deliver them late.
  DeviceProof late = good("d-1", kNow - 3'600'000);
  late.seq_idempotent = true;
  EXPECT_TRUE(sessions.verify(late, kNow + 60'000).has_value());
}

TEST_F(DeviceSessionsTest, RevokedDevicesAreRefusedAtOnceAndAfterARestart) {
  DeviceSessions sessions(*store_);
  ASSERT_TRUE(sessions.verify(good("d-1"), kNow).has_value());
  ASSERT_TRUE(store_->set_device_revoked("d-1", kNow).has_value());
  sessions.revoke("d-1", kNow);
  EXPECT_TRUE(sessions.revoked("d-1"));
  auto refused = sessions.verify(good("d-1"), kNow);
  ASSERT_FALSE(refused.has_value());
  EXPECT_THAT(refused.error().message, ::testing::HasSubstr("was revoked"));

  DeviceSessions restarted(*store_);  // reads revoked_at from the store
  auto again = restarted.verify(good("d-1"), kNow);
  ASSERT_FALSE(again.has_value());
  EXPECT_THAT(again.error().message, ::testing::HasSubstr("was revoked"));
  EXPECT_TRUE(restarted.verify(good("d-2"), kNow).has_value());
}

TEST_F(DeviceSessionsTest, KnowsWhichDevicesAreBehindARelay) {
  DeviceSessions sessions(*store_);
  sessions.set_via("d-2", {"d-1"});
  EXPECT_THAT(sessions.behind("d-1"), ::testing::ElementsAre("d-2"));
  sessions.set_via("d-2", {});  // now direct
  EXPECT_TRUE(sessions.behind("d-1").empty());
  sessions.set_via("d-2", {"d-9", "d-1"});
  EXPECT_THAT(sessions.behind("d-9"), ::testing::ElementsAre("d-2"));
  EXPECT_THAT(sessions.behind("d-1"), ::testing::ElementsAre("d-2"));
}

TEST_F(DeviceSessionsTest, KnowsTheSiteOfAVerifiedDevice) {
  DeviceSessions sessions(*store_);
  EXPECT_EQ(sessions.site("d-1"), "");  // not seen yet
  ASSERT_TRUE(sessions.verify(good("d-1"), kNow).has_value());
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
