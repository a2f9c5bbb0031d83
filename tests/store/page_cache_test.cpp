// The page-cache guard (src/store/sqlite/page_cache.h): commits after b-tree page swaps no
// longer walk the whole cache, and truncates that must drop pages still do. Each test is its
// own process (gtest_discover_tests), so the guard goes in before SQLite's first use.
#include "store/sqlite/page_cache.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <string>

#include "store/sqlite/sqlite_store.h"

namespace outpost::store::sqlite {
namespace {

class TempDir {
 public:
  TempDir() {
    std::string pattern = testing::TempDir() + "/outpost-pcache-XXXXXX";
    if (mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class Db {
 public:
  explicit Db(const std::string& path) {
    EXPECT_EQ(sqlite3_open(path.c_str(), &db_), SQLITE_OK);
    exec("PRAGMA journal_mode = WAL");
    exec("PRAGMA cache_size = -65536");
  }
  ~Db() { sqlite3_close(db_); }
  void exec(const std::string& sql) {
    char* err = nullptr;
    const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
    EXPECT_EQ(rc, SQLITE_OK) << sql << ": " << (err ? err : "");
    sqlite3_free(err);
  }
  int64_t int64(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK) << sql;
    int64_t v = -1;
    if (sqlite3_step(stmt) == SQLITE_ROW) v = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    return v;
  }
  std::string text(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK) << sql;
    std::string v;
    if (sqlite3_step(stmt) == SQLITE_ROW) {
      v = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    }
    sqlite3_finalize(stmt);
    return v;
  }

 private:
  sqlite3* db_ = nullptr;
};

// INSERT of rows first..last into t, each body made by `body` (SQL of the row number v).
std::string insert_range(int first, int last, const std::string& body) {
  return "WITH RECURSIVE s(v) AS (SELECT " + std::to_string(first) +
         " UNION ALL SELECT v + 1 FROM s WHERE v < " + std::to_string(last) +
         ") INSERT INTO t SELECT v, " + body + " FROM s";
}

// The status log's pattern: each device adds a report and drops its oldest, so freed pages
// are reused out of order and page splits swap page numbers.
void churn(Db& db, int devices, int rounds, int keep) {
  for (int round = 1; round <= rounds; ++round) {
    for (int first = 0; first < devices; first += 50) {
      std::string sql = "BEGIN;";
      for (int d = first; d < first + 50 && d < devices; ++d) {
        const std::string id = "'device-" + std::to_string(d) + "'";
        sql +=
            "INSERT INTO log VALUES (" + id + ", " + std::to_string(round) + ", randomblob(400));";
        sql += "DELETE FROM log WHERE device = " + id +
               " AND seq <= " + std::to_string(round - keep) + ";";
      }
      sql += "COMMIT;";
      db.exec(sql);
    }
  }
}

TEST(PageCacheGuardTest, CommitsAfterPageSwapsSkipTheWalk) {
  ASSERT_TRUE(install_page_cache_guard());
  TempDir dir;
  Db db(dir.path() + "/churn.db");
  db.exec("CREATE TABLE log (device TEXT, seq INTEGER, body BLOB, PRIMARY KEY (device, seq))");
  const PageCacheGuardStats before = page_cache_guard_stats();
  churn(db, 2000, 12, 3);
  const PageCacheGuardStats after = page_cache_guard_stats();

  const int64_t commits = 12 * 2000 / 50;
  // The scenario happened: pages were parked during swaps (each would have made pcache1
  // walk its whole table at the next commit).
  EXPECT_GT(after.parks - before.parks, 10);
  EXPECT_GE(after.truncates - before.truncates, commits);
  // ...and almost no truncate reached pcache1.
  EXPECT_LE(after.truncates_passed - before.truncates_passed, commits / 50)
      << "truncates " << after.truncates - before.truncates;
  EXPECT_EQ(db.text("PRAGMA integrity_check"), "ok");
  EXPECT_EQ(db.int64("SELECT COUNT(*) FROM log"), 2000 * 3);
  EXPECT_EQ(db.int64("SELECT COUNT(DISTINCT device) FROM log WHERE seq = 12"), 2000);
}

TEST(PageCacheGuardTest, RollbackStillDropsPagesPastTheEnd) {
  ASSERT_TRUE(install_page_cache_guard());
  TempDir dir;
  Db db(dir.path() + "/rollback.db");
  db.exec("CREATE TABLE t (k INTEGER PRIMARY KEY, body BLOB)");
  db.exec(insert_range(1, 100, "randomblob(300)"));
  const int64_t pages = db.int64("PRAGMA page_count");

  // Grows the file in the cache, then throws it away: the pages past the end must go.
  const PageCacheGuardStats before = page_cache_guard_stats();
  db.exec("BEGIN; " + insert_range(1000, 3000, "randomblob(3000)") + "; ROLLBACK");
  const PageCacheGuardStats after = page_cache_guard_stats();
  EXPECT_GT(after.truncates_passed, before.truncates_passed);
  EXPECT_EQ(db.int64("PRAGMA page_count"), pages);

  // The same page numbers written again read back as written, not as the rolled-back pages.
  db.exec(insert_range(5000, 6000, "zeroblob(3000)"));
  EXPECT_EQ(db.int64("SELECT COUNT(*) FROM t WHERE k >= 1000 AND k <= 3000"), 0);
  EXPECT_EQ(db.int64("SELECT SUM(length(body)) FROM t WHERE k >= 5000"), 1001 * 3000);
  EXPECT_EQ(db.int64("SELECT COUNT(*) FROM t WHERE k >= 5000 AND body != zeroblob(3000)"), 0);
  EXPECT_EQ(db.text("PRAGMA integrity_check"), "ok");
}

TEST(PageCacheGuardTest, OpeningTheStoreInstallsIt) {
  TempDir dir;
  auto store = open_sqlite_store(dir.path() + "/outpost.db");
  ASSERT_TRUE(store) << store.error().message;
  EXPECT_TRUE(page_cache_guard_stats().installed);
}

TEST(PageCacheGuardTest, TooLateLeavesTheDefaultCache) {
  if (page_cache_guard_stats().installed) {
    GTEST_SKIP() << "an earlier test in this process installed it (ctest runs each alone)";
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(":memory:", &db), SQLITE_OK);  // SQLite is initialized now
  EXPECT_FALSE(install_page_cache_guard());
  EXPECT_FALSE(page_cache_guard_stats().installed);
  EXPECT_EQ(
      sqlite3_exec(db, "CREATE TABLE t (x); INSERT INTO t VALUES (1)", nullptr, nullptr, nullptr),
      SQLITE_OK);
  sqlite3_close(db);
}

}  // namespace
}  // namespace outpost::store::sqlite
