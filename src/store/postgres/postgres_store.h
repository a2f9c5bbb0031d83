// PostgreSQL backend of the Store, for several server replicas sharing one database: a bounded
// pool of libpq connections, transactions that stay correct with concurrent writers in other
// processes, and the numbered migrations of migrations/postgres/ embedded at build time.
// Internal to the store module; use store.h (open_store("postgres://...")).
#pragma once

#include <memory>
#include <span>
#include <string>

#include "common/error.h"
#include "store/migration.h"
#include "store/store.h"

namespace outpost::store::postgres {

// The PostgreSQL migrations compiled into this binary, in order (embed_migrations.cmake); the
// same numbers and names as the SQLite ones.
std::span<const Migration> embedded_migrations();

// Advisory lock keys this backend takes (the two-int form, class kAdvisoryLockClass), so that
// other users of advisory locks on the same database (leader election) can stay clear of them.
inline constexpr int kAdvisoryLockClass = 0x6f757470;  // "outp"
inline constexpr int kMigrationLock = 1;               // session lock while migrating
inline constexpr int kTelemetryRollupLock = 2;  // shared: ingest; exclusive: rollup, retention

// Opens a store on the database at `url` (postgres:// or postgresql://, libpq's URI syntax;
// the query parameter pool_size=N, ours, bounds the connection pool, default 8) and applies the
// pending `migrations`, each in its own transaction, holding an advisory lock so that servers
// starting together migrate once. Errors name the URL with its password redacted:
// kInvalidArgument (a malformed URL or pool_size), kUnavailable (cannot connect),
// kFailedPrecondition (the database has a newer schema than this build knows), or the error of
// the migration that failed (the earlier ones stay applied, the failed one leaves no trace).
[[nodiscard]] Result<std::unique_ptr<Store>> open_postgres_store(
    const std::string& url, std::span<const Migration> migrations = embedded_migrations());

}  // namespace outpost::store::postgres
