// The simulator's network: profiles are reproducible from the seed and do what they say.
#include "sim/link.h"

#include <gtest/gtest.h>

namespace outpost::sim {
namespace {

TEST(LinkModel, ProfilesParseAndNameEachOther) {
  for (const char* name : {"steady", "flaky", "offline-daily", "partition"}) {
    auto p = parse_profile(name);
    ASSERT_TRUE(p.has_value()) << name;
    EXPECT_EQ(profile_name(*p), name);
  }
  auto bad = parse_profile("lossy");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("steady, flaky, offline-daily or partition"),
            std::string::npos);
}

TEST(LinkModel, SteadyIsAlwaysUpWithoutFaults) {
  LinkModel link({}, 3);
  std::mt19937_64 rng(1);
  for (int64_t t = 0; t < 100'000; t += 997) EXPECT_TRUE(link.up(t % 50, t % 3, t));
  Faults f = link.draw(rng);
  EXPECT_EQ(f.delay_ms, 0);
  EXPECT_FALSE(f.lost_before || f.lost_after);
  EXPECT_EQ(link.transfer_ms(1'000'000), 0);
}

TEST(LinkModel, FlakyDropsAboutTheRateHalfBeforeHalfAfterAndDelaysWithinRange) {
  LinkOptions o;
  o.profile = Profile::kFlaky;
  o.drop_rate = 0.2;
  o.latency_min_ms = 10;
  o.latency_max_ms = 30;
  LinkModel link(o, 1);
  std::mt19937_64 rng(7);
  int before = 0, after = 0;
  const int n = 20'000;
  for (int i = 0; i < n; ++i) {
    Faults f = link.draw(rng);
    before += f.lost_before;
    after += f.lost_after;
    EXPECT_GE(f.delay_ms, 10);
    EXPECT_LE(f.delay_ms, 30);
  }
  EXPECT_NEAR(static_cast<double>(before) / n, 0.1, 0.01);
  EXPECT_NEAR(static_cast<double>(after) / n, 0.1, 0.01);
  // The same seed draws the same faults.
  std::mt19937_64 a(99), b(99);
  for (int i = 0; i < 100; ++i) {
    Faults fa = link.draw(a), fb = link.draw(b);
    EXPECT_EQ(fa.delay_ms, fb.delay_ms);
    EXPECT_EQ(fa.lost_before, fb.lost_before);
    EXPECT_EQ(fa.lost_after, fb.lost_after);
  }
}

TEST(LinkModel, OfflineDailyIsUpForItsWindowsOnly) {
  LinkOptions o;
  o.profile = Profile::kOfflineDaily;
  o.day_ms = 24 * 60'000;  // a day of 24 minutes
  o.windows_per_day = 3;
  o.window_ms = 60'000;  // 1 minute of every 8
  LinkModel link(o, 1);
  for (int64_t device = 0; device < 20; ++device) {
    int64_t up = 0;
    for (int64_t t = 0; t < o.day_ms; t += 1'000) up += link.up(device, 0, t) ? 1 : 0;
    EXPECT_EQ(up, 3 * 60) << "device " << device;  // three windows of 60 s
  }
  // Devices are not all in step: their phases differ.
  EXPECT_NE(link.phase_ms(0), link.phase_ms(1));
  // Reproducible: another model with the same seed agrees.
  LinkModel again(o, 1);
  for (int64_t t = 0; t < o.day_ms; t += 7'000) EXPECT_EQ(link.up(5, 0, t), again.up(5, 0, t));
}

TEST(LinkModel, PartitionCutsTheChosenSitesForItsSpanThenTheyReturn) {
  LinkOptions o;
  o.profile = Profile::kPartition;
  o.partition_start_ms = 10'000;
  o.partition_length_ms = 5'000;
  o.partition_sites = 0.25;
  LinkModel link(o, 8);
  int cut = 0;
  for (int64_t s = 0; s < 8; ++s) {
    cut += link.site_partitioned(s) ? 1 : 0;
    const bool partitioned = link.site_partitioned(s);
    EXPECT_TRUE(link.up(0, s, 9'999));
    EXPECT_EQ(link.up(0, s, 10'000), !partitioned);
    EXPECT_EQ(link.up(0, s, 14'999), !partitioned);
    EXPECT_TRUE(link.up(0, s, 15'000));
  }
  EXPECT_EQ(cut, 2);  // a quarter of 8
  o.partition_sites = 0.01;
  EXPECT_EQ(LinkModel(o, 8).site_partitioned(0) + LinkModel(o, 8).site_partitioned(1) +
                LinkModel(o, 8).site_partitioned(2) + LinkModel(o, 8).site_partitioned(3) +
                LinkModel(o, 8).site_partitioned(4) + LinkModel(o, 8).site_partitioned(5) +
                LinkModel(o, 8).site_partitioned(6) + LinkModel(o, 8).site_partitioned(7),
            1);  // at least one site
  o.partition_sites = 1.0;
  LinkModel all(o, 8);
  for (int64_t s = 0; s < 8; ++s) EXPECT_FALSE(all.up(3, s, 12'000));
}

TEST(LinkModel, BandwidthCapTurnsBytesIntoTime) {
  LinkOptions o;
  o.bandwidth_bytes_per_s = 64 * 1024;
  LinkModel link(o, 1);
  EXPECT_EQ(link.transfer_ms(64 * 1024), 1'000);
  EXPECT_EQ(link.transfer_ms(6'553), 99);
  EXPECT_EQ(link.transfer_ms(0), 0);
}

}  // namespace
}  // namespace outpost::sim
