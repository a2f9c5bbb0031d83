#include "server/operator_auth.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>

#include "common/clock.h"
#include "common/crypto.h"
#include "common/digest.h"
#include "common/durable_file.h"
#include "common/json_fields.h"
#include "server/site_scope.h"

namespace outpost::server {
namespace {

constexpr const char* kAdminName = "admin";

bool valid_user_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}

}  // namespace

Result<NewUser> parse_new_user(const nlohmann::json& body) {
  if (!body.is_object()) {
    return make_error(Errc::kInvalidArgument, "user: expected an object {name, role, sites}, got " +
                                                  json_fields::type_name(body));
  }
  for (const auto& [key, value] : body.items()) {
    if (key != "name" && key != "role" && key != "sites") {
      return make_error(Errc::kInvalidArgument,
                        key + ": unknown field (expected one of: name, role, sites)", key);
    }
  }
  NewUser user;
  auto name = json_fields::required_string(body, "name", "name");
  if (!name) return make_error(name.error());
  if (!valid_user_name(*name)) {
    return make_error(
        Errc::kInvalidArgument,
        "name: \"" + *name + "\" is not a valid user name (1-64 letters, digits, '-', '_', '.')",
        "name");
  }
  user.name = *name;
  auto role = json_fields::required_string(body, "role", "role");
  if (!role) return make_error(role.error());
  if (*role != "viewer" && *role != "operator" && *role != "admin") {
    return make_error(Errc::kInvalidArgument,
                      "role: \"" + *role + "\" is not a role (expected viewer, operator or admin)",
                      "role");
  }
  user.role = *role;
  if (body.contains("sites") && !body["sites"].is_null()) {
    const auto& sites = body["sites"];
    if (!sites.is_array()) {
      return make_error(
          Errc::kInvalidArgument,
          "sites: expected a list of site names or globs, got " + json_fields::type_name(sites),
          "sites");
    }
    for (size_t i = 0; i < sites.size(); ++i) {
      const std::string field = "sites[" + std::to_string(i) + "]";
      if (!sites[i].is_string()) {
        return make_error(Errc::kInvalidArgument,
                          field + ": expected a string, got " + json_fields::type_name(sites[i]),
                          field);
      }
      const std::string pattern = sites[i].get<std::string>();
      OUTPOST_TRY(check_site_pattern(pattern, field));
      if (std::find(user.sites.begin(), user.sites.end(), pattern) == user.sites.end()) {
        user.sites.push_back(pattern);
      }
    }
  }
  if (user.role == "admin" && !user.sites.empty()) {
    return make_error(Errc::kInvalidArgument,
                      "sites: an admin cannot be scoped to sites (admins manage users, so they "
                      "are fleet-wide); give role operator or viewer, or no sites",
                      "sites");
  }
  return user;
}

Result<store::OperatorToken> OperatorAuth::authenticate(const std::string& token) {
  const std::string hash = sha256_hex(token);
  std::optional<store::OperatorToken> record;
  uint64_t seen = 0;
  {
    std::lock_guard lock(mu_);
    auto it = cache_.find(hash);
    if (it != cache_.end()) record = it->second;
    seen = generation_;
  }
  if (!record) {
    auto found = store_.find_operator_token_by_hash(hash);
    if (!found) return make_error(found.error());
    if (!*found) return make_error(Errc::kUnauthenticated, "the bearer token is not valid");
    record = std::move(**found);
    if (record->revoked_at == 0) {
      std::lock_guard lock(mu_);
      if (generation_ == seen) cache_[hash] = *record;
    }
  }
  // The lookup was by hash already; the comparison in constant time keeps it that way whatever
  // the store's index does.
  if (!crypto::constant_time_equal(hash, record->token_hash)) {
    return make_error(Errc::kUnauthenticated, "the bearer token is not valid");
  }
  if (record->revoked_at != 0) {
    return make_error(Errc::kUnauthenticated, "the bearer token of user " + record->name +
                                                  " was revoked at " +
                                                  format_iso8601(record->revoked_at));
  }
  return *record;
}

Result<CreatedUser> OperatorAuth::create_user(const NewUser& user, int64_t now_ms) {
  CreatedUser created;
  created.secret = crypto::random_hex(32, "opt_");
  created.user.id = user.name;
  created.user.token_hash = sha256_hex(created.secret);
  created.user.role = user.role;
  created.user.name = user.name;
  created.user.created_at = now_ms;
  created.user.sites = user.sites;
  OUTPOST_TRY(store_.create_operator_token(created.user));
  return created;
}

Result<store::OperatorToken> OperatorAuth::revoke_user(const std::string& name, int64_t now_ms) {
  if (name == kAdminName) {
    return make_error(Errc::kFailedPrecondition,
                      "user admin is the bootstrap user and cannot be revoked; to rotate its "
                      "token, stop the server, delete DATA/admin.token and start it again",
                      "name");
  }
  auto revoked = store_.revoke_operator_token(name, now_ms);
  if (!revoked) return make_error(revoked.error());
  std::lock_guard lock(mu_);
  ++generation_;
  cache_.erase(revoked->token_hash);
  return revoked;
}

Result<std::string> OperatorAuth::ensure_admin_token(const std::string& data_dir, int64_t now_ms) {
  const std::string path = data_dir + "/admin.token";
  std::string token;
  if (auto existing = read_file(path)) {
    token = *existing;
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
  } else if (existing.error().code == Errc::kNotFound) {
    token = crypto::random_hex(32, "opt_");
    OUTPOST_TRY(write_file_durably(path, token + "\n", 0600));
  } else {
    return make_error(existing.error());
  }
  ::chmod(path.c_str(), 0600);
  store::OperatorToken record;
  record.id = kAdminName;
  record.token_hash = sha256_hex(token);
  record.role = "admin";
  record.name = kAdminName;
  record.created_at = now_ms;
  auto known = store_.find_operator_token_by_hash(record.token_hash);
  if (!known) return make_error(known.error());
  if (!*known) OUTPOST_TRY(store_.put_operator_token(record));
  return path;
}

void OperatorAuth::forget_cached() {
  std::lock_guard lock(mu_);
  cache_.clear();
  ++generation_;  // a lookup in flight does not put back what it read before
}

}  // namespace outpost::server
