// `outpost deployment list|show|delete`.
#include <cstdio>
#include <iostream>

#include "cli/cli.h"

namespace outpost::cli {

void add_deployment_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* deployment = app.add_subcommand("deployment", "Deployments and their revisions");
  deployment->require_subcommand(1);

  auto* list = deployment->add_subcommand("list", "List deployments");
  list->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/deployments", exit_code, "deployments");
    if (!result) return;
    Table table({"NAME", "REVISION", "MODEL", "UPDATED"});
    for (const auto& d : (*result)["deployments"]) {
      std::string model = d["model"].is_object()
                              ? d["model"].value("name", "") + " " + d["model"].value("version", "")
                              : "-";
      table.add({d["name"], std::to_string(d["revision"].get<int64_t>()), model,
                 ago(d["updated_at"].get<int64_t>(), now_ms())});
    }
    std::cout << table.render();
    exit_code = kExitOk;
  });

  auto name = std::make_shared<std::string>();
  auto* show = deployment->add_subcommand("show", "Show a deployment: revision, manifest, devices");
  show->add_option("NAME", *name, "Deployment name")->required();
  show->callback([&options, &exit_code, name] {
    Session session(options);
    auto result = session.fetch("/api/v1/deployments/" + url_encode(*name), exit_code);
    if (!result) return;
    const auto& d = *result;
    std::cout << "Deployment: " << d["name"].get<std::string>() << "\n"
              << "Revision:   " << d["revision"].get<int64_t>() << " (of " << d["revisions"].size()
              << " revisions; stable " << d.value("stable_revision", int64_t{0}) << ")\n";
    for (const auto& r : d["revisions"]) {
      if (!r.value("bad_reason", std::string()).empty()) {
        std::cout << "Rolled back: revision " << r["revision"] << ": "
                  << r["bad_reason"].get<std::string>() << "\n";
      }
    }
    if (d.contains("rollout") && d["rollout"].is_object()) {
      const auto& r = d["rollout"];
      std::cout << "Rollout:    " << r["id"] << " revision " << r["from_revision"] << " -> "
                << r["to_revision"] << " " << r["state"].get<std::string>() << ", wave "
                << r["wave"] << " of " << r["waves"] << " (outpost rollout status "
                << d["name"].get<std::string>() << ")\n";
    }
    if (d["model"].is_object()) {
      std::cout << "Model:      " << d["model"].value("name", "") << " "
                << d["model"].value("version", "") << "\n";
    }
    const auto& s = d["summary"];
    std::cout << "Devices:    " << s["scheduled"] << " scheduled, " << s["unschedulable"]
              << " unschedulable, " << s["in_sync"] << " reporting the current state\n";
    if (d.contains("fleet") && d["fleet"].is_object()) {
      const auto& f = d["fleet"];
      char line[256];
      const double p95 =
          f["p95_latency_seconds"].is_number() ? f["p95_latency_seconds"].get<double>() * 1000 : 0;
      std::snprintf(line, sizeof line,
                    "Last hour:  %.0f requests, %.2f%% errors, p95 %.1f ms, %.0f fallbacks, "
                    "%lld devices reporting\n",
                    f.value("requests", 0.0), f.value("error_rate", 0.0) * 100, p95,
                    f.value("fallbacks", 0.0),
                    static_cast<long long>(f.value("devices_reporting", int64_t{0})));
      std::cout << line;
    }
    if (!d["devices"].empty()) {
      Table table({"DEVICE", "SITE", "STATE", "IN SYNC", "REASON"});
      for (const auto& t : d["devices"]) {
        table.add({t["device"], t["site"], t["state"], t["in_sync"].get<bool>() ? "yes" : "no",
                   t.value("reason", "")});
      }
      std::cout << table.render();
    }
    std::cout << "Manifest:\n" << d["manifest"].dump(2) << "\n";
    exit_code = kExitOk;
  });

  auto target = std::make_shared<std::string>();
  auto* del = deployment->add_subcommand("delete", "Delete a deployment (devices stop running it)");
  del->add_option("NAME", *target, "Deployment name")->required();
  del->callback([&options, &exit_code, target] {
    Session session(options);
    auto result =
        session.perform("DELETE", "/api/v1/deployments/" + url_encode(*target), exit_code);
    if (result) std::cout << "deployment " << *target << " deleted\n";
  });
}

}  // namespace outpost::cli
