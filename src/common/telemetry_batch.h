// The telemetry wire format shared by the agent (which writes batches) and the control plane
// (which reads them): typed records, their JSON form, and zstd-compressed batches decoded
// with bounded sizes and every field checked, so a malformed batch is refused whole.
//
// POST /api/v1/device/telemetry, Content-Encoding: zstd, body = one zstd frame of:
//   {"v":1, "first_seq":101, "last_seq":140,
//    "dropped":{"samples":0,"health":0,"aggregates":0,"events":0},   // cumulative, per device
//    "records":[{"seq":101,"t":1700000000000,"kind":"health",...}, ...]}
// Records carry the agent's own sequence numbers: strictly increasing within a batch and
// across batches (gaps are records the agent's bound dropped). The server stores only records
// with seq above the highest it already stored for the device and answers {"acked": N}, the
// highest seq stored; a resent batch is therefore counted once.
//
// Record kinds (times are Unix ms; latencies in seconds, written to the microsecond;
// confidences to 1e-4; cpu and temperature to 0.01; feature statistics to 7 digits):
//   health:    cpu_percent, mem_used, mem_total, disk_free, disk_total, uptime_s, agent_rss,
//              buffer_bytes, [temp_c], [sync_lag_s]
//   event:     deployment, revision, event (start|exit|crash|restart|rollback|failed|activate|
//              unhealthy|... : [a-z_]{1,32}), [message]
//   inference: deployment, revision, model, version, role (primary|fallback), interval_ms,
//              requests, served, errors, invalid, fallbacks, latency, confidence, [inputs]
//              over [t, t + interval_ms). `served` counts the requests this version answered
//              (each request of a deployment is served by exactly one version and role).
//              Histograms: {"count","sum","buckets":[[le,count],...]} with per-bucket (not
//              cumulative) counts, nonzero buckets only, le ascending, null = +Inf.
//              inputs: {"<input>":{"<feature>":[n, mean, m2]}} (Welford; feature "*" = all
//              values of a wide input).
//   sample:    deployment, revision, model, version, role, latency_s, outcome
//              (ok|error|invalid|fallback), [confidence], anomaly (bool)
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace outpost::telemetry {

inline constexpr int kBatchVersion = 1;
inline constexpr size_t kMaxCompressedBatch = 1 << 20;  // bytes on the wire
inline constexpr size_t kMaxBatchJson = 8 << 20;        // bytes once decompressed
inline constexpr size_t kMaxRecordsPerBatch = 20'000;
inline constexpr size_t kMaxNameLength = 253;  // deployment, model, version, input names
inline constexpr size_t kMaxMessageLength = 1024;
inline constexpr size_t kMaxBuckets = 64;
inline constexpr size_t kMaxInputs = 32;
inline constexpr size_t kMaxFeaturesPerInput = 65;  // 64 positions, or "*"

struct Histogram {
  uint64_t count = 0;
  double sum = 0;
  // (upper bound, count in this bucket); +infinity for the last, open bucket.
  std::vector<std::pair<double, uint64_t>> buckets;
};

struct FeatureStats {
  uint64_t n = 0;
  double mean = 0;
  double m2 = 0;  // sum of squared differences from the mean (Welford)
};

struct HealthRecord {
  double cpu_percent = 0;  // of all cores, 0..100
  int64_t mem_used = 0;
  int64_t mem_total = 0;
  int64_t disk_free = 0;  // of the file system holding the agent's data dir
  int64_t disk_total = 0;
  double uptime_s = 0;  // of the machine
  int64_t agent_rss = 0;
  int64_t buffer_bytes = 0;  // telemetry buffer in use
  std::optional<double> temp_c;
  std::optional<double> sync_lag_s;  // since the last answer from the control plane
};

struct EventRecord {
  std::string deployment;
  int64_t revision = 0;
  std::string event;
  std::string message;
};

struct InferenceRecord {
  std::string deployment;
  int64_t revision = 0;
  std::string model;
  std::string version;
  std::string role = "primary";
  int64_t interval_ms = 0;
  uint64_t requests = 0;
  uint64_t served = 0;
  uint64_t errors = 0;
  uint64_t invalid = 0;
  uint64_t fallbacks = 0;
  Histogram latency;
  Histogram confidence;
  std::map<std::string, std::map<std::string, FeatureStats>> inputs;
};

struct SampleRecord {
  std::string deployment;
  int64_t revision = 0;
  std::string model;
  std::string version;
  std::string role = "primary";
  double latency_s = 0;
  std::string outcome = "ok";
  std::optional<double> confidence;
  bool anomaly = false;
};

using RecordBody = std::variant<HealthRecord, EventRecord, InferenceRecord, SampleRecord>;

struct Record {
  int64_t seq = 0;
  int64_t time = 0;  // Unix ms
  RecordBody body;
};

// "health", "event", "inference" or "sample".
std::string_view record_kind(const RecordBody& body);

struct DropCounts {
  int64_t samples = 0;
  int64_t health = 0;
  int64_t aggregates = 0;  // inference records
  int64_t events = 0;
  bool operator==(const DropCounts&) const = default;
};

struct Batch {
  int64_t first_seq = 0;
  int64_t last_seq = 0;
  DropCounts dropped;
  std::vector<Record> records;
};

// A record's JSON form (one element of "records").
nlohmann::json record_to_json(const Record& record);
// Parses and checks one record; errors are kInvalidArgument with `path` ("records[3]") as the
// prefix of the field.
[[nodiscard]] Result<Record> record_from_json(const nlohmann::json& value, const std::string& path);

// The batch's JSON text from records already in their JSON text form (the agent keeps them so
// in its buffer): no re-parse on the way out.
std::string batch_json(int64_t first_seq, int64_t last_seq, const DropCounts& dropped,
                       const std::vector<std::string>& record_texts);

// zstd frame of `data` (level 1..19; the content size is written into the frame).
[[nodiscard]] Result<std::string> compress(std::string_view data, int level = 3);
// Decompresses one zstd frame, refusing output beyond `max_size` (kPayloadTooLarge) and
// anything that is not one complete frame (kInvalidArgument).
[[nodiscard]] Result<std::string> decompress(std::string_view frame, size_t max_size);

// Decompresses (bounded by kMaxBatchJson), parses and checks a whole batch: version, seq
// range, records strictly increasing within [first_seq, last_seq], every field's type and
// range. kPayloadTooLarge for an oversized body; kInvalidArgument naming the field otherwise.
[[nodiscard]] Result<Batch> decode_batch(std::string_view compressed);

}  // namespace outpost::telemetry
