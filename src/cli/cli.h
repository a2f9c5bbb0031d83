// The operator CLI: one file per verb group registers its subcommands on the CLI11 app.
// Every verb prints a readable table by default and JSON with `-o json`.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/http_client.h"

namespace outpost::cli {

struct GlobalOptions {
  std::string server;   // --server, else OUTPOST_SERVER, else config, else https://127.0.0.1:7400
  std::string token;    // --token, else OUTPOST_TOKEN, else config
  std::string ca_file;  // --ca-file, else OUTPOST_CA_FILE, else config (HTTPS servers)
  std::string output = "table";  // table | json
};

// Shared by every verb: resolves the server and token, makes calls, prints results.
class Session {
 public:
  explicit Session(GlobalOptions& options) : options_(options) {}

  bool json_output() const { return options_.output == "json"; }
  // The resolved server URL and token (flags, then environment, then the config file).
  std::string server() const;
  std::string token() const;
  std::string ca_file() const;

  // Calls the API; non-2xx statuses become Errors carrying the server's message and field.
  [[nodiscard]] Result<nlohmann::json> call(const std::string& method, const std::string& path,
                                            const std::string& body = {},
                                            const std::string& content_type = "application/json");
  [[nodiscard]] Result<nlohmann::json> upload(const std::string& path, const std::string& file);

  // GET for the read verbs. On error prints it, sets `exit_code` and returns nullopt. With
  // -o json prints the answer's `json_key` (the whole answer when empty), sets `exit_code`
  // to 0 and returns nullopt. Otherwise sets `exit_code` to 0 and returns the answer for the
  // caller to print as text.
  [[nodiscard]] std::optional<nlohmann::json> fetch(const std::string& path, int& exit_code,
                                                    const std::string& json_key = {});
  // The same for a call that changes something (JSON body); -o json prints the whole answer.
  [[nodiscard]] std::optional<nlohmann::json> perform(const std::string& method,
                                                      const std::string& path, int& exit_code,
                                                      const std::string& body = {});

  // Prints an error to stderr (JSON with -o json) and returns the exit code for it.
  int fail(const Error& error) const;
  // Prints a JSON document (pretty) to stdout.
  void print_json(const nlohmann::json& doc) const;

 private:
  std::optional<nlohmann::json> display(Result<nlohmann::json> result, int& exit_code,
                                        const std::string& json_key) const;

  GlobalOptions& options_;
};

// Path of the CLI config file (~/.config/outpost/config, or $XDG_CONFIG_HOME/outpost/config).
std::string config_path();

// Aligned text tables for humans.
class Table {
 public:
  explicit Table(std::vector<std::string> headers) : headers_(std::move(headers)) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  std::string render() const;
  bool empty() const { return rows_.empty(); }

 private:
  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
};

// Reads of the server's answers for display that never throw, whatever the answer holds: a
// field that is missing or of another type reads as the default ("", 0, an empty array).
std::string text_of(const nlohmann::json& obj, const char* key);  // numbers as digits
int64_t int_of(const nlohmann::json& obj, const char* key, int64_t fallback = 0);
const nlohmann::json& list_of(const nlohmann::json& obj, const char* key);    // array or []
const nlohmann::json& object_of(const nlohmann::json& obj, const char* key);  // object or {}

// `outpost model push`'s text summary of the server's answer to a version push.
std::string describe_pushed_version(const std::string& name, const std::string& version,
                                    const nlohmann::json& answer);

// Runs the parsed command line. Any exception a verb lets escape (an answer it could not
// read, a bug) becomes an error message and exit code kExitBadAnswer, never an abort.
int run_cli(CLI::App& app, int argc, char** argv, const GlobalOptions& options,
            const int& exit_code);

// "12s ago", "3m ago", "never".
std::string ago(int64_t then_ms, int64_t now_ms);
int64_t now_ms();

// Each adds its verbs; the callback stores the verb's exit code in `exit_code`.
void add_login_command(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_token_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_user_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_secret_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_release_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_device_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_artifact_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_model_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_apply_command(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_deployment_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_audit_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_telemetry_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_rollout_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_site_commands(CLI::App& app, GlobalOptions& options, int& exit_code);
void add_sim_command(CLI::App& app, GlobalOptions& options, int& exit_code);

// Exit codes shared by all verbs.
constexpr int kExitOk = 0;
constexpr int kExitError = 1;        // the server refused (bad input, conflict, not found)
constexpr int kExitUsage = 2;        // bad command line
constexpr int kExitUnreachable = 3;  // could not talk to the server
constexpr int kExitBadAnswer = 4;    // the server's answer was not what this CLI understands

}  // namespace outpost::cli
