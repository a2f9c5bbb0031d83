#include "store/sqlite/page_cache.h"

#include <sqlite3.h>

#include <atomic>
#include <mutex>

namespace outpost::store::sqlite {
namespace {

// SQLite's default PENDING_BYTE: the byte range it locks, whose page is never used. A
// b-tree balance parks a page on that page's number while it swaps two page numbers.
constexpr unsigned kPendingByte = 0x40000000;

sqlite3_pcache_methods2 inner{};  // pcache1's methods; set once, before SQLite starts
std::atomic<bool> installed{false};
std::atomic<int64_t> truncates{0};
std::atomic<int64_t> truncates_passed{0};
std::atomic<int64_t> parks{0};

// One cache. A cache is used by one pager at a time (under its connection's mutex, or ours),
// so its fields need no lock of their own.
struct GuardedCache {
  sqlite3_pcache* cache = nullptr;  // pcache1's
  unsigned parking_key = 0;         // the locking page's number at this page size
  unsigned max_key = 0;             // no page holds a larger key, except parked ones
  unsigned parked = 0;              // pages rekeyed onto parking_key and not yet off it
};

GuardedCache* guarded(sqlite3_pcache* p) { return reinterpret_cast<GuardedCache*>(p); }

int guard_init(void*) { return inner.xInit(inner.pArg); }
void guard_shutdown(void*) {
  if (inner.xShutdown) inner.xShutdown(inner.pArg);
}

sqlite3_pcache* guard_create(int page_size, int extra_size, int purgeable) {
  sqlite3_pcache* cache = inner.xCreate(page_size, extra_size, purgeable);
  if (!cache) return nullptr;
  auto* g = new (std::nothrow) GuardedCache;
  if (!g) {
    inner.xDestroy(cache);
    return nullptr;
  }
  g->cache = cache;
  g->parking_key = page_size > 0 ? kPendingByte / static_cast<unsigned>(page_size) + 1 : 0;
  return reinterpret_cast<sqlite3_pcache*>(g);
}

void guard_cachesize(sqlite3_pcache* p, int n) { inner.xCachesize(guarded(p)->cache, n); }
int guard_pagecount(sqlite3_pcache* p) { return inner.xPagecount(guarded(p)->cache); }

sqlite3_pcache_page* guard_fetch(sqlite3_pcache* p, unsigned key, int create) {
  GuardedCache* g = guarded(p);
  sqlite3_pcache_page* page = inner.xFetch(g->cache, key, create);
  // A page found or made under `key`: the bound must cover it (a fetch of the parking key
  // itself, which the pager refuses right after, raises it like any other).
  if (page && key > g->max_key) g->max_key = key;
  return page;
}

void guard_unpin(sqlite3_pcache* p, sqlite3_pcache_page* page, int discard) {
  inner.xUnpin(guarded(p)->cache, page, discard);
}

void guard_rekey(sqlite3_pcache* p, sqlite3_pcache_page* page, unsigned old_key, unsigned new_key) {
  GuardedCache* g = guarded(p);
  inner.xRekey(g->cache, page, old_key, new_key);
  if (old_key == g->parking_key && g->parked > 0) --g->parked;
  if (new_key == g->parking_key && new_key > g->max_key) {
    // Moved off again within the same balance; until then truncates are passed on.
    ++g->parked;
    parks.fetch_add(1, std::memory_order_relaxed);
  } else if (new_key > g->max_key) {
    g->max_key = new_key;
  }
}

void guard_truncate(sqlite3_pcache* p, unsigned limit) {
  GuardedCache* g = guarded(p);
  truncates.fetch_add(1, std::memory_order_relaxed);
  // Drops every page with key >= limit: none exists when limit is above the bound and
  // nothing is parked.
  if (g->parked == 0 && limit > g->max_key) return;
  truncates_passed.fetch_add(1, std::memory_order_relaxed);
  inner.xTruncate(g->cache, limit);
  if (limit <= g->parking_key) g->parked = 0;
  if (limit <= g->max_key) g->max_key = limit > 0 ? limit - 1 : 0;
}

void guard_destroy(sqlite3_pcache* p) {
  GuardedCache* g = guarded(p);
  inner.xDestroy(g->cache);
  delete g;
}

void guard_shrink(sqlite3_pcache* p) {
  if (inner.xShrink) inner.xShrink(guarded(p)->cache);
}

bool install() {
  sqlite3_pcache_methods2 defaults{};
  if (sqlite3_config(SQLITE_CONFIG_GETPCACHE2, &defaults) != SQLITE_OK) return false;
  if (defaults.iVersion < 1 || !defaults.xCreate || !defaults.xFetch || !defaults.xTruncate) {
    return false;
  }
  inner = defaults;
  sqlite3_pcache_methods2 methods{};
  methods.iVersion = 1;
  methods.pArg = nullptr;
  methods.xInit = guard_init;
  methods.xShutdown = guard_shutdown;
  methods.xCreate = guard_create;
  methods.xCachesize = guard_cachesize;
  methods.xPagecount = guard_pagecount;
  methods.xFetch = guard_fetch;
  methods.xUnpin = guard_unpin;
  methods.xRekey = guard_rekey;
  methods.xTruncate = guard_truncate;
  methods.xDestroy = guard_destroy;
  methods.xShrink = guard_shrink;
  // Fails (SQLITE_MISUSE) once SQLite is initialized: the default cache then stays.
  return sqlite3_config(SQLITE_CONFIG_PCACHE2, &methods) == SQLITE_OK;
}

}  // namespace

bool install_page_cache_guard() {
  static std::once_flag once;
  std::call_once(once, [] { installed = install(); });
  return installed;
}

PageCacheGuardStats page_cache_guard_stats() {
  return {installed.load(), truncates.load(std::memory_order_relaxed),
          truncates_passed.load(std::memory_order_relaxed), parks.load(std::memory_order_relaxed)};
}

}  // namespace outpost::store::sqlite
