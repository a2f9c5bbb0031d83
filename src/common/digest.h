// SHA-256 digests: one-shot and incremental, as lowercase hex and as "sha256:<hex>" refs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/error.h"

namespace outpost {

// Lowercase hex SHA-256 of the bytes.
std::string sha256_hex(std::string_view bytes);

// Incremental hasher for streams (uploads, downloads).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  Sha256(Sha256&&) noexcept;
  Sha256& operator=(Sha256&&) noexcept;

  void update(std::string_view bytes);
  void update(const void* data, size_t size);
  // Lowercase hex; the hasher must not be used afterwards.
  std::string finish_hex();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Hashes a whole file. Errors: kNotFound, kIo.
[[nodiscard]] Result<std::string> sha256_file_hex(const std::string& path);

// True when `ref` is "sha256:" followed by 64 lowercase hex digits.
bool is_digest_ref(std::string_view ref);

std::string hex_encode(std::string_view bytes);

}  // namespace outpost
