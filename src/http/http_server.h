// HTTP/1.1 server (Boost.Beast on a small fixed pool of I/O threads), used by the control plane
// and by the agent's local API. Handlers receive a parsed request and a Responder they may call
// later from any thread, so a held long-poll costs a timer and a socket, never a thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "common/error.h"

namespace outpost::http {

// Fires once when the client hangs up before its response was sent, so a handler that
// parks a request (a long-poll) can let go of it. Thread-safe.
class Hangup {
 public:
  // Runs `action` when the client hangs up (at once if it already has). One action at most.
  void on_hangup(std::function<void()> action);
  void fire();

 private:
  std::mutex mu_;
  bool fired_ = false;
  std::function<void()> action_;
};

struct Request {
  std::string method;                          // "GET", "POST", ...
  std::string target;                          // raw target with query
  std::string path;                            // percent-decoded path without query
  std::map<std::string, std::string> query;    // decoded query parameters
  std::map<std::string, std::string> params;   // route parameters ("{name}" segments)
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;                            // string bodies
  std::string body_file;  // streamed bodies: path of the temp file holding it (handler owns it)
  std::string remote;     // peer address
  std::shared_ptr<Hangup> hangup;  // set for routes with RouteOptions::watch_hangup

  std::string header(const std::string& lower_name) const;
  std::optional<std::string> query_param(const std::string& name) const;
};

// A byte range of a file to send as the body (Range responses, artifact downloads).
struct FileRange {
  std::string path;
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
  std::optional<FileRange> file;  // when set, the body is this file range
  bool head_only = false;         // HEAD: send headers (with Content-Length) and no body

  static Response json(int status, std::string body);
  static Response error(const Error& error);
  static Response text(int status, std::string body, std::string content_type = "text/plain");
};

// Call exactly once, from any thread.
using Responder = std::function<void(Response)>;
using Handler = std::function<void(Request&&, Responder)>;

struct RouteOptions {
  bool stream_body_to_file = false;  // uploads: body written to a temp file, not memory
  uint64_t body_limit = 4 * 1024 * 1024;
  // Long-polls: the request's `hangup` fires when the client goes away while it is parked.
  bool watch_hangup = false;
};

// Routes by method and path pattern; patterns are literal segments and "{param}" segments
// ("/api/v1/devices/{id}"); a final "{param...}" takes the rest of the path.
class Router {
 public:
  void add(std::string method, std::string pattern, Handler handler, RouteOptions options = {});

  struct Match {
    const Handler* handler = nullptr;
    RouteOptions options;
    std::map<std::string, std::string> params;
    bool path_known = false;  // path matched some route, but not this method (405)
  };
  Match match(const std::string& method, const std::string& path) const;

 private:
  struct Route {
    std::string method;
    std::vector<std::string> segments;
    Handler handler;
    RouteOptions options;
  };
  std::vector<Route> routes_;
};

struct ServerOptions {
  std::string listen = "127.0.0.1:7400";  // host:port; port 0 picks a free one
  int io_threads = 2;
  std::string temp_dir;               // for streamed uploads
  int64_t idle_timeout_ms = 120'000;  // a keep-alive connection waiting for its next request
  // Once a request's first byte arrived: its header (and a TLS handshake) within this, its
  // body at min_body_rate bytes/s or better. Slow clients (slowloris) are cut, not waited on.
  int64_t header_timeout_ms = 10'000;
  int64_t min_body_rate = 16 * 1024;
  // Connections beyond this are closed at accept (each costs a descriptor and a little memory).
  int64_t max_connections = 20'000;
  // HTTPS when both are set: PEM certificate chain and private key.
  std::string tls_cert_file;
  std::string tls_key_file;
};

class HttpServer {
 public:
  HttpServer(ServerOptions options, const Router& router);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and starts the I/O threads. kUnavailable when the address cannot be bound.
  [[nodiscard]] Status start();
  // Stops accepting, closes connections, joins the I/O threads. Idempotent.
  void stop();
  uint16_t port() const { return port_; }
  bool tls() const { return !options_.tls_cert_file.empty(); }
  // Connections open now, and those closed at accept because the cap was reached.
  int64_t connections() const;
  int64_t connections_refused() const;
  boost::asio::io_context& io_context() { return io_; }

 private:
  class Listener;
  ServerOptions options_;
  const Router& router_;
  boost::asio::io_context io_;
  std::shared_ptr<Listener> listener_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stopped_{false};
  uint16_t port_ = 0;
};

// Splits "host:port"; kInvalidArgument naming the text when malformed.
[[nodiscard]] Result<std::pair<std::string, uint16_t>> split_host_port(const std::string& text);

// Percent-decoding for paths and query strings ('+' is a space only in queries).
std::string percent_decode(std::string_view text, bool plus_is_space);

}  // namespace outpost::http
