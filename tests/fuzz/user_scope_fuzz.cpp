// Fuzz target for what an admin sends to POST /api/v1/users (server/operator_auth's
// parse_new_user) and for the site globs a user is scoped to (server/site_scope): any bytes give
// a user that keeps the parser's promises, or an error -- never a crash, a hang or an exception
// -- and the containment check never says a site lies inside a scope that does not match it.
#include <fnmatch.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/json_fields.h"
#include "server/operator_auth.h"
#include "server/site_scope.h"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

bool is_literal(std::string_view s) { return s.find_first_of("*?[\\") == std::string_view::npos; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace server = outpost::server;
  const std::string text(reinterpret_cast<const char*>(data), size);
  if (outpost::json_fields::check_nesting(text, "body")) {
    auto body = nlohmann::json::parse(text, nullptr, false);
    if (!body.is_discarded()) {
      if (auto user = server::parse_new_user(body)) {
        check(!user->name.empty() && user->name.size() <= 64);
        check(user->role == "viewer" || user->role == "operator" || user->role == "admin");
        check(user->role != "admin" || user->sites.empty());
        for (const auto& site : user->sites)
          check(server::check_site_pattern(site, "sites").has_value());
      }
    }
  }
  // The raw bytes as "inner\nouter": a literal inner inside outer must be matched by it.
  const auto nl = text.find('\n');
  if (nl != std::string::npos) {
    const std::string inner = text.substr(0, nl);
    const std::string outer = text.substr(nl + 1);
    if (inner.find('\0') == std::string::npos && outer.find('\0') == std::string::npos &&
        server::check_site_pattern(inner, "inner") && server::check_site_pattern(outer, "outer")) {
      const bool within = server::site_pattern_within(inner, outer);
      if (within && is_literal(inner)) check(fnmatch(outer.c_str(), inner.c_str(), 0) == 0);
      const server::SiteScope scope({outer});
      if (is_literal(inner))
        check(scope.contains_site(inner) == (fnmatch(outer.c_str(), inner.c_str(), 0) == 0));
    }
  }
  return 0;
}
