// SQLite result codes as the project's error codes, shared by the store's SQLite files.
#pragma once

#include "common/error.h"

namespace outpost::store::sqlite {

// Maps an (extended) SQLite result code onto our error codes: a unique or primary key
// violation is kAlreadyExists, busy/locked kUnavailable, full kResourceExhausted, I/O and
// corruption kIo, anything else kInternal.
Errc errc_for(int rc);

}  // namespace outpost::store::sqlite
