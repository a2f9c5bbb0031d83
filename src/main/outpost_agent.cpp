// `outpost-agent`: the device agent. This build knows its command line; enrollment, sync,
// downloads and workloads arrive with the agent work (see the README's status section).
#include <iostream>

#include <CLI/CLI.hpp>

int main(int argc, char** argv) {
  CLI::App app{"Outpost device agent", "outpost-agent"};
  app.set_version_flag("--version", "outpost-agent 0.1.0");
  std::string server, token, data, site, listen = "127.0.0.1:7410";
  std::vector<std::string> labels;
  app.add_option("--server", server, "Control plane URL");
  app.add_option("--enroll-token", token, "Enrollment token (first start only)");
  app.add_option("--data", data, "Data directory");
  app.add_option("--site", site, "Site (must match the token's)");
  app.add_option("--label", labels, "Label k=v (repeatable)");
  app.add_option("--listen", listen, "Local API address");
  CLI11_PARSE(app, argc, argv);
  std::cerr << "outpost-agent: the device agent is not implemented in this build yet\n";
  return 1;
}
