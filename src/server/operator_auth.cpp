#include "server/operator_auth.h"

#include <sys/stat.h>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/durable_file.h"

namespace outpost::server {

Result<store::OperatorToken> OperatorAuth::authenticate(const std::string& token) {
  const std::string hash = sha256_hex(token);
  {
    std::lock_guard lock(mu_);
    auto it = cache_.find(hash);
    if (it != cache_.end()) return it->second;
  }
  auto found = store_.find_operator_token_by_hash(hash);
  if (!found) return make_error(found.error());
  if (!*found) return make_error(Errc::kUnauthenticated, "the bearer token is not valid");
  std::lock_guard lock(mu_);
  cache_[hash] = **found;
  return **found;
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
  record.id = "admin";
  record.token_hash = sha256_hex(token);
  record.role = "admin";
  record.name = "admin";
  record.created_at = now_ms;
  auto known = store_.find_operator_token_by_hash(record.token_hash);
  if (!known) return make_error(known.error());
  if (!*known) OUTPOST_TRY(store_.put_operator_token(record));
  return path;
}

}  // namespace outpost::server
