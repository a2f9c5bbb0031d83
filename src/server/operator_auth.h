// Operator users and their bearer tokens: the bootstrap admin token at first start, named users
// an admin creates (role, site scope) and revokes, and lookup with an in-memory cache, so
// authenticating a call usually costs one hash and one map lookup.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "store/store.h"

namespace outpost::server {

// A user as an admin asks for it (POST /api/v1/users).
struct NewUser {
  std::string name;
  std::string role;                // viewer | operator | admin
  std::vector<std::string> sites;  // site glob patterns; empty = every site
};

// Validates a request body {name, role, sites}. kInvalidArgument naming the field ("name",
// "role", "sites[1]") for an unknown field, a name that is not 1-64 letters, digits, '-', '_',
// '.', a role other than viewer|operator|admin, a site pattern that is not a site name or
// glob, or an admin with sites (an admin manages users, so it is fleet-wide by nature).
[[nodiscard]] Result<NewUser> parse_new_user(const nlohmann::json& body);

// A user just created, with the secret the caller shows once (only its hash is stored).
struct CreatedUser {
  store::OperatorToken user;
  std::string secret;
};

// Thread-safe; the cache and its generation are guarded by mu_.
class OperatorAuth {
 public:
  explicit OperatorAuth(store::Store& store) : store_(store) {}

  // Looks up a presented token. kUnauthenticated when unknown or revoked.
  [[nodiscard]] Result<store::OperatorToken> authenticate(const std::string& token);

  // Creates the user with a fresh random secret ("opt_" + 64 hex). kAlreadyExists naming the
  // user when the name is taken.
  [[nodiscard]] Result<CreatedUser> create_user(const NewUser& user, int64_t now_ms);
  // Revokes the user's token in the store, then drops it from the cache: a call that
  // authenticates after this returns is refused. kNotFound naming an unknown user;
  // kFailedPrecondition for "admin" (rotate DATA/admin.token instead).
  [[nodiscard]] Result<store::OperatorToken> revoke_user(const std::string& name, int64_t now_ms);

  // Another replica revoked a user: every cached token is looked up again.
  void forget_cached();

  // Ensures DATA/admin.token exists (mode 0600) and is registered as user "admin"; returns
  // its path.
  [[nodiscard]] Result<std::string> ensure_admin_token(const std::string& data_dir, int64_t now_ms);

 private:
  store::Store& store_;
  std::mutex mu_;
  std::unordered_map<std::string, store::OperatorToken> cache_;  // by token hash; GUARDED_BY(mu_)
  // Bumped by every revocation: a lookup that read the store before a revocation finished
  // does not put what it read into the cache. GUARDED_BY(mu_)
  uint64_t generation_ = 0;
};

}  // namespace outpost::server
