// A private PostgreSQL cluster for tests: initdb into a directory of ours, a postmaster on a
// free loopback port, a fresh database per test, and everything removed at the end. Used by
// the store suite (its postgres backend) and by the e2e harness (OUTPOST_TEST_DB=postgres).
//
// Under CTest one cluster serves every test process: a fixture (tools/pg_test_cluster.cpp,
// `pg_test_cluster start|stop DIR`) starts it before the first test that needs it and stops
// it after the last, and OUTPOST_TEST_PG_DIR names its directory. Run by hand, a test binary
// starts its own cluster on first use and stops it at exit.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::testing_support {

// Where PostgreSQL's server programs (initdb, pg_ctl, postgres) are: $OUTPOST_PG_BINDIR, else
// the newest /usr/lib/postgresql/<major>/bin (Debian's layout) that has them, else the PATH.
// "" when they are not installed.
std::string find_pg_bindir();

class PgCluster {
 public:
  // Creates the cluster in `dir` (made if missing, its old content removed) and starts it on a
  // free port of 127.0.0.1, user "outpost" with trust authentication, fsync off. When run as
  // root (initdb refuses), the server runs as the "postgres" user (or "nobody"), which then
  // owns `dir`. kUnavailable with the reason when PostgreSQL is not installed or will not start.
  [[nodiscard]] static Result<std::unique_ptr<PgCluster>> start(const std::string& dir);
  // A cluster another process started in `dir` (start() wrote DIR/port); not stopped by us.
  [[nodiscard]] static Result<std::unique_ptr<PgCluster>> attach(const std::string& dir);
  // Stops the cluster in `dir` (immediate shutdown) and removes the directory; a no-op when
  // there is none.
  static void stop_dir(const std::string& dir);

  // Drops the databases create_database() made; stops the cluster and removes its directory
  // when start() made it.
  ~PgCluster();
  PgCluster(const PgCluster&) = delete;
  PgCluster& operator=(const PgCluster&) = delete;

  // Leaves a cluster start() made running when this object goes (the CTest fixture's).
  void keep_running() { owned_ = false; }

  uint16_t port() const { return port_; }
  // "postgres://outpost@127.0.0.1:PORT/DB"
  std::string url(const std::string& db) const;
  // A new empty UTF-8 database with a name unique across processes; returns its URL.
  [[nodiscard]] Result<std::string> create_database();

 private:
  PgCluster(std::string dir, uint16_t port, bool owned)
      : dir_(std::move(dir)), port_(port), owned_(owned) {}
  [[nodiscard]] Status admin(const std::string& sql);

  std::string dir_;
  uint16_t port_ = 0;
  bool owned_ = false;
  std::mutex mu_;
  std::vector<std::string> databases_;  // GUARDED_BY(mu_)
  int64_t next_ = 0;                    // GUARDED_BY(mu_)
};

// The cluster this test process uses: the CTest fixture's when OUTPOST_TEST_PG_DIR is set, else
// a private one started on the first call (in a temp dir; stopped at exit). Null, with the
// reason in `why`, when PostgreSQL is not installed (tests then GTEST_SKIP with it).
PgCluster* test_cluster(std::string* why);

}  // namespace outpost::testing_support
