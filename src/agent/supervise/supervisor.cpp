// Workload supervisor: one thread per workload, waiting in poll() on the output pipe, a pidfd per
// process and a wake-up eventfd, with timers for checks, settle, backoff and the stop grace.
#include "agent/supervise/supervisor.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <mutex>
#include <set>
#include <sstream>
#include <system_error>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/durable_file.h"

namespace outpost::agent {

const char* workload_state_name(WorkloadState state) {
  switch (state) {
    case WorkloadState::kStarting:
      return "starting";
    case WorkloadState::kHealthy:
      return "healthy";
    case WorkloadState::kUnhealthy:
      return "unhealthy";
    case WorkloadState::kBackoff:
      return "backoff";
    case WorkloadState::kExited:
      return "exited";
    case WorkloadState::kStopped:
      return "stopped";
  }
  return "unknown";
}

namespace {

constexpr const char* kDefaultPath = "/usr/local/bin:/usr/bin:/bin";
// While starting, checks run at least this often so a ready workload is noticed quickly.
constexpr int64_t kStartingCheckIntervalMs = 1'000;
// Without pidfds, exits are noticed by polling waitid() this often.
constexpr int64_t kExitPollMs = 200;
// Longest single wait; every wait ends early on any event anyway.
constexpr int64_t kMaxWaitMs = 60'000;
// Output read per loop turn, so a chatty process cannot starve timers.
constexpr size_t kMaxReadPerTurn = 1 << 20;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// glibc 2.36's <sys/pidfd.h> lacks extern "C" (fixed in 2.37), so call the syscall directly.
// -1 (ENOSYS before Linux 5.3) makes the loop poll for exits instead.
int open_pidfd(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

std::string errno_text(int err) { return std::generic_category().message(err); }

// "5 s", "0.25 s".
std::string format_seconds(int64_t ms) {
  return fmt::format("{:g} s", static_cast<double>(ms) / 1000.0);
}

std::string join(const std::vector<std::string>& parts, std::string_view sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += sep;
    out += parts[i];
  }
  return out;
}

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

Error system_error(std::string_view what, int err) {
  return Error{Errc::kInternal, fmt::format("{}: {}", what, errno_text(err)), {}};
}

// The child dup2()s onto 0..2; descriptors it still needs must not sit there.
Status keep_above_stdio(UniqueFd& fd) {
  if (fd.get() > 2) return ok();
  int moved = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, 3);
  if (moved < 0) return make_error(system_error("fcntl(F_DUPFD_CLOEXEC)", errno));
  fd.reset(moved);
  return ok();
}

struct Pipe {
  UniqueFd read;
  UniqueFd write;
};

Result<Pipe> make_pipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return make_error(system_error("pipe2", errno));
  Pipe pipe{UniqueFd(fds[0]), UniqueFd(fds[1])};
  OUTPOST_TRY(keep_above_stdio(pipe.read));
  OUTPOST_TRY(keep_above_stdio(pipe.write));
  return pipe;
}

// ---------------------------------------------------------------------------------------------
// /proc

struct ProcStat {
  char state = '?';
  pid_t pgrp = 0;
  pid_t session = 0;
  uint64_t start_time = 0;  // clock ticks since boot; with the pid, names one process
};

std::optional<ProcStat> read_proc_stat(pid_t pid) {
  auto text = read_file(fmt::format("/proc/{}/stat", pid));
  if (!text) return std::nullopt;
  // The command name (field 2) may contain spaces and ')'; fields resume after the last ')'.
  size_t close = text->rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream in(text->substr(close + 1));
  std::vector<std::string> fields;
  std::string field;
  while (in >> field) fields.push_back(field);
  // fields[0] is field 3 (state); start time is field 22.
  if (fields.size() < 20) return std::nullopt;
  ProcStat stat;
  try {
    stat.state = fields[0].empty() ? '?' : fields[0][0];
    stat.pgrp = static_cast<pid_t>(std::stol(fields[2]));
    stat.session = static_cast<pid_t>(std::stol(fields[3]));
    stat.start_time = std::stoull(fields[19]);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  return stat;
}

// Live (not zombie) processes whose process group is `pgid` and that started at or after
// `min_start_time`.
std::vector<pid_t> live_group_members(pid_t pgid, uint64_t min_start_time) {
  std::vector<pid_t> members;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    pid_t pid = static_cast<pid_t>(std::stol(name));
    auto stat = read_proc_stat(pid);
    if (stat && stat->pgrp == pgid && stat->state != 'Z' && stat->start_time >= min_start_time) {
      members.push_back(pid);
    }
  }
  return members;
}

// ---------------------------------------------------------------------------------------------
// Exits

struct Exit {
  std::optional<int> code;  // exit code, or 128+signal
  std::string message;      // "exited with code 3", "killed by signal 9 (SIGKILL)"
};

Exit describe_exit(int status) {
  if (WIFEXITED(status)) {
    int code = WEXITSTATUS(status);
    return {code, fmt::format("exited with code {}", code)};
  }
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* abbrev = ::sigabbrev_np(sig);
    return {128 + sig, fmt::format("killed by signal {} (SIG{})", sig, abbrev ? abbrev : "?")};
  }
  return {std::nullopt, fmt::format("ended with wait status {:#x}", status)};
}

// If `pid` has exited: SIGKILLs what is left of its process group, reaps it and says how it
// ended. The group goes first because the unreaped leader keeps the group id from being reused,
// so the signal cannot reach a stranger.
std::optional<Exit> reap_group_if_exited(pid_t pid) {
  siginfo_t info{};
  if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0) {
    if (errno == EINTR) return std::nullopt;
    // ECHILD: someone else reaped it (see the header: the agent must not do that).
    return Exit{std::nullopt, fmt::format("exited (status lost: {})", errno_text(errno))};
  }
  if (info.si_pid != pid) return std::nullopt;
  ::kill(-pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return describe_exit(status);
}

// SIGKILLs a running process group and reaps its leader.
void kill_and_reap(pid_t pid) {
  ::kill(-pid, SIGKILL);
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
}

// ---------------------------------------------------------------------------------------------
// Spawning

struct SpawnPlan {
  std::string display;  // argv[0] as given, for messages
  std::string path;     // resolved executable
  std::vector<std::string> argv;
  std::vector<std::string> env;  // "KEY=value"
  std::string cwd;
  int output_fd = -1;  // stdout+stderr; -1 = /dev/null
  int cgroup_procs_fd = -1;
  std::optional<int64_t> rlimit_as;
  std::optional<int64_t> rlimit_nofile;
  int death_signal = SIGTERM;
};

// What the child reports through the error pipe before it gives up.
enum class ChildStep : int {
  kSetsid = 1,
  kDeathSignal,
  kCgroup,
  kRlimitAs,
  kRlimitNofile,
  kStdio,
  kChdir,
  kExec
};
struct ChildFailure {
  int step = 0;
  int err = 0;
};

// Everything the child needs, prepared before fork: between fork and exec only
// async-signal-safe calls are allowed (the agent is multi-threaded).
struct ChildArgs {
  const char* path;
  char* const* argv;
  char* const* envp;
  const char* cwd;
  int stdin_fd;
  int out_fd;
  int err_fd;
  int cgroup_fd;
  bool has_rlimit_as;
  rlim_t rlimit_as;
  bool has_rlimit_nofile;
  rlim_t rlimit_nofile;
  int death_signal;
  pid_t parent;
  int max_fd;
};

[[noreturn]] void child_fail(int err_fd, ChildStep step) {
  ChildFailure failure{static_cast<int>(step), errno};
  ssize_t written = ::write(err_fd, &failure, sizeof failure);
  (void)written;
  ::_exit(127);
}

[[noreturn]] void run_child(const ChildArgs& a) {
  // The parent blocked all signals around fork; handlers must be gone before unblocking, and
  // ignored signals (SIGPIPE in most servers) would otherwise stay ignored across exec.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  for (int sig = 1; sig < NSIG; ++sig) ::sigaction(sig, &dfl, nullptr);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  if (::setsid() < 0) child_fail(a.err_fd, ChildStep::kSetsid);
  if (::prctl(PR_SET_PDEATHSIG, a.death_signal) < 0) child_fail(a.err_fd, ChildStep::kDeathSignal);
  if (::getppid() != a.parent) ::_exit(127);  // the agent died before the death signal was set
  if (a.cgroup_fd >= 0) {
    char digits[24];
    char text[24];
    int n = 0;
    for (pid_t pid = ::getpid(); pid > 0 || n == 0; pid /= 10) digits[n++] = '0' + pid % 10;
    for (int i = 0; i < n; ++i) text[i] = digits[n - 1 - i];
    if (::write(a.cgroup_fd, text, n) != n) child_fail(a.err_fd, ChildStep::kCgroup);
  }
  if (a.has_rlimit_as) {
    struct rlimit limit {
      a.rlimit_as, a.rlimit_as
    };
    if (::setrlimit(RLIMIT_AS, &limit) < 0) child_fail(a.err_fd, ChildStep::kRlimitAs);
  }
  if (a.has_rlimit_nofile) {
    struct rlimit limit {
      a.rlimit_nofile, a.rlimit_nofile
    };
    if (::setrlimit(RLIMIT_NOFILE, &limit) < 0) child_fail(a.err_fd, ChildStep::kRlimitNofile);
  }
  if (a.cwd[0] != '\0' && ::chdir(a.cwd) < 0) child_fail(a.err_fd, ChildStep::kChdir);
  if (::dup2(a.stdin_fd, 0) < 0 || ::dup2(a.out_fd, 1) < 0 || ::dup2(a.out_fd, 2) < 0) {
    child_fail(a.err_fd, ChildStep::kStdio);
  }
  // Descriptors other threads opened without O_CLOEXEC must not leak into the workload; the
  // error pipe stays usable until exec succeeds.
  if (::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
    for (int fd = 3; fd < a.max_fd; ++fd) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  }
  ::execve(a.path, a.argv, a.envp);
  child_fail(a.err_fd, ChildStep::kExec);
}

Errc errc_for_errno(int err) {
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return Errc::kNotFound;
    case EACCES:
    case EPERM:
      return Errc::kPermissionDenied;
    default:
      return Errc::kFailedPrecondition;
  }
}

Error child_failure_error(const SpawnPlan& plan, const ChildFailure& failure) {
  std::string why = errno_text(failure.err);
  std::string what;
  switch (static_cast<ChildStep>(failure.step)) {
    case ChildStep::kSetsid:
      what = "setsid: " + why;
      break;
    case ChildStep::kDeathSignal:
      what = "prctl(PR_SET_PDEATHSIG): " + why;
      break;
    case ChildStep::kCgroup:
      what = "joining its cgroup: " + why;
      break;
    case ChildStep::kRlimitAs:
      what = fmt::format("setting RLIMIT_AS to {}: {}", plan.rlimit_as.value_or(0), why);
      break;
    case ChildStep::kRlimitNofile:
      what = fmt::format("setting RLIMIT_NOFILE to {}: {}", plan.rlimit_nofile.value_or(0), why);
      break;
    case ChildStep::kStdio:
      what = "redirecting stdio: " + why;
      break;
    case ChildStep::kChdir:
      what = fmt::format("cwd {}: {}", plan.cwd, why);
      break;
    case ChildStep::kExec:
      what = why;
      break;
  }
  return Error{
      errc_for_errno(failure.err), fmt::format("cannot start {}: {}", plan.display, what), {}};
}

// fork+exec with an O_CLOEXEC error pipe: the pipe closes on a successful exec, or carries the
// step and errno that failed, so exec failures come back as errors instead of exit code 127.
Result<pid_t> spawn_process(const SpawnPlan& plan) {
  UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (!devnull) return make_error(system_error("opening /dev/null", errno));
  OUTPOST_TRY(keep_above_stdio(devnull));
  auto error_pipe = make_pipe();
  if (!error_pipe) return make_error(error_pipe.error());

  std::vector<char*> argv;
  for (const auto& arg : plan.argv) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const auto& var : plan.env) envp.push_back(const_cast<char*>(var.c_str()));
  envp.push_back(nullptr);
  long open_max = ::sysconf(_SC_OPEN_MAX);
  ChildArgs args{
      .path = plan.path.c_str(),
      .argv = argv.data(),
      .envp = envp.data(),
      .cwd = plan.cwd.c_str(),
      .stdin_fd = devnull.get(),
      .out_fd = plan.output_fd >= 0 ? plan.output_fd : devnull.get(),
      .err_fd = error_pipe->write.get(),
      .cgroup_fd = plan.cgroup_procs_fd,
      .has_rlimit_as = plan.rlimit_as.has_value(),
      .rlimit_as = static_cast<rlim_t>(plan.rlimit_as.value_or(0)),
      .has_rlimit_nofile = plan.rlimit_nofile.has_value(),
      .rlimit_nofile = static_cast<rlim_t>(plan.rlimit_nofile.value_or(0)),
      .death_signal = plan.death_signal,
      .parent = ::getpid(),
      .max_fd = static_cast<int>(std::clamp<long>(open_max, 1024, 1 << 16)),
  };

  sigset_t all;
  sigset_t previous;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &previous);
  pid_t pid = ::fork();
  if (pid == 0) run_child(args);
  int fork_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (pid < 0)
    return make_error(system_error(fmt::format("cannot start {}: fork", plan.display), fork_errno));

  error_pipe->write.reset();
  ChildFailure failure;
  size_t got = 0;
  while (got < sizeof failure) {
    ssize_t n = ::read(error_pipe->read.get(), reinterpret_cast<char*>(&failure) + got,
                       sizeof failure - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  if (got == sizeof failure) {
    while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    return make_error(child_failure_error(plan, failure));
  }
  return pid;
}

// Where execve() should look for argv[0]: as given when it contains '/' (relative ones against
// cwd), else the first executable file in PATH, like execvp().
Result<std::string> resolve_program(const std::string& program, const std::string& cwd,
                                    const std::string& path_var) {
  auto against_cwd = [&](const std::string& path) {
    return path.starts_with('/') || cwd.empty() ? path : cwd + "/" + path;
  };
  if (program.find('/') != std::string::npos) return against_cwd(program);
  int err = ENOENT;
  std::istringstream dirs(path_var);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    std::string candidate = against_cwd(dir.empty() ? "." : dir) + "/" + program;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    err = EACCES;
  }
  return make_error(errc_for_errno(err), fmt::format("cannot start {}: {} (looked in PATH {})",
                                                     program, errno_text(err), path_var));
}

// ---------------------------------------------------------------------------------------------
// Output log

// output.log with size-based rotation. Files end at line ends: a file may run over max_bytes by
// up to max_bytes/16 (at most 4 KiB) to finish a line; only longer lines are split.
class OutputLog {
 public:
  [[nodiscard]] Status open(const std::string& dir, int64_t max_bytes, int keep) {
    path_ = dir + "/output.log";
    max_bytes_ = max_bytes;
    keep_ = keep;
    fd_.reset(::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (!fd_) {
      return make_error(Errc::kIo, fmt::format("opening {}: {}", path_, errno_text(errno)));
    }
    struct stat st {};
    size_ = ::fstat(fd_.get(), &st) == 0 ? st.st_size : 0;
    return ok();
  }

  void append(std::string_view data) {
    while (!data.empty() && fd_) {
      const int64_t room = max_bytes_ - size_;
      if (static_cast<int64_t>(data.size()) <= room) {
        write_all(data);
        return;
      }
      size_t cut = std::string_view::npos;
      if (room > 0) cut = data.substr(0, static_cast<size_t>(room)).rfind('\n');
      if (cut == std::string_view::npos && mid_line_) {
        // Finish the line already begun (a pipe read can end mid-line) rather than split it.
        size_t newline = data.find('\n');
        if (newline != std::string_view::npos && static_cast<int64_t>(newline) < overshoot()) {
          cut = newline;
        }
      }
      if (cut != std::string_view::npos) {
        write_all(data.substr(0, cut + 1));
        data.remove_prefix(cut + 1);
      }
      if (size_ > 0) {
        rotate();
        continue;
      }
      // A single line longer than a whole file: split it.
      size_t n = std::min(data.size(), static_cast<size_t>(max_bytes_));
      write_all(data.substr(0, n));
      data.remove_prefix(n);
    }
  }

  void close() { fd_.reset(); }

 private:
  int64_t overshoot() const { return std::min<int64_t>(4096, max_bytes_ / 16); }

  void write_all(std::string_view data) {
    if (!data.empty()) mid_line_ = data.back() != '\n';
    while (!data.empty()) {
      ssize_t n = ::write(fd_.get(), data.data(), data.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        // A full disk must not block the workload: drop output, say so once.
        if (!write_failed_)
          spdlog::warn("writing {}: {}; output dropped", path_, errno_text(errno));
        write_failed_ = true;
        size_ += static_cast<int64_t>(data.size());
        return;
      }
      write_failed_ = false;
      size_ += n;
      data.remove_prefix(static_cast<size_t>(n));
    }
  }

  void rotate() {
    fd_.reset();
    if (keep_ > 0) {
      ::unlink(fmt::format("{}.{}", path_, keep_).c_str());
      for (int i = keep_ - 1; i >= 1; --i) {
        ::rename(fmt::format("{}.{}", path_, i).c_str(),
                 fmt::format("{}.{}", path_, i + 1).c_str());
      }
      if (::rename(path_.c_str(), (path_ + ".1").c_str()) != 0) {
        spdlog::warn("rotating {}: {}; truncating it instead", path_, errno_text(errno));
      }
    }
    // O_TRUNC keeps the size bound even when the rename failed.
    fd_.reset(::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd_) spdlog::warn("reopening {}: {}; output dropped", path_, errno_text(errno));
    size_ = 0;
    mid_line_ = false;
  }

  std::string path_;
  int64_t max_bytes_ = 1 << 20;
  int keep_ = 3;
  UniqueFd fd_;
  int64_t size_ = 0;
  bool mid_line_ = false;  // the current file does not end with '\n'
  bool write_failed_ = false;
};

// ---------------------------------------------------------------------------------------------
// Limits

struct LimitsPlan {
  std::string cgroup_parent;  // "" = no cgroup
  bool cgroup_memory = false;
  bool cgroup_cpu = false;
  std::optional<int64_t> rlimit_as;
  std::optional<int64_t> rlimit_nofile;
  std::string note;
};

std::string cgroup_unusable_reason(const std::string& parent) {
  if (parent.empty()) return "no cgroup v2 delegation";
  struct statfs fs {};
  if (::statfs(parent.c_str(), &fs) != 0) {
    return fmt::format("no cgroup v2 delegation: {}: {}", parent, errno_text(errno));
  }
  if (fs.f_type != CGROUP2_SUPER_MAGIC) {
    return fmt::format("no cgroup v2 delegation: {} is not a cgroup v2 directory", parent);
  }
  if (::access(parent.c_str(), W_OK) != 0) {
    return fmt::format("no cgroup v2 delegation: {} is not writable", parent);
  }
  return {};
}

LimitsPlan plan_limits(const WorkloadSpec& spec) {
  LimitsPlan plan;
  const ResourceLimits& limits = spec.limits;
  std::string unusable = cgroup_unusable_reason(spec.cgroup_parent);
  std::set<std::string> controllers;
  if (unusable.empty()) {
    plan.cgroup_parent = spec.cgroup_parent;
    // Children get the controllers the parent enables for its subtree.
    std::istringstream in(read_file(spec.cgroup_parent + "/cgroup.subtree_control").value_or(""));
    std::string controller;
    while (in >> controller) controllers.insert(controller);
  } else if (!spec.cgroup_parent.empty()) {
    spdlog::warn("workload {}: not using cgroup_parent ({}); limits fall back to rlimits",
                 spec.name, unusable);
  }
  auto missing = [&](const char* controller) {
    return fmt::format("{} controller not enabled in {}/cgroup.subtree_control", controller,
                       spec.cgroup_parent);
  };

  std::vector<std::string> notes;
  if (limits.memory_bytes) {
    if (!plan.cgroup_parent.empty() && controllers.contains("memory")) {
      plan.cgroup_memory = true;
      notes.push_back("memory via cgroup v2 (memory.max)");
    } else {
      plan.rlimit_as = limits.memory_bytes;
      notes.push_back(plan.cgroup_parent.empty()
                          ? std::string("memory via RLIMIT_AS")
                          : fmt::format("memory via RLIMIT_AS ({})", missing("memory")));
    }
  }
  if (limits.cpus) {
    if (!plan.cgroup_parent.empty() && controllers.contains("cpu")) {
      plan.cgroup_cpu = true;
      notes.push_back("cpu via cgroup v2 (cpu.max)");
    } else {
      notes.push_back(fmt::format("cpu limit not enforced ({})",
                                  plan.cgroup_parent.empty() ? unusable : missing("cpu")));
    }
  }
  if (limits.open_files) {
    plan.rlimit_nofile = limits.open_files;
    notes.push_back("open files via RLIMIT_NOFILE");
  }
  plan.note = join(notes, "; ");
  return plan;
}

std::string cgroup_safe_name(const std::string& name) {
  std::string out = name;
  for (char& c : out) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  }
  return out;
}

Status write_control(const std::string& dir, const char* file, const std::string& value) {
  std::string path = dir + "/" + file;
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd || ::write(fd.get(), value.data(), value.size()) != static_cast<ssize_t>(value.size())) {
    return make_error(Errc::kIo,
                      fmt::format("writing {} to {}: {}", value, path, errno_text(errno)));
  }
  return ok();
}

// Names are <name>-<counter>; a leftover of a crashed agent with the same name is reused when
// empty and skipped when still populated.
Result<std::string> create_cgroup(const LimitsPlan& plan, const WorkloadSpec& spec) {
  static std::atomic<uint64_t> counter{0};
  std::string dir;
  for (int attempt = 0;; ++attempt) {
    dir = fmt::format("{}/{}-{}", plan.cgroup_parent, cgroup_safe_name(spec.name), ++counter);
    if (::mkdir(dir.c_str(), 0755) == 0) break;
    int err = errno;
    if (err == EEXIST && ::rmdir(dir.c_str()) == 0 && ::mkdir(dir.c_str(), 0755) == 0) break;
    if (err != EEXIST || attempt >= 100) {
      return make_error(Errc::kIo, fmt::format("creating cgroup {}: {}", dir, errno_text(err)));
    }
  }
  Status written = ok();
  if (plan.cgroup_memory) {
    written = write_control(dir, "memory.max", std::to_string(*spec.limits.memory_bytes));
  }
  if (written && plan.cgroup_cpu) {
    auto quota = std::max<int64_t>(1000, std::llround(*spec.limits.cpus * 100'000));
    written = write_control(dir, "cpu.max", fmt::format("{} 100000", quota));
  }
  if (!written) {
    ::rmdir(dir.c_str());
    return make_error(written.error());
  }
  return dir;
}

void remove_cgroup(const std::string& dir) {
  if (dir.empty()) return;
  // Catches processes that left the process group (setsid daemons); needs Linux 5.14.
  if (UniqueFd kill_fd(::open((dir + "/cgroup.kill").c_str(), O_WRONLY | O_CLOEXEC)); kill_fd) {
    ssize_t written = ::write(kill_fd.get(), "1", 1);
    (void)written;
  }
  // rmdir fails with EBUSY until the last killed process is gone.
  for (int attempt = 0; attempt < 100; ++attempt) {
    if (::rmdir(dir.c_str()) == 0 || errno == ENOENT) return;
    if (errno != EBUSY) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  spdlog::warn("removing cgroup {}: {}", dir, errno_text(errno));
}

// ---------------------------------------------------------------------------------------------
// Health probes

struct CheckResult {
  bool healthy = false;
  std::string message;
};

// One GET at a time on a curl multi handle, so the supervisor's loop keeps draining output and
// answering stop() while a check waits; the loop waits in curl_multi_poll() for that reason.
class HttpProbe {
 public:
  HttpProbe(int port, const std::string& path)
      : url_(fmt::format("http://127.0.0.1:{}{}", port, path)) {
    static std::once_flag curl_init;
    std::call_once(curl_init, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
    multi_ = curl_multi_init();
  }
  ~HttpProbe() {
    cancel();
    if (multi_) curl_multi_cleanup(multi_);
  }
  HttpProbe(const HttpProbe&) = delete;
  HttpProbe& operator=(const HttpProbe&) = delete;

  CURLM* multi() const { return multi_; }
  bool running() const { return easy_ != nullptr; }

  std::optional<CheckResult> begin(int64_t timeout_ms) {
    timeout_ms_ = timeout_ms;
    easy_ = multi_ ? curl_easy_init() : nullptr;
    if (!easy_) return CheckResult{false, label() + ": cannot create a curl handle"};
    error_[0] = '\0';
    curl_easy_setopt(easy_, CURLOPT_URL, url_.c_str());
    curl_easy_setopt(easy_, CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms));
    curl_easy_setopt(easy_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy_, CURLOPT_PROXY, "");  // http_proxy in the agent's env must not apply
    curl_easy_setopt(easy_, CURLOPT_ERRORBUFFER, error_);
    curl_easy_setopt(easy_, CURLOPT_WRITEFUNCTION, &discard_body);
    curl_multi_add_handle(multi_, easy_);
    int running = 0;
    curl_multi_perform(multi_, &running);
    return std::nullopt;
  }

  // Drives the transfer; the result once it finished.
  std::optional<CheckResult> poll() {
    if (!easy_) return std::nullopt;
    int running = 0;
    curl_multi_perform(multi_, &running);
    std::optional<CURLcode> done;
    int left = 0;
    while (CURLMsg* msg = curl_multi_info_read(multi_, &left)) {
      if (msg->msg == CURLMSG_DONE && msg->easy_handle == easy_) done = msg->data.result;
    }
    if (!done) return std::nullopt;
    CheckResult result;
    long status = 0;
    curl_easy_getinfo(easy_, CURLINFO_RESPONSE_CODE, &status);
    if (*done == CURLE_OK) {
      result.healthy = status >= 200 && status < 300;
      result.message = fmt::format("{}: HTTP {}", label(), status);
    } else if (*done == CURLE_OPERATION_TIMEDOUT) {
      result.message = fmt::format("{}: timed out after {}", label(), format_seconds(timeout_ms_));
    } else {
      result.message =
          fmt::format("{}: {}", label(), error_[0] ? error_ : curl_easy_strerror(*done));
    }
    cancel();
    return result;
  }

  void cancel() {
    if (!easy_) return;
    curl_multi_remove_handle(multi_, easy_);
    curl_easy_cleanup(easy_);
    easy_ = nullptr;
  }

 private:
  static size_t discard_body(char*, size_t size, size_t count, void*) { return size * count; }
  std::string label() const { return "health check GET " + url_; }

  std::string url_;
  CURLM* multi_ = nullptr;
  CURL* easy_ = nullptr;
  int64_t timeout_ms_ = 0;
  char error_[CURL_ERROR_SIZE] = {};
};

// A check command in its own process group, SIGKILLed (group and all) at its deadline.
class ExecProbe {
 public:
  explicit ExecProbe(std::vector<std::string> argv)
      : argv_(std::move(argv)), label_("health check [" + join(argv_, " ") + "]") {}
  ~ExecProbe() { cancel(); }
  ExecProbe(const ExecProbe&) = delete;
  ExecProbe& operator=(const ExecProbe&) = delete;

  bool running() const { return pid_ > 0; }
  int pidfd() const { return pidfd_.get(); }
  int64_t deadline() const { return deadline_; }

  // A spawn failure is a finished, failed check.
  std::optional<CheckResult> begin(const std::string& cwd, const std::vector<std::string>& env,
                                   const std::string& path_var, int64_t timeout_ms) {
    timeout_ms_ = timeout_ms;
    auto path = resolve_program(argv_[0], cwd, path_var);
    if (!path) return CheckResult{false, label_ + ": " + path.error().message};
    SpawnPlan plan{.display = argv_[0],
                   .path = *path,
                   .argv = argv_,
                   .env = env,
                   .cwd = cwd,
                   .death_signal = SIGKILL};
    auto pid = spawn_process(plan);
    if (!pid) return CheckResult{false, label_ + ": " + pid.error().message};
    pid_ = *pid;
    pidfd_.reset(open_pidfd(pid_));
    deadline_ = now_ms() + timeout_ms;
    return std::nullopt;
  }

  // The result once the command exited or ran past its deadline.
  std::optional<CheckResult> poll(int64_t now) {
    if (!running()) return std::nullopt;
    if (auto exit = reap_group_if_exited(pid_)) {
      finish();
      if (exit->code == 0) return CheckResult{true, label_ + ": passed"};
      // "exit code 1" reads better than "exited with code 1" after "health check [...]:".
      std::string how = exit->message;
      if (how.starts_with("exited with ")) how = "exit " + how.substr(std::strlen("exited with "));
      return CheckResult{false, label_ + ": " + how};
    }
    if (now < deadline_) return std::nullopt;
    cancel();
    return CheckResult{false,
                       fmt::format("{}: timed out after {}", label_, format_seconds(timeout_ms_))};
  }

  void cancel() {
    if (!running()) return;
    kill_and_reap(pid_);
    finish();
  }

 private:
  void finish() {
    pid_ = 0;
    pidfd_.reset();
  }

  std::vector<std::string> argv_;
  std::string label_;
  pid_t pid_ = 0;
  UniqueFd pidfd_;
  int64_t deadline_ = 0;
  int64_t timeout_ms_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Spec

Status validate(const WorkloadSpec& spec) {
  auto invalid = [&](std::string field, std::string what) {
    return make_error(Errc::kInvalidArgument,
                      fmt::format("workload {}: {}: {}", spec.name, field, what), field);
  };
  if (spec.name.empty())
    return make_error(Errc::kInvalidArgument, "workload: name is empty", "name");
  if (spec.argv.empty() || spec.argv[0].empty()) return invalid("argv", "no program given");
  if (spec.cwd.empty()) return invalid("cwd", "is empty");
  if (spec.log_dir.empty()) return invalid("log_dir", "is empty");
  if (spec.log_max_bytes <= 0) return invalid("log_max_bytes", "must be positive");
  if (spec.log_keep < 0) return invalid("log_keep", "must be 0 or more");
  if (spec.backoff_initial_ms < 0 || spec.backoff_max_ms < spec.backoff_initial_ms) {
    return invalid("backoff_max_ms", "must be at least backoff_initial_ms (and that 0 or more)");
  }
  if (spec.settle_ms < 0) return invalid("settle_ms", "must be 0 or more");
  if (spec.stop_grace_ms < 0) return invalid("stop_grace_ms", "must be 0 or more");
  if (spec.health) {
    const HealthCheck& h = *spec.health;
    if (h.http_path.empty() == h.exec.empty()) {
      return invalid("health", "set exactly one of http_path (with port) and exec");
    }
    if (!h.http_path.empty() && !h.http_path.starts_with('/')) {
      return invalid("health.http_path",
                     fmt::format("\"{}\" does not start with '/'", h.http_path));
    }
    if (!h.http_path.empty() && (h.port < 1 || h.port > 65535)) {
      return invalid("health.port", fmt::format("{} is not in 1..65535", h.port));
    }
    if (!h.exec.empty() && h.exec[0].empty()) return invalid("health.exec", "no program given");
    if (h.period_ms <= 0) return invalid("health.period_ms", "must be positive");
    if (h.timeout_ms <= 0) return invalid("health.timeout_ms", "must be positive");
    if (h.failures_to_restart < 1)
      return invalid("health.failures_to_restart", "must be 1 or more");
  }
  if (spec.limits.memory_bytes && *spec.limits.memory_bytes <= 0) {
    return invalid("limits.memory_bytes", "must be positive");
  }
  if (spec.limits.cpus && !(*spec.limits.cpus > 0))
    return invalid("limits.cpus", "must be positive");
  if (spec.limits.open_files && *spec.limits.open_files <= 0) {
    return invalid("limits.open_files", "must be positive");
  }
  return ok();
}

std::vector<std::string> build_env(const WorkloadSpec& spec) {
  std::map<std::string, std::string> vars;
  const char* agent_path = std::getenv("PATH");
  vars["PATH"] = agent_path && *agent_path ? agent_path : kDefaultPath;
  vars["HOME"] = spec.cwd;
  vars["LANG"] = "C.UTF-8";
  for (const auto& [key, value] : spec.env) vars[key] = value;
  std::vector<std::string> env;
  for (const auto& [key, value] : vars) env.push_back(key + "=" + value);
  return env;
}

std::string path_of(const std::vector<std::string>& env) {
  for (const auto& var : env) {
    if (var.starts_with("PATH=")) return var.substr(5);
  }
  return kDefaultPath;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Supervisor

struct Supervisor::Impl {
  // Why the running process is being terminated.
  enum class Termination { kNone, kUnhealthy, kStop };

  struct Running {
    pid_t pid = 0;
    UniqueFd pidfd;   // invalid where pidfd_open is missing: exits are then polled
    UniqueFd output;  // read end of stdout+stderr; closed at EOF
    std::string cgroup_dir;
    bool healthy_since_spawn = false;
  };

  Impl(WorkloadSpec s, std::function<void(const WorkloadEvent&)> callback)
      : spec(std::move(s)), on_event(std::move(callback)) {}

  void run(std::promise<Status> started);
  void loop_once();
  void wait(int64_t timeout_ms);
  int64_t next_timeout(int64_t now) const;
  void run_timers(int64_t now);
  [[nodiscard]] Status spawn_workload();
  void read_output(size_t limit);
  void check_exit();
  void start_check(int64_t now);
  void poll_check(int64_t now);
  void on_check_result(const CheckResult& result);
  void mark_healthy(std::string message);
  void begin_termination(Termination why);
  void schedule_restart(const std::string& reason);
  void restart_now();
  void exited(std::string message);
  void finish_stopped();
  void cancel_check();
  void publish(bool emit);
  bool stop_requested_now() const;
  void request_stop();
  std::string pid_file() const { return spec.log_dir + "/pid"; }

  // Set before the thread starts, read-only afterwards.
  const WorkloadSpec spec;
  const std::function<void(const WorkloadEvent&)> on_event;
  LimitsPlan limits;
  std::vector<std::string> env;
  std::string program;  // resolved argv[0]
  UniqueFd wake_fd;     // eventfd: stop() writes, the loop wakes
  std::atomic<std::thread::id> loop_thread_id{};

  std::mutex lifecycle_mu;  // serializes start() and stop()
  bool started = false;     // GUARDED_BY(lifecycle_mu)
  std::thread thread;       // GUARDED_BY(lifecycle_mu)

  mutable std::mutex mu;
  WorkloadEvent published;      // GUARDED_BY(mu): what snapshot() returns
  bool stop_requested = false;  // GUARDED_BY(mu)

  // Owned by the supervisor thread (and by start() before the thread exists).
  WorkloadEvent current;
  OutputLog log;
  std::optional<Running> proc;
  std::unique_ptr<HttpProbe> http_probe;
  std::unique_ptr<ExecProbe> exec_probe;
  Termination termination = Termination::kNone;
  std::string unhealthy_reason;
  std::optional<int64_t> kill_at;        // SIGKILL the group then
  std::optional<int64_t> settle_at;      // healthy then, without a check
  std::optional<int64_t> next_check_at;  // start the next check then
  std::optional<int64_t> backoff_until;  // restart then
  std::optional<int64_t> healthy_since;  // healthy without a break since then
  int64_t check_started_at = 0;
  int consecutive_check_failures = 0;
  int consecutive_restarts = 0;  // drives the backoff delay
  bool killed_after_grace = false;
  bool done = false;
};

void Supervisor::Impl::publish(bool emit) {
  WorkloadEvent copy;
  {
    std::lock_guard lock(mu);
    published = current;
    copy = current;
  }
  if (emit && on_event) on_event(copy);
}

bool Supervisor::Impl::stop_requested_now() const {
  std::lock_guard lock(mu);
  return stop_requested;
}

void Supervisor::Impl::request_stop() {
  {
    std::lock_guard lock(mu);
    stop_requested = true;
  }
  if (wake_fd) {
    uint64_t one = 1;
    ssize_t written = ::write(wake_fd.get(), &one, sizeof one);
    (void)written;
  }
}

void Supervisor::Impl::run(std::promise<Status> started_promise) {
  loop_thread_id = std::this_thread::get_id();
  Status spawned = spawn_workload();
  if (!spawned) {
    log.close();
    loop_thread_id = std::thread::id();
    started_promise.set_value(std::move(spawned));
    return;
  }
  current.state = WorkloadState::kStarting;
  current.message = "started";
  publish(false);  // snapshot() shows the pid as soon as start() returns
  started_promise.set_value(ok());
  if (on_event) on_event(current);
  while (!done) loop_once();
  loop_thread_id = std::thread::id();
}

void Supervisor::Impl::loop_once() {
  wait(next_timeout(now_ms()));
  if (wake_fd) {
    uint64_t count = 0;
    ssize_t got = ::read(wake_fd.get(), &count, sizeof count);
    (void)got;
  }
  if (stop_requested_now()) begin_termination(Termination::kStop);
  if (done) return;
  read_output(kMaxReadPerTurn);
  poll_check(now_ms());
  check_exit();
  if (done) return;
  run_timers(now_ms());
}

int64_t Supervisor::Impl::next_timeout(int64_t now) const {
  int64_t deadline = now + kMaxWaitMs;
  for (const auto& at : {kill_at, settle_at, backoff_until}) {
    if (at) deadline = std::min(deadline, *at);
  }
  bool check_running =
      (exec_probe && exec_probe->running()) || (http_probe && http_probe->running());
  if (next_check_at && !check_running) deadline = std::min(deadline, *next_check_at);
  if (exec_probe && exec_probe->running()) {
    deadline = std::min(deadline, exec_probe->deadline());
    if (exec_probe->pidfd() < 0) deadline = std::min(deadline, now + kExitPollMs);
  }
  if (proc && !proc->pidfd) deadline = std::min(deadline, now + kExitPollMs);
  return std::max<int64_t>(0, deadline - now);
}

void Supervisor::Impl::wait(int64_t timeout_ms) {
  // Readiness itself is not inspected: after every wake-up each source is tried without
  // blocking, which is cheap and cannot miss one.
  std::vector<pollfd> fds;
  fds.push_back({wake_fd.get(), POLLIN, 0});
  if (proc && proc->output) fds.push_back({proc->output.get(), POLLIN, 0});
  if (proc && proc->pidfd) fds.push_back({proc->pidfd.get(), POLLIN, 0});
  if (exec_probe && exec_probe->pidfd() >= 0) fds.push_back({exec_probe->pidfd(), POLLIN, 0});
  int timeout = static_cast<int>(timeout_ms);
  if (http_probe && http_probe->multi()) {
    std::vector<curl_waitfd> extra;
    for (const auto& fd : fds) extra.push_back({fd.fd, CURL_WAIT_POLLIN, 0});
    curl_multi_poll(http_probe->multi(), extra.data(), static_cast<unsigned>(extra.size()), timeout,
                    nullptr);
  } else {
    ::poll(fds.data(), fds.size(), timeout);
  }
}

void Supervisor::Impl::run_timers(int64_t now) {
  if (kill_at && now >= *kill_at) {
    kill_at.reset();
    if (proc) {
      spdlog::warn("workload {}: pid {} still running {} after SIGTERM; sending SIGKILL", spec.name,
                   proc->pid, format_seconds(spec.stop_grace_ms));
      killed_after_grace = true;
      ::kill(-proc->pid, SIGKILL);
    }
  }
  if (settle_at && now >= *settle_at) {
    settle_at.reset();
    if (proc && termination == Termination::kNone && current.state == WorkloadState::kStarting) {
      mark_healthy(fmt::format("running for {}", format_seconds(spec.settle_ms)));
    }
  }
  if (next_check_at && now >= *next_check_at && proc && termination == Termination::kNone) {
    bool check_running =
        (exec_probe && exec_probe->running()) || (http_probe && http_probe->running());
    if (!check_running) start_check(now);
  }
  if (backoff_until && now >= *backoff_until) {
    backoff_until.reset();
    restart_now();
  }
}

Status Supervisor::Impl::spawn_workload() {
  std::string cgroup_dir;
  UniqueFd procs_fd;
  if (!limits.cgroup_parent.empty()) {
    auto created = create_cgroup(limits, spec);
    if (!created) {
      return make_error(created.error().with_context(fmt::format("cannot start {}", spec.argv[0])));
    }
    cgroup_dir = *created;
    procs_fd.reset(::open((cgroup_dir + "/cgroup.procs").c_str(), O_WRONLY | O_CLOEXEC));
    if (!procs_fd) {
      int err = errno;
      remove_cgroup(cgroup_dir);
      return make_error(Errc::kIo, fmt::format("cannot start {}: opening {}/cgroup.procs: {}",
                                               spec.argv[0], cgroup_dir, errno_text(err)));
    }
  }
  auto output = make_pipe();
  if (!output) {
    remove_cgroup(cgroup_dir);
    return make_error(output.error());
  }
  ::fcntl(output->read.get(), F_SETFL, O_NONBLOCK);
  SpawnPlan plan{.display = spec.argv[0],
                 .path = program,
                 .argv = spec.argv,
                 .env = env,
                 .cwd = spec.cwd,
                 .output_fd = output->write.get(),
                 .cgroup_procs_fd = procs_fd.get(),
                 .rlimit_as = limits.rlimit_as,
                 .rlimit_nofile = limits.rlimit_nofile,
                 .death_signal = SIGTERM};
  auto pid = spawn_process(plan);
  output->write.reset();
  procs_fd.reset();
  if (!pid) {
    remove_cgroup(cgroup_dir);
    return make_error(pid.error());
  }

  Running running;
  running.pid = *pid;
  running.pidfd.reset(open_pidfd(*pid));
  running.output = std::move(output->read);
  running.cgroup_dir = cgroup_dir;
  proc = std::move(running);

  auto stat = read_proc_stat(*pid);
  Status recorded =
      write_file_durably(pid_file(), fmt::format("{} {}\n", *pid, stat ? stat->start_time : 0));
  if (!recorded) {
    spdlog::warn("workload {}: recording pid: {}", spec.name, recorded.error().describe());
  }

  int64_t now = now_ms();
  current.pid = *pid;
  consecutive_check_failures = 0;
  healthy_since.reset();
  if (spec.health) {
    next_check_at = now + std::min(spec.health->period_ms, kStartingCheckIntervalMs);
  } else {
    settle_at = now + spec.settle_ms;
  }
  spdlog::info("workload {}: started pid {} ({})", spec.name, *pid, join(spec.argv, " "));
  return ok();
}

void Supervisor::Impl::read_output(size_t limit) {
  if (!proc || !proc->output) return;
  char buf[64 * 1024];
  size_t total = 0;
  while (total < limit) {
    ssize_t n = ::read(proc->output.get(), buf, sizeof buf);
    if (n > 0) {
      log.append(std::string_view(buf, static_cast<size_t>(n)));
      total += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    proc->output.reset();  // EOF (or a broken pipe): the process may well keep running
    return;
  }
}

void Supervisor::Impl::check_exit() {
  if (!proc) return;
  auto exit = reap_group_if_exited(proc->pid);
  if (!exit) return;
  // The group is dead now, so the pipe drains to EOF unless a setsid'd escapee holds it.
  read_output(SIZE_MAX);
  bool was_healthy = proc->healthy_since_spawn;
  remove_cgroup(proc->cgroup_dir);
  ::unlink(pid_file().c_str());
  spdlog::info("workload {}: pid {} {}", spec.name, proc->pid, exit->message);
  proc.reset();
  cancel_check();
  kill_at.reset();
  settle_at.reset();
  next_check_at.reset();
  current.pid = 0;
  current.exit_code = exit->code;

  Termination why = std::exchange(termination, Termination::kNone);
  if (why == Termination::kStop) {
    finish_stopped();
    return;
  }
  if (why == Termination::kUnhealthy) {
    if (spec.restart == RestartPolicy::kNever) {
      exited(unhealthy_reason + "; not restarted (restart policy never)");
    } else {
      schedule_restart(unhealthy_reason);
    }
    return;
  }
  if (!was_healthy) {
    // Never healthy since this (re)start: restarting would hide a broken revision.
    exited(exit->message);
    return;
  }
  bool failed = exit->code != 0;
  bool restart = spec.restart == RestartPolicy::kAlways ||
                 (spec.restart == RestartPolicy::kOnFailure && failed);
  if (restart) {
    schedule_restart(exit->message);
  } else {
    exited(exit->message);
  }
}

void Supervisor::Impl::start_check(int64_t now) {
  next_check_at.reset();
  check_started_at = now;
  std::optional<CheckResult> immediate;
  if (http_probe) {
    immediate = http_probe->begin(spec.health->timeout_ms);
  } else if (exec_probe) {
    immediate = exec_probe->begin(spec.cwd, env, path_of(env), spec.health->timeout_ms);
  }
  if (immediate) on_check_result(*immediate);
}

void Supervisor::Impl::poll_check(int64_t now) {
  std::optional<CheckResult> result;
  if (http_probe) result = http_probe->poll();
  if (!result && exec_probe) result = exec_probe->poll(now);
  if (result) on_check_result(*result);
}

void Supervisor::Impl::on_check_result(const CheckResult& result) {
  if (!proc || termination != Termination::kNone) return;
  if (result.healthy) {
    consecutive_check_failures = 0;
    if (current.state == WorkloadState::kHealthy) {
      current.message = result.message;
      publish(false);
    } else {
      mark_healthy(result.message);
    }
  } else if (current.state == WorkloadState::kStarting) {
    // Still coming up: failures are expected and do not count.
    current.message = result.message;
    publish(false);
  } else {
    ++consecutive_check_failures;
    current.message = result.message;
    if (current.state == WorkloadState::kHealthy) {
      spdlog::warn("workload {}: unhealthy: {}", spec.name, result.message);
      current.state = WorkloadState::kUnhealthy;
      healthy_since.reset();
      publish(true);
    } else {
      publish(false);
    }
    if (consecutive_check_failures >= spec.health->failures_to_restart) {
      unhealthy_reason =
          fmt::format("{} ({} failures in a row)", result.message, consecutive_check_failures);
      begin_termination(Termination::kUnhealthy);
      return;
    }
  }
  int64_t interval = current.state == WorkloadState::kStarting
                         ? std::min(spec.health->period_ms, kStartingCheckIntervalMs)
                         : spec.health->period_ms;
  next_check_at = std::max(now_ms(), check_started_at + interval);
}

void Supervisor::Impl::mark_healthy(std::string message) {
  proc->healthy_since_spawn = true;
  consecutive_check_failures = 0;
  healthy_since = now_ms();
  current.state = WorkloadState::kHealthy;
  current.ever_healthy = true;
  current.message = std::move(message);
  spdlog::info("workload {}: healthy ({})", spec.name, current.message);
  publish(true);
}

void Supervisor::Impl::begin_termination(Termination why) {
  if (termination == Termination::kStop) return;
  cancel_check();
  settle_at.reset();
  backoff_until.reset();
  if (!proc) {
    if (why == Termination::kStop) finish_stopped();
    return;
  }
  if (termination == Termination::kNone) {
    spdlog::info("workload {}: sending SIGTERM to process group {}", spec.name, proc->pid);
    ::kill(-proc->pid, SIGTERM);
    kill_at = now_ms() + spec.stop_grace_ms;
  }
  termination = why;
}

void Supervisor::Impl::schedule_restart(const std::string& reason) {
  int64_t now = now_ms();
  if (healthy_since && now - *healthy_since >= spec.backoff_max_ms) consecutive_restarts = 0;
  healthy_since.reset();
  ++consecutive_restarts;
  int64_t delay = spec.backoff_initial_ms;
  for (int i = 1; i < consecutive_restarts && delay < spec.backoff_max_ms; ++i) delay *= 2;
  delay = std::min(delay, spec.backoff_max_ms);
  backoff_until = now + delay;
  current.state = WorkloadState::kBackoff;
  current.message = fmt::format("{}; restarting in {}", reason, format_seconds(delay));
  spdlog::warn("workload {}: {}", spec.name, current.message);
  publish(true);
}

void Supervisor::Impl::restart_now() {
  Status spawned = spawn_workload();
  if (!spawned) {
    spdlog::error("workload {}: {}", spec.name, spawned.error().describe());
    exited(spawned.error().message);
    return;
  }
  ++current.restarts;
  current.state = WorkloadState::kStarting;
  current.message = fmt::format("restarted ({} so far)", current.restarts);
  publish(true);
}

void Supervisor::Impl::exited(std::string message) {
  current.state = WorkloadState::kExited;
  current.message = std::move(message);
  publish(true);
}

void Supervisor::Impl::finish_stopped() {
  cancel_check();
  http_probe.reset();
  exec_probe.reset();
  log.close();
  current.state = WorkloadState::kStopped;
  current.pid = 0;
  current.message = killed_after_grace ? fmt::format("stopped (SIGKILL after {} grace)",
                                                     format_seconds(spec.stop_grace_ms))
                                       : "stopped";
  spdlog::info("workload {}: {}", spec.name, current.message);
  publish(true);
  done = true;
}

void Supervisor::Impl::cancel_check() {
  if (http_probe) http_probe->cancel();
  if (exec_probe) exec_probe->cancel();
}

Supervisor::Supervisor(WorkloadSpec spec, std::function<void(const WorkloadEvent&)> on_event)
    : impl_(std::make_unique<Impl>(std::move(spec), std::move(on_event))) {}

Supervisor::~Supervisor() { stop(); }

Status Supervisor::start() {
  Impl& s = *impl_;
  std::lock_guard lifecycle(s.lifecycle_mu);
  if (s.started) {
    return make_error(Errc::kFailedPrecondition,
                      fmt::format("workload {}: start() was already called", s.spec.name));
  }
  s.started = true;
  if (s.stop_requested_now()) {
    return make_error(Errc::kFailedPrecondition,
                      fmt::format("workload {}: already stopped", s.spec.name));
  }
  auto fail = [&](Error error) {
    std::lock_guard lock(s.mu);
    s.published.state = WorkloadState::kExited;
    s.published.message = error.message;
    return make_error(std::move(error));
  };
  if (Status valid = validate(s.spec); !valid) return fail(valid.error());
  if (Status made = make_dirs(s.spec.log_dir); !made) {
    return fail(made.error().with_context(fmt::format("workload {}: log_dir", s.spec.name)));
  }
  if (Status opened = s.log.open(s.spec.log_dir, s.spec.log_max_bytes, s.spec.log_keep); !opened) {
    return fail(opened.error());
  }
  s.env = build_env(s.spec);
  auto program = resolve_program(s.spec.argv[0], s.spec.cwd, path_of(s.env));
  if (!program) {
    s.log.close();
    return fail(program.error());
  }
  s.program = *program;
  s.limits = plan_limits(s.spec);
  s.current.limits_note = s.limits.note;
  if (s.spec.health && !s.spec.health->http_path.empty()) {
    s.http_probe = std::make_unique<HttpProbe>(s.spec.health->port, s.spec.health->http_path);
  } else if (s.spec.health) {
    s.exec_probe = std::make_unique<ExecProbe>(s.spec.health->exec);
  }
  s.wake_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s.wake_fd) {
    s.log.close();
    return fail(system_error("eventfd", errno));
  }

  std::promise<Status> started;
  std::future<Status> result = started.get_future();
  s.thread =
      std::thread([&s, promise = std::move(started)]() mutable { s.run(std::move(promise)); });
  Status status = result.get();
  if (!status) {
    s.thread.join();
    s.http_probe.reset();
    s.exec_probe.reset();
    return fail(status.error());
  }
  return ok();
}

void Supervisor::stop() {
  Impl& s = *impl_;
  if (std::this_thread::get_id() == s.loop_thread_id.load()) {
    // From on_event: joining would deadlock; the loop sees the request on its next turn.
    s.request_stop();
    return;
  }
  std::lock_guard lifecycle(s.lifecycle_mu);
  s.request_stop();
  if (s.thread.joinable()) {
    s.thread.join();
    return;
  }
  // Never started, start() failed, or stopped before.
  WorkloadEvent copy;
  {
    std::lock_guard lock(s.mu);
    if (s.published.state == WorkloadState::kStopped) return;
    s.published.state = WorkloadState::kStopped;
    s.published.pid = 0;
    s.published.message = "stopped";
    copy = s.published;
  }
  if (s.on_event) s.on_event(copy);
}

WorkloadEvent Supervisor::snapshot() const {
  std::lock_guard lock(impl_->mu);
  return impl_->published;
}

bool Supervisor::signal(int sig) {
  // The supervisor publishes pid 0 right after it reaps the process; in that short window the
  // pid could in principle be reused by another process of this user. Good enough for a reload
  // hint; a pidfd would close it.
  std::lock_guard lock(impl_->mu);
  const pid_t pid = impl_->published.pid;
  return pid > 0 && ::kill(pid, sig) == 0;
}

void Supervisor::kill_leftover(const std::string& log_dir) {
  const std::string path = log_dir + "/pid";
  auto text = read_file(path);
  if (!text) return;
  std::istringstream in(*text);
  long pid = 0;
  uint64_t start_time = 0;
  if (!(in >> pid >> start_time) || pid <= 1) {
    spdlog::warn("ignoring {}: expected \"<pid> <start time>\"", path);
    ::unlink(path.c_str());
    return;
  }
  const auto group = static_cast<pid_t>(pid);
  bool ours = false;
  if (auto leader = read_proc_stat(group)) {
    // Alive (or a zombie) under that pid: ours only if it is the very process we started.
    ours = leader->start_time == start_time && leader->pgrp == group;
  } else {
    // The leader is gone; its pid cannot be reused while its group lives on in its children.
    ours = !live_group_members(group, start_time).empty();
  }
  if (ours) {
    spdlog::warn("killing process group {} left behind by a previous agent ({})", group, path);
    ::kill(-group, SIGKILL);
    for (int i = 0; i < 200 && !live_group_members(group, start_time).empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  ::unlink(path.c_str());
}

}  // namespace outpost::agent
