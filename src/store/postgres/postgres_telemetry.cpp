// Telemetry in PostgreSQL: see postgres_telemetry.h and migrations/postgres/0003_telemetry.sql.
//
// Round trips, not the disk, are what cost here: a batch's points go to the server in one
// INSERT of arrays, the devices' rows are locked and read in one statement, and queries and
// rollups aggregate on the server (per series and step, or per series and hour), so that only
// histogram buckets travel point by point.
#include "store/postgres/postgres_telemetry.h"
#include "store/internal/telemetry_query.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "store/postgres/postgres_store.h"

namespace outpost::store::postgres {
namespace {

constexpr int64_t kHourMs = 3'600'000;
// groups × steps a query may hold in memory.
constexpr int64_t kMaxQueryCells = 200'000;

int64_t hour_of(int64_t time_ms) {
  // Floor division: times before 1970 stay in the hour below.
  return time_ms >= 0 ? time_ms / kHourMs : -((-time_ms + kHourMs - 1) / kHourMs);
}

// As the rest of the store, except that a broken constraint is our bug, not the device's:
// 500, so that the agent sends the batch again rather than giving it up as refused.
Error telemetry_error(Error e, const Connection& conn) {
  if (conn.last_sqlstate().starts_with("23")) e.code = Errc::kInternal;
  return e;
}

// Histogram buckets as bytes: (float64 le, uint64 count) pairs in host byte order
// (little-endian on every platform we build for), le ascending; the SQLite backend's format.
std::string encode_buckets(const std::vector<std::pair<double, uint64_t>>& buckets) {
  std::string out(buckets.size() * 16, '\0');
  char* p = out.data();
  for (const auto& [le, count] : buckets) {
    std::memcpy(p, &le, 8);
    std::memcpy(p + 8, &count, 8);
    p += 16;
  }
  return out;
}

std::string encode_bucket_map(const std::map<double, uint64_t>& buckets) {
  std::string out(buckets.size() * 16, '\0');
  char* p = out.data();
  for (const auto& [le, count] : buckets) {
    std::memcpy(p, &le, 8);
    std::memcpy(p + 8, &count, 8);
    p += 16;
  }
  return out;
}

void decode_buckets_into(std::string_view bytes, std::map<double, uint64_t>& out) {
  for (size_t i = 0; i + 16 <= bytes.size(); i += 16) {
    double le = 0;
    uint64_t count = 0;
    std::memcpy(&le, bytes.data() + i, 8);
    std::memcpy(&count, bytes.data() + i + 8, 8);
    out[le] += count;
  }
}

uint32_t read_be32(const char* p) {
  return (static_cast<uint32_t>(static_cast<unsigned char>(p[0])) << 24) |
         (static_cast<uint32_t>(static_cast<unsigned char>(p[1])) << 16) |
         (static_cast<uint32_t>(static_cast<unsigned char>(p[2])) << 8) |
         static_cast<uint32_t>(static_cast<unsigned char>(p[3]));
}

// The elements of a one-dimensional array in binary format (array_send), NULLs skipped.
template <typename Fn>
void for_each_element(std::string_view array, Fn&& fn) {
  if (array.size() < 12) return;
  const uint32_t ndim = read_be32(array.data());
  if (ndim != 1 || array.size() < 20) return;
  const uint32_t n = read_be32(array.data() + 12);
  size_t at = 20;
  for (uint32_t i = 0; i < n && at + 4 <= array.size(); ++i) {
    const uint32_t len = read_be32(array.data() + at);
    at += 4;
    if (len == 0xffffffffU) continue;
    if (at + len > array.size()) return;
    fn(array.substr(at, len));
    at += len;
  }
}

void add_histogram_to(std::map<double, uint64_t>& into, const telemetry::Histogram& h) {
  for (const auto& [le, count] : h.buckets) into[le] += count;
}

// Record kinds and the metric of each series a record gives.
constexpr std::array<std::string_view, 10> kHealthMetrics = {
    "cpu_percent",         "memory_used_bytes", "memory_total_bytes", "disk_free_bytes",
    "disk_total_bytes",    "uptime_seconds",    "agent_rss_bytes",    "telemetry_buffer_bytes",
    "temperature_celsius", "sync_lag_seconds"};
constexpr std::array<std::string_view, 6> kInferenceMetrics = {
    "inference_requests",  "inference_errors",          "inference_invalid",
    "inference_fallbacks", "inference_latency_seconds", "inference_confidence"};

}  // namespace

// A telemetry_devices row as this transaction has it.
struct PgTelemetry::DeviceRow {
  bool exists = false;  // stored by an earlier batch (not the placeholder of this transaction)
  bool dirty = false;   // changed by this transaction
  int64_t acked_seq = 0;
  telemetry::DropCounts dropped;
  int64_t last_ingest_at = 0;
  int64_t last_health_at = 0;
  std::optional<double> sync_lag_s;
  int64_t batches = 0;
  int64_t records = 0;
};

// What one batch adds to one (deployment, model, version, role) running total.
struct PgTelemetry::TotalsDelta {
  std::string deployment, model, version, role;
  uint64_t requests = 0, served = 0, errors = 0, invalid = 0, fallbacks = 0;
  uint64_t latency_count = 0, confidence_count = 0;
  double latency_sum = 0, confidence_sum = 0;
  std::map<double, uint64_t> latency, confidence;

  void add(const TotalsDelta& other) {
    if (deployment.empty()) {
      deployment = other.deployment;
      model = other.model;
      version = other.version;
      role = other.role;
    }
    requests += other.requests;
    served += other.served;
    errors += other.errors;
    invalid += other.invalid;
    fallbacks += other.fallbacks;
    latency_count += other.latency_count;
    confidence_count += other.confidence_count;
    latency_sum += other.latency_sum;
    confidence_sum += other.confidence_sum;
    for (const auto& [le, count] : other.latency) latency[le] += count;
    for (const auto& [le, count] : other.confidence) confidence[le] += count;
  }
};

// The state of one ingest transaction (one attempt of it).
struct PgTelemetry::Transaction {
  int64_t rolled_up_hour = 0;
  std::map<std::string, DeviceRow, std::less<>> devices;
  // Series ids this transaction added or found, by key; the cache gets them at commit.
  std::unordered_map<std::string, int64_t> series;
  // Keys added to `series` by the current batch (forgotten when its savepoint rolls back).
  std::vector<std::string> batch_series;
};

// A batch's points, as the columns of one multi-row INSERT.
struct PgTelemetry::PendingPoints {
  std::vector<int64_t> hour, series, time, seq;
  std::vector<std::optional<double>> value, sum;
  std::vector<std::optional<std::string>> buckets;
  // The points of hours already rolled up: they also merge into the rollup.
  struct Late {
    int64_t hour, series, time;
    double value;
    const telemetry::Histogram* histogram;
  };
  std::vector<Late> late;
};

namespace {

// The series key: its labels joined by a separator no label holds (the decoder refuses control
// characters in label values), with the revision.
std::string series_key(const std::vector<std::string_view>& labels, int64_t revision) {
  std::string key;
  for (std::string_view part : labels) {
    key += part;
    key += '\x1f';
  }
  key += std::to_string(revision);
  return key;
}

}  // namespace

Result<int64_t> PgTelemetry::series_id(Connection& conn, Transaction& txn,
                                       const std::vector<std::string_view>& labels,
                                       int64_t revision) {
  std::string key = series_key(labels, revision);
  {
    std::lock_guard lock(mu_);
    if (auto it = series_.find(key); it != series_.end()) return it->second;
  }
  if (auto it = txn.series.find(key); it != txn.series.end()) return it->second;
  // labels: device, metric, site, deployment, model, version, role, detail.
  const auto text = [&](size_t i) { return std::string(labels[i]); };
  // DO NOTHING waits for another server adding the same series, then the SELECT (a statement
  // of its own, so with a snapshot taken after that commit) finds its row.
  auto added = conn.query(
      "INSERT INTO telemetry_series (device_id, metric, site, deployment, revision, model,"
      " version, role, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
      " ON CONFLICT DO NOTHING RETURNING id",
      text(0), text(1), text(2), text(3), revision, text(4), text(5), text(6), text(7));
  if (!added) return make_error(telemetry_error(std::move(added).error(), conn));
  int64_t id = 0;
  if (!added->empty()) {
    id = added->i64(0, 0);
  } else {
    auto found = conn.query(
        "SELECT id FROM telemetry_series WHERE device_id = $1 AND metric = $2 AND site = $3"
        " AND deployment = $4 AND revision = $5 AND model = $6 AND version = $7 AND role = $8"
        " AND detail = $9",
        text(0), text(1), text(2), text(3), revision, text(4), text(5), text(6), text(7));
    if (!found) return make_error(telemetry_error(std::move(found).error(), conn));
    if (found->empty()) {
      return make_error(Errc::kUnavailable,
                        "telemetry series " + key + " was neither added nor found; try again");
    }
    id = found->i64(0, 0);
  }
  txn.series.emplace(key, id);
  txn.batch_series.push_back(std::move(key));
  return id;
}

Status PgTelemetry::write_points(Connection& conn, const PendingPoints& p, int64_t rolled_up_hour) {
  if (!p.hour.empty()) {
    Params params;
    params.int8_array(p.hour)
        .int8_array(p.series)
        .int8_array(p.time)
        .int8_array(p.seq)
        .float8_array(p.value)
        .float8_array(p.sum)
        .bytea_array(p.buckets);
    auto done = conn.exec(
        "INSERT INTO telemetry_points (hour, series_id, time, seq, value, sum, buckets)"
        " SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::float8[],"
        " $6::float8[], $7::bytea[])",
        params);
    if (!done) return make_error(telemetry_error(std::move(done).error(), conn));
  }
  // Late data (a device that was offline) for an hour already rolled up goes into the rollup
  // too, or queries of that hour would never see it. The rollup lock (shared) keeps the
  // rollup job away meanwhile; the device's row lock keeps other ingests of these series away.
  for (const auto& late : p.late) {
    if (late.hour >= rolled_up_hour) continue;
    TelemetryStats stats;
    auto read = conn.query(
        "SELECT points, value_sum, value_min, value_max, last_time, last_value, hist_sum, buckets"
        " FROM telemetry_rollups WHERE hour = $1 AND series_id = $2",
        late.hour, late.series);
    if (!read) return make_error(telemetry_error(std::move(read).error(), conn));
    if (!read->empty()) {
      stats.points = read->i64(0, 0);
      stats.sum = read->f64(0, 1);
      stats.min = read->f64(0, 2);
      stats.max = read->f64(0, 3);
      stats.last_time = read->i64(0, 4);
      stats.last = read->f64(0, 5);
      stats.hist_sum = read->f64(0, 6);
      if (!read->null(0, 7)) decode_buckets_into(read->view(0, 7), stats.buckets);
    }
    if (late.histogram != nullptr) {
      stats.add_histogram(late.time, late.histogram->count, late.histogram->sum,
                          late.histogram->buckets);
    } else {
      stats.add_value(late.time, late.value);
    }
    const bool histogram = late.histogram != nullptr;
    const std::string blob = histogram ? encode_bucket_map(stats.buckets) : std::string();
    auto written = conn.query(
        "INSERT INTO telemetry_rollups (hour, series_id, points, value_sum, value_min, value_max,"
        " last_time, last_value, hist_sum, buckets) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,"
        " $10) ON CONFLICT (hour, series_id) DO UPDATE SET points = excluded.points,"
        " value_sum = excluded.value_sum, value_min = excluded.value_min,"
        " value_max = excluded.value_max, last_time = excluded.last_time,"
        " last_value = excluded.last_value, hist_sum = excluded.hist_sum,"
        " buckets = excluded.buckets",
        late.hour, late.series, stats.points, stats.sum, stats.min, stats.max, stats.last_time,
        stats.last, histogram ? std::optional<double>(stats.hist_sum) : std::nullopt,
        histogram ? std::optional<Bytes>(Bytes{blob}) : std::nullopt);
    if (!written) return make_error(telemetry_error(std::move(written).error(), conn));
  }
  return ok();
}

Status PgTelemetry::apply_totals(Connection& conn,
                                 const std::map<std::string, TotalsDelta>& deltas) {
  // In key order (the map's): two transactions lock the rows they share in the same order.
  for (const auto& [key, d] : deltas) {
    auto read = [&]() {
      return conn.query(
          "SELECT latency_buckets, confidence_buckets FROM telemetry_totals WHERE deployment = $1"
          " AND model = $2 AND version = $3 AND role = $4 FOR UPDATE",
          d.deployment, d.model, d.version, d.role);
    };
    auto row = read();
    if (!row) return make_error(telemetry_error(std::move(row).error(), conn));
    if (row->empty()) {
      // First record of this total: a placeholder to lock (DO NOTHING when another server
      // added it meanwhile), then the row as it is now.
      auto added = conn.query(
          "INSERT INTO telemetry_totals (deployment, model, version, role, requests, served,"
          " errors, invalid, fallbacks, latency_count, latency_sum, latency_buckets,"
          " confidence_count, confidence_sum, confidence_buckets) VALUES ($1, $2, $3, $4, 0, 0,"
          " 0, 0, 0, 0, 0, ''::bytea, 0, 0, ''::bytea) ON CONFLICT DO NOTHING",
          d.deployment, d.model, d.version, d.role);
      if (!added) return make_error(telemetry_error(std::move(added).error(), conn));
      row = read();
      if (!row) return make_error(telemetry_error(std::move(row).error(), conn));
      if (row->empty()) {
        return make_error(Errc::kUnavailable, "telemetry totals row vanished; try again");
      }
    }
    std::map<double, uint64_t> latency = d.latency;
    std::map<double, uint64_t> confidence = d.confidence;
    decode_buckets_into(row->view(0, 0), latency);
    decode_buckets_into(row->view(0, 1), confidence);
    auto written = conn.query(
        "UPDATE telemetry_totals SET requests = requests + $5, served = served + $6,"
        " errors = errors + $7, invalid = invalid + $8, fallbacks = fallbacks + $9,"
        " latency_count = latency_count + $10, latency_sum = latency_sum + $11,"
        " latency_buckets = $12, confidence_count = confidence_count + $13,"
        " confidence_sum = confidence_sum + $14, confidence_buckets = $15"
        " WHERE deployment = $1 AND model = $2 AND version = $3 AND role = $4",
        d.deployment, d.model, d.version, d.role, static_cast<int64_t>(d.requests),
        static_cast<int64_t>(d.served), static_cast<int64_t>(d.errors),
        static_cast<int64_t>(d.invalid), static_cast<int64_t>(d.fallbacks),
        static_cast<int64_t>(d.latency_count), d.latency_sum, Bytes{encode_bucket_map(latency)},
        static_cast<int64_t>(d.confidence_count), d.confidence_sum,
        Bytes{encode_bucket_map(confidence)});
    if (!written) return make_error(telemetry_error(std::move(written).error(), conn));
  }
  return ok();
}

Result<std::vector<Result<TelemetryIngestOutcome>>> PgTelemetry::ingest_many(
    const std::vector<TelemetryIngest>& batches, int64_t now_ms) {
  // First without savepoints: the decoder checked every record, so a batch rarely fails. After
  // a failure, the same again with a savepoint per batch, so that a failing batch fails alone.
  auto fast = ingest_transaction(batches, now_ms, false);
  if (fast || batches.size() <= 1) return fast;
  return ingest_transaction(batches, now_ms, true);
}

Result<TelemetryIngestOutcome> PgTelemetry::ingest(const std::string& device_id,
                                                   const std::string& site,
                                                   const telemetry::Batch& batch, int64_t now_ms) {
  std::vector<TelemetryIngest> one{TelemetryIngest{device_id, site, &batch}};
  auto outcomes = ingest_many(one, now_ms);
  if (!outcomes) return make_error(outcomes.error());
  return std::move(outcomes->front());
}

Result<std::vector<Result<TelemetryIngestOutcome>>> PgTelemetry::ingest_transaction(
    const std::vector<TelemetryIngest>& batches, int64_t now_ms, bool savepoints) {
  Transaction txn;
  // Without savepoints, the error of the batch that failed (the transaction rolled back).
  std::optional<Error> batch_error;
  auto result = pool_.transact(
      Isolation::kReadCommitted, "storing telemetry batches",
      [&](Connection& conn) -> Result<std::vector<Result<TelemetryIngestOutcome>>> {
        txn = Transaction{};  // this may be a retry
        batch_error.reset();
        OUTPOST_TRY(conn.query("SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)",
                               kAdvisoryLockClass, kTelemetryRollupLock));
        {
          auto state = conn.query("SELECT rolled_up_hour FROM telemetry_state WHERE id = 1");
          if (!state) return make_error(std::move(state).error());
          if (state->empty()) return make_error(Errc::kInternal, "telemetry_state has no row");
          txn.rolled_up_hour = state->i64(0, 0);
        }
        std::vector<std::string> ids;
        for (const auto& in : batches) ids.push_back(in.device_id);
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        // Every device's row, locked in id order; a device never seen gets a placeholder row
        // (batches = 0) to lock, deleted again below if none of its batches is stored.
        OUTPOST_TRY(conn.query(
            "INSERT INTO telemetry_devices (device_id, acked_seq, dropped_samples, dropped_health,"
            " dropped_aggregates, dropped_events, last_ingest_at, last_health_at, sync_lag_s,"
            " batches, records) SELECT id, 0, 0, 0, 0, 0, 0, 0, NULL, 0, 0 FROM"
            " unnest($1::text[]) AS id ORDER BY id ON CONFLICT DO NOTHING",
            ids));
        {
          auto rows = conn.query(
              "SELECT device_id, acked_seq, dropped_samples, dropped_health, dropped_aggregates,"
              " dropped_events, last_ingest_at, last_health_at, sync_lag_s, batches, records"
              " FROM telemetry_devices WHERE device_id = ANY($1::text[]) ORDER BY device_id"
              " FOR UPDATE",
              ids);
          if (!rows) return make_error(std::move(rows).error());
          for (int i = 0; i < rows->size(); ++i) {
            DeviceRow row;
            row.batches = rows->i64(i, 9);
            row.exists = row.batches > 0;
            row.acked_seq = rows->i64(i, 1);
            row.dropped = telemetry::DropCounts{.samples = rows->i64(i, 2),
                                                .health = rows->i64(i, 3),
                                                .aggregates = rows->i64(i, 4),
                                                .events = rows->i64(i, 5)};
            row.last_ingest_at = rows->i64(i, 6);
            row.last_health_at = rows->i64(i, 7);
            row.sync_lag_s = rows->opt_f64(i, 8);
            row.records = rows->i64(i, 10);
            txn.devices.emplace(rows->text(i, 0), row);
          }
        }
        std::vector<Result<TelemetryIngestOutcome>> outcomes;
        outcomes.reserve(batches.size());
        // The fleet totals move once per transaction, by what its batches add up to.
        std::map<std::string, TotalsDelta> totals;
        std::map<std::string, TotalsDelta> batch_totals;
        for (const TelemetryIngest& in : batches) {
          batch_totals.clear();
          txn.batch_series.clear();
          if (savepoints) OUTPOST_TRY(conn.exec_script("SAVEPOINT telemetry_batch"));
          auto one = ingest_one(conn, txn, in, now_ms, batch_totals);
          if (one) {
            if (savepoints) OUTPOST_TRY(conn.exec_script("RELEASE telemetry_batch"));
            for (auto& [key, delta] : batch_totals) totals[key].add(delta);
          } else if (conn.retryable_failure() || conn.broken()) {
            return make_error(one.error());  // the whole transaction goes again
          } else if (savepoints) {
            OUTPOST_TRY(conn.exec_script("ROLLBACK TO telemetry_batch"));
            OUTPOST_TRY(conn.exec_script("RELEASE telemetry_batch"));
            for (const auto& key : txn.batch_series) txn.series.erase(key);
          } else {
            batch_error = one.error();  // one batch: its slot's error; several: retried alone
            return make_error(one.error());
          }
          outcomes.push_back(std::move(one));
        }
        for (const auto& [id, row] : txn.devices) {
          if (!row.dirty) continue;
          OUTPOST_TRY(conn.query(
              "UPDATE telemetry_devices SET acked_seq = $2, dropped_samples = $3,"
              " dropped_health = $4, dropped_aggregates = $5, dropped_events = $6,"
              " last_ingest_at = $7, last_health_at = $8, sync_lag_s = $9, batches = $10,"
              " records = $11 WHERE device_id = $1",
              id, row.acked_seq, row.dropped.samples, row.dropped.health, row.dropped.aggregates,
              row.dropped.events, row.last_ingest_at, row.last_health_at, row.sync_lag_s,
              row.batches, row.records));
        }
        OUTPOST_TRY(conn.query(
            "DELETE FROM telemetry_devices WHERE device_id = ANY($1::text[]) AND batches = 0",
            ids));
        OUTPOST_TRY(apply_totals(conn, totals));
        return outcomes;
      });
  if (result) {
    std::lock_guard lock(mu_);
    for (auto& [key, id] : txn.series) series_.emplace(key, id);
  } else if (batch_error && batches.size() == 1) {
    // A lone batch that failed: the transaction is fine, its one slot holds the error.
    std::vector<Result<TelemetryIngestOutcome>> outcomes;
    outcomes.push_back(make_error(std::move(*batch_error)));
    return outcomes;
  }
  return result;
}

Result<TelemetryIngestOutcome> PgTelemetry::ingest_one(Connection& conn, Transaction& txn,
                                                       const TelemetryIngest& in, int64_t now_ms,
                                                       std::map<std::string, TotalsDelta>& totals) {
  const std::string& device_id = in.device_id;
  const std::string& site = in.site;
  const telemetry::Batch& batch = *in.batch;
  auto found = txn.devices.find(device_id);
  if (found == txn.devices.end()) {
    return make_error(Errc::kInternal, "telemetry row of device " + device_id + " not locked");
  }
  DeviceRow& row = found->second;
  const int64_t watermark = row.acked_seq;
  int64_t last_health_at = row.last_health_at;

  TelemetryIngestOutcome out;
  PendingPoints points;
  std::optional<double> sync_lag;
  bool health_seen = false;
  // Queues one point of the series (labels and metric) for the batch's INSERT.
  auto point = [&](std::string_view metric, std::string_view deployment, int64_t revision,
                   std::string_view model, std::string_view version, std::string_view role,
                   std::string_view detail, const telemetry::Record& r, double value,
                   const telemetry::Histogram* histogram = nullptr) -> Status {
    auto id = series_id(
        conn, txn, {device_id, metric, site, deployment, model, version, role, detail}, revision);
    if (!id) return make_error(std::move(id).error());
    const int64_t hour = hour_of(r.time);
    points.hour.push_back(hour);
    points.series.push_back(*id);
    points.time.push_back(r.time);
    points.seq.push_back(r.seq);
    points.value.push_back(value);
    if (histogram != nullptr) {
      points.sum.push_back(histogram->sum);
      points.buckets.push_back(encode_buckets(histogram->buckets));
    } else {
      points.sum.push_back(std::nullopt);
      points.buckets.push_back(std::nullopt);
    }
    if (hour < txn.rolled_up_hour) {
      points.late.push_back({hour, *id, r.time, value, histogram});
    }
    ++out.points;
    return ok();
  };

  for (const telemetry::Record& r : batch.records) {
    if (r.seq <= watermark) {
      ++out.duplicates;
      continue;
    }
    ++out.stored;
    if (const auto* h = std::get_if<telemetry::HealthRecord>(&r.body)) {
      const double gauges[8] = {h->cpu_percent,
                                static_cast<double>(h->mem_used),
                                static_cast<double>(h->mem_total),
                                static_cast<double>(h->disk_free),
                                static_cast<double>(h->disk_total),
                                h->uptime_s,
                                static_cast<double>(h->agent_rss),
                                static_cast<double>(h->buffer_bytes)};
      for (size_t i = 0; i < 8; ++i) {
        OUTPOST_TRY(point(kHealthMetrics[i], "", 0, "", "", "", "", r, gauges[i]));
      }
      if (h->temp_c) OUTPOST_TRY(point(kHealthMetrics[8], "", 0, "", "", "", "", r, *h->temp_c));
      if (h->sync_lag_s) {
        OUTPOST_TRY(point(kHealthMetrics[9], "", 0, "", "", "", "", r, *h->sync_lag_s));
      }
      if (r.time >= last_health_at) {
        last_health_at = r.time;
        sync_lag = h->sync_lag_s;
        health_seen = true;
      }
    } else if (const auto* e = std::get_if<telemetry::EventRecord>(&r.body)) {
      auto inserted = conn.query(
          "INSERT INTO telemetry_events (device_id, seq, time, deployment, revision, event,"
          " message) VALUES ($1, $2, $3, $4, $5, $6, $7)",
          device_id, r.seq, r.time, e->deployment, e->revision, e->event, e->message);
      if (!inserted) return make_error(telemetry_error(std::move(inserted).error(), conn));
      OUTPOST_TRY(point("events", e->deployment, e->revision, "", "", "", e->event, r, 1));
    } else if (const auto* inf = std::get_if<telemetry::InferenceRecord>(&r.body)) {
      auto series = [&](size_t i, double value, const telemetry::Histogram* histogram = nullptr) {
        return point(kInferenceMetrics[i], inf->deployment, inf->revision, inf->model, inf->version,
                     inf->role, "", r, value, histogram);
      };
      OUTPOST_TRY(series(0, static_cast<double>(inf->served)));
      OUTPOST_TRY(series(1, static_cast<double>(inf->errors)));
      OUTPOST_TRY(series(2, static_cast<double>(inf->invalid)));
      OUTPOST_TRY(series(3, static_cast<double>(inf->fallbacks)));
      OUTPOST_TRY(series(4, static_cast<double>(inf->latency.count), &inf->latency));
      OUTPOST_TRY(series(5, static_cast<double>(inf->confidence.count), &inf->confidence));

      const std::string total_key =
          inf->deployment + '\x1f' + inf->model + '\x1f' + inf->version + '\x1f' + inf->role;
      TotalsDelta& t = totals[total_key];
      if (t.deployment.empty()) {
        t.deployment = inf->deployment;
        t.model = inf->model;
        t.version = inf->version;
        t.role = inf->role;
      }
      t.requests += inf->requests;
      t.served += inf->served;
      t.errors += inf->errors;
      t.invalid += inf->invalid;
      t.fallbacks += inf->fallbacks;
      t.latency_count += inf->latency.count;
      t.latency_sum += inf->latency.sum;
      add_histogram_to(t.latency, inf->latency);
      t.confidence_count += inf->confidence.count;
      t.confidence_sum += inf->confidence.sum;
      add_histogram_to(t.confidence, inf->confidence);
    } else if (const auto* s = std::get_if<telemetry::SampleRecord>(&r.body)) {
      OUTPOST_TRY(point("sample_latency_seconds", s->deployment, s->revision, s->model, s->version,
                        s->role, s->outcome, r, s->latency_s));
    }
  }
  OUTPOST_TRY(write_points(conn, points, txn.rolled_up_hour));

  // The device's row changes last, only once the batch is stored. Drop counts are cumulative
  // on the device: only a batch newer than anything stored brings newer ones (a replayed old
  // batch must not move them back).
  const bool newer = batch.last_seq > watermark;
  out.acked = std::max(watermark, batch.last_seq);
  if (!row.exists || newer) row.dropped = batch.dropped;
  if (!row.exists || health_seen) row.sync_lag_s = sync_lag;
  row.acked_seq = out.acked;
  row.last_ingest_at = now_ms;
  row.last_health_at = last_health_at;
  row.batches = row.exists ? row.batches + 1 : 1;
  row.records = row.exists ? row.records + out.stored : out.stored;
  row.exists = true;
  row.dirty = true;
  return out;
}

Result<TelemetryMaintenanceOutcome> PgTelemetry::maintain(int64_t now_ms,
                                                          const TelemetryRetention& retention) {
  TelemetryMaintenanceOutcome out;
  const int64_t current_hour = hour_of(now_ms);
  // One transaction per hour rolled up, so that ingest never waits long for the lock.
  while (true) {
    struct HourOutcome {
      bool done = false;
      int64_t rollups = 0;
    };
    auto hour_result = pool_.transact(
        Isolation::kReadCommitted, "rolling up telemetry",
        [&](Connection& conn) -> Result<HourOutcome> {
          OUTPOST_TRY(conn.query("SELECT pg_advisory_xact_lock($1::int4, $2::int4)",
                                 kAdvisoryLockClass, kTelemetryRollupLock));
          auto state = conn.query("SELECT rolled_up_hour FROM telemetry_state WHERE id = 1");
          if (!state) return make_error(std::move(state).error());
          if (state->empty()) return make_error(Errc::kInternal, "telemetry_state has no row");
          const int64_t rolled = state->i64(0, 0);
          // The next hour that has points: empty hours are skipped in one step.
          auto next = conn.query("SELECT MIN(hour) FROM telemetry_points WHERE hour >= $1", rolled);
          if (!next) return make_error(std::move(next).error());
          if (next->null(0, 0) || next->i64(0, 0) >= current_hour) {
            if (rolled < current_hour) {
              OUTPOST_TRY(conn.query("UPDATE telemetry_state SET rolled_up_hour = $1 WHERE id = 1",
                                     current_hour));
            }
            return HourOutcome{.done = true};
          }
          const int64_t hour = next->i64(0, 0);
          // The scalar part on the server, in the order the SQLite backend adds them up (so
          // sums agree to the bit); the buckets of histogram points merged here.
          auto stats = conn.query(
              "SELECT series_id, COUNT(*)::int8, SUM(value ORDER BY time, seq), MIN(value),"
              " MAX(value), MAX(time), (ARRAY_AGG(value ORDER BY time DESC, seq DESC))[1],"
              " SUM(sum ORDER BY time, seq), SUM(value ORDER BY time, seq) FILTER (WHERE sum IS"
              " NOT NULL) FROM telemetry_points WHERE hour = $1 GROUP BY series_id"
              " ORDER BY series_id",
              hour);
          if (!stats) return make_error(std::move(stats).error());
          std::map<int64_t, std::map<double, uint64_t>> buckets;
          auto bucket_rows = conn.query(
              "SELECT series_id, buckets FROM telemetry_points WHERE hour = $1 AND buckets IS NOT"
              " NULL",
              hour);
          if (!bucket_rows) return make_error(std::move(bucket_rows).error());
          for (int i = 0; i < bucket_rows->size(); ++i) {
            decode_buckets_into(bucket_rows->view(i, 1), buckets[bucket_rows->i64(i, 0)]);
          }
          std::vector<int64_t> series, points, last_time;
          std::vector<std::optional<double>> sum, min, max, last, hist_sum;
          std::vector<std::optional<std::string>> blobs;
          for (int i = 0; i < stats->size(); ++i) {
            series.push_back(stats->i64(i, 0));
            points.push_back(stats->i64(i, 1));
            sum.push_back(stats->f64(i, 2));
            min.push_back(stats->f64(i, 3));
            max.push_back(stats->f64(i, 4));
            last_time.push_back(stats->i64(i, 5));
            last.push_back(stats->f64(i, 6));
            if (stats->null(i, 7)) {
              hist_sum.push_back(std::nullopt);
              blobs.push_back(std::nullopt);
            } else {
              hist_sum.push_back(stats->f64(i, 7));
              blobs.push_back(encode_bucket_map(buckets[series.back()]));
            }
          }
          Params params;
          params.add(hour)
              .int8_array(series)
              .int8_array(points)
              .float8_array(sum)
              .float8_array(min)
              .float8_array(max)
              .int8_array(last_time)
              .float8_array(last)
              .float8_array(hist_sum)
              .bytea_array(blobs);
          OUTPOST_TRY(conn.exec(
              "INSERT INTO telemetry_rollups (hour, series_id, points, value_sum, value_min,"
              " value_max, last_time, last_value, hist_sum, buckets) SELECT $1, * FROM"
              " unnest($2::int8[], $3::int8[], $4::float8[], $5::float8[], $6::float8[],"
              " $7::int8[], $8::float8[], $9::float8[], $10::bytea[]) ON CONFLICT (hour,"
              " series_id) DO UPDATE SET points = excluded.points, value_sum ="
              " excluded.value_sum, value_min = excluded.value_min, value_max ="
              " excluded.value_max, last_time = excluded.last_time, last_value ="
              " excluded.last_value, hist_sum = excluded.hist_sum, buckets = excluded.buckets",
              params));
          OUTPOST_TRY(
              conn.query("UPDATE telemetry_state SET rolled_up_hour = $1 WHERE id = 1", hour + 1));
          return HourOutcome{.done = false, .rollups = static_cast<int64_t>(series.size())};
        });
    if (!hour_result) return make_error(std::move(hour_result).error());
    if (hour_result->done) break;
    ++out.hours_rolled_up;
    out.rollups_written += hour_result->rollups;
  }

  // Retention. Raw points go only once their hour is rolled up (always true here: the loop
  // above rolled up everything before the current hour).
  const int64_t raw_cut = std::min(hour_of(now_ms - retention.raw_ms), current_hour);
  const int64_t rollup_cut = hour_of(now_ms - retention.rollup_ms);
  auto expired = pool_.transact(
      Isolation::kReadCommitted, "expiring telemetry",
      [&](Connection& conn) -> Result<TelemetryMaintenanceOutcome> {
        TelemetryMaintenanceOutcome counts;
        OUTPOST_TRY(conn.query("SELECT pg_advisory_xact_lock($1::int4, $2::int4)",
                               kAdvisoryLockClass, kTelemetryRollupLock));
        auto points = conn.query("DELETE FROM telemetry_points WHERE hour < $1", raw_cut);
        if (!points) return make_error(std::move(points).error());
        counts.points_deleted = points->affected();
        auto events = conn.query("DELETE FROM telemetry_events WHERE time < $1", raw_cut * kHourMs);
        if (!events) return make_error(std::move(events).error());
        counts.events_deleted = events->affected();
        auto rollups = conn.query("DELETE FROM telemetry_rollups WHERE hour < $1", rollup_cut);
        if (!rollups) return make_error(std::move(rollups).error());
        counts.rollups_deleted = rollups->affected();
        OUTPOST_TRY(conn.query(
            "UPDATE telemetry_state SET raw_from_hour = GREATEST(raw_from_hour, $1) WHERE id = 1",
            raw_cut));
        return counts;
      });
  if (!expired) return make_error(std::move(expired).error());
  out.points_deleted = expired->points_deleted;
  out.events_deleted = expired->events_deleted;
  out.rollups_deleted = expired->rollups_deleted;
  return out;
}

Result<TelemetryQueryResult> PgTelemetry::query(const TelemetryQuery& q) {
  auto checked = internal::check_telemetry_query(q);
  if (!checked) return make_error(checked.error());
  const telemetry::MetricInfo* metric = *checked;
  const int64_t steps = (q.until_ms - q.since_ms + q.step_ms - 1) / q.step_ms;

  // One snapshot for the state, the series and their points.
  return pool_.transact(
      Isolation::kSnapshotReadOnly, "querying telemetry metric " + q.metric,
      [&](Connection& conn) -> Result<TelemetryQueryResult> {
        auto state =
            conn.query("SELECT rolled_up_hour, raw_from_hour FROM telemetry_state WHERE id = 1");
        if (!state) return make_error(std::move(state).error());
        if (state->empty()) return make_error(Errc::kInternal, "telemetry_state has no row");
        const int64_t rolled = state->i64(0, 0);
        const int64_t raw_from = state->i64(0, 1);

        struct SeriesInfo {
          size_t group = 0;
          std::string device;
        };
        std::unordered_map<int64_t, SeriesInfo> series;
        std::map<std::string, size_t> group_index;
        std::vector<int64_t> ids;
        {
          auto rows = conn.query(
              "SELECT id, device_id, site, deployment, revision, model, version, role, detail"
              " FROM telemetry_series WHERE metric = $1 AND ($2::text IS NULL OR device_id = $2)"
              " AND ($3::text IS NULL OR site = $3) AND ($4::text IS NULL OR deployment = $4)",
              q.metric, q.device, q.site, q.deployment);
          if (!rows) return make_error(std::move(rows).error());
          for (int i = 0; i < rows->size(); ++i) {
            std::string group;
            if (q.by == "device") group = rows->text(i, 1);
            if (q.by == "site") group = rows->text(i, 2);
            if (q.by == "deployment") group = rows->text(i, 3);
            if (q.by == "revision") group = std::to_string(rows->i64(i, 4));
            if (q.by == "model") group = rows->text(i, 5);
            if (q.by == "version") group = rows->text(i, 6);
            if (q.by == "role") group = rows->text(i, 7);
            if (q.by == "detail") group = rows->text(i, 8);
            auto [it, inserted] = group_index.emplace(group, group_index.size());
            series.emplace(rows->i64(i, 0), SeriesInfo{it->second, rows->text(i, 1)});
            ids.push_back(rows->i64(i, 0));
          }
        }
        if (static_cast<int64_t>(group_index.size()) * steps > kMaxQueryCells) {
          return make_error(Errc::kInvalidArgument,
                            "step: " + std::to_string(group_index.size()) + " groups × " +
                                std::to_string(steps) + " steps is over " +
                                std::to_string(kMaxQueryCells) +
                                "; use a larger step, a shorter range or a coarser --by",
                            "step");
        }

        TelemetryQueryResult result;
        result.kind = metric->kind;
        // Groups in the order of their names (the map's order), each with its steps.
        std::vector<size_t> order_of(group_index.size());
        result.series.resize(group_index.size());
        {
          size_t position = 0;
          for (const auto& [name, index] : group_index) {
            order_of[index] = position;
            result.series[position].group = name;
            result.series[position].steps.resize(static_cast<size_t>(steps));
            ++position;
          }
        }
        std::vector<std::set<std::string>> group_devices(group_index.size());
        std::set<std::string> all_devices;
        auto step_of = [&](int64_t time) {
          const int64_t i = time < q.since_ms ? 0 : (time - q.since_ms) / q.step_ms;
          return static_cast<size_t>(std::min(i, steps - 1));
        };
        // Merges `stats` of series `id` into its group's cell of `step`.
        auto merge = [&](int64_t id, size_t step, const TelemetryStats& stats) {
          auto it = series.find(id);
          if (it == series.end()) return;
          const size_t position = order_of[it->second.group];
          result.series[position].steps[step].merge(stats);
          group_devices[position].insert(it->second.device);
          all_devices.insert(it->second.device);
        };

        // Hours before `cut` are answered from rollups (expired raw points, or whole-hour
        // steps over hours rolled up), the others from raw points.
        const bool hourly_steps = q.step_ms % kHourMs == 0 && q.since_ms % kHourMs == 0;
        const int64_t first_hour = hour_of(q.since_ms);
        const int64_t last_hour = hour_of(q.until_ms - 1);
        const int64_t cut = hourly_steps ? std::max(raw_from, rolled) : raw_from;
        if (!series.empty() && first_hour < cut) {
          result.from_rollups = true;
          auto rows = conn.query(
              "SELECT hour, series_id, points, value_sum, value_min, value_max, last_time,"
              " last_value, hist_sum, buckets FROM telemetry_rollups WHERE hour >= $1 AND"
              " hour <= $2 AND series_id = ANY($3::int8[]) ORDER BY hour, series_id",
              first_hour, std::min(last_hour, cut - 1), ids);
          if (!rows) return make_error(std::move(rows).error());
          for (int i = 0; i < rows->size(); ++i) {
            TelemetryStats stats;
            stats.points = rows->i64(i, 2);
            stats.sum = rows->f64(i, 3);
            stats.min = rows->f64(i, 4);
            stats.max = rows->f64(i, 5);
            stats.last_time = rows->i64(i, 6);
            stats.last = rows->f64(i, 7);
            if (!rows->null(i, 8)) {
              stats.count = static_cast<uint64_t>(stats.sum);
              stats.hist_sum = rows->f64(i, 8);
              decode_buckets_into(rows->view(i, 9), stats.buckets);
            }
            merge(rows->i64(i, 1), step_of(rows->i64(i, 0) * kHourMs), stats);
          }
        }
        if (!series.empty() && last_hour >= std::max(first_hour, cut)) {
          // Per series and step on the server; the scalar sums in (time, seq) order, as the
          // SQLite backend adds them.
          auto rows = conn.query(
              "SELECT series_id, LEAST((time - $4) / $6, $7 - 1) AS step, COUNT(*)::int8,"
              " SUM(value ORDER BY time, seq), MIN(value), MAX(value), MAX(time),"
              " (ARRAY_AGG(value ORDER BY time DESC, seq DESC))[1], SUM(sum ORDER BY time, seq),"
              " SUM(value ORDER BY time, seq) FILTER (WHERE sum IS NOT NULL),"
              " ARRAY_AGG(buckets) FILTER (WHERE buckets IS NOT NULL)"
              " FROM telemetry_points WHERE hour >= $1 AND hour <= $2 AND series_id ="
              " ANY($3::int8[]) AND time >= $4 AND time < $5 GROUP BY series_id, step"
              " ORDER BY step, series_id",
              std::max(first_hour, cut), last_hour, ids, q.since_ms, q.until_ms, q.step_ms, steps);
          if (!rows) return make_error(std::move(rows).error());
          for (int i = 0; i < rows->size(); ++i) {
            TelemetryStats stats;
            stats.points = rows->i64(i, 2);
            stats.sum = rows->f64(i, 3);
            stats.min = rows->f64(i, 4);
            stats.max = rows->f64(i, 5);
            stats.last_time = rows->i64(i, 6);
            stats.last = rows->f64(i, 7);
            if (!rows->null(i, 8)) {
              stats.hist_sum = rows->f64(i, 8);
              stats.count = static_cast<uint64_t>(rows->f64(i, 9));
              for_each_element(rows->view(i, 10), [&](std::string_view blob) {
                decode_buckets_into(blob, stats.buckets);
              });
            }
            merge(rows->i64(i, 0), static_cast<size_t>(rows->i64(i, 1)), stats);
          }
        }

        for (size_t i = 0; i < result.series.size(); ++i) {
          TelemetrySeriesResult& s = result.series[i];
          for (const TelemetryStats& cell : s.steps) s.total.merge(cell);
          s.devices.assign(group_devices[i].begin(), group_devices[i].end());
          result.total.merge(s.total);
        }
        // Series the filter matched but that had no point in the range say nothing: leave
        // them out.
        std::erase_if(result.series,
                      [](const TelemetrySeriesResult& s) { return s.total.points == 0; });
        result.devices = static_cast<int64_t>(all_devices.size());
        return result;
      });
}

Result<std::vector<TelemetryTotal>> PgTelemetry::totals() {
  return pool_.autocommit(
      "reading telemetry totals", [&](Connection& conn) -> Result<std::vector<TelemetryTotal>> {
        auto rows = conn.query(
            "SELECT deployment, model, version, role, requests, served, errors, invalid, fallbacks,"
            " latency_count, latency_sum, latency_buckets, confidence_count, confidence_sum,"
            " confidence_buckets FROM telemetry_totals ORDER BY deployment, model, version, role");
        if (!rows) return make_error(std::move(rows).error());
        std::vector<TelemetryTotal> out;
        for (int i = 0; i < rows->size(); ++i) {
          TelemetryTotal t;
          t.deployment = rows->text(i, 0);
          t.model = rows->text(i, 1);
          t.version = rows->text(i, 2);
          t.role = rows->text(i, 3);
          t.requests = static_cast<uint64_t>(rows->i64(i, 4));
          t.served = static_cast<uint64_t>(rows->i64(i, 5));
          t.errors = static_cast<uint64_t>(rows->i64(i, 6));
          t.invalid = static_cast<uint64_t>(rows->i64(i, 7));
          t.fallbacks = static_cast<uint64_t>(rows->i64(i, 8));
          t.latency.count = static_cast<uint64_t>(rows->i64(i, 9));
          t.latency.hist_sum = rows->f64(i, 10);
          decode_buckets_into(rows->view(i, 11), t.latency.buckets);
          t.confidence.count = static_cast<uint64_t>(rows->i64(i, 12));
          t.confidence.hist_sum = rows->f64(i, 13);
          decode_buckets_into(rows->view(i, 14), t.confidence.buckets);
          out.push_back(std::move(t));
        }
        return out;
      });
}

Result<std::vector<TelemetryDeviceState>> PgTelemetry::devices() {
  return pool_.autocommit(
      "reading telemetry device state",
      [&](Connection& conn) -> Result<std::vector<TelemetryDeviceState>> {
        auto rows = conn.query(
            "SELECT device_id, acked_seq, dropped_samples, dropped_health, dropped_aggregates,"
            " dropped_events, last_ingest_at, last_health_at, sync_lag_s, batches, records"
            " FROM telemetry_devices ORDER BY device_id");
        if (!rows) return make_error(std::move(rows).error());
        std::vector<TelemetryDeviceState> out;
        for (int i = 0; i < rows->size(); ++i) {
          TelemetryDeviceState d;
          d.device_id = rows->text(i, 0);
          d.acked_seq = rows->i64(i, 1);
          d.dropped = telemetry::DropCounts{.samples = rows->i64(i, 2),
                                            .health = rows->i64(i, 3),
                                            .aggregates = rows->i64(i, 4),
                                            .events = rows->i64(i, 5)};
          d.last_ingest_at = rows->i64(i, 6);
          d.last_health_at = rows->i64(i, 7);
          d.sync_lag_s = rows->opt_f64(i, 8);
          d.batches = rows->i64(i, 9);
          d.records = rows->i64(i, 10);
          out.push_back(std::move(d));
        }
        return out;
      });
}

}  // namespace outpost::store::postgres
