// Content-addressed blobs on disk under DATA/blobs/sha256/<hex>. A blob enters only whole:
// uploaded to a temp file, hashed, fsynced, renamed into place, directory fsynced.
#pragma once

#include <cstdint>
#include <string>

#include "common/error.h"

namespace outpost::server::registry {

struct IngestedBlob {
  std::string digest;  // "sha256:<hex>"
  int64_t size = 0;
  bool created = false;  // false: an identical blob was already stored (deduplicated)
};

// Thread-safe (operations are independent files; renames are atomic).
class BlobStore {
 public:
  explicit BlobStore(std::string root);  // root = DATA/blobs

  // Creates the directory layout. Call once at start.
  [[nodiscard]] Status init();

  // Moves a fully received temp file into the store. The temp file is consumed (renamed or
  // removed). When expected_digest is non-empty and differs, fails with kInvalidArgument.
  [[nodiscard]] Result<IngestedBlob> ingest(const std::string& temp_path,
                                            const std::string& expected_digest = {});

  // Path of a stored blob ("" when the digest is malformed).
  std::string path_for(const std::string& digest) const;
  // Size of a stored blob, kNotFound when absent.
  [[nodiscard]] Result<int64_t> size_of(const std::string& digest) const;

  const std::string& temp_dir() const { return temp_dir_; }

 private:
  std::string root_;
  std::string temp_dir_;
};

}  // namespace outpost::server::registry
