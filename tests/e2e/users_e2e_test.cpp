// End-to-end: named operator users with roles and site scopes (issue 17), through the real
// server and the real CLI. An admin creates an operator scoped to plant-* and a viewer; each
// sees and changes what its role and scope allow, the audit log names who did what, and a
// revoked user is refused on the very next call.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "common/http_client.h"
#include "common/onnx/onnx_builder.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;

std::string manifest(const std::string& name, const std::string& selector) {
  return "apiVersion: outpost/v1\n"
         "kind: Deployment\n"
         "metadata: {name: " +
         name + "}\n" + "spec:\n" + selector +
         "  model: {name: defect-net, version: 1.0.0}\n"
         "  serve: {route: /models/" +
         name + "}\n";
}

class UsersE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-users-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/data");
    server_->start();
    ASSERT_TRUE(server_->running());
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(root_);
  }

  std::string write(const std::string& name, const std::string& contents) {
    std::string path = root_ + "/" + name;
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }

  // `outpost <args>` with another user's token (--token wins over the admin's OUTPOST_TOKEN).
  CommandResult as(const std::string& token, std::vector<std::string> args) const {
    args.insert(args.begin(), {"--token", token});
    return server_->cli(args);
  }

  // Creates a user through the CLI; returns its token (the one line on stdout).
  std::string create_user(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"user", "create"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = server_->cli(argv);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("cannot be shown again"), std::string::npos) << r.err;
    std::string token = r.out;
    while (!token.empty() && token.back() == '\n') token.pop_back();
    EXPECT_EQ(token.rfind("opt_", 0), 0u) << r.out;
    EXPECT_EQ(token.find('\n'), std::string::npos) << "only the token on stdout: " << r.out;
    return token;
  }

  std::string enroll(const std::string& site) {
    auto t = server_->cli({"token", "create", "--site", site, "-o", "json"});
    EXPECT_EQ(t.exit_code, 0) << t.err;
    auto device = FakeDevice::enroll(server_->url(), t.json().value("token", ""),
                                     {{"arch", "x86_64"}, {"memory_mb", 4096}});
    EXPECT_FALSE(device.id.empty());
    return device.id;
  }

  std::string root_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(UsersE2E, RolesSiteScopesAuditAndRevocation) {
  const std::string alice = create_user({"alice", "--role", "operator", "--sites", "plant-*"});
  const std::string vic = create_user({"vic", "--role", "viewer"});
  ASSERT_NE(alice, vic);

  const std::string plant_a = enroll("plant-1");
  const std::string plant_b = enroll("plant-1");
  const std::string depot = enroll("depot-2");

  onnx::ClassifierSpec spec;
  auto pushed =
      server_->cli({"model", "push", "defect-net", "1.0.0", "--variant",
                    "accelerator=cpu=" + write("m.onnx", onnx::build_classifier_onnx(spec))});
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  // A fleet-wide deployment of the admin's: outside alice's scope.
  auto everywhere = server_->cli({"apply", "-f", write("all.yaml", manifest("everywhere", ""))});
  ASSERT_EQ(everywhere.exit_code, 0) << everywhere.err;

  // Devices: alice sees plant-1's only; vic (unscoped) sees all three.
  auto listed = as(alice, {"device", "list", "-o", "json"});
  ASSERT_EQ(listed.exit_code, 0) << listed.err;
  std::vector<std::string> ids;
  for (const auto& d : listed.json()) ids.push_back(d.value("id", ""));
  std::sort(ids.begin(), ids.end());
  std::vector<std::string> plant = {plant_a, plant_b};
  std::sort(plant.begin(), plant.end());
  EXPECT_EQ(ids, plant);
  auto table = as(alice, {"device", "list"});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find(plant_a), std::string::npos) << table.out;
  EXPECT_EQ(table.out.find(depot), std::string::npos) << table.out;
  EXPECT_EQ(table.out.find("depot-2"), std::string::npos) << table.out;
  auto all = as(vic, {"device", "list", "-o", "json"});
  ASSERT_EQ(all.exit_code, 0) << all.err;
  EXPECT_EQ(all.json().size(), 3u);

  // A device outside the scope: 403, saying who, the scope and why.
  const std::string why =
      "user alice is scoped to sites plant-*; device " + depot + " is in site depot-2";
  auto show = as(alice, {"device", "show", depot});
  EXPECT_EQ(show.exit_code, 1);
  EXPECT_NE(show.err.find(why), std::string::npos) << show.err;
  EXPECT_TRUE(show.out.empty()) << show.out;
  HttpClient alice_http(server_->url(), alice);
  auto raw = alice_http.request("GET", "/api/v1/devices/" + depot);
  ASSERT_TRUE(raw);
  EXPECT_EQ(raw->status, 403) << raw->body;
  EXPECT_EQ(nlohmann::json::parse(raw->body)["error"]["code"], "permission_denied");
  auto cordon = as(alice, {"device", "cordon", depot});
  EXPECT_EQ(cordon.exit_code, 1);
  EXPECT_NE(cordon.err.find(why), std::string::npos) << cordon.err;
  auto depot_now = server_->cli({"device", "show", depot, "-o", "json"});
  EXPECT_FALSE(depot_now.json().value("cordoned", true)) << "a refused cordon changes nothing";
  auto mine = as(alice, {"device", "show", plant_a, "-o", "json"});
  ASSERT_EQ(mine.exit_code, 0) << mine.err;
  EXPECT_EQ(mine.json()["site"], "plant-1");
  ASSERT_EQ(as(alice, {"device", "cordon", plant_a}).exit_code, 0);

  // Enrollment tokens: only for sites in scope.
  auto depot_token = as(alice, {"token", "create", "--site", "depot-2"});
  EXPECT_EQ(depot_token.exit_code, 1);
  EXPECT_NE(depot_token.err.find("user alice is scoped to sites plant-*"), std::string::npos)
      << depot_token.err;
  auto plant_token = as(alice, {"token", "create", "--site", "plant-9", "-o", "json"});
  ASSERT_EQ(plant_token.exit_code, 0) << plant_token.err;
  auto tokens = as(alice, {"token", "list", "-o", "json"});
  ASSERT_EQ(tokens.exit_code, 0) << tokens.err;
  for (const auto& t : tokens.json()) EXPECT_NE(t.value("site", ""), "depot-2") << t.dump();
  EXPECT_EQ(server_->cli({"token", "list", "-o", "json"}).json().size(), 4u);

  // Deployments: a selector outside the scope, or none at all, is refused; nothing stored.
  auto depot_apply = as(alice, {"apply", "-f",
                                write("depot.yaml", manifest("depot-app",
                                                             "  selector: {sites: "
                                                             "[\"depot-*\"]}\n"))});
  EXPECT_EQ(depot_apply.exit_code, 1);
  EXPECT_NE(depot_apply.err.find("user alice is scoped to sites plant-*; deployment depot-app "
                                 "selects sites depot-*, outside that scope"),
            std::string::npos)
      << depot_apply.err;
  auto fleet_apply = as(alice, {"apply", "-f", write("none.yaml", manifest("any-app", ""))});
  EXPECT_EQ(fleet_apply.exit_code, 1);
  EXPECT_NE(fleet_apply.err.find("selects every site"), std::string::npos) << fleet_apply.err;
  auto over_admin = as(alice, {"apply", "-f",
                               write("over.yaml", manifest("everywhere",
                                                           "  selector: {sites: "
                                                           "[plant-1]}\n"))});
  EXPECT_EQ(over_admin.exit_code, 1);
  EXPECT_NE(over_admin.err.find("deployment everywhere exists and is outside the scope"),
            std::string::npos)
      << over_admin.err;
  auto ok_apply = as(alice, {"apply", "-f",
                             write("plant.yaml", manifest("plant-app",
                                                          "  selector: {sites: "
                                                          "[plant-1]}\n")),
                             "-o", "json"});
  ASSERT_EQ(ok_apply.exit_code, 0) << ok_apply.err;
  EXPECT_EQ(ok_apply.json()["revision"], 1);
  auto stored = server_->cli({"deployment", "list", "-o", "json"});
  ASSERT_EQ(stored.exit_code, 0) << stored.err;
  std::vector<std::string> names;
  for (const auto& d : stored.json()) names.push_back(d.value("name", ""));
  EXPECT_EQ(names, (std::vector<std::string>{"everywhere", "plant-app"}));
  auto alice_list = as(alice, {"deployment", "list", "-o", "json"});
  ASSERT_EQ(alice_list.exit_code, 0) << alice_list.err;
  ASSERT_EQ(alice_list.json().size(), 1u);
  EXPECT_EQ(alice_list.json()[0]["name"], "plant-app");
  auto show_admin = as(alice, {"deployment", "show", "everywhere"});
  EXPECT_EQ(show_admin.exit_code, 1);
  EXPECT_NE(show_admin.err.find("deployment everywhere selects every site"), std::string::npos)
      << show_admin.err;
  auto delete_admin = as(alice, {"deployment", "delete", "everywhere"});
  EXPECT_EQ(delete_admin.exit_code, 1);
  auto pause_admin = as(alice, {"rollout", "pause", "everywhere"});
  EXPECT_EQ(pause_admin.exit_code, 1);
  EXPECT_NE(pause_admin.err.find("user alice is scoped"), std::string::npos) << pause_admin.err;

  // The viewer reads but may not change anything.
  auto vic_apply = as(vic, {"apply", "-f", write("vic.yaml", manifest("vic-app", ""))});
  EXPECT_EQ(vic_apply.exit_code, 1);
  EXPECT_NE(vic_apply.err.find("user vic has role viewer, which may not do this (needs operator)"),
            std::string::npos)
      << vic_apply.err;
  EXPECT_EQ(as(vic, {"deployment", "list", "-o", "json"}).json().size(), 2u);
  auto vic_users = as(vic, {"user", "list"});
  EXPECT_EQ(vic_users.exit_code, 1);
  EXPECT_NE(vic_users.err.find("needs admin"), std::string::npos) << vic_users.err;

  // Telemetry and the audit log: a scoped user names a site in scope; the log is fleet-wide.
  auto fleet_query = as(alice, {"telemetry", "query", "inference_requests"});
  EXPECT_EQ(fleet_query.exit_code, 1);
  EXPECT_NE(fleet_query.err.find("name a site (--site)"), std::string::npos) << fleet_query.err;
  EXPECT_EQ(as(alice, {"telemetry", "query", "inference_requests", "--site", "depot-2"}).exit_code,
            1);
  auto site_query = as(alice, {"telemetry", "query", "inference_requests", "--site", "plant-1"});
  EXPECT_EQ(site_query.exit_code, 0) << site_query.err;
  auto alice_audit = as(alice, {"audit", "list"});
  EXPECT_EQ(alice_audit.exit_code, 1);
  EXPECT_NE(alice_audit.err.find("the audit log is fleet-wide"), std::string::npos)
      << alice_audit.err;

  // The audit log names alice for what she did (and only for that).
  auto audit = server_->cli({"audit", "list", "-o", "json"});
  ASSERT_EQ(audit.exit_code, 0) << audit.err;
  std::vector<std::string> by_alice;
  for (const auto& e : audit.json()) {
    if (e.value("actor", "") == "user:alice") {
      by_alice.push_back(e.value("action", "") + " " + e.value("target", ""));
    }
  }
  auto did = [&](const std::string& what) {
    return std::find(by_alice.begin(), by_alice.end(), what) != by_alice.end();
  };
  EXPECT_TRUE(did("device.cordon device/" + plant_a)) << audit.out;
  EXPECT_TRUE(did("deployment.apply deployment/plant-app")) << audit.out;
  EXPECT_EQ(std::count_if(
                by_alice.begin(), by_alice.end(),
                [](const std::string& a) { return a.rfind("enrollment_token.create", 0) == 0; }),
            1)
      << audit.out;
  for (const auto& action : by_alice) {
    EXPECT_EQ(action.find("everywhere"), std::string::npos)
        << "refused, so not audited: " << action;
    EXPECT_EQ(action.find(depot), std::string::npos) << "refused, so not audited: " << action;
  }
  auto audit_table = server_->cli({"audit", "list"});
  EXPECT_NE(audit_table.out.find("user:alice"), std::string::npos) << audit_table.out;
  EXPECT_NE(audit_table.out.find("user.create"), std::string::npos) << audit_table.out;
  EXPECT_NE(audit_table.out.find("user:admin"), std::string::npos) << audit_table.out;

  // The user list shows who is who, never a secret.
  auto users = server_->cli({"user", "list"});
  ASSERT_EQ(users.exit_code, 0) << users.err;
  EXPECT_NE(users.out.find("NAME"), std::string::npos);
  EXPECT_NE(users.out.find("REVOKED"), std::string::npos);
  EXPECT_NE(users.out.find("plant-*"), std::string::npos) << users.out;
  for (const auto& secret : {alice, vic, server_->admin_token()}) {
    EXPECT_EQ(users.out.find(secret), std::string::npos) << users.out;
  }
  EXPECT_EQ(users.out.find("opt_"), std::string::npos) << users.out;
  auto users_json = server_->cli({"user", "list", "-o", "json"});
  ASSERT_EQ(users_json.exit_code, 0) << users_json.err;
  ASSERT_EQ(users_json.json().size(), 3u);
  for (const auto& u : users_json.json()) {
    EXPECT_FALSE(u.contains("token") || u.contains("token_hash")) << u.dump();
  }
  EXPECT_EQ(users_json.out.find("opt_"), std::string::npos) << users_json.out;
  EXPECT_EQ(users_json.json()[1]["name"], "alice");
  EXPECT_EQ(users_json.json()[1]["sites"], nlohmann::json::array({"plant-*"}));

  // Revoking is immediate: alice's next call is refused (her token was cached by now).
  auto revoke = server_->cli({"user", "revoke", "alice"});
  ASSERT_EQ(revoke.exit_code, 0) << revoke.err;
  EXPECT_NE(revoke.out.find("user alice revoked"), std::string::npos) << revoke.out;
  auto after = as(alice, {"device", "list"});
  EXPECT_EQ(after.exit_code, 1);
  EXPECT_NE(after.err.find("revoked"), std::string::npos) << after.err;
  auto refused = alice_http.request("GET", "/api/v1/devices");
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->status, 401) << refused->body;
  auto revoked_row = server_->cli({"user", "list", "-o", "json"}).json()[1];
  EXPECT_GT(revoked_row.value("revoked_at", int64_t{0}), 0) << revoked_row.dump();
  EXPECT_EQ(as(vic, {"device", "list"}).exit_code, 0) << "other users are not affected";
  auto again = server_->cli({"user", "create", "alice", "--role", "viewer"});
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_NE(again.err.find("user alice already exists"), std::string::npos) << again.err;

  // Revocation survives a restart.
  server_->stop();
  server_->start();
  EXPECT_EQ(as(alice, {"device", "list"}).exit_code, 1);
  EXPECT_EQ(as(vic, {"device", "list"}).exit_code, 0);
}

TEST_F(UsersE2E, CreateRefusalsNameTheField) {
  auto bad_role = server_->cli({"user", "create", "eve", "--role", "root"});
  EXPECT_EQ(bad_role.exit_code, 1);
  EXPECT_NE(bad_role.err.find("role: \"root\" is not a role"), std::string::npos) << bad_role.err;
  auto bad_site = server_->cli({"user", "create", "eve", "--role", "viewer", "--sites", "a b"});
  EXPECT_EQ(bad_site.exit_code, 1);
  EXPECT_NE(bad_site.err.find("sites[0]: \"a b\" is not a site name or glob"), std::string::npos)
      << bad_site.err;
  auto scoped_admin =
      server_->cli({"user", "create", "eve", "--role", "admin", "--sites", "plant-*"});
  EXPECT_EQ(scoped_admin.exit_code, 1);
  EXPECT_NE(scoped_admin.err.find("an admin cannot be scoped"), std::string::npos)
      << scoped_admin.err;
  auto revoke_admin = server_->cli({"user", "revoke", "admin"});
  EXPECT_EQ(revoke_admin.exit_code, 1);
  auto revoke_nobody = server_->cli({"user", "revoke", "nobody"});
  EXPECT_EQ(revoke_nobody.exit_code, 1);
  EXPECT_NE(revoke_nobody.err.find("user nobody does not exist"), std::string::npos)
      << revoke_nobody.err;
  // Nothing was created by any of them.
  auto users = server_->cli({"user", "list", "-o", "json"});
  ASSERT_EQ(users.exit_code, 0) << users.err;
  ASSERT_EQ(users.json().size(), 1u);
  EXPECT_EQ(users.json()[0]["name"], "admin");
}

}  // namespace
}  // namespace outpost::e2e
