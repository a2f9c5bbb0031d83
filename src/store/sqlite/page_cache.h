#pragma once

// SQLite's page cache with a cheap truncate.
//
// Every commit ends with the pager truncating its page cache to the database's size
// (pager_end_transaction -> sqlite3PcacheTruncate). The default cache (pcache1) skips that
// only while no page was ever cached above the limit. But a b-tree balance that swaps two
// pages' numbers parks one of them for a moment on the locking page's number
// (PENDING_BYTE / page size + 1: 262,145 with 4 KiB pages), far above any database under
// 1 GiB. From then on pcache1 believes pages may exist up there, and every commit walks
// every bucket of its hash table and every cached page: with our 256 MiB cache, tens of
// thousands of pages per commit, a third of the server's CPU at 25,000-50,000 devices
// (bench/RESULTS.md, 2026-12-08).
//
// The guard wraps the default cache's own methods (SQLITE_CONFIG_GETPCACHE2, then
// SQLITE_CONFIG_PCACHE2) and keeps, per cache, an upper bound of the keys its pages hold,
// not counting pages parked on the locking page's number while a swap is under way. A
// truncate that no page can reach is then skipped; any other goes to pcache1 unchanged.

#include <cstdint>

namespace outpost::store::sqlite {

// Installs the guard once per process. It must run before SQLite is first used (before
// sqlite3_initialize, which the first sqlite3_open does): true when the guard is installed,
// false when SQLite was already in use and the default cache stays as it was.
bool install_page_cache_guard();

// Per-process counts, for tests and the bench: truncates asked for, those passed on to
// pcache1, and pages parked on the locking page's number (b-tree page swaps).
struct PageCacheGuardStats {
  bool installed = false;
  int64_t truncates = 0;
  int64_t truncates_passed = 0;
  int64_t parks = 0;
};
PageCacheGuardStats page_cache_guard_stats();

}  // namespace outpost::store::sqlite
