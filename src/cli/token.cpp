// `outpost token create|list`: enrollment tokens that let devices join a site.
#include <iostream>

#include "cli/cli.h"
#include "common/clock.h"

namespace outpost::cli {
namespace {

struct TokenArgs {
  std::string site;
  std::vector<std::string> labels;
  int64_t uses = 0;
  std::string ttl = "24h";
};

Result<nlohmann::json> labels_json(const std::vector<std::string>& labels) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& l : labels) {
    auto eq = l.find('=');
    if (eq == std::string::npos || eq == 0) {
      return make_error(Errc::kInvalidArgument, "--label: expected k=v, got \"" + l + "\"",
                        "label");
    }
    out[l.substr(0, eq)] = l.substr(eq + 1);
  }
  return out;
}

}  // namespace

void add_token_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* token = app.add_subcommand("token", "Device enrollment tokens");
  token->require_subcommand(1);

  auto args = std::make_shared<TokenArgs>();
  auto* create =
      token->add_subcommand("create", "Mint a token a device uses once to enroll into a site");
  create->add_option("--site", args->site, "Site the devices join (e.g. plant-7)")->required();
  create->add_option("--label", args->labels, "Label given to enrolled devices, k=v (repeatable)");
  create->add_option("--uses", args->uses, "How many devices may use it (default: unlimited)");
  create->add_option("--ttl", args->ttl, "How long it stays valid (default 24h)");
  create->footer(
      "Example: outpost token create --site plant-7 --label line=assembly --uses 10 --ttl 48h");
  create->callback([&options, &exit_code, args] {
    Session session(options);
    auto labels = labels_json(args->labels);
    if (!labels) {
      exit_code = session.fail(labels.error());
      return;
    }
    nlohmann::json body = {{"site", args->site}, {"labels", *labels}, {"ttl", args->ttl}};
    if (args->uses > 0) body["uses"] = args->uses;
    auto result = session.perform("POST", "/api/v1/enrollment-tokens", exit_code, body.dump());
    if (result) {
      std::cout << (*result)["token"].get<std::string>() << "\n";
      std::cerr << "token " << (*result)["id"].get<std::string>() << " for site " << args->site
                << (result->at("uses_left").is_null()
                        ? ", unlimited uses"
                        : ", " + std::to_string(result->at("uses_left").get<int64_t>()) + " uses")
                << (result->at("expires_at").is_null()
                        ? ""
                        : ", expires " + format_iso8601(result->at("expires_at").get<int64_t>()))
                << "\nenroll a device: outpost-agent --server " << session.server()
                << " --enroll-token <token>"
                << (result->contains("ca_pin")
                        ? " --ca-pin " + (*result)["ca_pin"].get<std::string>()
                        : std::string())
                << " --data /var/lib/outpost\n";
      if (result->contains("ca_pin")) {
        std::cerr << "CA pin: " << (*result)["ca_pin"].get<std::string>()
                  << " (the device checks the server's CA against it before it sends the token)\n";
      }
    }
  });

  auto* list =
      token->add_subcommand("list", "List enrollment tokens (secrets are never shown again)");
  list->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/enrollment-tokens", exit_code, "tokens");
    if (!result) return;
    Table table({"ID", "SITE", "LABELS", "USES LEFT", "EXPIRES"});
    for (const auto& t : (*result)["tokens"]) {
      std::string labels;
      for (const auto& [k, v] : t["labels"].items())
        labels += (labels.empty() ? "" : ",") + k + "=" + v.get<std::string>();
      table.add(
          {t["id"], t["site"], labels,
           t["uses_left"].is_null() ? "unlimited" : std::to_string(t["uses_left"].get<int64_t>()),
           t["expires_at"].is_null() ? "never" : format_iso8601(t["expires_at"].get<int64_t>())});
    }
    std::cout << table.render();
    exit_code = kExitOk;
  });
}

}  // namespace outpost::cli
