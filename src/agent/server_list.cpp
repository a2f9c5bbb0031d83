#include "agent/server_list.h"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace outpost::agent {

Result<std::vector<std::string>> ServerList::parse(const std::string& text) {
  std::vector<std::string> urls;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string url = text.substr(start, end - start);
    url.erase(0, url.find_first_not_of(" \t"));
    url.erase(url.find_last_not_of(" \t") + 1);
    while (!url.empty() && url.back() == '/') url.pop_back();
    const size_t scheme = url.find("://");
    const std::string proto = scheme == std::string::npos ? "" : url.substr(0, scheme);
    if (url.empty()) {
      return make_error(Errc::kInvalidArgument,
                        "server: an empty entry in \"" + text + "\" (expected URL or URL1,URL2)",
                        "server");
    }
    if ((proto != "http" && proto != "https") || url.size() == scheme + 3) {
      return make_error(Errc::kInvalidArgument,
                        "server: \"" + url +
                            "\" is not an http:// or https:// URL with a host, e.g. "
                            "https://10.0.0.5:7400",
                        "server");
    }
    if (std::find(urls.begin(), urls.end(), url) != urls.end()) {
      return make_error(Errc::kInvalidArgument, "server: \"" + url + "\" is given twice", "server");
    }
    urls.push_back(std::move(url));
    start = end + 1;
  }
  return urls;
}

ServerList::ServerList(std::vector<std::string> urls) : urls_(std::move(urls)) {}

std::string ServerList::current() const {
  std::lock_guard lock(mu_);
  return urls_.empty() ? std::string() : urls_[index_];
}

std::string ServerList::failed(const std::string& url, const std::string& why) {
  std::lock_guard lock(mu_);
  if (urls_.size() < 2 || urls_[index_] != url) return urls_.empty() ? "" : urls_[index_];
  index_ = (index_ + 1) % urls_.size();
  ++failovers_;
  spdlog::warn("server {} failed ({}); moving to {}", url, why, urls_[index_]);
  return urls_[index_];
}

std::string ServerList::joined() const {
  std::string out;
  for (const auto& u : urls_) out += (out.empty() ? "" : ",") + u;
  return out;
}

int64_t ServerList::failovers() const {
  std::lock_guard lock(mu_);
  return failovers_;
}

bool worth_failover(int http_status) {
  return http_status == 502 || http_status == 503 || http_status == 504;
}

}  // namespace outpost::agent
