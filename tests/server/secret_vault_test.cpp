// Secrets on the control plane (issue 18): encrypted at rest (the database file never holds a
// value), opened only with the master key, and delivered to each device sealed to its own key at
// the top level of its desired document, without moving its generation on every reconcile.
#include "server/secrets/secret_vault.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include "common/crypto.h"
#include "common/digest.h"
#include "server/deployments/manifest.h"
#include "server/desired_states.h"
#include "server/sync/sync_hub.h"
#include "store/store.h"

namespace outpost::server {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

#define ASSERT_OK(expr)                                           \
  do {                                                            \
    auto assert_ok_result_ = (expr);                              \
    ASSERT_TRUE(assert_ok_result_.has_value())                    \
        << #expr << ": " << assert_ok_result_.error().describe(); \
  } while (0)

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class SecretVaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    crypto::init();
    dir_ = fs::temp_directory_path() / ("outpost-vault-" + crypto::random_hex(6));
    fs::create_directories(dir_);
    auto opened = store::open_store("sqlite:" + dir_ + "/outpost.db");
    ASSERT_TRUE(opened.has_value()) << opened.error().describe();
    store_ = std::move(*opened);
    key_ = std::string(crypto::kSecretKeyBytes, '\x2a');
    vault_ = std::make_unique<SecretVault>(*store_, key_);
    hub_ = std::make_unique<sync::SyncHub>(io_);
    desired_ = std::make_unique<DesiredStateUpdater>(*store_, *hub_, std::string(64, '\x01'));
    desired_->set_secrets(vault_.get(), &clock_);
  }
  void TearDown() override {
    desired_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }

  // A device with a real key pair, in site plant-1.
  crypto::Ed25519KeyPair enroll(const std::string& id) {
    auto pair = crypto::ed25519_generate();
    if (!token_made_) {
      store::EnrollmentToken token;
      token.id = "t";
      token.token_hash = sha256_hex("t");
      token.site = "plant-1";
      token.created_at = clock_.now_ms();
      EXPECT_TRUE(store_->put_enrollment_token(token).has_value());
      token_made_ = true;
    }
    store::Device d;
    d.id = id;
    d.site = "plant-1";
    d.public_key = crypto::base64_encode(pair.public_key);
    d.credential_hash = "h";
    d.enrolled_at = d.last_seen = clock_.now_ms();
    EXPECT_TRUE(store_->enroll_device(sha256_hex("t"), clock_.now_ms(), d).has_value());
    return pair;
  }

  void apply(const std::string& name, const std::vector<std::string>& secrets) {
    json doc = {{"apiVersion", "outpost/v1"},
                {"kind", "Deployment"},
                {"metadata", {{"name", name}}},
                {"spec",
                 {{"selector", {{"sites", {"plant-1"}}}},
                  {"workload", {{"command", {"bin/app"}}}},
                  {"secrets", secrets}}}};
    auto m = deployments::validate_manifest(doc);
    ASSERT_TRUE(m.has_value()) << m.error().describe();
    ASSERT_OK(store_->apply_deployment(name, m->normalized.dump(), m->spec_hash(), "test",
                                       clock_.now_ms()));
  }

  store::Device device(const std::string& id) {
    auto d = store_->get_device(id);
    EXPECT_TRUE(d.has_value() && d->has_value());
    return d && *d ? **d : store::Device{};
  }

  // The values of one delivered version, opened as the agent would.
  static json open_delivered(const json& version, const crypto::Ed25519KeyPair& pair) {
    auto sealed = crypto::base64_decode(version.value("sealed", ""));
    if (!sealed) return nullptr;
    auto opened = crypto::open_sealed_with_ed25519(*sealed, pair);
    if (!opened) return nullptr;
    return json::parse(*opened, nullptr, false);
  }

  std::string dir_;
  std::string key_;
  ManualClock clock_{1'800'000'000'000};
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<SecretVault> vault_;
  boost::asio::io_context io_;
  std::unique_ptr<sync::SyncHub> hub_;
  std::unique_ptr<DesiredStateUpdater> desired_;
  bool token_made_ = false;
};

TEST_F(SecretVaultTest, ValuesRoundTripButNeverReachTheDatabaseFileInPlaintext) {
  const std::string password = "plaintext-password-7d1f0c";
  const std::string cert = "-----BEGIN CERT----- binary\x01\x02 tail-5e3a";
  auto v1 = vault_->create("camera", {{"password", password}, {"cert.pem", cert}}, "user:alice",
                           clock_.now_ms());
  ASSERT_OK(v1);
  EXPECT_EQ(v1->version, 1);
  EXPECT_EQ(v1->keys, (std::vector<std::string>{"cert.pem", "password"}));
  auto v2 = vault_->update("camera", {{"password", "second-password-91ab"}}, 0, "user:alice",
                           clock_.now_ms() + 1);
  ASSERT_OK(v2);
  EXPECT_EQ(v2->version, 2);

  auto stored = store_->get_secret("camera");
  ASSERT_OK(stored);
  ASSERT_TRUE(stored->has_value());
  // v2 was active at once: v1 is superseded and gone.
  ASSERT_EQ((*stored)->versions.size(), 1u);
  auto opened = vault_->open((*stored)->versions[0]);
  ASSERT_OK(opened);
  EXPECT_EQ(opened->at("password"), "second-password-91ab");

  // A vault with another master key cannot open it, and says which flag matters.
  SecretVault other(*store_, std::string(crypto::kSecretKeyBytes, '\x07'));
  auto refused = other.open((*stored)->versions[0]);
  ASSERT_FALSE(refused.has_value());
  EXPECT_NE(refused.error().message.find("--secrets-key"), std::string::npos);
  // A ciphertext moved to another version does not open there (bound to name and version).
  store::SecretVersion moved = (*stored)->versions[0];
  moved.version = 3;
  EXPECT_FALSE(vault_->open(moved).has_value());

  store_.reset();  // checkpoints the WAL into the file
  std::string bytes;
  for (const auto& entry : fs::directory_iterator(dir_)) bytes += slurp(entry.path().string());
  ASSERT_FALSE(bytes.empty());
  for (const std::string& plain :
       {password, std::string("tail-5e3a"), std::string("second-password-91ab"),
        crypto::base64_encode(password), crypto::base64_encode("second-password-91ab")}) {
    EXPECT_EQ(bytes.find(plain), std::string::npos) << plain;
  }
  EXPECT_NE(bytes.find("camera"), std::string::npos);  // names are metadata, stored as is
}

TEST_F(SecretVaultTest, RefusesBadNamesKeysAndSizesNamingTheField) {
  auto bad_name = vault_->create("Camera", {{"k", "v"}}, "a", clock_.now_ms());
  ASSERT_FALSE(bad_name.has_value());
  EXPECT_EQ(bad_name.error().field, "name");
  auto no_keys = vault_->create("camera", {}, "a", clock_.now_ms());
  ASSERT_FALSE(no_keys.has_value());
  EXPECT_EQ(no_keys.error().field, "data");
  auto bad_key = vault_->create("camera", {{"../x", "v"}}, "a", clock_.now_ms());
  ASSERT_FALSE(bad_key.has_value());
  EXPECT_NE(bad_key.error().message.find("file name"), std::string::npos);
  auto big = vault_->create("camera", {{"k", std::string(kMaxSecretValueBytes + 1, 'x')}}, "a",
                            clock_.now_ms());
  ASSERT_FALSE(big.has_value());
  EXPECT_EQ(big.error().field, "data.k");
  auto missing = vault_->update("nope", {{"k", "v"}}, 0, "a", clock_.now_ms());
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code, Errc::kNotFound);
}

TEST_F(SecretVaultTest, DevicesGetTheirSecretsSealedToTheirOwnKeyAndOnlyThoseNamed) {
  auto a = enroll("dev-a");
  auto b = enroll("dev-b");
  apply("line", {"camera"});
  ASSERT_OK(vault_->create("camera", {{"password", "pw-one"}}, "a", clock_.now_ms()));
  ASSERT_OK(vault_->create("unused", {{"token", "not-for-devices"}}, "a", clock_.now_ms()));
  ASSERT_OK(desired_->reconcile_all());

  const store::Device da = device("dev-a");
  const json doc = json::parse(da.desired_json);
  ASSERT_TRUE(doc.contains("secrets")) << da.desired_json;
  EXPECT_FALSE(doc["secrets"].contains("unused"));
  ASSERT_EQ(doc["secrets"]["camera"].size(), 1u);
  const json& delivered = doc["secrets"]["camera"][0];
  EXPECT_EQ(delivered["version"], 1);
  EXPECT_EQ(delivered["activate_at"], clock_.now_ms());
  EXPECT_EQ(da.desired_json.find("pw-one"), std::string::npos);
  EXPECT_EQ(da.desired_json.find(crypto::base64_encode("pw-one")), std::string::npos);
  const json payload = open_delivered(delivered, a);
  ASSERT_TRUE(payload.is_object()) << "does not open with dev-a's key";
  EXPECT_EQ(payload["name"], "camera");
  EXPECT_EQ(payload["version"], 1);
  EXPECT_EQ(crypto::base64_decode(payload["data"]["password"].get<std::string>()).value(),
            "pw-one");
  // Sealed to dev-a: dev-b's key does not open it (and dev-b has its own copy).
  EXPECT_TRUE(open_delivered(delivered, b).is_null());
  const json doc_b = json::parse(device("dev-b").desired_json);
  EXPECT_TRUE(open_delivered(doc_b["secrets"]["camera"][0], b).is_object());
  // The deployment entry itself is what the scheduler made: the revision key stays the same.
  EXPECT_FALSE(doc["deployments"][0].contains("sealed"));
}

TEST_F(SecretVaultTest, ReconcilingAgainKeepsTheGenerationAndTheCiphertexts) {
  enroll("dev-a");
  apply("line", {"camera"});
  ASSERT_OK(vault_->create("camera", {{"password", "pw-one"}}, "a", clock_.now_ms()));
  ASSERT_OK(desired_->reconcile_all());
  const store::Device first = device("dev-a");
  for (int i = 0; i < 3; ++i) {
    auto summary = desired_->reconcile_all();
    ASSERT_OK(summary);
    EXPECT_EQ(summary->changed, 0u);
  }
  const store::Device again = device("dev-a");
  EXPECT_EQ(again.generation, first.generation);
  EXPECT_EQ(again.desired_json, first.desired_json);
  // A new version is a real change.
  ASSERT_OK(vault_->update("camera", {{"password", "pw-two"}}, 0, "a", clock_.now_ms()));
  auto summary = desired_->reconcile_all();
  ASSERT_OK(summary);
  EXPECT_EQ(summary->changed, 1u);
  EXPECT_EQ(device("dev-a").generation, first.generation + 1);
}

TEST_F(SecretVaultTest, AStagedVersionTravelsWithItsTimeAndTheOldOneGoesAfterTheSwitch) {
  auto a = enroll("dev-a");
  apply("line", {"camera"});
  ASSERT_OK(vault_->create("camera", {{"password", "pw-one"}}, "a", clock_.now_ms()));
  const int64_t rotate_at = clock_.now_ms() + 60'000;
  ASSERT_OK(vault_->update("camera", {{"password", "pw-two"}}, rotate_at, "a", clock_.now_ms()));
  ASSERT_OK(desired_->reconcile_all());
  json doc = json::parse(device("dev-a").desired_json);
  ASSERT_EQ(doc["secrets"]["camera"].size(), 2u) << doc.dump();
  EXPECT_EQ(doc["secrets"]["camera"][0]["version"], 1);
  EXPECT_EQ(doc["secrets"]["camera"][1]["version"], 2);
  EXPECT_EQ(doc["secrets"]["camera"][1]["activate_at"], rotate_at);
  EXPECT_EQ(open_delivered(doc["secrets"]["camera"][1], a)["version"], 2);

  // Before the rotate time nothing happens; after it every device is rescheduled.
  auto early = desired_->reconcile_if_secret_switched(clock_.now_ms());
  ASSERT_OK(early);
  EXPECT_FALSE(*early);
  clock_.set_ms(rotate_at);
  auto switched = desired_->reconcile_if_secret_switched(clock_.now_ms());
  ASSERT_OK(switched);
  EXPECT_TRUE(*switched);
  doc = json::parse(device("dev-a").desired_json);
  ASSERT_EQ(doc["secrets"]["camera"].size(), 1u) << doc.dump();
  EXPECT_EQ(doc["secrets"]["camera"][0]["version"], 2);
  // Nothing staged any more: no further passes.
  auto idle = desired_->reconcile_if_secret_switched(clock_.now_ms() + 1);
  ASSERT_OK(idle);
  EXPECT_FALSE(*idle);
}

TEST_F(SecretVaultTest, ARevokedDeviceGetsNoNewVersion) {
  enroll("dev-a");
  enroll("dev-b");
  apply("line", {"camera"});
  ASSERT_OK(vault_->create("camera", {{"password", "pw-one"}}, "a", clock_.now_ms()));
  ASSERT_OK(desired_->reconcile_all());
  ASSERT_OK(store_->set_device_revoked("dev-b", clock_.now_ms()));
  ASSERT_OK(vault_->update("camera", {{"password", "pw-two"}}, 0, "a", clock_.now_ms()));
  ASSERT_OK(desired_->reconcile_all());
  const json a = json::parse(device("dev-a").desired_json);
  EXPECT_EQ(a["secrets"]["camera"][0]["version"], 2);
  const json b = json::parse(device("dev-b").desired_json);
  EXPECT_FALSE(b.contains("secrets")) << b.dump();
}

}  // namespace
}  // namespace outpost::server
