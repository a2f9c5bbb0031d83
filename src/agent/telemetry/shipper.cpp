#include "agent/telemetry/shipper.h"

#include <algorithm>
#include <chrono>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "agent/sync/desired_sync.h"
#include "common/http_client.h"

namespace outpost::agent::telemetry {
namespace {

using ShipperClock = std::chrono::steady_clock;

int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Shipper::Shipper(Buffer& buffer, Identity identity, Options options)
    : buffer_(buffer), identity_(std::move(identity)), options_(options) {
  options_.max_records =
      std::clamp<size_t>(options_.max_records, 1, outpost::telemetry::kMaxRecordsPerBatch - 1);
  options_.rate_bytes_per_s = std::max<int64_t>(options_.rate_bytes_per_s, 1);
}

Shipper::~Shipper() { stop(); }

void Shipper::start() {
  thread_ = std::thread([this] { run(); });
}

void Shipper::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Shipper::wake() {
  {
    std::lock_guard lock(mu_);
    woken_ = true;
  }
  cv_.notify_all();
}

Shipper::Stats Shipper::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

void Shipper::wait_for(int64_t ms, bool wakeable) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, std::chrono::milliseconds(std::max<int64_t>(ms, 0)),
               [&] { return stopping_.load() || (wakeable && woken_); });
  if (wakeable) woken_ = false;
}

Shipper::Outcome Shipper::ship_one(HttpClient& client, int64_t& body_bytes) {
  body_bytes = 0;
  auto pending = buffer_.read(options_.max_records, options_.max_batch_json);
  if (!pending) {
    std::lock_guard lock(mu_);
    stats_.last_error = pending.error().message;
    ++stats_.failures;
    return Outcome::kRetry;
  }
  if (pending->empty()) return Outcome::kDone;
  const std::string json = outpost::telemetry::batch_json(pending->first_seq(), pending->last_seq(),
                                                          buffer_.dropped(), pending->texts);
  // A minute's batch is small: the strongest level costs a few ms and saves ~8% on the link.
  // A backlog's big batches take a faster one.
  auto body = outpost::telemetry::compress(json, json.size() <= (64 << 10) ? 19 : 9);
  if (!body) {
    std::lock_guard lock(mu_);
    stats_.last_error = body.error().message;
    ++stats_.failures;
    return Outcome::kRetry;
  }
  body_bytes = static_cast<int64_t>(body->size());
  HttpRequestOptions request;
  request.timeout_ms = options_.timeout_ms;
  request.cancel = &stopping_;
  request.headers.emplace_back("Content-Encoding", "zstd");
  request.count_bytes = true;
  auto resp =
      client.request("POST", "/api/v1/device/telemetry", *body, "application/json", request);
  {
    // A try that failed in transport counts its body: what it cost is not known more exactly.
    std::lock_guard lock(mu_);
    stats_.wire_bytes +=
        resp ? static_cast<int64_t>(resp->bytes_sent + resp->bytes_received) : body_bytes;
  }
  if (stopping_) return Outcome::kRetry;
  if (!resp) {
    std::lock_guard lock(mu_);
    stats_.last_error = resp.error().message;
    ++stats_.failures;
    return Outcome::kRetry;
  }
  const long status = resp->status;
  if (status == 200) {
    auto doc = nlohmann::json::parse(resp->body, nullptr, false);
    int64_t acked = -1;
    if (doc.is_object() && doc.contains("acked") && doc["acked"].is_number_integer()) {
      acked = doc["acked"].get<int64_t>();
    }
    // An answer that acknowledges nothing of this batch would have us resend it forever.
    if (acked < pending->first_seq()) {
      std::lock_guard lock(mu_);
      stats_.last_error = "telemetry batch " + std::to_string(pending->first_seq()) + ".." +
                          std::to_string(pending->last_seq()) +
                          ": the server acknowledged only up to " + std::to_string(acked);
      ++stats_.failures;
      return Outcome::kRetry;
    }
    if (auto done = buffer_.ack(acked); !done) {
      std::lock_guard lock(mu_);
      stats_.last_error = done.error().message;
      ++stats_.failures;
      return Outcome::kRetry;
    }
    int64_t records = 0;
    for (int64_t seq : pending->seqs) records += seq <= acked ? 1 : 0;
    std::lock_guard lock(mu_);
    ++stats_.batches_sent;
    stats_.records_sent += records;
    stats_.bytes_sent += body_bytes;
    stats_.json_bytes += static_cast<int64_t>(json.size());
    stats_.last_acked_at = unix_ms_now();
    stats_.last_error.clear();
    return Outcome::kSent;
  }
  const Error error = error_from_response(*resp);
  const bool refused =
      status >= 400 && status < 500 && status != 401 && status != 408 && status != 429;
  if (refused) {
    spdlog::error("telemetry batch {}..{} refused (HTTP {}): {}; its {} record(s) are dropped",
                  pending->first_seq(), pending->last_seq(), status, error.message,
                  pending->seqs.size());
    if (auto done = buffer_.discard_through(pending->last_seq()); !done) {
      std::lock_guard lock(mu_);
      stats_.last_error = done.error().message;
      ++stats_.failures;
      return Outcome::kRetry;
    }
    std::lock_guard lock(mu_);
    ++stats_.batches_refused;
    stats_.records_refused += static_cast<int64_t>(pending->seqs.size());
    stats_.last_error = "HTTP " + std::to_string(status) + ": " + error.message;
    return Outcome::kSent;
  }
  std::lock_guard lock(mu_);
  stats_.last_error = "HTTP " + std::to_string(status) + ": " + error.message;
  ++stats_.failures;
  return Outcome::kRetry;
}

void Shipper::run() {
  HttpClient client(identity_.server, identity_.credential, identity_.ca_file);
  Backoff backoff(options_.retry_initial_ms, options_.retry_max_ms);
  auto next_send = ShipperClock::now();
  while (!stopping_) {
    // Back to back while a backlog remains, each batch paced by its compressed size.
    while (!stopping_) {
      const auto now = ShipperClock::now();
      if (next_send > now) {
        wait_for(std::chrono::duration_cast<std::chrono::milliseconds>(next_send - now).count() + 1,
                 false);
        if (stopping_) return;
      }
      int64_t body_bytes = 0;
      const Outcome outcome = ship_one(client, body_bytes);
      next_send = std::max(next_send, ShipperClock::now()) +
                  std::chrono::milliseconds(body_bytes * 1000 / options_.rate_bytes_per_s);
      if (outcome == Outcome::kDone) {
        backoff.reset();
        break;
      }
      if (outcome == Outcome::kSent) {
        backoff.reset();
        continue;
      }
      wait_for(backoff.next_ms(), false);
    }
    wait_for(options_.interval_ms, true);
  }
}

}  // namespace outpost::agent::telemetry
