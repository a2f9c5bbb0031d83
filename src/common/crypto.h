// Small wrappers over libsodium: random secrets, base64, Ed25519 keys and signatures, secret-key
// encryption at rest (XChaCha20-Poly1305) and sealed boxes to a device's key.
#pragma once

#include <string>
#include <string_view>

#include "common/error.h"

namespace outpost::crypto {

// Must be called once before any other function here (idempotent, thread-safe).
void init();

// `bytes` random bytes as lowercase hex, with an optional prefix ("opt_" + 64 hex chars).
std::string random_hex(size_t bytes, std::string_view prefix = {});

std::string base64_encode(std::string_view bytes);
[[nodiscard]] Result<std::string> base64_decode(std::string_view text);

struct Ed25519KeyPair {
  std::string public_key;  // 32 raw bytes
  std::string secret_key;  // 64 raw bytes
};

Ed25519KeyPair ed25519_generate();
// Detached signature (64 raw bytes).
std::string ed25519_sign(std::string_view message, std::string_view secret_key);
bool ed25519_verify(std::string_view message, std::string_view signature,
                    std::string_view public_key);

// A key file as our servers keep them: the base64 secret key in `key_path` (0600), the base64
// public key in `pub_path` (0644, may be ""). Made on first use; kInvalidArgument naming the
// file when it holds something else.
[[nodiscard]] Result<Ed25519KeyPair> load_or_create_key_file(const std::string& key_path,
                                                             const std::string& pub_path);
// The pair of a 64-byte libsodium secret key (which ends with the public key).
[[nodiscard]] Result<Ed25519KeyPair> key_pair_from_secret(std::string_view secret_b64,
                                                          const std::string& what);

// ---- Secrets (issue 18) ----

inline constexpr size_t kSecretKeyBytes = 32;  // an XChaCha20-Poly1305 key

// A 32-byte symmetric key kept base64 in `path` (0600), made on first use. kInvalidArgument
// naming the file when it holds something else.
[[nodiscard]] Result<std::string> load_or_create_secret_key_file(const std::string& path);

// Authenticated encryption under a 32-byte key: nonce (24 random bytes) || ciphertext || tag.
// `context` is authenticated but not stored: opening with another context fails (a ciphertext
// moved to another row of the store does not open there).
std::string aead_encrypt(std::string_view plaintext, std::string_view key,
                         std::string_view context);
// kPermissionDenied when the key, the context or the bytes are not the ones sealed.
[[nodiscard]] Result<std::string> aead_decrypt(std::string_view sealed, std::string_view key,
                                               std::string_view context);

// An anonymous sealed box (crypto_box_seal) to the X25519 key derived from an Ed25519 public key
// (32 raw bytes). Randomized: sealing the same plaintext twice gives different bytes.
// kInvalidArgument when the public key is not a valid Ed25519 point.
[[nodiscard]] Result<std::string> seal_to_ed25519(std::string_view plaintext,
                                                  std::string_view ed25519_public_key);
// Opens it with the Ed25519 key pair (secret key: 64 raw bytes, as libsodium makes them).
// kPermissionDenied when it was not sealed to this key or was altered.
[[nodiscard]] Result<std::string> open_sealed_with_ed25519(std::string_view sealed,
                                                           const Ed25519KeyPair& pair);

// Overwrites a string's bytes with zeros (plaintext secrets, before they are dropped).
void wipe(std::string& secret);

// Constant-time comparison of two equal-length secrets (false when lengths differ).
bool constant_time_equal(std::string_view a, std::string_view b);

}  // namespace outpost::crypto
