#include "agent/telemetry/buffer.h"

#include <sys/stat.h>

#include <algorithm>
#include <utility>

#include <sqlite3.h>

#include <nlohmann/json.hpp>

namespace outpost::agent::telemetry {
namespace {

using outpost::telemetry::record_kind;
using outpost::telemetry::record_to_json;

const char* const kClassNames[kRecordClasses] = {"sample", "health", "inference", "event"};

RecordClass class_of_kind(std::string_view kind) {
  if (kind == "sample") return RecordClass::kSample;
  if (kind == "health") return RecordClass::kHealth;
  if (kind == "inference") return RecordClass::kInference;
  return RecordClass::kEvent;
}

RecordClass class_of_name(const char* name) {
  return class_of_kind(name ? std::string_view(name) : std::string_view("event"));
}

int64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
}

// A prepared statement that finalizes itself.
class BufferStatement {
 public:
  BufferStatement(sqlite3* db, const char* sql) {
    if (sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr) != SQLITE_OK) stmt_ = nullptr;
  }
  ~BufferStatement() { sqlite3_finalize(stmt_); }
  BufferStatement(const BufferStatement&) = delete;
  BufferStatement& operator=(const BufferStatement&) = delete;
  bool ok() const { return stmt_ != nullptr; }
  sqlite3_stmt* get() const { return stmt_; }
  void bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }
  void bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  int step() { return sqlite3_step(stmt_); }
  void reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  int64_t int_at(int col) const { return sqlite3_column_int64(stmt_, col); }
  std::string text_at(int col) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(stmt_, col))) : "";
  }
  const char* cstr_at(int col) const {
    return reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
  }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

// The WAL is checkpointed (and truncated) at this many pages: about 1/32 of the bound, so a
// small bound keeps a small WAL, and never fewer than 16 pages.
int64_t wal_pages_for(int64_t bound, int64_t page_size) {
  return std::clamp<int64_t>(bound / page_size / 32, 16, 1000);
}

}  // namespace

const char* record_class_name(RecordClass c) { return kClassNames[static_cast<int>(c)]; }

Buffer::Buffer(std::string path, int64_t bound_bytes)
    : path_(std::move(path)), bound_(std::max(bound_bytes, kMinBufferBytes)) {}

Buffer::~Buffer() {
  if (db_) sqlite3_close_v2(db_);
}

Status Buffer::exec(const char* sql) {
  char* message = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &message) != SQLITE_OK) {
    std::string text = message ? message : sqlite3_errmsg(db_);
    sqlite3_free(message);
    return make_error(Errc::kIo, "telemetry buffer " + path_ + ": " + text);
  }
  return ok();
}

int64_t Buffer::pragma_int(const char* pragma) const {
  BufferStatement st(db_, (std::string("PRAGMA ") + pragma).c_str());
  if (!st.ok() || st.step() != SQLITE_ROW) return 0;
  return st.int_at(0);
}

Status Buffer::open() {
  std::lock_guard lock(mu_);
  if (sqlite3_open_v2(path_.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) !=
      SQLITE_OK) {
    std::string message = db_ ? sqlite3_errmsg(db_) : "out of memory";
    sqlite3_close_v2(db_);
    db_ = nullptr;
    return make_error(Errc::kIo, "cannot open the telemetry buffer " + path_ + ": " + message);
  }
  sqlite3_busy_timeout(db_, 5'000);
  OUTPOST_TRY(exec("PRAGMA journal_mode=WAL"));
  // FULL: the WAL is fsynced at every commit, so a committed record survives power loss.
  OUTPOST_TRY(exec("PRAGMA synchronous=FULL"));
  page_size_ = std::max<int64_t>(pragma_int("page_size"), 512);
  const int64_t wal_pages = wal_pages_for(bound_, page_size_);
  OUTPOST_TRY(exec(("PRAGMA wal_autocheckpoint=" + std::to_string(wal_pages)).c_str()));
  OUTPOST_TRY(
      exec(("PRAGMA journal_size_limit=" + std::to_string(wal_pages * page_size_)).c_str()));
  OUTPOST_TRY(
      exec("CREATE TABLE IF NOT EXISTS records(seq INTEGER PRIMARY KEY, class TEXT NOT NULL,"
           " time INTEGER NOT NULL, body TEXT NOT NULL);"
           "CREATE INDEX IF NOT EXISTS records_by_class ON records(class, seq);"
           "CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
           "CREATE TABLE IF NOT EXISTS open_aggregates(key TEXT PRIMARY KEY, time INTEGER NOT NULL,"
           " body TEXT NOT NULL);"));

  reload_locked();
  return ok();
}

void Buffer::reload_locked() {
  last_seq_ = acked_ = 0;
  dropped_ = {};
  for (int c = 0; c < kRecordClasses; ++c) count_[c] = bytes_[c] = 0;
  {
    BufferStatement st(db_, "SELECT name, value FROM counters");
    while (st.ok() && st.step() == SQLITE_ROW) {
      const std::string name = st.text_at(0);
      const int64_t v = st.int_at(1);
      if (name == "last_seq") last_seq_ = v;
      if (name == "acked") acked_ = v;
      if (name == "dropped_samples") dropped_.samples = v;
      if (name == "dropped_health") dropped_.health = v;
      if (name == "dropped_aggregates") dropped_.aggregates = v;
      if (name == "dropped_events") dropped_.events = v;
    }
  }
  {
    BufferStatement st(db_,
                       "SELECT class, count(*), sum(length(body)), max(seq) FROM records"
                       " GROUP BY class");
    while (st.ok() && st.step() == SQLITE_ROW) {
      const int c = static_cast<int>(class_of_name(st.cstr_at(0)));
      count_[c] = st.int_at(1);
      bytes_[c] = st.int_at(2);
      // A crash between a record and the counter cannot happen (one transaction), but a
      // counters table lost or older than the records must still never reuse a seq.
      last_seq_ = std::max(last_seq_, st.int_at(3));
    }
  }
  last_seq_ = std::max(last_seq_, acked_);
}

Status Buffer::save_counters_locked() {
  BufferStatement st(db_,
                     "INSERT INTO counters(name, value) VALUES(?, ?)"
                     " ON CONFLICT(name) DO UPDATE SET value = excluded.value");
  if (!st.ok())
    return make_error(Errc::kIo, "telemetry buffer " + path_ + ": " + sqlite3_errmsg(db_));
  const std::pair<const char*, int64_t> values[] = {{"last_seq", last_seq_},
                                                    {"acked", acked_},
                                                    {"dropped_samples", dropped_.samples},
                                                    {"dropped_health", dropped_.health},
                                                    {"dropped_aggregates", dropped_.aggregates},
                                                    {"dropped_events", dropped_.events}};
  for (const auto& [name, value] : values) {
    st.reset();
    st.bind(1, std::string(name));
    st.bind(2, value);
    if (st.step() != SQLITE_DONE) {
      return make_error(Errc::kIo, "telemetry buffer " + path_ + ": " + sqlite3_errmsg(db_));
    }
  }
  return ok();
}

int64_t Buffer::used_bytes_locked() const {
  return (pragma_int("page_count") - pragma_int("freelist_count")) * page_size_;
}

void Buffer::trim_wal_locked() {
  // A transaction that dropped or deleted much writes many pages to the WAL at once, beyond the
  // size the autocheckpoint keeps it at: checkpoint and truncate it now rather than hold that
  // space until the next checkpoint.
  const int64_t limit = wal_pages_for(bound_, page_size_) * page_size_;
  if (file_size(path_ + "-wal") > limit) (void)exec("PRAGMA wal_checkpoint(TRUNCATE)");
}

int64_t Buffer::slack() const {
  const int64_t wal = wal_pages_for(bound_, page_size_) * page_size_;
  // The WAL at its checkpoint size plus one transaction beyond it, and the pages one append
  // may add before the bound is applied in the same transaction.
  return 2 * wal + bound_ / 16 + (64 << 10);
}

Result<int64_t> Buffer::append_locked(std::vector<Record>& records) {
  BufferStatement st(db_, "INSERT INTO records(seq, class, time, body) VALUES(?, ?, ?, ?)");
  if (!st.ok())
    return make_error(Errc::kIo, "telemetry buffer " + path_ + ": " + sqlite3_errmsg(db_));
  for (Record& r : records) {
    r.seq = ++last_seq_;
    const RecordClass c = class_of_kind(record_kind(r.body));
    std::string text =
        record_to_json(r).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    st.reset();
    st.bind(1, r.seq);
    st.bind(2, std::string(record_class_name(c)));
    st.bind(3, r.time);
    st.bind(4, text);
    if (st.step() != SQLITE_DONE) {
      return make_error(Errc::kIo,
                        "telemetry buffer " + path_ + ": cannot append: " + sqlite3_errmsg(db_));
    }
    ++count_[static_cast<int>(c)];
    bytes_[static_cast<int>(c)] += static_cast<int64_t>(text.size());
  }
  OUTPOST_TRY(save_counters_locked());
  OUTPOST_TRY(enforce_bound_locked());
  return last_seq_;
}

Status Buffer::enforce_bound_locked() {
  int64_t used = used_bytes_locked();
  if (used <= bound_) return ok();
  const int64_t target = bound_ - bound_ / 16;  // some room, so not every append drops
  // The classes that go, in order; the last step takes aggregates and events together, oldest
  // first, since neither is worth more than the other.
  static const char* const kSteps[] = {
      "SELECT seq, class, length(body) FROM records WHERE class = 'sample' ORDER BY seq LIMIT ?",
      "SELECT seq, class, length(body) FROM records WHERE class = 'health' ORDER BY seq LIMIT ?",
      "SELECT seq, class, length(body) FROM records ORDER BY seq LIMIT ?"};
  size_t step = 0;
  while (used > target && step < 3) {
    if ((step == 0 && count_[0] == 0) || (step == 1 && count_[1] == 0) ||
        (step == 2 && count_[2] + count_[3] == 0)) {
      ++step;
      continue;
    }
    const int64_t held = bytes_[0] + bytes_[1] + bytes_[2] + bytes_[3];
    const int64_t held_count = std::max<int64_t>(1, count_[0] + count_[1] + count_[2] + count_[3]);
    const int64_t average = std::max<int64_t>(1, held / held_count);
    const int64_t want = std::clamp<int64_t>((used - target) / average + 1, 16, 4096);
    BufferStatement pick(db_, kSteps[step]);
    if (!pick.ok())
      return make_error(Errc::kIo, "telemetry buffer " + path_ + ": " + sqlite3_errmsg(db_));
    pick.bind(1, want);
    int64_t through = 0;
    int64_t got = 0;
    int64_t n[kRecordClasses] = {0, 0, 0, 0};
    int64_t b[kRecordClasses] = {0, 0, 0, 0};
    while (pick.step() == SQLITE_ROW) {
      through = pick.int_at(0);
      const int c = static_cast<int>(class_of_name(pick.cstr_at(1)));
      ++n[c];
      b[c] += pick.int_at(2);
      ++got;
    }
    if (got == 0) {
      ++step;
      continue;
    }
    const char* del = step == 0   ? "DELETE FROM records WHERE class = 'sample' AND seq <= ?"
                      : step == 1 ? "DELETE FROM records WHERE class = 'health' AND seq <= ?"
                                  : "DELETE FROM records WHERE seq <= ?";
    BufferStatement remove(db_, del);
    remove.bind(1, through);
    if (!remove.ok() || remove.step() != SQLITE_DONE) {
      return make_error(Errc::kIo,
                        "telemetry buffer " + path_ + ": cannot drop: " + sqlite3_errmsg(db_));
    }
    forget_locked(n, b, /*as_dropped=*/true);
    used = used_bytes_locked();
  }
  return save_counters_locked();
}

Result<int64_t> Buffer::append(std::vector<Record> records) {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  // Transactions of at most ~1/4 of the WAL's checkpoint size: a big append (a long-full sample
  // queue) must not blow the WAL past its bound.
  const int64_t chunk_bytes =
      std::max<int64_t>(16 << 10, wal_pages_for(bound_, page_size_) * page_size_ / 4);
  size_t i = 0;
  while (i < records.size()) {
    std::vector<Record> chunk;
    int64_t bytes = 0;
    while (i < records.size() && (chunk.empty() || bytes < chunk_bytes)) {
      // A rough size: good enough to cut transactions.
      bytes += 200;
      if (const auto* e = std::get_if<outpost::telemetry::EventRecord>(&records[i].body)) {
        bytes += static_cast<int64_t>(e->message.size());
      } else if (std::holds_alternative<outpost::telemetry::InferenceRecord>(records[i].body)) {
        bytes += 1000;
      }
      chunk.push_back(std::move(records[i++]));
    }
    OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
    auto done = append_locked(chunk);
    if (done) {
      if (auto committed = exec("COMMIT"); !committed) done = make_error(committed.error());
    }
    if (!done) {
      (void)exec("ROLLBACK");
      reload_locked();  // the mirrors counted what the rollback undid
      return done;
    }
    trim_wal_locked();
  }
  return last_seq_;
}

Result<PendingRecords> Buffer::read(size_t max_records, int64_t max_bytes) {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  BufferStatement st(db_,
                     "SELECT seq, class, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?");
  if (!st.ok())
    return make_error(Errc::kIo, "telemetry buffer " + path_ + ": " + sqlite3_errmsg(db_));
  st.bind(1, acked_);
  st.bind(2, static_cast<int64_t>(max_records));
  PendingRecords out;
  while (st.step() == SQLITE_ROW) {
    std::string text = st.text_at(2);
    if (!out.empty() && out.bytes + static_cast<int64_t>(text.size()) > max_bytes) break;
    out.seqs.push_back(st.int_at(0));
    out.classes.push_back(class_of_name(st.cstr_at(1)));
    out.bytes += static_cast<int64_t>(text.size());
    out.texts.push_back(std::move(text));
  }
  return out;
}

Status Buffer::delete_through_locked(int64_t seq, bool count_as_dropped) {
  int64_t n[kRecordClasses] = {0, 0, 0, 0};
  int64_t b[kRecordClasses] = {0, 0, 0, 0};
  {
    BufferStatement st(db_,
                       "SELECT class, count(*), sum(length(body)) FROM records"
                       " WHERE seq <= ? GROUP BY class");
    st.bind(1, seq);
    while (st.ok() && st.step() == SQLITE_ROW) {
      const int c = static_cast<int>(class_of_name(st.cstr_at(0)));
      n[c] = st.int_at(1);
      b[c] = st.int_at(2);
    }
  }
  BufferStatement del(db_, "DELETE FROM records WHERE seq <= ?");
  del.bind(1, seq);
  if (!del.ok() || del.step() != SQLITE_DONE) {
    return make_error(Errc::kIo,
                      "telemetry buffer " + path_ + ": cannot delete: " + sqlite3_errmsg(db_));
  }
  forget_locked(n, b, count_as_dropped);
  return ok();
}

void Buffer::forget_locked(const int64_t (&n)[kRecordClasses], const int64_t (&b)[kRecordClasses],
                           bool as_dropped) {
  for (int c = 0; c < kRecordClasses; ++c) {
    count_[c] -= n[c];
    bytes_[c] -= b[c];
  }
  if (as_dropped) {
    dropped_.samples += n[0];
    dropped_.health += n[1];
    dropped_.aggregates += n[2];
    dropped_.events += n[3];
  }
}

Status Buffer::ack(int64_t seq) {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  if (seq <= acked_) return ok();
  OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
  Status done = delete_through_locked(seq, false);
  if (done) {
    acked_ = seq;
    last_seq_ = std::max(last_seq_, seq);  // numbering continues above what the server has
    done = save_counters_locked();
  }
  if (done) done = exec("COMMIT");
  if (!done) {
    (void)exec("ROLLBACK");
    reload_locked();
  }
  trim_wal_locked();
  return done;
}

Status Buffer::discard_through(int64_t seq) {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
  Status done = delete_through_locked(seq, true);
  if (done) done = save_counters_locked();
  if (done) done = exec("COMMIT");
  if (!done) {
    (void)exec("ROLLBACK");
    reload_locked();
  }
  trim_wal_locked();
  return done;
}

Status Buffer::count_dropped(const DropCounts& more) {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  dropped_.samples += more.samples;
  dropped_.health += more.health;
  dropped_.aggregates += more.aggregates;
  dropped_.events += more.events;
  return save_counters_locked();
}

Status Buffer::replace_open(const std::vector<Record>& records) {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
  Status done = exec("DELETE FROM open_aggregates");
  if (done) {
    BufferStatement st(db_, "INSERT INTO open_aggregates(key, time, body) VALUES(?, ?, ?)");
    int64_t n = 0;
    for (const Record& r : records) {
      st.reset();
      st.bind(1, std::to_string(n++));
      st.bind(2, r.time);
      st.bind(3, record_to_json(r).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      if (!st.ok() || st.step() != SQLITE_DONE) {
        done = make_error(
            Errc::kIo, "telemetry buffer " + path_ + ": cannot checkpoint: " + sqlite3_errmsg(db_));
        break;
      }
    }
  }
  if (done) done = exec("COMMIT");
  if (!done) (void)exec("ROLLBACK");
  return done;
}

Result<int64_t> Buffer::close_open(std::vector<Record> records) {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
  Result<int64_t> done = append_locked(records);
  if (done) {
    if (auto cleared = exec("DELETE FROM open_aggregates"); !cleared)
      done = make_error(cleared.error());
  }
  if (done) {
    if (auto committed = exec("COMMIT"); !committed) done = make_error(committed.error());
  }
  if (!done) {
    (void)exec("ROLLBACK");
    reload_locked();
  }
  trim_wal_locked();
  return done;
}

Result<size_t> Buffer::recover_open() {
  std::lock_guard lock(mu_);
  if (!db_)
    return make_error(Errc::kFailedPrecondition, "telemetry buffer " + path_ + " is not open");
  OUTPOST_TRY(exec("BEGIN IMMEDIATE"));
  size_t n = 0;
  Status done = ok();
  {
    BufferStatement pick(db_, "SELECT time, body FROM open_aggregates ORDER BY time, key");
    BufferStatement put(db_,
                        "INSERT INTO records(seq, class, time, body) VALUES(?, 'inference', ?, ?)");
    const int c = static_cast<int>(RecordClass::kInference);
    while (pick.ok() && put.ok() && pick.step() == SQLITE_ROW) {
      // Written by replace_open from a whole record: only its seq is missing.
      auto doc = nlohmann::json::parse(pick.text_at(1), nullptr, false);
      if (!doc.is_object()) continue;
      doc["seq"] = ++last_seq_;
      const std::string text = doc.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      put.reset();
      put.bind(1, last_seq_);
      put.bind(2, pick.int_at(0));
      put.bind(3, text);
      if (put.step() != SQLITE_DONE) {
        done = make_error(Errc::kIo,
                          "telemetry buffer " + path_ + ": cannot recover: " + sqlite3_errmsg(db_));
        break;
      }
      ++count_[c];
      bytes_[c] += static_cast<int64_t>(text.size());
      ++n;
    }
  }
  if (done) done = exec("DELETE FROM open_aggregates");
  if (done) done = save_counters_locked();
  if (done) done = enforce_bound_locked();
  if (done) done = exec("COMMIT");
  if (!done) {
    (void)exec("ROLLBACK");
    reload_locked();
    return make_error(done.error());
  }
  trim_wal_locked();
  return n;
}

DropCounts Buffer::dropped() const {
  std::lock_guard lock(mu_);
  return dropped_;
}

BufferStats Buffer::stats() const {
  std::lock_guard lock(mu_);
  BufferStats s;
  for (int c = 0; c < kRecordClasses; ++c) {
    s.records[c] = count_[c];
    s.record_bytes += bytes_[c];
  }
  if (db_) s.used_bytes = used_bytes_locked();
  s.file_bytes = file_size(path_) + file_size(path_ + "-wal");
  s.bound_bytes = bound_;
  s.last_seq = last_seq_;
  s.acked = acked_;
  s.dropped = dropped_;
  return s;
}

}  // namespace outpost::agent::telemetry
