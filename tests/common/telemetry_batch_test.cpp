// The telemetry wire format: records round-trip, and every malformed, truncated or oversized
// batch is refused whole with the field that is wrong.
#include "common/telemetry_batch.h"

#include <gtest/gtest.h>

#include <cmath>

namespace outpost::telemetry {
namespace {

using json = nlohmann::json;

Record health_record(int64_t seq) {
  HealthRecord h;
  h.cpu_percent = 12.5;
  h.mem_used = 1 << 30;
  h.mem_total = 4LL << 30;
  h.disk_free = 10LL << 30;
  h.disk_total = 32LL << 30;
  h.uptime_s = 3600.5;
  h.agent_rss = 16 << 20;
  h.buffer_bytes = 4096;
  h.temp_c = 41.5;
  return Record{seq, 1'700'000'000'000 + seq, h};
}

Record inference_record(int64_t seq) {
  InferenceRecord a;
  a.deployment = "defect-detector";
  a.revision = 3;
  a.model = "defect-net";
  a.version = "1.4.0";
  a.role = "primary";
  a.interval_ms = 60'000;
  a.requests = 10;
  a.served = 9;
  a.errors = 1;
  a.invalid = 0;
  a.fallbacks = 1;
  a.latency = Histogram{9, 0.0451, {{0.001, 2}, {0.005, 6}, {0.025, 0}, {INFINITY, 1}}};
  a.confidence = Histogram{9, 8.1, {{0.9, 3}, {1.0, 6}}};
  a.inputs["input"]["0"] = FeatureStats{10, 0.5, 2.25};
  a.inputs["input"]["*"] = FeatureStats{40, -1.0, 7.0};
  return Record{seq, 1'700'000'060'000, a};
}

Record event_record(int64_t seq) {
  return Record{seq, 1'700'000'000'500,
                EventRecord{"defect-detector", 3, "rollback", "exited with status 1"}};
}

Record sample_record(int64_t seq) {
  SampleRecord s;
  s.deployment = "defect-detector";
  s.revision = 3;
  s.model = "defect-net-tiny";
  s.version = "1.0.0";
  s.role = "fallback";
  s.latency_s = 0.0021;
  s.outcome = "fallback";
  s.confidence = 0.71;
  s.anomaly = true;
  return Record{seq, 1'700'000'000'750, s};
}

std::string encode(const std::vector<Record>& records, DropCounts dropped = {}) {
  std::vector<std::string> texts;
  for (const auto& r : records) texts.push_back(record_to_json(r).dump());
  std::string body = batch_json(records.empty() ? 1 : records.front().seq,
                                records.empty() ? 1 : records.back().seq, dropped, texts);
  return *compress(body);
}

std::string encode_doc(const json& doc) { return *compress(doc.dump()); }

json valid_doc() {
  return {{"v", 1},
          {"first_seq", 1},
          {"last_seq", 2},
          {"records",
           json::array({record_to_json(health_record(1)), record_to_json(inference_record(2))})}};
}

Error refused(const json& doc) {
  auto batch = decode_batch(encode_doc(doc));
  EXPECT_FALSE(batch.has_value()) << doc.dump();
  return batch ? Error{} : batch.error();
}

TEST(TelemetryBatch, RoundTripsEveryRecordKind) {
  DropCounts dropped{7, 1, 0, 2};
  std::vector<Record> records = {health_record(5), event_record(6), inference_record(8),
                                 sample_record(9)};
  auto batch = decode_batch(encode(records, dropped));
  ASSERT_TRUE(batch.has_value()) << batch.error().describe();
  EXPECT_EQ(batch->first_seq, 5);
  EXPECT_EQ(batch->last_seq, 9);
  EXPECT_EQ(batch->dropped, dropped);
  ASSERT_EQ(batch->records.size(), 4u);
  for (size_t i = 0; i < records.size(); ++i) {
    EXPECT_EQ(record_to_json(batch->records[i]), record_to_json(records[i])) << i;
    EXPECT_EQ(record_kind(batch->records[i].body), record_kind(records[i].body));
  }
  const auto& a = std::get<InferenceRecord>(batch->records[2].body);
  // Empty buckets are not sent; the +Inf bucket comes back as infinity.
  ASSERT_EQ(a.latency.buckets.size(), 3u);
  EXPECT_TRUE(std::isinf(a.latency.buckets.back().first));
  EXPECT_EQ(a.latency.buckets.back().second, 1u);
  EXPECT_DOUBLE_EQ(a.inputs.at("input").at("*").m2, 7.0);
  const auto& h = std::get<HealthRecord>(batch->records[0].body);
  EXPECT_EQ(h.temp_c, 41.5);
  EXPECT_FALSE(h.sync_lag_s.has_value());
}

TEST(TelemetryBatch, CompressesRepetitiveRecords) {
  std::vector<Record> records;
  for (int i = 1; i <= 60; ++i) records.push_back(sample_record(i));
  std::vector<std::string> texts;
  for (const auto& r : records) texts.push_back(record_to_json(r).dump());
  std::string body = batch_json(1, 60, {}, texts);
  auto frame = compress(body);
  ASSERT_TRUE(frame.has_value());
  EXPECT_LT(frame->size() * 5, body.size());  // samples of one model compress well
  EXPECT_EQ(*decompress(*frame, body.size()), body);
}

TEST(TelemetryBatch, RefusesBrokenFrames) {
  std::string frame = encode({health_record(1), inference_record(2)});
  ASSERT_TRUE(decode_batch(frame).has_value());
  for (size_t cut : {size_t{0}, size_t{3}, frame.size() / 2, frame.size() - 1}) {
    auto b = decode_batch(frame.substr(0, cut));
    ASSERT_FALSE(b.has_value()) << cut;
    EXPECT_EQ(b.error().code, Errc::kInvalidArgument) << cut;
    EXPECT_EQ(b.error().field, "body");
  }
  auto trailing = decode_batch(frame + "x");
  ASSERT_FALSE(trailing.has_value());
  EXPECT_NE(trailing.error().message.find("after its zstd frame"), std::string::npos);
  auto plain = decode_batch(valid_doc().dump());  // JSON that was not compressed
  ASSERT_FALSE(plain.has_value());
  EXPECT_NE(plain.error().message.find("zstd"), std::string::npos);
  std::string flipped = frame;
  flipped[flipped.size() / 2] ^= 0x5a;
  EXPECT_FALSE(decode_batch(flipped).has_value());
}

TEST(TelemetryBatch, RefusesOversizedBodiesWithoutInflatingThem) {
  std::string big(kMaxCompressedBatch + 1, 'x');
  auto b = decode_batch(big);
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error().code, Errc::kPayloadTooLarge);
  // A small frame of 64 MiB of zeros (a "zip bomb") stops at the decompressed bound.
  std::string zeros(64 << 20, '\0');
  auto bomb = compress(zeros, 1);
  ASSERT_TRUE(bomb.has_value());
  ASSERT_LT(bomb->size(), kMaxCompressedBatch);
  auto r = decode_batch(*bomb);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, Errc::kPayloadTooLarge);
  EXPECT_EQ(decompress(*bomb, 1024).error().code, Errc::kPayloadTooLarge);
}

TEST(TelemetryBatch, RefusesTooManyRecords) {
  json doc = valid_doc();
  json list = json::array();
  for (size_t i = 1; i <= kMaxRecordsPerBatch + 1; ++i) {
    list.push_back({{"seq", i}, {"t", 1}, {"kind", "event"}, {"event", "start"}});
  }
  doc["records"] = list;
  doc["last_seq"] = kMaxRecordsPerBatch + 1;
  EXPECT_EQ(refused(doc).code, Errc::kPayloadTooLarge);
}

TEST(TelemetryBatch, NamesTheFieldItRefuses) {
  struct Case {
    const char* name;
    std::function<void(json&)> mutate;
    const char* field;
  };
  const std::vector<Case> cases = {
      {"not an object", [](json& d) { d = json::array(); }, "batch"},
      {"version", [](json& d) { d["v"] = 2; }, "batch.v"},
      {"unknown top field", [](json& d) { d["extra"] = 1; }, "batch.extra"},
      {"last before first", [](json& d) { d["last_seq"] = 0; }, "batch.last_seq"},
      {"seq zero", [](json& d) { d["first_seq"] = 0; }, "batch.first_seq"},
      {"records missing", [](json& d) { d.erase("records"); }, "batch.records"},
      {"records not array", [](json& d) { d["records"] = json::object(); }, "batch.records"},
      {"dropped negative",
       [](json& d) {
         d["dropped"] = {{"samples", -1}};
       },
       "batch.dropped.samples"},
      {"record not object", [](json& d) { d["records"][1] = 5; }, "records[1]"},
      {"order", [](json& d) { std::swap(d["records"][0]["seq"], d["records"][1]["seq"]); },
       "records[1].seq"},
      {"duplicate seq", [](json& d) { d["records"][1]["seq"] = 1; }, "records[1].seq"},
      {"outside range", [](json& d) { d["records"][1]["seq"] = 3; }, "records[1].seq"},
      {"kind", [](json& d) { d["records"][0]["kind"] = "gossip"; }, "records[0].kind"},
      {"time type", [](json& d) { d["records"][0]["t"] = "now"; }, "records[0].t"},
      {"time far future", [](json& d) { d["records"][0]["t"] = 9'000'000'000'000LL; },
       "records[0].t"},
      {"cpu over 100", [](json& d) { d["records"][0]["cpu_percent"] = 150; },
       "records[0].cpu_percent"},
      {"mem negative", [](json& d) { d["records"][0]["mem_used"] = -5; }, "records[0].mem_used"},
      {"unknown health field", [](json& d) { d["records"][0]["fan"] = 1; }, "records[0].fan"},
      {"deployment empty", [](json& d) { d["records"][1]["deployment"] = ""; },
       "records[1].deployment"},
      {"deployment too long",
       [](json& d) { d["records"][1]["deployment"] = std::string(300, 'a'); },
       "records[1].deployment"},
      {"role", [](json& d) { d["records"][1]["role"] = "shadow"; }, "records[1].role"},
      {"requests negative", [](json& d) { d["records"][1]["requests"] = -1; },
       "records[1].requests"},
      {"requests float", [](json& d) { d["records"][1]["served"] = 1.5; }, "records[1].served"},
      {"interval zero", [](json& d) { d["records"][1]["interval_ms"] = 0; },
       "records[1].interval_ms"},
      {"histogram sum mismatch", [](json& d) { d["records"][1]["latency"]["count"] = 100; },
       "records[1].latency.buckets"},
      {"buckets descending",
       [](json& d) {
         d["records"][1]["confidence"]["buckets"] = json::parse("[[1.0, 3], [0.9, 6]]");
       },
       "records[1].confidence.buckets[1]"},
      {"inf not last",
       [](json& d) {
         d["records"][1]["confidence"]["buckets"] = json::parse("[[null, 3], [0.9, 6]]");
       },
       "records[1].confidence.buckets[1]"},
      {"bucket shape",
       [](json& d) { d["records"][1]["confidence"]["buckets"] = json::parse("[[0.9, 3, 1]]"); },
       "records[1].confidence.buckets[0]"},
      {"too many buckets",
       [](json& d) {
         json b = json::array();
         for (int i = 0; i < 65; ++i) b.push_back({i, 0});
         d["records"][1]["confidence"] = {{"count", 0}, {"sum", 0}, {"buckets", b}};
       },
       "records[1].confidence.buckets"},
      {"feature name",
       [](json& d) {
         d["records"][1]["inputs"]["input"]["x"] = {1, 0, 0};
       },
       "records[1].inputs.input.x"},
      {"feature shape",
       [](json& d) {
         d["records"][1]["inputs"]["input"]["0"] = {1, 0};
       },
       "records[1].inputs.input.0"},
      {"feature m2 negative",
       [](json& d) {
         d["records"][1]["inputs"]["input"]["0"] = {1, 0, -1};
       },
       "records[1].inputs.input.0"},
  };
  for (const auto& c : cases) {
    json doc = valid_doc();
    c.mutate(doc);
    Error e = refused(doc);
    EXPECT_EQ(e.code, Errc::kInvalidArgument) << c.name << ": " << e.describe();
    EXPECT_EQ(e.field, c.field) << c.name << ": " << e.describe();
    EXPECT_FALSE(e.message.empty()) << c.name;
  }
}

TEST(TelemetryBatch, ChecksEventsAndSamples) {
  auto with = [](const Record& r, std::function<void(json&)> mutate) {
    json rec = record_to_json(r);
    mutate(rec);
    return json{{"v", 1}, {"first_seq", 1}, {"last_seq", 1}, {"records", json::array({rec})}};
  };
  EXPECT_EQ(refused(with(event_record(1), [](json& r) { r["event"] = "Crash!"; })).field,
            "records[0].event");
  EXPECT_EQ(
      refused(with(event_record(1), [](json& r) { r["message"] = std::string(2000, 'm'); })).field,
      "records[0].message");
  EXPECT_EQ(refused(with(sample_record(1), [](json& r) { r["outcome"] = "meh"; })).field,
            "records[0].outcome");
  EXPECT_EQ(refused(with(sample_record(1), [](json& r) { r["confidence"] = 1.5; })).field,
            "records[0].confidence");
  EXPECT_EQ(refused(with(sample_record(1), [](json& r) { r["anomaly"] = "yes"; })).field,
            "records[0].anomaly");
  EXPECT_EQ(refused(with(sample_record(1), [](json& r) { r.erase("model"); })).field,
            "records[0].model");
  // An agent-wide event (no deployment) is fine.
  json agent_event = with(event_record(1), [](json& r) {
    r.erase("deployment");
    r.erase("revision");
  });
  EXPECT_TRUE(decode_batch(encode_doc(agent_event)).has_value());
}

TEST(TelemetryBatch, AcceptsAnEmptyBatchThatOnlyReportsDrops) {
  json doc = {{"v", 1},
              {"first_seq", 10},
              {"last_seq", 10},
              {"dropped", {{"samples", 40}}},
              {"records", json::array()}};
  auto b = decode_batch(encode_doc(doc));
  ASSERT_TRUE(b.has_value()) << b.error().describe();
  EXPECT_EQ(b->dropped.samples, 40);
  EXPECT_TRUE(b->records.empty());
}

}  // namespace
}  // namespace outpost::telemetry
