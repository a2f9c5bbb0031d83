// End-to-end harness: starts the real `outpost server` on a free loopback port with its own
// data directory, runs the real CLI as a user would, and talks HTTP like a device.
#pragma once

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/http_client.h"

namespace outpost::e2e {

struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
  nlohmann::json json() const;  // parses `out` (fails the test when it is not JSON)
};

// Directory of the built binaries (OUTPOST_BIN_DIR, set by CTest).
std::string bin_dir();
// A fresh temporary directory, removed by the caller when wanted.
std::string make_temp_dir(const std::string& prefix);

// Runs a program to completion, capturing stdout and stderr.
CommandResult run_program(const std::vector<std::string>& argv,
                          const std::map<std::string, std::string>& env = {},
                          const std::string& stdin_text = {});

class ServerProcess {
 public:
  explicit ServerProcess(std::string data_dir);
  ~ServerProcess();

  // Starts `outpost server --listen 127.0.0.1:0 --data DIR` and waits for /healthz (listen
  // port 0 picks a free port; we read the real one from the server's output).
  void start(const std::vector<std::string>& extra_args = {});
  // SIGTERM and wait (graceful), or SIGKILL when hard.
  void stop(bool hard = false);
  bool running() const { return pid_ > 0; }

  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  uint16_t port() const { return port_; }
  const std::string& data_dir() const { return data_dir_; }
  std::string admin_token() const;
  std::string log() const;

  // `outpost <args>` against this server with the admin token.
  CommandResult cli(std::vector<std::string> args, const std::string& stdin_text = {}) const;

 private:
  std::string data_dir_;
  std::string log_path_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
};

// Stands in for a device agent: enrolls with a fresh Ed25519 key and then uses the device API.
struct FakeDevice {
  std::string id;
  std::string credential;
  std::string server_public_key;  // base64
  nlohmann::json enroll_response;

  static FakeDevice enroll(const std::string& server_url, const std::string& token,
                           const nlohmann::json& facts, const nlohmann::json& labels = {});
  // GET desired?generation=known&wait=wait_s; returns the HTTP response.
  HttpResponse desired(const std::string& server_url, int64_t known, int wait_s) const;
};

}  // namespace outpost::e2e
