// A small blocking HTTP client over libcurl for the CLI and the agent: JSON calls, streamed
// file uploads, and errors that say which server could not be reached and why.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/request_signature.h"

namespace outpost {

struct HttpResponse {
  long status = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
  // With HttpRequestOptions::count_bytes: the bytes of this exchange each way (request line,
  // headers and body; TLS records when over TLS; not TCP/IP headers), for what telemetry
  // costs on the link.
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
};

struct HttpRequestOptions {
  std::vector<std::pair<std::string, std::string>> headers;
  int64_t timeout_ms = 30'000;
  std::string upload_file;  // when set, the body is streamed from this file
  std::function<void(uint64_t sent, uint64_t total)> on_progress;
  // When set and it turns true, the request is abandoned (kUnavailable, "cancelled") within ~1 s:
  // lets a thread parked in a long-poll shut down promptly.
  const std::atomic<bool>* cancel = nullptr;
  bool count_bytes = false;  // fill HttpResponse::bytes_sent/bytes_received
  // Skip the server certificate check: only to fetch a CA that is then checked against a pin.
  bool insecure_skip_verify = false;
  // When > 0, a response body longer than this is not read on: the request fails with
  // kPayloadTooLarge ("endless data": a hostile or broken server cannot fill the memory).
  size_t max_body_bytes = 0;
};

// Not thread-safe: one client per thread (it reuses one connection).
class HttpClient {
 public:
  // base_url like "http://127.0.0.1:7400"; bearer token may be empty. ca_file: a PEM bundle
  // to trust instead of the system's (self-signed control planes); empty = system CAs.
  // Proxies come from the environment as libcurl reads it (HTTPS_PROXY, https_proxy,
  // NO_PROXY...).
  HttpClient(std::string base_url, std::string bearer_token, std::string ca_file = {});
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Transport failures are kUnavailable ("cannot reach the server at URL: ..."); any HTTP
  // status is a successful result (callers map statuses with error_from_response).
  [[nodiscard]] Result<HttpResponse> request(const std::string& method, const std::string& path,
                                             const std::string& body = {},
                                             const std::string& content_type = "application/json",
                                             const HttpRequestOptions& options = {});

  const std::string& base_url() const { return base_url_; }

  // Device clients: every request is signed with the device key (request_signature.h), and
  // the server's Date header keeps the signer's clock offset current.
  void set_signer(std::shared_ptr<reqsig::Signer> signer) { signer_ = std::move(signer); }

 private:
  std::string base_url_;
  std::string token_;
  std::string ca_file_;
  std::shared_ptr<reqsig::Signer> signer_;
  void* curl_ = nullptr;
};

// Points a libcurl easy handle at the proxy the environment names for `url`, as operators set
// it on gateways: https:// URLs take HTTPS_PROXY/https_proxy, http:// URLs http_proxy/HTTP_PROXY
// (libcurl alone ignores the upper-case HTTP_PROXY), then ALL_PROXY/all_proxy; NO_PROXY/no_proxy
// lists the hosts that bypass it. Every client of ours (this one, the fetcher, the relay's
// upstream) calls it, so a gateway behind a proxy needs nothing but its usual environment.
void apply_proxy_from_env(void* curl_easy, const std::string& url);

// libcurl write callbacks of our clients: the body into a std::string, header lines into a
// std::map of lower-case names (cleared at each new status line: 100 Continue, redirects).
namespace curl_io {
size_t write_body(char* data, size_t size, size_t count, void* body_string);
size_t write_header(char* data, size_t size, size_t count, void* header_map);
}  // namespace curl_io

// "cannot reach the server at URL: <curl's reason>", with what to do about TLS failures
// (an untrusted certificate names --ca-file / --ca-pin).
Error transport_error(int curl_code, const std::string& server, const char* detail = nullptr);

// Turns a non-2xx response with a JSON error body into an Error (code, message, field).
Error error_from_response(const HttpResponse& response);

// Percent-encodes a query value or path segment.
std::string url_encode(const std::string& text);

}  // namespace outpost
