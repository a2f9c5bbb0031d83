// App bundles: the tar.zst archives that carry a workload's files. Unpacking treats every
// archive as hostile (nothing lands outside the target directory); creating one is reproducible.
#pragma once

#include <cstdint>
#include <string>

#include "common/error.h"

namespace outpost::agent {

struct UnpackLimits {
  int64_t max_total_bytes = 4LL << 30;  // sum of regular file sizes
  int64_t max_entries = 100'000;
};

struct UnpackSummary {
  int64_t files = 0;  // regular files, hard links included
  int64_t directories = 0;
  int64_t symlinks = 0;
  int64_t bytes = 0;  // sum of regular file sizes
};

// Unpacks `archive_path` (tar compressed with zstd or gzip, or plain tar) into `dest_dir`,
// which is created and must not exist or be empty (kAlreadyExists otherwise; it is left alone).
// A hostile archive is refused with kInvalidArgument and a message naming the entry
// ("bundle entry ../../etc/passwd: escapes the bundle directory"): absolute paths, ".."
// components, an entry that goes through a symlink or file unpacked earlier, a path that
// appears twice, symlinks whose target is absolute, leaves the bundle or has ".." after a name
// ("../lib/x.so" is fine, "lib/../../x" is not), hard links to anything but a file unpacked
// earlier, devices, fifos and sockets, and more than `limits` allow. setuid, setgid and sticky
// bits are cleared; the executable bits stay; directories keep at least u+rwx and files u+r so
// the agent can fsync and later remove them. Corrupt archive: kInvalidArgument; disk errors:
// kIo or kResourceExhausted. On any error the partly unpacked `dest_dir` is removed. Before
// returning, every file and directory is fsynced (the caller then writes its marker file).
[[nodiscard]] Result<UnpackSummary> unpack_bundle(const std::string& archive_path,
                                                  const std::string& dest_dir,
                                                  const UnpackLimits& limits = {});

// Writes a tar.zst bundle of `source_dir` to `archive_path` (temp file, fsync, rename): regular
// files, directories and relative symlinks that stay inside the tree, sorted by path, with
// mtimes and owners zeroed and modes normalized to 0755 (directories, files with any exec bit)
// or 0644, so the same tree always gives the same bytes and the same sha256. Anything else in
// the tree (absolute or escaping symlinks, devices, fifos, sockets) is refused with
// kInvalidArgument naming it.
[[nodiscard]] Status create_bundle(const std::string& source_dir, const std::string& archive_path);

}  // namespace outpost::agent
