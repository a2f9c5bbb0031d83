// Units for the common library: errors, units, digests, crypto, durable files.
#include <sys/stat.h>

#include <filesystem>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/clock.h"
#include "common/crypto.h"
#include "common/digest.h"
#include "common/durable_file.h"
#include "common/error.h"
#include "common/json_fields.h"
#include "common/request_signature.h"
#include "common/tls_certs.h"
#include "common/units.h"

namespace outpost {
namespace {

using ::testing::HasSubstr;

TEST(ErrorTest, DescribeNamesTheFieldOnce) {
  Error plain{Errc::kInvalidArgument, "is not a semantic version", "version"};
  EXPECT_EQ(plain.describe(), "version: is not a semantic version");
  Error already{Errc::kInvalidArgument, "version: is not a semantic version", "version"};
  EXPECT_EQ(already.describe(), "version: is not a semantic version");
  Error wrapped = already.with_context("pushing model m 1.0");
  EXPECT_EQ(wrapped.describe(), "pushing model m 1.0: version: is not a semantic version");
  Error no_field{Errc::kNotFound, "device d-1 does not exist", ""};
  EXPECT_EQ(no_field.describe(), "device d-1 does not exist");
}

TEST(ErrorTest, CodesRoundTripThroughTheirNames) {
  for (Errc code : {Errc::kInvalidArgument, Errc::kNotFound, Errc::kUnavailable, Errc::kInternal,
                    Errc::kFailedPrecondition}) {
    EXPECT_EQ(errc_from_name(errc_name(code)), code) << errc_name(code);
  }
  EXPECT_EQ(errc_from_name("no_such_code"), Errc::kInternal);
  EXPECT_EQ(errc_http_status(Errc::kNotFound), 404);
  EXPECT_EQ(errc_http_status(Errc::kInvalidArgument), 400);
}

TEST(UnitsTest, Durations) {
  EXPECT_EQ(parse_duration_ms("250ms").value(), 250);
  EXPECT_EQ(parse_duration_ms("1h30m").value(), 5'400'000);
  EXPECT_EQ(parse_duration_ms("7d").value(), 7 * 86'400'000LL);
  for (const char* bad : {"", "ten", "10", "1m1h", "-1s", "1.5h", "3651d"}) {
    auto r = parse_duration_ms(bad);
    ASSERT_FALSE(r.has_value()) << bad;
    EXPECT_THAT(r.error().message, HasSubstr("expected a duration like 10m"));
  }
  EXPECT_EQ(format_duration_ms(0), "0s");
  EXPECT_EQ(format_duration_ms(90'061'001), "1d1h1m1s1ms");
  EXPECT_EQ(parse_duration_ms(format_duration_ms(3'723'000)).value(), 3'723'000);
}

TEST(UnitsTest, Sizes) {
  EXPECT_EQ(parse_size_bytes("512").value(), 512);
  EXPECT_EQ(parse_size_bytes("64M").value(), 64LL << 20);
  EXPECT_EQ(parse_size_bytes("1.5G").value(), 3LL << 29);
  EXPECT_EQ(parse_size_bytes("2KiB").value(), 2048);
  for (const char* bad : {"", "M", "-5M", "1.2.3M", "5Q", "1e30T"}) {
    EXPECT_FALSE(parse_size_bytes(bad).has_value()) << bad;
  }
  EXPECT_EQ(format_size(532), "532 B");
  EXPECT_EQ(format_size(3LL << 19), "1.5 MiB");
}

TEST(DigestTest, KnownVectorsAndStreaming) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 streamed;
  streamed.update("a");
  streamed.update("bc");
  EXPECT_EQ(streamed.finish_hex(), sha256_hex("abc"));
  EXPECT_TRUE(is_digest_ref("sha256:" + sha256_hex("x")));
  EXPECT_FALSE(is_digest_ref("sha256:abc"));
  EXPECT_FALSE(is_digest_ref("md5:" + sha256_hex("x")));
}

TEST(CryptoTest, SignaturesVerifyOnlyForTheirMessageAndKey) {
  crypto::init();
  auto keys = crypto::ed25519_generate();
  auto other = crypto::ed25519_generate();
  std::string sig = crypto::ed25519_sign("generation 7", keys.secret_key);
  EXPECT_EQ(sig.size(), 64u);
  EXPECT_TRUE(crypto::ed25519_verify("generation 7", sig, keys.public_key));
  EXPECT_FALSE(crypto::ed25519_verify("generation 8", sig, keys.public_key));
  EXPECT_FALSE(crypto::ed25519_verify("generation 7", sig, other.public_key));
  EXPECT_FALSE(crypto::ed25519_verify("generation 7", sig.substr(1), keys.public_key));
  std::string encoded = crypto::base64_encode(keys.public_key);
  EXPECT_EQ(crypto::base64_decode(encoded).value(), keys.public_key);
  EXPECT_FALSE(crypto::base64_decode("not base64!").has_value());
  EXPECT_TRUE(crypto::constant_time_equal("abc", "abc"));
  EXPECT_FALSE(crypto::constant_time_equal("abc", "abd"));
  EXPECT_FALSE(crypto::constant_time_equal("abc", "abcd"));
}

TEST(CryptoTest, SecretsEncryptedAtRestOpenOnlyWithTheirKeyAndContext) {
  const std::string key(crypto::kSecretKeyBytes, 'k');
  const std::string other(crypto::kSecretKeyBytes, 'o');
  const std::string sealed = crypto::aead_encrypt("hunter2", key, "secret db v1");
  EXPECT_EQ(sealed.find("hunter2"), std::string::npos);
  EXPECT_NE(crypto::aead_encrypt("hunter2", key, "secret db v1"), sealed);  // random nonce
  EXPECT_EQ(crypto::aead_decrypt(sealed, key, "secret db v1").value(), "hunter2");
  EXPECT_FALSE(crypto::aead_decrypt(sealed, other, "secret db v1").has_value());
  EXPECT_FALSE(crypto::aead_decrypt(sealed, key, "secret db v2").has_value());
  std::string flipped = sealed;
  flipped.back() ^= 1;
  auto refused = crypto::aead_decrypt(flipped, key, "secret db v1");
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, Errc::kPermissionDenied);
  EXPECT_FALSE(crypto::aead_decrypt("short", key, "secret db v1").has_value());
}

TEST(CryptoTest, SealedBoxOpensOnlyWithTheDeviceKeyItWasSealedTo) {
  auto device = crypto::ed25519_generate();
  auto other = crypto::ed25519_generate();
  auto sealed = crypto::seal_to_ed25519("camera password", device.public_key);
  ASSERT_TRUE(sealed.has_value()) << sealed.error().message;
  EXPECT_EQ(sealed->find("camera password"), std::string::npos);
  auto again = crypto::seal_to_ed25519("camera password", device.public_key);
  ASSERT_TRUE(again.has_value());
  EXPECT_NE(*again, *sealed);  // randomized: the desired hash must not cover it
  EXPECT_EQ(crypto::open_sealed_with_ed25519(*sealed, device).value(), "camera password");
  auto wrong = crypto::open_sealed_with_ed25519(*sealed, other);
  ASSERT_FALSE(wrong.has_value());
  EXPECT_EQ(wrong.error().code, Errc::kPermissionDenied);
  std::string altered = *sealed;
  altered[40] ^= 1;
  EXPECT_FALSE(crypto::open_sealed_with_ed25519(altered, device).has_value());
  EXPECT_FALSE(crypto::seal_to_ed25519("x", "short").has_value());
}

TEST(CryptoTest, SecretKeyFileIsMadeOnceWithMode0600) {
  const std::string dir =
      std::filesystem::temp_directory_path() / ("outpost-key-" + crypto::random_hex(4));
  std::filesystem::create_directories(dir);
  auto made = crypto::load_or_create_secret_key_file(dir + "/secrets.key");
  ASSERT_TRUE(made.has_value()) << made.error().message;
  EXPECT_EQ(made->size(), crypto::kSecretKeyBytes);
  EXPECT_EQ(
      std::filesystem::status(dir + "/secrets.key").permissions() & std::filesystem::perms::all,
      std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  EXPECT_EQ(crypto::load_or_create_secret_key_file(dir + "/secrets.key").value(), *made);
  ASSERT_TRUE(write_file_durably(dir + "/bad.key", "not a key").has_value());
  auto bad = crypto::load_or_create_secret_key_file(dir + "/bad.key");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("bad.key"), std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(ClockTest, Rfc3339TimesParseWithOffsetsAndFractions) {
  EXPECT_EQ(parse_rfc3339_ms("1970-01-01T00:00:00Z").value(), 0);
  EXPECT_EQ(parse_rfc3339_ms("2026-12-07T18:00:00Z").value(), 1796666400000);
  EXPECT_EQ(parse_rfc3339_ms("2026-12-07T19:00:00+01:00").value(), 1796666400000);
  EXPECT_EQ(parse_rfc3339_ms("2026-12-07T18:00:00.250Z").value(), 1796666400250);
  EXPECT_EQ(format_iso8601(parse_rfc3339_ms("2024-02-29T23:59:59Z").value()),
            "2024-02-29T23:59:59Z");
  for (const char* bad : {"", "2026-12-07", "2026-12-07T18:00:00", "2026-13-07T18:00:00Z",
                          "2026-12-07T18:00:00Zjunk", "+10m"}) {
    auto parsed = parse_rfc3339_ms(bad);
    EXPECT_FALSE(parsed.has_value()) << bad;
  }
  EXPECT_NE(parse_rfc3339_ms("tomorrow").error().message.find("\"tomorrow\""), std::string::npos);
}

TEST(JsonNestingTest, CountsBracketsOutsideStringsOnly) {
  EXPECT_TRUE(json_fields::check_nesting(R"({"a":[[1,2],{"b":"[[[[[["}]})", "body", 3).has_value());
  auto deep = json_fields::check_nesting(R"({"a":[[[1]]]})", "body", 3);
  ASSERT_FALSE(deep.has_value());
  EXPECT_EQ(deep.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(deep.error().message, "body: nested deeper than 3 levels (at byte 7)");
  // An escaped quote does not end a string; brackets inside it are text.
  EXPECT_TRUE(json_fields::check_nesting(R"(["\"[[[[[[[["])", "body", 1).has_value());
  EXPECT_FALSE(json_fields::check_nesting(std::string(100, '['), "body").has_value());
}

TEST(RequestSignatureTest, SignsTheRequestAsSentAndParsesStrictly) {
  crypto::init();
  const auto key = crypto::ed25519_generate();
  const std::string header =
      reqsig::sign("d-1", key.secret_key, 1'800'000'000'000, "POST", "/x?y=1", "body");
  auto sig = reqsig::parse(header);
  ASSERT_TRUE(sig.has_value()) << sig.error().message;
  EXPECT_EQ(sig->device_id, "d-1");
  EXPECT_EQ(sig->time_ms, 1'800'000'000'000);
  EXPECT_TRUE(reqsig::verify(*sig, key.public_key, "POST", "/x?y=1", "body"));
  EXPECT_FALSE(reqsig::verify(*sig, key.public_key, "POST", "/x?y=2", "body"));
  EXPECT_FALSE(reqsig::verify(*sig, key.public_key, "POST", "/x?y=1", "bodY"));
  EXPECT_FALSE(reqsig::verify(*sig, key.public_key, "GET", "/x?y=1", "body"));
  for (const char* bad : {"v2 id=d-1", "v1 id=d-1 id=d-2", "v1 id=d-1 t=x n=00 s=AA", ""}) {
    auto refused = reqsig::parse(bad);
    ASSERT_FALSE(refused.has_value()) << bad;
    EXPECT_EQ(refused.error().code, Errc::kUnauthenticated);
  }
}

TEST(RequestSignatureTest, TheSignerFollowsTheServersClock) {
  crypto::init();
  reqsig::Signer signer("d-1", crypto::ed25519_generate().secret_key);
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  signer.observe_date(reqsig::format_http_date(now + 3'600'000));  // server an hour ahead
  EXPECT_NEAR(static_cast<double>(signer.offset_ms()), 3'600'000.0, 2'000.0);
  auto sig = reqsig::parse(signer.header("GET", "/", "").second);
  ASSERT_TRUE(sig.has_value());
  EXPECT_NEAR(static_cast<double>(sig->time_ms - now), 3'600'000.0, 3'000.0);
  signer.observe_date("not a date");  // ignored
  EXPECT_NEAR(static_cast<double>(signer.offset_ms()), 3'600'000.0, 2'000.0);
}

TEST(TlsCertsTest, ADevelopmentCaIssuesAServerCertificateForItsNames) {
  auto ca = tls::make_ca("test CA", 10);
  ASSERT_TRUE(ca.has_value()) << ca.error().message;
  auto server = tls::issue_server_cert(*ca, {"localhost", "10.1.2.3"}, 5);
  ASSERT_TRUE(server.has_value()) << server.error().message;
  EXPECT_TRUE(tls::names_not_covered(server->cert_pem, {"localhost", "10.1.2.3"})->empty());
  EXPECT_EQ(*tls::names_not_covered(server->cert_pem, {"10.1.2.4", "other"}),
            (std::vector<std::string>{"10.1.2.4", "other"}));
  EXPECT_TRUE(tls::key_matches_cert(server->cert_pem, server->key_pem));
  EXPECT_FALSE(tls::key_matches_cert(server->cert_pem, ca->key_pem));
  const int64_t left = *tls::seconds_to_expiry(server->cert_pem);
  EXPECT_GT(left, 4 * 86400);
  EXPECT_LE(left, 5 * 86400);
  auto pin = tls::cert_fingerprint(ca->cert_pem);
  ASSERT_TRUE(pin.has_value());
  EXPECT_EQ(pin->size(), 7u + 64u);
  EXPECT_NE(*pin, *tls::cert_fingerprint(server->cert_pem));
  EXPECT_FALSE(tls::cert_fingerprint("not a certificate").has_value());
}

TEST(DurableFileTest, ReplacesAtomicallyWithMode) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("outpost-common-" + crypto::random_hex(6));
  ASSERT_TRUE(make_dirs((dir / "a" / "b").string()).has_value());
  std::string path = (dir / "a" / "b" / "secret").string();
  ASSERT_TRUE(write_file_durably(path, "one", 0600).has_value());
  ASSERT_TRUE(write_file_durably(path, "two", 0600).has_value());
  EXPECT_EQ(read_file(path).value(), "two");
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // No temporary files are left beside it.
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir / "a" / "b")) ++entries;
  EXPECT_EQ(entries, 1u);
  auto missing = read_file((dir / "nope").string());
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code, Errc::kNotFound);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace outpost
