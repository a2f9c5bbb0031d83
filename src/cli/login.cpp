// `outpost login`: checks the server and token, then remembers them in the config file.
#include <sys/stat.h>

#include <iostream>

#include "cli/cli.h"
#include "common/durable_file.h"

namespace outpost::cli {

void add_login_command(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* cmd =
      app.add_subcommand("login", "Check a server URL and token, and save them as defaults");
  cmd->footer(
      "Example: outpost login --server http://127.0.0.1:7400 --token $(cat "
      "outpost-data/admin.token)");
  cmd->callback([&options, &exit_code] {
    Session session(options);
    if (session.server().empty() || session.token().empty()) {
      exit_code =
          session.fail(Error{Errc::kInvalidArgument, "login needs --server and --token", {}});
      return;
    }
    auto check = session.call("GET", "/api/v1/deployments");
    if (!check) {
      exit_code =
          session.fail(check.error().with_context("checking the token with " + session.server()));
      return;
    }
    std::string path = config_path();
    auto dir = path.substr(0, path.rfind('/'));
    nlohmann::json config = {{"server", session.server()}, {"token", session.token()}};
    if (!session.ca_file().empty()) config["ca_file"] = session.ca_file();
    auto saved = make_dirs(dir, 0700);
    if (saved) saved = write_file_durably(path, config.dump(2) + "\n", 0600);
    if (!saved) {
      exit_code = session.fail(saved.error());
      return;
    }
    if (session.json_output()) {
      session.print_json({{"server", session.server()}, {"config", path}});
    } else {
      std::cout << "Logged in to " << session.server() << "; saved to " << path << "\n";
    }
    exit_code = kExitOk;
  });
}

}  // namespace outpost::cli
