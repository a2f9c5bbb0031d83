// Many HTTP requests in flight on one thread (libcurl's multi interface): what a relay needs to
// hold a long-poll upstream for each device below it without a thread per device. Requests
// are submitted from any thread; their callbacks and timers run on the client's own thread,
// which must not block in them for long.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/http_client.h"

namespace outpost {

struct AsyncRequest {
  std::string method = "GET";
  std::string url;  // absolute
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // sent as given
  int64_t timeout_ms = 30'000;
};

class AsyncHttpClient {
 public:
  // The answer (any HTTP status), or kUnavailable / kDeadlineExceeded naming the URL's server;
  // kUnavailable "cancelled" when cancel() or the destructor took it back.
  using Done = std::function<void(Result<HttpResponse>)>;

  // ca_file: PEM bundle to trust for https:// URLs (empty = system CAs). Proxies come from the
  // environment (apply_proxy_from_env).
  explicit AsyncHttpClient(std::string ca_file = {});
  ~AsyncHttpClient();  // cancels what is in flight and joins the thread
  AsyncHttpClient(const AsyncHttpClient&) = delete;
  AsyncHttpClient& operator=(const AsyncHttpClient&) = delete;

  // Thread-safe. Returns an id for cancel(); `done` runs exactly once, on the client's thread.
  uint64_t submit(AsyncRequest request, Done done);
  // Thread-safe; no-op once the request finished.
  void cancel(uint64_t id);
  // Runs `fn` on the client's thread after `delay_ms` (never from inside this call). Thread-safe.
  void after(int64_t delay_ms, std::function<void()> fn);
  // Transfers in flight now.
  size_t in_flight() const;

 private:
  struct Transfer;
  void loop();
  void finish(Transfer& transfer, Result<HttpResponse> result);

  std::string ca_file_;
  void* multi_ = nullptr;
  mutable std::mutex mu_;  // guards the queues below and stopping_
  std::vector<std::pair<uint64_t, std::unique_ptr<Transfer>>> incoming_;
  std::vector<uint64_t> cancels_;
  std::multimap<int64_t, std::function<void()>> timers_;  // steady ms -> fn
  bool stopping_ = false;
  uint64_t next_id_ = 1;
  // Owned by the loop thread.
  std::map<uint64_t, std::unique_ptr<Transfer>> active_;
  size_t active_count_ = 0;  // taken from incoming_, not yet answered; guarded by mu_
  std::thread thread_;
};

}  // namespace outpost
