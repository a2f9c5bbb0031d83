// Small wrappers over libsodium: random secrets, base64, Ed25519 keys and signatures.
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

// Constant-time comparison of two equal-length secrets (false when lengths differ).
bool constant_time_equal(std::string_view a, std::string_view b);

}  // namespace outpost::crypto
