// `outpost user create|list|revoke`: named operator users with a role and a site scope
// (admin only). A user's token is printed once, at creation.
#include <iostream>

#include "cli/cli.h"
#include "common/clock.h"

namespace outpost::cli {
namespace {

struct UserArgs {
  std::string name;
  std::string role;
  std::vector<std::string> sites;
};

std::string sites_text(const nlohmann::json& user) {
  std::string out;
  for (const auto& s : list_of(user, "sites")) {
    if (s.is_string()) out += (out.empty() ? "" : ",") + s.get<std::string>();
  }
  return out.empty() ? "all" : out;
}

}  // namespace

void add_user_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* user = app.add_subcommand("user", "Operator users: roles and site scopes (admin only)");
  user->require_subcommand(1);
  user->footer(
      "Roles: viewer < operator < admin. A user scoped to sites sees and changes only those "
      "sites'\n"
      "devices, deployments, tokens and telemetry. Example: outpost user list");

  auto args = std::make_shared<UserArgs>();
  auto* create = user->add_subcommand(
      "create", "Create a user and print its token (shown once; only its hash is stored)");
  create->add_option("NAME", args->name, "User name (letters, digits, '-', '_', '.')")->required();
  create
      ->add_option("--role", args->role,
                   "viewer (reads), operator (also changes things), admin (also manages users)")
      ->required();
  create
      ->add_option("--sites", args->sites,
                   "Site names or globs the user is scoped to (repeatable or comma-separated; "
                   "default: every site)")
      ->delimiter(',');
  create->footer(
      "Example: outpost user create alice --role operator --sites 'plant-*'\n"
      "         outpost user create ops --role viewer --sites plant-1,depot-2 > ops.token");
  create->callback([&options, &exit_code, args] {
    Session session(options);
    nlohmann::json body = {{"name", args->name}, {"role", args->role}, {"sites", args->sites}};
    auto result = session.perform("POST", "/api/v1/users", exit_code, body.dump());
    if (!result) return;
    std::cout << text_of(*result, "token") << "\n";
    std::cerr << "user " << text_of(*result, "name") << " (" << text_of(*result, "role")
              << ", sites " << sites_text(*result)
              << ") created; its token is above and cannot be shown again\n"
              << "use it: outpost login --server " << session.server() << " --token <token>\n";
  });

  auto* list = user->add_subcommand("list", "List users (their tokens are never shown)");
  list->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/users", exit_code, "users");
    if (!result) return;
    Table table({"NAME", "ROLE", "SITES", "CREATED", "REVOKED"});
    for (const auto& u : list_of(*result, "users")) {
      const int64_t revoked = int_of(u, "revoked_at");
      table.add({text_of(u, "name"), text_of(u, "role"), sites_text(u),
                 format_iso8601(int_of(u, "created_at")),
                 revoked > 0 ? format_iso8601(revoked) : "-"});
    }
    std::cout << table.render();
    exit_code = kExitOk;
  });

  auto target = std::make_shared<std::string>();
  auto* revoke = user->add_subcommand("revoke", "Revoke a user's token: its next call is refused");
  revoke->add_option("NAME", *target, "User name")->required();
  revoke->footer("Example: outpost user revoke alice");
  revoke->callback([&options, &exit_code, target] {
    Session session(options);
    auto result =
        session.perform("POST", "/api/v1/users/" + url_encode(*target) + "/revoke", exit_code);
    if (!result) return;
    std::cout << "user " << *target << " revoked at "
              << format_iso8601(int_of(*result, "revoked_at"))
              << "; its token is refused from now on\n";
  });
}

}  // namespace outpost::cli
