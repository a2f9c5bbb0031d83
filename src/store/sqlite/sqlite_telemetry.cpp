// Telemetry in SQLite: see sqlite_telemetry.h and migrations/0003_telemetry.sql.
//
// Speed of ingest is what matters here (DESIGN §8: 500k points/s): statements are prepared
// once and reused, a batch is one transaction, series ids come from a memory cache, and the
// points table is clustered by (hour, series) so inserts stay within the current hours' pages.
#include "store/sqlite/sqlite_telemetry.h"
#include "store/internal/telemetry_query.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "store/sqlite/sqlite_errors.h"

namespace outpost::store::sqlite {
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
Errc telemetry_errc(int rc) {
  return (rc & 0xff) == SQLITE_CONSTRAINT ? Errc::kInternal : errc_for(rc);
}

// Histogram buckets as a BLOB: (float64 le, uint64 count) pairs in host byte order
// (little-endian on every platform we build for), le ascending.
void encode_buckets(const std::vector<std::pair<double, uint64_t>>& buckets, std::string& out) {
  out.resize(buckets.size() * 16);
  char* p = out.data();
  for (const auto& [le, count] : buckets) {
    std::memcpy(p, &le, 8);
    std::memcpy(p + 8, &count, 8);
    p += 16;
  }
}

void encode_bucket_map(const std::map<double, uint64_t>& buckets, std::string& out) {
  out.resize(buckets.size() * 16);
  char* p = out.data();
  for (const auto& [le, count] : buckets) {
    std::memcpy(p, &le, 8);
    std::memcpy(p + 8, &count, 8);
    p += 16;
  }
}

void decode_buckets_into(const void* data, int bytes, std::map<double, uint64_t>& out) {
  const char* p = static_cast<const char*>(data);
  for (int i = 0; i + 16 <= bytes; i += 16) {
    double le = 0;
    uint64_t count = 0;
    std::memcpy(&le, p + i, 8);
    std::memcpy(&count, p + i + 8, 8);
    out[le] += count;
  }
}

void add_histogram_to(std::map<double, uint64_t>& into, const telemetry::Histogram& h) {
  for (const auto& [le, count] : h.buckets) into[le] += count;
}

}  // namespace

// Labels of one series; `revision` only for deployment-scoped metrics.
struct SqliteTelemetry::SeriesKey {
  std::string_view device;
  std::string_view site;
  std::string_view metric;
  std::string_view deployment;
  int64_t revision = 0;
  std::string_view model;
  std::string_view version;
  std::string_view role;
  std::string_view detail;
};

// What one batch adds to one (deployment, model, version, role) running total.
struct SqliteTelemetry::TotalsDelta {
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

// Borrows a prepared statement for one use: binds, steps, and resets it (clearing its
// bindings) when it goes out of scope, so no read transaction stays open behind it.
class SqliteTelemetry::Stmt {
 public:
  explicit Stmt(sqlite3_stmt* stmt, bool clear_bindings = true)
      : stmt_(stmt), clear_bindings_(clear_bindings) {}
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt() {
    sqlite3_reset(stmt_);
    if (clear_bindings_) sqlite3_clear_bindings(stmt_);
  }
  Stmt& i64(int index, int64_t value) {
    note(sqlite3_bind_int64(stmt_, index, value));
    return *this;
  }
  Stmt& real(int index, double value) {
    note(sqlite3_bind_double(stmt_, index, value));
    return *this;
  }
  Stmt& text(int index, std::string_view value) {
    note(sqlite3_bind_text64(stmt_, index, value.data() != nullptr ? value.data() : "",
                             value.size(), SQLITE_STATIC, SQLITE_UTF8));
    return *this;
  }
  Stmt& opt_text(int index, const std::optional<std::string>& value) {
    if (!value) {
      note(sqlite3_bind_null(stmt_, index));
      return *this;
    }
    return text(index, *value);
  }
  Stmt& blob(int index, const std::string& value) {
    // A zero-length blob must stay a blob (not NULL): SQLite binds NULL for a null pointer.
    note(sqlite3_bind_blob64(stmt_, index, value.empty() ? "" : value.data(), value.size(),
                             SQLITE_STATIC));
    return *this;
  }
  Stmt& null(int index) {
    note(sqlite3_bind_null(stmt_, index));
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE, or an error code.
  int step() {
    if (bind_rc_ != SQLITE_OK) return bind_rc_;
    return sqlite3_step(stmt_);
  }
  sqlite3_stmt* raw() const { return stmt_; }
  int64_t col_i64(int col) const { return sqlite3_column_int64(stmt_, col); }
  double col_real(int col) const { return sqlite3_column_double(stmt_, col); }
  bool col_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }
  std::string col_text(int col) const {
    const auto* data = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
    return data == nullptr
               ? std::string()
               : std::string(data, static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
  }
  void col_buckets(int col, std::map<double, uint64_t>& out) const {
    const void* data = sqlite3_column_blob(stmt_, col);
    const int bytes = sqlite3_column_bytes(stmt_, col);
    if (data != nullptr) decode_buckets_into(data, bytes, out);
  }

 private:
  void note(int rc) {
    if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  }
  sqlite3_stmt* stmt_;
  bool clear_bindings_;
  int bind_rc_ = SQLITE_OK;
};

namespace {

// Rolls back unless committed, so no error path leaves the connection in a transaction.
class TelemetryTxn {
 public:
  explicit TelemetryTxn(sqlite3* db) : db_(db) {}
  TelemetryTxn(const TelemetryTxn&) = delete;
  TelemetryTxn& operator=(const TelemetryTxn&) = delete;
  ~TelemetryTxn() {
    if (!done_ && sqlite3_get_autocommit(db_) == 0) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }
  void committed() { done_ = true; }

 private:
  sqlite3* db_;
  bool done_ = false;
};

}  // namespace

SqliteTelemetry::~SqliteTelemetry() {
  for (auto& [sql, stmt] : statements_) sqlite3_finalize(stmt);
}

Error SqliteTelemetry::error(int rc, const std::string& doing) const {
  const char* detail =
      sqlite3_extended_errcode(db_) == rc ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
  return Error{telemetry_errc(rc), doing + ": " + detail};
}

Result<sqlite3_stmt*> SqliteTelemetry::prepared(std::string_view sql) {
  if (auto it = statements_.find(sql); it != statements_.end()) return it->second;
  sqlite3_stmt* stmt = nullptr;
  const int rc = sqlite3_prepare_v3(db_, sql.data(), static_cast<int>(sql.size()),
                                    SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
  if (rc != SQLITE_OK) {
    sqlite3_finalize(stmt);
    return make_error(error(rc, "preparing telemetry statement"));
  }
  statements_.emplace(std::string(sql), stmt);
  return stmt;
}

Status SqliteTelemetry::exec(const char* sql) {
  const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) return make_error(error(rc, std::string("telemetry: ") + sql));
  return ok();
}

// Expands to the code that borrows the statement for `sql` as `name`, returning on error.
void SqliteTelemetry::bind_series(Stmt& stmt, const SeriesKey& key) {
  stmt.text(1, key.device)
      .text(2, key.metric)
      .text(3, key.site)
      .text(4, key.deployment)
      .i64(5, key.revision)
      .text(6, key.model)
      .text(7, key.version)
      .text(8, key.role)
      .text(9, key.detail);
}

#define OUTPOST_TELEMETRY_STMT(name, sql)       \
  auto name##_prepared = prepared(sql);         \
  if (!name##_prepared) {                       \
    return make_error(name##_prepared.error()); \
  }                                             \
  Stmt name(*name##_prepared)

Status SqliteTelemetry::run(std::string_view sql) {
  auto stmt = prepared(sql);
  if (!stmt) return make_error(stmt.error());
  const int rc = sqlite3_step(*stmt);
  sqlite3_reset(*stmt);
  if (rc != SQLITE_DONE) return make_error(error(rc, "telemetry: " + std::string(sql)));
  return ok();
}

size_t SqliteTelemetry::SeriesLabelsHash::operator()(const SeriesLabelsView& v) const {
  const std::hash<std::string_view> h;
  size_t seed = h(v.device);
  auto mix = [&seed](size_t value) {
    seed ^= value + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2);
  };
  mix(static_cast<size_t>(v.kind));
  mix(static_cast<size_t>(v.revision));
  for (std::string_view part : {v.site, v.deployment, v.model, v.version, v.role, v.detail}) {
    if (!part.empty()) mix(h(part));
  }
  return seed;
}

SqliteTelemetry::SeriesSlots* SqliteTelemetry::series_slots(const SeriesLabelsView& labels) {
  auto it = series_cache_.find(labels);
  if (it == series_cache_.end())
    it = series_cache_.emplace(SeriesLabels(labels), SeriesSlots{}).first;
  return &it->second;
}

Status SqliteTelemetry::resolve_series(const SeriesKey& key, int64_t& slot) {
  int64_t id = 0;
  {
    OUTPOST_TELEMETRY_STMT(find,
                           "SELECT id FROM telemetry_series WHERE device_id = ?1 AND metric = ?2"
                           " AND site = ?3 AND deployment = ?4 AND revision = ?5 AND model = ?6"
                           " AND version = ?7 AND role = ?8 AND detail = ?9");
    bind_series(find, key);
    const int rc = find.step();
    if (rc == SQLITE_ROW) {
      id = find.col_i64(0);
    } else if (rc != SQLITE_DONE) {
      return make_error(error(rc, "finding telemetry series"));
    }
  }
  if (id == 0) {
    OUTPOST_TELEMETRY_STMT(insert,
                           "INSERT INTO telemetry_series (device_id, metric, site, deployment,"
                           " revision, model, version, role, detail)"
                           " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)");
    bind_series(insert, key);
    const int rc = insert.step();
    if (rc != SQLITE_DONE) return make_error(error(rc, "adding telemetry series"));
    id = sqlite3_last_insert_rowid(db_);
    pending_series_.push_back(&slot);
  }
  slot = id;
  return ok();
}

Status SqliteTelemetry::insert_point(int64_t series, int64_t time, int64_t seq, double value,
                                     const telemetry::Histogram* histogram,
                                     int64_t rolled_up_hour) {
  const int64_t hour = hour_of(time);
  if (insert_point_ == nullptr) {
    auto stmt = prepared(
        "INSERT INTO telemetry_points (hour, series_id, time, seq, value, sum, buckets)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
    if (!stmt) return make_error(stmt.error());
    insert_point_ = *stmt;
  }
  {
    // Every parameter is bound on every use (6 and 7 to NULL for plain values), so the
    // bindings need no clearing.
    Stmt insert(insert_point_, /*clear_bindings=*/false);
    insert.i64(1, hour).i64(2, series).i64(3, time).i64(4, seq).real(5, value);
    if (histogram != nullptr) {
      encode_buckets(histogram->buckets, blob_buffer_);
      insert.real(6, histogram->sum).blob(7, blob_buffer_);
    } else {
      insert.null(6).null(7);
    }
    const int rc = insert.step();
    if (rc != SQLITE_DONE) return make_error(error(rc, "storing telemetry point"));
  }
  // Late data (a device that was offline) for an hour already rolled up goes into the
  // rollup too, or queries of that hour would never see it.
  if (hour < rolled_up_hour) {
    OUTPOST_TRY(merge_into_rollup(hour, series, time, value, histogram));
  }
  return ok();
}

Status SqliteTelemetry::merge_into_rollup(int64_t hour, int64_t series, int64_t time, double value,
                                          const telemetry::Histogram* histogram) {
  TelemetryStats stats;
  {
    OUTPOST_TELEMETRY_STMT(read,
                           "SELECT points, value_sum, value_min, value_max, last_time, last_value,"
                           " hist_sum, buckets FROM telemetry_rollups WHERE hour = ?1 AND"
                           " series_id = ?2");
    read.i64(1, hour).i64(2, series);
    const int rc = read.step();
    if (rc == SQLITE_ROW) {
      stats.points = read.col_i64(0);
      stats.sum = read.col_real(1);
      stats.min = read.col_real(2);
      stats.max = read.col_real(3);
      stats.last_time = read.col_i64(4);
      stats.last = read.col_real(5);
      stats.hist_sum = read.col_null(6) ? 0 : read.col_real(6);
      read.col_buckets(7, stats.buckets);
    } else if (rc != SQLITE_DONE) {
      return make_error(error(rc, "reading telemetry rollup"));
    }
  }
  if (histogram != nullptr) {
    stats.add_histogram(time, histogram->count, histogram->sum, histogram->buckets);
  } else {
    stats.add_value(time, value);
  }
  return write_rollup(hour, series, stats, histogram != nullptr);
}

Status SqliteTelemetry::write_rollup(int64_t hour, int64_t series, const TelemetryStats& stats,
                                     bool histogram) {
  OUTPOST_TELEMETRY_STMT(write,
                         "INSERT OR REPLACE INTO telemetry_rollups (hour, series_id, points,"
                         " value_sum, value_min, value_max, last_time, last_value, hist_sum,"
                         " buckets) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)");
  write.i64(1, hour)
      .i64(2, series)
      .i64(3, stats.points)
      .real(4, stats.sum)
      .real(5, stats.min)
      .real(6, stats.max)
      .i64(7, stats.last_time)
      .real(8, stats.last);
  if (histogram) {
    encode_bucket_map(stats.buckets, blob_buffer_);
    write.real(9, stats.hist_sum).blob(10, blob_buffer_);
  }
  const int rc = write.step();
  if (rc != SQLITE_DONE) return make_error(error(rc, "writing telemetry rollup"));
  return ok();
}

Status SqliteTelemetry::apply_totals(const std::map<std::string, TotalsDelta>& deltas) {
  for (const auto& [key, d] : deltas) {
    std::map<double, uint64_t> latency = d.latency;
    std::map<double, uint64_t> confidence = d.confidence;
    {
      OUTPOST_TELEMETRY_STMT(read,
                             "SELECT latency_buckets, confidence_buckets FROM telemetry_totals"
                             " WHERE deployment = ?1 AND model = ?2 AND version = ?3 AND"
                             " role = ?4");
      read.text(1, d.deployment).text(2, d.model).text(3, d.version).text(4, d.role);
      const int rc = read.step();
      if (rc == SQLITE_ROW) {
        read.col_buckets(0, latency);
        read.col_buckets(1, confidence);
      } else if (rc != SQLITE_DONE) {
        return make_error(error(rc, "reading telemetry totals"));
      }
    }
    std::string latency_blob;
    std::string confidence_blob;
    encode_bucket_map(latency, latency_blob);
    encode_bucket_map(confidence, confidence_blob);
    OUTPOST_TELEMETRY_STMT(
        write,
        "INSERT INTO telemetry_totals (deployment, model, version, role, requests, served, errors,"
        " invalid, fallbacks, latency_count, latency_sum, latency_buckets, confidence_count,"
        " confidence_sum, confidence_buckets)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
        " ON CONFLICT (deployment, model, version, role) DO UPDATE SET"
        " requests = requests + excluded.requests, served = served + excluded.served,"
        " errors = errors + excluded.errors, invalid = invalid + excluded.invalid,"
        " fallbacks = fallbacks + excluded.fallbacks,"
        " latency_count = latency_count + excluded.latency_count,"
        " latency_sum = latency_sum + excluded.latency_sum,"
        " latency_buckets = excluded.latency_buckets,"
        " confidence_count = confidence_count + excluded.confidence_count,"
        " confidence_sum = confidence_sum + excluded.confidence_sum,"
        " confidence_buckets = excluded.confidence_buckets");
    write.text(1, d.deployment)
        .text(2, d.model)
        .text(3, d.version)
        .text(4, d.role)
        .i64(5, static_cast<int64_t>(d.requests))
        .i64(6, static_cast<int64_t>(d.served))
        .i64(7, static_cast<int64_t>(d.errors))
        .i64(8, static_cast<int64_t>(d.invalid))
        .i64(9, static_cast<int64_t>(d.fallbacks))
        .i64(10, static_cast<int64_t>(d.latency_count))
        .real(11, d.latency_sum)
        .blob(12, latency_blob)
        .i64(13, static_cast<int64_t>(d.confidence_count))
        .real(14, d.confidence_sum)
        .blob(15, confidence_blob);
    const int rc = write.step();
    if (rc != SQLITE_DONE) return make_error(error(rc, "updating telemetry totals"));
  }
  return ok();
}

void SqliteTelemetry::forget_transaction() {
  for (int64_t* slot : pending_series_) *slot = 0;
  pending_series_.clear();
  // Dropped rather than restored: the next batch of these devices reads its row again.
  for (const auto& [id, row] : txn_devices_) devices_.erase(id);
  txn_devices_.clear();
}

Result<SqliteTelemetry::DeviceRow*> SqliteTelemetry::device_row(const std::string& device_id) {
  if (auto it = txn_devices_.find(device_id); it != txn_devices_.end()) return &it->second;
  DeviceRow row;
  if (auto it = devices_.find(device_id); it != devices_.end()) {
    row = it->second;
  } else {
    OUTPOST_TELEMETRY_STMT(read,
                           "SELECT acked_seq, dropped_samples, dropped_health, dropped_aggregates,"
                           " dropped_events, last_ingest_at, last_health_at, sync_lag_s, batches,"
                           " records FROM telemetry_devices WHERE device_id = ?1");
    read.text(1, device_id);
    const int rc = read.step();
    if (rc == SQLITE_ROW) {
      row.exists = true;
      row.acked_seq = read.col_i64(0);
      row.dropped = telemetry::DropCounts{.samples = read.col_i64(1),
                                          .health = read.col_i64(2),
                                          .aggregates = read.col_i64(3),
                                          .events = read.col_i64(4)};
      row.last_ingest_at = read.col_i64(5);
      row.last_health_at = read.col_i64(6);
      if (!read.col_null(7)) row.sync_lag_s = read.col_real(7);
      row.batches = read.col_i64(8);
      row.records = read.col_i64(9);
    } else if (rc != SQLITE_DONE) {
      return make_error(error(rc, "reading telemetry watermark"));
    }
  }
  return &txn_devices_.emplace(device_id, row).first->second;
}

Status SqliteTelemetry::write_device_rows() {
  for (const auto& [id, row] : txn_devices_) {
    if (!row.dirty) continue;
    OUTPOST_TELEMETRY_STMT(
        write,
        "INSERT OR REPLACE INTO telemetry_devices (device_id, acked_seq, dropped_samples,"
        " dropped_health, dropped_aggregates, dropped_events, last_ingest_at, last_health_at,"
        " sync_lag_s, batches, records) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)");
    write.text(1, id)
        .i64(2, row.acked_seq)
        .i64(3, row.dropped.samples)
        .i64(4, row.dropped.health)
        .i64(5, row.dropped.aggregates)
        .i64(6, row.dropped.events)
        .i64(7, row.last_ingest_at)
        .i64(8, row.last_health_at)
        .i64(10, row.batches)
        .i64(11, row.records);
    if (row.sync_lag_s) {
      write.real(9, *row.sync_lag_s);
    } else {
      write.null(9);
    }
    const int rc = write.step();
    if (rc != SQLITE_DONE) return make_error(error(rc, "updating telemetry watermark"));
  }
  return ok();
}

Result<std::vector<Result<TelemetryIngestOutcome>>> SqliteTelemetry::ingest_many(
    const std::vector<TelemetryIngest>& batches, int64_t now_ms) {
  // First without savepoints: the decoder checked every record, so a batch rarely fails, and a
  // savepoint per batch costs more than the batch (SQLite copies each page the batch touches
  // into a statement journal). After a failure, the same again with savepoints, so that a
  // failing batch fails alone.
  auto fast = ingest_transaction(batches, now_ms, false);
  if (fast || batches.size() <= 1) return fast;
  return ingest_transaction(batches, now_ms, true);
}

Result<std::vector<Result<TelemetryIngestOutcome>>> SqliteTelemetry::ingest_transaction(
    const std::vector<TelemetryIngest>& batches, int64_t now_ms, bool savepoints) {
  bool committed = false;
  auto result = [&]() -> Result<std::vector<Result<TelemetryIngestOutcome>>> {
    OUTPOST_TRY(run("BEGIN IMMEDIATE"));
    TelemetryTxn txn(db_);
    {
      // The caches hold what this connection committed; another connection's commit (an
      // operator's tool on the same file) makes them stale.
      OUTPOST_TELEMETRY_STMT(read, "PRAGMA data_version");
      const int rc = read.step();
      if (rc != SQLITE_ROW) return make_error(error(rc, "reading the data version"));
      if (read.col_i64(0) != data_version_) {
        data_version_ = read.col_i64(0);
        devices_.clear();
        series_cache_.clear();
      }
    }
    int64_t rolled_up_hour = 0;
    {
      OUTPOST_TELEMETRY_STMT(read, "SELECT rolled_up_hour FROM telemetry_state WHERE id = 1");
      const int rc = read.step();
      if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry state"));
      rolled_up_hour = read.col_i64(0);
    }
    std::vector<Result<TelemetryIngestOutcome>> outcomes;
    outcomes.reserve(batches.size());
    // The fleet totals move once per transaction, by what its batches add up to.
    std::map<std::string, TotalsDelta> totals;
    std::map<std::string, TotalsDelta> batch_totals;
    for (const TelemetryIngest& in : batches) {
      batch_totals.clear();
      const size_t pending_before = pending_series_.size();
      if (savepoints) OUTPOST_TRY(run("SAVEPOINT telemetry_batch"));
      // A failing batch leaves its device's row as it was (ingest_one changes it last).
      auto one = ingest_one(in.device_id, in.site, *in.batch, now_ms, rolled_up_hour, batch_totals);
      if (one) {
        if (savepoints) OUTPOST_TRY(run("RELEASE telemetry_batch"));
        for (auto& [key, delta] : batch_totals) totals[key].add(delta);
      } else if (savepoints) {
        OUTPOST_TRY(run("ROLLBACK TO telemetry_batch"));
        OUTPOST_TRY(run("RELEASE telemetry_batch"));
        for (size_t i = pending_before; i < pending_series_.size(); ++i) *pending_series_[i] = 0;
        pending_series_.resize(pending_before);
      } else if (batches.size() > 1) {
        return make_error(one.error());  // the caller tries again with savepoints
      } else {
        outcomes.push_back(std::move(one));
        return outcomes;  // nothing to commit: the transaction rolls back
      }
      outcomes.push_back(std::move(one));
    }
    OUTPOST_TRY(write_device_rows());
    OUTPOST_TRY(apply_totals(totals));
    OUTPOST_TRY(run("COMMIT"));
    txn.committed();
    committed = true;
    return outcomes;
  }();
  if (committed) {
    pending_series_.clear();
    for (auto& [id, row] : txn_devices_) {
      row.dirty = false;
      devices_.insert_or_assign(id, std::move(row));
    }
    txn_devices_.clear();
  } else {
    forget_transaction();
  }
  return result;
}

Result<TelemetryIngestOutcome> SqliteTelemetry::ingest(const std::string& device_id,
                                                       const std::string& site,
                                                       const telemetry::Batch& batch,
                                                       int64_t now_ms) {
  std::vector<TelemetryIngest> one{TelemetryIngest{device_id, site, &batch}};
  auto outcomes = ingest_many(one, now_ms);
  if (!outcomes) return make_error(outcomes.error());
  return std::move(outcomes->front());
}

namespace {

// Record kinds of SeriesLabelsView::kind, and the metric of each slot of SeriesSlots.
enum SeriesKind { kHealthSeries = 1, kInferenceSeries, kSampleSeries, kEventSeries };
constexpr std::array<std::string_view, 10> kHealthMetrics = {
    "cpu_percent",         "memory_used_bytes", "memory_total_bytes", "disk_free_bytes",
    "disk_total_bytes",    "uptime_seconds",    "agent_rss_bytes",    "telemetry_buffer_bytes",
    "temperature_celsius", "sync_lag_seconds"};
constexpr std::array<std::string_view, 6> kInferenceMetrics = {
    "inference_requests",  "inference_errors",          "inference_invalid",
    "inference_fallbacks", "inference_latency_seconds", "inference_confidence"};

}  // namespace

Result<TelemetryIngestOutcome> SqliteTelemetry::ingest_one(
    const std::string& device_id, const std::string& site, const telemetry::Batch& batch,
    int64_t now_ms, int64_t rolled_up_hour, std::map<std::string, TotalsDelta>& totals) {
  auto row_or = device_row(device_id);
  if (!row_or) return make_error(row_or.error());
  DeviceRow& row = **row_or;
  const int64_t watermark = row.acked_seq;
  int64_t last_health_at = row.last_health_at;

  TelemetryIngestOutcome out;
  std::optional<double> sync_lag;
  bool health_seen = false;
  SeriesSlots* health = nullptr;  // the device's health series, found on its first record
  // Stores one point of the series in `slot` of `slots` (labels `labels`, metric `metric`).
  auto point = [&](SeriesSlots& slots, size_t slot, std::string_view metric,
                   const SeriesLabelsView& labels, const telemetry::Record& r, double value,
                   const telemetry::Histogram* histogram = nullptr) -> Status {
    int64_t& id = slots.ids[slot];
    if (id == 0) {
      OUTPOST_TRY(resolve_series(SeriesKey{.device = labels.device,
                                           .site = labels.site,
                                           .metric = metric,
                                           .deployment = labels.deployment,
                                           .revision = labels.revision,
                                           .model = labels.model,
                                           .version = labels.version,
                                           .role = labels.role,
                                           .detail = labels.detail},
                                 id));
    }
    OUTPOST_TRY(insert_point(id, r.time, r.seq, value, histogram, rolled_up_hour));
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
      const SeriesLabelsView labels{.device = device_id, .site = site, .kind = kHealthSeries};
      if (health == nullptr) health = series_slots(labels);
      const double gauges[8] = {h->cpu_percent,
                                static_cast<double>(h->mem_used),
                                static_cast<double>(h->mem_total),
                                static_cast<double>(h->disk_free),
                                static_cast<double>(h->disk_total),
                                h->uptime_s,
                                static_cast<double>(h->agent_rss),
                                static_cast<double>(h->buffer_bytes)};
      for (size_t i = 0; i < 8; ++i) {
        OUTPOST_TRY(point(*health, i, kHealthMetrics[i], labels, r, gauges[i]));
      }
      if (h->temp_c) OUTPOST_TRY(point(*health, 8, kHealthMetrics[8], labels, r, *h->temp_c));
      if (h->sync_lag_s) {
        OUTPOST_TRY(point(*health, 9, kHealthMetrics[9], labels, r, *h->sync_lag_s));
      }
      if (r.time >= last_health_at) {
        last_health_at = r.time;
        sync_lag = h->sync_lag_s;
        health_seen = true;
      }
    } else if (const auto* e = std::get_if<telemetry::EventRecord>(&r.body)) {
      {
        OUTPOST_TELEMETRY_STMT(insert,
                               "INSERT INTO telemetry_events (device_id, seq, time, deployment,"
                               " revision, event, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
        insert.text(1, device_id)
            .i64(2, r.seq)
            .i64(3, r.time)
            .text(4, e->deployment)
            .i64(5, e->revision)
            .text(6, e->event)
            .text(7, e->message);
        const int rc = insert.step();
        if (rc != SQLITE_DONE) return make_error(error(rc, "storing telemetry event"));
      }
      const SeriesLabelsView labels{.device = device_id,
                                    .site = site,
                                    .kind = kEventSeries,
                                    .deployment = e->deployment,
                                    .revision = e->revision,
                                    .detail = e->event};
      OUTPOST_TRY(point(*series_slots(labels), 0, "events", labels, r, 1));
    } else if (const auto* inf = std::get_if<telemetry::InferenceRecord>(&r.body)) {
      const SeriesLabelsView labels{.device = device_id,
                                    .site = site,
                                    .kind = kInferenceSeries,
                                    .deployment = inf->deployment,
                                    .revision = inf->revision,
                                    .model = inf->model,
                                    .version = inf->version,
                                    .role = inf->role};
      SeriesSlots& slots = *series_slots(labels);
      OUTPOST_TRY(
          point(slots, 0, kInferenceMetrics[0], labels, r, static_cast<double>(inf->served)));
      OUTPOST_TRY(
          point(slots, 1, kInferenceMetrics[1], labels, r, static_cast<double>(inf->errors)));
      OUTPOST_TRY(
          point(slots, 2, kInferenceMetrics[2], labels, r, static_cast<double>(inf->invalid)));
      OUTPOST_TRY(
          point(slots, 3, kInferenceMetrics[3], labels, r, static_cast<double>(inf->fallbacks)));
      OUTPOST_TRY(point(slots, 4, kInferenceMetrics[4], labels, r,
                        static_cast<double>(inf->latency.count), &inf->latency));
      OUTPOST_TRY(point(slots, 5, kInferenceMetrics[5], labels, r,
                        static_cast<double>(inf->confidence.count), &inf->confidence));

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
      const SeriesLabelsView labels{.device = device_id,
                                    .site = site,
                                    .kind = kSampleSeries,
                                    .deployment = s->deployment,
                                    .revision = s->revision,
                                    .model = s->model,
                                    .version = s->version,
                                    .role = s->role,
                                    .detail = s->outcome};
      OUTPOST_TRY(
          point(*series_slots(labels), 0, "sample_latency_seconds", labels, r, s->latency_s));
    }
  }

  // The device's row changes last, only once the batch is stored (as the upsert of one
  // statement did). Drop counts are cumulative on the device: only a batch newer than
  // anything stored brings newer ones (a replayed old batch must not move them back).
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

Result<TelemetryMaintenanceOutcome> SqliteTelemetry::maintain(int64_t now_ms,
                                                              const TelemetryRetention& retention) {
  TelemetryMaintenanceOutcome out;
  const int64_t current_hour = hour_of(now_ms);
  // One transaction per hour rolled up, so the store's lock is never held for long.
  while (true) {
    OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
    TelemetryTxn txn(db_);
    int64_t rolled = 0;
    {
      OUTPOST_TELEMETRY_STMT(read, "SELECT rolled_up_hour FROM telemetry_state WHERE id = 1");
      const int rc = read.step();
      if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry state"));
      rolled = read.col_i64(0);
    }
    // The next hour that has points: empty hours are skipped in one step.
    std::optional<int64_t> next;
    {
      OUTPOST_TELEMETRY_STMT(read, "SELECT MIN(hour) FROM telemetry_points WHERE hour >= ?1");
      read.i64(1, rolled);
      const int rc = read.step();
      if (rc != SQLITE_ROW) return make_error(error(rc, "finding the next telemetry hour"));
      if (!read.col_null(0)) next = read.col_i64(0);
    }
    if (!next || *next >= current_hour) {
      if (rolled < current_hour) {
        OUTPOST_TELEMETRY_STMT(write,
                               "UPDATE telemetry_state SET rolled_up_hour = ?1 WHERE id = 1");
        write.i64(1, current_hour);
        const int rc = write.step();
        if (rc != SQLITE_DONE) return make_error(error(rc, "advancing telemetry rollups"));
      }
      OUTPOST_TRY(exec("COMMIT"));
      txn.committed();
      break;
    }
    const int64_t hour = *next;
    {
      OUTPOST_TELEMETRY_STMT(read,
                             "SELECT series_id, time, value, sum, buckets FROM telemetry_points"
                             " WHERE hour = ?1 ORDER BY series_id, time, seq");
      read.i64(1, hour);
      int64_t current = -1;
      TelemetryStats stats;
      bool histogram = false;
      auto flush = [&]() -> Status {
        if (current < 0) return ok();
        OUTPOST_TRY(write_rollup(hour, current, stats, histogram));
        ++out.rollups_written;
        return ok();
      };
      while (true) {
        const int rc = read.step();
        if (rc == SQLITE_DONE) break;
        if (rc != SQLITE_ROW) return make_error(error(rc, "rolling up telemetry"));
        const int64_t series = read.col_i64(0);
        if (series != current) {
          OUTPOST_TRY(flush());
          current = series;
          stats = TelemetryStats{};
          histogram = false;
        }
        const int64_t time = read.col_i64(1);
        const double value = read.col_real(2);
        if (!read.col_null(3)) {
          histogram = true;
          stats.add_value(time, value);
          stats.count += static_cast<uint64_t>(value);
          stats.hist_sum += read.col_real(3);
          read.col_buckets(4, stats.buckets);
        } else {
          stats.add_value(time, value);
        }
      }
      OUTPOST_TRY(flush());
    }
    {
      OUTPOST_TELEMETRY_STMT(write, "UPDATE telemetry_state SET rolled_up_hour = ?1 WHERE id = 1");
      write.i64(1, hour + 1);
      const int rc = write.step();
      if (rc != SQLITE_DONE) return make_error(error(rc, "advancing telemetry rollups"));
    }
    OUTPOST_TRY(exec("COMMIT"));
    txn.committed();
    ++out.hours_rolled_up;
  }

  // Retention. Raw points go only once their hour is rolled up (always true here: the loop
  // above rolled up everything before the current hour).
  OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
  TelemetryTxn txn(db_);
  const int64_t raw_cut = std::min(hour_of(now_ms - retention.raw_ms), current_hour);
  const int64_t rollup_cut = hour_of(now_ms - retention.rollup_ms);
  auto run = [&](std::string_view sql, int64_t bound, int64_t& count) -> Status {
    auto stmt = prepared(sql);
    if (!stmt) return make_error(stmt.error());
    Stmt s(*stmt);
    s.i64(1, bound);
    const int rc = s.step();
    if (rc != SQLITE_DONE) return make_error(error(rc, "expiring telemetry"));
    count += sqlite3_changes(db_);
    return ok();
  };
  OUTPOST_TRY(run("DELETE FROM telemetry_points WHERE hour < ?1", raw_cut, out.points_deleted));
  OUTPOST_TRY(
      run("DELETE FROM telemetry_events WHERE time < ?1", raw_cut * kHourMs, out.events_deleted));
  OUTPOST_TRY(
      run("DELETE FROM telemetry_rollups WHERE hour < ?1", rollup_cut, out.rollups_deleted));
  int64_t ignored = 0;
  OUTPOST_TRY(run("UPDATE telemetry_state SET raw_from_hour = MAX(raw_from_hour, ?1) WHERE id = 1",
                  raw_cut, ignored));
  OUTPOST_TRY(exec("COMMIT"));
  txn.committed();
  return out;
}

Result<TelemetryQueryResult> SqliteTelemetry::query(const TelemetryQuery& q) {
  auto checked = internal::check_telemetry_query(q);
  if (!checked) return make_error(checked.error());
  const telemetry::MetricInfo* metric = *checked;
  const int64_t steps = (q.until_ms - q.since_ms + q.step_ms - 1) / q.step_ms;

  OUTPOST_TRY(exec("BEGIN"));
  TelemetryTxn txn(db_);
  int64_t rolled = 0;
  int64_t raw_from = 0;
  {
    OUTPOST_TELEMETRY_STMT(
        read, "SELECT rolled_up_hour, raw_from_hour FROM telemetry_state WHERE id = 1");
    const int rc = read.step();
    if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry state"));
    rolled = read.col_i64(0);
    raw_from = read.col_i64(1);
  }

  struct SeriesInfo {
    size_t group = 0;
    std::string device;
  };
  std::unordered_map<int64_t, SeriesInfo> series;
  std::map<std::string, size_t> group_index;
  {
    OUTPOST_TELEMETRY_STMT(read,
                           "SELECT id, device_id, site, deployment, revision, model, version, role,"
                           " detail FROM telemetry_series WHERE metric = ?1"
                           " AND (?2 IS NULL OR device_id = ?2) AND (?3 IS NULL OR site = ?3)"
                           " AND (?4 IS NULL OR deployment = ?4)");
    read.text(1, q.metric).opt_text(2, q.device).opt_text(3, q.site).opt_text(4, q.deployment);
    while (true) {
      const int rc = read.step();
      if (rc == SQLITE_DONE) break;
      if (rc != SQLITE_ROW) return make_error(error(rc, "finding telemetry series"));
      std::string group;
      if (q.by == "device") group = read.col_text(1);
      if (q.by == "site") group = read.col_text(2);
      if (q.by == "deployment") group = read.col_text(3);
      if (q.by == "revision") group = std::to_string(read.col_i64(4));
      if (q.by == "model") group = read.col_text(5);
      if (q.by == "version") group = read.col_text(6);
      if (q.by == "role") group = read.col_text(7);
      if (q.by == "detail") group = read.col_text(8);
      auto [it, inserted] = group_index.emplace(group, group_index.size());
      series.emplace(read.col_i64(0), SeriesInfo{it->second, read.col_text(1)});
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
  auto target = [&](int64_t series_id) -> std::pair<TelemetrySeriesResult*, const SeriesInfo*> {
    auto it = series.find(series_id);
    if (it == series.end()) return {nullptr, nullptr};
    const size_t position = order_of[it->second.group];
    return {&result.series[position], &it->second};
  };
  auto note_device = [&](const SeriesInfo& info) {
    group_devices[order_of[info.group]].insert(info.device);
    all_devices.insert(info.device);
  };

  // Few series: seek each one per hour; many (fleet-wide): scan the hour once and filter.
  const bool seek_each = series.size() <= 256;
  const bool hourly_steps = q.step_ms % kHourMs == 0 && q.since_ms % kHourMs == 0;
  const int64_t first_hour = hour_of(q.since_ms);
  const int64_t last_hour = hour_of(q.until_ms - 1);

  auto read_raw_row = [&](Stmt& s) {
    auto [out, info] = target(s.col_i64(0));
    if (out == nullptr) return;
    const int64_t time = s.col_i64(1);
    TelemetryStats& cell = out->steps[step_of(time)];
    const double value = s.col_real(2);
    if (!s.col_null(3)) {
      cell.add_value(time, value);
      cell.count += static_cast<uint64_t>(value);
      cell.hist_sum += s.col_real(3);
      s.col_buckets(4, cell.buckets);
    } else {
      cell.add_value(time, value);
    }
    note_device(*info);
  };
  auto read_rollup_row = [&](Stmt& s, int64_t hour) {
    auto [out, info] = target(s.col_i64(0));
    if (out == nullptr) return;
    TelemetryStats stats;
    stats.points = s.col_i64(1);
    stats.sum = s.col_real(2);
    stats.min = s.col_real(3);
    stats.max = s.col_real(4);
    stats.last_time = s.col_i64(5);
    stats.last = s.col_real(6);
    if (!s.col_null(7)) {
      stats.count = static_cast<uint64_t>(stats.sum);
      stats.hist_sum = s.col_real(7);
      s.col_buckets(8, stats.buckets);
    }
    out->steps[step_of(hour * kHourMs)].merge(stats);
    note_device(*info);
  };

  for (int64_t hour = first_hour; hour <= last_hour && !series.empty(); ++hour) {
    const bool from_rollups = hour < raw_from || (hourly_steps && hour < rolled);
    result.from_rollups = result.from_rollups || from_rollups;
    if (from_rollups) {
      if (seek_each) {
        OUTPOST_TELEMETRY_STMT(read,
                               "SELECT series_id, points, value_sum, value_min, value_max,"
                               " last_time, last_value, hist_sum, buckets FROM telemetry_rollups"
                               " WHERE hour = ?1 AND series_id = ?2");
        for (const auto& [id, info] : series) {
          read.i64(1, hour).i64(2, id);
          const int rc = read.step();
          if (rc == SQLITE_ROW) read_rollup_row(read, hour);
          if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
            return make_error(error(rc, "reading telemetry rollups"));
          }
          sqlite3_reset(read.raw());
        }
      } else {
        OUTPOST_TELEMETRY_STMT(read,
                               "SELECT series_id, points, value_sum, value_min, value_max,"
                               " last_time, last_value, hist_sum, buckets FROM telemetry_rollups"
                               " WHERE hour = ?1");
        read.i64(1, hour);
        while (true) {
          const int rc = read.step();
          if (rc == SQLITE_DONE) break;
          if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry rollups"));
          read_rollup_row(read, hour);
        }
      }
      continue;
    }
    if (seek_each) {
      OUTPOST_TELEMETRY_STMT(read,
                             "SELECT series_id, time, value, sum, buckets FROM telemetry_points"
                             " WHERE hour = ?1 AND series_id = ?2 AND time >= ?3 AND time < ?4");
      for (const auto& [id, info] : series) {
        read.i64(1, hour).i64(2, id).i64(3, q.since_ms).i64(4, q.until_ms);
        while (true) {
          const int rc = read.step();
          if (rc == SQLITE_DONE) break;
          if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry points"));
          read_raw_row(read);
        }
        sqlite3_reset(read.raw());
      }
    } else {
      OUTPOST_TELEMETRY_STMT(read,
                             "SELECT series_id, time, value, sum, buckets FROM telemetry_points"
                             " WHERE hour = ?1 AND time >= ?2 AND time < ?3");
      read.i64(1, hour).i64(2, q.since_ms).i64(3, q.until_ms);
      while (true) {
        const int rc = read.step();
        if (rc == SQLITE_DONE) break;
        if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry points"));
        read_raw_row(read);
      }
    }
  }
  OUTPOST_TRY(exec("COMMIT"));
  txn.committed();

  for (size_t i = 0; i < result.series.size(); ++i) {
    TelemetrySeriesResult& s = result.series[i];
    for (const TelemetryStats& cell : s.steps) s.total.merge(cell);
    s.devices.assign(group_devices[i].begin(), group_devices[i].end());
    result.total.merge(s.total);
  }
  // Series the filter matched but that had no point in the range say nothing: leave them out.
  std::erase_if(result.series, [](const TelemetrySeriesResult& s) { return s.total.points == 0; });
  result.devices = static_cast<int64_t>(all_devices.size());
  return result;
}

Result<std::vector<TelemetryTotal>> SqliteTelemetry::totals() {
  OUTPOST_TELEMETRY_STMT(read,
                         "SELECT deployment, model, version, role, requests, served, errors,"
                         " invalid, fallbacks, latency_count, latency_sum, latency_buckets,"
                         " confidence_count, confidence_sum, confidence_buckets"
                         " FROM telemetry_totals ORDER BY deployment, model, version, role");
  std::vector<TelemetryTotal> out;
  while (true) {
    const int rc = read.step();
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry totals"));
    TelemetryTotal t;
    t.deployment = read.col_text(0);
    t.model = read.col_text(1);
    t.version = read.col_text(2);
    t.role = read.col_text(3);
    t.requests = static_cast<uint64_t>(read.col_i64(4));
    t.served = static_cast<uint64_t>(read.col_i64(5));
    t.errors = static_cast<uint64_t>(read.col_i64(6));
    t.invalid = static_cast<uint64_t>(read.col_i64(7));
    t.fallbacks = static_cast<uint64_t>(read.col_i64(8));
    t.latency.count = static_cast<uint64_t>(read.col_i64(9));
    t.latency.hist_sum = read.col_real(10);
    read.col_buckets(11, t.latency.buckets);
    t.confidence.count = static_cast<uint64_t>(read.col_i64(12));
    t.confidence.hist_sum = read.col_real(13);
    read.col_buckets(14, t.confidence.buckets);
    out.push_back(std::move(t));
  }
  return out;
}

Result<std::vector<TelemetryDeviceState>> SqliteTelemetry::devices() {
  OUTPOST_TELEMETRY_STMT(read,
                         "SELECT device_id, acked_seq, dropped_samples, dropped_health,"
                         " dropped_aggregates, dropped_events, last_ingest_at, last_health_at,"
                         " sync_lag_s, batches, records FROM telemetry_devices ORDER BY device_id");
  std::vector<TelemetryDeviceState> out;
  while (true) {
    const int rc = read.step();
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) return make_error(error(rc, "reading telemetry device state"));
    TelemetryDeviceState d;
    d.device_id = read.col_text(0);
    d.acked_seq = read.col_i64(1);
    d.dropped = telemetry::DropCounts{.samples = read.col_i64(2),
                                      .health = read.col_i64(3),
                                      .aggregates = read.col_i64(4),
                                      .events = read.col_i64(5)};
    d.last_ingest_at = read.col_i64(6);
    d.last_health_at = read.col_i64(7);
    if (!read.col_null(8)) d.sync_lag_s = read.col_real(8);
    d.batches = read.col_i64(9);
    d.records = read.col_i64(10);
    out.push_back(std::move(d));
  }
  return out;
}

#undef OUTPOST_TELEMETRY_STMT

}  // namespace outpost::store::sqlite
