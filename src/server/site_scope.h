// Which sites an operator user may see and act on (issue 17): the site glob patterns the user
// is scoped to, and whether a site, or a deployment selector's site pattern, lies inside them.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace outpost::server {

// True when every site name that `inner` matches is matched by `outer` too. Patterns are shell
// globs as deployment selectors use them (fnmatch without flags: *, ?, [a-z], [!x], \x). A
// literal site is inside a glob when the glob matches it ("plant-7" in "plant-*"); a glob is
// inside an equal or wider one ("plant-7*" in "plant-*", "plant-?" in "plant-*"), never in a
// narrower one. Conservative: when containment cannot be shown token by token (say "*?" in
// "?*", or a [:class:]) the answer is false, never a wrong true.
bool site_pattern_within(std::string_view inner, std::string_view outer);

// Checks a site pattern a user may be scoped to: what deployment selectors accept
// (deployments::is_site_pattern) and a glob this module can reason about (no [:class:],
// brackets closed). kInvalidArgument naming `field`, e.g. "sites[1]: ...".
[[nodiscard]] Status check_site_pattern(std::string_view pattern, const std::string& field);

// A user's site scope. Empty = unrestricted (every site, and fleet-wide things like the audit
// log). Immutable once built; safe to share between threads.
class SiteScope {
 public:
  SiteScope() = default;
  explicit SiteScope(std::vector<std::string> patterns) : patterns_(std::move(patterns)) {}

  bool unrestricted() const { return patterns_.empty(); }
  const std::vector<std::string>& patterns() const { return patterns_; }

  // The site matches one of the patterns (fnmatch, as the scheduler matches selectors).
  bool contains_site(std::string_view site) const;
  // The pattern lies inside one of the user's patterns (site_pattern_within).
  bool contains_pattern(std::string_view pattern) const;
  // The selector's site patterns that lie outside the scope. A selector without site patterns
  // selects every site: for a scoped user that is {"*"}, outside. Empty when unrestricted.
  std::vector<std::string> outside(const std::vector<std::string>& selector_sites) const;

  // "plant-*, depot-1" (or "every site").
  std::string describe() const;

 private:
  std::vector<std::string> patterns_;
};

}  // namespace outpost::server
