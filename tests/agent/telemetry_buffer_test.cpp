// The telemetry buffer: numbering that never repeats (after acks, drops and restarts), records
// that survive a process dying without closing, the byte bound under a flood (files stay
// within bound + slack) and the drop order: samples, then health, then aggregates and events.
#include "agent/telemetry/buffer.h"

#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "test_support.h"

namespace outpost::agent::telemetry {
namespace {

using namespace test_support;  // TempDir
using json = nlohmann::json;
namespace wire = outpost::telemetry;

Record event_record(const std::string& message, int64_t t = 1'700'000'000'000) {
  wire::EventRecord e;
  e.deployment = "cam";
  e.revision = 3;
  e.event = "start";
  e.message = message;
  return Record{0, t, e};
}

Record sample_record(double latency) {
  wire::SampleRecord s;
  s.deployment = "cam";
  s.revision = 3;
  s.model = "defect-net";
  s.version = "1.0.0";
  s.latency_s = latency;
  s.confidence = 0.9;
  return Record{0, 1'700'000'000'000, s};
}

Record health_record() {
  wire::HealthRecord h;
  h.cpu_percent = 12.5;
  h.mem_total = 1 << 30;
  h.mem_used = 1 << 29;
  return Record{0, 1'700'000'000'000, h};
}

Record inference_record(uint64_t requests) {
  wire::InferenceRecord r;
  r.deployment = "cam";
  r.revision = 3;
  r.model = "defect-net";
  r.version = "1.0.0";
  r.interval_ms = 60'000;
  r.requests = requests;
  r.served = requests;
  r.latency.count = requests;
  r.latency.sum = 0.01 * static_cast<double>(requests);
  r.latency.buckets = {{0.01, requests}};
  return Record{0, 1'700'000'000'000, r};
}

std::vector<int64_t> seqs_in(const PendingRecords& p) {
  std::vector<int64_t> out;
  for (const auto& text : p.texts) out.push_back(json::parse(text).value("seq", int64_t{-1}));
  return out;
}

TEST(TelemetryBuffer, AppendReadAckInOrder) {
  TempDir dir;
  Buffer buffer(dir.file("telemetry.db"), 1 << 20);
  ASSERT_TRUE(buffer.open());
  std::vector<Record> records = {event_record("a"), sample_record(0.01), health_record()};
  auto last = buffer.append(records);
  ASSERT_TRUE(last) << last.error().message;
  EXPECT_EQ(*last, 3);
  auto pending = buffer.read(100, 1 << 20);
  ASSERT_TRUE(pending);
  EXPECT_EQ(pending->seqs, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(seqs_in(*pending), (std::vector<int64_t>{1, 2, 3}));  // the text carries its seq
  EXPECT_EQ(json::parse(pending->texts[0]).value("kind", ""), "event");
  EXPECT_EQ(pending->classes[1], RecordClass::kSample);

  // Limits: record count, and bytes (but always at least one record).
  EXPECT_EQ(buffer.read(2, 1 << 20)->seqs, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(buffer.read(100, 1)->seqs, (std::vector<int64_t>{1}));

  ASSERT_TRUE(buffer.ack(2));
  EXPECT_EQ(buffer.read(100, 1 << 20)->seqs, (std::vector<int64_t>{3}));
  auto stats = buffer.stats();
  EXPECT_EQ(stats.total_records(), 1);
  EXPECT_EQ(stats.records[static_cast<int>(RecordClass::kHealth)], 1);
  EXPECT_EQ(stats.acked, 2);
  EXPECT_EQ(stats.last_seq, 3);
}

TEST(TelemetryBuffer, SeqIsNeverReusedAfterAckOfEverythingAndReopen) {
  TempDir dir;
  {
    Buffer buffer(dir.file("telemetry.db"), 1 << 20);
    ASSERT_TRUE(buffer.open());
    ASSERT_EQ(*buffer.append({event_record("a"), event_record("b")}), 2);
    ASSERT_TRUE(buffer.ack(2));  // the table is empty now
    EXPECT_EQ(*buffer.append({event_record("c")}), 3);
    ASSERT_TRUE(buffer.ack(3));
  }
  {
    Buffer buffer(dir.file("telemetry.db"), 1 << 20);
    ASSERT_TRUE(buffer.open());
    EXPECT_EQ(buffer.stats().acked, 3);
    EXPECT_EQ(*buffer.append({event_record("d")}), 4);
    // The server knows more than we do (a restored disk): numbering continues above it.
    ASSERT_TRUE(buffer.ack(10));
    EXPECT_EQ(*buffer.append({event_record("e")}), 11);
  }
  Buffer buffer(dir.file("telemetry.db"), 1 << 20);
  ASSERT_TRUE(buffer.open());
  EXPECT_EQ(*buffer.append({event_record("f")}), 12);
}

TEST(TelemetryBuffer, CommittedRecordsSurviveAProcessDyingWithoutClosing) {
  TempDir dir;
  const std::string path = dir.file("telemetry.db");
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // No destructors, no sqlite3_close: as after kill -9.
    Buffer buffer(path, 1 << 20);
    if (!buffer.open()) ::_exit(2);
    if (!buffer.append({event_record("before the crash"), sample_record(0.5)})) ::_exit(3);
    if (!buffer.ack(1)) ::_exit(4);
    if (!buffer.replace_open({inference_record(7)})) ::_exit(5);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);

  Buffer buffer(path, 1 << 20);
  ASSERT_TRUE(buffer.open());
  auto pending = buffer.read(100, 1 << 20);
  ASSERT_TRUE(pending);
  EXPECT_EQ(pending->seqs, (std::vector<int64_t>{2}));
  EXPECT_EQ(buffer.stats().acked, 1);
  // The open aggregate of the dead process becomes a record with the next seq, once.
  EXPECT_EQ(*buffer.recover_open(), 1u);
  EXPECT_EQ(*buffer.recover_open(), 0u);
  pending = buffer.read(100, 1 << 20);
  ASSERT_EQ(pending->seqs, (std::vector<int64_t>{2, 3}));
  auto aggregate = json::parse(pending->texts[1]);
  EXPECT_EQ(aggregate.value("kind", ""), "inference");
  EXPECT_EQ(aggregate.value("requests", 0), 7);
  EXPECT_EQ(aggregate.value("seq", 0), 3);
}

TEST(TelemetryBuffer, CloseOpenAppendsAndClearsTheCheckpointTogether) {
  TempDir dir;
  Buffer buffer(dir.file("telemetry.db"), 1 << 20);
  ASSERT_TRUE(buffer.open());
  ASSERT_TRUE(buffer.replace_open({inference_record(5)}));
  ASSERT_TRUE(buffer.replace_open({inference_record(6)}));  // replaces, not adds
  ASSERT_TRUE(buffer.close_open({inference_record(8)}));
  EXPECT_EQ(*buffer.recover_open(), 0u);  // nothing left open: not counted twice
  auto pending = buffer.read(100, 1 << 20);
  ASSERT_EQ(pending->texts.size(), 1u);
  EXPECT_EQ(json::parse(pending->texts[0]).value("requests", 0), 8);
}

TEST(TelemetryBuffer, DiscardCountsDroppedPerClassAndPersistsThem) {
  TempDir dir;
  {
    Buffer buffer(dir.file("telemetry.db"), 1 << 20);
    ASSERT_TRUE(buffer.open());
    ASSERT_TRUE(buffer.append(
        {event_record("a"), sample_record(0.1), sample_record(0.2), inference_record(3)}));
    ASSERT_TRUE(buffer.discard_through(3));
    ASSERT_TRUE(buffer.count_dropped(wire::DropCounts{5, 0, 0, 0}));
    EXPECT_EQ(buffer.dropped(), (wire::DropCounts{7, 0, 0, 1}));
    EXPECT_EQ(buffer.read(100, 1 << 20)->seqs, (std::vector<int64_t>{4}));
  }
  Buffer buffer(dir.file("telemetry.db"), 1 << 20);
  ASSERT_TRUE(buffer.open());
  EXPECT_EQ(buffer.dropped(), (wire::DropCounts{7, 0, 0, 1}));
  EXPECT_EQ(buffer.stats().records[static_cast<int>(RecordClass::kInference)], 1);
}

// Writes 20x the bound in appends of 100 samples, with one health record, one event and one
// aggregate every 500 samples (their total fits well within the bound).
TEST(TelemetryBuffer, FloodKeepsFilesWithinTheBoundAndDropsSamplesFirst) {
  TempDir dir;
  const std::string path = dir.file("telemetry.db");
  const int64_t bound = kMinBufferBytes;
  Buffer buffer(path, bound);
  ASSERT_TRUE(buffer.open());
  int64_t written = 0;
  int64_t events = 0, aggregates = 0, samples = 0, health = 0;
  int64_t largest = 0;
  for (int round = 0; written < 20 * bound; ++round) {
    std::vector<Record> batch;
    for (int i = 0; i < 100; ++i) batch.push_back(sample_record(0.001 * i));
    samples += 100;
    if (round % 5 == 0) {
      batch.push_back(health_record());
      batch.push_back(event_record("event " + std::to_string(events)));
      batch.push_back(inference_record(static_cast<uint64_t>(aggregates + 1)));
      health += 1;
      events += 1;
      aggregates += 1;
    }
    for (const auto& r : batch)
      written += static_cast<int64_t>(wire::record_to_json(r).dump().size());
    ASSERT_TRUE(buffer.append(std::move(batch)));
    const auto stats = buffer.stats();
    largest = std::max(largest, stats.file_bytes);
    ASSERT_LE(stats.file_bytes, bound + buffer.slack()) << "after writing " << written;
    ASSERT_LE(stats.used_bytes, bound);
  }
  const auto stats = buffer.stats();
  EXPECT_GT(largest, bound / 2);  // it did fill up
  EXPECT_GT(stats.dropped.samples, 0);
  EXPECT_EQ(stats.dropped.health, 0);
  EXPECT_EQ(stats.dropped.aggregates, 0);
  EXPECT_EQ(stats.dropped.events, 0);
  EXPECT_GT(stats.records[static_cast<int>(RecordClass::kSample)], 0);
  EXPECT_EQ(stats.records[static_cast<int>(RecordClass::kEvent)], events);
  EXPECT_EQ(stats.records[static_cast<int>(RecordClass::kInference)], aggregates);
  EXPECT_EQ(stats.records[static_cast<int>(RecordClass::kHealth)], health);
  // Every record is either held or counted as dropped.
  EXPECT_EQ(stats.total_records() + stats.dropped.samples, samples + health + events + aggregates);

  // Only events and health now: the samples go first, then the health records, and only then
  // the oldest events and aggregates.
  bool saw_event_drop = false;
  std::error_code ec;
  for (int round = 0; round < 400 && !saw_event_drop; ++round) {
    std::vector<Record> batch;
    for (int i = 0; i < 20; ++i) batch.push_back(event_record(std::string(200, 'x')));
    batch.push_back(health_record());
    ASSERT_TRUE(buffer.append(std::move(batch)));
    const auto s = buffer.stats();
    ASSERT_LE(s.file_bytes, bound + buffer.slack())
        << "db " << std::filesystem::file_size(path, ec) << " wal "
        << std::filesystem::file_size(path + "-wal", ec) << " used " << s.used_bytes << " round "
        << round << " samples " << s.records[0] << " health " << s.records[1];
    if (s.dropped.health > 0) {
      ASSERT_EQ(s.records[static_cast<int>(RecordClass::kSample)], 0);
    }
    if (s.dropped.events > 0 || s.dropped.aggregates > 0) {
      saw_event_drop = true;
      EXPECT_EQ(s.records[static_cast<int>(RecordClass::kSample)], 0);
      EXPECT_GT(s.dropped.health, 0);
      EXPECT_EQ(s.dropped.samples, samples);
    }
  }
  EXPECT_TRUE(saw_event_drop);
  // The oldest events went, the newest stay (the newest health record went before them).
  auto pending = buffer.read(wire::kMaxRecordsPerBatch, 64 << 20);
  ASSERT_TRUE(pending);
  ASSERT_FALSE(pending->empty());
  EXPECT_EQ(pending->last_seq(), buffer.stats().last_seq - 1);
  EXPECT_EQ(pending->classes.back(), RecordClass::kEvent);
}

}  // namespace
}  // namespace outpost::agent::telemetry
