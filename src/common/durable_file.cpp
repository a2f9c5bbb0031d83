#include "common/durable_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

namespace outpost {
namespace {

Error io_error(const std::string& what, const std::string& path, int err) {
  return Error{
      err == ENOENT ? Errc::kNotFound : (err == ENOSPC ? Errc::kResourceExhausted : Errc::kIo),
      what + " " + path + ": " + std::strerror(err),
      {}};
}

std::string parent_dir(const std::string& path) {
  auto parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? "." : parent.string();
}

Status write_all(int fd, std::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return make_error(io_error("writing", path, errno));
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return ok();
}

}  // namespace

Status fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error(io_error("opening", path, errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return make_error(io_error("fsyncing", path, err));
  return ok();
}

Status rename_durably(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    return make_error(io_error("renaming " + from + " to", to, errno));
  }
  return fsync_path(parent_dir(to));
}

Status write_file_durably(const std::string& path, std::string_view contents, unsigned mode) {
  std::random_device rd;
  std::string tmp = path + ".tmp." + std::to_string(rd());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return make_error(io_error("creating", tmp, errno));
  auto cleanup = [&] { ::unlink(tmp.c_str()); };
  if (auto written = write_all(fd, contents, tmp); !written) {
    ::close(fd);
    cleanup();
    return written;
  }
  if (::fchmod(fd, mode) != 0 || ::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    cleanup();
    return make_error(io_error("syncing", tmp, err));
  }
  ::close(fd);
  if (auto renamed = rename_durably(tmp, path); !renamed) {
    cleanup();
    return renamed;
  }
  return ok();
}

Result<std::string> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error(io_error("opening", path, errno));
  std::string out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return make_error(io_error("reading", path, err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

Status make_dirs(const std::string& path, unsigned mode) {
  std::error_code ec;
  std::filesystem::path p(path);
  std::filesystem::path built;
  for (const auto& part : p) {
    built /= part;
    if (built.empty() || std::filesystem::exists(built, ec)) continue;
    if (::mkdir(built.c_str(), mode) != 0 && errno != EEXIST) {
      return make_error(io_error("creating directory", built.string(), errno));
    }
  }
  return ok();
}

std::vector<std::string> list_directory(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  ::closedir(d);
  return out;
}

}  // namespace outpost
