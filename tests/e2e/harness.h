// End-to-end harness: starts the real `outpost server` on a free loopback port with its own
// data directory, runs the real CLI as a user would, and talks HTTP like a device.
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/http_client.h"
#include "common/request_signature.h"

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

  // HTTPS with the server's development CA (DATA/tls/ca.pem) instead of --insecure-http; set
  // before start().
  void use_tls(bool tls) { tls_ = tls; }
  bool tls() const { return tls_; }
  // The CA to trust when tls() ("" otherwise).
  std::string ca_file() const { return tls_ ? data_dir_ + "/tls/ca.pem" : std::string(); }

  // Starts `outpost server --listen 127.0.0.1:0 --data DIR` and waits for /healthz (listen
  // port 0 picks a free port; we read the real one from the server's output). A restart
  // listens on the same port again, so agents find it where they left it. With
  // OUTPOST_TEST_DB=postgres the store is a fresh database of the PostgreSQL test cluster
  // (tests/support/pg_cluster.h; --db postgres://...), the same one again on a restart; where
  // PostgreSQL is not installed the test program exits 77 (CTest: skipped).
  void start(const std::vector<std::string>& extra_args = {});
  // SIGTERM and wait (graceful), or SIGKILL when hard.
  void stop(bool hard = false);
  bool running() const { return pid_ > 0; }

  std::string url() const {
    return (tls_ ? "https://127.0.0.1:" : "http://127.0.0.1:") + std::to_string(port_);
  }
  uint16_t port() const { return port_; }
  const std::string& data_dir() const { return data_dir_; }
  // The --db URL the server was given ("" for the default, sqlite:DATA/outpost.db).
  const std::string& db_url() const { return db_url_; }
  std::string admin_token() const;
  std::string log() const;

  // `outpost <args>` against this server with the admin token.
  CommandResult cli(std::vector<std::string> args, const std::string& stdin_text = {}) const;

 private:
  std::string data_dir_;
  std::string log_path_;
  std::string db_url_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
  bool tls_ = false;
};

// A real `outpost-agent` with its own data directory and a free local API port.
class AgentProcess {
 public:
  explicit AgentProcess(std::string data_dir);
  ~AgentProcess();

  // Starts `outpost-agent --data DIR --listen 127.0.0.1:0 --log-level debug <args>` and waits
  // until its local API answers (or the process exits: then the test fails unless
  // `may_exit` is set; see exit_code()).
  void start(const std::vector<std::string>& args = {}, bool may_exit = false);
  void stop(bool hard = false);  // SIGTERM (graceful) or SIGKILL, and reap
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  int exit_code() const { return exit_code_; }

  // GET /v1/status (null when the agent does not answer).
  nlohmann::json status() const;
  // The deployment's entry in status(), or null.
  nlohmann::json deployment(const std::string& name) const;
  // Polls status() until `done` holds; false after timeout_s (the last status is in `last`).
  bool wait_for(const std::function<bool(const nlohmann::json&)>& done, int timeout_s,
                nlohmann::json* last = nullptr) const;
  const std::string& data_dir() const { return data_dir_; }
  std::string log() const;
  std::string device_id() const;  // from identity.json
  // Base URL of its local API (and model server): "http://127.0.0.1:<port>".
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }

 private:
  std::string data_dir_;
  std::string log_path_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
  uint16_t port_ = 0;
};

// Stands in for a device agent: enrolls with a fresh Ed25519 key and then uses the device API.
struct FakeDevice {
  std::string id;
  std::string credential;
  std::string server_public_key;  // base64
  nlohmann::json enroll_response;
  std::string ca_file;  // trusted for an https server
  // Signs every call with the device key, as the agent does (set_signer on a client).
  std::shared_ptr<reqsig::Signer> signer;

  static FakeDevice enroll(const std::string& server_url, const std::string& token,
                           const nlohmann::json& facts, const nlohmann::json& labels = {},
                           const std::string& ca_file = {});
  // A client that calls as this device (credential and signatures).
  std::unique_ptr<HttpClient> client(const std::string& server_url) const;
  // GET desired?generation=known&wait=wait_s; returns the HTTP response.
  HttpResponse desired(const std::string& server_url, int64_t known, int wait_s) const;
};

}  // namespace outpost::e2e
