#include "harness.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string_view>
#include <thread>

#include <gtest/gtest.h>

#include "common/crypto.h"
#include "pg_cluster.h"

extern char** environ;

namespace outpost::e2e {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

pid_t spawn(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
            const std::string& stdin_path, const std::string& out_path, const std::string& err_path,
            bool append = false) {
  const int out_flags = O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(
      &actions, 0, stdin_path.empty() ? "/dev/null" : stdin_path.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), out_flags, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), out_flags, 0644);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) {
    std::string entry = *e;
    std::string key = entry.substr(0, entry.find('='));
    if (key == "OUTPOST_SERVER" || key == "OUTPOST_TOKEN" || env.count(key)) continue;
    env_strings.push_back(entry);
  }
  for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp, args;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (auto& a : argv_copy) args.push_back(a.data());
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  return pid;
}

}  // namespace

nlohmann::json CommandResult::json() const {
  auto doc = nlohmann::json::parse(out, nullptr, false);
  EXPECT_FALSE(doc.is_discarded()) << "not JSON: " << out << "\nstderr: " << err;
  return doc;
}

std::string bin_dir() {
  const char* dir = std::getenv("OUTPOST_BIN_DIR");
  return dir ? dir : "build/bin";
}

std::string make_temp_dir(const std::string& prefix) {
  std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
  char* made = ::mkdtemp(pattern.data());
  EXPECT_NE(made, nullptr);
  return pattern;
}

CommandResult run_program(const std::vector<std::string>& argv,
                          const std::map<std::string, std::string>& env,
                          const std::string& stdin_text) {
  std::string dir = make_temp_dir("outpost-cmd");
  std::string in_path;
  if (!stdin_text.empty()) {
    in_path = dir + "/stdin";
    std::ofstream(in_path) << stdin_text;
  }
  CommandResult result;
  pid_t pid = spawn(argv, env, in_path, dir + "/out", dir + "/err");
  EXPECT_GT(pid, 0) << "cannot start " << argv[0];
  if (pid > 0) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  result.out = slurp(dir + "/out");
  result.err = slurp(dir + "/err");
  std::filesystem::remove_all(dir);
  return result;
}

ServerProcess::ServerProcess(std::string data_dir)
    : data_dir_(std::move(data_dir)), log_path_(data_dir_ + ".server.log") {}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) stop(true);
}

namespace {

// OUTPOST_TEST_DB=postgres: a fresh database of the test cluster for one server. Exits 77
// (skipped) where there is no PostgreSQL to run on.
std::string postgres_database_for_server() {
  std::string why;
  testing_support::PgCluster* cluster = testing_support::test_cluster(&why);
  if (cluster == nullptr) {
    std::fprintf(stderr, "OUTPOST_TEST_DB=postgres but PostgreSQL is unavailable: %s\n",
                 why.c_str());
    std::fflush(stderr);
    std::_Exit(77);
  }
  auto url = cluster->create_database();
  EXPECT_TRUE(url.has_value()) << (url ? "" : url.error().message);
  return url ? *url : std::string();
}

}  // namespace

void ServerProcess::start(const std::vector<std::string>& extra_args) {
  // A restart takes the same port again: agents keep the URL they enrolled with.
  std::vector<std::string> argv = {bin_dir() + "/outpost",
                                   "server",
                                   "--listen",
                                   "127.0.0.1:" + std::to_string(port_),
                                   "--data",
                                   data_dir_};
  if (!tls_) argv.push_back("--insecure-http");
  const char* db = std::getenv("OUTPOST_TEST_DB");
  if (db_url_.empty() && db != nullptr && std::string_view(db) == "postgres") {
    db_url_ = postgres_database_for_server();
  }
  if (!db_url_.empty()) {
    argv.push_back("--db");
    argv.push_back(db_url_);
  }
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  pid_ = spawn(argv, {}, "", log_path_, log_path_ + ".err");
  ASSERT_GT(pid_, 0) << "cannot start the server";
  const std::regex listening(R"(listening on https?://127\.0\.0\.1:(\d+))");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  const uint16_t previous_port = port_;
  port_ = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    std::smatch m;
    std::string log_text = slurp(log_path_);
    if (std::regex_search(log_text, m, listening)) {
      port_ = static_cast<uint16_t>(std::stoi(m[1]));
      break;
    }
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      FAIL() << "server exited at start:\n" << log();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_NE(port_, 0) << "server did not report its port:\n" << log();
  if (previous_port != 0) {
    ASSERT_EQ(port_, previous_port) << "restarted server moved to another port";
  }
  HttpClient client(url(), "", ca_file());
  while (std::chrono::steady_clock::now() < deadline) {
    auto health = client.request("GET", "/healthz");
    if (health && health->status == 200) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL() << "server never became healthy:\n" << log();
}

void ServerProcess::stop(bool hard) {
  if (pid_ <= 0) return;
  ::kill(pid_, hard ? SIGKILL : SIGTERM);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

std::string ServerProcess::admin_token() const {
  std::string token = slurp(data_dir_ + "/admin.token");
  while (!token.empty() && (token.back() == '\n')) token.pop_back();
  return token;
}

std::string ServerProcess::log() const { return slurp(log_path_) + slurp(log_path_ + ".err"); }

CommandResult ServerProcess::cli(std::vector<std::string> args,
                                 const std::string& stdin_text) const {
  std::vector<std::string> argv = {bin_dir() + "/outpost"};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_program(argv,
                     {{"OUTPOST_SERVER", url()},
                      {"OUTPOST_TOKEN", admin_token()},
                      {"OUTPOST_CA_FILE", ca_file()},
                      {"XDG_CONFIG_HOME", data_dir_ + ".config"}},
                     stdin_text);
}

FakeDevice FakeDevice::enroll(const std::string& server_url, const std::string& token,
                              const nlohmann::json& facts, const nlohmann::json& labels,
                              const std::string& ca_file) {
  auto key = crypto::ed25519_generate();
  nlohmann::json body = {
      {"token", token}, {"public_key", crypto::base64_encode(key.public_key)}, {"facts", facts}};
  if (!labels.is_null()) body["labels"] = labels;
  HttpClient client(server_url, "", ca_file);
  auto response = client.request("POST", "/api/v1/device/enroll", body.dump());
  FakeDevice device;
  device.ca_file = ca_file;
  EXPECT_TRUE(response.has_value());
  if (!response) return device;
  EXPECT_EQ(response->status, 201) << response->body;
  device.enroll_response = nlohmann::json::parse(response->body, nullptr, false);
  if (response->status == 201) {
    device.id = device.enroll_response["device_id"];
    device.credential = device.enroll_response["credential"];
    device.server_public_key = device.enroll_response["server_public_key"];
    device.signer = std::make_shared<reqsig::Signer>(device.id, key.secret_key);
  }
  return device;
}

std::unique_ptr<HttpClient> FakeDevice::client(const std::string& server_url) const {
  auto c = std::make_unique<HttpClient>(server_url, credential, ca_file);
  c->set_signer(signer);
  return c;
}

HttpResponse FakeDevice::desired(const std::string& server_url, int64_t known, int wait_s) const {
  HttpClient client(server_url, credential, ca_file);
  client.set_signer(signer);
  HttpRequestOptions options;
  options.timeout_ms = (wait_s + 10) * 1000LL;
  auto response = client.request("GET",
                                 "/api/v1/device/desired?generation=" + std::to_string(known) +
                                     "&wait=" + std::to_string(wait_s),
                                 {}, "", options);
  EXPECT_TRUE(response.has_value()) << (response ? "" : response.error().message);
  return response ? *response : HttpResponse{};
}

AgentProcess::AgentProcess(std::string data_dir)
    : data_dir_(std::move(data_dir)), log_path_(data_dir_ + ".log") {}

AgentProcess::~AgentProcess() { stop(true); }

void AgentProcess::start(const std::vector<std::string>& args, bool may_exit) {
  ::unlink((data_dir_ + "/agent.addr").c_str());
  std::vector<std::string> argv = {bin_dir() + "/outpost-agent",
                                   "--data",
                                   data_dir_,
                                   "--listen",
                                   "127.0.0.1:0",
                                   "--log-level",
                                   "debug"};
  argv.insert(argv.end(), args.begin(), args.end());
  {
    std::ofstream mark(log_path_, std::ios::app);
    mark << "==== outpost-agent start\n";
  }
  pid_ = spawn(argv, {}, "", log_path_, log_path_, /*append=*/true);
  exit_code_ = -1;
  ASSERT_GT(pid_, 0) << "cannot start the agent";
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    int wstatus = 0;
    if (::waitpid(pid_, &wstatus, WNOHANG) == pid_) {
      pid_ = -1;
      exit_code_ = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
      if (may_exit) return;
      FAIL() << "agent exited at start with " << exit_code_ << ":\n" << log();
    }
    std::string addr = slurp(data_dir_ + "/agent.addr");
    if (!addr.empty()) {
      port_ = static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1)));
      if (!status().is_null()) return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL() << "agent's local API never answered:\n" << log();
}

void AgentProcess::stop(bool hard) {
  if (pid_ <= 0) return;
  ::kill(pid_, hard ? SIGKILL : SIGTERM);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  pid_ = -1;
}

nlohmann::json AgentProcess::status() const {
  if (port_ == 0) return nullptr;
  HttpClient client("http://127.0.0.1:" + std::to_string(port_), "");
  HttpRequestOptions options;
  options.timeout_ms = 3'000;
  auto resp = client.request("GET", "/v1/status", {}, {}, options);
  if (!resp || resp->status != 200) return nullptr;
  auto doc = nlohmann::json::parse(resp->body, nullptr, false);
  return doc.is_discarded() ? nlohmann::json() : doc;
}

nlohmann::json AgentProcess::deployment(const std::string& name) const {
  auto doc = status();
  if (!doc.is_object()) return nullptr;
  for (const auto& d : doc.value("deployments", nlohmann::json::array())) {
    if (d.value("name", "") == name) return d;
  }
  return nullptr;
}

bool AgentProcess::wait_for(const std::function<bool(const nlohmann::json&)>& done, int timeout_s,
                            nlohmann::json* last) const {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  nlohmann::json doc;
  while (std::chrono::steady_clock::now() < deadline) {
    doc = status();
    if (doc.is_object() && done(doc)) {
      if (last) *last = doc;
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (last) *last = doc;
  return false;
}

std::string AgentProcess::log() const { return slurp(log_path_); }

std::string AgentProcess::device_id() const {
  auto doc = nlohmann::json::parse(slurp(data_dir_ + "/identity.json"), nullptr, false);
  return doc.is_object() ? doc.value("device_id", "") : "";
}

}  // namespace outpost::e2e
