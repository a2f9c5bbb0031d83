// End-to-end: the trust of issue 17 through the real server, agent and CLI. HTTPS with the
// server's development CA, pinned by the enrollment token; a wrong CA or pin refused; signed
// device calls that cannot be replayed, borrowed by another device, or made with a bearer
// credential alone; devices that download only what is assigned to them; a revoked device
// refused on its next call, also after a restart.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/crypto.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/request_signature.h"
#include "common/tls_certs.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class TrustE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    crypto::init();
    root_ = make_temp_dir("outpost-trust-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/data");
    server_->use_tls(true);
    server_->start();
    ASSERT_TRUE(server_->running());
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(root_);
  }

  nlohmann::json create_token(const std::string& site, int uses = 5) {
    auto r = server_->cli(
        {"token", "create", "--site", site, "--uses", std::to_string(uses), "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.json();
  }

  FakeDevice enroll(const std::string& site) {
    return FakeDevice::enroll(server_->url(), create_token(site)["token"], {{"arch", "x86_64"}}, {},
                              server_->ca_file());
  }

  std::string root_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(TrustE2E, HttpsEndToEndWithTheCaPinnedByTheEnrollmentToken) {
  const auto token = create_token("plant-1");
  const std::string pin = token.value("ca_pin", "");
  ASSERT_THAT(pin, ::testing::StartsWith("sha256:"));
  // The pin is the server's CA (as `openssl x509 -outform der | sha256sum` would say).
  auto ca_pem = read_file(server_->ca_file());
  ASSERT_TRUE(ca_pem.has_value());
  EXPECT_EQ(tls::cert_fingerprint(*ca_pem).value(), pin);
  EXPECT_THAT(server_->log(), HasSubstr("pin " + pin));

  AgentProcess agent(root_ + "/agent");
  agent.start({"--server", server_->url(), "--enroll-token", token["token"], "--ca-pin", pin});
  ASSERT_TRUE(agent.running()) << agent.log();
  // The agent kept the CA it checked against the pin, and trusts only that from now on.
  auto kept = read_file(agent.data_dir() + "/ca.pem");
  ASSERT_TRUE(kept.has_value());
  EXPECT_EQ(*kept, *ca_pem);
  // Its signed status reports arrive over HTTPS.
  const std::string id = agent.device_id();
  bool reported = false;
  for (int i = 0; i < 100 && !reported; ++i) {
    auto show = server_->cli({"device", "show", id, "-o", "json"});
    reported = show.exit_code == 0 && show.json().value("status_at", int64_t{0}) > 0;
    if (!reported) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(reported) << agent.log();
  // After a restart it still works from what it kept (no pin needed again).
  agent.stop();
  agent.start({});
  ASSERT_TRUE(agent.running()) << agent.log();

  // Plain HTTP to the HTTPS port gets nothing.
  HttpClient plain("http://127.0.0.1:" + std::to_string(server_->port()), "");
  auto answer = plain.request("GET", "/healthz");
  EXPECT_TRUE(!answer.has_value() || answer->status != 200);
}

TEST_F(TrustE2E, AWrongCaOrAWrongPinIsRefused) {
  // A CA the server's certificate does not come from.
  auto other = tls::make_ca("someone else", 30);
  ASSERT_TRUE(other.has_value());
  const std::string other_ca = root_ + "/other-ca.pem";
  ASSERT_TRUE(write_file_durably(other_ca, other->cert_pem, 0644).has_value());
  auto refused = run_program({bin_dir() + "/outpost", "device", "list"},
                             {{"OUTPOST_SERVER", server_->url()},
                              {"OUTPOST_TOKEN", server_->admin_token()},
                              {"OUTPOST_CA_FILE", other_ca},
                              {"XDG_CONFIG_HOME", root_ + "/config"}});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_THAT(refused.err, HasSubstr("certificate is not trusted"));

  // The system's CAs do not vouch for a development CA either.
  HttpClient system_cas(server_->url(), "");
  auto untrusted = system_cas.request("GET", "/healthz");
  ASSERT_FALSE(untrusted.has_value());
  EXPECT_THAT(untrusted.error().message, HasSubstr("not trusted"));

  // An agent whose pin is not the server's CA never sends its token.
  const auto token = create_token("plant-1", 1);
  AgentProcess agent(root_ + "/agent");
  agent.start({"--server", server_->url(), "--enroll-token", token["token"], "--ca-pin",
               "sha256:" + std::string(64, '0')},
              /*may_exit=*/true);
  for (int i = 0; i < 100 && agent.running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  agent.stop();
  EXPECT_NE(agent.exit_code(), 0);
  EXPECT_THAT(agent.log(), HasSubstr("not the pinned"));
  EXPECT_FALSE(fs::exists(agent.data_dir() + "/identity.json"));
  // The token was not used: it still enrolls a device.
  auto device = FakeDevice::enroll(server_->url(), token["token"], {{"arch", "x86_64"}}, {},
                                   server_->ca_file());
  EXPECT_FALSE(device.id.empty());
}

TEST_F(TrustE2E, SignedCallsCannotBeReplayedBorrowedOrLeftOut) {
  FakeDevice a = enroll("plant-1");
  FakeDevice b = enroll("plant-1");
  ASSERT_FALSE(a.id.empty());
  ASSERT_FALSE(b.id.empty());
  const std::string target = "/api/v1/device/desired?generation=0&wait=0";

  // One signed call, sent twice as it was captured: the copy is refused.
  const auto header = a.signer->header("GET", target, "");
  HttpClient raw_a(server_->url(), a.credential, server_->ca_file());
  HttpRequestOptions captured;
  captured.headers = {header};
  auto first = raw_a.request("GET", target, {}, "", captured);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->status, 200) << first->body;
  auto replay = raw_a.request("GET", target, {}, "", captured);
  ASSERT_TRUE(replay.has_value());
  EXPECT_EQ(replay->status, 401);
  EXPECT_THAT(replay->body, HasSubstr("nonce already used"));

  // The bearer credential alone (stolen off a disk) is not enough.
  auto bare = raw_a.request("GET", target, {}, "");
  ASSERT_TRUE(bare.has_value());
  EXPECT_EQ(bare->status, 401);
  EXPECT_THAT(bare->body, HasSubstr("missing X-Outpost-Signature"));

  // Device A with B's credential (to read B's desired state) is refused: the key is A's.
  HttpClient a_as_b(server_->url(), b.credential, server_->ca_file());
  a_as_b.set_signer(a.signer);
  auto borrowed = a_as_b.request("GET", target, {}, "");
  ASSERT_TRUE(borrowed.has_value());
  EXPECT_EQ(borrowed->status, 401);
  EXPECT_THAT(borrowed->body, HasSubstr("signed by " + a.id));
  // So is B's credential signed by A's key pretending to be B (the signature names B).
  HttpClient forger(server_->url(), b.credential, server_->ca_file());
  forger.set_signer(std::make_shared<reqsig::Signer>(b.id, crypto::ed25519_generate().secret_key));
  auto forged_answer = forger.request("GET", target, {}, "");
  ASSERT_TRUE(forged_answer.has_value());
  EXPECT_EQ(forged_answer->status, 401);
  EXPECT_THAT(forged_answer->body, HasSubstr("does not verify"));

  // A blob no desired state of A's names: operators may fetch it, device A may not.
  const std::string blob = root_ + "/blob.bin";
  std::ofstream(blob, std::ios::binary) << "weights of somebody else's model";
  auto pushed = server_->cli({"artifact", "push", blob});
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  std::string digest = pushed.out;
  while (!digest.empty() && (digest.back() == '\n' || digest.back() == ' ')) digest.pop_back();
  auto as_device = a.client(server_->url())->request("GET", "/api/v1/artifacts/" + digest);
  ASSERT_TRUE(as_device.has_value());
  EXPECT_EQ(as_device->status, 403) << as_device->body;
  EXPECT_THAT(as_device->body, HasSubstr("not assigned to device " + a.id));
  HttpClient op(server_->url(), server_->admin_token(), server_->ca_file());
  auto as_operator = op.request("GET", "/api/v1/artifacts/" + digest);
  ASSERT_TRUE(as_operator.has_value());
  EXPECT_EQ(as_operator->status, 200);
  EXPECT_EQ(as_operator->body, "weights of somebody else's model");
}

TEST_F(TrustE2E, ARevokedDeviceIsRefusedOnItsNextCallAndAfterARestart) {
  FakeDevice d = enroll("plant-1");
  ASSERT_FALSE(d.id.empty());

  // A long-poll the device holds when it is revoked ends at once, refused.
  auto current = d.desired(server_->url(), 0, 0);
  ASSERT_EQ(current.status, 200) << current.body;
  const int64_t generation = std::stoll(current.headers["x-outpost-generation"]);
  HttpResponse parked;
  std::chrono::steady_clock::time_point parked_answered;
  std::thread poll([&] {
    parked = d.desired(server_->url(), generation, 30);
    parked_answered = std::chrono::steady_clock::now();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // parked by now

  auto revoked = server_->cli({"device", "revoke", d.id});
  const auto after_revoke = std::chrono::steady_clock::now();
  ASSERT_EQ(revoked.exit_code, 0) << revoked.err;
  poll.join();
  EXPECT_EQ(parked.status, 401) << parked.body;
  EXPECT_LT(parked_answered - after_revoke, std::chrono::seconds(1));
  EXPECT_THAT(revoked.out, HasSubstr("revoked at"));
  auto next = d.desired(server_->url(), 0, 0);
  EXPECT_LT(std::chrono::steady_clock::now() - after_revoke, std::chrono::seconds(1));
  EXPECT_EQ(next.status, 401);
  EXPECT_THAT(next.body, HasSubstr("was revoked"));
  // Uploads too (they skip only the age and nonce checks, never revocation).
  auto status = d.client(server_->url())
                    ->request("POST", "/api/v1/device/status", R"({"seq":1,"deployments":[]})");
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(status->status, 401);

  auto show = server_->cli({"device", "show", d.id});
  EXPECT_THAT(show.out, HasSubstr("Revoked:"));
  auto list = server_->cli({"device", "list"});
  EXPECT_THAT(list.out, HasSubstr("REVOKED"));
  auto audit = server_->cli({"audit", "list", "-o", "json"});
  EXPECT_THAT(audit.out, HasSubstr("device.revoke"));

  server_->stop();
  server_->start();
  EXPECT_EQ(d.desired(server_->url(), 0, 0).status, 401);
}

}  // namespace
}  // namespace outpost::e2e
