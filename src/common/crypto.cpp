#include "common/crypto.h"

#include <sodium.h>

#include <cassert>
#include <mutex>
#include <vector>

#include "common/digest.h"
#include "common/durable_file.h"

namespace outpost::crypto {

void init() {
  static std::once_flag once;
  std::call_once(once, [] {
    int rc = sodium_init();
    assert(rc >= 0 && "libsodium failed to initialize");
    (void)rc;
  });
}

std::string random_hex(size_t bytes, std::string_view prefix) {
  init();
  std::string raw(bytes, '\0');
  randombytes_buf(raw.data(), raw.size());
  return std::string(prefix) + hex_encode(raw);
}

std::string base64_encode(std::string_view bytes) {
  init();
  const size_t len = sodium_base64_ENCODED_LEN(bytes.size(), sodium_base64_VARIANT_ORIGINAL);
  std::string out(len, '\0');
  sodium_bin2base64(out.data(), len, reinterpret_cast<const unsigned char*>(bytes.data()),
                    bytes.size(), sodium_base64_VARIANT_ORIGINAL);
  out.resize(len - 1);  // drop the NUL terminator sodium writes
  return out;
}

Result<std::string> base64_decode(std::string_view text) {
  init();
  std::string out(text.size() / 4 * 3 + 3, '\0');
  size_t out_len = 0;
  if (sodium_base642bin(reinterpret_cast<unsigned char*>(out.data()), out.size(), text.data(),
                        text.size(), nullptr, &out_len, nullptr,
                        sodium_base64_VARIANT_ORIGINAL) != 0) {
    return make_error(Errc::kInvalidArgument, "not valid base64");
  }
  out.resize(out_len);
  return out;
}

Ed25519KeyPair ed25519_generate() {
  init();
  Ed25519KeyPair pair;
  pair.public_key.resize(crypto_sign_PUBLICKEYBYTES);
  pair.secret_key.resize(crypto_sign_SECRETKEYBYTES);
  crypto_sign_keypair(reinterpret_cast<unsigned char*>(pair.public_key.data()),
                      reinterpret_cast<unsigned char*>(pair.secret_key.data()));
  return pair;
}

std::string ed25519_sign(std::string_view message, std::string_view secret_key) {
  init();
  assert(secret_key.size() == crypto_sign_SECRETKEYBYTES);
  std::string sig(crypto_sign_BYTES, '\0');
  crypto_sign_detached(reinterpret_cast<unsigned char*>(sig.data()), nullptr,
                       reinterpret_cast<const unsigned char*>(message.data()), message.size(),
                       reinterpret_cast<const unsigned char*>(secret_key.data()));
  return sig;
}

bool ed25519_verify(std::string_view message, std::string_view signature,
                    std::string_view public_key) {
  init();
  if (signature.size() != crypto_sign_BYTES || public_key.size() != crypto_sign_PUBLICKEYBYTES) {
    return false;
  }
  return crypto_sign_verify_detached(
             reinterpret_cast<const unsigned char*>(signature.data()),
             reinterpret_cast<const unsigned char*>(message.data()), message.size(),
             reinterpret_cast<const unsigned char*>(public_key.data())) == 0;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}

Result<Ed25519KeyPair> key_pair_from_secret(std::string_view secret_b64, const std::string& what) {
  std::string_view text = secret_b64;
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) {
    text.remove_suffix(1);
  }
  auto secret = base64_decode(text);
  if (!secret || secret->size() != 64) {
    return make_error(Errc::kInvalidArgument, what + " is not a base64 Ed25519 secret key");
  }
  Ed25519KeyPair pair;
  pair.secret_key = *secret;
  pair.public_key = secret->substr(32);
  return pair;
}

Result<Ed25519KeyPair> load_or_create_key_file(const std::string& key_path,
                                               const std::string& pub_path) {
  if (auto existing = read_file(key_path)) {
    return key_pair_from_secret(*existing, key_path);
  } else if (existing.error().code != Errc::kNotFound) {
    return make_error(existing.error());
  }
  auto pair = ed25519_generate();
  OUTPOST_TRY(write_file_durably(key_path, base64_encode(pair.secret_key), 0600));
  if (!pub_path.empty()) {
    OUTPOST_TRY(write_file_durably(pub_path, base64_encode(pair.public_key) + "\n", 0644));
  }
  return pair;
}

Result<std::string> load_or_create_secret_key_file(const std::string& path) {
  if (auto existing = read_file(path)) {
    std::string_view text = *existing;
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) {
      text.remove_suffix(1);
    }
    auto key = base64_decode(text);
    if (!key || key->size() != kSecretKeyBytes) {
      return make_error(Errc::kInvalidArgument,
                        path + " is not a base64 32-byte key (the secrets master key)");
    }
    return *key;
  } else if (existing.error().code != Errc::kNotFound) {
    return make_error(existing.error());
  }
  init();
  std::string key(kSecretKeyBytes, '\0');
  crypto_aead_xchacha20poly1305_ietf_keygen(reinterpret_cast<unsigned char*>(key.data()));
  OUTPOST_TRY(write_file_durably(path, base64_encode(key) + "\n", 0600));
  return key;
}

std::string aead_encrypt(std::string_view plaintext, std::string_view key,
                         std::string_view context) {
  init();
  assert(key.size() == crypto_aead_xchacha20poly1305_ietf_KEYBYTES);
  constexpr size_t kNonce = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES;
  std::string out(kNonce + plaintext.size() + crypto_aead_xchacha20poly1305_ietf_ABYTES, '\0');
  auto* bytes = reinterpret_cast<unsigned char*>(out.data());
  randombytes_buf(bytes, kNonce);
  unsigned long long written = 0;
  crypto_aead_xchacha20poly1305_ietf_encrypt(
      bytes + kNonce, &written, reinterpret_cast<const unsigned char*>(plaintext.data()),
      plaintext.size(), reinterpret_cast<const unsigned char*>(context.data()), context.size(),
      nullptr, bytes, reinterpret_cast<const unsigned char*>(key.data()));
  out.resize(kNonce + written);
  return out;
}

Result<std::string> aead_decrypt(std::string_view sealed, std::string_view key,
                                 std::string_view context) {
  init();
  constexpr size_t kNonce = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES;
  constexpr size_t kTag = crypto_aead_xchacha20poly1305_ietf_ABYTES;
  if (key.size() != crypto_aead_xchacha20poly1305_ietf_KEYBYTES || sealed.size() < kNonce + kTag) {
    return make_error(Errc::kPermissionDenied, "encrypted value is too short or the key is wrong");
  }
  std::string out(sealed.size() - kNonce - kTag, '\0');
  unsigned long long written = 0;
  const auto* bytes = reinterpret_cast<const unsigned char*>(sealed.data());
  if (crypto_aead_xchacha20poly1305_ietf_decrypt(
          reinterpret_cast<unsigned char*>(out.data()), &written, nullptr, bytes + kNonce,
          sealed.size() - kNonce, reinterpret_cast<const unsigned char*>(context.data()),
          context.size(), bytes, reinterpret_cast<const unsigned char*>(key.data())) != 0) {
    return make_error(Errc::kPermissionDenied,
                      "encrypted value does not open with this key (wrong key, or altered)");
  }
  out.resize(written);
  return out;
}

Result<std::string> seal_to_ed25519(std::string_view plaintext,
                                    std::string_view ed25519_public_key) {
  init();
  if (ed25519_public_key.size() != crypto_sign_PUBLICKEYBYTES) {
    return make_error(Errc::kInvalidArgument, "device public key is not 32 bytes");
  }
  unsigned char x25519[crypto_box_PUBLICKEYBYTES];
  if (crypto_sign_ed25519_pk_to_curve25519(
          x25519, reinterpret_cast<const unsigned char*>(ed25519_public_key.data())) != 0) {
    return make_error(Errc::kInvalidArgument, "device public key is not a valid Ed25519 key");
  }
  std::string out(plaintext.size() + crypto_box_SEALBYTES, '\0');
  if (crypto_box_seal(reinterpret_cast<unsigned char*>(out.data()),
                      reinterpret_cast<const unsigned char*>(plaintext.data()), plaintext.size(),
                      x25519) != 0) {
    return make_error(Errc::kInternal, "crypto_box_seal failed");
  }
  return out;
}

Result<std::string> open_sealed_with_ed25519(std::string_view sealed, const Ed25519KeyPair& pair) {
  init();
  if (pair.secret_key.size() != crypto_sign_SECRETKEYBYTES ||
      pair.public_key.size() != crypto_sign_PUBLICKEYBYTES) {
    return make_error(Errc::kInvalidArgument, "device key pair has the wrong size");
  }
  if (sealed.size() < crypto_box_SEALBYTES) {
    return make_error(Errc::kPermissionDenied, "sealed value is too short");
  }
  unsigned char x_pk[crypto_box_PUBLICKEYBYTES];
  unsigned char x_sk[crypto_box_SECRETKEYBYTES];
  if (crypto_sign_ed25519_pk_to_curve25519(
          x_pk, reinterpret_cast<const unsigned char*>(pair.public_key.data())) != 0 ||
      crypto_sign_ed25519_sk_to_curve25519(
          x_sk, reinterpret_cast<const unsigned char*>(pair.secret_key.data())) != 0) {
    return make_error(Errc::kInvalidArgument, "device key pair is not a valid Ed25519 key");
  }
  std::string out(sealed.size() - crypto_box_SEALBYTES, '\0');
  const int rc = crypto_box_seal_open(reinterpret_cast<unsigned char*>(out.data()),
                                      reinterpret_cast<const unsigned char*>(sealed.data()),
                                      sealed.size(), x_pk, x_sk);
  sodium_memzero(x_sk, sizeof x_sk);
  if (rc != 0) {
    return make_error(Errc::kPermissionDenied,
                      "sealed value does not open with this device's key (sealed to another "
                      "device, or altered)");
  }
  return out;
}

void wipe(std::string& secret) {
  if (!secret.empty()) sodium_memzero(secret.data(), secret.size());
  secret.clear();
}

}  // namespace outpost::crypto
