#include "server/registry/blob_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/digest.h"
#include "common/durable_file.h"

namespace outpost::server::registry {

BlobStore::BlobStore(std::string root) : root_(std::move(root)), temp_dir_(root_ + "/tmp") {}

Status BlobStore::init() {
  OUTPOST_TRY(make_dirs(root_ + "/sha256", 0750));
  OUTPOST_TRY(make_dirs(temp_dir_, 0750));
  return ok();
}

std::string BlobStore::path_for(const std::string& digest) const {
  if (!is_digest_ref(digest)) return {};
  return root_ + "/sha256/" + digest.substr(7);
}

Result<int64_t> BlobStore::size_of(const std::string& digest) const {
  std::string path = path_for(digest);
  struct stat st {};
  if (path.empty() || ::stat(path.c_str(), &st) != 0) {
    return make_error(Errc::kNotFound, "artifact " + digest + " is not stored");
  }
  return static_cast<int64_t>(st.st_size);
}

Result<IngestedBlob> BlobStore::ingest(const std::string& temp_path,
                                       const std::string& expected_digest) {
  auto discard = [&] { ::unlink(temp_path.c_str()); };
  auto hex = sha256_file_hex(temp_path);
  if (!hex) {
    discard();
    return make_error(hex.error().with_context("hashing upload"));
  }
  IngestedBlob blob;
  blob.digest = "sha256:" + *hex;
  if (!expected_digest.empty() && expected_digest != blob.digest) {
    discard();
    return make_error(Errc::kInvalidArgument, "upload does not match its declared digest: got " +
                                                  blob.digest + ", expected " + expected_digest);
  }
  struct stat st {};
  if (::stat(temp_path.c_str(), &st) != 0) {
    discard();
    return make_error(Errc::kIo, "upload vanished: " + temp_path);
  }
  blob.size = static_cast<int64_t>(st.st_size);
  std::string final_path = path_for(blob.digest);
  if (::access(final_path.c_str(), F_OK) == 0) {
    discard();
    blob.created = false;
    return blob;
  }
  if (auto synced = fsync_path(temp_path); !synced) {
    discard();
    return make_error(synced.error());
  }
  ::chmod(temp_path.c_str(), 0640);
  if (auto renamed = rename_durably(temp_path, final_path); !renamed) {
    discard();
    return make_error(renamed.error());
  }
  blob.created = true;
  return blob;
}

}  // namespace outpost::server::registry
