// The control-plane URLs a device may talk to (`--server URL1,URL2`: replicas of one control
// plane, or relays of one site), and which of them it talks to now. Shared by the agent's
// clients (sync, status, telemetry, fetch, release metadata, relay upstream): when one of them
// cannot reach the current URL, every client moves on to the next one together.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::agent {

class ServerList {
 public:
  // "URL" or "URL1,URL2,...": each http:// or https:// with a host; trailing slashes dropped,
  // duplicates refused. kInvalidArgument naming the bad entry (field "server").
  [[nodiscard]] static Result<std::vector<std::string>> parse(const std::string& text);

  explicit ServerList(std::vector<std::string> urls);

  // The URL to use now.
  std::string current() const;
  // A request to `url` could not reach it (or it said it is stopping): the next URL becomes
  // current, unless another client moved on already (then nothing changes). Returns current().
  std::string failed(const std::string& url, const std::string& why);
  const std::vector<std::string>& urls() const { return urls_; }
  std::string joined() const;  // "URL1,URL2"
  int64_t failovers() const;

 private:
  const std::vector<std::string> urls_;
  mutable std::mutex mu_;
  size_t index_ = 0;
  int64_t failovers_ = 0;
};

// Worth moving to the next server: the transport failed (kUnavailable from HttpClient), or the
// server answered 503 (it is stopping, or overloaded) or 502/504 (a proxy in front of it could
// not reach it).
bool worth_failover(int http_status);

}  // namespace outpost::agent
