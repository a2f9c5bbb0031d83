#include "server/site_scope.h"

#include <fnmatch.h>

#include <algorithm>
#include <bitset>
#include <optional>

#include "server/deployments/manifest.h"

namespace outpost::server {
namespace {

// One step of a glob: a star (any string, empty included) or one character from a set.
struct GlobToken {
  bool star = false;
  std::bitset<256> chars;
};

// Parses a bracket expression starting at text[i] == '[' the way glibc's fnmatch reads it;
// sets `end` past its ']'. nullopt for what this module does not reason about ([:alpha:],
// [=a=], [.a.]) and for an unclosed bracket (which fnmatch reads as a literal '[').
std::optional<std::bitset<256>> parse_bracket(std::string_view text, size_t i, size_t& end) {
  size_t j = i + 1;
  bool negate = false;
  if (j < text.size() && (text[j] == '!' || text[j] == '^')) {
    negate = true;
    ++j;
  }
  std::bitset<256> set;
  bool first = true;
  while (j < text.size()) {
    unsigned char c = static_cast<unsigned char>(text[j]);
    if (c == ']' && !first) {
      end = j + 1;
      return negate ? ~set : set;
    }
    first = false;
    if (c == '[' && j + 1 < text.size() &&
        (text[j + 1] == ':' || text[j + 1] == '=' || text[j + 1] == '.')) {
      return std::nullopt;
    }
    if (c == '\\' && j + 1 < text.size()) {
      c = static_cast<unsigned char>(text[++j]);
    }
    // A range a-z (a '-' last, before ']', is a literal).
    if (j + 2 < text.size() && text[j + 1] == '-' && text[j + 2] != ']') {
      size_t k = j + 2;
      unsigned char hi = static_cast<unsigned char>(text[k]);
      if (hi == '\\' && k + 1 < text.size()) hi = static_cast<unsigned char>(text[++k]);
      for (unsigned v = c; v <= hi; ++v) set.set(v);
      j = k + 1;
      continue;
    }
    set.set(c);
    ++j;
  }
  return std::nullopt;
}

std::optional<std::vector<GlobToken>> tokenize(std::string_view text) {
  std::vector<GlobToken> out;
  for (size_t i = 0; i < text.size();) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    GlobToken token;
    if (c == '*') {
      token.star = true;
      ++i;
      if (!out.empty() && out.back().star) continue;  // "**" is "*"
    } else if (c == '?') {
      token.chars.set();
      ++i;
    } else if (c == '[') {
      size_t end = 0;
      auto set = parse_bracket(text, i, end);
      if (!set) return std::nullopt;
      token.chars = *set;
      i = end;
    } else if (c == '\\' && i + 1 < text.size()) {
      token.chars.set(static_cast<unsigned char>(text[i + 1]));
      i += 2;
    } else {
      token.chars.set(c);
      ++i;
    }
    out.push_back(token);
  }
  return out;
}

}  // namespace

bool site_pattern_within(std::string_view inner, std::string_view outer) {
  auto in = tokenize(inner);
  auto out = tokenize(outer);
  if (!in || !out) return false;
  const size_t n = in->size(), m = out->size();
  // within[i][o]: the inner tokens from i on are covered by the outer tokens from o on. An
  // outer star covers any run of inner tokens (stars too); an outer set covers one inner set
  // that is a subset of it; an inner star needs an outer star.
  std::vector<std::vector<char>> within(n + 1, std::vector<char>(m + 1, 0));
  within[n][m] = 1;
  for (size_t i = n + 1; i-- > 0;) {
    for (size_t o = m; o-- > 0;) {
      const GlobToken& t = (*out)[o];
      if (t.star) {
        within[i][o] = within[i][o + 1] || (i < n && within[i + 1][o]);
      } else if (i < n && !(*in)[i].star) {
        within[i][o] = ((*in)[i].chars & ~t.chars).none() && within[i + 1][o + 1];
      }
    }
  }
  return within[0][0] != 0;
}

Status check_site_pattern(std::string_view pattern, const std::string& field) {
  const std::string shown = "\"" + std::string(pattern) + "\"";
  if (!deployments::is_site_pattern(pattern)) {
    return make_error(Errc::kInvalidArgument,
                      field + ": " + shown +
                          " is not a site name or glob (1-128 printable characters without "
                          "spaces, like plant-7 or plant-*)",
                      field);
  }
  if (!tokenize(pattern)) {
    return make_error(Errc::kInvalidArgument,
                      field + ": " + shown +
                          " has a bracket that is not closed or a [:class:]; use *, ? and "
                          "[a-z] ranges",
                      field);
  }
  return ok();
}

bool SiteScope::contains_site(std::string_view site) const {
  if (unrestricted()) return true;
  const std::string text(site);
  return std::any_of(patterns_.begin(), patterns_.end(), [&](const std::string& pattern) {
    return ::fnmatch(pattern.c_str(), text.c_str(), 0) == 0;
  });
}

bool SiteScope::contains_pattern(std::string_view pattern) const {
  if (unrestricted()) return true;
  return std::any_of(patterns_.begin(), patterns_.end(),
                     [&](const std::string& mine) { return site_pattern_within(pattern, mine); });
}

std::vector<std::string> SiteScope::outside(const std::vector<std::string>& selector_sites) const {
  if (unrestricted()) return {};
  if (selector_sites.empty()) return {"*"};
  std::vector<std::string> out;
  for (const auto& pattern : selector_sites) {
    if (!contains_pattern(pattern)) out.push_back(pattern);
  }
  return out;
}

std::string SiteScope::describe() const {
  if (unrestricted()) return "every site";
  std::string out;
  for (const auto& p : patterns_) out += (out.empty() ? "" : ", ") + p;
  return out;
}

}  // namespace outpost::server
