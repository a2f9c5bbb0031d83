#include "agent/telemetry/pipeline.h"

#include <chrono>

#include <spdlog/spdlog.h>

namespace outpost::agent::telemetry {
namespace {

using json = nlohmann::json;

Shipper::Options shipper_options(const TelemetryOptions& o) {
  Shipper::Options s;
  s.interval_ms = o.interval_ms;
  s.rate_bytes_per_s = o.rate_bytes_per_s;
  s.max_batch_json = o.max_batch_json;
  s.retry_initial_ms = o.retry_initial_ms;
  s.retry_max_ms = o.retry_max_ms;
  return s;
}

HealthCollector::Sources health_sources(HealthCollector::Sources s, const std::string& data_dir) {
  s.data_dir = data_dir;
  return s;
}

json drops_json(const DropCounts& d) {
  return {{"samples", d.samples},
          {"health", d.health},
          {"aggregates", d.aggregates},
          {"events", d.events}};
}

}  // namespace

Pipeline::Pipeline(std::string data_dir, Identity identity, TelemetryOptions options,
                   const Clock& clock, Aggregator::Source metrics)
    : data_dir_(std::move(data_dir)),
      options_(options),
      clock_(clock),
      buffer_(data_dir_ + "/telemetry.db", options.buffer_bytes),
      sampler_(clock, Sampler::Options{options.anomaly_hold_ms, 10'000, options.seed}),
      aggregator_(buffer_, clock, std::move(metrics)),
      health_(health_sources(options.health, data_dir_)),
      shipper_(buffer_, std::move(identity), shipper_options(options)) {}

Pipeline::~Pipeline() { stop(); }

Status Pipeline::init() {
  OUTPOST_TRY(buffer_.open());
  auto recovered = aggregator_.start();
  if (!recovered) return make_error(recovered.error());
  if (*recovered > 0) {
    spdlog::info("telemetry: {} aggregate(s) of an interval cut short by a crash recovered",
                 *recovered);
  }
  return ok();
}

void Pipeline::start() {
  started_ = true;
  worker_ = std::thread([this] { run(); });
  shipper_.start();
}

void Pipeline::stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  if (started_) {
    // What was counted so far is kept: the interval ends now rather than lost at the next start.
    std::lock_guard lock(tick_mu_);
    drain_samples();
    close_interval();
  }
  shipper_.stop();
}

void Pipeline::event(const std::string& deployment, int64_t revision, const std::string& event,
                     const std::string& message) {
  outpost::telemetry::EventRecord e;
  e.deployment = deployment;
  e.revision = revision;
  e.event = event;
  e.message = message.substr(0, outpost::telemetry::kMaxMessageLength);
  std::vector<Record> records;
  records.push_back(Record{0, clock_.now_ms(), std::move(e)});
  if (auto appended = buffer_.append(std::move(records)); !appended) {
    spdlog::error("telemetry: cannot record event {} of {}: {}", event, deployment,
                  appended.error().message);
  }
}

void Pipeline::drain_samples() {
  int64_t dropped = 0;
  auto samples = sampler_.drain(&dropped);
  if (dropped > 0) {
    DropCounts d;
    d.samples = dropped;
    (void)buffer_.count_dropped(d);
  }
  if (samples.empty()) return;
  if (auto appended = buffer_.append(std::move(samples)); !appended) {
    std::lock_guard lock(error_mu_);
    last_error_ = appended.error().message;
    ++errors_;
  }
}

void Pipeline::close_interval() {
  auto closed = aggregator_.close();
  if (!closed) {
    std::lock_guard lock(error_mu_);
    last_error_ = closed.error().message;
    ++errors_;
  }
  std::optional<double> lag;
  if (online_) {
    lag = 0.0;
  } else if (const int64_t last = last_sync_ms_.load(); last > 0) {
    lag = static_cast<double>(std::max<int64_t>(0, clock_.now_ms() - last)) / 1000.0;
  }
  auto h = health_.collect(buffer_.stats().used_bytes, lag);
  std::vector<Record> records;
  records.push_back(Record{0, clock_.now_ms(), h});
  if (auto appended = buffer_.append(std::move(records)); !appended) {
    std::lock_guard lock(error_mu_);
    last_error_ = appended.error().message;
    ++errors_;
  }
}

void Pipeline::tick() {
  std::lock_guard lock(tick_mu_);
  drain_samples();
  if (clock_.now_ms() - aggregator_.interval_start() >= options_.interval_ms) {
    close_interval();
    shipper_.wake();
  } else if (auto saved = aggregator_.checkpoint(); !saved) {
    std::lock_guard elock(error_mu_);
    last_error_ = saved.error().message;
    ++errors_;
  }
}

void Pipeline::run() {
  while (true) {
    {
      std::unique_lock lock(mu_);
      const int64_t to_close =
          aggregator_.interval_start() + options_.interval_ms - clock_.now_ms();
      const int64_t wait =
          std::clamp<int64_t>(std::min(options_.flush_ms, to_close), 1, options_.flush_ms);
      cv_.wait_for(lock, std::chrono::milliseconds(wait), [this] { return stopping_; });
      if (stopping_) return;
    }
    tick();
  }
}

json Pipeline::stats_json() const {
  const BufferStats b = buffer_.stats();
  const Shipper::Stats s = shipper_.stats();
  json by_class = json::object();
  for (int c = 0; c < kRecordClasses; ++c) {
    by_class[record_class_name(static_cast<RecordClass>(c))] = b.records[c];
  }
  json policies = json::object();
  for (const auto& [name, p] : sampler_.policies()) {
    policies[name] = {
        {"sample", p.sample}, {"on_anomaly", p.on_anomaly}, {"anomaly", sampler_.anomalous(name)}};
  }
  std::string last_error;
  {
    std::lock_guard lock(error_mu_);
    last_error = last_error_;
  }
  if (!s.last_error.empty()) last_error = s.last_error;
  return {{"buffer",
           {{"records", b.total_records()},
            {"by_class", std::move(by_class)},
            {"record_bytes", b.record_bytes},
            {"used_bytes", b.used_bytes},
            {"file_bytes", b.file_bytes},
            {"bound_bytes", b.bound_bytes},
            {"last_seq", b.last_seq},
            {"acked_seq", b.acked},
            {"samples_queued", sampler_.queued()}}},
          {"dropped", drops_json(b.dropped)},
          {"shipper",
           {{"batches_sent", s.batches_sent},
            {"records_sent", s.records_sent},
            {"bytes_sent", s.bytes_sent},
            {"wire_bytes", s.wire_bytes},
            {"json_bytes", s.json_bytes},
            {"batches_refused", s.batches_refused},
            {"records_refused", s.records_refused},
            {"failures", s.failures},
            {"last_acked_at", s.last_acked_at}}},
          {"last_error", last_error},
          {"interval_ms", options_.interval_ms},
          {"flush_ms", options_.flush_ms},
          {"rate_bytes_per_s", options_.rate_bytes_per_s},
          {"policies", std::move(policies)}};
}

}  // namespace outpost::agent::telemetry
