// Signed release metadata (common/release_meta): thresholds, root chains, and each attack the
// device refuses, checked on documents made here with keys made here.
#include "common/release_meta.h"

#include <gtest/gtest.h>

#include "common/crypto.h"
#include "common/digest.h"

namespace outpost::release {
namespace {

constexpr int64_t kNow = 1'800'000'000'000;  // 2027-01-15
constexpr int64_t kDay = 24LL * 3600 * 1000;

struct Keys {
  std::vector<crypto::Ed25519KeyPair> root;
  crypto::Ed25519KeyPair online;
};

Keys make_keys(int n) {
  crypto::init();
  Keys k;
  for (int i = 0; i < n; ++i) k.root.push_back(crypto::ed25519_generate());
  k.online = crypto::ed25519_generate();
  return k;
}

Root root_of(const Keys& k, int64_t version, int threshold) {
  Root r;
  r.version = version;
  r.expires_ms = kNow + 365 * kDay;
  RoleKeys role;
  role.threshold = threshold;
  for (const auto& key : k.root) {
    r.keys[key_id(key.public_key)] = key.public_key;
    role.keyids.push_back(key_id(key.public_key));
  }
  const std::string online = key_id(k.online.public_key);
  r.keys[online] = k.online.public_key;
  r.roles["root"] = role;
  r.roles["targets"] = {{online}, 1};
  r.roles["timestamp"] = {{online}, 1};
  return r;
}

std::vector<std::string> secrets(const Keys& k, size_t count) {
  std::vector<std::string> out;
  for (size_t i = 0; i < count && i < k.root.size(); ++i) out.push_back(k.root[i].secret_key);
  return out;
}

std::string targets_doc(const Keys& k, int64_t version, int64_t expires,
                        std::map<std::string, int64_t> list) {
  Targets t{version, expires, std::move(list)};
  return sign_document(targets_signed(t), {k.online.secret_key});
}

std::string timestamp_doc(const Keys& k, int64_t version, int64_t expires,
                          const std::string& targets_text, int64_t targets_version) {
  Timestamp t{version, expires, targets_version, sha256_hex(targets_text),
              static_cast<int64_t>(targets_text.size())};
  return sign_document(timestamp_signed(t), {k.online.secret_key});
}

const std::string kDigest = "sha256:" + std::string(64, 'a');

TEST(ReleaseMetaTest, RootNeedsItsThresholdOfDistinctKeys) {
  Keys k = make_keys(3);
  const Root r = root_of(k, 1, 2);
  EXPECT_TRUE(verify_first_root(sign_document(root_signed(r), secrets(k, 2))));
  auto one = verify_first_root(sign_document(root_signed(r), secrets(k, 1)));
  ASSERT_FALSE(one);
  EXPECT_NE(one.error().message.find("has 1 valid signature(s)"), std::string::npos)
      << one.error().message;
  // The same key twice counts once.
  auto twice = verify_first_root(
      sign_document(root_signed(r), {k.root[0].secret_key, k.root[0].secret_key}));
  EXPECT_FALSE(twice);
  // The online key cannot sign for the root role.
  auto online =
      verify_first_root(sign_document(root_signed(r), {k.root[0].secret_key, k.online.secret_key}));
  EXPECT_FALSE(online);
}

TEST(ReleaseMetaTest, NextRootNeedsTheOldAndTheNewKeysAndTheNextVersion) {
  Keys old_keys = make_keys(3);
  const Root v1 = root_of(old_keys, 1, 2);
  Keys new_keys = make_keys(3);
  new_keys.online = old_keys.online;
  const Root v2 = root_of(new_keys, 2, 2);
  auto both = secrets(old_keys, 2);
  for (auto& s : secrets(new_keys, 2)) both.push_back(s);
  auto ok_root = verify_next_root(v1, sign_document(root_signed(v2), both));
  ASSERT_TRUE(ok_root) << ok_root.error().message;
  EXPECT_EQ(ok_root->version, 2);
  // Only the new keys: a stolen-or-made key set cannot take over.
  EXPECT_FALSE(verify_next_root(v1, sign_document(root_signed(v2), secrets(new_keys, 3))));
  // Only the old keys: trust is not handed to keys nobody proved to hold.
  EXPECT_FALSE(verify_next_root(v1, sign_document(root_signed(v2), secrets(old_keys, 3))));
  // A version that skips or repeats.
  Root v3 = v2;
  v3.version = 3;
  auto skip = verify_next_root(v1, sign_document(root_signed(v3), both));
  ASSERT_FALSE(skip);
  EXPECT_NE(skip.error().message.find("does not follow version 1"), std::string::npos);
}

TEST(ReleaseMetaTest, TimestampRefusesForgeryRollbackAndFreeze) {
  Keys k = make_keys(1);
  const Root r = root_of(k, 1, 1);
  const std::string tg = targets_doc(k, 4, kNow + 30 * kDay, {{kDigest, 10}});
  auto ts = verify_timestamp(r, timestamp_doc(k, 7, kNow + kDay, tg, 4), std::nullopt, kNow);
  ASSERT_TRUE(ts) << ts.error().message;

  auto rollback = verify_timestamp(r, timestamp_doc(k, 6, kNow + kDay, tg, 4), *ts, kNow);
  ASSERT_FALSE(rollback);
  EXPECT_NE(rollback.error().message.find("rollback refused"), std::string::npos);

  auto freeze = verify_timestamp(r, timestamp_doc(k, 8, kNow - 1, tg, 4), *ts, kNow);
  ASSERT_FALSE(freeze);
  EXPECT_NE(freeze.error().message.find("freeze refused"), std::string::npos);

  // Signed by a key root does not give the role.
  Keys other = make_keys(1);
  auto forged = verify_timestamp(r, timestamp_doc(other, 9, kNow + kDay, tg, 4), *ts, kNow);
  ASSERT_FALSE(forged);
  EXPECT_NE(forged.error().message.find("signature refused"), std::string::npos);

  // Edited after signing.
  std::string edited = timestamp_doc(k, 9, kNow + kDay, tg, 4);
  edited.replace(edited.find("\"version\":9"), 11, "\"version\":99");
  EXPECT_FALSE(verify_timestamp(r, edited, *ts, kNow));
}

TEST(ReleaseMetaTest, TargetsMustBeTheOneTheTimestampNames) {
  Keys k = make_keys(1);
  const Root r = root_of(k, 1, 1);
  const std::string tg_old = targets_doc(k, 3, kNow + 30 * kDay, {{kDigest, 10}});
  const std::string tg = targets_doc(k, 4, kNow + 30 * kDay, {{kDigest, 10}});
  auto ts = verify_timestamp(r, timestamp_doc(k, 7, kNow + kDay, tg, 4), std::nullopt, kNow);
  ASSERT_TRUE(ts);
  auto good = verify_targets(r, *ts, tg, std::nullopt, kNow);
  ASSERT_TRUE(good) << good.error().message;
  EXPECT_EQ(good->targets.at(kDigest), 10);

  auto mix = verify_targets(r, *ts, tg_old, std::nullopt, kNow);
  ASSERT_FALSE(mix);
  EXPECT_NE(mix.error().message.find("mix-and-match refused"), std::string::npos);

  auto endless = verify_targets(r, *ts, tg + std::string(100, ' '), std::nullopt, kNow);
  ASSERT_FALSE(endless);
  EXPECT_NE(endless.error().message.find("endless data refused"), std::string::npos);

  // A timestamp naming an older targets version than the device trusts.
  Targets trusted{5, kNow + kDay, {}};
  auto back = verify_targets(r, *ts, tg, trusted, kNow);
  ASSERT_FALSE(back);
  EXPECT_NE(back.error().message.find("rollback refused"), std::string::npos);

  // Expired targets, even when the timestamp is fresh.
  const std::string tg_expired = targets_doc(k, 4, kNow - 1, {});
  auto ts2 = verify_timestamp(r, timestamp_doc(k, 8, kNow + kDay, tg_expired, 4), *ts, kNow);
  ASSERT_TRUE(ts2);
  auto frozen = verify_targets(r, *ts2, tg_expired, std::nullopt, kNow);
  ASSERT_FALSE(frozen);
  EXPECT_NE(frozen.error().message.find("freeze refused"), std::string::npos);
}

TEST(ReleaseMetaTest, ParseRefusalsNameTheField) {
  EXPECT_FALSE(
      parse_envelope(std::string(kMaxTimestampBytes + 1, ' '), kTimestamp, kMaxTimestampBytes));
  auto wrong_type = parse_envelope(R"({"signed":{"_type":"targets"},"signatures":[]})", kTimestamp,
                                   kMaxTimestampBytes);
  ASSERT_FALSE(wrong_type);
  EXPECT_EQ(wrong_type.error().field, "timestamp metadata.signed._type");
  auto env = parse_envelope(
      R"({"signed":{"_type":"targets","version":1,"expires":"2027-13-01T00:00:00Z","targets":{}},"signatures":[]})",
      kTargets, kMaxTargetsBytes);
  ASSERT_TRUE(env);
  auto t = targets_from(*env);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().field, "targets metadata.signed.expires");
  EXPECT_FALSE(parse_envelope(std::string(2000, '['), kRoot, kMaxRootBytes));
  auto time = parse_time("2027-01-31T12:00:00Z");
  ASSERT_TRUE(time);
  EXPECT_EQ(format_time(*time), "2027-01-31T12:00:00Z");
}

}  // namespace
}  // namespace outpost::release
