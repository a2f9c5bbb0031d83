// libpq behind a small typed layer for the PostgreSQL backend: statement parameters and results
// in binary format, connections that prepare each SQL text once, a bounded pool, and the one
// place where transactions begin, commit and are retried. Internal to the store module.
#pragma once

#include <libpq-fe.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/error.h"

namespace outpost::store::postgres {

// Type OIDs of the built-in types we send and read (fixed in pg_type.dat since PostgreSQL 7).
inline constexpr Oid kBoolOid = 16;
inline constexpr Oid kByteaOid = 17;
inline constexpr Oid kInt8Oid = 20;
inline constexpr Oid kInt2Oid = 21;
inline constexpr Oid kInt4Oid = 23;
inline constexpr Oid kTextOid = 25;
inline constexpr Oid kFloat4Oid = 700;
inline constexpr Oid kFloat8Oid = 701;
inline constexpr Oid kTextArrayOid = 1009;
inline constexpr Oid kByteaArrayOid = 1001;
inline constexpr Oid kInt8ArrayOid = 1016;
inline constexpr Oid kFloat8ArrayOid = 1022;

// Maps a SQLSTATE onto our error codes: unique violation kAlreadyExists, foreign key
// kFailedPrecondition, other integrity violations and bad data kInvalidArgument, serialization
// failures, deadlocks, connection loss and shutdown kUnavailable, disk full and out of memory
// kResourceExhausted, anything else kInternal.
Errc errc_for_sqlstate(std::string_view sqlstate);

// A bytea parameter (binary-safe), as opposed to text.
struct Bytes {
  std::string_view data;
};

// The parameters of one statement ($1, $2, ...), each with its type, all in binary format (so
// integers and doubles travel exactly and bytea needs no escaping).
class Params {
 public:
  template <typename T>
  Params& add(const T& value) {
    if constexpr (std::is_same_v<T, bool>) {
      push(kBoolOid, std::string(1, value ? '\1' : '\0'));
    } else if constexpr (std::is_integral_v<T>) {
      push(kInt8Oid, be64(static_cast<uint64_t>(static_cast<int64_t>(value))));
    } else if constexpr (std::is_floating_point_v<T>) {
      push(kFloat8Oid, float8(static_cast<double>(value)));
    } else if constexpr (std::is_same_v<T, Bytes>) {
      push(kByteaOid, std::string(value.data));
    } else if constexpr (std::is_same_v<T, std::optional<int64_t>>) {
      value ? add(*value) : null(kInt8Oid);
    } else if constexpr (std::is_same_v<T, std::optional<double>>) {
      value ? add(*value) : null(kFloat8Oid);
    } else if constexpr (std::is_same_v<T, std::optional<std::string>>) {
      value ? add(*value) : null(kTextOid);
    } else if constexpr (std::is_same_v<T, std::optional<Bytes>>) {
      value ? add(*value) : null(kByteaOid);
    } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
      int8_array(value);
    } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      text_array(value);
    } else {
      push(kTextOid, std::string(std::string_view(value)));
    }
    return *this;
  }
  Params& null(Oid type);
  Params& int8_array(const std::vector<int64_t>& values);
  Params& float8_array(const std::vector<std::optional<double>>& values);
  Params& text_array(const std::vector<std::string>& values);
  Params& bytea_array(const std::vector<std::optional<std::string>>& values);

  int size() const { return static_cast<int>(types_.size()); }
  const Oid* types() const { return types_.data(); }
  // Pointers into the values, valid while this object is unchanged.
  std::vector<const char*> values() const;
  std::vector<int> lengths() const;
  std::vector<int> formats() const { return std::vector<int>(types_.size(), 1); }

  static std::string be64(uint64_t v);
  static std::string float8(double v);

 private:
  void push(Oid type, std::string value) {
    types_.push_back(type);
    values_.push_back(std::move(value));
    nulls_.push_back(false);
  }
  std::string array(Oid element, size_t n, bool has_null,
                    const std::vector<std::optional<std::string>>* elements);

  std::vector<Oid> types_;
  std::vector<std::string> values_;
  std::vector<bool> nulls_;
};

// A result set in binary format. Column accessors decode by the column's type; a column of a
// type they do not expect is a bug in our SQL (asserted; cast it in the query).
class Rows {
 public:
  Rows() = default;
  explicit Rows(PGresult* res) : res_(res) {}

  int size() const { return res_ ? PQntuples(res_.get()) : 0; }
  bool empty() const { return size() == 0; }
  // Rows an INSERT/UPDATE/DELETE touched (PQcmdTuples).
  int64_t affected() const;

  bool null(int row, int col) const { return PQgetisnull(res_.get(), row, col) != 0; }
  int64_t i64(int row, int col) const;  // int2/int4/int8/bool; NULL reads 0
  std::optional<int64_t> opt_i64(int row, int col) const {
    if (null(row, col)) return std::nullopt;
    return i64(row, col);
  }
  double f64(int row, int col) const;  // float4/float8 (integers too); NULL reads 0
  std::optional<double> opt_f64(int row, int col) const {
    if (null(row, col)) return std::nullopt;
    return f64(row, col);
  }
  bool boolean(int row, int col) const { return i64(row, col) != 0; }
  // text, or the raw bytes of a bytea
  std::string_view view(int row, int col) const {
    return std::string_view(PQgetvalue(res_.get(), row, col),
                            static_cast<size_t>(PQgetlength(res_.get(), row, col)));
  }
  std::string text(int row, int col) const { return std::string(view(row, col)); }

 private:
  struct Clear {
    void operator()(PGresult* res) const { PQclear(res); }
  };
  std::unique_ptr<PGresult, Clear> res_;
};

// One libpq connection with its prepared statements. Not thread-safe: the pool lends it to one
// caller at a time.
class Connection {
 public:
  struct Finish {
    void operator()(PGconn* conn) const { PQfinish(conn); }
  };
  using ConnPtr = std::unique_ptr<PGconn, Finish>;

  // Connects (blocking). `shown_url` (password redacted) names the database in errors.
  [[nodiscard]] static Result<std::unique_ptr<Connection>> connect(const std::string& conninfo,
                                                                   const std::string& shown_url);

  // What the current call is doing ("enrolling device cam-01"); prefixes the server's errors.
  void set_operation(std::string operation) { operation_ = std::move(operation); }
  const std::string& operation() const { return operation_; }

  // Runs one statement, prepared on first use on this connection and kept (keyed by its SQL
  // text; every caller passes a literal, so the set is bounded).
  [[nodiscard]] Result<Rows> exec(std::string_view sql, const Params& params);
  template <typename... Args>
  [[nodiscard]] Result<Rows> query(std::string_view sql, const Args&... args) {
    Params params;
    (params.add(args), ...);
    return exec(sql, params);
  }
  // Runs a script of several statements without parameters (migrations, BEGIN, COMMIT).
  [[nodiscard]] Status exec_script(const std::string& sql);

  // Since the last begin_unit(): did a statement fail with a serialization failure or a
  // deadlock (a retry of the whole transaction may succeed)?
  void begin_unit() { retryable_ = false; }
  bool retryable_failure() const { return retryable_; }
  bool broken() const { return PQstatus(conn_.get()) != CONNECTION_OK; }
  bool idle() const { return PQtransactionStatus(conn_.get()) == PQTRANS_IDLE; }
  // The SQLSTATE and the constraint of the last failed statement ("" when none).
  const std::string& last_sqlstate() const { return last_sqlstate_; }
  const std::string& last_constraint() const { return last_constraint_; }

 private:
  Connection(ConnPtr conn, std::string shown_url)
      : conn_(std::move(conn)), shown_url_(std::move(shown_url)) {}
  Error failure(PGresult* res);

  ConnPtr conn_;
  std::string shown_url_;
  std::map<std::string, std::string, std::less<>> prepared_;  // SQL text -> statement name
  std::string operation_;
  std::string last_sqlstate_;
  std::string last_constraint_;
  bool retryable_ = false;
};

enum class Isolation {
  kReadCommitted,     // each statement sees what was committed before it; use row locks
  kSnapshotReadOnly,  // REPEATABLE READ READ ONLY: a multi-statement read of one snapshot
  kSerializable,      // as if the store's transactions ran one at a time (retried on 40001)
};

// A bounded set of connections to one database, lent one per concurrent caller. Thread-safe.
class Pool {
 public:
  Pool(std::string conninfo, std::string shown_url, size_t max_connections)
      : conninfo_(std::move(conninfo)), shown_url_(std::move(shown_url)), max_(max_connections) {}
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // A connection on loan; goes back to the pool (or is closed, when broken or left inside a
  // transaction) when the lease ends.
  class Lease {
   public:
    Lease(Pool* pool, std::unique_ptr<Connection> conn) : pool_(pool), conn_(std::move(conn)) {}
    Lease(Lease&& other) noexcept = default;
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (conn_) pool_->give_back(std::move(conn_));
    }
    Connection& operator*() const { return *conn_; }
    Connection* operator->() const { return conn_.get(); }

   private:
    Pool* pool_;
    std::unique_ptr<Connection> conn_;
  };

  // Waits up to `wait` for a free connection, opening a new one while fewer than the maximum
  // are open. kUnavailable when none comes free or the server cannot be reached.
  [[nodiscard]] Result<Lease> acquire(std::chrono::milliseconds wait = std::chrono::seconds(30));

  // Runs `body(Connection&)` (returning Result<T> or Status) as one transaction at `isolation`
  // and commits it when it succeeds. A serialization failure or deadlock anywhere (commit
  // included) rolls back and runs the body again, after a short random pause, up to a bound;
  // so does a connection found broken on the first attempt (a server restart closed the pooled
  // ones; nothing was committed, as the COMMIT is not retried). Every other error rolls back
  // and is returned as is.
  template <typename Body>
  auto transact(Isolation isolation, const std::string& operation, Body&& body)
      -> decltype(body(std::declval<Connection&>()));
  // The same for work that needs no transaction of its own: one statement (autocommit), or
  // reads that need no common snapshot. A retry runs the whole body again, so a body that
  // writes must be one statement.
  template <typename Body>
  auto autocommit(const std::string& operation, Body&& body)
      -> decltype(body(std::declval<Connection&>()));

  const std::string& shown_url() const { return shown_url_; }

 private:
  void give_back(std::unique_ptr<Connection> conn);
  // Whether a failed attempt is worth another: `attempt` counts from 0.
  static bool retry(const Connection& conn, int attempt);

  const std::string conninfo_;
  const std::string shown_url_;
  const size_t max_;
  std::mutex mu_;
  std::condition_variable freed_;
  std::vector<std::unique_ptr<Connection>> idle_;  // GUARDED_BY(mu_)
  size_t open_ = 0;                                // GUARDED_BY(mu_): idle + on loan + opening
};

inline constexpr int kMaxAttempts = 40;

template <typename Body>
auto Pool::transact(Isolation isolation, const std::string& operation, Body&& body)
    -> decltype(body(std::declval<Connection&>())) {
  static constexpr const char* kBegin[] = {
      "BEGIN ISOLATION LEVEL READ COMMITTED",
      "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
      "BEGIN ISOLATION LEVEL SERIALIZABLE",
  };
  for (int attempt = 0;; ++attempt) {
    auto lease = acquire();
    if (!lease) return make_error(lease.error().with_context(operation));
    Connection& conn = **lease;
    conn.set_operation(operation);
    conn.begin_unit();
    auto begun = conn.exec_script(kBegin[static_cast<int>(isolation)]);
    if (!begun) {
      if (retry(conn, attempt)) continue;
      return make_error(std::move(begun).error());
    }
    auto result = body(conn);
    if (result) {
      auto committed = conn.exec_script("COMMIT");
      if (committed) return result;
      if (conn.retryable_failure() && attempt + 1 < kMaxAttempts) {
        retry(conn, attempt);
        continue;
      }
      return make_error(std::move(committed).error());
    }
    if (!conn.broken()) (void)conn.exec_script("ROLLBACK");
    if (retry(conn, attempt)) continue;
    return result;
  }
}

template <typename Body>
auto Pool::autocommit(const std::string& operation, Body&& body)
    -> decltype(body(std::declval<Connection&>())) {
  for (int attempt = 0;; ++attempt) {
    auto lease = acquire();
    if (!lease) return make_error(lease.error().with_context(operation));
    Connection& conn = **lease;
    conn.set_operation(operation);
    conn.begin_unit();
    auto result = body(conn);
    if (result || !retry(conn, attempt)) return result;
  }
}

}  // namespace outpost::store::postgres
