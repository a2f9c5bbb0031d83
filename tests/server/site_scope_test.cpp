// Site scope: which sites and which selector patterns lie inside a user's site globs.
#include "server/site_scope.h"

#include <fnmatch.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace outpost::server {
namespace {

TEST(SitePatternWithin, LiteralSitesAreInsideTheGlobsThatMatchThem) {
  EXPECT_TRUE(site_pattern_within("plant-1", "plant-*"));
  EXPECT_TRUE(site_pattern_within("plant-1", "plant-1"));
  EXPECT_TRUE(site_pattern_within("plant-", "plant-*"));  // * matches the empty string
  EXPECT_TRUE(site_pattern_within("plant-7", "plant-?"));
  EXPECT_TRUE(site_pattern_within("plant-7", "plant-[0-9]"));
  EXPECT_TRUE(site_pattern_within("depot-2", "*"));
  EXPECT_FALSE(site_pattern_within("depot-2", "plant-*"));
  EXPECT_FALSE(site_pattern_within("plant-10", "plant-?"));
  EXPECT_FALSE(site_pattern_within("plant-a", "plant-[0-9]"));
  EXPECT_FALSE(site_pattern_within("plant-1", "plant-1x"));
}

TEST(SitePatternWithin, AGlobIsInsideAnEqualOrWiderGlobOnly) {
  EXPECT_TRUE(site_pattern_within("plant-*", "plant-*"));
  EXPECT_TRUE(site_pattern_within("plant-7*", "plant-*"));
  EXPECT_TRUE(site_pattern_within("plant-?", "plant-*"));
  EXPECT_TRUE(site_pattern_within("plant-[12]", "plant-[0-9]"));
  EXPECT_TRUE(site_pattern_within("plant-[12]", "plant-?"));
  EXPECT_TRUE(site_pattern_within("plant-*-east", "plant-*"));
  EXPECT_TRUE(site_pattern_within("eu-plant-*", "*-plant-*"));
  EXPECT_TRUE(site_pattern_within("plant-**", "plant-*"));
  EXPECT_TRUE(site_pattern_within("anything*", "*"));

  EXPECT_FALSE(site_pattern_within("plant-*", "plant-7*"));  // narrower outer
  EXPECT_FALSE(site_pattern_within("*", "plant-*"));
  EXPECT_FALSE(site_pattern_within("p*", "plant-*"));
  EXPECT_FALSE(site_pattern_within("plant-?", "plant-[0-9]"));  // ? includes letters
  EXPECT_FALSE(site_pattern_within("plant-[0-9]", "plant-[12]"));
  EXPECT_FALSE(site_pattern_within("plant-*", "plant-?"));  // * may be several characters
  EXPECT_FALSE(site_pattern_within("depot-*", "plant-*"));
}

TEST(SitePatternWithin, NegatedClassesEscapesAndWhatItCannotReasonAbout) {
  EXPECT_TRUE(site_pattern_within("plant-a", "plant-[!0-9]"));
  EXPECT_FALSE(site_pattern_within("plant-1", "plant-[!0-9]"));
  EXPECT_TRUE(site_pattern_within("plant-[a-c]", "plant-[!0-9]"));
  EXPECT_TRUE(site_pattern_within("plant-\\*", "plant-*"));   // a literal '*' site
  EXPECT_FALSE(site_pattern_within("plant-*", "plant-\\*"));  // the literal does not cover a glob
  EXPECT_TRUE(site_pattern_within("a]", "[]a]]"));            // ']' first in a class is literal
  // Conservative: no character classes, unclosed brackets are refused, never a wrong yes.
  EXPECT_FALSE(site_pattern_within("plant-[[:digit:]]", "plant-*"));
  EXPECT_FALSE(site_pattern_within("plant-1", "plant-[[:digit:]]"));
  EXPECT_FALSE(site_pattern_within("plant-[", "plant-*"));
  EXPECT_FALSE(site_pattern_within("*?", "?*"));  // equal sets, not shown token by token
}

// Whatever site_pattern_within says yes to, fnmatch agrees on every literal site tried.
TEST(SitePatternWithin, AgreesWithFnmatchOnLiteralSites) {
  const std::vector<std::string> patterns = {"plant-*", "plant-?", "plant-[0-9]", "p*-1",
                                             "*",       "plant-1", "*-1",         "plant-[!0-9]"};
  const std::vector<std::string> sites = {"plant-1", "plant-12", "plant-a", "p-1",
                                          "depot-1", "plant-",   "x"};
  for (const auto& pattern : patterns) {
    for (const auto& site : sites) {
      EXPECT_EQ(site_pattern_within(site, pattern),
                ::fnmatch(pattern.c_str(), site.c_str(), 0) == 0)
          << site << " in " << pattern;
    }
  }
}

TEST(SiteScope, UnrestrictedContainsEverything) {
  SiteScope all;
  EXPECT_TRUE(all.unrestricted());
  EXPECT_TRUE(all.contains_site("depot-2"));
  EXPECT_TRUE(all.contains_pattern("*"));
  EXPECT_TRUE(all.outside({}).empty());
  EXPECT_EQ(all.describe(), "every site");
}

TEST(SiteScope, ScopedSitesAndSelectors) {
  SiteScope scope({"plant-*", "depot-1"});
  EXPECT_FALSE(scope.unrestricted());
  EXPECT_TRUE(scope.contains_site("plant-1"));
  EXPECT_TRUE(scope.contains_site("depot-1"));
  EXPECT_FALSE(scope.contains_site("depot-2"));
  EXPECT_TRUE(scope.contains_pattern("plant-7*"));
  EXPECT_TRUE(scope.contains_pattern("depot-1"));
  EXPECT_FALSE(scope.contains_pattern("depot-*"));
  EXPECT_TRUE(scope.outside({"plant-1", "depot-1"}).empty());
  EXPECT_EQ(scope.outside({"plant-1", "depot-*", "*"}), (std::vector<std::string>{"depot-*", "*"}));
  // No site patterns selects every site: outside any scope.
  EXPECT_EQ(scope.outside({}), std::vector<std::string>{"*"});
  EXPECT_EQ(scope.describe(), "plant-*, depot-1");
}

TEST(CheckSitePattern, NamesTheFieldAndWhatIsWrong) {
  EXPECT_TRUE(check_site_pattern("plant-*", "sites[0]"));
  EXPECT_TRUE(check_site_pattern("plant-[0-9]", "sites[0]"));
  auto spaced = check_site_pattern("plant 7", "sites[1]");
  ASSERT_FALSE(spaced);
  EXPECT_EQ(spaced.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(spaced.error().field, "sites[1]");
  EXPECT_EQ(spaced.error().message.rfind("sites[1]: \"plant 7\" is not a site name or glob", 0), 0u)
      << spaced.error().message;
  auto empty = check_site_pattern("", "sites[0]");
  ASSERT_FALSE(empty);
  EXPECT_EQ(empty.error().field, "sites[0]");
  auto unclosed = check_site_pattern("plant-[1", "sites[2]");
  ASSERT_FALSE(unclosed);
  EXPECT_NE(unclosed.error().message.find("bracket that is not closed"), std::string::npos)
      << unclosed.error().message;
  EXPECT_FALSE(check_site_pattern(std::string(129, 'a'), "sites[0]"));
}

}  // namespace
}  // namespace outpost::server
