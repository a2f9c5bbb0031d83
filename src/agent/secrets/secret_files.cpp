#include "agent/secrets/secret_files.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include <spdlog/spdlog.h>

#include "common/durable_file.h"

namespace outpost::agent {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Names become path components: the server allows less, but this is checked again here.
bool is_safe_component(const std::string& name) {
  if (name.empty() || name.size() > 128 || name.front() == '.') return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

bool is_tmpfs(const std::string& path) {
  struct statfs st {};
  return ::statfs(path.c_str(), &st) == 0 && st.f_type == TMPFS_MAGIC;
}

// A directory we own, 0700, not a symlink; made when missing.
Status private_dir(const std::string& path) {
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
    return make_error(Errc::kIo, "creating " + path + ": " + std::strerror(errno));
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    return make_error(Errc::kIo, path + ": " + std::strerror(errno));
  }
  if (!S_ISDIR(st.st_mode) || st.st_uid != ::geteuid()) {
    return make_error(Errc::kPermissionDenied,
                      path +
                          " is not a directory owned by this user (a symlink or someone "
                          "else's?); refusing to put secrets there");
  }
  if ((st.st_mode & 0777) != 0700 && ::chmod(path.c_str(), 0700) != 0) {
    return make_error(Errc::kIo, "chmod 0700 " + path + ": " + std::strerror(errno));
  }
  return ok();
}

Status write_secret_file(const std::string& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0400);
  if (fd < 0) return make_error(Errc::kIo, "creating " + path + ": " + std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return make_error(Errc::kIo, "writing " + path + ": " + std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return ok();
}

}  // namespace

SealedSecrets sealed_secrets_of(const json& doc) {
  SealedSecrets out;
  if (!doc.is_object() || !doc.contains("secrets") || !doc["secrets"].is_object()) return out;
  for (const auto& [name, versions] : doc["secrets"].items()) {
    if (!is_safe_component(name) || !versions.is_array()) {
      spdlog::warn("desired state: secret entry {:.64} is malformed; ignored", name);
      continue;
    }
    std::vector<SealedSecretVersion> list;
    for (const auto& v : versions) {
      if (!v.is_object() || !v.contains("version") || !v["version"].is_number_integer() ||
          !v.contains("activate_at") || !v["activate_at"].is_number_integer() ||
          !v.contains("sealed") || !v["sealed"].is_string()) {
        spdlog::warn("desired state: a version of secret {} is malformed; ignored", name);
        continue;
      }
      list.push_back({v["version"].get<int64_t>(), v["activate_at"].get<int64_t>(),
                      v["sealed"].get<std::string>()});
    }
    std::sort(list.begin(), list.end(),
              [](const auto& a, const auto& b) { return a.version < b.version; });
    if (!list.empty()) out[name] = std::move(list);
  }
  return out;
}

const SealedSecretVersion* active_secret_version(const std::vector<SealedSecretVersion>& versions,
                                                 int64_t now_ms) {
  const SealedSecretVersion* active = nullptr;
  for (const auto& v : versions) {
    if (v.activate_at <= now_ms && (active == nullptr || v.version > active->version)) active = &v;
  }
  return active;
}

const SealedSecretVersion* staged_secret_version(const std::vector<SealedSecretVersion>& versions,
                                                 int64_t now_ms) {
  const SealedSecretVersion* active = active_secret_version(versions, now_ms);
  const SealedSecretVersion* staged = nullptr;
  for (const auto& v : versions) {
    if (v.activate_at > now_ms && (active == nullptr || v.version > active->version) &&
        (staged == nullptr || v.activate_at < staged->activate_at)) {
      staged = &v;
    }
  }
  return staged;
}

int64_t next_secret_activation(const SealedSecrets& secrets, int64_t now_ms) {
  int64_t next = 0;
  for (const auto& [name, versions] : secrets) {
    if (const auto* staged = staged_secret_version(versions, now_ms)) {
      if (next == 0 || staged->activate_at < next) next = staged->activate_at;
    }
  }
  return next;
}

Result<SecretValues> open_secret_version(const std::string& name,
                                         const SealedSecretVersion& version,
                                         const crypto::Ed25519KeyPair& device_key) {
  const std::string what = "secret " + name + " version " + std::to_string(version.version);
  auto sealed = crypto::base64_decode(version.sealed);
  if (!sealed) return make_error(Errc::kInvalidArgument, what + ": sealed value is not base64");
  auto opened = crypto::open_sealed_with_ed25519(*sealed, device_key);
  if (!opened) return make_error(opened.error().with_context(what));
  json payload = json::parse(*opened, nullptr, false);
  crypto::wipe(*opened);
  if (!payload.is_object() || payload.value("name", "") != name ||
      payload.value("version", int64_t{-1}) != version.version || !payload.contains("data") ||
      !payload["data"].is_object()) {
    return make_error(Errc::kPermissionDenied,
                      what + ": the sealed payload names another secret or version; refused");
  }
  SecretValues values;
  for (auto& [key, value] : payload["data"].items()) {
    if (!is_safe_component(key) || !value.is_string()) {
      return make_error(Errc::kInvalidArgument,
                        what + ": key " + key.substr(0, 64) + " is not a safe file name; refused");
    }
    auto bytes = crypto::base64_decode(value.get<std::string>());
    if (!bytes) return make_error(Errc::kInvalidArgument, what + ": key " + key + " is not base64");
    values[key] = std::move(*bytes);
    std::string& text = value.get_ref<std::string&>();
    crypto::wipe(text);
  }
  return values;
}

Result<std::string> prepare_secrets_base(const std::string& preferred, const std::string& data_dir,
                                         const std::string& device_id, bool* on_tmpfs) {
  std::string parent;
  if (!preferred.empty()) {
    parent = preferred;
  } else {
    const char* xdg = std::getenv("XDG_RUNTIME_DIR");
    for (const char* candidate : {xdg, "/dev/shm"}) {
      if (candidate != nullptr && *candidate != '\0' && is_tmpfs(candidate) &&
          ::access(candidate, W_OK | X_OK) == 0) {
        parent = candidate;
        break;
      }
    }
  }
  std::string base;
  if (parent.empty()) {
    // No tmpfs: a private folder under the data directory (on disk: see the README).
    base = data_dir + "/secrets-run";
  } else {
    if (!preferred.empty()) OUTPOST_TRY(make_dirs(parent, 0700));
    base = parent + "/outpost-agent-" + device_id;
  }
  OUTPOST_TRY(private_dir(base));
  if (on_tmpfs != nullptr) *on_tmpfs = is_tmpfs(base);
  return base;
}

Status SecretFiles::write(const std::string& secret, int64_t version,
                          const SecretValues& values) const {
  if (!is_safe_component(secret)) {
    return make_error(Errc::kInvalidArgument, "secret name " + secret + " is not a safe file name");
  }
  OUTPOST_TRY(private_dir(dir_));
  const std::string folder = "." + secret + ".v" + std::to_string(version);
  const std::string path = dir_ + "/" + folder;
  std::error_code ec;
  fs::remove_all(path, ec);  // a half-written one from a crash
  OUTPOST_TRY(private_dir(path));
  for (const auto& [key, value] : values) {
    if (!is_safe_component(key)) {
      return make_error(Errc::kInvalidArgument,
                        "secret " + secret + ": key " + key + " is not a safe file name");
    }
    OUTPOST_TRY(write_secret_file(path + "/" + key, value));
  }
  // Read and list only: the workload cannot drop or add files under it.
  if (::chmod(path.c_str(), 0500) != 0) {
    return make_error(Errc::kIo, "chmod 0500 " + path + ": " + std::strerror(errno));
  }
  const std::string link = dir_ + "/" + secret;
  const std::string tmp = dir_ + "/." + secret + ".link";
  ::unlink(tmp.c_str());
  if (::symlink(folder.c_str(), tmp.c_str()) != 0) {
    return make_error(Errc::kIo, "symlink " + tmp + ": " + std::strerror(errno));
  }
  if (::rename(tmp.c_str(), link.c_str()) != 0) {
    return make_error(Errc::kIo, "rename to " + link + ": " + std::strerror(errno));
  }
  // The versions this link no longer names.
  const std::string prefix = "." + secret + ".v";
  std::vector<fs::path> old;
  for (const auto& entry : fs::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    const bool numbered = name.size() > prefix.size() &&
                          std::all_of(name.begin() + static_cast<long>(prefix.size()), name.end(),
                                      [](char c) { return c >= '0' && c <= '9'; });
    if (name.rfind(prefix, 0) == 0 && numbered && name != folder) old.push_back(entry.path());
  }
  for (const auto& p : old) {
    ::chmod(p.c_str(), 0700);
    fs::remove_all(p, ec);
  }
  return ok();
}

void SecretFiles::remove_except(const std::set<std::string>& keep) const {
  if (keep.empty()) return;
  std::error_code ec;
  std::vector<fs::path> doomed;
  for (const auto& entry : fs::directory_iterator(dir_, ec)) {
    std::string name = entry.path().filename().string();
    std::string secret = name;
    if (!name.empty() && name.front() == '.') {
      // .<secret>.v<N> or .<secret>.link
      secret = name.substr(1);
      if (auto dot = secret.rfind('.'); dot != std::string::npos) secret.resize(dot);
    }
    if (!keep.contains(secret)) doomed.push_back(entry.path());
  }
  for (const auto& path : doomed) {
    ::chmod(path.c_str(), 0700);
    fs::remove_all(path, ec);
  }
}

void SecretFiles::remove_all() const {
  std::error_code ec;
  if (!fs::exists(dir_, ec)) return;
  for (const auto& entry :
       fs::recursive_directory_iterator(dir_, fs::directory_options::skip_permission_denied, ec)) {
    if (entry.is_directory(ec) && !entry.is_symlink(ec)) ::chmod(entry.path().c_str(), 0700);
  }
  fs::remove_all(dir_, ec);
}

std::string secret_env_name(const std::string& secret, const std::string& key) {
  std::string out = "OUTPOST_SECRET_";
  auto add = [&out](const std::string& part) {
    for (char c : part) {
      out += std::isalnum(static_cast<unsigned char>(c))
                 ? static_cast<char>(std::toupper(static_cast<unsigned char>(c)))
                 : '_';
    }
  };
  add(secret);
  out += '_';
  add(key);
  return out;
}

}  // namespace outpost::agent
