// The device's telemetry buffer: records waiting to reach the control plane, in SQLite at
// <data>/telemetry.db, numbered, bounded in bytes, and kept until the server acknowledges them.
//
// Durability: WAL with synchronous=FULL, so a committed append survives kill -9 and power loss;
// every change is one transaction, so a crash leaves each whole or absent.
//
// Sequence numbers: each appended record gets the next seq, strictly increasing and never
// reused (also after an ack of everything, after drops and across restarts): next =
// max(highest seq in the table, highest acked, highest ever handed out (persisted)) + 1.
//
// The bound: bytes in use = (page_count - freelist_count) * page_size. When an append takes it
// over the bound, the oldest records go, by class, until it is under 15/16 of the bound:
//   1. raw samples, oldest first;
//   2. only when no sample is left: health records, oldest first;
//   3. only when neither is left: inference aggregates and events, oldest first (by seq).
// Each drop is counted per class (cumulative, persisted here) and travels in every batch.
// Freed pages are reused, and the WAL is checkpointed and truncated at a size proportional to
// the bound (also right after a transaction that went past it), so after each call the files
// stay within bound + slack() on disk.
//
// "Open" aggregates: the aggregator's partial counts of the interval in progress, replaced at
// each checkpoint (no seq yet, never shipped). Closing the interval turns them into records in
// the same transaction that clears them; at start, leftovers of a crash become records.
//
// Thread-safe: one mutex around the connection.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/telemetry_batch.h"

struct sqlite3;

namespace outpost::agent::telemetry {

using outpost::telemetry::DropCounts;
using outpost::telemetry::Record;

inline constexpr int64_t kMinBufferBytes = 256 << 10;

// "sample", "health", "inference", "event": the class a record is dropped by.
enum class RecordClass { kSample = 0, kHealth = 1, kInference = 2, kEvent = 3 };
inline constexpr int kRecordClasses = 4;
const char* record_class_name(RecordClass c);

// Unacknowledged records read for one batch, oldest first.
struct PendingRecords {
  std::vector<int64_t> seqs;
  std::vector<RecordClass> classes;
  std::vector<std::string> texts;  // each record's JSON text (with "seq")
  int64_t bytes = 0;               // sum of the texts' sizes
  bool empty() const { return seqs.empty(); }
  int64_t first_seq() const { return seqs.empty() ? 0 : seqs.front(); }
  int64_t last_seq() const { return seqs.empty() ? 0 : seqs.back(); }
};

struct BufferStats {
  int64_t records[kRecordClasses] = {0, 0, 0, 0};  // by RecordClass
  int64_t record_bytes = 0;                        // JSON text of the records held
  int64_t used_bytes = 0;                          // pages in use (what the bound limits)
  int64_t file_bytes = 0;                          // telemetry.db + -wal on disk
  int64_t bound_bytes = 0;
  int64_t last_seq = 0;  // highest seq handed out
  int64_t acked = 0;     // highest seq the server acknowledged
  DropCounts dropped;
  int64_t total_records() const { return records[0] + records[1] + records[2] + records[3]; }
};

class Buffer {
 public:
  // `bound_bytes` >= kMinBufferBytes (the agent's flag parser refuses less).
  Buffer(std::string path, int64_t bound_bytes);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Opens (creates) the database and reads the counters. Errors name the file.
  [[nodiscard]] Status open();

  // Numbers `records` (their seq is ignored and set here) and stores them in one transaction,
  // then applies the bound. Returns the seq of the last one (0 for none).
  [[nodiscard]] Result<int64_t> append(std::vector<Record> records);
  // Up to `max_records` of the oldest unacknowledged records whose texts add up to at most
  // `max_bytes` (always at least one, when there is one).
  [[nodiscard]] Result<PendingRecords> read(size_t max_records, int64_t max_bytes);
  // The server stored everything up to `seq`: deletes it and remembers `seq` (durably).
  [[nodiscard]] Status ack(int64_t seq);
  // Gives up on every record up to `seq` (a batch the server refused): deletes them and counts
  // them as dropped in their classes.
  [[nodiscard]] Status discard_through(int64_t seq);
  // Adds to the drop counters for what never reached the buffer (a full sample queue).
  [[nodiscard]] Status count_dropped(const DropCounts& more);

  // Replaces the open aggregates with `records` (inference records of the interval so far).
  [[nodiscard]] Status replace_open(const std::vector<Record>& records);
  // Appends `records` (the closed interval) and clears the open aggregates, in one transaction.
  [[nodiscard]] Result<int64_t> close_open(std::vector<Record> records);
  // After a crash: turns the open aggregates left in the database into records. Returns how
  // many there were.
  [[nodiscard]] Result<size_t> recover_open();

  DropCounts dropped() const;
  BufferStats stats() const;
  // How far the files may exceed the bound: a few WAL checkpoints' worth of pages.
  int64_t slack() const;

 private:
  Status exec(const char* sql);
  Result<int64_t> append_locked(std::vector<Record>& records);
  Status enforce_bound_locked();
  Status delete_through_locked(int64_t seq, bool count_as_dropped);
  // Takes records just deleted (n per class, b bytes per class) off the tallies, and adds them
  // to the drop counts when they were dropped rather than delivered.
  void forget_locked(const int64_t (&n)[kRecordClasses], const int64_t (&b)[kRecordClasses],
                     bool as_dropped);
  Status save_counters_locked();
  int64_t used_bytes_locked() const;
  int64_t pragma_int(const char* pragma) const;
  void reload_locked();  // the mirrors, from the database
  void trim_wal_locked();

  std::string path_;
  int64_t bound_;
  mutable std::mutex mu_;
  sqlite3* db_ = nullptr;  // guarded by mu_
  // Guarded by mu_; mirrors of what the database holds, kept to answer stats() cheaply.
  int64_t last_seq_ = 0;
  int64_t acked_ = 0;
  DropCounts dropped_;
  int64_t count_[kRecordClasses] = {0, 0, 0, 0};
  int64_t bytes_[kRecordClasses] = {0, 0, 0, 0};
  int64_t page_size_ = 4096;
};

}  // namespace outpost::agent::telemetry
