// A numbered schema migration as embedded into the binary (embed_migrations.cmake), shared by
// the SQLite and PostgreSQL backends. Internal to the store module; use store.h.
#pragma once

#include <string_view>

namespace outpost::store {

// One numbered schema migration (migrations/NNNN_name.sql, or migrations/postgres/ for the
// PostgreSQL variant). Both backends have the same numbers and names, so schema_version()
// means the same on both.
struct Migration {
  int version = 0;  // 1, 2, 3... in order, no gaps
  std::string_view name;
  std::string_view sql;
};

}  // namespace outpost::store
