#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "cli/cli.h"
#include "common/durable_file.h"

namespace outpost::cli {
namespace {

nlohmann::json read_config() {
  auto text = read_file(config_path());
  if (!text) return nlohmann::json::object();
  auto doc = nlohmann::json::parse(*text, nullptr, false);
  return doc.is_object() ? doc : nlohmann::json::object();
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

}  // namespace

std::string config_path() {
  std::string base = env("XDG_CONFIG_HOME");
  if (base.empty()) base = env("HOME") + "/.config";
  return base + "/outpost/config";
}

std::string Session::server() const {
  if (!options_.server.empty()) return options_.server;
  if (auto e = env("OUTPOST_SERVER"); !e.empty()) return e;
  auto config = read_config();
  if (config.contains("server") && config["server"].is_string()) return config["server"];
  return "https://127.0.0.1:7400";
}

std::string Session::token() const {
  if (!options_.token.empty()) return options_.token;
  if (auto e = env("OUTPOST_TOKEN"); !e.empty()) return e;
  auto config = read_config();
  if (config.contains("token") && config["token"].is_string()) return config["token"];
  return "";
}

std::string Session::ca_file() const {
  if (!options_.ca_file.empty()) return options_.ca_file;
  if (auto e = env("OUTPOST_CA_FILE"); !e.empty()) return e;
  auto config = read_config();
  if (config.contains("ca_file") && config["ca_file"].is_string()) return config["ca_file"];
  return "";
}

namespace {
Result<nlohmann::json> decode(const Result<HttpResponse>& response) {
  if (!response) return make_error(response.error());
  if (response->status < 200 || response->status >= 300) {
    return make_error(error_from_response(*response));
  }
  if (response->body.empty()) return nlohmann::json::object();
  auto doc = nlohmann::json::parse(response->body, nullptr, false);
  if (doc.is_discarded()) {
    return make_error(Errc::kInternal, "the server answered with something that is not JSON");
  }
  return doc;
}
}  // namespace

Result<nlohmann::json> Session::call(const std::string& method, const std::string& path,
                                     const std::string& body, const std::string& content_type) {
  HttpClient client(server(), token(), ca_file());
  return decode(client.request(method, path, body, content_type));
}

Result<nlohmann::json> Session::upload(const std::string& path, const std::string& file) {
  HttpClient client(server(), token(), ca_file());
  HttpRequestOptions options;
  options.upload_file = file;
  options.timeout_ms = 24LL * 3600 * 1000;
  const bool show_progress = !json_output() && ::isatty(STDERR_FILENO);
  auto last = std::chrono::steady_clock::now();
  if (show_progress) {
    options.on_progress = [&](uint64_t sent, uint64_t total) {
      auto now = std::chrono::steady_clock::now();
      if (total == 0 || now - last < std::chrono::milliseconds(200)) return;
      last = now;
      std::fprintf(
          stderr, "\r  uploading %s: %3d%%", file.c_str(),
          static_cast<int>(100.0 * static_cast<double>(sent) / static_cast<double>(total)));
    };
  }
  auto response = client.request("POST", path, {}, "application/octet-stream", options);
  if (show_progress) std::fprintf(stderr, "\r\033[K");
  return decode(response);
}

std::optional<nlohmann::json> Session::fetch(const std::string& path, int& exit_code,
                                             const std::string& json_key) {
  return display(call("GET", path), exit_code, json_key);
}

std::optional<nlohmann::json> Session::perform(const std::string& method, const std::string& path,
                                               int& exit_code, const std::string& body) {
  return display(call(method, path, body), exit_code, {});
}

std::optional<nlohmann::json> Session::display(Result<nlohmann::json> result, int& exit_code,
                                               const std::string& json_key) const {
  if (!result) {
    exit_code = fail(result.error());
    return std::nullopt;
  }
  exit_code = kExitOk;
  if (json_output()) {
    print_json(json_key.empty() ? *result : (*result)[json_key]);
    return std::nullopt;
  }
  return std::move(*result);
}

int Session::fail(const Error& error) const {
  if (json_output()) {
    nlohmann::json doc = {
        {"error",
         {{"code", errc_name(error.code)}, {"message", error.describe()}, {"field", error.field}}}};
    std::cerr << doc.dump() << "\n";
  } else {
    std::cerr << "error: " << error.describe() << "\n";
  }
  if (error.code == Errc::kUnavailable || error.code == Errc::kDeadlineExceeded)
    return kExitUnreachable;
  return kExitError;
}

void Session::print_json(const nlohmann::json& doc) const { std::cout << doc.dump(2) << "\n"; }

std::string Table::render() const {
  std::vector<size_t> widths(headers_.size(), 0);
  for (size_t i = 0; i < headers_.size(); ++i) widths[i] = headers_[i].size();
  for (const auto& row : rows_) {
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i)
      widths[i] = std::max(widths[i], row[i].size());
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t i = 0; i < widths.size(); ++i) {
      std::string cell = i < cells.size() ? cells[i] : "";
      out += cell;
      if (i + 1 < widths.size()) out += std::string(widths[i] - cell.size() + 2, ' ');
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out + "\n";
  };
  std::string out = line(headers_);
  for (const auto& row : rows_) out += line(row);
  return out;
}

int64_t now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::string text_of(const nlohmann::json& obj, const char* key) {
  if (!obj.is_object()) return "";
  auto it = obj.find(key);
  if (it == obj.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_number() || it->is_boolean()) return it->dump();
  return "";
}

int64_t int_of(const nlohmann::json& obj, const char* key, int64_t fallback) {
  if (!obj.is_object()) return fallback;
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_number()) return fallback;
  if (it->is_number_integer()) return it->get<int64_t>();
  const double d = it->get<double>();
  // Out of int64's range (or NaN) reads as the fallback, not as undefined behaviour.
  return d > -9.2e18 && d < 9.2e18 ? static_cast<int64_t>(d) : fallback;
}

const nlohmann::json& list_of(const nlohmann::json& obj, const char* key) {
  static const nlohmann::json kEmpty = nlohmann::json::array();
  if (!obj.is_object()) return kEmpty;
  auto it = obj.find(key);
  return it != obj.end() && it->is_array() ? *it : kEmpty;
}

const nlohmann::json& object_of(const nlohmann::json& obj, const char* key) {
  static const nlohmann::json kEmpty = nlohmann::json::object();
  if (!obj.is_object()) return kEmpty;
  auto it = obj.find(key);
  return it != obj.end() && it->is_object() ? *it : kEmpty;
}

int run_cli(CLI::App& app, int argc, char** argv, const GlobalOptions& options,
            const int& exit_code) {
  auto report = [&](const std::string& what) {
    GlobalOptions copy = options;
    Session session(copy);
    session.fail(Error{Errc::kInternal, what, ""});
    return kExitBadAnswer;
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : kExitUsage;
  } catch (const nlohmann::json::exception& e) {
    return report(std::string("the server's answer is not what this CLI expects (") + e.what() +
                  "); is the server the same version as this CLI?");
  } catch (const std::exception& e) {
    return report(std::string("unexpected failure: ") + e.what());
  }
  return exit_code;
}

std::string ago(int64_t then_ms, int64_t now) {
  if (then_ms <= 0) return "never";
  int64_t s = std::max<int64_t>(0, (now - then_ms) / 1000);
  if (s < 60) return std::to_string(s) + "s ago";
  if (s < 3600) return std::to_string(s / 60) + "m ago";
  if (s < 86400) return std::to_string(s / 3600) + "h ago";
  return std::to_string(s / 86400) + "d ago";
}

}  // namespace outpost::cli
