#include "common/async_http.h"

#include <curl/curl.h>

#include <algorithm>
#include <chrono>

namespace outpost {
namespace {

int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string server_of(const std::string& url) {
  auto scheme = url.find("://");
  auto start = scheme == std::string::npos ? 0 : scheme + 3;
  auto end = url.find('/', start);
  return url.substr(0, end);
}

}  // namespace

struct AsyncHttpClient::Transfer {
  AsyncRequest request;
  Done done;
  CURL* easy = nullptr;
  curl_slist* headers = nullptr;
  HttpResponse response;
  ~Transfer() {
    if (headers != nullptr) curl_slist_free_all(headers);
    if (easy != nullptr) curl_easy_cleanup(easy);
  }
};

AsyncHttpClient::AsyncHttpClient(std::string ca_file) : ca_file_(std::move(ca_file)) {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  multi_ = curl_multi_init();
  thread_ = std::thread([this] { loop(); });
}

AsyncHttpClient::~AsyncHttpClient() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  curl_multi_wakeup(static_cast<CURLM*>(multi_));
  thread_.join();
  curl_multi_cleanup(static_cast<CURLM*>(multi_));
}

uint64_t AsyncHttpClient::submit(AsyncRequest request, Done done) {
  auto transfer = std::make_unique<Transfer>();
  transfer->request = std::move(request);
  transfer->done = std::move(done);
  uint64_t id = 0;
  {
    std::lock_guard lock(mu_);
    id = next_id_++;
    incoming_.emplace_back(id, std::move(transfer));
  }
  curl_multi_wakeup(static_cast<CURLM*>(multi_));
  return id;
}

void AsyncHttpClient::cancel(uint64_t id) {
  {
    std::lock_guard lock(mu_);
    cancels_.push_back(id);
  }
  curl_multi_wakeup(static_cast<CURLM*>(multi_));
}

void AsyncHttpClient::after(int64_t delay_ms, std::function<void()> fn) {
  {
    std::lock_guard lock(mu_);
    timers_.emplace(steady_ms() + std::max<int64_t>(0, delay_ms), std::move(fn));
  }
  curl_multi_wakeup(static_cast<CURLM*>(multi_));
}

size_t AsyncHttpClient::in_flight() const {
  std::lock_guard lock(mu_);
  return active_count_ + incoming_.size();
}

void AsyncHttpClient::finish(Transfer& transfer, Result<HttpResponse> result) {
  {
    // Counted down before the answer is handed on, so a caller woken by it never sees its
    // own request still in flight.
    std::lock_guard lock(mu_);
    --active_count_;
  }
  if (transfer.done) {
    Done done = std::move(transfer.done);
    transfer.done = nullptr;
    done(std::move(result));
  }
}

void AsyncHttpClient::loop() {
  CURLM* multi = static_cast<CURLM*>(multi_);
  for (;;) {
    std::vector<std::pair<uint64_t, std::unique_ptr<Transfer>>> incoming;
    std::vector<uint64_t> cancels;
    std::vector<std::function<void()>> due;
    bool stopping = false;
    int64_t next_timer = -1;
    {
      std::lock_guard lock(mu_);
      incoming.swap(incoming_);
      active_count_ += incoming.size();
      cancels.swap(cancels_);
      stopping = stopping_;
      const int64_t now = steady_ms();
      while (!timers_.empty() && timers_.begin()->first <= now) {
        due.push_back(std::move(timers_.begin()->second));
        timers_.erase(timers_.begin());
      }
      if (!timers_.empty()) next_timer = timers_.begin()->first - now;
    }
    if (stopping) {
      for (auto& [id, t] : incoming) finish(*t, make_error(Errc::kUnavailable, "cancelled"));
      for (auto& [id, t] : active_) {
        curl_multi_remove_handle(multi, t->easy);
        finish(*t, make_error(Errc::kUnavailable, "cancelled"));
      }
      active_.clear();
      return;
    }
    for (auto& [id, t] : incoming) {
      t->easy = curl_easy_init();
      if (t->easy == nullptr) {
        finish(*t, make_error(Errc::kInternal, "curl_easy_init failed"));
        continue;
      }
      CURL* easy = t->easy;
      const AsyncRequest& r = t->request;
      curl_easy_setopt(easy, CURLOPT_URL, r.url.c_str());
      curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, r.method.c_str());
      curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
      curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, static_cast<long>(r.timeout_ms));
      curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, 10'000L);
      curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, curl_io::write_body);
      curl_easy_setopt(easy, CURLOPT_WRITEDATA, &t->response.body);
      curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, curl_io::write_header);
      curl_easy_setopt(easy, CURLOPT_HEADERDATA, &t->response.headers);
      curl_easy_setopt(easy, CURLOPT_PRIVATE, reinterpret_cast<void*>(id));
      apply_proxy_from_env(easy, r.url);
      if (!ca_file_.empty()) curl_easy_setopt(easy, CURLOPT_CAINFO, ca_file_.c_str());
      if (r.method == "HEAD") curl_easy_setopt(easy, CURLOPT_NOBODY, 1L);
      t->headers = curl_slist_append(t->headers, "Expect:");
      for (const auto& [k, v] : r.headers) {
        t->headers = curl_slist_append(t->headers, (k + ": " + v).c_str());
      }
      curl_easy_setopt(easy, CURLOPT_HTTPHEADER, t->headers);
      if (!r.body.empty() || r.method == "POST" || r.method == "PUT") {
        curl_easy_setopt(easy, CURLOPT_POSTFIELDS, r.body.data());
        curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(r.body.size()));
      }
      curl_multi_add_handle(multi, easy);
      active_.emplace(id, std::move(t));
    }
    for (uint64_t id : cancels) {
      auto it = active_.find(id);
      if (it == active_.end()) continue;
      curl_multi_remove_handle(multi, it->second->easy);
      auto transfer = std::move(it->second);
      active_.erase(it);
      finish(*transfer, make_error(Errc::kUnavailable, "cancelled"));
    }
    for (auto& fn : due) fn();

    int running = 0;
    curl_multi_perform(multi, &running);
    int queued = 0;
    while (CURLMsg* msg = curl_multi_info_read(multi, &queued)) {
      if (msg->msg != CURLMSG_DONE) continue;
      void* priv = nullptr;
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
      const auto id = reinterpret_cast<uint64_t>(priv);
      const CURLcode rc = msg->data.result;
      curl_multi_remove_handle(multi, msg->easy_handle);
      auto it = active_.find(id);
      if (it == active_.end()) continue;
      auto transfer = std::move(it->second);
      active_.erase(it);
      if (rc != CURLE_OK) {
        finish(*transfer, make_error(transport_error(rc, server_of(transfer->request.url))));
        continue;
      }
      long status = 0;
      curl_easy_getinfo(transfer->easy, CURLINFO_RESPONSE_CODE, &status);
      transfer->response.status = status;
      HttpResponse response = std::move(transfer->response);
      finish(*transfer, std::move(response));
    }
    // Sleep until a socket is ready, a timer is due or another thread wakes us (at most 1 s).
    int wait_ms = 1000;
    if (next_timer >= 0) wait_ms = static_cast<int>(std::min<int64_t>(wait_ms, next_timer));
    long curl_wait = -1;
    curl_multi_timeout(multi, &curl_wait);
    if (curl_wait >= 0) wait_ms = static_cast<int>(std::min<long>(wait_ms, curl_wait));
    curl_multi_poll(multi, nullptr, 0, wait_ms, nullptr);
  }
}

}  // namespace outpost
