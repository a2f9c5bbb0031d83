// The telemetry part of the PostgreSQL backend (schema in migrations/postgres/0003_telemetry.sql):
// ingest with the per-device exactly-once watermark, hourly rollups and retention, and queries,
// with the same outcomes as the SQLite backend's, and correct with several servers ingesting
// into one database. Internal to the store module; PostgresStore owns one.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "store/postgres/pg_connection.h"
#include "store/store.h"

namespace outpost::store::postgres {

// Thread-safe: every call borrows its own connection from the pool.
//
// Concurrency with other writers, in this process or another:
//  - an ingest transaction locks the telemetry_devices rows of its batches' devices (in id
//    order, inserting a placeholder row for a device never seen), so batches of one device are
//    stored one after the other and each sees the watermark the one before left; the fleet
//    totals rows are locked (in key order) before they are read and merged;
//  - ingest holds the rollup advisory lock shared and rollups and retention hold it exclusive,
//    so an hour is never rolled up while a point of it is still being written, and a late point
//    always finds out whether its hour's rollup exists.
// The one cache is the series ids: a series row never changes or goes away once committed, so
// an id seen committed stays right whatever other servers do. Ids a transaction added enter
// the cache only once it committed.
class PgTelemetry {
 public:
  explicit PgTelemetry(Pool& pool) : pool_(pool) {}
  PgTelemetry(const PgTelemetry&) = delete;
  PgTelemetry& operator=(const PgTelemetry&) = delete;

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
  struct DeviceRow;
  struct TotalsDelta;
  struct Transaction;
  struct PendingPoints;

  // One try at storing `batches` in one transaction. Without savepoints, any failure fails the
  // whole call (the caller then tries again with them); with, a failing batch gets its error
  // in its slot and the others are stored.
  [[nodiscard]] Result<std::vector<Result<TelemetryIngestOutcome>>> ingest_transaction(
      const std::vector<TelemetryIngest>& batches, int64_t now_ms, bool savepoints);
  // One batch inside the transaction: points and events are written, the device's row and the
  // fleet totals only change in memory (`txn`, `totals`).
  [[nodiscard]] Result<TelemetryIngestOutcome> ingest_one(
      Connection& conn, Transaction& txn, const TelemetryIngest& in, int64_t now_ms,
      std::map<std::string, TotalsDelta>& totals);
  // The id of the series `key` (labels and metric joined), found in the cache, or the table,
  // or added (then remembered in `txn` until commit).
  [[nodiscard]] Result<int64_t> series_id(Connection& conn, Transaction& txn,
                                          const std::vector<std::string_view>& labels,
                                          int64_t revision);
  [[nodiscard]] Status write_points(Connection& conn, const PendingPoints& points,
                                    int64_t rolled_up_hour);
  [[nodiscard]] Status apply_totals(Connection& conn,
                                    const std::map<std::string, TotalsDelta>& deltas);

  Pool& pool_;
  std::mutex mu_;
  std::unordered_map<std::string, int64_t> series_;  // GUARDED_BY(mu_); committed ids only
};

}  // namespace outpost::store::postgres
