// The health collector over a made-up /proc and /sys, and the pipeline's ticks: checkpoints
// within the interval, one inference and one health record when it closes, events appended at
// once, and the stats the local API shows.
#include "agent/telemetry/pipeline.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "test_support.h"

namespace outpost::agent::telemetry {
namespace {

using namespace test_support;  // TempDir, write_text
using json = nlohmann::json;

TEST(TelemetryHealth, ReadsCpuMemoryTemperatureUptimeFromProcAndSys) {
  TempDir dir;
  HealthCollector::Sources sources;
  sources.proc = dir.file("proc");
  sources.sys = dir.file("sys");
  sources.data_dir = dir.path();
  // user nice system idle iowait irq softirq steal
  write_text(sources.proc + "/stat", "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n");
  write_text(sources.proc + "/meminfo",
             "MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     400 kB\n");
  write_text(sources.proc + "/uptime", "12345.67 999.0\n");
  write_text(sources.proc + "/self/statm", "1000 250 10 1 0 100 0\n");
  write_text(sources.sys + "/class/thermal/thermal_zone0/temp", "41500\n");
  write_text(sources.sys + "/class/thermal/thermal_zone1/temp", "55250\n");
  HealthCollector collector(sources);
  // 100 more jiffies, 25 of them busy.
  write_text(sources.proc + "/stat", "cpu  115 0 110 770 105 0 0 0 0 0\n");
  auto h = collector.collect(4096, 2.5);
  EXPECT_DOUBLE_EQ(h.cpu_percent, 25.0);
  EXPECT_EQ(h.mem_total, 1000 * 1024);
  EXPECT_EQ(h.mem_used, 600 * 1024);
  ASSERT_TRUE(h.temp_c.has_value());
  EXPECT_DOUBLE_EQ(*h.temp_c, 55.25);
  EXPECT_DOUBLE_EQ(h.uptime_s, 12345.67);
  EXPECT_EQ(h.agent_rss, 250 * ::sysconf(_SC_PAGESIZE));
  EXPECT_GT(h.disk_total, 0);
  EXPECT_EQ(h.buffer_bytes, 4096);
  EXPECT_EQ(h.sync_lag_s, 2.5);

  // No thermal zones: no temperature, rather than a made-up one.
  sources.sys = dir.file("nothing");
  HealthCollector bare(sources);
  EXPECT_FALSE(bare.collect(0, std::nullopt).temp_c.has_value());
}

TEST(TelemetryPipeline, TicksCheckpointThenCloseTheIntervalWithHealthAndEvents) {
  TempDir dir;
  ManualClock clock;
  auto metrics = std::make_shared<serve::ModelMetrics>("cam", "defect-net", "1.0.0", "primary");
  TelemetryOptions options;
  options.interval_ms = 60'000;
  options.flush_ms = 5'000;
  options.seed = 3;
  Identity identity;
  identity.server = "http://127.0.0.1:1";
  Pipeline pipeline(dir.path(), identity, options, clock,
                    [&] { return std::vector<serve::MetricsSnapshot>{metrics->snapshot()}; });
  ASSERT_TRUE(pipeline.init());
  pipeline.set_policies({{"cam", {1.0, 1.0}}});

  for (int i = 0; i < 3; ++i) {
    metrics->count_request();
    metrics->count_served();
    serve::InferenceOutcome o;
    o.deployment = "cam";
    o.latency_s = 0.01;
    pipeline.sampler().observe(o);
  }
  pipeline.event("cam", 2, "crash", "exited with code 3");
  clock.advance_ms(5'000);
  pipeline.tick();  // samples in, aggregates checkpointed (not records yet)
  auto stats = pipeline.stats_json();
  EXPECT_EQ(stats["buffer"]["by_class"]["sample"], 3);
  EXPECT_EQ(stats["buffer"]["by_class"]["event"], 1);
  EXPECT_EQ(stats["buffer"]["by_class"]["inference"], 0);
  EXPECT_EQ(stats["policies"]["cam"]["sample"], 1.0);

  clock.advance_ms(55'000);
  pipeline.tick();  // the interval closes
  stats = pipeline.stats_json();
  EXPECT_EQ(stats["buffer"]["by_class"]["inference"], 1);
  EXPECT_EQ(stats["buffer"]["by_class"]["health"], 1);
  EXPECT_EQ(stats["buffer"]["records"], 6);
  EXPECT_EQ(stats["buffer"]["last_seq"], 6);
  EXPECT_EQ(stats["dropped"]["samples"], 0);

  // What is in the database, through a second connection.
  Buffer reader(dir.file("telemetry.db"), options.buffer_bytes);
  ASSERT_TRUE(reader.open());
  auto pending = reader.read(100, 1 << 20);
  ASSERT_TRUE(pending);
  std::map<std::string, json> by_kind;
  for (const auto& text : pending->texts) {
    auto doc = json::parse(text);
    by_kind[doc.value("kind", "")] = doc;
  }
  EXPECT_EQ(by_kind["event"].value("event", ""), "crash");
  EXPECT_EQ(by_kind["event"].value("message", ""), "exited with code 3");
  EXPECT_EQ(by_kind["inference"].value("requests", 0), 3);
  EXPECT_EQ(by_kind["inference"].value("interval_ms", 0), 60'000);
  EXPECT_TRUE(by_kind["health"].contains("cpu_percent"));
  EXPECT_EQ(by_kind["sample"].value("outcome", ""), "ok");
}

// Sync lag in health records: 0 while a sync is connected (a parked long-poll is a good link),
// else the time since the control plane last answered.
TEST(TelemetryPipeline, SyncLagIsZeroOnlineAndGrowsFromTheLastAnswerOffline) {
  TempDir dir;
  ManualClock clock;
  TelemetryOptions options;
  options.interval_ms = 60'000;
  options.flush_ms = 60'000;
  Identity identity;
  identity.server = "http://127.0.0.1:1";
  Pipeline pipeline(dir.path(), identity, options, clock,
                    [] { return std::vector<serve::MetricsSnapshot>{}; });
  ASSERT_TRUE(pipeline.init());
  const int64_t answered = clock.now_ms();
  pipeline.set_link(true, answered);
  clock.advance_ms(60'000);  // a minute with a long-poll parked: still a good link
  pipeline.tick();
  pipeline.set_link(false, answered);
  clock.advance_ms(60'000);  // the link went down two minutes after the last answer
  pipeline.tick();

  Buffer reader(dir.file("telemetry.db"), options.buffer_bytes);
  ASSERT_TRUE(reader.open());
  auto pending = reader.read(100, 1 << 20);
  ASSERT_TRUE(pending);
  std::vector<double> lags;
  for (const auto& text : pending->texts) {
    auto doc = json::parse(text);
    if (doc.value("kind", "") == "health") lags.push_back(doc.value("sync_lag_s", -1.0));
  }
  ASSERT_EQ(lags.size(), 2u);
  EXPECT_DOUBLE_EQ(lags[0], 0.0);
  EXPECT_DOUBLE_EQ(lags[1], 120.0);
}

}  // namespace
}  // namespace outpost::agent::telemetry
