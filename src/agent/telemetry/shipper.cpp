#include "agent/telemetry/shipper.h"

#include <algorithm>
#include <chrono>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "agent/device_api.h"
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

Shipper::Outcome Shipper::ship_one(UpstreamClient& client, int64_t& body_bytes) {
  body_bytes = 0;
  auto pending = buffer_.read(options_.max_records, options_.max_batch_json);
  if (!pending) {
    std::lock_guard lock(mu_);
    stats_.last_error = pending.error().message;
    ++stats_.failures;
    return Outcome::kRetry;
  }
  if (pending->empty()) return Outcome::kDone;
  auto body =
      telemetry_body(pending->first_seq(), pending->last_seq(), buffer_.dropped(), pending->texts);
  if (!body) {
    std::lock_guard lock(mu_);
    stats_.last_error = body.error().message;
    ++stats_.failures;
    return Outcome::kRetry;
  }
  body_bytes = static_cast<int64_t>(body->compressed.size());
  const int64_t json_bytes = static_cast<int64_t>(body->json.size());
  auto resp = send(client, telemetry_request(std::move(body->compressed), options_.timeout_ms),
                   &stopping_, /*count_bytes=*/true);
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
  const Delivery delivery = upload_delivery(resp);
  if (delivery == Delivery::kDelivered) {
    auto answered = telemetry_acked(*resp, pending->first_seq(), pending->last_seq());
    if (!answered) {
      std::lock_guard lock(mu_);
      stats_.last_error = answered.error().message;
      ++stats_.failures;
      return Outcome::kRetry;
    }
    const int64_t acked = *answered;
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
    stats_.json_bytes += json_bytes;
    stats_.last_acked_at = unix_ms_now();
    stats_.last_error.clear();
    return Outcome::kSent;
  }
  const Error error = error_from_response(*resp);
  if (delivery == Delivery::kRefused) {
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
  UpstreamClient client(identity_);
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
