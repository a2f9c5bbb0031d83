// The sampler: rates per deployment policy with a seeded PRNG, the rise to on_anomaly on an
// error burst or a latency/confidence out of band, the return after the hold time (manual
// clock), and the bounded queue counting what it could not keep.
#include "agent/telemetry/sampler.h"

#include <string>

#include <gtest/gtest.h>

namespace outpost::agent::telemetry {
namespace {

serve::InferenceOutcome outcome_of(const std::string& deployment, double latency,
                                   const std::string& how = "ok",
                                   std::optional<double> confidence = std::nullopt) {
  serve::InferenceOutcome o;
  o.deployment = deployment;
  o.revision = 2;
  o.model = "defect-net";
  o.version = "1.0.0";
  o.latency_s = latency;
  o.outcome = how;
  o.confidence = confidence;
  return o;
}

// Latencies around 10 ms with a little jitter, as a steady model has.
double steady_latency(int i) { return 0.010 + 0.0002 * static_cast<double>(i % 5); }

size_t drain_count(Sampler& sampler, int64_t* dropped = nullptr) {
  return sampler.drain(dropped).size();
}

TEST(TelemetrySampler, SamplesAtThePolicyRate) {
  ManualClock clock;
  Sampler sampler(clock, Sampler::Options{30'000, 100'000, 42});
  sampler.set_policies({{"tenth", {0.1, 1.0}}, {"none", {0.0, 0.0}}, {"all", {1.0, 1.0}}});
  for (int i = 0; i < 20'000; ++i) sampler.observe(outcome_of("tenth", steady_latency(i)));
  const size_t tenth = drain_count(sampler);
  EXPECT_GE(tenth, 1'800u);
  EXPECT_LE(tenth, 2'200u);
  for (int i = 0; i < 1'000; ++i) sampler.observe(outcome_of("none", steady_latency(i)));
  EXPECT_EQ(drain_count(sampler), 0u);
  for (int i = 0; i < 1'000; ++i) sampler.observe(outcome_of("all", steady_latency(i)));
  auto all = sampler.drain(nullptr);
  ASSERT_EQ(all.size(), 1'000u);
  const auto& s = std::get<outpost::telemetry::SampleRecord>(all[0].body);
  EXPECT_EQ(s.deployment, "all");
  EXPECT_EQ(s.revision, 2);
  EXPECT_FALSE(s.anomaly);
  // A deployment without a policy gets the manifest's default (0.1).
  for (int i = 0; i < 10'000; ++i) sampler.observe(outcome_of("other", steady_latency(i)));
  const size_t other = drain_count(sampler);
  EXPECT_GE(other, 850u);
  EXPECT_LE(other, 1'150u);
}

TEST(TelemetrySampler, SameSeedSameSamples) {
  ManualClock clock;
  Sampler a(clock, Sampler::Options{30'000, 100'000, 7});
  Sampler b(clock, Sampler::Options{30'000, 100'000, 7});
  for (int i = 0; i < 1'000; ++i) {
    a.observe(outcome_of("x", 0.001 * i));
    b.observe(outcome_of("x", 0.001 * i));
  }
  auto sa = a.drain(nullptr), sb = b.drain(nullptr);
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(std::get<outpost::telemetry::SampleRecord>(sa[i].body).latency_s,
              std::get<outpost::telemetry::SampleRecord>(sb[i].body).latency_s);
  }
}

TEST(TelemetrySampler, ErrorBurstRaisesToOnAnomalyUntilTheHoldTimePasses) {
  ManualClock clock;
  Sampler sampler(clock, Sampler::Options{30'000, 100'000, 1});
  sampler.set_policies({{"cam", {0.0, 1.0}}});
  for (int i = 0; i < 100; ++i) sampler.observe(outcome_of("cam", steady_latency(i)));
  EXPECT_EQ(drain_count(sampler), 0u);
  EXPECT_FALSE(sampler.anomalous("cam"));

  // A few errors among many answers are no burst.
  for (int i = 0; i < 4; ++i) sampler.observe(outcome_of("cam", 0.01, "error"));
  EXPECT_FALSE(sampler.anomalous("cam"));
  EXPECT_EQ(drain_count(sampler), 0u);

  for (int i = 0; i < 6; ++i) sampler.observe(outcome_of("cam", 0.01, "error"));
  EXPECT_TRUE(sampler.anomalous("cam"));
  // While it holds, every inference is kept (on_anomaly 1.0) and marked.
  for (int i = 0; i < 60; ++i) sampler.observe(outcome_of("cam", steady_latency(i)));
  auto kept = sampler.drain(nullptr);
  ASSERT_GE(kept.size(), 60u);
  EXPECT_TRUE(std::get<outpost::telemetry::SampleRecord>(kept.back().body).anomaly);

  clock.advance_ms(29'000);
  EXPECT_TRUE(sampler.anomalous("cam"));
  sampler.observe(outcome_of("cam", 0.01));
  EXPECT_EQ(drain_count(sampler), 1u);
  clock.advance_ms(1'001);  // 30 s after the last anomalous inference
  EXPECT_FALSE(sampler.anomalous("cam"));
  for (int i = 0; i < 100; ++i) sampler.observe(outcome_of("cam", steady_latency(i)));
  EXPECT_EQ(drain_count(sampler), 0u);
}

TEST(TelemetrySampler, ASlowTailIsNormalASustainedSlowdownIsAnAnomaly) {
  ManualClock clock;
  Sampler sampler(clock, Sampler::Options{30'000, 100'000, 1});
  sampler.set_policies({{"cam", {0.0, 1.0}}});
  for (int i = 0; i < 200; ++i) sampler.observe(outcome_of("cam", steady_latency(i)));
  EXPECT_FALSE(sampler.anomalous("cam"));
  EXPECT_EQ(drain_count(sampler), 0u);
  // One slow answer in a while is the tail of any latency distribution.
  for (int round = 0; round < 10; ++round) {
    sampler.observe(outcome_of("cam", 0.100));
    for (int i = 0; i < 60; ++i) sampler.observe(outcome_of("cam", steady_latency(i)));
  }
  EXPECT_FALSE(sampler.anomalous("cam"));
  EXPECT_EQ(drain_count(sampler), 0u);
  // Five in a row out of the band: a slowdown.
  for (int i = 0; i < 4; ++i) sampler.observe(outcome_of("cam", 0.100));
  EXPECT_FALSE(sampler.anomalous("cam"));
  sampler.observe(outcome_of("cam", 0.100));
  EXPECT_TRUE(sampler.anomalous("cam"));
  auto kept = sampler.drain(nullptr);
  ASSERT_EQ(kept.size(), 1u);
  const auto& s = std::get<outpost::telemetry::SampleRecord>(kept[0].body);
  EXPECT_TRUE(s.anomaly);
  EXPECT_DOUBLE_EQ(s.latency_s, 0.100);
  // A slowdown that lasts becomes the new normal: once the band has learnt it again and the
  // hold time has passed, sampling is back to the policy.
  for (int i = 0; i < 100; ++i) sampler.observe(outcome_of("cam", 0.100 + 0.001 * (i % 3)));
  clock.advance_ms(31'000);
  sampler.drain(nullptr);
  for (int i = 0; i < 100; ++i) sampler.observe(outcome_of("cam", 0.100 + 0.001 * (i % 3)));
  EXPECT_FALSE(sampler.anomalous("cam"));
  EXPECT_EQ(drain_count(sampler), 0u);
}

TEST(TelemetrySampler, SubMillisecondJitterOfAFastModelIsNoAnomaly) {
  ManualClock clock;
  Sampler sampler(clock, Sampler::Options{30'000, 100'000, 1});
  sampler.set_policies({{"vad", {0.0, 1.0}}});
  // 50 us answers with one in ten at 0.5 ms (a scheduler hiccup): never an anomaly.
  for (int i = 0; i < 5'000; ++i) {
    sampler.observe(outcome_of("vad", i % 10 == 0 ? 0.0005 : 0.00005 + 0.000002 * (i % 7)));
  }
  EXPECT_FALSE(sampler.anomalous("vad"));
  EXPECT_EQ(drain_count(sampler), 0u);
  // A jump to 5 ms is.
  for (int i = 0; i < 5; ++i) sampler.observe(outcome_of("vad", 0.005));
  EXPECT_TRUE(sampler.anomalous("vad"));
}

TEST(TelemetrySampler, ConfidenceBelowItsBandIsAnAnomalyWhenItRepeats) {
  ManualClock clock;
  Sampler sampler(clock, Sampler::Options{30'000, 100'000, 1});
  sampler.set_policies({{"cam", {0.0, 1.0}}});
  for (int i = 0; i < 200; ++i) {
    sampler.observe(outcome_of("cam", steady_latency(i), "ok", 0.9 + 0.01 * (i % 3)));
  }
  EXPECT_FALSE(sampler.anomalous("cam"));
  sampler.observe(outcome_of("cam", 0.010, "ok", 0.91));
  sampler.observe(outcome_of("cam", 0.010, "ok", 0.4));  // one unsure answer: no anomaly
  EXPECT_FALSE(sampler.anomalous("cam"));
  for (int i = 0; i < 4; ++i) sampler.observe(outcome_of("cam", 0.010, "ok", 0.4));
  EXPECT_TRUE(sampler.anomalous("cam"));
}

TEST(TelemetrySampler, AFullQueueCountsWhatItDrops) {
  ManualClock clock;
  Sampler sampler(clock, Sampler::Options{30'000, 10, 1});
  sampler.set_policies({{"cam", {1.0, 1.0}}});
  for (int i = 0; i < 15; ++i) sampler.observe(outcome_of("cam", 0.01));
  int64_t dropped = 0;
  EXPECT_EQ(drain_count(sampler, &dropped), 10u);
  EXPECT_EQ(dropped, 5);
  EXPECT_EQ(drain_count(sampler, &dropped), 0u);
  EXPECT_EQ(dropped, 0);  // counted once
}

}  // namespace
}  // namespace outpost::agent::telemetry
