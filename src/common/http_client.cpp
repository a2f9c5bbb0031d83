#include "common/http_client.h"

#include <curl/curl.h>

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <mutex>

#include <nlohmann/json.hpp>

namespace outpost {
namespace {

void global_init() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct ProgressContext {
  const std::function<void(uint64_t, uint64_t)>* callback;
  const std::atomic<bool>* cancel;
};

int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t ultotal, curl_off_t ulnow) {
  auto* ctx = static_cast<ProgressContext*>(user);
  if (ctx->cancel && ctx->cancel->load()) return 1;  // aborts the transfer
  if (ctx->callback && *ctx->callback) {
    (*ctx->callback)(static_cast<uint64_t>(ulnow), static_cast<uint64_t>(ultotal));
  }
  return 0;
}

// Counts the bytes libcurl puts on and takes off the connection (headers and bodies; with TLS,
// the encrypted records instead). The exact figure, where CURLINFO_REQUEST_SIZE counts a small
// POST body with the headers and a large one not.
int count_bytes(CURL*, curl_infotype type, char*, size_t size, void* user) {
  auto* response = static_cast<HttpResponse*>(user);
  switch (type) {
    case CURLINFO_HEADER_OUT:
    case CURLINFO_DATA_OUT:
    case CURLINFO_SSL_DATA_OUT:
      response->bytes_sent += size;
      break;
    case CURLINFO_HEADER_IN:
    case CURLINFO_DATA_IN:
    case CURLINFO_SSL_DATA_IN:
      response->bytes_received += size;
      break;
    default:
      break;
  }
  return 0;
}

const char* first_env(std::initializer_list<const char*> names) {
  for (const char* name : names) {
    const char* value = std::getenv(name);
    if (value != nullptr && *value != '\0') return value;
  }
  return nullptr;
}

}  // namespace

namespace curl_io {

size_t write_body(char* data, size_t size, size_t count, void* user) {
  static_cast<std::string*>(user)->append(data, size * count);
  return size * count;
}

}  // namespace curl_io

namespace {
struct BoundedBody {
  std::string* body;
  size_t limit;
  bool overflowed = false;
};
size_t write_bounded_body(char* data, size_t size, size_t count, void* user) {
  auto* b = static_cast<BoundedBody*>(user);
  if (b->body->size() + size * count > b->limit) {
    b->overflowed = true;
    return 0;  // libcurl stops the transfer (CURLE_WRITE_ERROR)
  }
  b->body->append(data, size * count);
  return size * count;
}
}  // namespace

namespace curl_io {
size_t write_header(char* data, size_t size, size_t count, void* user) {
  auto* headers = static_cast<std::map<std::string, std::string>*>(user);
  std::string line(data, size * count);
  auto colon = line.find(':');
  if (colon != std::string::npos) {
    std::string name = line.substr(0, colon);
    for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    std::string value = line.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ')) value.erase(0, 1);
    while (!value.empty() && (value.back() == '\r' || value.back() == '\n')) value.pop_back();
    (*headers)[name] = value;
  } else if (line.rfind("HTTP/", 0) == 0) {
    headers->clear();  // a new response (after 100 Continue or a redirect)
  }
  return size * count;
}

}  // namespace curl_io

void apply_proxy_from_env(void* curl_easy, const std::string& url) {
  CURL* curl = static_cast<CURL*>(curl_easy);
  const bool https = url.rfind("https://", 0) == 0;
  const char* proxy = https ? first_env({"HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"})
                            : first_env({"http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy"});
  if (proxy != nullptr) curl_easy_setopt(curl, CURLOPT_PROXY, proxy);
  if (const char* bypass = first_env({"NO_PROXY", "no_proxy"})) {
    curl_easy_setopt(curl, CURLOPT_NOPROXY, bypass);
  }
}

HttpClient::HttpClient(std::string base_url, std::string bearer_token, std::string ca_file)
    : base_url_(std::move(base_url)),
      token_(std::move(bearer_token)),
      ca_file_(std::move(ca_file)) {
  global_init();
  while (!base_url_.empty() && base_url_.back() == '/') base_url_.pop_back();
  curl_ = curl_easy_init();
}

HttpClient::~HttpClient() { curl_easy_cleanup(static_cast<CURL*>(curl_)); }

Result<HttpResponse> HttpClient::request(const std::string& method, const std::string& path,
                                         const std::string& body, const std::string& content_type,
                                         const HttpRequestOptions& options) {
  CURL* curl = static_cast<CURL*>(curl_);
  curl_easy_reset(curl);
  HttpResponse response;
  const std::string url = base_url_ + path;
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method.c_str());
  BoundedBody bounded{&response.body, options.max_body_bytes};
  if (options.max_body_bytes > 0) {
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, write_bounded_body);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &bounded);
  } else {
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, curl_io::write_body);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &response.body);
  }
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, curl_io::write_header);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &response.headers);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(options.timeout_ms));
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 10'000L);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  apply_proxy_from_env(curl, url);
  if (method == "HEAD") curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  if (options.count_bytes) {
    curl_easy_setopt(curl, CURLOPT_DEBUGFUNCTION, count_bytes);
    curl_easy_setopt(curl, CURLOPT_DEBUGDATA, &response);
    curl_easy_setopt(curl, CURLOPT_VERBOSE, 1L);
  }

  curl_slist* headers = nullptr;
  if (!token_.empty())
    headers = curl_slist_append(headers, ("Authorization: Bearer " + token_).c_str());
  if (!content_type.empty())
    headers = curl_slist_append(headers, ("Content-Type: " + content_type).c_str());
  headers = curl_slist_append(headers, "Expect:");  // no 1 s wait for 100-continue
  for (const auto& [k, v] : options.headers)
    headers = curl_slist_append(headers, (k + ": " + v).c_str());
  if (signer_) {
    auto [name, value] = signer_->header(method, path, body);
    headers = curl_slist_append(headers, (name + ": " + value).c_str());
  }
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  if (options.insecure_skip_verify) {
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  char error_buffer[CURL_ERROR_SIZE] = {};
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error_buffer);

  FILE* upload = nullptr;
  ProgressContext progress{&options.on_progress, options.cancel};
  if (!ca_file_.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, ca_file_.c_str());
  if (options.cancel) {
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &progress);
  }
  if (!options.upload_file.empty()) {
    upload = std::fopen(options.upload_file.c_str(), "rb");
    if (!upload) {
      curl_slist_free_all(headers);
      return make_error(Errc::kNotFound, "cannot open " + options.upload_file);
    }
    std::fseek(upload, 0, SEEK_END);
    long size = std::ftell(upload);
    std::fseek(upload, 0, SEEK_SET);
    curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(curl, CURLOPT_READDATA, upload);
    curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(size));
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method.c_str());
    if (options.on_progress) {
      curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
      curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, on_progress);
      curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &progress);
    }
  } else if (!body.empty() || method == "POST" || method == "PUT") {
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  }

  CURLcode rc = curl_easy_perform(curl);
  curl_slist_free_all(headers);
  if (upload) std::fclose(upload);
  if (rc == CURLE_ABORTED_BY_CALLBACK) {
    return make_error(Errc::kUnavailable, "request to " + base_url_ + " cancelled");
  }
  if (bounded.overflowed) {
    return make_error(Errc::kPayloadTooLarge,
                      "endless data refused: " + base_url_ + path + " sent more than " +
                          std::to_string(options.max_body_bytes) + " bytes; stopped reading");
  }
  if (rc != CURLE_OK) return make_error(transport_error(rc, base_url_, error_buffer));
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
  if (signer_) {
    if (auto date = response.headers.find("date"); date != response.headers.end()) {
      signer_->observe_date(date->second);
    }
  }
  return response;
}

Error transport_error(int curl_code, const std::string& server, const char* detail) {
  const auto rc = static_cast<CURLcode>(curl_code);
  std::string message = "cannot reach the server at " + server + ": " + curl_easy_strerror(rc);
  if (detail != nullptr && *detail != '\0') message += std::string(" (") + detail + ")";
  if (rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CACERT_BADFILE) {
    message +=
        "; the server's certificate is not trusted: give the CA that issued it with --ca-file "
        "(an outpost server's development CA is DATA/tls/ca.pem; agents can use --ca-pin from "
        "`outpost token create` instead)";
  } else if (rc == CURLE_SSL_CONNECT_ERROR && server.rfind("https://", 0) == 0) {
    message += "; is the server speaking plain HTTP? Then use an http:// URL";
  }
  return Error{
      rc == CURLE_OPERATION_TIMEDOUT ? Errc::kDeadlineExceeded : Errc::kUnavailable, message, {}};
}

Error error_from_response(const HttpResponse& response) {
  Error error;
  error.code = response.status == 401   ? Errc::kUnauthenticated
               : response.status == 403 ? Errc::kPermissionDenied
               : response.status == 404 ? Errc::kNotFound
               : response.status == 409 ? Errc::kConflict
               : response.status >= 500 ? Errc::kUnavailable
                                        : Errc::kInvalidArgument;
  error.message = "server answered HTTP " + std::to_string(response.status);
  auto doc = nlohmann::json::parse(response.body, nullptr, false);
  if (!doc.is_discarded() && doc.is_object() && doc.contains("error") && doc["error"].is_object()) {
    const auto& e = doc["error"];
    if (e.contains("code") && e["code"].is_string())
      error.code = errc_from_name(e["code"].get<std::string>());
    if (e.contains("message") && e["message"].is_string())
      error.message = e["message"].get<std::string>();
    if (e.contains("field") && e["field"].is_string()) error.field = e["field"].get<std::string>();
  }
  return error;
}

std::string url_encode(const std::string& text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || c == ':') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

}  // namespace outpost
