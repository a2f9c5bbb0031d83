// Runs and watches one companion process ("workload") of a deployment on the device: spawns it,
// decides when it is healthy, restarts it with backoff, keeps its output log, limits and stops it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::agent {

enum class RestartPolicy { kAlways, kOnFailure, kNever };

// Exactly one of http_path (with port) or exec is set.
struct HealthCheck {
  std::string http_path;  // e.g. "/healthz": GET http://127.0.0.1:<port><path>, 2xx = healthy
  int port = 0;           // required with http_path
  std::vector<std::string> exec;  // or: a command run in the workload's cwd/env; exit 0 = healthy
  int64_t period_ms = 10'000;
  int64_t timeout_ms = 5'000;   // per check
  int failures_to_restart = 3;  // consecutive failures of a healthy process -> restart it
                                // (counts as a restart)
};

struct ResourceLimits {
  std::optional<int64_t> memory_bytes;
  std::optional<double> cpus;  // e.g. 0.5 of one core
  std::optional<int64_t> open_files;
};

struct WorkloadSpec {
  std::string name;               // for log lines and the cgroup name, e.g. "defect-detector"
  std::vector<std::string> argv;  // argv[0]: absolute, relative to cwd (contains '/'), or in PATH
  std::string cwd;
  // Set on top of a minimal base: PATH (the agent's PATH or "/usr/local/bin:/usr/bin:/bin"),
  // HOME=cwd, LANG=C.UTF-8. PATH here also decides where argv[0] is looked up.
  std::map<std::string, std::string> env;
  std::string log_dir;  // stdout+stderr (merged) go to <log_dir>/output.log
  // Rotate when output.log would exceed this. Files end at line ends: one may run over by up to
  // max/16 (at most 4 KiB) to finish a line; only longer lines are split.
  int64_t log_max_bytes = 1 << 20;
  int log_keep = 3;  // output.log.1 .. output.log.N kept
  RestartPolicy restart = RestartPolicy::kOnFailure;
  int64_t backoff_initial_ms = 1'000;  // restart delay doubles per consecutive failure, capped
  int64_t backoff_max_ms = 60'000;     // a process that stayed healthy this long resets the delay
  std::optional<HealthCheck> health;
  int64_t settle_ms = 2'000;       // with no health check: alive this long = healthy
  int64_t stop_grace_ms = 10'000;  // SIGTERM, then SIGKILL after this
  ResourceLimits limits;
  // A cgroup v2 directory the agent may create children in ("" = none: use rlimits).
  std::string cgroup_parent;
};

enum class WorkloadState { kStarting, kHealthy, kUnhealthy, kBackoff, kExited, kStopped };
// "starting", "healthy", "unhealthy", "backoff", "exited", "stopped"
const char* workload_state_name(WorkloadState state);

struct WorkloadEvent {
  WorkloadState state = WorkloadState::kStarting;
  int restarts = 0;              // restarts done so far by this supervisor
  bool ever_healthy = false;     // has this supervisor's process ever been healthy
  std::optional<int> exit_code;  // last exit: code, or 128+signal
  // Human reason: "exited with code 3", "killed by signal 9 (SIGKILL)",
  // "health check GET http://127.0.0.1:8080/healthz: HTTP 500",
  // "health check [bin/check]: exit code 1", "cannot start bin/app: No such file or directory".
  std::string message;
  pid_t pid = 0;  // 0 when no process runs
  // How limits are enforced: "memory via cgroup v2 (memory.max)",
  // "memory via RLIMIT_AS; cpu limit not enforced (no cgroup v2 delegation)", "" when none asked.
  std::string limits_note;
};

// Supervises one workload revision.
//
// Lifecycle: starting -> healthy (first passing check, or alive settle_ms without a check);
// healthy <-> unhealthy on check results, and failures_to_restart failures in a row restart it.
// A process that exits before it was ever healthy since its last (re)start ends in kExited
// without a restart: the agent decides (roll back). After being healthy, an exit restarts per
// policy, after a backoff. A healthy-turned-failing process under kNever ends in kExited.
// While starting, checks run every min(period_ms, 1 s) and their failures do not count; there is
// no start deadline here (the agent owns that timeout).
//
// The process runs in its own session and process group; the group is the unit: once the main
// process exits, what is left of its group is SIGKILLed, and stop() signals the whole group.
//
// Agent crashes: the process gets SIGTERM when the agent dies (PR_SET_PDEATHSIG), so a crashed
// agent does not leave it running headless for long; children of the workload do not get that
// signal, so after a restart the agent calls kill_leftover(log_dir) before starting the workload
// again. Processes are spawned from the supervisor's own thread because the death signal follows
// the thread that forked, not the process.
//
// The agent must leave SIGCHLD at its default and must not reap children it did not spawn
// (waitpid(-1, ...)): the supervisor reaps its own.
//
// Thread-safety: start(), stop() and snapshot() may be called from any thread; on_event runs on
// the supervisor's thread (on the caller's thread for the kStopped event of a supervisor whose
// start() failed or was never called) and must not call stop() or destroy the Supervisor.
class Supervisor {
 public:
  // on_event is called on every state change and on each restart, without locks held.
  Supervisor(WorkloadSpec spec, std::function<void(const WorkloadEvent&)> on_event);
  ~Supervisor();  // stops (graceful) if still running
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Spawns the process and the supervisor thread. Fails (nothing left running, no event) on an
  // invalid spec or when the program cannot be executed at all (missing file, not executable,
  // bad cwd): the error names the program and why. Only the first call may succeed.
  [[nodiscard]] Status start();
  // Graceful stop: SIGTERM to the process group, SIGKILL after stop_grace_ms; waits for it and
  // joins the thread. Works in every state (also during backoff and while starting). Idempotent.
  // After it, state is kStopped and on_event was called with it (once).
  void stop();
  WorkloadEvent snapshot() const;
  // Sends `sig` to the running process (not its group), e.g. SIGHUP after its secret files were
  // rewritten. False when no process runs (backoff, exited, stopped).
  bool signal(int sig);

  // After an agent restart: if <log_dir>/pid names a workload process group that a previous
  // agent left behind (checked by the process start time recorded with the pid), SIGKILLs that
  // group and waits briefly for it to go. Removes the pid file. Unrelated processes are left alone.
  static void kill_leftover(const std::string& log_dir);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace outpost::agent
