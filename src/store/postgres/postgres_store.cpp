// PostgreSQL backend of the Store.
//
// Concurrency: several server processes may share the database, so nothing read from it is
// kept between calls (the telemetry series ids, which never change once committed, are the one
// exception; see postgres_telemetry.h). Each call borrows a connection from the pool, so calls
// run in parallel. Where SQLite relied on being the only writer (BEGIN IMMEDIATE), transactions
// here are one of:
//  - a single statement (autocommit), atomic by itself: upserts, INSERT ... ON CONFLICT,
//    UPDATE ... SET x = GREATEST(x, $1);
//  - READ COMMITTED with the rows they depend on locked first (SELECT ... FOR UPDATE, in id
//    order where a transaction locks several, so that two of them never deadlock), or the
//    audit log's table lock: the hot device paths and the audit chain;
//  - SERIALIZABLE for the operators' multi-statement changes (deployments, rollouts, secrets),
//    where PostgreSQL proves the outcome equals some serial order and otherwise fails with
//    40001, which the pool answers by running the transaction again.
#include "store/postgres/postgres_store.h"

#include <algorithm>
#include <charconv>
#include <exception>
#include <functional>
#include <optional>
#include <set>
#include <string_view>
#include <type_traits>
#include <utility>

#include <nlohmann/json.hpp>

#include "store/internal/json_columns.h"
#include "store/postgres/pg_connection.h"
#include "store/postgres/postgres_telemetry.h"

namespace outpost::store::postgres {
namespace {

using internal::iso_time;
using internal::labels_from_json;
using internal::labels_match;
using internal::labels_to_json;
using internal::strings_from_json;
using internal::strings_to_json;
using internal::wall_clock_ms;

constexpr size_t kDefaultPoolSize = 8;
constexpr size_t kMaxPoolSize = 256;

// Column lists shared by the queries that read whole rows, in the order read_*() expects.
#define OUTPOST_PG_OPERATOR_TOKEN_COLUMNS \
  "id, token_hash, role, name, created_at, sites_json, revoked_at"
#define OUTPOST_PG_ENROLLMENT_TOKEN_COLUMNS \
  "id, token_hash, site, labels_json, uses_left, expires_at, created_at, created_by"
#define OUTPOST_PG_DEVICE_COLUMNS                                                             \
  "id, site, labels_json, facts_json, public_key, credential_hash, enrolled_at, last_seen, "  \
  "generation, desired_json, desired_hash, status_json, status_at, schedule_json, cordoned, " \
  "revoked_at"
#define OUTPOST_PG_ARTIFACT_COLUMNS "digest, size, media_type, created_at"
#define OUTPOST_PG_DELTA_COLUMNS \
  "target, base, delta, delta_size, target_size, state, detail, created_at"
#define OUTPOST_PG_DEPLOYMENT_COLUMNS \
  "name, revision, manifest_json, spec_hash, created_at, updated_at, stable_revision"
#define OUTPOST_PG_ROLLOUT_COLUMNS                                                        \
  "id, deployment, from_revision, to_revision, state, doc_json, created_at, updated_at, " \
  "created_by"
#define OUTPOST_PG_AUDIT_COLUMNS "seq, time, actor, action, target, details_json, prev_hash, hash"

Result<OperatorToken> read_operator_token(const Rows& r, int i) {
  OperatorToken token{
      .id = r.text(i, 0),
      .token_hash = r.text(i, 1),
      .role = r.text(i, 2),
      .name = r.text(i, 3),
      .created_at = r.i64(i, 4),
      .sites = {},
      .revoked_at = r.i64(i, 6),
  };
  auto sites = strings_from_json(r.text(i, 5), "operator token " + token.id, "sites");
  if (!sites) return make_error(std::move(sites).error());
  token.sites = std::move(*sites);
  return token;
}

Result<EnrollmentToken> read_enrollment_token(const Rows& r, int i) {
  EnrollmentToken token{
      .id = r.text(i, 0),
      .token_hash = r.text(i, 1),
      .site = r.text(i, 2),
      .labels = {},
      .uses_left = r.opt_i64(i, 4),
      .expires_at = r.opt_i64(i, 5),
      .created_at = r.i64(i, 6),
      .created_by = r.text(i, 7),
  };
  auto labels = labels_from_json(r.text(i, 3), "enrollment token " + token.id);
  if (!labels) return make_error(std::move(labels).error());
  token.labels = std::move(*labels);
  return token;
}

Result<Device> read_device(const Rows& r, int i) {
  Device device{
      .id = r.text(i, 0),
      .site = r.text(i, 1),
      .labels = {},
      .facts_json = r.text(i, 3),
      .public_key = r.text(i, 4),
      .credential_hash = r.text(i, 5),
      .enrolled_at = r.i64(i, 6),
      .last_seen = r.i64(i, 7),
      .generation = r.i64(i, 8),
      .desired_json = r.text(i, 9),
      .desired_hash = r.text(i, 10),
      .status_json = r.text(i, 11),
      .status_at = r.i64(i, 12),
      .schedule_json = r.text(i, 13),
      .cordoned = r.boolean(i, 14),
      .revoked_at = r.i64(i, 15),
  };
  auto labels = labels_from_json(r.text(i, 2), "device " + device.id);
  if (!labels) return make_error(std::move(labels).error());
  device.labels = std::move(*labels);
  return device;
}

Artifact read_artifact(const Rows& r, int i) {
  return Artifact{.digest = r.text(i, 0),
                  .size = r.i64(i, 1),
                  .media_type = r.text(i, 2),
                  .created_at = r.i64(i, 3)};
}

ArtifactDelta read_delta(const Rows& r, int i) {
  return ArtifactDelta{
      .target = r.text(i, 0),
      .base = r.text(i, 1),
      .delta = r.text(i, 2),
      .delta_size = r.i64(i, 3),
      .target_size = r.i64(i, 4),
      .state = r.text(i, 5),
      .detail = r.text(i, 6),
      .created_at = r.i64(i, 7),
  };
}

Deployment read_deployment(const Rows& r, int i) {
  return Deployment{
      .name = r.text(i, 0),
      .revision = r.i64(i, 1),
      .manifest_json = r.text(i, 2),
      .spec_hash = r.text(i, 3),
      .created_at = r.i64(i, 4),
      .updated_at = r.i64(i, 5),
      .stable_revision = r.i64(i, 6),
  };
}

Rollout read_rollout(const Rows& r, int i) {
  return Rollout{
      .id = r.i64(i, 0),
      .deployment = r.text(i, 1),
      .from_revision = r.i64(i, 2),
      .to_revision = r.i64(i, 3),
      .state = r.text(i, 4),
      .doc_json = r.text(i, 5),
      .created_at = r.i64(i, 6),
      .updated_at = r.i64(i, 7),
      .created_by = r.text(i, 8),
  };
}

AuditEntry read_audit_entry(const Rows& r, int i) {
  return AuditEntry{
      .seq = r.i64(i, 0),
      .time = r.i64(i, 1),
      .actor = r.text(i, 2),
      .action = r.text(i, 3),
      .target = r.text(i, 4),
      .details_json = r.text(i, 5),
      .prev_hash = r.text(i, 6),
      .hash = r.text(i, 7),
  };
}

Site read_site(const Rows& r, int i) {
  return Site{r.text(i, 0), r.text(i, 1), r.text(i, 2), r.i64(i, 3)};
}

ModelVersion read_model_version_row(const Rows& r, int i) {
  return ModelVersion{.model = r.text(i, 0),
                      .version = r.text(i, 1),
                      .content_hash = r.text(i, 2),
                      .created_at = r.i64(i, 3),
                      .variants = {}};
}

// Every row of `rows` through `read` (returning T or Result<T>).
template <typename T, typename Read>
Result<std::vector<T>> read_all(const Result<Rows>& rows, Read read) {
  if (!rows) return make_error(rows.error());
  std::vector<T> out;
  out.reserve(static_cast<size_t>(rows->size()));
  for (int i = 0; i < rows->size(); ++i) {
    if constexpr (std::is_same_v<std::invoke_result_t<Read, const Rows&, int>, T>) {
      out.push_back(read(*rows, i));
    } else {
      auto value = read(*rows, i);
      if (!value) return make_error(std::move(value).error());
      out.push_back(std::move(*value));
    }
  }
  return out;
}

// The first row of `rows` through `read`, or nullopt when there is none.
template <typename T, typename Read>
Result<std::optional<T>> read_one(const Result<Rows>& rows, Read read) {
  if (!rows) return make_error(rows.error());
  if (rows->empty()) return std::optional<T>();
  if constexpr (std::is_same_v<std::invoke_result_t<Read, const Rows&, int>, T>) {
    return std::optional<T>(read(*rows, 0));
  } else {
    auto value = read(*rows, 0);
    if (!value) return make_error(std::move(value).error());
    return std::optional<T>(std::move(*value));
  }
}

// Takes pool_size=N out of the URL's query (libpq refuses parameters it does not know).
Result<std::pair<std::string, size_t>> split_pool_size(const std::string& url,
                                                       const std::string& shown) {
  const auto query = url.find('?');
  if (query == std::string::npos) return std::pair{url, kDefaultPoolSize};
  std::string kept;
  size_t pool_size = kDefaultPoolSize;
  size_t pos = query + 1;
  while (pos <= url.size()) {
    size_t end = url.find('&', pos);
    if (end == std::string::npos) end = url.size();
    const std::string_view param = std::string_view(url).substr(pos, end - pos);
    if (param.starts_with("pool_size=")) {
      const std::string_view value = param.substr(std::string_view("pool_size=").size());
      size_t n = 0;
      const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
      if (ec != std::errc() || ptr != value.data() + value.size() || n < 1 || n > kMaxPoolSize) {
        return make_error(Errc::kInvalidArgument,
                          "store URL " + shown + ": pool_size must be a number from 1 to " +
                              std::to_string(kMaxPoolSize) + ", got \"" + std::string(value) + "\"",
                          "url");
      }
      pool_size = n;
    } else if (!param.empty()) {
      kept += (kept.empty() ? "" : "&") + std::string(param);
    }
    pos = end + 1;
  }
  return std::pair{url.substr(0, query) + (kept.empty() ? "" : "?" + kept), pool_size};
}

class PostgresStore final : public Store {
 public:
  PostgresStore(std::string conninfo, std::string shown_url, size_t pool_size)
      : pool_(std::move(conninfo), std::move(shown_url), pool_size), telemetry_(pool_) {}

  [[nodiscard]] Status migrate(std::span<const Migration> migrations);

  Status put_operator_token(const OperatorToken& token) override;
  Status create_operator_token(const OperatorToken& token) override;
  Result<std::optional<OperatorToken>> find_operator_token_by_hash(
      const std::string& token_hash) override;
  Result<std::optional<OperatorToken>> find_operator_token_by_name(
      const std::string& name) override;
  Result<std::vector<OperatorToken>> list_operator_tokens() override;
  Result<OperatorToken> revoke_operator_token(const std::string& name, int64_t revoked_at) override;
  Status put_enrollment_token(const EnrollmentToken& token) override;
  Result<std::optional<EnrollmentToken>> find_enrollment_token_by_hash(
      const std::string& token_hash) override;
  Result<std::vector<EnrollmentToken>> list_enrollment_tokens() override;
  Result<EnrollmentToken> enroll_device(const std::string& token_hash, int64_t now_ms,
                                        const Device& device) override;
  Result<std::optional<Device>> get_device(const std::string& id) override;
  Result<std::vector<Device>> list_devices(const DeviceFilter& filter) override;
  Result<int64_t> update_desired_state(const std::string& id, const std::string& desired_json,
                                       const std::string& desired_hash,
                                       const std::string& schedule_json) override;
  Result<std::vector<int64_t>> update_desired_states(
      const std::vector<DesiredStateWrite>& writes) override;
  Result<bool> record_device_status(const std::string& id, int64_t seq,
                                    const std::string& status_json, int64_t now_ms,
                                    int64_t keep_log) override;
  Result<std::vector<Result<bool>>> record_device_statuses(
      const std::vector<DeviceStatusWrite>& writes, int64_t keep_log) override;
  Result<std::vector<StatusReport>> list_device_status_log(const std::string& id,
                                                           int64_t limit) override;
  Status update_device_facts(const std::string& id, const std::string& facts_json) override;
  Status touch_device(const std::string& id, int64_t now_ms) override;
  Result<int64_t> touch_devices(const std::vector<std::pair<std::string, int64_t>>& seen) override;
  Status set_device_cordoned(const std::string& id, bool cordoned) override;
  Status set_device_revoked(const std::string& id, int64_t revoked_at) override;
  Result<bool> put_release_document(const ReleaseDocument& doc) override;
  Result<std::optional<ReleaseDocument>> get_release_document(const std::string& role,
                                                              int64_t version) override;
  Result<bool> put_artifact(const Artifact& artifact) override;
  Result<std::optional<Artifact>> get_artifact(const std::string& digest) override;
  Result<std::vector<Artifact>> list_artifacts() override;
  Status put_artifact_delta(const ArtifactDelta& delta) override;
  Result<std::vector<ArtifactDelta>> list_artifact_deltas(const std::string& target) override;
  Result<bool> put_model_version(const ModelVersion& version) override;
  Result<std::optional<ModelVersion>> get_model_version(const std::string& model,
                                                        const std::string& version) override;
  Result<std::vector<ModelVersion>> list_model_versions(const std::string& model) override;
  Result<std::vector<std::string>> list_models() override;
  Result<ApplyOutcome> apply_deployment(const std::string& name, const std::string& manifest_json,
                                        const std::string& spec_hash, const std::string& actor,
                                        int64_t now_ms) override;
  Result<std::optional<Deployment>> get_deployment(const std::string& name) override;
  Result<std::vector<Deployment>> list_deployments() override;
  Result<std::vector<DeploymentRevision>> list_deployment_revisions(
      const std::string& name) override;
  Status delete_deployment(const std::string& name) override;
  Result<int64_t> create_rollout(const Rollout& rollout) override;
  Status update_rollout(const RolloutUpdate& update) override;
  Result<std::optional<Rollout>> get_rollout(int64_t id) override;
  Result<std::vector<Rollout>> list_rollouts(const std::string& deployment, bool active_only,
                                             int64_t limit) override;
  Result<std::vector<RevisionAssignment>> list_revision_assignments(
      const std::string& deployment) override;
  Status put_secret_version(const SecretVersion& version, int64_t now_ms) override;
  Result<std::optional<Secret>> get_secret(const std::string& name) override;
  Result<std::vector<Secret>> list_secrets() override;
  Status delete_secret(const std::string& name) override;
  Status put_site(const Site& site) override;
  Result<std::optional<Site>> get_site(const std::string& name) override;
  Result<std::vector<Site>> list_sites() override;
  Result<AuditEntry> append_audit(const std::string& actor, const std::string& action,
                                  const std::string& target, const std::string& details_json,
                                  int64_t now_ms) override;
  Result<std::vector<AuditEntry>> list_audit(int64_t since_ms, int64_t limit) override;

  Result<TelemetryIngestOutcome> ingest_telemetry(const std::string& device_id,
                                                  const std::string& site,
                                                  const telemetry::Batch& batch,
                                                  int64_t now_ms) override {
    return guarded("storing telemetry of device " + device_id,
                   [&] { return telemetry_.ingest(device_id, site, batch, now_ms); });
  }
  Result<std::vector<Result<TelemetryIngestOutcome>>> ingest_telemetry_batches(
      const std::vector<TelemetryIngest>& batches, int64_t now_ms) override {
    return guarded("storing telemetry batches " + std::to_string(batches.size()),
                   [&] { return telemetry_.ingest_many(batches, now_ms); });
  }
  Result<TelemetryMaintenanceOutcome> maintain_telemetry(
      int64_t now_ms, const TelemetryRetention& retention) override {
    return guarded("rolling up and expiring telemetry",
                   [&] { return telemetry_.maintain(now_ms, retention); });
  }
  Result<TelemetryQueryResult> query_telemetry(const TelemetryQuery& query) override {
    return guarded("querying telemetry metric " + query.metric,
                   [&] { return telemetry_.query(query); });
  }
  Result<std::vector<TelemetryTotal>> list_telemetry_totals() override {
    return guarded("listing telemetry totals", [&] { return telemetry_.totals(); });
  }
  Result<std::vector<TelemetryDeviceState>> list_telemetry_devices() override {
    return guarded("listing telemetry device state", [&] { return telemetry_.devices(); });
  }
  Result<int> schema_version() override;

 private:
  // Turns any exception (allocation failure, a JSON library throwing) into kInternal so that
  // none crosses the Store boundary; a connection on loan while unwinding is closed, not
  // reused (it may be inside a transaction).
  template <typename Fn>
  static auto guarded(const std::string& operation, Fn&& fn) -> decltype(fn()) {
    try {
      return fn();
    } catch (const std::exception& e) {
      return make_error(Errc::kInternal, operation + ": " + e.what());
    } catch (...) {
      return make_error(Errc::kInternal, operation + ": unknown exception");
    }
  }
  // One transaction at `isolation` (see the file comment), retried by the pool.
  template <typename Body>
  auto transact(Isolation isolation, const std::string& operation, Body&& body) {
    return guarded(operation, [&] { return pool_.transact(isolation, operation, body); });
  }
  // One statement (or a few reads that need no common snapshot), in autocommit.
  template <typename Body>
  auto single(const std::string& operation, Body&& body) {
    return guarded(operation, [&] { return pool_.autocommit(operation, body); });
  }

  // Locks the rows of the devices among `ids` that exist, in id order (so that two
  // transactions locking overlapping sets never deadlock), and returns their ids.
  static Result<std::set<std::string>> lock_devices(Connection& conn,
                                                    const std::vector<std::string>& ids);
  static Result<int64_t> write_desired_state(Connection& conn, const std::string& id,
                                             const std::string& desired_json,
                                             const std::string& desired_hash,
                                             const std::string& schedule_json);
  static Result<bool> write_device_status(Connection& conn, const std::string& id, int64_t seq,
                                          const std::string& status_json, int64_t now_ms,
                                          int64_t keep_log);
  static Error operator_token_clash(Connection& conn, const OperatorToken& token);
  static Status load_variants(Connection& conn, std::vector<ModelVersion>& versions);
  Result<std::vector<Secret>> read_secrets(const std::string& operation, const std::string& name);
  // kNotFound naming `what` when `rows` (an UPDATE or DELETE) touched nothing.
  static Status expect_changed(const Result<Rows>& rows, const std::string& what) {
    if (!rows) return make_error(rows.error());
    if (rows->affected() == 0) return make_error(Errc::kNotFound, what + " not found");
    return ok();
  }

  Pool pool_;
  PgTelemetry telemetry_;
};

// ---- Migrations ----

Status PostgresStore::migrate(std::span<const Migration> migrations) {
  const std::string& url = pool_.shown_url();
  auto lease = pool_.acquire();  // its error names the URL
  if (!lease) return make_error(std::move(lease).error());
  Connection& conn = **lease;
  conn.set_operation("migrating store " + url);
  // Servers starting together: the first migrates, the others wait here and then find
  // nothing left to do. A session lock (not a transaction's), released below or when the
  // connection closes on an error path.
  OUTPOST_TRY(conn.query("SELECT pg_advisory_lock($1::int4, $2::int4)", kAdvisoryLockClass,
                         kMigrationLock));
  struct Unlock {
    Connection& conn;
    ~Unlock() {
      if (!conn.broken()) {
        if (!conn.idle()) (void)conn.exec_script("ROLLBACK");
        (void)conn.query("SELECT pg_advisory_unlock($1::int4, $2::int4)", kAdvisoryLockClass,
                         kMigrationLock);
      }
    }
  } unlock{conn};
  OUTPOST_TRY(
      conn.exec_script("CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)"));
  const int known = migrations.empty() ? 0 : migrations.back().version;
  auto current = conn.query("SELECT COALESCE(MAX(version), 0)::int8 FROM schema_migrations");
  if (!current) return make_error(std::move(current).error());
  const int64_t have = current->i64(0, 0);
  if (have > known) {
    return make_error(Errc::kFailedPrecondition,
                      "store " + url + " has schema version " + std::to_string(have) +
                          " but this build knows only up to " + std::to_string(known) +
                          "; run a newer outpost");
  }
  int expected = 1;
  for (const Migration& migration : migrations) {
    if (migration.version != expected++) {
      return make_error(Errc::kInternal,
                        "migration " + std::string(migration.name) +
                            " is out of order; migrations are numbered 1, 2, 3...");
    }
    if (migration.version <= have) continue;
    conn.set_operation("applying migration " + std::string(migration.name) + " to " + url);
    OUTPOST_TRY(conn.exec_script("BEGIN"));
    OUTPOST_TRY(conn.exec_script(std::string(migration.sql)));
    OUTPOST_TRY(conn.query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                           migration.version, wall_clock_ms()));
    OUTPOST_TRY(conn.exec_script("COMMIT"));
  }
  return ok();
}

Result<int> PostgresStore::schema_version() {
  return single("reading schema version", [&](Connection& conn) -> Result<int> {
    auto rows = conn.query("SELECT COALESCE(MAX(version), 0)::int8 FROM schema_migrations");
    if (!rows) return make_error(std::move(rows).error());
    return static_cast<int>(rows->i64(0, 0));
  });
}

// ---- Operator tokens ----

// Which unique constraint a write of `token` broke (its name held by another token, or its
// hash), for an error that names the user. Runs outside any failed transaction.
Error PostgresStore::operator_token_clash(Connection& conn, const OperatorToken& token) {
  auto rows = conn.query("SELECT id FROM operator_tokens WHERE name = $1", token.name);
  if (rows && !rows->empty() && rows->text(0, 0) != token.id) {
    return Error{Errc::kAlreadyExists, "user " + token.name + " already exists", "name"};
  }
  return Error{Errc::kAlreadyExists,
               "operator token " + token.id + ": another token has the same hash", "token_hash"};
}

Status PostgresStore::put_operator_token(const OperatorToken& token) {
  return single("storing operator token " + token.id, [&](Connection& conn) -> Status {
    auto sites = strings_to_json(token.sites, "sites");
    if (!sites) return make_error(std::move(sites).error());
    auto done =
        conn.query("INSERT INTO operator_tokens (" OUTPOST_PG_OPERATOR_TOKEN_COLUMNS
                   ") VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET"
                   " token_hash = excluded.token_hash, role = excluded.role, name = excluded.name,"
                   " created_at = excluded.created_at, sites_json = excluded.sites_json,"
                   " revoked_at = excluded.revoked_at",
                   token.id, token.token_hash, token.role, token.name, token.created_at, *sites,
                   token.revoked_at);
    if (!done && done.error().code == Errc::kAlreadyExists) {
      return make_error(operator_token_clash(conn, token));
    }
    if (!done) return make_error(std::move(done).error());
    return ok();
  });
}

Status PostgresStore::create_operator_token(const OperatorToken& token) {
  return transact(
      Isolation::kReadCommitted, "creating operator token " + token.id,
      [&](Connection& conn) -> Status {
        auto sites = strings_to_json(token.sites, "sites");
        if (!sites) return make_error(std::move(sites).error());
        auto taken = [&]() -> Result<std::optional<Error>> {
          auto rows =
              conn.query("SELECT revoked_at FROM operator_tokens WHERE name = $1 OR id = $2",
                         token.name, token.id);
          if (!rows) return make_error(std::move(rows).error());
          if (rows->empty()) return std::optional<Error>();
          const int64_t revoked_at = rows->i64(0, 0);
          return std::optional<Error>(
              Error{Errc::kAlreadyExists,
                    "user " + token.name + " already exists" +
                        (revoked_at > 0
                             ? " (revoked at " + iso_time(revoked_at) + "; a name is never reused)"
                             : ""),
                    "name"});
        };
        auto before = taken();
        if (!before) return make_error(std::move(before).error());
        if (*before) return make_error(std::move(**before));
        // DO NOTHING on any unique constraint: the transaction stays usable to say which.
        auto inserted = conn.query("INSERT INTO operator_tokens (" OUTPOST_PG_OPERATOR_TOKEN_COLUMNS
                                   ") VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                                   token.id, token.token_hash, token.role, token.name,
                                   token.created_at, *sites, token.revoked_at);
        if (!inserted) return make_error(std::move(inserted).error());
        if (inserted->affected() == 1) return ok();
        // Another server created it meanwhile (now visible: READ COMMITTED), or the hash clashes.
        auto after = taken();
        if (!after) return make_error(std::move(after).error());
        if (*after) return make_error(std::move(**after));
        return make_error(operator_token_clash(conn, token));
      });
}

Result<std::optional<OperatorToken>> PostgresStore::find_operator_token_by_hash(
    const std::string& token_hash) {
  return single("finding operator token", [&](Connection& conn) {
    return read_one<OperatorToken>(conn.query("SELECT " OUTPOST_PG_OPERATOR_TOKEN_COLUMNS
                                              " FROM operator_tokens WHERE token_hash = $1",
                                              token_hash),
                                   read_operator_token);
  });
}

Result<std::optional<OperatorToken>> PostgresStore::find_operator_token_by_name(
    const std::string& name) {
  return single("finding user " + name, [&](Connection& conn) {
    return read_one<OperatorToken>(conn.query("SELECT " OUTPOST_PG_OPERATOR_TOKEN_COLUMNS
                                              " FROM operator_tokens WHERE name = $1",
                                              name),
                                   read_operator_token);
  });
}

Result<std::vector<OperatorToken>> PostgresStore::list_operator_tokens() {
  return single("listing users", [&](Connection& conn) {
    return read_all<OperatorToken>(conn.query("SELECT " OUTPOST_PG_OPERATOR_TOKEN_COLUMNS
                                              " FROM operator_tokens ORDER BY name"),
                                   read_operator_token);
  });
}

Result<OperatorToken> PostgresStore::revoke_operator_token(const std::string& name,
                                                           int64_t revoked_at) {
  return transact(
      Isolation::kReadCommitted, "revoking user " + name,
      [&](Connection& conn) -> Result<OperatorToken> {
        // A concurrent revocation holds the row until it commits; this one then finds
        // revoked_at set and keeps the first time.
        OUTPOST_TRY(conn.query(
            "UPDATE operator_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at = 0",
            revoked_at, name));
        auto token = read_one<OperatorToken>(conn.query("SELECT " OUTPOST_PG_OPERATOR_TOKEN_COLUMNS
                                                        " FROM operator_tokens WHERE name = $1",
                                                        name),
                                             read_operator_token);
        if (!token) return make_error(std::move(token).error());
        if (!*token) return make_error(Errc::kNotFound, "user " + name + " does not exist", "name");
        return std::move(**token);
      });
}

// ---- Enrollment ----

Status PostgresStore::put_enrollment_token(const EnrollmentToken& token) {
  return single("storing enrollment token " + token.id, [&](Connection& conn) -> Status {
    auto labels = labels_to_json(token.labels);
    if (!labels) return make_error(std::move(labels).error());
    auto done =
        conn.query("INSERT INTO enrollment_tokens (" OUTPOST_PG_ENROLLMENT_TOKEN_COLUMNS
                   ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET"
                   " token_hash = excluded.token_hash, site = excluded.site,"
                   " labels_json = excluded.labels_json, uses_left = excluded.uses_left,"
                   " expires_at = excluded.expires_at, created_at = excluded.created_at,"
                   " created_by = excluded.created_by",
                   token.id, token.token_hash, token.site, *labels, token.uses_left,
                   token.expires_at, token.created_at, token.created_by);
    if (!done && done.error().code == Errc::kAlreadyExists) {
      return make_error(Errc::kAlreadyExists,
                        "enrollment token " + token.id + ": another token has the same hash",
                        "token_hash");
    }
    if (!done) return make_error(std::move(done).error());
    return ok();
  });
}

Result<std::vector<EnrollmentToken>> PostgresStore::list_enrollment_tokens() {
  return single("listing enrollment tokens", [&](Connection& conn) {
    return read_all<EnrollmentToken>(conn.query("SELECT " OUTPOST_PG_ENROLLMENT_TOKEN_COLUMNS
                                                " FROM enrollment_tokens ORDER BY created_at, id"),
                                     read_enrollment_token);
  });
}

Result<std::optional<EnrollmentToken>> PostgresStore::find_enrollment_token_by_hash(
    const std::string& token_hash) {
  return single("finding enrollment token", [&](Connection& conn) {
    return read_one<EnrollmentToken>(conn.query("SELECT " OUTPOST_PG_ENROLLMENT_TOKEN_COLUMNS
                                                " FROM enrollment_tokens WHERE token_hash = $1",
                                                token_hash),
                                     read_enrollment_token);
  });
}

Result<EnrollmentToken> PostgresStore::enroll_device(const std::string& token_hash, int64_t now_ms,
                                                     const Device& device) {
  return transact(
      Isolation::kReadCommitted, "enrolling device " + device.id,
      [&](Connection& conn) -> Result<EnrollmentToken> {
        auto labels = labels_to_json(device.labels);
        if (!labels) return make_error(std::move(labels).error());
        // The token's row stays locked until commit: enrollments through one token (on any
        // server) count its uses one after the other.
        auto found = read_one<EnrollmentToken>(
            conn.query("SELECT " OUTPOST_PG_ENROLLMENT_TOKEN_COLUMNS
                       " FROM enrollment_tokens WHERE token_hash = $1 FOR UPDATE",
                       token_hash),
            read_enrollment_token);
        if (!found) return make_error(std::move(found).error());
        // Says nothing about which tokens exist: the caller is not authenticated yet.
        if (!*found) return make_error(Errc::kUnauthenticated, "enrollment token is not valid");
        EnrollmentToken& token = **found;
        if (token.expires_at && now_ms >= *token.expires_at) {
          return make_error(
              Errc::kFailedPrecondition,
              "enrollment token " + token.id + " expired at " + iso_time(*token.expires_at));
        }
        if (token.uses_left && *token.uses_left <= 0) {
          return make_error(Errc::kFailedPrecondition,
                            "enrollment token " + token.id + " has no uses left");
        }
        if (token.uses_left) {
          OUTPOST_TRY(conn.query(
              "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE id = $1", token.id));
        }
        auto inserted = conn.query(
            "INSERT INTO devices (" OUTPOST_PG_DEVICE_COLUMNS
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
            " ON CONFLICT (id) DO NOTHING",
            device.id, device.site, *labels, device.facts_json, device.public_key,
            device.credential_hash, device.enrolled_at, device.last_seen, device.generation,
            device.desired_json, device.desired_hash, device.status_json, device.status_at,
            device.schedule_json, device.cordoned, device.revoked_at);
        if (!inserted) return make_error(std::move(inserted).error());
        // The error rolls back the use taken above.
        if (inserted->affected() == 0) {
          return make_error(Errc::kAlreadyExists, "device " + device.id + " already exists", "id");
        }
        return std::move(token);
      });
}

// ---- Devices ----

Result<std::optional<Device>> PostgresStore::get_device(const std::string& id) {
  return single("reading device " + id, [&](Connection& conn) {
    return read_one<Device>(
        conn.query("SELECT " OUTPOST_PG_DEVICE_COLUMNS " FROM devices WHERE id = $1", id),
        read_device);
  });
}

Result<std::vector<Device>> PostgresStore::list_devices(const DeviceFilter& filter) {
  return single("listing devices", [&](Connection& conn) -> Result<std::vector<Device>> {
    auto devices = filter.site
                       ? read_all<Device>(conn.query("SELECT " OUTPOST_PG_DEVICE_COLUMNS
                                                     " FROM devices WHERE site = $1 ORDER BY id",
                                                     *filter.site),
                                          read_device)
                       : read_all<Device>(conn.query("SELECT " OUTPOST_PG_DEVICE_COLUMNS
                                                     " FROM devices ORDER BY id"),
                                          read_device);
    if (!devices) return devices;
    // Labels are filtered here, as in the SQLite backend: fleets are thousands of rows.
    std::erase_if(*devices, [&](const Device& device) {
      return !labels_match(device.labels, filter.labels);
    });
    return devices;
  });
}

Result<std::set<std::string>> PostgresStore::lock_devices(Connection& conn,
                                                          const std::vector<std::string>& ids) {
  // LockRows runs above the sort: the rows are locked in id order.
  auto rows =
      conn.query("SELECT id FROM devices WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", ids);
  if (!rows) return make_error(std::move(rows).error());
  std::set<std::string> found;
  for (int i = 0; i < rows->size(); ++i) found.insert(rows->text(i, 0));
  return found;
}

// One device's desired state inside the caller's transaction, in one statement: every SET
// expression reads the row as it was, so the generation moves only when the hash changed.
Result<int64_t> PostgresStore::write_desired_state(Connection& conn, const std::string& id,
                                                   const std::string& desired_json,
                                                   const std::string& desired_hash,
                                                   const std::string& schedule_json) {
  auto rows = conn.query(
      "UPDATE devices SET"
      " generation = generation + CASE WHEN desired_hash <> $3 THEN 1 ELSE 0 END,"
      " desired_json = CASE WHEN desired_hash <> $3 THEN $2 ELSE desired_json END,"
      " desired_hash = $3, schedule_json = $4 WHERE id = $1 RETURNING generation",
      id, desired_json, desired_hash, schedule_json);
  if (!rows) return make_error(std::move(rows).error());
  if (rows->empty()) return make_error(Errc::kNotFound, "device " + id + " not found");
  return rows->i64(0, 0);
}

Result<int64_t> PostgresStore::update_desired_state(const std::string& id,
                                                    const std::string& desired_json,
                                                    const std::string& desired_hash,
                                                    const std::string& schedule_json) {
  return single("updating desired state of device " + id, [&](Connection& conn) {
    return write_desired_state(conn, id, desired_json, desired_hash, schedule_json);
  });
}

Result<std::vector<int64_t>> PostgresStore::update_desired_states(
    const std::vector<DesiredStateWrite>& writes) {
  return transact(Isolation::kReadCommitted,
                  "updating desired states of devices " + std::to_string(writes.size()),
                  [&](Connection& conn) -> Result<std::vector<int64_t>> {
                    std::vector<std::string> ids;
                    ids.reserve(writes.size());
                    for (const auto& w : writes) ids.push_back(w.device_id);
                    auto existing = lock_devices(conn, ids);
                    if (!existing) return make_error(std::move(existing).error());
                    for (const auto& w : writes) {
                      if (!existing->contains(w.device_id)) {
                        return make_error(Errc::kNotFound, "device " + w.device_id + " not found");
                      }
                    }
                    std::vector<int64_t> out;
                    out.reserve(writes.size());
                    for (const auto& w : writes) {
                      auto generation = write_desired_state(conn, w.device_id, w.desired_json,
                                                            w.desired_hash, w.schedule_json);
                      if (!generation) return make_error(std::move(generation).error());
                      out.push_back(*generation);
                    }
                    return out;
                  });
}

// One report inside the caller's transaction, the device's row locked (lock_devices) or
// locked here. kNotFound (before any write) when the device does not exist.
Result<bool> PostgresStore::write_device_status(Connection& conn, const std::string& id,
                                                int64_t seq, const std::string& status_json,
                                                int64_t now_ms, int64_t keep_log) {
  auto current = conn.query("SELECT status_seq FROM devices WHERE id = $1 FOR UPDATE", id);
  if (!current) return make_error(std::move(current).error());
  if (current->empty()) return make_error(Errc::kNotFound, "device " + id + " not found");
  const int64_t current_seq = current->i64(0, 0);
  if (seq > 0) {
    auto inserted = conn.query(
        "INSERT INTO device_status_log (device_id, seq, received_at, status_json)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (device_id, seq) DO NOTHING",
        id, seq, now_ms, status_json);
    if (!inserted) return make_error(std::move(inserted).error());
    if (inserted->affected() == 0) return false;
    OUTPOST_TRY(
        conn.query("DELETE FROM device_status_log WHERE device_id = $1 AND seq <= (SELECT seq FROM"
                   " device_status_log WHERE device_id = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)",
                   id, keep_log));
  }
  if (seq == 0 || seq > current_seq) {
    OUTPOST_TRY(conn.query(
        "UPDATE devices SET status_json = $1, status_at = $2, status_seq = $3 WHERE id = $4",
        status_json, now_ms, std::max(seq, current_seq), id));
  }
  return true;
}

Result<bool> PostgresStore::record_device_status(const std::string& id, int64_t seq,
                                                 const std::string& status_json, int64_t now_ms,
                                                 int64_t keep_log) {
  return transact(Isolation::kReadCommitted, "recording status of device " + id,
                  [&](Connection& conn) {
                    return write_device_status(conn, id, seq, status_json, now_ms, keep_log);
                  });
}

Result<std::vector<Result<bool>>> PostgresStore::record_device_statuses(
    const std::vector<DeviceStatusWrite>& writes, int64_t keep_log) {
  auto grouped = transact(Isolation::kReadCommitted,
                          "recording status reports of devices " + std::to_string(writes.size()),
                          [&](Connection& conn) -> Result<std::vector<Result<bool>>> {
                            std::vector<std::string> ids;
                            ids.reserve(writes.size());
                            for (const auto& w : writes) ids.push_back(w.device_id);
                            OUTPOST_TRY(lock_devices(conn, ids));
                            std::vector<Result<bool>> out;
                            out.reserve(writes.size());
                            for (const auto& w : writes) {
                              auto one = write_device_status(conn, w.device_id, w.seq,
                                                             w.status_json, w.now_ms, keep_log);
                              // kNotFound is checked before anything is written: it fails alone.
                              if (!one && one.error().code != Errc::kNotFound)
                                return make_error(one.error());
                              out.push_back(std::move(one));
                            }
                            return out;
                          });
  if (grouped) return grouped;
  std::vector<Result<bool>> out;
  out.reserve(writes.size());
  for (const auto& w : writes) {
    out.push_back(record_device_status(w.device_id, w.seq, w.status_json, w.now_ms, keep_log));
  }
  return out;
}

Result<std::vector<StatusReport>> PostgresStore::list_device_status_log(const std::string& id,
                                                                        int64_t limit) {
  return single("listing status log of device " + id, [&](Connection& conn) {
    return read_all<StatusReport>(
        conn.query("SELECT seq, received_at, status_json FROM (SELECT seq, received_at,"
                   " status_json FROM device_status_log WHERE device_id = $1 ORDER BY seq DESC"
                   " LIMIT $2) AS newest ORDER BY seq",
                   id, limit),
        [](const Rows& r, int i) {
          return StatusReport{r.i64(i, 0), r.i64(i, 1), r.text(i, 2)};
        });
  });
}

Status PostgresStore::update_device_facts(const std::string& id, const std::string& facts_json) {
  return single("updating facts of device " + id, [&](Connection& conn) {
    return expect_changed(
        conn.query("UPDATE devices SET facts_json = $1 WHERE id = $2", facts_json, id),
        "device " + id);
  });
}

Status PostgresStore::touch_device(const std::string& id, int64_t now_ms) {
  return single("touching device " + id, [&](Connection& conn) {
    // GREATEST: concurrent requests may finish out of order; last_seen must not go back.
    return expect_changed(
        conn.query("UPDATE devices SET last_seen = GREATEST(last_seen, $1) WHERE id = $2", now_ms,
                   id),
        "device " + id);
  });
}

Result<int64_t> PostgresStore::touch_devices(
    const std::vector<std::pair<std::string, int64_t>>& seen) {
  if (seen.empty()) return int64_t{0};
  return transact(
      Isolation::kReadCommitted, "touching devices " + std::to_string(seen.size()),
      [&](Connection& conn) -> Result<int64_t> {
        std::vector<std::string> ids;
        std::vector<int64_t> times;
        ids.reserve(seen.size());
        times.reserve(seen.size());
        for (const auto& [id, at] : seen) {
          ids.push_back(id);
          times.push_back(at);
        }
        auto existing = lock_devices(conn, ids);
        if (!existing) return make_error(std::move(existing).error());
        // One statement for the whole batch (the sync path sends thousands): the newest time
        // per device, never moving last_seen back.
        OUTPOST_TRY(conn.query(
            "UPDATE devices AS d SET last_seen = GREATEST(d.last_seen, s.at) FROM (SELECT id,"
            " MAX(at) AS at FROM unnest($1::text[], $2::int8[]) AS u(id, at) GROUP BY id) AS s"
            " WHERE d.id = s.id",
            ids, times));
        // Counted per entry, as the SQLite backend does (one touch per pair).
        int64_t updated = 0;
        for (const auto& id : ids) updated += existing->contains(id) ? 1 : 0;
        return updated;
      });
}

Status PostgresStore::set_device_cordoned(const std::string& id, bool cordoned) {
  return single("cordoning device " + id, [&](Connection& conn) {
    return expect_changed(
        conn.query("UPDATE devices SET cordoned = $1 WHERE id = $2", cordoned, id), "device " + id);
  });
}

Status PostgresStore::set_device_revoked(const std::string& id, int64_t revoked_at) {
  return single("revoking device " + id, [&](Connection& conn) {
    return expect_changed(
        conn.query("UPDATE devices SET revoked_at = $1 WHERE id = $2", revoked_at, id),
        "device " + id);
  });
}

// ---- Release metadata ----

Result<bool> PostgresStore::put_release_document(const ReleaseDocument& doc) {
  return single("storing release metadata " + doc.role, [&](Connection& conn) -> Result<bool> {
    auto rows = conn.query(
        "INSERT INTO release_metadata (role, version, body, created_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (role, version) DO NOTHING",
        doc.role, doc.version, doc.body, doc.created_at);
    if (!rows) return make_error(std::move(rows).error());
    return rows->affected() == 1;
  });
}

Result<std::optional<ReleaseDocument>> PostgresStore::get_release_document(const std::string& role,
                                                                           int64_t version) {
  return single("reading release metadata " + role, [&](Connection& conn) {
    auto rows = version > 0 ? conn.query(
                                  "SELECT role, version, body, created_at FROM release_metadata"
                                  " WHERE role = $1 AND version = $2",
                                  role, version)
                            : conn.query(
                                  "SELECT role, version, body, created_at FROM release_metadata"
                                  " WHERE role = $1 ORDER BY version DESC LIMIT 1",
                                  role);
    return read_one<ReleaseDocument>(rows, [](const Rows& r, int i) {
      return ReleaseDocument{.role = r.text(i, 0),
                             .version = r.i64(i, 1),
                             .body = r.text(i, 2),
                             .created_at = r.i64(i, 3)};
    });
  });
}

// ---- Artifacts ----

Result<bool> PostgresStore::put_artifact(const Artifact& artifact) {
  return single("storing artifact " + artifact.digest, [&](Connection& conn) -> Result<bool> {
    auto rows =
        conn.query("INSERT INTO artifacts (" OUTPOST_PG_ARTIFACT_COLUMNS
                   ") VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO NOTHING",
                   artifact.digest, artifact.size, artifact.media_type, artifact.created_at);
    if (!rows) return make_error(std::move(rows).error());
    return rows->affected() == 1;
  });
}

Result<std::optional<Artifact>> PostgresStore::get_artifact(const std::string& digest) {
  return single("reading artifact " + digest, [&](Connection& conn) {
    return read_one<Artifact>(
        conn.query("SELECT " OUTPOST_PG_ARTIFACT_COLUMNS " FROM artifacts WHERE digest = $1",
                   digest),
        read_artifact);
  });
}

Result<std::vector<Artifact>> PostgresStore::list_artifacts() {
  return single("listing artifacts", [&](Connection& conn) {
    return read_all<Artifact>(conn.query("SELECT " OUTPOST_PG_ARTIFACT_COLUMNS
                                         " FROM artifacts ORDER BY created_at, digest"),
                              read_artifact);
  });
}

Status PostgresStore::put_artifact_delta(const ArtifactDelta& d) {
  return single("storing delta " + d.target + " from " + d.base, [&](Connection& conn) -> Status {
    OUTPOST_TRY(conn.query(
        "INSERT INTO artifact_deltas (" OUTPOST_PG_DELTA_COLUMNS
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (target, base)"
        " DO UPDATE SET delta = excluded.delta, delta_size = excluded.delta_size,"
        " target_size = excluded.target_size, state = excluded.state,"
        " detail = excluded.detail, created_at = excluded.created_at",
        d.target, d.base, d.delta, d.delta_size, d.target_size, d.state, d.detail, d.created_at));
    return ok();
  });
}

Result<std::vector<ArtifactDelta>> PostgresStore::list_artifact_deltas(const std::string& target) {
  return single("listing deltas " + target, [&](Connection& conn) {
    return read_all<ArtifactDelta>(conn.query("SELECT " OUTPOST_PG_DELTA_COLUMNS
                                              " FROM artifact_deltas WHERE $1 = '' OR target = $1"
                                              " ORDER BY target, base",
                                              target),
                                   read_delta);
  });
}

// ---- Models ----

Status PostgresStore::load_variants(Connection& conn, std::vector<ModelVersion>& versions) {
  if (versions.empty()) return ok();
  std::vector<std::string> names;
  names.reserve(versions.size());
  for (const auto& v : versions) names.push_back(v.version);
  auto rows = conn.query(
      "SELECT version, selector_json, needs_json, artifact_digest, format, metadata_json"
      " FROM model_variants WHERE model = $1 AND version = ANY($2::text[]) ORDER BY version, idx",
      versions.front().model, names);
  if (!rows) return make_error(std::move(rows).error());
  std::map<std::string_view, ModelVersion*> by_name;
  for (auto& v : versions) by_name.emplace(v.version, &v);
  for (int i = 0; i < rows->size(); ++i) {
    auto it = by_name.find(rows->view(i, 0));
    if (it == by_name.end()) continue;
    it->second->variants.push_back(ModelVariant{
        .selector_json = rows->text(i, 1),
        .needs_json = rows->text(i, 2),
        .artifact_digest = rows->text(i, 3),
        .format = rows->text(i, 4),
        .metadata_json = rows->text(i, 5),
    });
  }
  return ok();
}

Result<bool> PostgresStore::put_model_version(const ModelVersion& version) {
  return transact(
      Isolation::kReadCommitted, "storing model " + version.model + " version " + version.version,
      [&](Connection& conn) -> Result<bool> {
        // DO NOTHING waits for a concurrent push of the same version and then reads it.
        auto inserted = conn.query(
            "INSERT INTO model_versions (model, version, content_hash, created_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (model, version) DO NOTHING",
            version.model, version.version, version.content_hash, version.created_at);
        if (!inserted) return make_error(std::move(inserted).error());
        if (inserted->affected() == 0) {
          auto rows = conn.query(
              "SELECT content_hash FROM model_versions WHERE model = $1 AND version = $2",
              version.model, version.version);
          if (!rows) return make_error(std::move(rows).error());
          if (!rows->empty() && rows->view(0, 0) == version.content_hash) return false;
          return make_error(Errc::kConflict, "model " + version.model + " version " +
                                                 version.version +
                                                 " already exists with different content");
        }
        for (size_t i = 0; i < version.variants.size(); ++i) {
          const ModelVariant& variant = version.variants[i];
          OUTPOST_TRY(conn.query(
              "INSERT INTO model_variants (model, version, idx, selector_json, needs_json,"
              " artifact_digest, format, metadata_json) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
              version.model, version.version, static_cast<int64_t>(i), variant.selector_json,
              variant.needs_json, variant.artifact_digest, variant.format, variant.metadata_json));
        }
        return true;
      });
}

Result<std::optional<ModelVersion>> PostgresStore::get_model_version(const std::string& model,
                                                                     const std::string& version) {
  return transact(Isolation::kSnapshotReadOnly, "reading model " + model + " version " + version,
                  [&](Connection& conn) -> Result<std::optional<ModelVersion>> {
                    auto rows = read_all<ModelVersion>(
                        conn.query("SELECT model, version, content_hash, created_at FROM"
                                   " model_versions WHERE model = $1 AND version = $2",
                                   model, version),
                        read_model_version_row);
                    if (!rows) return make_error(std::move(rows).error());
                    OUTPOST_TRY(load_variants(conn, *rows));
                    if (rows->empty()) return std::optional<ModelVersion>();
                    return std::optional<ModelVersion>(std::move(rows->front()));
                  });
}

Result<std::vector<ModelVersion>> PostgresStore::list_model_versions(const std::string& model) {
  return transact(Isolation::kSnapshotReadOnly, "listing versions of model " + model,
                  [&](Connection& conn) -> Result<std::vector<ModelVersion>> {
                    auto rows = read_all<ModelVersion>(
                        conn.query("SELECT model, version, content_hash, created_at FROM"
                                   " model_versions WHERE model = $1 ORDER BY created_at, ord",
                                   model),
                        read_model_version_row);
                    if (!rows) return rows;
                    OUTPOST_TRY(load_variants(conn, *rows));
                    return rows;
                  });
}

Result<std::vector<std::string>> PostgresStore::list_models() {
  return single("listing models", [&](Connection& conn) {
    return read_all<std::string>(
        conn.query("SELECT DISTINCT model FROM model_versions ORDER BY model"),
        [](const Rows& r, int i) { return r.text(i, 0); });
  });
}

// ---- Deployments ----

Result<ApplyOutcome> PostgresStore::apply_deployment(const std::string& name,
                                                     const std::string& manifest_json,
                                                     const std::string& spec_hash,
                                                     const std::string& actor, int64_t now_ms) {
  return transact(
      Isolation::kSerializable, "applying deployment " + name,
      [&](Connection& conn) -> Result<ApplyOutcome> {
        auto current = read_one<Deployment>(
            conn.query("SELECT " OUTPOST_PG_DEPLOYMENT_COLUMNS " FROM deployments WHERE name = $1",
                       name),
            read_deployment);
        if (!current) return make_error(std::move(current).error());
        if (*current && (*current)->spec_hash == spec_hash) {
          return ApplyOutcome{.deployment = std::move(**current), .changed = false};
        }
        // Numbering continues after every revision ever stored under this name, including
        // those of a deleted deployment: a revision number is never reused.
        int64_t last_revision = *current ? (*current)->revision : 0;
        auto stored = conn.query(
            "SELECT COALESCE(MAX(revision), 0)::int8 FROM deployment_revisions WHERE name = $1",
            name);
        if (!stored) return make_error(std::move(stored).error());
        last_revision = std::max(last_revision, stored->i64(0, 0));
        const Deployment next{
            .name = name,
            .revision = last_revision + 1,
            .manifest_json = manifest_json,
            .spec_hash = spec_hash,
            .created_at = *current ? (*current)->created_at : now_ms,
            .updated_at = now_ms,
            .stable_revision = *current ? (*current)->stable_revision : last_revision + 1,
        };
        OUTPOST_TRY(
            conn.query("INSERT INTO deployments (" OUTPOST_PG_DEPLOYMENT_COLUMNS
                       ") VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO UPDATE SET"
                       " revision = excluded.revision, manifest_json = excluded.manifest_json,"
                       " spec_hash = excluded.spec_hash, updated_at = excluded.updated_at",
                       next.name, next.revision, next.manifest_json, next.spec_hash,
                       next.created_at, next.updated_at, next.stable_revision));
        OUTPOST_TRY(
            conn.query("INSERT INTO deployment_revisions (name, revision, manifest_json, spec_hash,"
                       " created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6)",
                       name, next.revision, manifest_json, spec_hash, now_ms, actor));
        return ApplyOutcome{.deployment = next, .changed = true};
      });
}

Result<std::optional<Deployment>> PostgresStore::get_deployment(const std::string& name) {
  return single("reading deployment " + name, [&](Connection& conn) {
    return read_one<Deployment>(
        conn.query("SELECT " OUTPOST_PG_DEPLOYMENT_COLUMNS " FROM deployments WHERE name = $1",
                   name),
        read_deployment);
  });
}

Result<std::vector<Deployment>> PostgresStore::list_deployments() {
  return single("listing deployments", [&](Connection& conn) {
    return read_all<Deployment>(
        conn.query("SELECT " OUTPOST_PG_DEPLOYMENT_COLUMNS " FROM deployments ORDER BY name"),
        read_deployment);
  });
}

Result<std::vector<DeploymentRevision>> PostgresStore::list_deployment_revisions(
    const std::string& name) {
  return single("listing revisions of deployment " + name, [&](Connection& conn) {
    return read_all<DeploymentRevision>(
        conn.query("SELECT name, revision, manifest_json, spec_hash, created_at, created_by,"
                   " bad_reason FROM deployment_revisions WHERE name = $1 ORDER BY revision",
                   name),
        [](const Rows& r, int i) {
          return DeploymentRevision{
              .name = r.text(i, 0),
              .revision = r.i64(i, 1),
              .manifest_json = r.text(i, 2),
              .spec_hash = r.text(i, 3),
              .created_at = r.i64(i, 4),
              .created_by = r.text(i, 5),
              .bad_reason = r.text(i, 6),
          };
        });
  });
}

Status PostgresStore::delete_deployment(const std::string& name) {
  return transact(
      Isolation::kSerializable, "deleting deployment " + name, [&](Connection& conn) -> Status {
        OUTPOST_TRY(expect_changed(conn.query("DELETE FROM deployments WHERE name = $1", name),
                                   "deployment " + name));
        OUTPOST_TRY(conn.query("DELETE FROM revision_assignments WHERE deployment = $1", name));
        OUTPOST_TRY(
            conn.query("UPDATE rollouts SET state = 'aborted' WHERE deployment = $1 AND state IN"
                       " ('running', 'paused')",
                       name));
        return ok();
      });
}

// ---- Rollouts ----

Result<int64_t> PostgresStore::create_rollout(const Rollout& rollout) {
  return transact(
      Isolation::kSerializable, "creating a rollout of deployment " + rollout.deployment,
      [&](Connection& conn) -> Result<int64_t> {
        OUTPOST_TRY(conn.query(
            "UPDATE rollouts SET state = 'superseded', updated_at = $1 WHERE deployment = $2 AND"
            " state IN ('running', 'paused')",
            rollout.created_at, rollout.deployment));
        auto rows = conn.query(
            "INSERT INTO rollouts (deployment, from_revision, to_revision, state, doc_json,"
            " created_at, updated_at, created_by) VALUES ($1, $2, $3, 'running', $4, $5, $5, $6)"
            " RETURNING id",
            rollout.deployment, rollout.from_revision, rollout.to_revision, rollout.doc_json,
            rollout.created_at, rollout.created_by);
        if (!rows) return make_error(std::move(rows).error());
        return rows->i64(0, 0);
      });
}

Status PostgresStore::update_rollout(const RolloutUpdate& u) {
  const Rollout& r = u.rollout;
  return transact(
      Isolation::kSerializable, "updating rollout of deployment " + r.deployment,
      [&](Connection& conn) -> Status {
        OUTPOST_TRY(expect_changed(
            conn.query("UPDATE rollouts SET from_revision = $1, to_revision = $2, state = $3,"
                       " doc_json = $4, updated_at = $5 WHERE id = $6",
                       r.from_revision, r.to_revision, r.state, r.doc_json, r.updated_at, r.id),
            "rollout " + std::to_string(r.id)));
        if (u.clear_assignments) {
          OUTPOST_TRY(
              conn.query("DELETE FROM revision_assignments WHERE deployment = $1", r.deployment));
        }
        if (!u.assign.empty()) {
          std::vector<std::string> devices;
          std::vector<int64_t> revisions;
          for (const auto& [device, revision] : u.assign) {
            devices.push_back(device);
            revisions.push_back(revision);
          }
          // One statement for a whole wave. A device named twice keeps its last revision, as
          // one upsert after the other would (DISTINCT ON picks the last by position).
          OUTPOST_TRY(conn.query(
              "INSERT INTO revision_assignments (deployment, device_id, revision)"
              " SELECT DISTINCT ON (device) $1, device, revision FROM unnest($2::text[],"
              " $3::int8[]) WITH ORDINALITY AS a(device, revision, n) ORDER BY device, n DESC"
              " ON CONFLICT (deployment, device_id) DO UPDATE SET revision = excluded.revision",
              r.deployment, devices, revisions));
        }
        if (!u.unassign.empty()) {
          OUTPOST_TRY(
              conn.query("DELETE FROM revision_assignments WHERE deployment = $1 AND device_id ="
                         " ANY($2::text[])",
                         r.deployment, u.unassign));
        }
        if (u.stable_revision) {
          OUTPOST_TRY(conn.query("UPDATE deployments SET stable_revision = $1 WHERE name = $2",
                                 *u.stable_revision, r.deployment));
        }
        if (u.reset_to_revision) {
          OUTPOST_TRY(expect_changed(
              conn.query("UPDATE deployments SET revision = r.revision, manifest_json ="
                         " r.manifest_json, spec_hash = r.spec_hash, updated_at = $1 FROM"
                         " deployment_revisions AS r WHERE deployments.name = $2 AND r.name ="
                         " deployments.name AND r.revision = $3",
                         r.updated_at, r.deployment, *u.reset_to_revision),
              "revision " + std::to_string(*u.reset_to_revision) + " of deployment " +
                  r.deployment));
        }
        if (u.mark_bad) {
          OUTPOST_TRY(expect_changed(
              conn.query("UPDATE deployment_revisions SET bad_reason = $1 WHERE name = $2 AND"
                         " revision = $3",
                         u.mark_bad->second, r.deployment, u.mark_bad->first),
              "revision " + std::to_string(u.mark_bad->first) + " of deployment " + r.deployment));
        }
        return ok();
      });
}

Result<std::optional<Rollout>> PostgresStore::get_rollout(int64_t id) {
  return single("reading rollout " + std::to_string(id), [&](Connection& conn) {
    return read_one<Rollout>(
        conn.query("SELECT " OUTPOST_PG_ROLLOUT_COLUMNS " FROM rollouts WHERE id = $1", id),
        read_rollout);
  });
}

Result<std::vector<Rollout>> PostgresStore::list_rollouts(const std::string& deployment,
                                                          bool active_only, int64_t limit) {
  return single("listing rollouts " + deployment, [&](Connection& conn) {
    return read_all<Rollout>(
        conn.query("SELECT " OUTPOST_PG_ROLLOUT_COLUMNS
                   " FROM rollouts WHERE ($1 = '' OR deployment = $1) AND (NOT $2 OR state IN"
                   " ('running', 'paused')) ORDER BY id DESC LIMIT $3",
                   deployment, active_only, limit),
        read_rollout);
  });
}

Result<std::vector<RevisionAssignment>> PostgresStore::list_revision_assignments(
    const std::string& deployment) {
  return single("listing revision assignments " + deployment, [&](Connection& conn) {
    return read_all<RevisionAssignment>(
        conn.query("SELECT deployment, device_id, revision FROM revision_assignments"
                   " WHERE ($1 = '' OR deployment = $1) ORDER BY deployment, device_id",
                   deployment),
        [](const Rows& r, int i) {
          return RevisionAssignment{r.text(i, 0), r.text(i, 1), r.i64(i, 2)};
        });
  });
}

// ---- Secrets ----

Status PostgresStore::put_secret_version(const SecretVersion& v, int64_t now_ms) {
  const std::string operation =
      "storing secret " + v.name + " version " + std::to_string(v.version);
  if (v.version < 1) {
    return make_error(Errc::kInvalidArgument, "secret " + v.name + ": versions start at 1");
  }
  return transact(Isolation::kSerializable, operation, [&](Connection& conn) -> Status {
    auto rows = conn.query(
        "SELECT (SELECT COALESCE(MAX(version), 0)::int8 FROM secret_versions WHERE name = $1)"
        " FROM secrets WHERE name = $1",
        v.name);
    if (!rows) return make_error(std::move(rows).error());
    const std::optional<int64_t> newest =
        rows->empty() ? std::nullopt : std::optional<int64_t>(rows->i64(0, 0));
    if (v.version == 1) {
      if (newest) {
        return make_error(Errc::kAlreadyExists, "secret " + v.name + " already exists", "name");
      }
      OUTPOST_TRY(
          conn.query("INSERT INTO secrets (name, created_at, updated_at) VALUES ($1, $2, $2)",
                     v.name, v.created_at));
    } else {
      if (!newest) {
        return make_error(Errc::kNotFound, "secret " + v.name + " does not exist", "name");
      }
      if (*newest != v.version - 1) {
        return make_error(Errc::kConflict, "secret " + v.name + " is at version " +
                                               std::to_string(*newest) + ", not " +
                                               std::to_string(v.version - 1) +
                                               " (changed meanwhile); try again");
      }
      OUTPOST_TRY(
          conn.query("UPDATE secrets SET updated_at = $1 WHERE name = $2", v.created_at, v.name));
    }
    OUTPOST_TRY(
        conn.query("INSERT INTO secret_versions (name, version, keys_json, ciphertext, activate_at,"
                   " created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                   v.name, v.version, nlohmann::json(v.keys).dump(), v.ciphertext, v.activate_at,
                   v.created_at, v.created_by));
    // What no device needs any more: versions before the one active now.
    OUTPOST_TRY(conn.query(
        "DELETE FROM secret_versions WHERE name = $1 AND version < (SELECT COALESCE(MAX(version),"
        " 0) FROM secret_versions WHERE name = $1 AND activate_at <= $2)",
        v.name, now_ms));
    return ok();
  });
}

Result<std::vector<Secret>> PostgresStore::read_secrets(const std::string& operation,
                                                        const std::string& name) {
  return transact(
      Isolation::kSnapshotReadOnly, operation,
      [&](Connection& conn) -> Result<std::vector<Secret>> {
        auto secrets = read_all<Secret>(
            conn.query("SELECT name, created_at, updated_at FROM secrets WHERE $1 = '' OR name = $1"
                       " ORDER BY name",
                       name),
            [](const Rows& r, int i) {
              return Secret{
                  .name = r.text(i, 0), .created_at = r.i64(i, 1), .updated_at = r.i64(i, 2)};
            });
        if (!secrets) return secrets;
        auto versions = read_all<SecretVersion>(
            conn.query("SELECT name, version, keys_json, ciphertext, activate_at, created_at,"
                       " created_by FROM secret_versions WHERE $1 = '' OR name = $1"
                       " ORDER BY name, version",
                       name),
            [](const Rows& r, int i) -> Result<SecretVersion> {
              SecretVersion v{.name = r.text(i, 0),
                              .version = r.i64(i, 1),
                              .keys = {},
                              .ciphertext = r.text(i, 3),
                              .activate_at = r.i64(i, 4),
                              .created_at = r.i64(i, 5),
                              .created_by = r.text(i, 6)};
              auto keys = strings_from_json(
                  r.text(i, 2), "secret " + v.name + " version " + std::to_string(v.version),
                  "key names");
              if (!keys) return make_error(std::move(keys).error());
              v.keys = std::move(*keys);
              return v;
            });
        if (!versions) return make_error(std::move(versions).error());
        size_t at = 0;
        for (auto& v : *versions) {
          while (at < secrets->size() && (*secrets)[at].name < v.name) ++at;
          if (at < secrets->size() && (*secrets)[at].name == v.name) {
            (*secrets)[at].versions.push_back(std::move(v));
          }
        }
        return secrets;
      });
}

Result<std::optional<Secret>> PostgresStore::get_secret(const std::string& name) {
  if (name.empty()) return std::optional<Secret>();
  auto found = read_secrets("reading secret " + name, name);
  if (!found) return make_error(std::move(found).error());
  if (found->empty()) return std::optional<Secret>();
  return std::optional<Secret>(std::move(found->front()));
}

Result<std::vector<Secret>> PostgresStore::list_secrets() {
  return read_secrets("listing secrets", "");
}

Status PostgresStore::delete_secret(const std::string& name) {
  return transact(Isolation::kReadCommitted, "deleting secret " + name,
                  [&](Connection& conn) -> Status {
                    OUTPOST_TRY(conn.query("DELETE FROM secret_versions WHERE name = $1", name));
                    return expect_changed(conn.query("DELETE FROM secrets WHERE name = $1", name),
                                          "secret " + name);
                  });
}

// ---- Sites ----

Status PostgresStore::put_site(const Site& site) {
  return single("writing site " + site.name, [&](Connection& conn) -> Status {
    OUTPOST_TRY(
        conn.query("INSERT INTO sites (name, timezone, region, updated_at) VALUES ($1, $2, $3, $4)"
                   " ON CONFLICT (name) DO UPDATE SET timezone = excluded.timezone,"
                   " region = excluded.region, updated_at = excluded.updated_at",
                   site.name, site.timezone, site.region, site.updated_at));
    return ok();
  });
}

Result<std::optional<Site>> PostgresStore::get_site(const std::string& name) {
  return single("reading site " + name, [&](Connection& conn) {
    return read_one<Site>(
        conn.query("SELECT name, timezone, region, updated_at FROM sites WHERE name = $1", name),
        read_site);
  });
}

Result<std::vector<Site>> PostgresStore::list_sites() {
  return single("listing sites", [&](Connection& conn) {
    return read_all<Site>(
        conn.query("SELECT name, timezone, region, updated_at FROM sites ORDER BY name"),
        read_site);
  });
}

// ---- Audit ----

Result<AuditEntry> PostgresStore::append_audit(const std::string& actor, const std::string& action,
                                               const std::string& target,
                                               const std::string& details_json, int64_t now_ms) {
  return transact(
      Isolation::kReadCommitted, "appending audit entry " + action + " " + target,
      [&](Connection& conn) -> Result<AuditEntry> {
        // One appender at a time on the whole database (every server): the lock conflicts with
        // itself and with writes, not with readers. The head is read after it is granted, so
        // (READ COMMITTED) it is the newest committed one and the chain cannot fork.
        OUTPOST_TRY(conn.exec_script("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE"));
        AuditEntry entry{
            .seq = 1,
            .time = now_ms,
            .actor = actor,
            .action = action,
            .target = target,
            .details_json = details_json,
            .prev_hash = "",
            .hash = "",
        };
        auto head = conn.query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1");
        if (!head) return make_error(std::move(head).error());
        if (!head->empty()) {
          entry.seq = head->i64(0, 0) + 1;
          entry.prev_hash = head->text(0, 1);
        }
        entry.hash = audit_entry_hash(entry);
        OUTPOST_TRY(conn.query("INSERT INTO audit_log (" OUTPOST_PG_AUDIT_COLUMNS
                               ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                               entry.seq, entry.time, entry.actor, entry.action, entry.target,
                               entry.details_json, entry.prev_hash, entry.hash));
        return entry;
      });
}

Result<std::vector<AuditEntry>> PostgresStore::list_audit(int64_t since_ms, int64_t limit) {
  if (limit < 0) {
    return make_error(Errc::kInvalidArgument,
                      "audit limit must be 0 or more, got " + std::to_string(limit), "limit");
  }
  return single("listing audit entries", [&](Connection& conn) {
    // Chain order (seq) is the order of record; times come from callers' clocks.
    return read_all<AuditEntry>(conn.query("SELECT " OUTPOST_PG_AUDIT_COLUMNS
                                           " FROM audit_log WHERE time >= $1 ORDER BY seq LIMIT $2",
                                           since_ms, limit),
                                read_audit_entry);
  });
}

#undef OUTPOST_PG_OPERATOR_TOKEN_COLUMNS
#undef OUTPOST_PG_ENROLLMENT_TOKEN_COLUMNS
#undef OUTPOST_PG_DEVICE_COLUMNS
#undef OUTPOST_PG_ARTIFACT_COLUMNS
#undef OUTPOST_PG_DELTA_COLUMNS
#undef OUTPOST_PG_DEPLOYMENT_COLUMNS
#undef OUTPOST_PG_ROLLOUT_COLUMNS
#undef OUTPOST_PG_AUDIT_COLUMNS

}  // namespace

Result<std::unique_ptr<Store>> open_postgres_store(const std::string& url,
                                                   std::span<const Migration> migrations) {
  const std::string shown = redact_store_url(url);
  try {
    auto split = split_pool_size(url, shown);
    if (!split) return make_error(std::move(split).error());
    auto store = std::make_unique<PostgresStore>(split->first, shown, split->second);
    OUTPOST_TRY(store->migrate(migrations));
    return std::unique_ptr<Store>(std::move(store));
  } catch (const std::exception& e) {
    return make_error(Errc::kInternal, "opening store " + shown + ": " + e.what());
  }
}

}  // namespace outpost::store::postgres
