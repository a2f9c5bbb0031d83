// SQLite backend of the Store.
//
// Concurrency: one connection guarded by one mutex (SqliteStore::mu_). Every public method
// takes the mutex for its whole duration, so methods are atomic with respect to each other
// inside this process and the connection, its statement cache and its error state are
// never shared between threads. SQLite serializes writers anyway and the control plane's
// write load is small, so a connection pool would buy little. Other processes opening the
// same file are handled by WAL, busy_timeout and BEGIN IMMEDIATE (which takes the write
// lock up front, so a transaction never fails half-way on a read-to-write upgrade).
#include "store/sqlite/sqlite_store.h"

#include <sqlite3.h>

#include <algorithm>
#include <cassert>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>

#include <nlohmann/json.hpp>

#include "store/internal/json_columns.h"
#include "store/sqlite/page_cache.h"
#include "store/sqlite/sqlite_errors.h"
#include "store/sqlite/sqlite_telemetry.h"

namespace outpost::store::sqlite {

Errc errc_for(int rc) {
  switch (rc) {
    case SQLITE_CONSTRAINT_PRIMARYKEY:
    case SQLITE_CONSTRAINT_UNIQUE:
      return Errc::kAlreadyExists;
    case SQLITE_CONSTRAINT_FOREIGNKEY:
      return Errc::kFailedPrecondition;
    default:
      break;
  }
  switch (rc & 0xff) {
    case SQLITE_CONSTRAINT:
      return Errc::kInvalidArgument;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return Errc::kUnavailable;
    case SQLITE_FULL:
    case SQLITE_NOMEM:
      return Errc::kResourceExhausted;
    case SQLITE_TOOBIG:
      return Errc::kPayloadTooLarge;
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
    case SQLITE_NOLFS:
    case SQLITE_PROTOCOL:
      return Errc::kIo;
    default:
      return Errc::kInternal;
  }
}

namespace {

// How long a statement waits for another process's write lock before failing kUnavailable.
constexpr int kBusyTimeoutMs = 5000;

struct DbCloser {
  void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
};
using DbPtr = std::unique_ptr<sqlite3, DbCloser>;

struct StmtFinalizer {
  void operator()(sqlite3_stmt* stmt) const { sqlite3_finalize(stmt); }
};
using StmtPtr = std::unique_ptr<sqlite3_stmt, StmtFinalizer>;

using internal::iso_time;
using internal::labels_from_json;
using internal::labels_match;
using internal::labels_to_json;
using internal::wall_clock_ms;

class Connection;

// A prepared statement borrowed from the connection's cache (or owned, when the cached one
// is already in use). Resets itself and clears its bindings when it goes out of scope, so
// the next user starts clean and no implicit read transaction stays open.
class Statement {
 public:
  Statement(Connection* conn, sqlite3_stmt* stmt, bool* in_use, StmtPtr owned)
      : conn_(conn), stmt_(stmt), in_use_(in_use), owned_(std::move(owned)) {}
  Statement(Statement&& other) noexcept
      : conn_(other.conn_),
        stmt_(std::exchange(other.stmt_, nullptr)),
        in_use_(std::exchange(other.in_use_, nullptr)),
        owned_(std::move(other.owned_)),
        bind_rc_(other.bind_rc_) {}
  Statement& operator=(Statement&&) = delete;
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  ~Statement() {
    if (stmt_ == nullptr) {
      return;
    }
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
    if (in_use_ != nullptr) {
      *in_use_ = false;
    }
  }

  // Binds the parameters in order (?1, ?2, ...). A failure is reported by the next step().
  template <typename... Args>
  Statement& bind(const Args&... args) {
    int index = 0;
    (bind_one(++index, args), ...);
    return *this;
  }

  // Steps once: true when a row is ready, false when the statement is done.
  [[nodiscard]] Result<bool> step();
  // Runs a statement that returns no rows.
  [[nodiscard]] Status run() {
    auto stepped = step();
    if (!stepped) {
      return make_error(std::move(stepped).error());
    }
    return ok();
  }

  int64_t int64(int col) const { return sqlite3_column_int64(stmt_, col); }
  std::optional<int64_t> optional_int64(int col) const {
    if (sqlite3_column_type(stmt_, col) == SQLITE_NULL) {
      return std::nullopt;
    }
    return int64(col);
  }
  std::string text(int col) const {
    const auto* data = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
    if (data == nullptr) {
      return {};
    }
    return std::string(data, static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
  }

 private:
  template <typename T>
  void bind_one(int index, const T& value) {
    int rc = SQLITE_OK;
    if constexpr (std::is_same_v<T, std::optional<int64_t>>) {
      rc = value ? sqlite3_bind_int64(stmt_, index, *value) : sqlite3_bind_null(stmt_, index);
    } else if constexpr (std::is_same_v<T, bool>) {
      rc = sqlite3_bind_int(stmt_, index, value ? 1 : 0);
    } else if constexpr (std::is_integral_v<T>) {
      rc = sqlite3_bind_int64(stmt_, index, static_cast<sqlite3_int64>(value));
    } else {
      const std::string_view text(value);
      // A null data pointer would bind SQL NULL; an empty string must stay an empty string.
      rc = sqlite3_bind_text64(stmt_, index, text.data() != nullptr ? text.data() : "", text.size(),
                               SQLITE_TRANSIENT, SQLITE_UTF8);
    }
    if (bind_rc_ == SQLITE_OK) {
      bind_rc_ = rc;
    }
  }

  Connection* conn_;
  sqlite3_stmt* stmt_;
  bool* in_use_;
  StmtPtr owned_;
  int bind_rc_ = SQLITE_OK;
};

class Transaction;

// One SQLite connection with its statement cache. Not thread-safe: SqliteStore serializes
// every use of it with its mutex.
class Connection {
 public:
  explicit Connection(DbPtr db) : db_(std::move(db)) {}

  sqlite3* db() const { return db_.get(); }

  // What the current call is doing ("enrolling device cam-01"); prefixes SQLite's errors.
  void set_operation(std::string operation) { operation_ = std::move(operation); }

  Error error(int rc) const {
    // sqlite3_errmsg describes the last failure on this connection; fall back to the
    // generic text when rc came from elsewhere (a bind).
    const char* detail =
        sqlite3_extended_errcode(db_.get()) == rc ? sqlite3_errmsg(db_.get()) : sqlite3_errstr(rc);
    return Error{errc_for(rc),
                 (operation_.empty() ? std::string("sqlite") : operation_) + ": " + detail};
  }

  [[nodiscard]] Result<Statement> prepare(std::string_view sql) {
    const auto cached = cache_.find(sql);
    if (cached != cache_.end() && !cached->second.in_use) {
      cached->second.in_use = true;
      return Statement(this, cached->second.stmt.get(), &cached->second.in_use, nullptr);
    }
    sqlite3_stmt* raw = nullptr;
    const int rc = sqlite3_prepare_v3(db_.get(), sql.data(), static_cast<int>(sql.size()),
                                      SQLITE_PREPARE_PERSISTENT, &raw, nullptr);
    StmtPtr stmt(raw);
    if (rc != SQLITE_OK) {
      return make_error(error(rc));
    }
    assert(stmt != nullptr && "empty SQL statement");
    if (cached != cache_.end()) {
      // The same SQL is already being stepped further up the stack: use a private copy.
      sqlite3_stmt* ptr = stmt.get();
      return Statement(this, ptr, nullptr, std::move(stmt));
    }
    auto [pos, inserted] = cache_.emplace(std::string(sql), CachedStatement{std::move(stmt)});
    assert(inserted);
    pos->second.in_use = true;
    return Statement(this, pos->second.stmt.get(), &pos->second.in_use, nullptr);
  }

  // Runs one or more statements that return no rows (migration scripts, BEGIN, COMMIT).
  [[nodiscard]] Status exec(const std::string& sql) {
    const int rc = sqlite3_exec(db_.get(), sql.c_str(), nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) {
      return make_error(error(rc));
    }
    return ok();
  }

  int64_t changes() const { return sqlite3_changes(db_.get()); }

  [[nodiscard]] Result<Transaction> begin_write();
  [[nodiscard]] Result<Transaction> begin_read();

 private:
  struct CachedStatement {
    StmtPtr stmt;
    bool in_use = false;
  };

  DbPtr db_;  // declared first: destroyed after the cached statements
  // Keyed by SQL text. Bounded: every query is a literal in this file.
  std::map<std::string, CachedStatement, std::less<>> cache_;
  std::string operation_;
};

Result<bool> Statement::step() {
  if (bind_rc_ != SQLITE_OK) {
    return make_error(conn_->error(bind_rc_));
  }
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) {
    return true;
  }
  if (rc == SQLITE_DONE) {
    return false;
  }
  return make_error(conn_->error(rc));
}

// An open transaction; rolls back on destruction unless committed, so no error path (or
// exception) leaves a transaction open on the connection.
class Transaction {
 public:
  explicit Transaction(Connection* conn) : conn_(conn) {}
  Transaction(Transaction&& other) noexcept : conn_(std::exchange(other.conn_, nullptr)) {}
  Transaction& operator=(Transaction&&) = delete;
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction() {
    // After a failed COMMIT SQLite may already have rolled back (autocommit is on again).
    if (conn_ != nullptr && sqlite3_get_autocommit(conn_->db()) == 0) {
      sqlite3_exec(conn_->db(), "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }

  [[nodiscard]] Status commit() {
    OUTPOST_TRY(conn_->exec("COMMIT"));
    conn_ = nullptr;
    return ok();
  }

 private:
  Connection* conn_;
};

Result<Transaction> Connection::begin_write() {
  OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
  return Transaction(this);
}

// A deferred transaction for multi-statement reads: one consistent snapshot.
Result<Transaction> Connection::begin_read() {
  OUTPOST_TRY(exec("BEGIN"));
  return Transaction(this);
}

// Runs a query expected to return exactly one row and hands back its first column.
Result<int64_t> query_int64(Connection& conn, std::string_view sql) {
  auto stmt = conn.prepare(sql);
  if (!stmt) {
    return make_error(std::move(stmt).error());
  }
  auto row = stmt->step();
  if (!row) {
    return make_error(std::move(row).error());
  }
  if (!*row) {
    return make_error(Errc::kInternal, "query returned no row: " + std::string(sql));
  }
  return stmt->int64(0);
}

// Column lists shared by the queries that read whole rows, in the order read_*() expects.
#define OUTPOST_OPERATOR_TOKEN_COLUMNS \
  "id, token_hash, role, name, created_at, sites_json, revoked_at"
#define OUTPOST_ENROLLMENT_TOKEN_COLUMNS \
  "id, token_hash, site, labels_json, uses_left, expires_at, created_at, created_by"
#define OUTPOST_DEVICE_COLUMNS                                                                \
  "id, site, labels_json, facts_json, public_key, credential_hash, enrolled_at, last_seen, "  \
  "generation, desired_json, desired_hash, status_json, status_at, schedule_json, cordoned, " \
  "revoked_at"
#define OUTPOST_ARTIFACT_COLUMNS "digest, size, media_type, created_at"
#define OUTPOST_DEPLOYMENT_COLUMNS \
  "name, revision, manifest_json, spec_hash, created_at, updated_at, stable_revision"
#define OUTPOST_AUDIT_COLUMNS "seq, time, actor, action, target, details_json, prev_hash, hash"

Result<std::string> sites_to_json(const std::vector<std::string>& sites) {
  return internal::strings_to_json(sites, "sites");
}

Result<OperatorToken> read_operator_token(const Statement& s) {
  OperatorToken token{
      .id = s.text(0),
      .token_hash = s.text(1),
      .role = s.text(2),
      .name = s.text(3),
      .created_at = s.int64(4),
      .sites = {},
      .revoked_at = s.int64(6),
  };
  const std::string text = s.text(5);
  const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!json.is_array()) {
    return make_error(Errc::kInternal, "operator token " + token.id +
                                           ": stored sites are not a JSON array: " + text);
  }
  for (const auto& site : json) {
    if (!site.is_string()) {
      return make_error(Errc::kInternal, "operator token " + token.id +
                                             ": stored site is not a string: " + site.dump());
    }
    token.sites.push_back(site.get<std::string>());
  }
  return token;
}

Result<EnrollmentToken> read_enrollment_token(const Statement& s) {
  EnrollmentToken token{
      .id = s.text(0),
      .token_hash = s.text(1),
      .site = s.text(2),
      .labels = {},
      .uses_left = s.optional_int64(4),
      .expires_at = s.optional_int64(5),
      .created_at = s.int64(6),
      .created_by = s.text(7),
  };
  auto labels = labels_from_json(s.text(3), "enrollment token " + token.id);
  if (!labels) {
    return make_error(std::move(labels).error());
  }
  token.labels = std::move(*labels);
  return token;
}

Result<Device> read_device(const Statement& s) {
  Device device{
      .id = s.text(0),
      .site = s.text(1),
      .labels = {},
      .facts_json = s.text(3),
      .public_key = s.text(4),
      .credential_hash = s.text(5),
      .enrolled_at = s.int64(6),
      .last_seen = s.int64(7),
      .generation = s.int64(8),
      .desired_json = s.text(9),
      .desired_hash = s.text(10),
      .status_json = s.text(11),
      .status_at = s.int64(12),
      .schedule_json = s.text(13),
      .cordoned = s.int64(14) != 0,
      .revoked_at = s.int64(15),
  };
  auto labels = labels_from_json(s.text(2), "device " + device.id);
  if (!labels) {
    return make_error(std::move(labels).error());
  }
  device.labels = std::move(*labels);
  return device;
}

Artifact read_artifact(const Statement& s) {
  return Artifact{
      .digest = s.text(0),
      .size = s.int64(1),
      .media_type = s.text(2),
      .created_at = s.int64(3),
  };
}

Deployment read_deployment(const Statement& s) {
  return Deployment{
      .name = s.text(0),
      .revision = s.int64(1),
      .manifest_json = s.text(2),
      .spec_hash = s.text(3),
      .created_at = s.int64(4),
      .updated_at = s.int64(5),
      .stable_revision = s.int64(6),
  };
}

Rollout read_rollout(const Statement& s) {
  return Rollout{
      .id = s.int64(0),
      .deployment = s.text(1),
      .from_revision = s.int64(2),
      .to_revision = s.int64(3),
      .state = s.text(4),
      .doc_json = s.text(5),
      .created_at = s.int64(6),
      .updated_at = s.int64(7),
      .created_by = s.text(8),
  };
}

#define OUTPOST_ROLLOUT_COLUMNS                                                           \
  "id, deployment, from_revision, to_revision, state, doc_json, created_at, updated_at, " \
  "created_by"

AuditEntry read_audit_entry(const Statement& s) {
  return AuditEntry{
      .seq = s.int64(0),
      .time = s.int64(1),
      .actor = s.text(2),
      .action = s.text(3),
      .target = s.text(4),
      .details_json = s.text(5),
      .prev_hash = s.text(6),
      .hash = s.text(7),
  };
}

// Reads every row of `stmt` through `read` (returning T or Result<T>).
template <typename T, typename Read>
Result<std::vector<T>> read_all(Statement& stmt, Read read) {
  std::vector<T> rows;
  while (true) {
    auto row = stmt.step();
    if (!row) {
      return make_error(std::move(row).error());
    }
    if (!*row) {
      return rows;
    }
    if constexpr (std::is_same_v<std::invoke_result_t<Read, const Statement&>, T>) {
      rows.push_back(read(stmt));
    } else {
      auto value = read(stmt);
      if (!value) {
        return make_error(std::move(value).error());
      }
      rows.push_back(std::move(*value));
    }
  }
}

// Reads at most one row of `stmt` through `read`.
template <typename T, typename Read>
Result<std::optional<T>> read_one(Statement& stmt, Read read) {
  auto row = stmt.step();
  if (!row) {
    return make_error(std::move(row).error());
  }
  if (!*row) {
    return std::optional<T>();
  }
  if constexpr (std::is_same_v<std::invoke_result_t<Read, const Statement&>, T>) {
    return std::optional<T>(read(stmt));
  } else {
    auto value = read(stmt);
    if (!value) {
      return make_error(std::move(value).error());
    }
    return std::optional<T>(std::move(*value));
  }
}

class SqliteStore final : public Store {
 public:
  explicit SqliteStore(DbPtr db) : conn_(std::move(db)), telemetry_(conn_.db()) {}

  // Sets the connection's pragmas and brings the schema up to date. Called once, before
  // the store is shared.
  [[nodiscard]] Status init(const std::string& path, std::span<const Migration> migrations);

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
  Result<bool> record_device_status(const std::string& id, int64_t seq,
                                    const std::string& status_json, int64_t now_ms,
                                    int64_t keep_log) override;
  Result<std::vector<int64_t>> update_desired_states(
      const std::vector<DesiredStateWrite>& writes) override;
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
    return locked("storing telemetry of device", device_id,
                  [&] { return telemetry_.ingest(device_id, site, batch, now_ms); });
  }
  Result<std::vector<Result<TelemetryIngestOutcome>>> ingest_telemetry_batches(
      const std::vector<TelemetryIngest>& batches, int64_t now_ms) override {
    return locked("storing telemetry batches", std::to_string(batches.size()),
                  [&] { return telemetry_.ingest_many(batches, now_ms); });
  }
  Result<TelemetryMaintenanceOutcome> maintain_telemetry(
      int64_t now_ms, const TelemetryRetention& retention) override {
    return locked("rolling up and expiring telemetry", "",
                  [&] { return telemetry_.maintain(now_ms, retention); });
  }
  Result<TelemetryQueryResult> query_telemetry(const TelemetryQuery& query) override {
    return locked("querying telemetry metric", query.metric,
                  [&] { return telemetry_.query(query); });
  }
  Result<std::vector<TelemetryTotal>> list_telemetry_totals() override {
    return locked("listing telemetry totals", "", [&] { return telemetry_.totals(); });
  }
  Result<std::vector<TelemetryDeviceState>> list_telemetry_devices() override {
    return locked("listing telemetry device state", "", [&] { return telemetry_.devices(); });
  }
  Result<int> schema_version() override;

 private:
  // Runs `fn` holding the mutex, with `verb subject` as the context of SQLite errors, and
  // turns any exception (allocation failure, a JSON library throwing) into kInternal so
  // none crosses the Store boundary. Open transactions roll back while unwinding.
  template <typename Fn>
  auto locked(const char* verb, const std::string& subject, Fn&& fn) -> decltype(fn()) {
    try {
      std::lock_guard lock(mu_);
      conn_.set_operation(subject.empty() ? std::string(verb) : verb + (" " + subject));
      return fn();
    } catch (const std::exception& e) {
      return make_error(Errc::kInternal, std::string(verb) + (subject.empty() ? "" : " ") +
                                             subject + ": " + e.what());
    } catch (...) {
      return make_error(Errc::kInternal, std::string(verb) + (subject.empty() ? "" : " ") +
                                             subject + ": unknown exception");
    }
  }

  // Expects the last UPDATE/DELETE to have hit a row; kNotFound naming `what` otherwise.
  Status expect_changed(const std::string& what) {
    if (conn_.changes() == 0) {
      return make_error(Errc::kNotFound, what + " not found");
    }
    return ok();
  }

  Error operator_token_clash(const OperatorToken& token);
  // Secrets (by name, or every one for ""), with their versions; mu_ held.
  Result<std::vector<Secret>> read_secrets(const std::string& name);
  Status load_variants(ModelVersion& version);
  Result<int64_t> write_desired_state(const std::string& id, const std::string& desired_json,
                                      const std::string& desired_hash,
                                      const std::string& schedule_json);
  Result<bool> write_device_status(const std::string& id, int64_t seq,
                                   const std::string& status_json, int64_t now_ms,
                                   int64_t keep_log);

  std::mutex mu_;
  Connection conn_;  // guarded by mu_
  // Shares conn_'s database handle; declared after it so its statements are finalized first.
  SqliteTelemetry telemetry_;  // guarded by mu_
};

Status SqliteStore::init(const std::string& path, std::span<const Migration> migrations) {
  conn_.set_operation("opening store " + path);
  const bool in_memory = path == ":memory:";
  sqlite3_extended_result_codes(conn_.db(), 1);
  sqlite3_busy_timeout(conn_.db(), kBusyTimeoutMs);
  {
    // The first statement that reads the file: also where "file is not a database" shows.
    auto stmt = conn_.prepare("PRAGMA journal_mode = WAL");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    auto row = stmt->step();
    if (!row) {
      return make_error(std::move(row).error());
    }
    const std::string mode = *row ? stmt->text(0) : "";
    if (mode != (in_memory ? "memory" : "wal")) {
      return make_error(Errc::kIo, "opening store " + path +
                                       ": cannot switch to WAL journal mode (got \"" + mode +
                                       "\"); is the file system local?");
    }
  }
  // FULL: with WAL, NORMAL may lose the last commits on power loss; we promise durability.
  OUTPOST_TRY(conn_.exec("PRAGMA synchronous = FULL"));
  OUTPOST_TRY(conn_.exec("PRAGMA foreign_keys = ON"));
  // Telemetry ingest writes all over the current hours of the points table: a page cache
  // that holds them saves a read per insert (SQLite's default is 2 MB). Grows only as used.
  OUTPOST_TRY(conn_.exec("PRAGMA cache_size = -262144"));
  // Each telemetry point lands on its series' page, so a minute of a fleet's telemetry dirties
  // a page or so per point: checkpointing every 1000 pages (the default) copied nearly every
  // frame to the database again at each commit. 64 MiB of WAL lets a page written several
  // times be copied once (store bench, 100 one-minute batches a transaction: about 2x).
  OUTPOST_TRY(conn_.exec("PRAGMA wal_autocheckpoint = 16384"));

  conn_.set_operation("migrating store " + path);
  OUTPOST_TRY(
      conn_.exec("CREATE TABLE IF NOT EXISTS schema_migrations ("
                 "version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"));
  const int known = migrations.empty() ? 0 : migrations.back().version;
  auto current = query_int64(conn_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
  if (!current) {
    return make_error(std::move(current).error());
  }
  if (*current > known) {
    return make_error(Errc::kFailedPrecondition,
                      "store " + path + " has schema version " + std::to_string(*current) +
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
    conn_.set_operation("applying migration " + std::string(migration.name) + " to " + path);
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    {
      // Checked inside the write transaction: another process may have just applied it.
      auto applied = conn_.prepare("SELECT 1 FROM schema_migrations WHERE version = ?");
      if (!applied) {
        return make_error(std::move(applied).error());
      }
      auto row = applied->bind(migration.version).step();
      if (!row) {
        return make_error(std::move(row).error());
      }
      if (*row) {
        continue;
      }
    }
    OUTPOST_TRY(conn_.exec(std::string(migration.sql)));
    {
      auto record =
          conn_.prepare("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)");
      if (!record) {
        return make_error(std::move(record).error());
      }
      OUTPOST_TRY(record->bind(migration.version, wall_clock_ms()).run());
    }
    OUTPOST_TRY(txn->commit());
  }
  conn_.set_operation({});
  return ok();
}

// ---- Operator tokens ----

// Which unique constraint a write of `token` broke (its name held by another token, or its
// hash), for an error that names the user. Called inside locked().
Error SqliteStore::operator_token_clash(const OperatorToken& token) {
  auto stmt = conn_.prepare("SELECT id FROM operator_tokens WHERE name = ?");
  if (stmt) {
    auto row = stmt->bind(token.name).step();
    if (row && *row && stmt->text(0) != token.id) {
      return Error{Errc::kAlreadyExists, "user " + token.name + " already exists", "name"};
    }
  }
  return Error{Errc::kAlreadyExists,
               "operator token " + token.id + ": another token has the same hash", "token_hash"};
}

Status SqliteStore::put_operator_token(const OperatorToken& token) {
  return locked("storing operator token", token.id, [&]() -> Status {
    auto sites = sites_to_json(token.sites);
    if (!sites) {
      return make_error(std::move(sites).error());
    }
    auto stmt = conn_.prepare(
        "INSERT INTO operator_tokens (" OUTPOST_OPERATOR_TOKEN_COLUMNS
        ") VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
        " token_hash = excluded.token_hash, role = excluded.role, name = excluded.name,"
        " created_at = excluded.created_at, sites_json = excluded.sites_json,"
        " revoked_at = excluded.revoked_at");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    auto done = stmt->bind(token.id, token.token_hash, token.role, token.name, token.created_at,
                           *sites, token.revoked_at)
                    .run();
    if (!done && done.error().code == Errc::kAlreadyExists) {
      return make_error(operator_token_clash(token));
    }
    return done;
  });
}

Status SqliteStore::create_operator_token(const OperatorToken& token) {
  return locked("creating operator token", token.id, [&]() -> Status {
    auto sites = sites_to_json(token.sites);
    if (!sites) {
      return make_error(std::move(sites).error());
    }
    {
      auto taken = conn_.prepare("SELECT revoked_at FROM operator_tokens WHERE name = ? OR id = ?");
      if (!taken) {
        return make_error(std::move(taken).error());
      }
      auto row = taken->bind(token.name, token.id).step();
      if (!row) {
        return make_error(std::move(row).error());
      }
      if (*row) {
        const int64_t revoked_at = taken->int64(0);
        return make_error(Errc::kAlreadyExists,
                          "user " + token.name + " already exists" +
                              (revoked_at > 0 ? " (revoked at " + iso_time(revoked_at) +
                                                    "; a name is never reused)"
                                              : ""),
                          "name");
      }
    }
    auto stmt = conn_.prepare("INSERT INTO operator_tokens (" OUTPOST_OPERATOR_TOKEN_COLUMNS
                              ") VALUES (?, ?, ?, ?, ?, ?, ?)");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    auto done = stmt->bind(token.id, token.token_hash, token.role, token.name, token.created_at,
                           *sites, token.revoked_at)
                    .run();
    if (!done && done.error().code == Errc::kAlreadyExists) {
      return make_error(operator_token_clash(token));
    }
    return done;
  });
}

Result<std::optional<OperatorToken>> SqliteStore::find_operator_token_by_hash(
    const std::string& token_hash) {
  return locked("finding operator token", "", [&]() -> Result<std::optional<OperatorToken>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_OPERATOR_TOKEN_COLUMNS
                              " FROM operator_tokens WHERE token_hash = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<OperatorToken>(stmt->bind(token_hash), read_operator_token);
  });
}

Result<std::optional<OperatorToken>> SqliteStore::find_operator_token_by_name(
    const std::string& name) {
  return locked("finding user", name, [&]() -> Result<std::optional<OperatorToken>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_OPERATOR_TOKEN_COLUMNS
                              " FROM operator_tokens WHERE name = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<OperatorToken>(stmt->bind(name), read_operator_token);
  });
}

Result<std::vector<OperatorToken>> SqliteStore::list_operator_tokens() {
  return locked("listing users", "", [&]() -> Result<std::vector<OperatorToken>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_OPERATOR_TOKEN_COLUMNS
                              " FROM operator_tokens ORDER BY name");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    std::vector<OperatorToken> out;
    while (true) {
      auto row = stmt->step();
      if (!row) {
        return make_error(std::move(row).error());
      }
      if (!*row) {
        break;
      }
      auto token = read_operator_token(*stmt);
      if (!token) {
        return make_error(std::move(token).error());
      }
      out.push_back(std::move(*token));
    }
    return out;
  });
}

Result<OperatorToken> SqliteStore::revoke_operator_token(const std::string& name,
                                                         int64_t revoked_at) {
  return locked("revoking user", name, [&]() -> Result<OperatorToken> {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    {
      auto stmt = conn_.prepare(
          "UPDATE operator_tokens SET revoked_at = ? WHERE name = ? AND revoked_at = 0");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(revoked_at, name).run());
    }
    std::optional<OperatorToken> token;
    {
      auto stmt = conn_.prepare("SELECT " OUTPOST_OPERATOR_TOKEN_COLUMNS
                                " FROM operator_tokens WHERE name = ?");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      auto found = read_one<OperatorToken>(stmt->bind(name), read_operator_token);
      if (!found) {
        return make_error(std::move(found).error());
      }
      token = std::move(*found);
    }
    if (!token) {
      return make_error(Errc::kNotFound, "user " + name + " does not exist", "name");
    }
    OUTPOST_TRY(txn->commit());
    return std::move(*token);
  });
}

// ---- Enrollment ----

Status SqliteStore::put_enrollment_token(const EnrollmentToken& token) {
  return locked("storing enrollment token", token.id, [&]() -> Status {
    auto labels = labels_to_json(token.labels);
    if (!labels) {
      return make_error(std::move(labels).error());
    }
    auto stmt = conn_.prepare("INSERT INTO enrollment_tokens (" OUTPOST_ENROLLMENT_TOKEN_COLUMNS
                              ") VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                              " token_hash = excluded.token_hash, site = excluded.site,"
                              " labels_json = excluded.labels_json, uses_left = excluded.uses_left,"
                              " expires_at = excluded.expires_at, created_at = excluded.created_at,"
                              " created_by = excluded.created_by");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    auto done = stmt->bind(token.id, token.token_hash, token.site, *labels, token.uses_left,
                           token.expires_at, token.created_at, token.created_by)
                    .run();
    if (!done && done.error().code == Errc::kAlreadyExists) {
      return make_error(Errc::kAlreadyExists,
                        "enrollment token " + token.id + ": another token has the same hash",
                        "token_hash");
    }
    return done;
  });
}

Result<std::vector<EnrollmentToken>> SqliteStore::list_enrollment_tokens() {
  return locked("listing enrollment tokens", "", [&]() -> Result<std::vector<EnrollmentToken>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_ENROLLMENT_TOKEN_COLUMNS
                              " FROM enrollment_tokens ORDER BY created_at, id");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_all<EnrollmentToken>(*stmt, read_enrollment_token);
  });
}

Result<std::optional<EnrollmentToken>> SqliteStore::find_enrollment_token_by_hash(
    const std::string& token_hash) {
  return locked("finding enrollment token", "", [&]() -> Result<std::optional<EnrollmentToken>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_ENROLLMENT_TOKEN_COLUMNS
                              " FROM enrollment_tokens WHERE token_hash = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<EnrollmentToken>(stmt->bind(token_hash), read_enrollment_token);
  });
}

Result<EnrollmentToken> SqliteStore::enroll_device(const std::string& token_hash, int64_t now_ms,
                                                   const Device& device) {
  return locked("enrolling device", device.id, [&]() -> Result<EnrollmentToken> {
    auto labels = labels_to_json(device.labels);
    if (!labels) {
      return make_error(std::move(labels).error());
    }
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }

    std::optional<EnrollmentToken> token;
    {
      auto stmt = conn_.prepare("SELECT " OUTPOST_ENROLLMENT_TOKEN_COLUMNS
                                " FROM enrollment_tokens WHERE token_hash = ?");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      auto found = read_one<EnrollmentToken>(stmt->bind(token_hash), read_enrollment_token);
      if (!found) {
        return make_error(std::move(found).error());
      }
      token = std::move(*found);
    }
    // Says nothing about which tokens exist: the caller is not authenticated yet.
    if (!token) {
      return make_error(Errc::kUnauthenticated, "enrollment token is not valid");
    }
    if (token->expires_at && now_ms >= *token->expires_at) {
      return make_error(
          Errc::kFailedPrecondition,
          "enrollment token " + token->id + " expired at " + iso_time(*token->expires_at));
    }
    if (token->uses_left && *token->uses_left <= 0) {
      return make_error(Errc::kFailedPrecondition,
                        "enrollment token " + token->id + " has no uses left");
    }
    if (token->uses_left) {
      auto stmt =
          conn_.prepare("UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE id = ?");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(token->id).run());
    }
    {
      auto stmt = conn_.prepare("INSERT INTO devices (" OUTPOST_DEVICE_COLUMNS
                                ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      auto inserted = stmt->bind(device.id, device.site, *labels, device.facts_json,
                                 device.public_key, device.credential_hash, device.enrolled_at,
                                 device.last_seen, device.generation, device.desired_json,
                                 device.desired_hash, device.status_json, device.status_at,
                                 device.schedule_json, device.cordoned, device.revoked_at)
                          .run();
      if (!inserted && inserted.error().code == Errc::kAlreadyExists) {
        return make_error(Errc::kAlreadyExists, "device " + device.id + " already exists", "id");
      }
      OUTPOST_TRY(std::move(inserted));
    }
    OUTPOST_TRY(txn->commit());
    return std::move(*token);
  });
}

// ---- Devices ----

Result<std::optional<Device>> SqliteStore::get_device(const std::string& id) {
  return locked("reading device", id, [&]() -> Result<std::optional<Device>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_DEVICE_COLUMNS " FROM devices WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<Device>(stmt->bind(id), read_device);
  });
}

Result<std::vector<Device>> SqliteStore::list_devices(const DeviceFilter& filter) {
  return locked("listing devices", "", [&]() -> Result<std::vector<Device>> {
    auto stmt = filter.site
                    ? conn_.prepare("SELECT " OUTPOST_DEVICE_COLUMNS
                                    " FROM devices WHERE site = ? ORDER BY id")
                    : conn_.prepare("SELECT " OUTPOST_DEVICE_COLUMNS " FROM devices ORDER BY id");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    if (filter.site) {
      stmt->bind(*filter.site);
    }
    auto devices = read_all<Device>(*stmt, read_device);
    if (!devices) {
      return devices;
    }
    // Labels are filtered here rather than in SQL: fleets are thousands of rows, not millions,
    // and it keeps the query portable across backends.
    std::erase_if(*devices, [&](const Device& device) {
      return !labels_match(device.labels, filter.labels);
    });
    return devices;
  });
}

// One device's desired state inside the caller's write transaction.
Result<int64_t> SqliteStore::write_desired_state(const std::string& id,
                                                 const std::string& desired_json,
                                                 const std::string& desired_hash,
                                                 const std::string& schedule_json) {
  int64_t generation = 0;
  bool changed = false;
  {
    auto stmt = conn_.prepare("SELECT generation, desired_hash FROM devices WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    auto row = stmt->bind(id).step();
    if (!row) {
      return make_error(std::move(row).error());
    }
    if (!*row) {
      return make_error(Errc::kNotFound, "device " + id + " not found");
    }
    generation = stmt->int64(0);
    changed = stmt->text(1) != desired_hash;
  }
  if (changed) {
    ++generation;
    auto stmt = conn_.prepare(
        "UPDATE devices SET desired_json = ?, desired_hash = ?, schedule_json = ?,"
        " generation = ? WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(desired_json, desired_hash, schedule_json, generation, id).run());
  } else {
    auto stmt = conn_.prepare("UPDATE devices SET schedule_json = ? WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(schedule_json, id).run());
  }
  return generation;
}

Result<int64_t> SqliteStore::update_desired_state(const std::string& id,
                                                  const std::string& desired_json,
                                                  const std::string& desired_hash,
                                                  const std::string& schedule_json) {
  return locked("updating desired state of device", id, [&]() -> Result<int64_t> {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    auto generation = write_desired_state(id, desired_json, desired_hash, schedule_json);
    if (!generation) return generation;
    OUTPOST_TRY(txn->commit());
    return generation;
  });
}

Result<std::vector<int64_t>> SqliteStore::update_desired_states(
    const std::vector<DesiredStateWrite>& writes) {
  return locked("updating desired states of devices", std::to_string(writes.size()),
                [&]() -> Result<std::vector<int64_t>> {
                  auto txn = conn_.begin_write();
                  if (!txn) {
                    return make_error(std::move(txn).error());
                  }
                  std::vector<int64_t> out;
                  out.reserve(writes.size());
                  for (const auto& w : writes) {
                    auto generation = write_desired_state(w.device_id, w.desired_json,
                                                          w.desired_hash, w.schedule_json);
                    if (!generation) return make_error(generation.error());
                    out.push_back(*generation);
                  }
                  OUTPOST_TRY(txn->commit());
                  return out;
                });
}

// One report inside the caller's write transaction. kNotFound (before any write) when the
// device does not exist.
Result<bool> SqliteStore::write_device_status(const std::string& id, int64_t seq,
                                              const std::string& status_json, int64_t now_ms,
                                              int64_t keep_log) {
  int64_t current_seq = 0;
  {
    auto stmt = conn_.prepare("SELECT status_seq FROM devices WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    auto row = stmt->bind(id).step();
    if (!row) {
      return make_error(std::move(row).error());
    }
    if (!*row) {
      return make_error(Errc::kNotFound, "device " + id + " not found");
    }
    current_seq = stmt->int64(0);
  }
  if (seq > 0) {
    auto insert = conn_.prepare(
        "INSERT OR IGNORE INTO device_status_log (device_id, seq, received_at, status_json)"
        " VALUES (?, ?, ?, ?)");
    if (!insert) {
      return make_error(std::move(insert).error());
    }
    OUTPOST_TRY(insert->bind(id, seq, now_ms, status_json).run());
    if (conn_.changes() == 0) return false;
    auto trim = conn_.prepare(
        "DELETE FROM device_status_log WHERE device_id = ? AND seq <= (SELECT seq FROM"
        " device_status_log WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)");
    if (!trim) {
      return make_error(std::move(trim).error());
    }
    OUTPOST_TRY(trim->bind(id, id, keep_log).run());
  }
  if (seq == 0 || seq > current_seq) {
    auto stmt = conn_.prepare(
        "UPDATE devices SET status_json = ?, status_at = ?, status_seq = ? WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(status_json, now_ms, std::max(seq, current_seq), id).run());
  }
  return true;
}

Result<bool> SqliteStore::record_device_status(const std::string& id, int64_t seq,
                                               const std::string& status_json, int64_t now_ms,
                                               int64_t keep_log) {
  return locked("recording status of device", id, [&]() -> Result<bool> {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    auto written = write_device_status(id, seq, status_json, now_ms, keep_log);
    if (!written) return written;
    OUTPOST_TRY(txn->commit());
    return written;
  });
}

Result<std::vector<Result<bool>>> SqliteStore::record_device_statuses(
    const std::vector<DeviceStatusWrite>& writes, int64_t keep_log) {
  auto grouped = locked("recording status reports of devices", std::to_string(writes.size()),
                        [&]() -> Result<std::vector<Result<bool>>> {
                          auto txn = conn_.begin_write();
                          if (!txn) {
                            return make_error(std::move(txn).error());
                          }
                          std::vector<Result<bool>> out;
                          out.reserve(writes.size());
                          for (const auto& w : writes) {
                            auto one = write_device_status(w.device_id, w.seq, w.status_json,
                                                           w.now_ms, keep_log);
                            // kNotFound is checked before anything is written: it fails alone.
                            if (!one && one.error().code != Errc::kNotFound) {
                              return make_error(one.error());
                            }
                            out.push_back(std::move(one));
                          }
                          OUTPOST_TRY(txn->commit());
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

Result<std::vector<StatusReport>> SqliteStore::list_device_status_log(const std::string& id,
                                                                      int64_t limit) {
  return locked("listing status log of device", id, [&]() -> Result<std::vector<StatusReport>> {
    auto stmt = conn_.prepare(
        "SELECT seq, received_at, status_json FROM (SELECT * FROM device_status_log"
        " WHERE device_id = ? ORDER BY seq DESC LIMIT ?) ORDER BY seq");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    stmt->bind(id, limit);
    std::vector<StatusReport> out;
    while (true) {
      auto row = stmt->step();
      if (!row) {
        return make_error(std::move(row).error());
      }
      if (!*row) break;
      out.push_back({stmt->int64(0), stmt->int64(1), stmt->text(2)});
    }
    return out;
  });
}

Status SqliteStore::update_device_facts(const std::string& id, const std::string& facts_json) {
  return locked("updating facts of device", id, [&]() -> Status {
    auto stmt = conn_.prepare("UPDATE devices SET facts_json = ? WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(facts_json, id).run());
    return expect_changed("device " + id);
  });
}

Status SqliteStore::touch_device(const std::string& id, int64_t now_ms) {
  return locked("touching device", id, [&]() -> Status {
    // MAX: concurrent requests may finish out of order; last_seen must not go back.
    auto stmt = conn_.prepare("UPDATE devices SET last_seen = MAX(last_seen, ?) WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(now_ms, id).run());
    return expect_changed("device " + id);
  });
}

Result<int64_t> SqliteStore::touch_devices(
    const std::vector<std::pair<std::string, int64_t>>& seen) {
  if (seen.empty()) return int64_t{0};
  return locked("touching devices", std::to_string(seen.size()), [&]() -> Result<int64_t> {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    int64_t updated = 0;
    for (const auto& [id, now_ms] : seen) {
      auto stmt = conn_.prepare("UPDATE devices SET last_seen = MAX(last_seen, ?) WHERE id = ?");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(now_ms, id).run());
      updated += conn_.changes();
    }
    OUTPOST_TRY(txn->commit());
    return updated;
  });
}

Status SqliteStore::set_device_cordoned(const std::string& id, bool cordoned) {
  return locked("cordoning device", id, [&]() -> Status {
    auto stmt = conn_.prepare("UPDATE devices SET cordoned = ? WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(cordoned, id).run());
    return expect_changed("device " + id);
  });
}

Status SqliteStore::set_device_revoked(const std::string& id, int64_t revoked_at) {
  return locked("revoking device", id, [&]() -> Status {
    auto stmt = conn_.prepare("UPDATE devices SET revoked_at = ? WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(revoked_at, id).run());
    return expect_changed("device " + id);
  });
}

// ---- Release metadata ----

Result<bool> SqliteStore::put_release_document(const ReleaseDocument& doc) {
  return locked("storing release metadata", doc.role, [&]() -> Result<bool> {
    auto stmt = conn_.prepare(
        "INSERT INTO release_metadata (role, version, body, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (role, version) DO NOTHING");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(doc.role, doc.version, doc.body, doc.created_at).run());
    return conn_.changes() == 1;
  });
}

Result<std::optional<ReleaseDocument>> SqliteStore::get_release_document(const std::string& role,
                                                                         int64_t version) {
  return locked("reading release metadata", role, [&]() -> Result<std::optional<ReleaseDocument>> {
    auto stmt = conn_.prepare(
        version > 0 ? "SELECT role, version, body, created_at FROM release_metadata"
                      " WHERE role = ? AND version = ?"
                    : "SELECT role, version, body, created_at FROM release_metadata"
                      " WHERE role = ? AND version > ? ORDER BY version DESC LIMIT 1");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<ReleaseDocument>(stmt->bind(role, version), [](const Statement& s) {
      return ReleaseDocument{
          .role = s.text(0), .version = s.int64(1), .body = s.text(2), .created_at = s.int64(3)};
    });
  });
}

// ---- Artifacts ----

Result<bool> SqliteStore::put_artifact(const Artifact& artifact) {
  return locked("storing artifact", artifact.digest, [&]() -> Result<bool> {
    auto stmt = conn_.prepare("INSERT INTO artifacts (" OUTPOST_ARTIFACT_COLUMNS
                              ") VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(
        stmt->bind(artifact.digest, artifact.size, artifact.media_type, artifact.created_at).run());
    return conn_.changes() == 1;
  });
}

Result<std::optional<Artifact>> SqliteStore::get_artifact(const std::string& digest) {
  return locked("reading artifact", digest, [&]() -> Result<std::optional<Artifact>> {
    auto stmt =
        conn_.prepare("SELECT " OUTPOST_ARTIFACT_COLUMNS " FROM artifacts WHERE digest = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<Artifact>(stmt->bind(digest), read_artifact);
  });
}

Result<std::vector<Artifact>> SqliteStore::list_artifacts() {
  return locked("listing artifacts", "", [&]() -> Result<std::vector<Artifact>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_ARTIFACT_COLUMNS
                              " FROM artifacts ORDER BY created_at, digest");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_all<Artifact>(*stmt, read_artifact);
  });
}

#define OUTPOST_DELTA_COLUMNS \
  "target, base, delta, delta_size, target_size, state, detail, created_at"

Status SqliteStore::put_artifact_delta(const ArtifactDelta& d) {
  return locked("storing delta", d.target + " from " + d.base, [&]() -> Status {
    auto stmt = conn_.prepare("INSERT OR REPLACE INTO artifact_deltas (" OUTPOST_DELTA_COLUMNS
                              ") VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return stmt
        ->bind(d.target, d.base, d.delta, d.delta_size, d.target_size, d.state, d.detail,
               d.created_at)
        .run();
  });
}

Result<std::vector<ArtifactDelta>> SqliteStore::list_artifact_deltas(const std::string& target) {
  return locked("listing deltas", target, [&]() -> Result<std::vector<ArtifactDelta>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_DELTA_COLUMNS
                              " FROM artifact_deltas WHERE ? = '' OR target = ?"
                              " ORDER BY target, base");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    stmt->bind(target, target);
    return read_all<ArtifactDelta>(*stmt, [](const Statement& s) {
      return ArtifactDelta{
          .target = s.text(0),
          .base = s.text(1),
          .delta = s.text(2),
          .delta_size = s.int64(3),
          .target_size = s.int64(4),
          .state = s.text(5),
          .detail = s.text(6),
          .created_at = s.int64(7),
      };
    });
  });
}

// ---- Models ----

Status SqliteStore::load_variants(ModelVersion& version) {
  auto stmt = conn_.prepare(
      "SELECT selector_json, needs_json, artifact_digest, format, metadata_json"
      " FROM model_variants WHERE model = ? AND version = ? ORDER BY idx");
  if (!stmt) {
    return make_error(std::move(stmt).error());
  }
  auto variants =
      read_all<ModelVariant>(stmt->bind(version.model, version.version), [](const Statement& s) {
        return ModelVariant{
            .selector_json = s.text(0),
            .needs_json = s.text(1),
            .artifact_digest = s.text(2),
            .format = s.text(3),
            .metadata_json = s.text(4),
        };
      });
  if (!variants) {
    return make_error(std::move(variants).error());
  }
  version.variants = std::move(*variants);
  return ok();
}

ModelVersion read_model_version_row(const Statement& s) {
  return ModelVersion{
      .model = s.text(0),
      .version = s.text(1),
      .content_hash = s.text(2),
      .created_at = s.int64(3),
      .variants = {},
  };
}

Result<bool> SqliteStore::put_model_version(const ModelVersion& version) {
  return locked(
      "storing model", version.model + " version " + version.version, [&]() -> Result<bool> {
        auto txn = conn_.begin_write();
        if (!txn) {
          return make_error(std::move(txn).error());
        }
        {
          auto stmt = conn_.prepare(
              "SELECT content_hash FROM model_versions WHERE model = ? AND version = ?");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          auto row = stmt->bind(version.model, version.version).step();
          if (!row) {
            return make_error(std::move(row).error());
          }
          if (*row) {
            if (stmt->text(0) == version.content_hash) {
              return false;  // rolls back a no-op
            }
            return make_error(Errc::kConflict, "model " + version.model + " version " +
                                                   version.version +
                                                   " already exists with different content");
          }
        }
        {
          auto stmt = conn_.prepare(
              "INSERT INTO model_versions (model, version, content_hash, created_at)"
              " VALUES (?, ?, ?, ?)");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          OUTPOST_TRY(
              stmt->bind(version.model, version.version, version.content_hash, version.created_at)
                  .run());
        }
        for (size_t i = 0; i < version.variants.size(); ++i) {
          const ModelVariant& variant = version.variants[i];
          auto stmt = conn_.prepare(
              "INSERT INTO model_variants (model, version, idx, selector_json, needs_json,"
              " artifact_digest, format, metadata_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          OUTPOST_TRY(stmt->bind(version.model, version.version, static_cast<int64_t>(i),
                                 variant.selector_json, variant.needs_json, variant.artifact_digest,
                                 variant.format, variant.metadata_json)
                          .run());
        }
        OUTPOST_TRY(txn->commit());
        return true;
      });
}

Result<std::optional<ModelVersion>> SqliteStore::get_model_version(const std::string& model,
                                                                   const std::string& version) {
  return locked(
      "reading model", model + " version " + version, [&]() -> Result<std::optional<ModelVersion>> {
        auto txn = conn_.begin_read();
        if (!txn) {
          return make_error(std::move(txn).error());
        }
        std::optional<ModelVersion> found;
        {
          auto stmt = conn_.prepare(
              "SELECT model, version, content_hash, created_at FROM model_versions"
              " WHERE model = ? AND version = ?");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          auto row = read_one<ModelVersion>(stmt->bind(model, version), read_model_version_row);
          if (!row) {
            return make_error(std::move(row).error());
          }
          found = std::move(*row);
        }
        if (found) {
          OUTPOST_TRY(load_variants(*found));
        }
        OUTPOST_TRY(txn->commit());
        return found;
      });
}

Result<std::vector<ModelVersion>> SqliteStore::list_model_versions(const std::string& model) {
  return locked("listing versions of model", model, [&]() -> Result<std::vector<ModelVersion>> {
    auto txn = conn_.begin_read();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    std::vector<ModelVersion> versions;
    {
      auto stmt = conn_.prepare(
          "SELECT model, version, content_hash, created_at FROM model_versions"
          " WHERE model = ? ORDER BY created_at, rowid");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      auto rows = read_all<ModelVersion>(stmt->bind(model), read_model_version_row);
      if (!rows) {
        return make_error(std::move(rows).error());
      }
      versions = std::move(*rows);
    }
    for (ModelVersion& version : versions) {
      OUTPOST_TRY(load_variants(version));
    }
    OUTPOST_TRY(txn->commit());
    return versions;
  });
}

Result<std::vector<std::string>> SqliteStore::list_models() {
  return locked("listing models", "", [&]() -> Result<std::vector<std::string>> {
    auto stmt = conn_.prepare("SELECT DISTINCT model FROM model_versions ORDER BY model");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_all<std::string>(*stmt, [](const Statement& s) { return s.text(0); });
  });
}

// ---- Deployments ----

Result<ApplyOutcome> SqliteStore::apply_deployment(const std::string& name,
                                                   const std::string& manifest_json,
                                                   const std::string& spec_hash,
                                                   const std::string& actor, int64_t now_ms) {
  return locked("applying deployment", name, [&]() -> Result<ApplyOutcome> {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    std::optional<Deployment> current;
    {
      auto stmt =
          conn_.prepare("SELECT " OUTPOST_DEPLOYMENT_COLUMNS " FROM deployments WHERE name = ?");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      auto row = read_one<Deployment>(stmt->bind(name), read_deployment);
      if (!row) {
        return make_error(std::move(row).error());
      }
      current = std::move(*row);
    }
    if (current && current->spec_hash == spec_hash) {
      return ApplyOutcome{.deployment = std::move(*current), .changed = false};
    }
    // Numbering continues after every revision ever stored under this name, including
    // those of a deleted deployment: a revision number is never reused.
    int64_t last_revision = current ? current->revision : 0;
    {
      auto stmt = conn_.prepare(
          "SELECT COALESCE(MAX(revision), 0) FROM deployment_revisions WHERE name = ?");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      auto row = stmt->bind(name).step();
      if (!row) {
        return make_error(std::move(row).error());
      }
      if (*row) {
        last_revision = std::max(last_revision, stmt->int64(0));
      }
    }
    // A new deployment runs its first revision everywhere; an update leaves devices on the
    // stable revision until the rollout controller moves them.
    const Deployment next{
        .name = name,
        .revision = last_revision + 1,
        .manifest_json = manifest_json,
        .spec_hash = spec_hash,
        .created_at = current ? current->created_at : now_ms,
        .updated_at = now_ms,
        .stable_revision = current ? current->stable_revision : last_revision + 1,
    };
    {
      auto stmt =
          conn_.prepare("INSERT INTO deployments (" OUTPOST_DEPLOYMENT_COLUMNS
                        ") VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                        " revision = excluded.revision, manifest_json = excluded.manifest_json,"
                        " spec_hash = excluded.spec_hash, updated_at = excluded.updated_at");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(next.name, next.revision, next.manifest_json, next.spec_hash,
                             next.created_at, next.updated_at, next.stable_revision)
                      .run());
    }
    {
      auto stmt = conn_.prepare(
          "INSERT INTO deployment_revisions (name, revision, manifest_json, spec_hash,"
          " created_at, created_by) VALUES (?, ?, ?, ?, ?, ?)");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(name, next.revision, manifest_json, spec_hash, now_ms, actor).run());
    }
    OUTPOST_TRY(txn->commit());
    return ApplyOutcome{.deployment = next, .changed = true};
  });
}

Result<std::optional<Deployment>> SqliteStore::get_deployment(const std::string& name) {
  return locked("reading deployment", name, [&]() -> Result<std::optional<Deployment>> {
    auto stmt =
        conn_.prepare("SELECT " OUTPOST_DEPLOYMENT_COLUMNS " FROM deployments WHERE name = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<Deployment>(stmt->bind(name), read_deployment);
  });
}

Result<std::vector<Deployment>> SqliteStore::list_deployments() {
  return locked("listing deployments", "", [&]() -> Result<std::vector<Deployment>> {
    auto stmt =
        conn_.prepare("SELECT " OUTPOST_DEPLOYMENT_COLUMNS " FROM deployments ORDER BY name");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_all<Deployment>(*stmt, read_deployment);
  });
}

Result<std::vector<DeploymentRevision>> SqliteStore::list_deployment_revisions(
    const std::string& name) {
  return locked("listing revisions of deployment", name,
                [&]() -> Result<std::vector<DeploymentRevision>> {
                  auto stmt = conn_.prepare(
                      "SELECT name, revision, manifest_json, spec_hash, created_at, created_by,"
                      " bad_reason FROM deployment_revisions WHERE name = ? ORDER BY revision");
                  if (!stmt) {
                    return make_error(std::move(stmt).error());
                  }
                  return read_all<DeploymentRevision>(stmt->bind(name), [](const Statement& s) {
                    return DeploymentRevision{
                        .name = s.text(0),
                        .revision = s.int64(1),
                        .manifest_json = s.text(2),
                        .spec_hash = s.text(3),
                        .created_at = s.int64(4),
                        .created_by = s.text(5),
                        .bad_reason = s.text(6),
                    };
                  });
                });
}

Status SqliteStore::delete_deployment(const std::string& name) {
  return locked("deleting deployment", name, [&]() -> Status {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    auto stmt = conn_.prepare("DELETE FROM deployments WHERE name = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(name).run());
    OUTPOST_TRY(expect_changed("deployment " + name));
    for (const char* sql :
         {"DELETE FROM revision_assignments WHERE deployment = ?",
          "UPDATE rollouts SET state = 'aborted' WHERE deployment = ? AND state IN ('running',"
          " 'paused')"}) {
      auto more = conn_.prepare(sql);
      if (!more) {
        return make_error(std::move(more).error());
      }
      OUTPOST_TRY(more->bind(name).run());
    }
    return txn->commit();
  });
}

// ---- Rollouts ----

Result<int64_t> SqliteStore::create_rollout(const Rollout& rollout) {
  return locked("creating a rollout of deployment", rollout.deployment, [&]() -> Result<int64_t> {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    {
      auto stmt = conn_.prepare(
          "UPDATE rollouts SET state = 'superseded', updated_at = ? WHERE deployment = ? AND"
          " state IN ('running', 'paused')");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(rollout.created_at, rollout.deployment).run());
    }
    auto stmt = conn_.prepare(
        "INSERT INTO rollouts (deployment, from_revision, to_revision, state, doc_json,"
        " created_at, updated_at, created_by) VALUES (?, ?, ?, 'running', ?, ?, ?, ?)");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    OUTPOST_TRY(stmt->bind(rollout.deployment, rollout.from_revision, rollout.to_revision,
                           rollout.doc_json, rollout.created_at, rollout.created_at,
                           rollout.created_by)
                    .run());
    const int64_t id = sqlite3_last_insert_rowid(conn_.db());
    OUTPOST_TRY(txn->commit());
    return id;
  });
}

Status SqliteStore::update_rollout(const RolloutUpdate& u) {
  const Rollout& r = u.rollout;
  return locked("updating rollout of deployment", r.deployment, [&]() -> Status {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    auto exec = [&](const char* sql, auto&&... args) -> Status {
      auto stmt = conn_.prepare(sql);
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      return stmt->bind(args...).run();
    };
    OUTPOST_TRY(
        exec("UPDATE rollouts SET from_revision = ?, to_revision = ?, state = ?,"
             " doc_json = ?, updated_at = ? WHERE id = ?",
             r.from_revision, r.to_revision, r.state, r.doc_json, r.updated_at, r.id));
    OUTPOST_TRY(expect_changed("rollout " + std::to_string(r.id)));
    if (u.clear_assignments) {
      OUTPOST_TRY(exec("DELETE FROM revision_assignments WHERE deployment = ?", r.deployment));
    }
    for (const auto& [device, revision] : u.assign) {
      OUTPOST_TRY(
          exec("INSERT INTO revision_assignments (deployment, device_id, revision)"
               " VALUES (?, ?, ?) ON CONFLICT (deployment, device_id) DO UPDATE SET"
               " revision = excluded.revision",
               r.deployment, device, revision));
    }
    for (const auto& device : u.unassign) {
      OUTPOST_TRY(exec("DELETE FROM revision_assignments WHERE deployment = ? AND device_id = ?",
                       r.deployment, device));
    }
    if (u.stable_revision) {
      OUTPOST_TRY(exec("UPDATE deployments SET stable_revision = ? WHERE name = ?",
                       *u.stable_revision, r.deployment));
    }
    if (u.reset_to_revision) {
      OUTPOST_TRY(
          exec("UPDATE deployments SET revision = r.revision, manifest_json ="
               " r.manifest_json, spec_hash = r.spec_hash, updated_at = ? FROM"
               " deployment_revisions AS r WHERE deployments.name = ? AND r.name ="
               " deployments.name AND r.revision = ?",
               r.updated_at, r.deployment, *u.reset_to_revision));
      OUTPOST_TRY(expect_changed("revision " + std::to_string(*u.reset_to_revision) +
                                 " of deployment " + r.deployment));
    }
    if (u.mark_bad) {
      OUTPOST_TRY(
          exec("UPDATE deployment_revisions SET bad_reason = ? WHERE name = ? AND"
               " revision = ?",
               u.mark_bad->second, r.deployment, u.mark_bad->first));
      OUTPOST_TRY(expect_changed("revision " + std::to_string(u.mark_bad->first) +
                                 " of deployment " + r.deployment));
    }
    return txn->commit();
  });
}

Result<std::optional<Rollout>> SqliteStore::get_rollout(int64_t id) {
  return locked("reading rollout", std::to_string(id), [&]() -> Result<std::optional<Rollout>> {
    auto stmt = conn_.prepare("SELECT " OUTPOST_ROLLOUT_COLUMNS " FROM rollouts WHERE id = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<Rollout>(stmt->bind(id), read_rollout);
  });
}

Result<std::vector<Rollout>> SqliteStore::list_rollouts(const std::string& deployment,
                                                        bool active_only, int64_t limit) {
  return locked("listing rollouts", deployment, [&]() -> Result<std::vector<Rollout>> {
    auto stmt = conn_.prepare(
        "SELECT " OUTPOST_ROLLOUT_COLUMNS
        " FROM rollouts WHERE (? = '' OR deployment = ?) AND (? = 0 OR state IN ('running',"
        " 'paused')) ORDER BY id DESC LIMIT ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_all<Rollout>(stmt->bind(deployment, deployment, active_only ? 1 : 0, limit),
                             read_rollout);
  });
}

Result<std::vector<RevisionAssignment>> SqliteStore::list_revision_assignments(
    const std::string& deployment) {
  return locked("listing revision assignments", deployment,
                [&]() -> Result<std::vector<RevisionAssignment>> {
                  auto stmt = conn_.prepare(
                      "SELECT deployment, device_id, revision FROM revision_assignments"
                      " WHERE (? = '' OR deployment = ?) ORDER BY deployment, device_id");
                  if (!stmt) {
                    return make_error(std::move(stmt).error());
                  }
                  return read_all<RevisionAssignment>(
                      stmt->bind(deployment, deployment), [](const Statement& s) {
                        return RevisionAssignment{s.text(0), s.text(1), s.int64(2)};
                      });
                });
}

// ---- Secrets ----

Status SqliteStore::put_secret_version(const SecretVersion& v, int64_t now_ms) {
  return locked(
      "storing secret", v.name + " version " + std::to_string(v.version), [&]() -> Status {
        if (v.version < 1) {
          return make_error(Errc::kInvalidArgument, "secret " + v.name + ": versions start at 1");
        }
        auto txn = conn_.begin_write();
        if (!txn) {
          return make_error(std::move(txn).error());
        }
        std::optional<int64_t> newest;
        {
          auto stmt = conn_.prepare(
              "SELECT (SELECT COALESCE(MAX(version), 0) FROM secret_versions WHERE name = ?1)"
              " FROM secrets WHERE name = ?1");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          auto row = stmt->bind(v.name).step();
          if (!row) {
            return make_error(std::move(row).error());
          }
          if (*row) newest = stmt->int64(0);
        }
        if (v.version == 1) {
          if (newest) {
            return make_error(Errc::kAlreadyExists, "secret " + v.name + " already exists", "name");
          }
          auto stmt =
              conn_.prepare("INSERT INTO secrets (name, created_at, updated_at) VALUES (?, ?, ?)");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          OUTPOST_TRY(stmt->bind(v.name, v.created_at, v.created_at).run());
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
          auto stmt = conn_.prepare("UPDATE secrets SET updated_at = ? WHERE name = ?");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          OUTPOST_TRY(stmt->bind(v.created_at, v.name).run());
        }
        {
          auto stmt = conn_.prepare(
              "INSERT INTO secret_versions (name, version, keys_json, ciphertext, activate_at,"
              " created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?)");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          OUTPOST_TRY(stmt->bind(v.name, v.version, nlohmann::json(v.keys).dump(), v.ciphertext,
                                 v.activate_at, v.created_at, v.created_by)
                          .run());
        }
        {
          // What no device needs any more: versions before the one active now.
          auto stmt = conn_.prepare(
              "DELETE FROM secret_versions WHERE name = ?1 AND version < (SELECT "
              "COALESCE(MAX(version),"
              " 0) FROM secret_versions WHERE name = ?1 AND activate_at <= ?2)");
          if (!stmt) {
            return make_error(std::move(stmt).error());
          }
          OUTPOST_TRY(stmt->bind(v.name, now_ms).run());
        }
        return txn->commit();
      });
}

Result<std::vector<Secret>> SqliteStore::read_secrets(const std::string& name) {
  auto txn = conn_.begin_read();
  if (!txn) {
    return make_error(std::move(txn).error());
  }
  std::vector<Secret> out;
  {
    auto stmt = conn_.prepare(
        "SELECT name, created_at, updated_at FROM secrets WHERE ?1 = '' OR name = ?1"
        " ORDER BY name");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    auto rows = read_all<Secret>(stmt->bind(name), [](const Statement& s) {
      return Secret{.name = s.text(0), .created_at = s.int64(1), .updated_at = s.int64(2)};
    });
    if (!rows) {
      return make_error(std::move(rows).error());
    }
    out = std::move(*rows);
  }
  auto stmt = conn_.prepare(
      "SELECT name, version, keys_json, ciphertext, activate_at, created_at, created_by"
      " FROM secret_versions WHERE ?1 = '' OR name = ?1 ORDER BY name, version");
  if (!stmt) {
    return make_error(std::move(stmt).error());
  }
  auto versions =
      read_all<SecretVersion>(stmt->bind(name), [](const Statement& s) -> Result<SecretVersion> {
        SecretVersion v{.name = s.text(0),
                        .version = s.int64(1),
                        .keys = {},
                        .ciphertext = s.text(3),
                        .activate_at = s.int64(4),
                        .created_at = s.int64(5),
                        .created_by = s.text(6)};
        const auto keys = nlohmann::json::parse(s.text(2), nullptr, false);
        if (!keys.is_array()) {
          return make_error(Errc::kInternal, "secret " + v.name + " version " +
                                                 std::to_string(v.version) +
                                                 ": stored key names are not a JSON array");
        }
        for (const auto& k : keys) {
          if (k.is_string()) v.keys.push_back(k.get<std::string>());
        }
        return v;
      });
  if (!versions) {
    return make_error(std::move(versions).error());
  }
  size_t at = 0;
  for (auto& v : *versions) {
    while (at < out.size() && out[at].name < v.name) ++at;
    if (at < out.size() && out[at].name == v.name) out[at].versions.push_back(std::move(v));
  }
  OUTPOST_TRY(txn->commit());
  return out;
}

Result<std::optional<Secret>> SqliteStore::get_secret(const std::string& name) {
  return locked("reading secret", name, [&]() -> Result<std::optional<Secret>> {
    if (name.empty()) return std::optional<Secret>();
    auto found = read_secrets(name);
    if (!found) {
      return make_error(std::move(found).error());
    }
    if (found->empty()) return std::optional<Secret>();
    return std::optional<Secret>(std::move(found->front()));
  });
}

Result<std::vector<Secret>> SqliteStore::list_secrets() {
  return locked("listing secrets", "", [&] { return read_secrets(""); });
}

Status SqliteStore::delete_secret(const std::string& name) {
  return locked("deleting secret", name, [&]() -> Status {
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
    for (const char* sql :
         {"DELETE FROM secret_versions WHERE name = ?", "DELETE FROM secrets WHERE name = ?"}) {
      auto stmt = conn_.prepare(sql);
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(name).run());
    }
    OUTPOST_TRY(expect_changed("secret " + name));
    return txn->commit();
  });
}

// ---- Sites ----

Status SqliteStore::put_site(const Site& site) {
  return locked("writing site", site.name, [&]() -> Status {
    auto stmt = conn_.prepare(
        "INSERT INTO sites (name, timezone, region, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET timezone = excluded.timezone,"
        " region = excluded.region, updated_at = excluded.updated_at");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return stmt->bind(site.name, site.timezone, site.region, site.updated_at).run();
  });
}

Site read_site(const Statement& s) { return Site{s.text(0), s.text(1), s.text(2), s.int64(3)}; }

Result<std::optional<Site>> SqliteStore::get_site(const std::string& name) {
  return locked("reading site", name, [&]() -> Result<std::optional<Site>> {
    auto stmt =
        conn_.prepare("SELECT name, timezone, region, updated_at FROM sites WHERE name = ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_one<Site>(stmt->bind(name), read_site);
  });
}

Result<std::vector<Site>> SqliteStore::list_sites() {
  return locked("listing sites", "", [&]() -> Result<std::vector<Site>> {
    auto stmt = conn_.prepare("SELECT name, timezone, region, updated_at FROM sites ORDER BY name");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_all<Site>(*stmt, read_site);
  });
}

// ---- Audit ----

Result<AuditEntry> SqliteStore::append_audit(const std::string& actor, const std::string& action,
                                             const std::string& target,
                                             const std::string& details_json, int64_t now_ms) {
  return locked("appending audit entry", action + " " + target, [&]() -> Result<AuditEntry> {
    // The write lock is held from reading the chain's head to inserting the new entry, so
    // concurrent writers (threads or processes) cannot fork the chain.
    auto txn = conn_.begin_write();
    if (!txn) {
      return make_error(std::move(txn).error());
    }
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
    {
      auto stmt = conn_.prepare("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      auto row = stmt->step();
      if (!row) {
        return make_error(std::move(row).error());
      }
      if (*row) {
        entry.seq = stmt->int64(0) + 1;
        entry.prev_hash = stmt->text(1);
      }
    }
    entry.hash = audit_entry_hash(entry);
    {
      auto stmt = conn_.prepare("INSERT INTO audit_log (" OUTPOST_AUDIT_COLUMNS
                                ") VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
      if (!stmt) {
        return make_error(std::move(stmt).error());
      }
      OUTPOST_TRY(stmt->bind(entry.seq, entry.time, entry.actor, entry.action, entry.target,
                             entry.details_json, entry.prev_hash, entry.hash)
                      .run());
    }
    OUTPOST_TRY(txn->commit());
    return entry;
  });
}

Result<std::vector<AuditEntry>> SqliteStore::list_audit(int64_t since_ms, int64_t limit) {
  return locked("listing audit entries", "", [&]() -> Result<std::vector<AuditEntry>> {
    if (limit < 0) {
      return make_error(Errc::kInvalidArgument,
                        "audit limit must be 0 or more, got " + std::to_string(limit), "limit");
    }
    // Chain order (seq) is the order of record; times come from callers' clocks.
    auto stmt = conn_.prepare("SELECT " OUTPOST_AUDIT_COLUMNS
                              " FROM audit_log WHERE time >= ? ORDER BY seq LIMIT ?");
    if (!stmt) {
      return make_error(std::move(stmt).error());
    }
    return read_all<AuditEntry>(stmt->bind(since_ms, limit), read_audit_entry);
  });
}

Result<int> SqliteStore::schema_version() {
  return locked("reading schema version", "", [&]() -> Result<int> {
    auto version = query_int64(conn_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
    if (!version) {
      return make_error(std::move(version).error());
    }
    return static_cast<int>(*version);
  });
}

#undef OUTPOST_OPERATOR_TOKEN_COLUMNS
#undef OUTPOST_ENROLLMENT_TOKEN_COLUMNS
#undef OUTPOST_DEVICE_COLUMNS
#undef OUTPOST_ARTIFACT_COLUMNS
#undef OUTPOST_DEPLOYMENT_COLUMNS
#undef OUTPOST_AUDIT_COLUMNS

}  // namespace

Result<std::unique_ptr<Store>> open_sqlite_store(const std::string& path,
                                                 std::span<const Migration> migrations) {
  try {
    // Before SQLite's first use in this process (see page_cache.h); a no-op after.
    install_page_cache_guard();
    sqlite3* raw = nullptr;
    // NOMUTEX: SqliteStore's own mutex serializes every use of the connection.
    const int rc =
        sqlite3_open_v2(path.c_str(), &raw,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
    DbPtr db(raw);
    if (rc != SQLITE_OK) {
      return make_error(errc_for(rc), "opening store " + path + ": " +
                                          (db ? sqlite3_errmsg(db.get()) : sqlite3_errstr(rc)));
    }
    auto store = std::make_unique<SqliteStore>(std::move(db));
    OUTPOST_TRY(store->init(path, migrations));
    return std::unique_ptr<Store>(std::move(store));
  } catch (const std::exception& e) {
    return make_error(Errc::kInternal, "opening store " + path + ": " + e.what());
  }
}

}  // namespace outpost::store::sqlite
