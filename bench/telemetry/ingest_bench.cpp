// outpost-telemetry-ingest-bench: store-level telemetry ingest (Google Benchmark), the
// figure DESIGN §8 sets at >= 500k points/s. A fleet of $OUTPOST_BENCH_DEVICES devices (default
// 1000) each sends one batch per simulated minute: 1 health record (10 gauges), 2 inference
// aggregates (primary and fallback, 10-bucket latency and confidence histograms) and, every
// 4th minute, an event: 22-23 points a batch (a point = one stored value of one series at
// one time; see store.h). Each batch is one ingest_telemetry call, one transaction.
// The disk store lives under $OUTPOST_BENCH_DIR (default /tmp): its fsync cost shows.
#include <stdlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "common/telemetry_batch.h"
#include "store/store.h"

namespace outpost::bench {
namespace {

int fleet_size() {
  const char* text = std::getenv("OUTPOST_BENCH_DEVICES");
  const int count = text && *text ? std::atoi(text) : 1000;
  return count > 0 ? count : 1000;
}

void fail(const std::string& what) {
  std::fprintf(stderr, "outpost-telemetry-ingest-bench: %s\n", what.c_str());
  std::abort();
}

telemetry::Histogram histogram(uint64_t count, double first_bound, double scale) {
  telemetry::Histogram h;
  h.count = count;
  double bound = first_bound;
  uint64_t left = count;
  for (int i = 0; i < 10; ++i) {
    const uint64_t n = i == 9 ? left : left / 3;
    h.buckets.emplace_back(bound, n);
    left -= n;
    h.sum += static_cast<double>(n) * bound * 0.7;
    bound *= scale;
  }
  return h;
}

telemetry::InferenceRecord inference(const std::string& role, uint64_t requests) {
  telemetry::InferenceRecord r;
  r.deployment = "defect-detector";
  r.revision = 3;
  r.model = role == "primary" ? "defect-net" : "defect-net-tiny";
  r.version = role == "primary" ? "1.4.0" : "1.0.0";
  r.role = role;
  r.interval_ms = 60'000;
  r.requests = requests;
  r.served = requests;
  r.errors = requests / 100;
  r.fallbacks = role == "fallback" ? requests : 0;
  r.latency = histogram(requests, 0.001, 2.0);
  r.confidence = histogram(requests, 0.1, 1.25);
  return r;
}

// Appends one minute's records (seq minute*4+1 .. minute*4+4) to `batch`.
void add_minute(telemetry::Batch& batch, int64_t minute, int64_t t0) {
  const int64_t time = t0 + minute * 60'000;
  int64_t seq = minute * 4;
  telemetry::HealthRecord h;
  h.cpu_percent = 37.5;
  h.mem_used = 600 << 20;
  h.mem_total = 1024 << 20;
  h.disk_free = 10LL << 30;
  h.disk_total = 32LL << 30;
  h.uptime_s = 86400.0 + static_cast<double>(minute) * 60;
  h.agent_rss = 9 << 20;
  h.buffer_bytes = 4096;
  h.temp_c = 51.0;
  h.sync_lag_s = 1.5;
  batch.records.push_back({++seq, time, h});
  batch.records.push_back({++seq, time, inference("primary", 600)});
  batch.records.push_back({++seq, time, inference("fallback", 20)});
  if (minute % 4 == 0) {
    telemetry::EventRecord e;
    e.deployment = "defect-detector";
    e.revision = 3;
    e.event = "restart";
    e.message = "exit code 137";
    batch.records.push_back({++seq, time, e});
  }
}

// The batch a device sends for `minutes` minutes from `first` (1 when the link is up; more
// after an outage).
telemetry::Batch minute_batch(int64_t first, int64_t minutes, int64_t t0) {
  telemetry::Batch batch;
  batch.first_seq = first * 4 + 1;
  for (int64_t m = first; m < first + minutes; ++m) add_minute(batch, m, t0);
  batch.last_seq = (first + minutes) * 4;
  return batch;
}

// range(0): minutes of records per batch; range(1): batches per ingest call (1 = one
// transaction per batch; more = group commit, as the server does under load).
void ingest(benchmark::State& state, bool on_disk) {
  const int64_t minutes = state.range(0);
  const int64_t group = state.range(1);
  std::string dir;
  Result<std::unique_ptr<store::Store>> opened = store::open_memory_store();
  if (on_disk) {
    const char* parent = std::getenv("OUTPOST_BENCH_DIR");
    std::string templ =
        std::string(parent && *parent ? parent : "/tmp") + "/outpost-telemetry.XXXXXX";
    if (!mkdtemp(templ.data())) fail("cannot create a temp dir under " + templ);
    dir = templ;
    opened = store::open_store("sqlite:" + dir + "/outpost.db");
  }
  if (!opened) fail("opening the store: " + opened.error().describe());
  auto store = std::move(*opened);
  const int devices = fleet_size();
  std::vector<std::string> ids;
  for (int i = 0; i < devices; ++i) ids.push_back("d-" + std::to_string(100000 + i));
  std::vector<std::string> sites;
  for (int i = 0; i < 20; ++i) sites.push_back("plant-" + std::to_string(i));
  const int64_t t0 = 1'700'000'000'000;

  // Batches are built before timing: the figure is the store's.
  constexpr int64_t kMinutesPrepared = 16;
  std::vector<telemetry::Batch> batches;
  for (int64_t m = 0; m < kMinutesPrepared; ++m) {
    batches.push_back(minute_batch(m * minutes, minutes, t0));
  }

  int64_t points = 0;
  int64_t n = 0;
  std::vector<store::TelemetryIngest> pending;
  for (auto _ : state) {
    pending.clear();
    int64_t now = t0;
    for (int64_t g = 0; g < group; ++g, ++n) {
      const int64_t minute = n / devices;
      telemetry::Batch& batch = batches[static_cast<size_t>(minute % kMinutesPrepared)];
      if (minute >= kMinutesPrepared && n % devices == 0) {
        state.PauseTiming();
        batch = minute_batch(minute * minutes, minutes, t0);
        state.ResumeTiming();
      }
      const size_t d = static_cast<size_t>(n % devices);
      pending.push_back({ids[d], sites[d % sites.size()], &batch});
      now = t0 + (minute + 1) * minutes * 60'000;
    }
    auto outcomes = store->ingest_telemetry_batches(pending, now);
    if (!outcomes) fail(outcomes.error().describe());
    for (const auto& outcome : *outcomes) {
      if (!outcome) fail(outcome.error().describe());
      points += outcome->points;
    }
  }
  state.counters["points_per_s"] =
      benchmark::Counter(static_cast<double>(points), benchmark::Counter::kIsRate);
  state.counters["batches_per_s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsRate);
  state.counters["points_per_batch"] =
      static_cast<double>(points) / static_cast<double>(n > 0 ? n : 1);
  store.reset();
  if (!dir.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
}

void BM_IngestMemory(benchmark::State& state) { ingest(state, false); }
void BM_IngestDisk(benchmark::State& state) { ingest(state, true); }

// Arguments: minutes of records per batch (1 = a device on a live link; 60 = back after an
// hour offline), batches per transaction.
BENCHMARK(BM_IngestMemory)
    ->Args({1, 1})
    ->Args({1, 100})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(3.0);
// Rates by the wall clock: a commit's fsync is part of the cost (by CPU time it would not be).
BENCHMARK(BM_IngestDisk)
    ->Args({1, 1})
    ->Args({1, 10})
    ->Args({1, 100})
    ->Args({60, 1})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(3.0)
    ->UseRealTime();

}  // namespace
}  // namespace outpost::bench

BENCHMARK_MAIN();
