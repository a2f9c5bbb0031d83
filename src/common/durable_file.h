// The durability idiom, used everywhere a file must survive a crash whole or not at all:
// write a temp file beside the target, fsync it, rename it over the target, fsync the dir.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace outpost {

// Atomically replaces `path` with `contents` (mode applied before the rename).
[[nodiscard]] Status write_file_durably(const std::string& path, std::string_view contents,
                                        unsigned mode = 0644);

// Renames a fully written (and already fsynced) file into place and fsyncs the target dir.
[[nodiscard]] Status rename_durably(const std::string& from, const std::string& to);

// fsyncs a file or directory by path.
[[nodiscard]] Status fsync_path(const std::string& path);

// Reads a whole file. kNotFound when it does not exist.
[[nodiscard]] Result<std::string> read_file(const std::string& path);

// Names in a directory (without "." and ".."), unsorted; empty when it cannot be read.
std::vector<std::string> list_directory(const std::string& dir);

// mkdir -p with the given mode for created directories.
[[nodiscard]] Status make_dirs(const std::string& path, unsigned mode = 0755);

}  // namespace outpost
