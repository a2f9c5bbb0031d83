// The telemetry part of the SQLite backend (schema in migrations/0003_telemetry.sql): ingest
// with the per-device exactly-once watermark, hourly rollups and retention, and queries.
// Internal to the store module; SqliteStore owns one and calls it holding its mutex.
#pragma once

#include <sqlite3.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
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

  // The labels of a record's series besides the metric: every metric a record of `kind`
  // gives (a health record's gauges, an inference record's six) shares them, so one lookup
  // per record finds all its series (SeriesSlots, by the metric's slot).
  struct SeriesLabelsView {
    std::string_view device, site;
    int kind = 0;
    std::string_view deployment;
    int64_t revision = 0;
    std::string_view model, version, role, detail;
  };
  struct SeriesLabels {
    explicit SeriesLabels(const SeriesLabelsView& v)
        : device(v.device),
          site(v.site),
          kind(v.kind),
          deployment(v.deployment),
          revision(v.revision),
          model(v.model),
          version(v.version),
          role(v.role),
          detail(v.detail) {}
    SeriesLabelsView view() const {
      return {device, site, kind, deployment, revision, model, version, role, detail};
    }
    std::string device, site;
    int kind = 0;
    std::string deployment;
    int64_t revision = 0;
    std::string model, version, role, detail;
  };
  struct SeriesLabelsHash {
    using is_transparent = void;
    size_t operator()(const SeriesLabelsView& v) const;
    size_t operator()(const SeriesLabels& l) const { return (*this)(l.view()); }
  };
  struct SeriesLabelsEqual {
    using is_transparent = void;
    static bool same(const SeriesLabelsView& a, const SeriesLabelsView& b) {
      return a.kind == b.kind && a.revision == b.revision && a.device == b.device &&
             a.site == b.site && a.deployment == b.deployment && a.model == b.model &&
             a.version == b.version && a.role == b.role && a.detail == b.detail;
    }
    bool operator()(const SeriesLabels& a, const SeriesLabels& b) const {
      return same(a.view(), b.view());
    }
    bool operator()(const SeriesLabelsView& a, const SeriesLabels& b) const {
      return same(a, b.view());
    }
    bool operator()(const SeriesLabels& a, const SeriesLabelsView& b) const {
      return same(a.view(), b);
    }
  };
  // Series ids of one label set by metric slot; 0 = not looked up yet.
  struct SeriesSlots {
    std::array<int64_t, 10> ids{};
  };
  // A telemetry_devices row.
  struct DeviceRow {
    bool exists = false;  // in the table (or written by this transaction)
    bool dirty = false;   // changed by this transaction
    int64_t acked_seq = 0;
    telemetry::DropCounts dropped;
    int64_t last_ingest_at = 0;
    int64_t last_health_at = 0;
    std::optional<double> sync_lag_s;
    int64_t batches = 0;
    int64_t records = 0;
  };
  class Stmt;
  // The nine labels of a series, in the column order the series statements use.
  static void bind_series(Stmt& stmt, const SeriesKey& key);
  // Writes (or replaces) the rollup row of a series for an hour.
  [[nodiscard]] Status write_rollup(int64_t hour, int64_t series, const TelemetryStats& stats,
                                    bool histogram);

  // A statement prepared once and kept (the ingest path runs the same few thousands of
  // times a second); keyed by its SQL text, a literal of sqlite_telemetry.cpp.
  [[nodiscard]] Result<sqlite3_stmt*> prepared(std::string_view sql);
  [[nodiscard]] Status exec(const char* sql);
  // Runs a statement prepared once (BEGIN, COMMIT, SAVEPOINT ...) that returns no row.
  [[nodiscard]] Status run(std::string_view sql);
  Error error(int rc, const std::string& doing) const;

  // One try at storing `batches` in one transaction. Without savepoints, any failure fails
  // the whole call (the caller then tries again with them); with, a failing batch gets its
  // error in its slot and the others are stored.
  [[nodiscard]] Result<std::vector<Result<TelemetryIngestOutcome>>> ingest_transaction(
      const std::vector<TelemetryIngest>& batches, int64_t now_ms, bool savepoints);
  // One batch inside the caller's transaction: points and events are written, the device's
  // row and the fleet totals only change in memory (txn_devices_, `totals`).
  [[nodiscard]] Result<TelemetryIngestOutcome> ingest_one(
      const std::string& device_id, const std::string& site, const telemetry::Batch& batch,
      int64_t now_ms, int64_t rolled_up_hour, std::map<std::string, TotalsDelta>& totals);
  // The device's row as this transaction has it (loaded from the cache or the table).
  [[nodiscard]] Result<DeviceRow*> device_row(const std::string& device_id);
  [[nodiscard]] Status write_device_rows();
  // The ids of a label set's series (0 where not known yet); never null.
  SeriesSlots* series_slots(const SeriesLabelsView& labels);
  // Fills `slot` with the series id of `key`, finding or adding its row.
  [[nodiscard]] Status resolve_series(const SeriesKey& key, int64_t& slot);
  [[nodiscard]] Status insert_point(int64_t series, int64_t time, int64_t seq, double value,
                                    const telemetry::Histogram* histogram, int64_t rolled_up_hour);
  [[nodiscard]] Status merge_into_rollup(int64_t hour, int64_t series, int64_t time, double value,
                                         const telemetry::Histogram* histogram);
  [[nodiscard]] Status apply_totals(const std::map<std::string, TotalsDelta>& deltas);
  // After a transaction that did not commit: forget what it taught the caches.
  void forget_transaction();

  sqlite3* db_;
  std::map<std::string, sqlite3_stmt*, std::less<>> statements_;
  sqlite3_stmt* insert_point_ = nullptr;  // the hottest statement, kept out of the map lookup
  // Series ids by device and label set (see SeriesSlots). Ids this transaction added are
  // listed in pending_series_ and zeroed again if it rolls back, so the cache never names a
  // row that is not there.
  std::unordered_map<SeriesLabels, SeriesSlots, SeriesLabelsHash, SeriesLabelsEqual> series_cache_;
  std::vector<int64_t*> pending_series_;
  // telemetry_devices rows as last committed (a cache: this connection is the table's only
  // writer, checked by data_version_), and the rows the open transaction will write.
  std::unordered_map<std::string, DeviceRow> devices_;
  std::unordered_map<std::string, DeviceRow> txn_devices_;
  int64_t data_version_ = -1;
  std::string blob_buffer_;
};

}  // namespace outpost::store::sqlite
