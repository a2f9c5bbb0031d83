// outpost-delta-bench: bytes on the wire for a model update with zstd patch-from deltas
// (common/zstd_delta, the code the server and agent run), against sending the full file.
// For one base/target pair and each method and level it measures
//   full      the target's size, and plain zstd of it at the same level (no delta);
//   delta     make_delta's output size, its wall time and the make step's peak RSS;
//   apply     apply_delta's wall time and peak RSS, and the applied output's SHA-256, which
//             must equal the target's (the bench fails otherwise).
// Methods: `plain` is patch-from on the files as they are; `bytegroup` first splits the whole
// file into 4 byte planes (every byte 0 of each 4-byte word, then every byte 1, ...: the
// ZipNN idea for FP32 weights), does patch-from between the transformed files, and on apply
// transforms the base, applies, and inverts the transform (all inside the timed step).
// Each step runs in a forked child, so its ru_maxrss (wait4) is its own peak, not the bench's;
// a sampler thread in the child also records the peak anonymous and file-backed RSS.
// See bench/README.md.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <zstd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/digest.h"
#include "common/zstd_delta.h"

namespace outpost::bench {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string base;
  std::string target;
  std::string name;
  std::vector<int> levels{19};
  std::vector<std::string> methods{"plain", "bytegroup"};
  std::string work;
  int apply_reps = 3;
  int threads = 0;
  std::string output = "json";
  bool md_header = false;
};

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "outpost-delta-bench: %s\n", message.c_str());
  std::exit(1);
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// ---- byte planes -----------------------------------------------------------------------------

class Mapping {
 public:
  ~Mapping() {
    if (data_ != nullptr) ::munmap(data_, size_);
    if (fd_ >= 0) ::close(fd_);
  }
  Status open(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return make_error(Errc::kIo, "cannot open " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) return make_error(Errc::kIo, "cannot stat " + path);
    size_ = static_cast<size_t>(st.st_size);
    if (size_ == 0) return ok();
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (p == MAP_FAILED) return make_error(Errc::kIo, "cannot map " + path);
    data_ = p;
    return ok();
  }
  const unsigned char* data() const { return static_cast<const unsigned char*>(data_); }
  size_t size() const { return size_; }

 private:
  int fd_ = -1;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Buffered writer of a file (1 MiB at a time), fsynced on finish when asked.
class Writer {
 public:
  ~Writer() {
    if (fd_ >= 0) ::close(fd_);
  }
  Status open(const std::string& path) {
    path_ = path;
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd_ < 0) return make_error(Errc::kIo, "cannot create " + path + ": " + strerror(errno));
    buf_.reserve(kBuf);
    return ok();
  }
  Status put(unsigned char c) {
    buf_.push_back(c);
    return buf_.size() == kBuf ? flush() : ok();
  }
  Status put(const unsigned char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) OUTPOST_TRY(put(p[i]));
    return ok();
  }
  Status flush() {
    size_t off = 0;
    while (off < buf_.size()) {
      ssize_t w = ::write(fd_, buf_.data() + off, buf_.size() - off);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return make_error(Errc::kIo, "cannot write " + path_ + ": " + strerror(errno));
      off += static_cast<size_t>(w);
    }
    buf_.clear();
    return ok();
  }
  Status finish(bool sync) {
    OUTPOST_TRY(flush());
    if (sync && ::fsync(fd_) != 0) return make_error(Errc::kIo, "cannot fsync " + path_);
    return ok();
  }

 private:
  static constexpr size_t kBuf = 1u << 20;
  std::string path_;
  int fd_ = -1;
  std::vector<unsigned char> buf_;
};

// Plane k holds byte k of every 4-byte word; the n % 4 trailing bytes follow unchanged.
Status to_planes(const std::string& in_path, const std::string& out_path) {
  Mapping in;
  OUTPOST_TRY(in.open(in_path));
  Writer out;
  OUTPOST_TRY(out.open(out_path));
  const size_t words = in.size() / 4;
  const unsigned char* p = in.data();
  for (size_t k = 0; k < 4; ++k) {
    for (size_t i = 0; i < words; ++i) OUTPOST_TRY(out.put(p[4 * i + k]));
  }
  OUTPOST_TRY(out.put(p + 4 * words, in.size() - 4 * words));
  return out.finish(false);
}

// The exact inverse of to_planes; returns the SHA-256 of what it wrote.
Result<std::string> from_planes(const std::string& in_path, const std::string& out_path) {
  Mapping in;
  OUTPOST_TRY(in.open(in_path));
  Writer out;
  OUTPOST_TRY(out.open(out_path));
  const size_t words = in.size() / 4;
  const unsigned char* p = in.data();
  Sha256 hasher;
  constexpr size_t kChunk = 1u << 18;  // words per slice
  std::vector<unsigned char> slice(4 * kChunk);
  for (size_t start = 0; start < words; start += kChunk) {
    const size_t n = std::min(kChunk, words - start);
    for (size_t i = 0; i < n; ++i) {
      for (size_t k = 0; k < 4; ++k) slice[4 * i + k] = p[k * words + start + i];
    }
    OUTPOST_TRY(out.put(slice.data(), 4 * n));
    hasher.update(slice.data(), 4 * n);
  }
  const size_t tail = in.size() - 4 * words;
  OUTPOST_TRY(out.put(p + 4 * words, tail));
  hasher.update(p + 4 * words, tail);
  OUTPOST_TRY(out.finish(true));
  return hasher.finish_hex();
}

// ---- steps in a child --------------------------------------------------------------------------

int64_t status_kb(const std::string& text, const char* key) {
  const size_t at = text.find(key);
  if (at == std::string::npos) return 0;
  return std::strtoll(text.c_str() + at + std::strlen(key), nullptr, 10);
}

// Samples /proc/self/status every millisecond: the peak anonymous and file-backed RSS, which
// ru_maxrss (their sum at its peak) does not tell apart.
class RssSampler {
 public:
  RssSampler() : thread_([this] { run(); }) {}
  ~RssSampler() { stop(); }
  void stop() {
    done_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int64_t peak_anon_kb() const { return anon_; }
  int64_t peak_file_kb() const { return file_; }

 private:
  void run() {
    while (!done_) {
      sample();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    sample();
  }
  void sample() {
    std::ifstream f("/proc/self/status");
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string s = ss.str();
    anon_ = std::max<int64_t>(anon_, status_kb(s, "RssAnon:"));
    file_ = std::max<int64_t>(file_, status_kb(s, "RssFile:"));
  }
  std::atomic<bool> done_{false};
  std::atomic<int64_t> anon_{0};
  std::atomic<int64_t> file_{0};
  std::thread thread_;
};

struct StepResult {
  json out;           // what the step reported, plus wall_ms and the sampled peaks
  int64_t maxrss_kb;  // the child's ru_maxrss
};

// Runs step in a forked child; its JSON comes back through a pipe. The bench itself starts no
// thread, so forking is safe; a failing step fails the bench.
StepResult in_child(const std::string& what, const std::function<Result<json>()>& step) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) die("pipe: " + std::string(std::strerror(errno)));
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) die("fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    ::close(fds[0]);
    json j;
    int rc = 0;
    {
      RssSampler sampler;
      const auto t0 = Clock::now();
      auto r = step();
      const double wall = ms_since(t0);
      sampler.stop();
      if (r) {
        j = std::move(*r);
        j["wall_ms"] = wall;
        j["peak_anon_kb"] = sampler.peak_anon_kb();
        j["peak_file_kb"] = sampler.peak_file_kb();
      } else {
        j = {{"error", r.error().describe()}};
        rc = 1;
      }
    }
    const std::string s = j.dump();
    size_t off = 0;
    while (off < s.size()) {
      ssize_t w = ::write(fds[1], s.data() + off, s.size() - off);
      if (w <= 0) break;
      off += static_cast<size_t>(w);
    }
    ::_exit(rc);
  }
  ::close(fds[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  int status = 0;
  struct rusage ru {};
  if (::wait4(pid, &status, 0, &ru) != pid) die("wait4: " + std::string(std::strerror(errno)));
  json j = json::parse(text, nullptr, false);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || j.is_discarded()) {
    die(what + " failed (status " + std::to_string(status) +
        "): " + (j.is_object() && j.contains("error") ? j["error"].get<std::string>() : text));
  }
  return {std::move(j), static_cast<int64_t>(ru.ru_maxrss)};
}

// ---- the bench -------------------------------------------------------------------------------

int64_t file_size(const std::string& path) {
  std::error_code ec;
  const auto n = fs::file_size(path, ec);
  if (ec) die("cannot stat " + path + ": " + ec.message());
  return static_cast<int64_t>(n);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

json measure(const Options& o, const std::string& method, int level,
             const std::string& target_sha) {
  const bool grouped = method == "bytegroup";
  const std::string dir = o.work + "/" + method + "-" + std::to_string(level);
  fs::create_directories(dir);
  const std::string empty = dir + "/empty", delta = dir + "/delta.zst", full = dir + "/full.zst";
  const std::string base_g = dir + "/base.planes", target_g = dir + "/target.planes";
  std::ofstream(empty).close();
  const delta::MakeOptions mo{.level = level, .threads = o.threads};

  // The server's side: (transform, then) make the delta.
  StepResult make = in_child("make " + method, [&]() -> Result<json> {
    json j;
    std::string b = o.base, t = o.target;
    if (grouped) {
      const auto t0 = Clock::now();
      OUTPOST_TRY(to_planes(o.base, base_g));
      OUTPOST_TRY(to_planes(o.target, target_g));
      j["transform_ms"] = ms_since(t0);
      b = base_g;
      t = target_g;
    }
    auto r = delta::make_delta(b, t, delta, mo);
    if (!r) return make_error(r.error().with_context("make_delta " + b + " -> " + t));
    j["delta_bytes"] = r->delta_bytes;
    return j;
  });
  // No delta: the (transformed) target alone at the same level and window, as the full blob.
  StepResult fullz = in_child("full zstd " + method, [&]() -> Result<json> {
    auto r = delta::make_delta(empty, grouped ? target_g : o.target, full, mo);
    if (!r) return make_error(r.error().with_context("zstd of the full target"));
    return json{{"bytes", r->delta_bytes}};
  });
  if (grouped) fs::remove(base_g);  // the device holds the original base, not its planes

  // The agent's side: (transform the base,) apply, (invert,) and the output's digest.
  std::vector<double> apply_ms;
  json apply_runs = json::array();
  int64_t apply_maxrss = 0, apply_anon = 0, apply_file = 0;
  const std::string out = dir + "/applied";
  for (int rep = 0; rep < o.apply_reps; ++rep) {
    StepResult a = in_child("apply " + method, [&]() -> Result<json> {
      json j;
      const int64_t cap = file_size(o.target) + 8;
      if (!grouped) {
        auto r = delta::apply_delta(o.base, delta, out, cap);
        if (!r) return make_error(r.error().with_context("apply_delta"));
        j["sha256"] = r->sha256_hex;
        return j;
      }
      OUTPOST_TRY(to_planes(o.base, base_g));
      auto r = delta::apply_delta(base_g, delta, out + ".planes", cap);
      if (!r) return make_error(r.error().with_context("apply_delta on planes"));
      auto sha = from_planes(out + ".planes", out);
      if (!sha) return make_error(sha.error().with_context("inverting the byte planes"));
      j["sha256"] = *sha;
      return j;
    });
    // Independent of what the step computed: hash the file on disk.
    auto on_disk = sha256_file_hex(out);
    if (!on_disk) die("hashing " + out + ": " + on_disk.error().describe());
    const std::string got = a.out["sha256"].get<std::string>();
    if (got != target_sha || *on_disk != target_sha) {
      die("VERIFY FAILED: " + o.name + " " + method + " level " + std::to_string(level) +
          ": applied output sha256 " + got + " (on disk " + *on_disk + "), target " + target_sha);
    }
    apply_ms.push_back(a.out["wall_ms"].get<double>());
    apply_maxrss = std::max(apply_maxrss, a.maxrss_kb);
    apply_anon = std::max(apply_anon, a.out["peak_anon_kb"].get<int64_t>());
    apply_file = std::max(apply_file, a.out["peak_file_kb"].get<int64_t>());
    apply_runs.push_back(a.out["wall_ms"]);
    if (grouped) fs::remove(base_g);
  }

  const int64_t full_bytes = file_size(o.target);
  const int64_t delta_bytes = make.out["delta_bytes"].get<int64_t>();
  json r = {
      {"input", o.name},
      {"method", method},
      {"level", level},
      {"threads", o.threads},
      {"base_bytes", file_size(o.base)},
      {"full_bytes", full_bytes},
      {"full_zstd_bytes", fullz.out["bytes"]},
      {"delta_bytes", delta_bytes},
      {"delta_pct_of_full", 100.0 * static_cast<double>(delta_bytes) / full_bytes},
      {"make_ms", make.out["wall_ms"]},
      {"make_maxrss_kb", make.maxrss_kb},
      {"make_peak_anon_kb", make.out["peak_anon_kb"]},
      {"apply_ms_median", median(apply_ms)},
      {"apply_ms_runs", apply_runs},
      {"apply_maxrss_kb", apply_maxrss},
      {"apply_peak_anon_kb", apply_anon},
      {"apply_peak_file_kb", apply_file},
      {"verified_sha256", target_sha},
  };
  if (make.out.contains("transform_ms")) r["make_transform_ms"] = make.out["transform_ms"];
  fs::remove_all(dir);
  return r;
}

std::string md_header() {
  return "| input | method | level | full B | zstd of full (% of full) | delta B | delta % of full "
         "| make s | make peak RSS MiB | apply ms | apply peak RSS MiB (anon) | output sha256 |\n"
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
}

std::string md_row(const json& r) {
  const double full = r["full_bytes"].get<double>();
  const auto mib = [](const json& kb) { return kb.get<double>() / 1024.0; };
  char line[512];
  std::snprintf(line, sizeof line,
                "| %s | %s | %d | %lld | %lld (%.1f %%) | %lld | **%.2f %%** | %.2f | %.0f | %.0f "
                "| %.0f (%.0f) | ok %.12s… |\n",
                r["input"].get<std::string>().c_str(), r["method"].get<std::string>().c_str(),
                r["level"].get<int>(), r["full_bytes"].get<long long>(),
                r["full_zstd_bytes"].get<long long>(),
                100.0 * r["full_zstd_bytes"].get<double>() / full,
                r["delta_bytes"].get<long long>(), r["delta_pct_of_full"].get<double>(),
                r["make_ms"].get<double>() / 1000.0, mib(r["make_maxrss_kb"]),
                r["apply_ms_median"].get<double>(), mib(r["apply_maxrss_kb"]),
                mib(r["apply_peak_anon_kb"]), r["verified_sha256"].get<std::string>().c_str());
  return line;
}

int run(const Options& o) {
  if (o.md_header) {
    std::fputs(md_header().c_str(), stdout);
    return 0;
  }
  if (o.base.empty() || o.target.empty()) die("--base and --target are required");
  auto target_sha = sha256_file_hex(o.target);
  if (!target_sha) die(target_sha.error().describe());
  // What a forked child starts from (the bench's own pages): every peak below includes it.
  const StepResult floor = in_child("empty step", [] { return Result<json>(json::object()); });
  json results = json::array();
  for (int level : o.levels) {
    for (const auto& m : o.methods) {
      if (m != "plain" && m != "bytegroup") die("unknown method " + m);
      results.push_back(measure(o, m, level, *target_sha));
      std::fprintf(stderr, "outpost-delta-bench: %s %s level %d: %lld -> %lld bytes\n",
                   o.name.c_str(), m.c_str(), level, results.back()["full_bytes"].get<long long>(),
                   results.back()["delta_bytes"].get<long long>());
    }
  }
  if (o.output == "md") {
    for (const auto& r : results) std::fputs(md_row(r).c_str(), stdout);
  } else {
    json doc = {{"input", o.name},
                {"base", o.base},
                {"target", o.target},
                {"target_sha256", *target_sha},
                {"zstd_version", ZSTD_versionString()},
                {"child_floor_maxrss_kb", floor.maxrss_kb},
                {"results", results}};
    std::printf("%s\n", doc.dump(2).c_str());
  }
  return 0;
}

}  // namespace
}  // namespace outpost::bench

int main(int argc, char** argv) {
  outpost::bench::Options o;
  CLI::App app{"outpost-delta-bench: zstd patch-from deltas between two model files"};
  app.add_option("--base", o.base, "the version the device holds");
  app.add_option("--target", o.target, "the new version");
  app.add_option("--name", o.name, "label of the pair in the output (default: target's name)");
  app.add_option("--levels", o.levels, "zstd levels (19)")->delimiter(',');
  app.add_option("--methods", o.methods, "plain,bytegroup")->delimiter(',');
  app.add_option("--work", o.work, "scratch folder for deltas and outputs (default: a temp dir)");
  app.add_option("--apply-reps", o.apply_reps, "apply runs per method and level (median)")
      ->check(CLI::PositiveNumber);
  app.add_option("--threads", o.threads, "zstd worker threads for make (0: calling thread)");
  app.add_option("-o,--output", o.output, "json or md (markdown rows)")
      ->check(CLI::IsMember({"json", "md"}));
  app.add_flag("--md-header", o.md_header, "print the markdown table header and exit");
  CLI11_PARSE(app, argc, argv);
  namespace fs = std::filesystem;
  if (o.name.empty()) o.name = fs::path(o.target).stem().string();
  bool own_work = false;
  if (o.work.empty() && !o.md_header) {
    std::string tmpl = (fs::temp_directory_path() / "outpost-delta-bench.XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) outpost::bench::die("mkdtemp failed");
    o.work = tmpl;
    own_work = true;
  }
  const int rc = outpost::bench::run(o);
  if (own_work) fs::remove_all(o.work);
  return rc;
}
