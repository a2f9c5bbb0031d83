// The telemetry part of the SQLite backend (schema in migrations/0003_telemetry.sql): ingest
// with the per-device exactly-once watermark, hourly rollups and retention, and queries.
// Internal to the store module; SqliteStore owns one and calls it holding its mutex.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "store/store.h"

namespace outpost::store::sqlite {

// Not thread-safe: its owner serializes every call (SqliteStore::mu_), and the connection
// must not be in a transaction when a method is called. Each method opens its own
// transaction(s) on `db` and leaves none open.
class SqliteTelemetry {
 public:
  explicit SqliteTelemetry(sqlite3* db) : db_(db) {}
  ~SqliteTelemetry();
  SqliteTelemetry(const SqliteTelemetry&) = delete;
  SqliteTelemetry& operator=(const SqliteTelemetry&) = delete;

  [[nodiscard]] Result<TelemetryIngestOutcome> ingest(const std::string& device_id,
                                                      const std::string& site,
                                                      const telemetry::Batch& batch,
                                                      int64_t now_ms);
  [[nodiscard]] Result<std::vector<Result<TelemetryIngestOutcome>>> ingest_many(
      const std::vector<TelemetryIngest>& batches, int64_t now_ms);
  [[nodiscard]] Result<TelemetryMaintenanceOutcome> maintain(int64_t now_ms,
                                                             const TelemetryRetention& retention);
  [[nodiscard]] Result<TelemetryQueryResult> query(const TelemetryQuery& query);
  [[nodiscard]] Result<std::vector<TelemetryTotal>> totals();
  [[nodiscard]] Result<std::vector<TelemetryDeviceState>> devices();

 private:
  struct SeriesKey;
  struct TotalsDelta;
  class Stmt;

  // A statement prepared once and kept (the ingest path runs the same few thousands of
  // times a second); keyed by its SQL text, a literal of sqlite_telemetry.cpp.
  [[nodiscard]] Result<sqlite3_stmt*> prepared(std::string_view sql);
  [[nodiscard]] Status exec(const char* sql);
  Error error(int rc, const std::string& doing) const;

  // One batch inside the caller's transaction.
  [[nodiscard]] Result<TelemetryIngestOutcome> ingest_one(const std::string& device_id,
                                                          const std::string& site,
                                                          const telemetry::Batch& batch,
                                                          int64_t now_ms, int64_t rolled_up_hour);
  [[nodiscard]] Result<int64_t> series_id(const SeriesKey& key);
  [[nodiscard]] Status insert_point(int64_t series, int64_t time, int64_t seq, double value,
                                    const telemetry::Histogram* histogram, int64_t rolled_up_hour);
  [[nodiscard]] Status merge_into_rollup(int64_t hour, int64_t series, int64_t time, double value,
                                         const telemetry::Histogram* histogram);
  [[nodiscard]] Status apply_totals(const std::map<std::string, TotalsDelta>& deltas);

  sqlite3* db_;
  std::map<std::string, sqlite3_stmt*, std::less<>> statements_;
  // Series ids by label key (see series_key_text). Entries added in a transaction that rolls
  // back are removed again (pending_series_), so the cache never names a row that is not there.
  std::unordered_map<std::string, int64_t> series_cache_;
  std::vector<std::string> pending_series_;
  std::string key_buffer_;
  std::string blob_buffer_;
};

}  // namespace outpost::store::sqlite
