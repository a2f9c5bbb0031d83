// Operator bearer tokens: creation at first start and lookup with an in-memory cache, so
// authenticating a call usually costs one hash and one map lookup.
#pragma once

#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "common/error.h"
#include "store/store.h"

namespace outpost::server {

// Thread-safe; the cache is guarded by mu_.
class OperatorAuth {
 public:
  explicit OperatorAuth(store::Store& store) : store_(store) {}

  // Looks up a presented token. kUnauthenticated when unknown.
  [[nodiscard]] Result<store::OperatorToken> authenticate(const std::string& token);

  // Ensures DATA/admin.token exists (mode 0600) and is registered; returns its path.
  [[nodiscard]] Result<std::string> ensure_admin_token(const std::string& data_dir, int64_t now_ms);

 private:
  store::Store& store_;
  std::mutex mu_;
  std::unordered_map<std::string, store::OperatorToken> cache_;  // by token hash; GUARDED_BY(mu_)
};

}  // namespace outpost::server
