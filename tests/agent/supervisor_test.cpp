// Tests for the workload supervisor, with /bin/sh scripts as workloads and a loopback HTTP
// listener for health checks. Timings are small (tens of milliseconds) to keep the file fast.
#include "agent/supervise/supervisor.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "test_support.h"

namespace outpost::agent {
namespace {

using namespace test_support;  // TempDir, read_text, write_text, exists, wait_until

int64_t file_size(const std::string& path) {
  std::error_code ec;
  auto size = std::filesystem::file_size(path, ec);
  return ec ? -1 : static_cast<int64_t>(size);
}

using namespace std::chrono_literals;
using SteadyClock = std::chrono::steady_clock;

// Running and not a zombie (an orphan's zombie may linger where pid 1 does not reap).
bool process_running(pid_t pid) {
  std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  size_t close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] != 'Z';
}

pid_t read_pid(const std::string& path) {
  std::string text;
  if (!wait_until([&] { return (text = read_text(path)).find('\n') != std::string::npos; }, 3s)) {
    return 0;
  }
  return static_cast<pid_t>(std::stol(text));
}

int64_t elapsed_ms(SteadyClock::time_point since) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - since).count();
}

int open_fd_count() {
  int count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++count;
  }
  return count;
}

struct Recorded {
  WorkloadEvent event;
  SteadyClock::time_point at;
};

// Collects events from the supervisor thread; tests wait on them.
class Recorder {
 public:
  std::function<void(const WorkloadEvent&)> callback() {
    return [this](const WorkloadEvent& event) {
      {
        std::lock_guard lock(mu_);
        events_.push_back({event, SteadyClock::now()});
      }
      changed_.notify_all();
    };
  }

  bool wait_for(const std::function<bool(const std::vector<Recorded>&)>& done,
                std::chrono::milliseconds timeout = 5s) {
    std::unique_lock lock(mu_);
    return changed_.wait_for(lock, timeout, [&] { return done(events_); });
  }

  bool wait_state(WorkloadState state, std::chrono::milliseconds timeout = 5s) {
    return wait_for([&](const auto& events) { return count_in(events, state) > 0; }, timeout);
  }

  std::vector<Recorded> events() const {
    std::lock_guard lock(mu_);
    return events_;
  }

  int count(WorkloadState state) const {
    std::lock_guard lock(mu_);
    return count_in(events_, state);
  }

  // The first event in `state`; fails the test when there is none.
  WorkloadEvent first(WorkloadState state) const {
    for (const auto& recorded : events()) {
      if (recorded.event.state == state) return recorded.event;
    }
    ADD_FAILURE() << "no event in state " << workload_state_name(state);
    return {};
  }

  std::string states() const {
    std::string out;
    for (const auto& recorded : events()) {
      out += std::string(workload_state_name(recorded.event.state)) + "(" + recorded.event.message +
             ") ";
    }
    return out;
  }

 private:
  static int count_in(const std::vector<Recorded>& events, WorkloadState state) {
    int n = 0;
    for (const auto& recorded : events) n += recorded.event.state == state ? 1 : 0;
    return n;
  }

  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::vector<Recorded> events_;
};

// A workload of `sh -c script` in `dir`, with small timings.
WorkloadSpec script_spec(const TempDir& dir, const std::string& script) {
  WorkloadSpec spec;
  spec.name = "test-workload";
  spec.argv = {"/bin/sh", "-c", script};
  spec.cwd = dir.path();
  spec.log_dir = dir.file("logs");
  spec.settle_ms = 100;
  spec.backoff_initial_ms = 50;
  spec.backoff_max_ms = 1'000;
  spec.stop_grace_ms = 2'000;
  return spec;
}

// Answers every request on 127.0.0.1:<port> with `status` and no body.
class HttpListener {
 public:
  HttpListener() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(fd_, 16), 0);
    EXPECT_EQ(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~HttpListener() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }

  int port() const { return port_; }
  void set_status(int status) { status_ = status; }
  int requests() const { return requests_; }
  std::string last_request_line() const {
    std::lock_guard lock(mu_);
    return last_request_line_;
  }

 private:
  void serve() {
    while (!stop_) {
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, 20) <= 0) continue;
      int client = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) continue;
      std::string request = test_support::read_request_head(client);
      {
        std::lock_guard lock(mu_);
        last_request_line_ = request.substr(0, request.find("\r\n"));
      }
      ++requests_;
      std::string response = "HTTP/1.1 " + std::to_string(status_.load()) +
                             " X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
      ssize_t written = ::write(client, response.data(), response.size());
      (void)written;
      ::close(client);
    }
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<int> status_{200};
  std::atomic<int> requests_{0};
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::string last_request_line_;
  std::thread thread_;
};

TEST(Supervisor, HealthyAfterSettleWithoutCheck) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "exec sleep 1000");
  spec.settle_ms = 200;
  Supervisor supervisor(spec, recorder.callback());
  auto started_at = SteadyClock::now();
  ASSERT_TRUE(supervisor.start()) << recorder.states();

  ASSERT_TRUE(recorder.wait_state(WorkloadState::kHealthy)) << recorder.states();
  EXPECT_GE(elapsed_ms(started_at), 190);
  auto events = recorder.events();
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events[0].event.state, WorkloadState::kStarting);
  EXPECT_GT(events[0].event.pid, 0);
  EXPECT_FALSE(events[0].event.ever_healthy);
  EXPECT_EQ(events[1].event.state, WorkloadState::kHealthy);
  EXPECT_TRUE(events[1].event.ever_healthy);
  EXPECT_EQ(events[1].event.limits_note, "");

  WorkloadEvent now = supervisor.snapshot();
  EXPECT_EQ(now.state, WorkloadState::kHealthy);
  pid_t pid = now.pid;
  EXPECT_TRUE(process_running(pid));
  EXPECT_EQ(read_pid(dir.file("logs/pid")), pid);

  supervisor.stop();
  EXPECT_EQ(supervisor.snapshot().state, WorkloadState::kStopped);
  EXPECT_EQ(supervisor.snapshot().pid, 0);
  EXPECT_FALSE(process_running(pid));
  EXPECT_FALSE(exists(dir.file("logs/pid")));
}

TEST(Supervisor, HealthyOnlyOnceExecCheckPasses) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 0.3; touch ready; exec sleep 1000");
  spec.settle_ms = 60'000;  // must not be what makes it healthy
  spec.health = HealthCheck{.exec = {"/bin/sh", "-c", "test -f ready"}, .period_ms = 50};
  Supervisor supervisor(spec, recorder.callback());
  auto started_at = SteadyClock::now();
  ASSERT_TRUE(supervisor.start());

  // Failing checks while starting are visible but change nothing.
  ASSERT_TRUE(wait_until(
      [&] { return supervisor.snapshot().message.find("exit code 1") != std::string::npos; }, 2s))
      << supervisor.snapshot().message;
  EXPECT_EQ(supervisor.snapshot().state, WorkloadState::kStarting);
  EXPECT_EQ(supervisor.snapshot().message, "health check [/bin/sh -c test -f ready]: exit code 1");

  ASSERT_TRUE(recorder.wait_state(WorkloadState::kHealthy, 3s)) << recorder.states();
  EXPECT_GE(elapsed_ms(started_at), 290);
  EXPECT_TRUE(exists(dir.file("ready")));
  EXPECT_EQ(recorder.first(WorkloadState::kHealthy).message,
            "health check [/bin/sh -c test -f ready]: passed");
  EXPECT_EQ(recorder.count(WorkloadState::kStarting), 1);
}

TEST(Supervisor, HttpCheckDrivesHealthAndRestartsAfterFailuresInARow) {
  TempDir dir;
  Recorder recorder;
  HttpListener listener;
  std::atomic<bool> recover_on_unhealthy{true};
  auto record = recorder.callback();
  auto spec = script_spec(dir, "exec sleep 1000");
  spec.health = HealthCheck{.http_path = "/healthz",
                            .port = listener.port(),
                            .period_ms = 50,
                            .timeout_ms = 1'000,
                            .failures_to_restart = 4};
  // The first time it turns unhealthy, the endpoint recovers before the 4th failure.
  Supervisor supervisor(spec, [&](const WorkloadEvent& event) {
    if (event.state == WorkloadState::kUnhealthy && recover_on_unhealthy.exchange(false)) {
      listener.set_status(200);
    }
    record(event);
  });
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kHealthy)) << recorder.states();
  std::string url = "http://127.0.0.1:" + std::to_string(listener.port()) + "/healthz";
  EXPECT_EQ(recorder.first(WorkloadState::kHealthy).message,
            "health check GET " + url + ": HTTP 200");
  EXPECT_EQ(listener.last_request_line(), "GET /healthz HTTP/1.1");

  listener.set_status(500);
  ASSERT_TRUE(recorder.wait_for([](const auto& events) {
    return events.size() >= 4 && events.back().event.state == WorkloadState::kHealthy;
  })) << recorder.states();
  EXPECT_EQ(recorder.first(WorkloadState::kUnhealthy).message,
            "health check GET " + url + ": HTTP 500");
  EXPECT_EQ(supervisor.snapshot().restarts, 0);

  pid_t first_pid = supervisor.snapshot().pid;
  listener.set_status(500);
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kBackoff)) << recorder.states();
  EXPECT_EQ(recorder.first(WorkloadState::kBackoff).message,
            "health check GET " + url + ": HTTP 500 (4 failures in a row); restarting in 0.05 s");
  EXPECT_FALSE(process_running(first_pid));
  listener.set_status(200);
  ASSERT_TRUE(recorder.wait_for([](const auto& events) {
    return !events.empty() && events.back().event.state == WorkloadState::kHealthy &&
           events.back().event.restarts == 1;
  })) << recorder.states();
  EXPECT_NE(supervisor.snapshot().pid, first_pid);
  EXPECT_GE(listener.requests(), 8);  // 2 healthy, 1+4 failing, 1 after the restart
}

TEST(Supervisor, ExitBeforeHealthyIsFinalWithoutRestart) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "echo boom; exit 3");
  spec.settle_ms = 500;
  spec.restart = RestartPolicy::kAlways;  // even so: a never-healthy revision is not restarted
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());

  ASSERT_TRUE(recorder.wait_state(WorkloadState::kExited)) << recorder.states();
  WorkloadEvent exited = recorder.first(WorkloadState::kExited);
  EXPECT_EQ(exited.exit_code, 3);
  EXPECT_EQ(exited.message, "exited with code 3");
  EXPECT_EQ(exited.restarts, 0);
  EXPECT_FALSE(exited.ever_healthy);
  EXPECT_EQ(exited.pid, 0);
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(recorder.count(WorkloadState::kStarting), 1) << recorder.states();
  EXPECT_EQ(recorder.count(WorkloadState::kBackoff), 0);
  EXPECT_EQ(supervisor.snapshot().state, WorkloadState::kExited);
  EXPECT_EQ(read_text(dir.file("logs/output.log")), "boom\n");
}

TEST(Supervisor, OnFailureRestartsWithDoublingBackoff) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 0.15; exit 1");
  spec.settle_ms = 50;
  spec.backoff_initial_ms = 50;
  spec.backoff_max_ms = 1'000;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());

  ASSERT_TRUE(recorder.wait_for(
      [](const auto& events) {
        return !events.empty() && events.back().event.state == WorkloadState::kStarting &&
               events.back().event.restarts == 3;
      },
      5s))
      << recorder.states();
  supervisor.stop();
  auto events = recorder.events();
  const int64_t expected_delays[] = {50, 100, 200};
  const char* expected_texts[] = {"0.05 s", "0.1 s", "0.2 s"};
  int backoffs = 0;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    if (events[i].event.state != WorkloadState::kBackoff) continue;
    ASSERT_LT(backoffs, 3);
    const auto& backoff = events[i].event;
    EXPECT_EQ(backoff.exit_code, 1);
    EXPECT_EQ(backoff.restarts, backoffs);
    EXPECT_EQ(backoff.message,
              std::string("exited with code 1; restarting in ") + expected_texts[backoffs]);
    ASSERT_EQ(events[i + 1].event.state, WorkloadState::kStarting);
    EXPECT_EQ(events[i + 1].event.restarts, backoffs + 1);
    auto waited =
        std::chrono::duration_cast<std::chrono::milliseconds>(events[i + 1].at - events[i].at);
    EXPECT_GE(waited.count(), expected_delays[backoffs] - 5);
    ++backoffs;
  }
  EXPECT_EQ(backoffs, 3) << recorder.states();
}

TEST(Supervisor, BackoffResetsAfterStayingHealthyLongEnough) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 0.3; exit 1");
  spec.settle_ms = 20;
  spec.backoff_initial_ms = 50;
  spec.backoff_max_ms = 200;  // healthy for ~280 ms each time: longer than this
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_for(
      [](const auto& events) {
        int backoffs = 0;
        for (const auto& e : events) backoffs += e.event.state == WorkloadState::kBackoff;
        return backoffs >= 3;
      },
      5s))
      << recorder.states();
  for (const auto& recorded : recorder.events()) {
    if (recorded.event.state != WorkloadState::kBackoff) continue;
    EXPECT_EQ(recorded.event.message, "exited with code 1; restarting in 0.05 s");
  }
}

TEST(Supervisor, OnFailureDoesNotRestartCleanExit) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 0.2; exit 0");
  spec.settle_ms = 50;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kExited)) << recorder.states();
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(recorder.count(WorkloadState::kHealthy), 1);
  EXPECT_EQ(recorder.count(WorkloadState::kBackoff), 0) << recorder.states();
  WorkloadEvent now = supervisor.snapshot();
  EXPECT_EQ(now.state, WorkloadState::kExited);
  EXPECT_EQ(now.exit_code, 0);
  EXPECT_EQ(now.message, "exited with code 0");
  EXPECT_EQ(now.restarts, 0);
  EXPECT_TRUE(now.ever_healthy);
}

TEST(Supervisor, NeverDoesNotRestartFailure) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 0.2; exit 1");
  spec.settle_ms = 50;
  spec.restart = RestartPolicy::kNever;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kExited)) << recorder.states();
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(recorder.count(WorkloadState::kHealthy), 1);
  EXPECT_EQ(recorder.count(WorkloadState::kBackoff), 0) << recorder.states();
  EXPECT_EQ(supervisor.snapshot().exit_code, 1);
  EXPECT_EQ(supervisor.snapshot().restarts, 0);
}

TEST(Supervisor, AlwaysRestartsCleanExit) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 0.15; exit 0");
  spec.settle_ms = 50;
  spec.restart = RestartPolicy::kAlways;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_for(
      [](const auto& events) { return !events.empty() && events.back().event.restarts >= 2; }, 5s))
      << recorder.states();
  EXPECT_EQ(recorder.first(WorkloadState::kBackoff).message,
            "exited with code 0; restarting in 0.05 s");
  EXPECT_EQ(recorder.count(WorkloadState::kExited), 0);
}

TEST(Supervisor, StopSendsSigtermAndTheTrapRuns) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "trap 'echo bye > trapped; exit 0' TERM; sleep 1000 & wait");
  spec.stop_grace_ms = 5'000;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kHealthy)) << recorder.states();

  auto stop_at = SteadyClock::now();
  supervisor.stop();
  EXPECT_LT(elapsed_ms(stop_at), 2'000);
  EXPECT_EQ(read_text(dir.file("trapped")), "bye\n");
  WorkloadEvent now = supervisor.snapshot();
  EXPECT_EQ(now.state, WorkloadState::kStopped);
  EXPECT_EQ(now.exit_code, 0);
  EXPECT_EQ(now.message, "stopped");
  EXPECT_EQ(recorder.count(WorkloadState::kStopped), 1);
  EXPECT_EQ(recorder.events().back().event.state, WorkloadState::kStopped);
}

TEST(Supervisor, StopEscalatesToSigkillAfterGrace) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "trap '' TERM; while :; do sleep 0.05; done");
  spec.stop_grace_ms = 300;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kHealthy)) << recorder.states();
  pid_t pid = supervisor.snapshot().pid;

  auto stop_at = SteadyClock::now();
  supervisor.stop();
  int64_t took = elapsed_ms(stop_at);
  EXPECT_GE(took, 300);
  EXPECT_LT(took, 2'000);
  WorkloadEvent now = supervisor.snapshot();
  EXPECT_EQ(now.state, WorkloadState::kStopped);
  EXPECT_EQ(now.exit_code, 128 + SIGKILL);
  EXPECT_EQ(now.message, "stopped (SIGKILL after 0.3 s grace)");
  EXPECT_FALSE(process_running(pid));
}

TEST(Supervisor, StartFailsWhenTheProgramCannotRun) {
  TempDir dir;
  write_text(dir.file("not-executable"), "#!/bin/sh\n");
  ::chmod(dir.file("not-executable").c_str(), 0644);
  struct Case {
    std::vector<std::string> argv;
    std::string cwd;
    std::string message;
    Errc code;
  };
  const Case cases[] = {
      {{"bin/app"}, dir.path(), "cannot start bin/app: No such file or directory", Errc::kNotFound},
      {{"no-such-program-xyz"},
       dir.path(),
       "cannot start no-such-program-xyz: No such file or directory",
       Errc::kNotFound},
      {{"./not-executable"},
       dir.path(),
       "cannot start ./not-executable: Permission denied",
       Errc::kPermissionDenied},
      {{"/bin/true"},
       dir.file("missing"),
       "cannot start /bin/true: cwd " + dir.file("missing") + ": No such file or directory",
       Errc::kNotFound},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.argv[0]);
    Recorder recorder;
    WorkloadSpec spec = script_spec(dir, "");
    spec.argv = c.argv;
    spec.cwd = c.cwd;
    Supervisor supervisor(spec, recorder.callback());
    Status status = supervisor.start();
    ASSERT_FALSE(status);
    EXPECT_EQ(status.error().message.substr(0, c.message.size()), c.message);
    EXPECT_EQ(status.error().code, c.code);
    EXPECT_TRUE(recorder.events().empty()) << recorder.states();
    EXPECT_EQ(supervisor.snapshot().pid, 0);
    EXPECT_FALSE(supervisor.start());  // only one try
  }
  errno = 0;
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1);  // nothing left to reap
  EXPECT_EQ(errno, ECHILD);
}

TEST(Supervisor, OutputIsMergedAndRotated) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir,
                          "i=0; while [ $i -lt 3000 ]; do "
                          "echo \"line $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; i=$((i+1)); "
                          "done; echo done >&2; exec sleep 1000");
  spec.log_max_bytes = 8'192;
  spec.log_keep = 2;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  const std::string log = dir.file("logs/output.log");
  ASSERT_TRUE(wait_until([&] { return read_text(log).find("done\n") != std::string::npos; }, 5s));

  for (const auto& name : {log, log + ".1", log + ".2"}) {
    SCOPED_TRACE(name);
    EXPECT_LE(file_size(name), 8'192 + 8'192 / 16);
    std::string text = read_text(name);
    ASSERT_FALSE(text.empty());
    EXPECT_EQ(text.back(), '\n');  // split at line ends
  }
  EXPECT_GT(file_size(log + ".1"), 8'000);
  EXPECT_GT(file_size(log + ".2"), 8'000);
  EXPECT_FALSE(exists(log + ".3"));
  std::string last = read_text(log);
  EXPECT_NE(last.find("line 2999 xxxx"), std::string::npos);
  EXPECT_EQ(last.substr(last.size() - 5), "done\n");
  // Rotated files follow each other: .1 ends right where output.log begins.
  std::string previous = read_text(log + ".1");
  std::string previous_last_line = previous.substr(previous.rfind('\n', previous.size() - 2) + 1);
  int previous_number = std::stoi(previous_last_line.substr(5));
  EXPECT_EQ(last.substr(0, last.find(' ', 5)), "line " + std::to_string(previous_number + 1));
}

TEST(Supervisor, EnvAndCwdReachTheProcess) {
  TempDir dir;
  Recorder recorder;
  ::setenv("SUPERVISOR_TEST_AGENT_ONLY", "1", 1);
  auto spec =
      script_spec(dir,
                  "echo \"pwd=$(pwd)\"; echo \"foo=$FOO\"; echo \"home=$HOME\"; "
                  "echo \"lang=$LANG\"; echo \"path=$PATH\"; "
                  "echo \"agent=${SUPERVISOR_TEST_AGENT_ONLY:-unset}\" >&2; exec sleep 1000");
  spec.env = {{"FOO", "bar baz"}};
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  const std::string log = dir.file("logs/output.log");
  ASSERT_TRUE(wait_until([&] { return read_text(log).find("agent=") != std::string::npos; }, 3s));
  const char* agent_path = std::getenv("PATH");
  EXPECT_EQ(read_text(log), "pwd=" + std::filesystem::canonical(dir.path()).string() +
                                "\nfoo=bar baz\nhome=" + dir.path() + "\nlang=C.UTF-8\npath=" +
                                (agent_path ? agent_path : "") + "\nagent=unset\n");
  ::unsetenv("SUPERVISOR_TEST_AGENT_ONLY");
}

TEST(Supervisor, AgentDescriptorsDoNotLeakIntoTheWorkload) {
  TempDir dir;
  Recorder recorder;
  // As if another agent thread had opened a file without O_CLOEXEC.
  int leaky = ::open("/dev/null", O_RDONLY);
  ASSERT_GE(leaky, 0);
  ASSERT_EQ(::dup2(leaky, 57), 57);
  ::close(leaky);
  auto spec = script_spec(dir,
                          "if [ -e /proc/$$/fd/57 ]; then echo leaked; else echo clean; fi; "
                          "exec sleep 1000");
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  const std::string log = dir.file("logs/output.log");
  ASSERT_TRUE(wait_until([&] { return read_text(log).find('\n') != std::string::npos; }, 3s));
  EXPECT_EQ(read_text(log), "clean\n");
  ::close(57);
}

TEST(Supervisor, StopKillsTheWholeProcessGroup) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 1000 & echo $! > child.pid; wait");
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  pid_t child = read_pid(dir.file("child.pid"));
  ASSERT_GT(child, 0);
  ASSERT_TRUE(process_running(child));
  supervisor.stop();
  EXPECT_TRUE(wait_until([&] { return !process_running(child); }, 2s));
}

TEST(Supervisor, LeaderExitKillsWhatIsLeftOfItsGroup) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 1000 & echo $! > child.pid; sleep 0.2; exit 1");
  spec.settle_ms = 50;
  spec.restart = RestartPolicy::kNever;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  pid_t child = read_pid(dir.file("child.pid"));
  ASSERT_GT(child, 0);
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kExited)) << recorder.states();
  EXPECT_TRUE(wait_until([&] { return !process_running(child); }, 2s));
}

TEST(Supervisor, KillLeftoverKillsTheRecordedGroup) {
  TempDir dir;
  TempDir crashed_agent_dir;
  Recorder recorder;
  auto spec = script_spec(dir, "sleep 1000 & echo $! > child.pid; wait");
  spec.restart = RestartPolicy::kNever;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kHealthy)) << recorder.states();
  pid_t leader = supervisor.snapshot().pid;
  pid_t child = read_pid(dir.file("child.pid"));
  ASSERT_GT(child, 0);

  // As if a previous agent had left this workload behind.
  std::filesystem::copy_file(dir.file("logs/pid"), crashed_agent_dir.file("pid"));
  Supervisor::kill_leftover(crashed_agent_dir.path());
  EXPECT_FALSE(process_running(child));
  EXPECT_FALSE(exists(crashed_agent_dir.file("pid")));
  ASSERT_TRUE(recorder.wait_state(WorkloadState::kExited)) << recorder.states();
  EXPECT_EQ(supervisor.snapshot().message, "killed by signal 9 (SIGKILL)");
  EXPECT_EQ(supervisor.snapshot().exit_code, 137);
  EXPECT_FALSE(process_running(leader));
}

TEST(Supervisor, KillLeftoverLeavesUnrelatedProcessesAlone) {
  TempDir dir;
  TempDir other;
  Recorder recorder;
  Supervisor supervisor(script_spec(dir, "exec sleep 1000"), recorder.callback());
  ASSERT_TRUE(supervisor.start());
  pid_t pid = supervisor.snapshot().pid;

  // Same pid, different start time: a reused pid, not ours.
  write_text(other.file("pid"), std::to_string(pid) + " 1\n");
  Supervisor::kill_leftover(other.path());
  EXPECT_FALSE(exists(other.file("pid")));
  // This test process (often a process group leader itself).
  write_text(other.file("pid"), std::to_string(::getpid()) + " 1\n");
  Supervisor::kill_leftover(other.path());
  write_text(other.file("pid"), "garbage\n");
  Supervisor::kill_leftover(other.path());
  Supervisor::kill_leftover(other.file("missing"));

  std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(process_running(pid));
  EXPECT_EQ(supervisor.snapshot().state, WorkloadState::kStarting);
}

TEST(Supervisor, AgentCrashThenKillLeftoverLeavesNothing) {
  TempDir dir;
  auto spec = script_spec(dir,
                          "trap 'echo term > got_term; exit 0' TERM; "
                          "sleep 1000 & echo $! > child.pid; wait");
  // A stand-in agent process that dies by SIGKILL while supervising.
  pid_t agent = ::fork();
  ASSERT_GE(agent, 0);
  if (agent == 0) {
    Supervisor supervisor(spec, nullptr);
    if (!supervisor.start()) ::_exit(2);
    while (true) ::pause();
  }
  pid_t child = read_pid(dir.file("child.pid"));
  ASSERT_GT(child, 0);
  pid_t leader = read_pid(dir.file("logs/pid"));
  ASSERT_GT(leader, 0);
  ::kill(agent, SIGKILL);
  ASSERT_EQ(::waitpid(agent, nullptr, 0), agent);

  // PR_SET_PDEATHSIG: the workload itself is told to stop...
  EXPECT_TRUE(wait_until([&] { return exists(dir.file("got_term")); }, 3s));
  EXPECT_TRUE(wait_until([&] { return !process_running(leader); }, 3s));
  // ...but its children are not; the restarted agent cleans them up.
  EXPECT_TRUE(process_running(child));
  Supervisor::kill_leftover(spec.log_dir);
  EXPECT_FALSE(process_running(child));
  EXPECT_FALSE(exists(dir.file("logs/pid")));
}

TEST(Supervisor, RlimitsApplyWithoutCgroup) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "echo nofile=$(ulimit -n) as=$(ulimit -v); exec sleep 1000");
  spec.limits.open_files = 64;
  spec.limits.memory_bytes = 256 << 20;
  spec.limits.cpus = 0.5;
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  const std::string log = dir.file("logs/output.log");
  ASSERT_TRUE(wait_until([&] { return read_text(log).find('\n') != std::string::npos; }, 3s));
  EXPECT_EQ(read_text(log), "nofile=64 as=262144\n");
  EXPECT_EQ(supervisor.snapshot().limits_note,
            "memory via RLIMIT_AS; cpu limit not enforced (no cgroup v2 delegation); "
            "open files via RLIMIT_NOFILE");
}

TEST(Supervisor, StopDuringBackoffLeavesNothingBehind) {
  int fds_before = open_fd_count();
  {
    TempDir dir;
    Recorder recorder;
    auto spec = script_spec(dir, "sleep 0.15; exit 1");
    spec.settle_ms = 50;
    spec.backoff_initial_ms = 10'000;
    spec.backoff_max_ms = 10'000;
    Supervisor supervisor(spec, recorder.callback());
    ASSERT_TRUE(supervisor.start());
    ASSERT_TRUE(recorder.wait_state(WorkloadState::kBackoff)) << recorder.states();
    EXPECT_EQ(supervisor.snapshot().pid, 0);

    auto stop_at = SteadyClock::now();
    supervisor.stop();
    EXPECT_LT(elapsed_ms(stop_at), 500);
    supervisor.stop();  // idempotent
    EXPECT_EQ(supervisor.snapshot().state, WorkloadState::kStopped);
    EXPECT_EQ(supervisor.snapshot().exit_code, 1);
    EXPECT_EQ(recorder.count(WorkloadState::kStopped), 1);
  }
  EXPECT_EQ(open_fd_count(), fds_before);
  errno = 0;
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

TEST(Supervisor, SlowCheckTimesOutAndStopDoesNotWaitForIt) {
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "exec sleep 1000");
  spec.health = HealthCheck{.exec = {"sleep", "5"}, .period_ms = 100, .timeout_ms = 200};
  Supervisor supervisor(spec, recorder.callback());
  ASSERT_TRUE(supervisor.start());
  ASSERT_TRUE(wait_until(
      [&] { return supervisor.snapshot().message.find("timed out") != std::string::npos; }, 2s));
  EXPECT_EQ(supervisor.snapshot().message, "health check [sleep 5]: timed out after 0.2 s");
  EXPECT_EQ(supervisor.snapshot().state, WorkloadState::kStarting);

  std::this_thread::sleep_for(150ms);  // the next check is under way
  auto stop_at = SteadyClock::now();
  supervisor.stop();
  EXPECT_LT(elapsed_ms(stop_at), 1'000);
  EXPECT_EQ(recorder.count(WorkloadState::kStopped), 1);
  errno = 0;
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

TEST(Supervisor, NeverStartedSupervisorStopsOnce) {
  TempDir dir;
  Recorder recorder;
  {
    Supervisor supervisor(script_spec(dir, "exit 0"), recorder.callback());
    supervisor.stop();
    EXPECT_EQ(supervisor.snapshot().state, WorkloadState::kStopped);
    EXPECT_FALSE(supervisor.start());
  }
  EXPECT_EQ(recorder.count(WorkloadState::kStopped), 1);
}

TEST(Supervisor, InvalidSpecIsRejected) {
  TempDir dir;
  auto spec = script_spec(dir, "exit 0");
  spec.health = HealthCheck{.http_path = "/healthz", .port = 0};
  Supervisor supervisor(spec, nullptr);
  Status status = supervisor.start();
  ASSERT_FALSE(status);
  EXPECT_EQ(status.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(status.error().field, "health.port");
  EXPECT_EQ(status.error().message, "workload test-workload: health.port: 0 is not in 1..65535");
}

// Needs a writable cgroup v2 hierarchy (root, or a delegated subtree); skipped elsewhere.
TEST(Supervisor, CgroupChildIsCreatedJoinedAndRemoved) {
  std::string root =
      exists("/sys/fs/cgroup/cgroup.controllers") ? "/sys/fs/cgroup" : "/sys/fs/cgroup/unified";
  std::string parent = root + "/outpost-supervisor-test-" + std::to_string(::getpid());
  if (::mkdir(parent.c_str(), 0755) != 0) GTEST_SKIP() << "no writable cgroup v2 at " << root;
  // Controllers the test's parent may hand down (best effort; absent ones fall back to rlimits).
  write_text(parent + "/cgroup.subtree_control", "+memory +cpu");
  TempDir dir;
  Recorder recorder;
  auto spec = script_spec(dir, "cat /proc/self/cgroup; exec sleep 1000");
  spec.cgroup_parent = parent;
  spec.limits.memory_bytes = 256 << 20;
  {
    Supervisor supervisor(spec, recorder.callback());
    ASSERT_TRUE(supervisor.start());
    const std::string log = dir.file("logs/output.log");
    ASSERT_TRUE(wait_until([&] { return read_text(log).find("0::") != std::string::npos; }, 3s));
    std::string relative = parent.substr(root.size()) + "/test-workload-";
    EXPECT_NE(read_text(log).find("0::" + relative), std::string::npos) << read_text(log);
    std::string note = supervisor.snapshot().limits_note;
    EXPECT_TRUE(note == "memory via cgroup v2 (memory.max)" ||
                note.starts_with("memory via RLIMIT_AS (memory controller not enabled"))
        << note;
    int children = 0;
    for (const auto& entry : std::filesystem::directory_iterator(parent)) {
      children += entry.is_directory() ? 1 : 0;
    }
    EXPECT_EQ(children, 1);
    supervisor.stop();
  }
  int children = 0;
  for (const auto& entry : std::filesystem::directory_iterator(parent)) {
    children += entry.is_directory() ? 1 : 0;
  }
  EXPECT_EQ(children, 0);
  EXPECT_EQ(::rmdir(parent.c_str()), 0) << std::strerror(errno);
}

}  // namespace
}  // namespace outpost::agent
