#include "common/zstd_delta.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include <zstd.h>

#include "common/digest.h"

namespace outpost::delta {
namespace {

// A read-only mapping of a whole file (empty files map to nothing).
class Mapped {
 public:
  ~Mapped() {
    if (data_ != nullptr) ::munmap(data_, size_);
    if (fd_ >= 0) ::close(fd_);
  }
  Status open(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      return make_error(errno == ENOENT ? Errc::kNotFound : Errc::kIo,
                        "cannot open " + path + ": " + std::strerror(errno));
    }
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      return make_error(Errc::kIo, "cannot stat " + path + ": " + std::strerror(errno));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ == 0) return ok();
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (p == MAP_FAILED) {
      return make_error(Errc::kIo, "cannot map " + path + ": " + std::strerror(errno));
    }
    data_ = p;
    // Read front to back once: let the kernel read ahead and drop pages behind.
    ::madvise(data_, size_, MADV_SEQUENTIAL);
    return ok();
  }
  const char* data() const { return static_cast<const char*>(data_); }
  size_t size() const { return size_; }

 private:
  int fd_ = -1;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// The output file, created (or truncated) 0600 and closed on every path out.
struct OutputFile {
  int fd = -1;
  ~OutputFile() {
    if (fd >= 0) ::close(fd);
  }
  Status create(const std::string& path, int access) {
    fd = ::open(path.c_str(), access | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return make_error(Errc::kIo, "cannot create " + path + ": " + std::strerror(errno));
    return ok();
  }
};

struct CCtxFree {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
struct DCtxFree {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

Status zstd_check(size_t rc, const char* what) {
  if (ZSTD_isError(rc)) {
    return make_error(Errc::kInternal, std::string(what) + ": " + ZSTD_getErrorName(rc));
  }
  return ok();
}

// The smallest window that covers n bytes, within zstd's bounds.
int window_log_for(size_t n) {
  const ZSTD_bounds bounds = ZSTD_cParam_getBounds(ZSTD_c_windowLog);
  int log = std::max(bounds.lowerBound, 10);
  while (log < bounds.upperBound && (size_t{1} << log) < n) ++log;
  return log;
}

Status write_all(int fd, const char* data, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return make_error(Errc::kIo, "cannot write " + path + ": " + std::strerror(errno));
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return ok();
}

}  // namespace

Result<MakeResult> make_delta(const std::string& base_path, const std::string& target_path,
                              const std::string& out_path, const MakeOptions& options) {
  Mapped base;
  Mapped target;
  OUTPOST_TRY(base.open(base_path));
  OUTPOST_TRY(target.open(target_path));
  for (const auto* m : {&base, &target}) {
    if (static_cast<int64_t>(m->size()) > kMaxBlobBytes) {
      return make_error(Errc::kInvalidArgument,
                        (m == &base ? base_path : target_path) + " is larger than the " +
                            std::to_string(kMaxBlobBytes >> 30) + " GiB a delta can cover");
    }
  }
  std::unique_ptr<ZSTD_CCtx, CCtxFree> cctx(ZSTD_createCCtx());
  if (!cctx) return make_error(Errc::kInternal, "ZSTD_createCCtx failed");
  ZSTD_CCtx* c = cctx.get();
  const int level = std::max(1, std::min(options.level, ZSTD_maxCLevel()));
  OUTPOST_TRY(zstd_check(ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level), "level"));
  // The window spans base and target so a match may reach back into any part of the base.
  const int wlog = window_log_for(base.size() + target.size());
  OUTPOST_TRY(zstd_check(ZSTD_CCtx_setParameter(c, ZSTD_c_windowLog, wlog), "window"));
  OUTPOST_TRY(zstd_check(ZSTD_CCtx_setParameter(c, ZSTD_c_enableLongDistanceMatching, 1), "ldm"));
  OUTPOST_TRY(zstd_check(ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1), "checksum"));
  OUTPOST_TRY(zstd_check(ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1), "size flag"));
  if (options.threads > 0) {
    // Ignored (not an error) by a libzstd built without threads.
    ZSTD_CCtx_setParameter(c, ZSTD_c_nbWorkers, options.threads);
  }
  OUTPOST_TRY(zstd_check(ZSTD_CCtx_setPledgedSrcSize(c, target.size()), "pledged size"));
  if (base.size() > 0) {
    OUTPOST_TRY(zstd_check(ZSTD_CCtx_refPrefix(c, base.data(), base.size()), "prefix"));
  }

  OutputFile file;
  OUTPOST_TRY(file.create(out_path, O_WRONLY));
  const int fd = file.fd;

  std::vector<char> buf(ZSTD_CStreamOutSize());
  // Fed in slices so a server that is stopping need not wait for a large blob to finish.
  constexpr size_t kSlice = 4u << 20;
  size_t fed = 0;
  int64_t written = 0;
  while (true) {
    if (options.cancel != nullptr && options.cancel->load()) {
      return make_error(Errc::kUnavailable, "making the delta of " + target_path + ": stopped");
    }
    const size_t slice = std::min(kSlice, target.size() - fed);
    ZSTD_inBuffer in{target.data() + fed, slice, 0};
    const bool last = fed + slice == target.size();
    ZSTD_outBuffer out{buf.data(), buf.size(), 0};
    const size_t left = ZSTD_compressStream2(c, &out, &in, last ? ZSTD_e_end : ZSTD_e_continue);
    fed += in.pos;
    if (ZSTD_isError(left)) {
      return make_error(Errc::kInternal,
                        "compressing " + target_path + ": " + ZSTD_getErrorName(left));
    }
    OUTPOST_TRY(write_all(fd, buf.data(), out.pos, out_path));
    written += static_cast<int64_t>(out.pos);
    if (last && left == 0) break;
  }
  if (::fsync(fd) != 0) return make_error(Errc::kIo, "cannot fsync " + out_path);
  return MakeResult{written, static_cast<int64_t>(target.size())};
}

Result<ApplyResult> apply_delta(const std::string& base_path, const std::string& delta_path,
                                const std::string& out_path, int64_t max_output_bytes) {
  Mapped base;
  Mapped delta;
  OUTPOST_TRY(base.open(base_path));
  OUTPOST_TRY(delta.open(delta_path));
  const unsigned long long declared = ZSTD_getFrameContentSize(delta.data(), delta.size());
  if (declared == ZSTD_CONTENTSIZE_ERROR || declared == ZSTD_CONTENTSIZE_UNKNOWN) {
    return make_error(Errc::kInvalidArgument,
                      delta_path + " is not a zstd delta that declares its output size");
  }
  if (max_output_bytes >= 0 && declared > static_cast<unsigned long long>(max_output_bytes)) {
    return make_error(Errc::kInvalidArgument, delta_path + " would write " +
                                                  std::to_string(declared) + " bytes, more than " +
                                                  std::to_string(max_output_bytes) + " expected");
  }
  // One frame only: trailing bytes mean this is not what make_delta wrote.
  const size_t frame = ZSTD_findFrameCompressedSize(delta.data(), delta.size());
  if (ZSTD_isError(frame) || frame != delta.size()) {
    return make_error(Errc::kInvalidArgument, delta_path + " is not exactly one zstd frame");
  }

  OutputFile file;
  OUTPOST_TRY(file.create(out_path, O_RDWR));
  const int fd = file.fd;
  const size_t size = static_cast<size_t>(declared);
  ApplyResult result;
  result.output_bytes = static_cast<int64_t>(size);
  if (size == 0) {
    result.sha256_hex = sha256_hex("");
    return result;
  }
  if (int e = ::posix_fallocate(fd, 0, static_cast<off_t>(size)); e != 0) {
    return make_error(e == ENOSPC ? Errc::kResourceExhausted : Errc::kIo,
                      "cannot allocate " + std::to_string(size) + " bytes for " + out_path + ": " +
                          std::strerror(e));
  }
  void* mapped = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mapped == MAP_FAILED) {
    return make_error(Errc::kIo, "cannot map " + out_path + ": " + std::strerror(errno));
  }
  struct Unmap {
    void* p;
    size_t n;
    ~Unmap() { ::munmap(p, n); }
  } unmap{mapped, size};

  std::unique_ptr<ZSTD_DCtx, DCtxFree> dctx(ZSTD_createDCtx());
  if (!dctx) return make_error(Errc::kInternal, "ZSTD_createDCtx failed");
  // Single-shot into the mapping: zstd needs no window buffer of its own, the output is it.
  const size_t rc = ZSTD_decompress_usingDict(dctx.get(), mapped, size, delta.data(), delta.size(),
                                              base.data(), base.size());
  if (ZSTD_isError(rc) || rc != size) {
    return make_error(Errc::kIo, "applying " + delta_path + " to " + base_path + ": " +
                                     (ZSTD_isError(rc) ? ZSTD_getErrorName(rc) : "short output") +
                                     " (a corrupt delta, or not its base)");
  }
  if (::msync(mapped, size, MS_SYNC) != 0 || ::fsync(fd) != 0) {
    return make_error(Errc::kIo, "cannot flush " + out_path + ": " + std::strerror(errno));
  }
  Sha256 hasher;
  // Hash in slices, dropping each slice's pages after: the file is on disk already.
  constexpr size_t kSlice = 8u << 20;
  for (size_t off = 0; off < size; off += kSlice) {
    const size_t n = std::min(kSlice, size - off);
    hasher.update(static_cast<const char*>(mapped) + off, n);
    ::madvise(static_cast<char*>(mapped) + off, n, MADV_DONTNEED);
  }
  result.sha256_hex = hasher.finish_hex();
  return result;
}

}  // namespace outpost::delta
