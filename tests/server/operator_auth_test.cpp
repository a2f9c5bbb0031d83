// Operator users: validation of a new user, and tokens that authenticate until revoked (the
// cache included).
#include "server/operator_auth.h"

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "common/digest.h"
#include "store/store.h"

namespace outpost::server {
namespace {

using json = nlohmann::json;

// The error of parse_new_user(body): its field and message.
Error refusal(const json& body) {
  auto parsed = parse_new_user(body);
  EXPECT_FALSE(parsed) << body.dump();
  return parsed ? Error{} : parsed.error();
}

TEST(ParseNewUser, AcceptsANameARoleAndSitePatterns) {
  auto user = parse_new_user({{"name", "alice.o-1_x"},
                              {"role", "operator"},
                              {"sites", {"plant-*", "depot-1", "plant-*"}}});
  ASSERT_TRUE(user) << user.error().describe();
  EXPECT_EQ(user->name, "alice.o-1_x");
  EXPECT_EQ(user->role, "operator");
  EXPECT_EQ(user->sites, (std::vector<std::string>{"plant-*", "depot-1"}));  // deduplicated
  auto unscoped = parse_new_user({{"name", "root2"}, {"role", "admin"}});
  ASSERT_TRUE(unscoped) << unscoped.error().describe();
  EXPECT_TRUE(unscoped->sites.empty());
}

TEST(ParseNewUser, RefusalsNameTheField) {
  Error e = refusal({{"role", "viewer"}});
  EXPECT_EQ(e.field, "name");
  EXPECT_EQ(e.message, "name: is required");

  e = refusal({{"name", "al ice"}, {"role", "viewer"}});
  EXPECT_EQ(e.field, "name");
  EXPECT_EQ(e.message,
            "name: \"al ice\" is not a valid user name (1-64 letters, digits, '-', '_', '.')");
  e = refusal({{"name", std::string(65, 'a')}, {"role", "viewer"}});
  EXPECT_EQ(e.field, "name");
  e = refusal({{"name", "alice/x"}, {"role", "viewer"}});
  EXPECT_EQ(e.field, "name");

  e = refusal({{"name", "alice"}, {"role", "root"}});
  EXPECT_EQ(e.field, "role");
  EXPECT_EQ(e.message, "role: \"root\" is not a role (expected viewer, operator or admin)");
  e = refusal({{"name", "alice"}});
  EXPECT_EQ(e.field, "role");

  e = refusal({{"name", "alice"}, {"role", "viewer"}, {"sites", "plant-*"}});
  EXPECT_EQ(e.field, "sites");
  EXPECT_EQ(e.message, "sites: expected a list of site names or globs, got a string");
  e = refusal({{"name", "alice"}, {"role", "viewer"}, {"sites", {"plant-1", "plant 2"}}});
  EXPECT_EQ(e.field, "sites[1]");
  EXPECT_EQ(e.message.rfind("sites[1]: \"plant 2\" is not a site name or glob", 0), 0u)
      << e.message;
  e = refusal({{"name", "alice"}, {"role", "viewer"}, {"sites", {3}}});
  EXPECT_EQ(e.field, "sites[0]");
  EXPECT_EQ(e.message, "sites[0]: expected a string, got a number");

  e = refusal({{"name", "boss"}, {"role", "admin"}, {"sites", {"plant-*"}}});
  EXPECT_EQ(e.field, "sites");
  EXPECT_NE(e.message.find("an admin cannot be scoped to sites"), std::string::npos) << e.message;

  e = refusal({{"name", "alice"}, {"role", "viewer"}, {"token", "opt_x"}});
  EXPECT_EQ(e.field, "token");
  EXPECT_EQ(e.message, "token: unknown field (expected one of: name, role, sites)");

  e = refusal(json::array());
  EXPECT_EQ(e.code, Errc::kInvalidArgument);
}

class OperatorAuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = store::open_memory_store();
    ASSERT_TRUE(opened) << opened.error().describe();
    store_ = std::move(*opened);
    auth_ = std::make_unique<OperatorAuth>(*store_);
  }
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<OperatorAuth> auth_;
};

TEST_F(OperatorAuthTest, CreatedUsersAuthenticateWithTheirSecretStoredAsAHashOnly) {
  auto created = auth_->create_user({"alice", "operator", {"plant-*"}}, 1000);
  ASSERT_TRUE(created) << created.error().describe();
  EXPECT_EQ(created->secret.rfind("opt_", 0), 0u);
  EXPECT_EQ(created->secret.size(), 4u + 64u);
  auto stored = store_->find_operator_token_by_name("alice");
  ASSERT_TRUE(stored && stored->has_value());
  EXPECT_EQ((*stored)->token_hash, sha256_hex(created->secret));
  EXPECT_EQ((*stored)->sites, std::vector<std::string>{"plant-*"});

  auto who = auth_->authenticate(created->secret);
  ASSERT_TRUE(who) << who.error().describe();
  EXPECT_EQ(who->name, "alice");
  EXPECT_EQ(who->role, "operator");
  EXPECT_EQ(who->sites, std::vector<std::string>{"plant-*"});

  auto wrong = auth_->authenticate(created->secret + "x");
  ASSERT_FALSE(wrong);
  EXPECT_EQ(wrong.error().code, Errc::kUnauthenticated);

  auto twice = auth_->create_user({"alice", "viewer", {}}, 2000);
  ASSERT_FALSE(twice);
  EXPECT_EQ(twice.error().code, Errc::kAlreadyExists);
  EXPECT_NE(twice.error().message.find("user alice already exists"), std::string::npos);
}

TEST_F(OperatorAuthTest, RevocationRefusesTheNextCallEvenWhenTheTokenIsCached) {
  auto created = auth_->create_user({"alice", "operator", {}}, 1000);
  ASSERT_TRUE(created) << created.error().describe();
  ASSERT_TRUE(auth_->authenticate(created->secret));  // now in the cache
  ASSERT_TRUE(auth_->authenticate(created->secret));

  auto revoked = auth_->revoke_user("alice", 5000);
  ASSERT_TRUE(revoked) << revoked.error().describe();
  EXPECT_EQ(revoked->revoked_at, 5000);
  auto refused = auth_->authenticate(created->secret);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::kUnauthenticated);
  EXPECT_NE(refused.error().message.find("user alice was revoked"), std::string::npos)
      << refused.error().message;

  // A fresh OperatorAuth (a restart) reads the revocation from the store.
  OperatorAuth restarted(*store_);
  EXPECT_FALSE(restarted.authenticate(created->secret));

  auto unknown = auth_->revoke_user("bob", 6000);
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.error().code, Errc::kNotFound);
  EXPECT_NE(unknown.error().message.find("user bob"), std::string::npos);
}

TEST_F(OperatorAuthTest, TheBootstrapAdminIsAnUnscopedUserThatCannotBeRevoked) {
  const std::string dir = ::testing::TempDir() + "/operator-auth-admin-" +
                          std::to_string(::testing::UnitTest::GetInstance()->random_seed());
  std::filesystem::create_directories(dir);
  auto path = auth_->ensure_admin_token(dir, 1000);
  ASSERT_TRUE(path) << path.error().describe();
  auto admin = store_->find_operator_token_by_name("admin");
  ASSERT_TRUE(admin && admin->has_value());
  EXPECT_EQ((*admin)->role, "admin");
  EXPECT_TRUE((*admin)->sites.empty());
  auto refused = auth_->revoke_user("admin", 2000);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::kFailedPrecondition);
  EXPECT_NE(refused.error().message.find("admin.token"), std::string::npos);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace outpost::server
