#include "agent/activate/bundle.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string_view>
#include <vector>

#include "common/durable_file.h"

namespace outpost::agent {
namespace {

namespace fs = std::filesystem;

struct ReadArchiveFree {
  void operator()(archive* a) const { archive_read_free(a); }
};
struct WriteArchiveFree {
  void operator()(archive* a) const { archive_write_free(a); }
};
struct EntryFree {
  void operator()(archive_entry* e) const { archive_entry_free(e); }
};
using ReadArchive = std::unique_ptr<archive, ReadArchiveFree>;
using WriteArchive = std::unique_ptr<archive, WriteArchiveFree>;
using Entry = std::unique_ptr<archive_entry, EntryFree>;

enum class Kind { kDirectory, kFile, kSymlink };

std::string str(const char* s) { return s != nullptr ? s : ""; }

Error invalid(std::string message) { return Error{Errc::kInvalidArgument, std::move(message), {}}; }

Error invalid_entry(std::string_view entry, std::string_view reason) {
  return invalid("bundle entry " + std::string(entry) + ": " + std::string(reason));
}

Error io_error(const std::string& what, int err) {
  Errc code = (err == ENOSPC || err == EDQUOT) ? Errc::kResourceExhausted
              : err == ENOENT                  ? Errc::kNotFound
                                               : Errc::kIo;
  return Error{code, what + ": " + std::strerror(err), {}};
}

// Errors from reading the archive are about its bytes (corrupt, truncated, not a tar) unless
// libarchive saw a real I/O errno.
Error read_error(archive* a, const std::string& what) {
  int err = archive_errno(a);
  Errc code = err == ENOENT                                   ? Errc::kNotFound
              : (err == EIO || err == EACCES || err == EPERM) ? Errc::kIo
                                                              : Errc::kInvalidArgument;
  return Error{code, what + ": " + str(archive_error_string(a)), {}};
}

// Errors from writing to disk: libarchive's own refusals carry ARCHIVE_ERRNO_MISC (< 0).
Error write_error(archive* a, const std::string& what) {
  int err = archive_errno(a);
  Errc code = (err == ENOSPC || err == EDQUOT) ? Errc::kResourceExhausted
              : err > 0                        ? Errc::kIo
                                               : Errc::kInvalidArgument;
  return Error{code, what + ": " + str(archive_error_string(a)), {}};
}

// The names of a path, without empty and "." ones: "./a//b/" -> {"a", "b"}.
std::vector<std::string_view> path_names(std::string_view path) {
  std::vector<std::string_view> names;
  while (!path.empty()) {
    size_t slash = path.find('/');
    std::string_view name = path.substr(0, slash);
    if (!name.empty() && name != ".") names.push_back(name);
    if (slash == std::string_view::npos) break;
    path.remove_prefix(slash + 1);
  }
  return names;
}

// An entry path (or hard link target) in normal form ("a/b"; "" for the bundle root).
Result<std::string> normal_entry_path(std::string_view path) {
  if (!path.empty() && path.front() == '/') return make_error(invalid("is an absolute path"));
  std::string normal;
  for (std::string_view name : path_names(path)) {
    if (name == "..") return make_error(invalid("escapes the bundle directory"));
    if (!normal.empty()) normal += '/';
    normal += name;
  }
  return normal;
}

// A symlink may climb with leading ".." (never above the bundle root), then only descend. A
// ".." after a name is refused: the name may be another symlink, and climbing from where that
// one points could leave the bundle. Since entries never go through symlinks, a link's own
// directory is real, so this keeps every link (and chains of links) inside.
Status check_symlink_target(std::string_view link_path, std::string_view target) {
  if (target.empty()) return make_error(invalid("symlink has an empty target"));
  std::string quoted = "symlink target " + std::string(target);
  if (target.front() == '/') return make_error(invalid(quoted + " is absolute"));
  size_t depth = path_names(link_path).size() - 1;
  size_t ups = 0;
  bool descended = false;
  for (std::string_view name : path_names(target)) {
    if (name != "..") {
      descended = true;
    } else if (descended) {
      return make_error(invalid(quoted + " has .. after a name"));
    } else if (++ups > depth) {
      return make_error(invalid(quoted + " escapes the bundle directory"));
    }
  }
  return ok();
}

const char* special_type_name(mode_t type) {
  switch (type) {
    case AE_IFCHR:
      return "a character device";
    case AE_IFBLK:
      return "a block device";
    case AE_IFIFO:
      return "a fifo";
    case AE_IFSOCK:
      return "a socket";
    default:
      return "of an unknown type";
  }
}

// fsyncs every file and directory under `root`, then `root` and its parent (root is new).
Status fsync_tree(const std::string& root) {
  std::error_code ec;
  for (fs::recursive_directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    fs::file_type type = it->symlink_status(ec).type();
    if (ec) break;
    if (type == fs::file_type::regular || type == fs::file_type::directory) {
      OUTPOST_TRY(fsync_path(it->path().string()));
    }
  }
  if (ec) return make_error(Errc::kIo, "walking " + root + ": " + ec.message());
  OUTPOST_TRY(fsync_path(root));
  return fsync_path(fs::path(root).parent_path().string());
}

// Copies one entry's data; the blocks must stay within the size the header declared.
Status copy_entry_data(archive* in, archive* out, std::string_view name, int64_t declared) {
  while (true) {
    const void* block = nullptr;
    size_t size = 0;
    la_int64_t offset = 0;
    int r = archive_read_data_block(in, &block, &size, &offset);
    if (r == ARCHIVE_EOF) return ok();
    if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
      return make_error(read_error(in, "reading bundle entry " + std::string(name)));
    }
    if (offset < 0 || offset > declared || static_cast<int64_t>(size) > declared - offset) {
      return make_error(invalid_entry(name, "has more data than its declared size"));
    }
    if (archive_write_data_block(out, block, size, offset) < ARCHIVE_WARN) {
      return make_error(write_error(out, "writing bundle entry " + std::string(name)));
    }
  }
}

Result<UnpackSummary> unpack_into(const std::string& archive_path, const std::string& dest_dir,
                                  const UnpackLimits& limits) {
  // Entries get the absolute real path of dest_dir as prefix (no chdir: the agent is
  // multi-threaded), so libarchive's NOABSOLUTEPATHS cannot be used; absolute entry paths are
  // refused below instead. The real path keeps SECURE_SYMLINKS from tripping on a symlink above
  // dest_dir (/tmp on some systems).
  std::unique_ptr<char, decltype(&::free)> real(::realpath(dest_dir.c_str(), nullptr), &::free);
  if (!real) return make_error(io_error("resolving " + dest_dir, errno));
  const std::string root = real.get();

  ReadArchive in(archive_read_new());
  WriteArchive out(archive_write_disk_new());
  if (!in || !out) return make_error(Errc::kResourceExhausted, "libarchive: out of memory");
  archive_read_support_filter_all(in.get());
  archive_read_support_format_tar(in.get());
  if (archive_read_open_filename(in.get(), archive_path.c_str(), 64 * 1024) != ARCHIVE_OK) {
    return make_error(read_error(in.get(), "opening bundle " + archive_path));
  }
  archive_write_disk_set_options(out.get(), ARCHIVE_EXTRACT_PERM | ARCHIVE_EXTRACT_SECURE_SYMLINKS |
                                                ARCHIVE_EXTRACT_SECURE_NODOTDOT);

  UnpackSummary summary;
  int64_t entries = 0;
  std::map<std::string, Kind> unpacked;  // normal path -> kind; implicit parents as directories
  while (true) {
    archive_entry* entry = nullptr;
    int r = archive_read_next_header(in.get(), &entry);
    if (r == ARCHIVE_EOF) break;
    if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
      return make_error(read_error(in.get(), "reading bundle " + archive_path));
    }
    const std::string name = str(archive_entry_pathname(entry));
    if (++entries > limits.max_entries) {
      return make_error(invalid("bundle " + archive_path + ": has more than " +
                                std::to_string(limits.max_entries) + " entries"));
    }
    auto normal = normal_entry_path(name);
    if (!normal) return make_error(invalid_entry(name, normal.error().message));

    const std::string hardlink = str(archive_entry_hardlink(entry));
    const mode_t type = archive_entry_filetype(entry);
    Kind kind = Kind::kFile;
    if (hardlink.empty() && type == AE_IFDIR) {
      kind = Kind::kDirectory;
    } else if (hardlink.empty() && type == AE_IFLNK) {
      kind = Kind::kSymlink;
    } else if (hardlink.empty() && type != AE_IFREG) {
      return make_error(invalid_entry(name, std::string("is ") + special_type_name(type) +
                                                "; bundles hold files, directories and symlinks"));
    }
    if (normal->empty()) {
      if (kind == Kind::kDirectory) continue;  // "./": the bundle directory itself
      return make_error(invalid_entry(name, "is not a directory but names the bundle root"));
    }

    // Nothing may land through something unpacked earlier, nor replace it.
    std::vector<std::string_view> names = path_names(*normal);
    std::string parent;
    for (size_t i = 0; i + 1 < names.size(); ++i) {
      if (i > 0) parent += '/';
      parent += names[i];
      auto it = unpacked.find(parent);
      if (it != unpacked.end() && it->second != Kind::kDirectory) {
        return make_error(invalid_entry(
            name, "goes through the " +
                      std::string(it->second == Kind::kSymlink ? "symlink " : "file ") + parent +
                      " unpacked earlier"));
      }
    }
    if (auto it = unpacked.find(*normal);
        it != unpacked.end() && !(it->second == Kind::kDirectory && kind == Kind::kDirectory)) {
      return make_error(invalid_entry(name, "is in the bundle twice"));
    }

    if (!hardlink.empty()) {
      auto target = normal_entry_path(hardlink);
      if (!target) {
        return make_error(
            invalid_entry(name, "hard link target " + hardlink + " " + target.error().message));
      }
      auto it = unpacked.find(*target);
      if (it == unpacked.end() || it->second != Kind::kFile) {
        return make_error(invalid_entry(
            name, "hard link target " + hardlink + " is not a file unpacked earlier"));
      }
      archive_entry_copy_hardlink(entry, (root + "/" + *target).c_str());
    } else if (kind == Kind::kSymlink) {
      auto checked = check_symlink_target(*normal, str(archive_entry_symlink(entry)));
      if (!checked) return make_error(invalid_entry(name, checked.error().message));
    }

    // No setuid/setgid/sticky; the agent must be able to read, fsync and remove what it unpacks.
    mode_t perm = archive_entry_perm(entry) & 0777;
    if (kind == Kind::kDirectory) perm |= 0700;
    if (kind == Kind::kFile) perm |= 0400;
    archive_entry_set_perm(entry, perm);

    int64_t size = 0;
    if (kind == Kind::kFile) {
      size = archive_entry_size_is_set(entry) != 0 ? archive_entry_size(entry) : 0;
      if (size < 0 || size > limits.max_total_bytes - summary.bytes) {
        return make_error(invalid_entry(name, "takes the bundle over its limit of " +
                                                  std::to_string(limits.max_total_bytes) +
                                                  " bytes"));
      }
    }

    archive_entry_copy_pathname(entry, (root + "/" + *normal).c_str());
    if (archive_write_header(out.get(), entry) < ARCHIVE_WARN) {
      return make_error(write_error(out.get(), "unpacking bundle entry " + name));
    }
    if (kind == Kind::kFile) OUTPOST_TRY(copy_entry_data(in.get(), out.get(), name, size));
    if (archive_write_finish_entry(out.get()) < ARCHIVE_WARN) {
      return make_error(write_error(out.get(), "unpacking bundle entry " + name));
    }

    parent.clear();
    for (size_t i = 0; i + 1 < names.size(); ++i) {
      if (i > 0) parent += '/';
      parent += names[i];
      unpacked.try_emplace(parent, Kind::kDirectory);
    }
    unpacked[*normal] = kind;
    switch (kind) {
      case Kind::kDirectory:
        ++summary.directories;
        break;
      case Kind::kFile:
        ++summary.files;
        summary.bytes += size;
        break;
      case Kind::kSymlink:
        ++summary.symlinks;
        break;
    }
  }
  // Close applies the deferred directory modes.
  if (archive_write_close(out.get()) < ARCHIVE_WARN) {
    return make_error(write_error(out.get(), "unpacking bundle " + archive_path));
  }
  OUTPOST_TRY(fsync_tree(root));
  return summary;
}

// Every path under `dir`, relative to it, sorted so parents come before their children.
Status list_tree(const fs::path& dir, const std::string& rel, std::vector<std::string>* out) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string child =
        rel.empty() ? it->path().filename().string() : rel + "/" + it->path().filename().string();
    out->push_back(child);
    fs::file_type type = it->symlink_status(ec).type();
    if (ec) break;
    if (type == fs::file_type::directory) OUTPOST_TRY(list_tree(it->path(), child, out));
  }
  if (ec) return make_error(Errc::kIo, "listing " + dir.string() + ": " + ec.message());
  return ok();
}

Status write_file_data(archive* out, const std::string& path, int64_t size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return make_error(io_error("opening " + path, errno));
  std::vector<char> buf(64 * 1024);
  int64_t left = size;
  while (left > 0) {
    ssize_t n = ::read(fd, buf.data(), static_cast<size_t>(std::min<int64_t>(left, buf.size())));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      return make_error(io_error("reading " + path, err));
    }
    if (n == 0) break;
    if (archive_write_data(out, buf.data(), static_cast<size_t>(n)) != n) {
      ::close(fd);
      return make_error(write_error(out, "writing " + path + " into the bundle"));
    }
    left -= n;
  }
  ::close(fd);
  if (left > 0) return make_error(Errc::kIo, path + ": shrank while being bundled");
  return ok();
}

Status write_bundle(const std::string& source_dir, const std::vector<std::string>& paths,
                    archive* out) {
  for (const std::string& rel : paths) {
    const std::string full = source_dir + "/" + rel;
    struct stat st {};
    if (::lstat(full.c_str(), &st) != 0) return make_error(io_error("reading " + full, errno));
    Entry entry(archive_entry_new());
    if (!entry) return make_error(Errc::kResourceExhausted, "libarchive: out of memory");
    archive_entry_copy_pathname(entry.get(), rel.c_str());
    archive_entry_set_uid(entry.get(), 0);
    archive_entry_set_gid(entry.get(), 0);
    archive_entry_set_mtime(entry.get(), 0, 0);
    if (S_ISDIR(st.st_mode)) {
      archive_entry_set_filetype(entry.get(), AE_IFDIR);
      archive_entry_set_perm(entry.get(), 0755);
    } else if (S_ISREG(st.st_mode)) {
      archive_entry_set_filetype(entry.get(), AE_IFREG);
      archive_entry_set_perm(entry.get(), (st.st_mode & 0111) != 0 ? 0755 : 0644);
      archive_entry_set_size(entry.get(), st.st_size);
    } else if (S_ISLNK(st.st_mode)) {
      std::string target(static_cast<size_t>(st.st_size) + 1, '\0');
      ssize_t n = ::readlink(full.c_str(), target.data(), target.size());
      if (n < 0) return make_error(io_error("reading the symlink " + full, errno));
      if (static_cast<size_t>(n) >= target.size()) {
        return make_error(Errc::kIo, full + ": symlink changed while being bundled");
      }
      target.resize(static_cast<size_t>(n));
      auto checked = check_symlink_target(rel, target);
      if (!checked) return make_error(invalid(full + ": " + checked.error().message));
      archive_entry_set_filetype(entry.get(), AE_IFLNK);
      archive_entry_set_perm(entry.get(), 0777);
      archive_entry_copy_symlink(entry.get(), target.c_str());
    } else {
      return make_error(invalid(full + ": is " + special_type_name(st.st_mode & S_IFMT) +
                                "; bundles hold files, directories and symlinks"));
    }
    if (archive_write_header(out, entry.get()) < ARCHIVE_WARN) {
      return make_error(write_error(out, "writing " + rel + " into the bundle"));
    }
    if (S_ISREG(st.st_mode)) OUTPOST_TRY(write_file_data(out, full, st.st_size));
  }
  if (archive_write_close(out) < ARCHIVE_WARN) {
    return make_error(write_error(out, "finishing the bundle"));
  }
  return ok();
}

}  // namespace

Result<UnpackSummary> unpack_bundle(const std::string& archive_path, const std::string& dest_dir,
                                    const UnpackLimits& limits) {
  struct stat st {};
  if (::lstat(dest_dir.c_str(), &st) == 0) {
    std::error_code ec;
    if (!S_ISDIR(st.st_mode) || !fs::is_empty(dest_dir, ec) || ec) {
      return make_error(Errc::kAlreadyExists, "unpacking bundle " + archive_path + " into " +
                                                  dest_dir + ": not an empty directory");
    }
  } else if (errno != ENOENT) {
    return make_error(io_error("unpacking bundle into " + dest_dir, errno));
  }
  OUTPOST_TRY(make_dirs(dest_dir));
  auto summary = unpack_into(archive_path, dest_dir, limits);
  if (!summary) {
    std::error_code ec;
    fs::remove_all(dest_dir, ec);  // best effort; the error that matters is the one returned
  }
  return summary;
}

Status create_bundle(const std::string& source_dir, const std::string& archive_path) {
  struct stat st {};
  if (::stat(source_dir.c_str(), &st) != 0) {
    return make_error(io_error("bundling " + source_dir, errno));
  }
  if (!S_ISDIR(st.st_mode)) return make_error(invalid(source_dir + ": is not a directory"));
  std::vector<std::string> paths;
  OUTPOST_TRY(list_tree(source_dir, "", &paths));
  std::sort(paths.begin(), paths.end());

  const std::string tmp = archive_path + ".tmp." + std::to_string(::getpid());
  Status written = [&]() -> Status {
    WriteArchive out(archive_write_new());
    if (!out) return make_error(Errc::kResourceExhausted, "libarchive: out of memory");
    if (archive_write_set_format_pax_restricted(out.get()) != ARCHIVE_OK ||
        archive_write_add_filter_zstd(out.get()) != ARCHIVE_OK ||
        archive_write_open_filename(out.get(), tmp.c_str()) != ARCHIVE_OK) {
      return make_error(write_error(out.get(), "creating bundle " + tmp));
    }
    OUTPOST_TRY(write_bundle(source_dir, paths, out.get()));
    OUTPOST_TRY(fsync_path(tmp));
    return rename_durably(tmp, archive_path);
  }();
  if (!written) {
    ::unlink(tmp.c_str());
    return make_error(written.error().with_context("bundling " + source_dir));
  }
  return ok();
}

}  // namespace outpost::agent
