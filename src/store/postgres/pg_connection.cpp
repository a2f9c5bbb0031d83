// See pg_connection.h.
#include "store/postgres/pg_connection.h"

#include <bit>
#include <cassert>
#include <cstring>
#include <random>
#include <thread>

namespace outpost::store::postgres {

Errc errc_for_sqlstate(std::string_view s) {
  if (s == "23505") return Errc::kAlreadyExists;                      // unique_violation
  if (s == "23503") return Errc::kFailedPrecondition;                 // foreign_key_violation
  if (s == "40001" || s == "40P01") return Errc::kUnavailable;        // serialization, deadlock
  if (s == "53100" || s == "53200") return Errc::kResourceExhausted;  // disk full, out of memory
  if (s == "54000") return Errc::kPayloadTooLarge;                    // program_limit_exceeded
  if (s.starts_with("23") || s.starts_with("22")) return Errc::kInvalidArgument;
  // Connection exceptions, operator intervention (shutdown), cannot connect now.
  if (s.starts_with("08") || s.starts_with("57") || s.empty()) return Errc::kUnavailable;
  if (s.starts_with("53")) return Errc::kResourceExhausted;
  if (s.starts_with("58")) return Errc::kIo;  // system error (I/O) on the server
  return Errc::kInternal;
}

// ---- Params ----

std::string Params::be64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 7; i >= 0; --i) {
    out[static_cast<size_t>(i)] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
  return out;
}

std::string Params::float8(double v) { return be64(std::bit_cast<uint64_t>(v)); }

namespace {

void append_be32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8)
    out.push_back(static_cast<char>((v >> shift) & 0xff));
}

uint64_t read_be(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

}  // namespace

Params& Params::null(Oid type) {
  types_.push_back(type);
  values_.emplace_back();
  nulls_.push_back(true);
  return *this;
}

// The binary array format (array_send): dimensions, a has-null flag, the element type, then
// each element as a length (-1 for NULL) and its bytes.
std::string Params::array(Oid element, size_t n, bool has_null,
                          const std::vector<std::optional<std::string>>* elements) {
  std::string out;
  append_be32(out, n == 0 ? 0 : 1);
  append_be32(out, has_null ? 1 : 0);
  append_be32(out, element);
  if (n == 0) return out;
  append_be32(out, static_cast<uint32_t>(n));
  append_be32(out, 1);  // lower bound
  if (elements != nullptr) {
    for (const auto& e : *elements) {
      if (!e) {
        append_be32(out, 0xffffffffU);
        continue;
      }
      append_be32(out, static_cast<uint32_t>(e->size()));
      out += *e;
    }
  }
  return out;
}

Params& Params::int8_array(const std::vector<int64_t>& values) {
  std::string out = array(kInt8Oid, values.size(), false, nullptr);
  out.reserve(out.size() + values.size() * 12);
  for (int64_t v : values) {
    append_be32(out, 8);
    out += be64(static_cast<uint64_t>(v));
  }
  push(kInt8ArrayOid, std::move(out));
  return *this;
}

Params& Params::float8_array(const std::vector<std::optional<double>>& values) {
  bool has_null = false;
  for (const auto& v : values) has_null = has_null || !v;
  std::string out = array(kFloat8Oid, values.size(), has_null, nullptr);
  out.reserve(out.size() + values.size() * 12);
  for (const auto& v : values) {
    if (!v) {
      append_be32(out, 0xffffffffU);
      continue;
    }
    append_be32(out, 8);
    out += float8(*v);
  }
  push(kFloat8ArrayOid, std::move(out));
  return *this;
}

Params& Params::text_array(const std::vector<std::string>& values) {
  std::string out = array(kTextOid, values.size(), false, nullptr);
  for (const auto& v : values) {
    append_be32(out, static_cast<uint32_t>(v.size()));
    out += v;
  }
  push(kTextArrayOid, std::move(out));
  return *this;
}

Params& Params::bytea_array(const std::vector<std::optional<std::string>>& values) {
  bool has_null = false;
  for (const auto& v : values) has_null = has_null || !v;
  push(kByteaArrayOid, array(kByteaOid, values.size(), has_null, &values));
  return *this;
}

std::vector<const char*> Params::values() const {
  std::vector<const char*> out;
  out.reserve(values_.size());
  for (size_t i = 0; i < values_.size(); ++i) {
    // A zero-length value must not be a null pointer: libpq would send NULL.
    out.push_back(nulls_[i] ? nullptr : values_[i].data());
  }
  return out;
}

std::vector<int> Params::lengths() const {
  std::vector<int> out;
  out.reserve(values_.size());
  for (const auto& v : values_) out.push_back(static_cast<int>(v.size()));
  return out;
}

// ---- Rows ----

int64_t Rows::affected() const {
  const char* n = res_ ? PQcmdTuples(res_.get()) : nullptr;
  return n == nullptr || *n == '\0' ? 0 : std::strtoll(n, nullptr, 10);
}

int64_t Rows::i64(int row, int col) const {
  if (null(row, col)) return 0;
  const char* p = PQgetvalue(res_.get(), row, col);
  switch (PQftype(res_.get(), col)) {
    case kInt8Oid:
      return static_cast<int64_t>(read_be(p, 8));
    case kInt4Oid:
      return static_cast<int32_t>(read_be(p, 4));
    case kInt2Oid:
      return static_cast<int16_t>(read_be(p, 2));
    case kBoolOid:
      return *p != 0 ? 1 : 0;
    default:
      assert(false && "column is not an integer: cast it in the query");
      return 0;
  }
}

double Rows::f64(int row, int col) const {
  if (null(row, col)) return 0;
  const char* p = PQgetvalue(res_.get(), row, col);
  switch (PQftype(res_.get(), col)) {
    case kFloat8Oid:
      return std::bit_cast<double>(read_be(p, 8));
    case kFloat4Oid:
      return static_cast<double>(std::bit_cast<float>(static_cast<uint32_t>(read_be(p, 4))));
    default:
      return static_cast<double>(i64(row, col));
  }
}

// ---- Connection ----

Result<std::unique_ptr<Connection>> Connection::connect(const std::string& conninfo,
                                                        const std::string& shown_url) {
  // Our defaults come before the URL (which may override them); UTF-8 after it, because that
  // is what we send whatever the URL says.
  const char* keywords[] = {"connect_timeout", "application_name", "dbname", "client_encoding",
                            nullptr};
  const char* values[] = {"10", "outpost", conninfo.c_str(), "UTF8", nullptr};
  ConnPtr conn(PQconnectdbParams(keywords, values, /*expand_dbname=*/1));
  if (!conn) {
    return make_error(Errc::kResourceExhausted,
                      "connecting to " + shown_url + ": out of memory in libpq");
  }
  if (PQstatus(conn.get()) != CONNECTION_OK) {
    std::string detail = PQerrorMessage(conn.get());
    while (!detail.empty() && (detail.back() == '\n' || detail.back() == ' ')) detail.pop_back();
    return make_error(Errc::kUnavailable, "connecting to " + shown_url + ": " + detail);
  }
  // Notices (CREATE TABLE IF NOT EXISTS ... skipping) say nothing a caller needs; libpq would
  // print them on stderr.
  PQsetNoticeProcessor(
      conn.get(), [](void*, const char*) {}, nullptr);
  return std::unique_ptr<Connection>(new Connection(std::move(conn), shown_url));
}

Error Connection::failure(PGresult* res) {
  const char* state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : nullptr;
  const char* primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : nullptr;
  const char* detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : nullptr;
  const char* constraint = res ? PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME) : nullptr;
  last_sqlstate_ = state ? state : "";
  last_constraint_ = constraint ? constraint : "";
  if (last_sqlstate_ == "40001" || last_sqlstate_ == "40P01") retryable_ = true;
  std::string message = primary ? primary : PQerrorMessage(conn_.get());
  while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
  if (detail != nullptr) message += std::string(" (") + detail + ")";
  if (broken()) message += " (connection to " + shown_url_ + " lost)";
  return Error{errc_for_sqlstate(last_sqlstate_),
               (operation_.empty() ? std::string("postgres") : operation_) + ": " + message};
}

namespace {

struct ClearResult {
  void operator()(PGresult* res) const { PQclear(res); }
};
using ResultPtr = std::unique_ptr<PGresult, ClearResult>;

}  // namespace

Result<Rows> Connection::exec(std::string_view sql, const Params& params) {
  auto it = prepared_.find(sql);
  if (it == prepared_.end()) {
    std::string name = "outpost_" + std::to_string(prepared_.size() + 1);
    const std::string text(sql);
    ResultPtr res(
        PQprepare(conn_.get(), name.c_str(), text.c_str(), params.size(), params.types()));
    if (PQresultStatus(res.get()) != PGRES_COMMAND_OK) return make_error(failure(res.get()));
    it = prepared_.emplace(text, std::move(name)).first;
  }
  const auto values = params.values();
  const auto lengths = params.lengths();
  const auto formats = params.formats();
  ResultPtr res(PQexecPrepared(conn_.get(), it->second.c_str(), params.size(), values.data(),
                               lengths.data(), formats.data(), /*resultFormat=*/1));
  const ExecStatusType status = PQresultStatus(res.get());
  if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) {
    return make_error(failure(res.get()));
  }
  return Rows(res.release());
}

Status Connection::exec_script(const std::string& sql) {
  ResultPtr res(PQexec(conn_.get(), sql.c_str()));
  const ExecStatusType status = PQresultStatus(res.get());
  if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) {
    return make_error(failure(res.get()));
  }
  return ok();
}

// ---- Pool ----

Result<Pool::Lease> Pool::acquire(std::chrono::milliseconds wait) {
  std::unique_lock lock(mu_);
  const auto deadline = std::chrono::steady_clock::now() + wait;
  while (idle_.empty() && open_ >= max_) {
    if (freed_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
        open_ >= max_) {
      return make_error(Errc::kUnavailable, "all " + std::to_string(max_) + " connections to " +
                                                shown_url_ + " stayed busy for " +
                                                std::to_string(wait.count()) + " ms");
    }
  }
  if (!idle_.empty()) {
    auto conn = std::move(idle_.back());
    idle_.pop_back();
    return Lease(this, std::move(conn));
  }
  ++open_;  // the slot is ours while we connect, outside the lock
  lock.unlock();
  auto conn = Connection::connect(conninfo_, shown_url_);
  if (!conn) {
    lock.lock();
    --open_;
    freed_.notify_one();
    return make_error(std::move(conn).error());
  }
  return Lease(this, std::move(*conn));
}

void Pool::give_back(std::unique_ptr<Connection> conn) {
  // A connection left inside a transaction (a body that threw) or broken is not reused.
  const bool keep = !conn->broken() && conn->idle();
  std::vector<std::unique_ptr<Connection>> stale;  // closed outside the lock
  std::lock_guard lock(mu_);
  if (keep) {
    idle_.push_back(std::move(conn));
  } else {
    --open_;
    // A broken connection mostly means a restarted or failed-over server: the idle ones are
    // broken too, and finding that out one failed call at a time would fail several calls.
    if (conn->broken()) {
      open_ -= idle_.size();
      stale.swap(idle_);
    }
  }
  freed_.notify_all();
}

bool Pool::retry(const Connection& conn, int attempt) {
  const bool again =
      (conn.retryable_failure() && attempt + 1 < kMaxAttempts) || (conn.broken() && attempt == 0);
  if (!again) return false;
  // A random pause that grows with the attempts, so that transactions that keep colliding
  // stop meeting in step.
  thread_local std::minstd_rand random(std::random_device{}());
  const int ceiling_us = 200 * std::min(attempt + 1, 20);
  std::this_thread::sleep_for(
      std::chrono::microseconds(std::uniform_int_distribution<int>(0, ceiling_us)(random)));
  return true;
}

}  // namespace outpost::store::postgres
