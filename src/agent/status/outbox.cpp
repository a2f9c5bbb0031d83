#include "agent/status/outbox.h"

#include <unistd.h>

#include <cstdio>

#include <spdlog/spdlog.h>

#include "agent/device_api.h"
#include "agent/sync/desired_sync.h"
#include "common/durable_file.h"
#include "common/http_client.h"

namespace outpost::agent {

using json = nlohmann::json;

StatusOutbox::StatusOutbox(std::string data_dir, Identity identity, Options options)
    : dir_(std::move(data_dir) + "/outbox"), identity_(std::move(identity)), options_(options) {}

StatusOutbox::~StatusOutbox() { stop(); }

std::string StatusOutbox::file_for(int64_t seq) const {
  char name[32];
  std::snprintf(name, sizeof(name), "/%016lld.json", static_cast<long long>(seq));
  return dir_ + name;
}

Status StatusOutbox::init() {
  OUTPOST_TRY(make_dirs(dir_, 0700));
  int64_t last = 0;
  if (auto text = read_file(dir_ + "/last_seq")) last = std::atoll(text->c_str());
  int64_t lowest = 0;
  for (const auto& name : list_directory(dir_)) {
    if (name.size() != 21 || name.substr(16) != ".json") {
      if (name.find(".tmp") != std::string::npos) ::unlink((dir_ + "/" + name).c_str());
      continue;
    }
    int64_t seq = std::atoll(name.substr(0, 16).c_str());
    last = std::max(last, seq);  // a crash after the report but before last_seq
    if (lowest == 0 || seq < lowest) lowest = seq;
  }
  std::lock_guard lock(mu_);
  last_seq_ = last;
  first_ = lowest == 0 ? last + 1 : lowest;
  return ok();
}

void StatusOutbox::start() {
  thread_ = std::thread([this] { run(); });
}

void StatusOutbox::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int64_t StatusOutbox::pending() const {
  std::lock_guard lock(mu_);
  return last_seq_ + 1 - first_;
}

Result<int64_t> StatusOutbox::enqueue(json report) {
  std::unique_lock lock(mu_);
  const int64_t seq = last_seq_ + 1;
  report["seq"] = seq;
  OUTPOST_TRY(write_file_durably(file_for(seq), report.dump()));
  OUTPOST_TRY(write_file_durably(dir_ + "/last_seq", std::to_string(seq)));
  last_seq_ = seq;
  while (last_seq_ + 1 - first_ > options_.max_queued) {
    // Bounded: the oldest go; the server sees the gap in seq and the count in the next report.
    ::unlink(file_for(first_).c_str());
    ++first_;
    ++dropped_;
  }
  lock.unlock();
  cv_.notify_all();
  return seq;
}

void StatusOutbox::run() {
  UpstreamClient client(identity_);
  Backoff backoff(options_.retry_initial_ms, options_.retry_max_ms);
  while (true) {
    int64_t seq = 0;
    int64_t dropped = 0;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || first_ <= last_seq_; });
      if (stopping_) return;
      seq = first_;
      dropped = dropped_;
    }
    auto text = read_file(file_for(seq));
    if (!text) {
      // Unreadable (disk trouble): skip it rather than block every later report.
      spdlog::error("status outbox: cannot read report {}: {}", seq, text.error().message);
      std::lock_guard lock(mu_);
      if (first_ == seq) ++first_;
      continue;
    }
    std::string body = *text;
    if (dropped > 0) {
      auto doc = json::parse(body, nullptr, false);
      if (doc.is_object()) {
        doc["dropped_before"] = dropped;
        body = doc.dump();
      }
    }
    auto resp = send(client, status_request(std::move(body)), &stopping_);
    if (stopping_) return;
    const Delivery delivery = upload_delivery(resp);
    const bool delivered = delivery == Delivery::kDelivered;
    // A report the server refuses as malformed would block the queue forever: drop it.
    const bool refused = delivery == Delivery::kRefused;
    if (delivered || refused) {
      if (refused) {
        spdlog::error("status report {} refused: {}", seq, error_from_response(*resp).message);
      }
      ::unlink(file_for(seq).c_str());
      sent_ += delivered ? 1 : 0;
      backoff.reset();
      std::lock_guard lock(mu_);
      if (first_ == seq) ++first_;
      dropped_ -= std::min(dropped_, dropped);
      continue;
    }
    int64_t delay = backoff.next_ms();
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(delay), [this] { return stopping_.load(); });
    if (stopping_) return;
  }
}

}  // namespace outpost::agent
