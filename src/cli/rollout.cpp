// `outpost rollout status|pause|resume|abort|undo NAME`: watch and steer a deployment's staged
// rollout (waves, gates, deferred and held devices).
#include <cstdio>
#include <iostream>

#include "cli/cli.h"
#include "common/clock.h"

namespace outpost::cli {
namespace {

std::string number(const nlohmann::json& v) {
  if (!v.is_number()) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", v.get<double>());
  return buf;
}

void print_status(const nlohmann::json& s) {
  const int64_t now = now_ms();
  std::cout << "Rollout " << s["id"] << " of " << s["deployment"].get<std::string>()
            << ": revision " << s["from_revision"] << " -> " << s["to_revision"] << " ("
            << s["kind"].get<std::string>() << ")\n";
  std::cout << "State:    " << s["state"].get<std::string>();
  if (!s.value("reason", std::string()).empty())
    std::cout << " — " << s["reason"].get<std::string>();
  std::cout << "\n";
  std::cout << "Devices:  " << s["devices"] << " (at most " << s["max_unavailable"]
            << " updating at once)";
  if (s.contains("eta_ms")) {
    std::cout << "; ETA " << format_iso8601(s["eta_ms"].get<int64_t>()) << " (about "
              << std::max<int64_t>((s["eta_ms"].get<int64_t>() - now) / 1000, 0) << " s)";
  }
  std::cout << "\n";
  Table waves(
      {"WAVE", "DEVICES", "STATE", "PENDING", "HELD", "UPDATING", "HEALTHY", "FAILED", "DEFERRED"});
  for (const auto& w : s["waves"]) {
    const auto& c = w["counts"];
    std::string state = w["state"].get<std::string>();
    if (w.contains("bake_until")) {
      state += " until " + format_iso8601(w["bake_until"].get<int64_t>());
    }
    waves.add({std::to_string(w["wave"].get<int64_t>()),
               std::to_string(w["devices"].get<int64_t>()), state, c["pending"].dump(),
               c["held"].dump(), c["updating"].dump(), c["healthy"].dump(), c["failed"].dump(),
               c["deferred"].dump()});
  }
  std::cout << waves.render();
  if (!s["gates"].empty()) {
    Table gates({"GATE", "LIMIT", "NEW REVISION", "OLD REVISION", "STATE", "NOTE"});
    for (const auto& g : s["gates"]) {
      gates.add({g["name"], number(g["limit"]), number(g["value"]), number(g["baseline"]),
                 g["state"], g.value("note", std::string())});
    }
    std::cout << gates.render();
  }
  for (const char* list : {"failed", "deferred", "held"}) {
    if (s[list].empty()) continue;
    std::cout << list << ":\n";
    for (const auto& d : s[list]) {
      std::cout << "  " << d["device"].get<std::string>() << " (site "
                << d["site"].get<std::string>() << ", wave " << d["wave"]
                << "): " << d["message"].get<std::string>() << "\n";
    }
  }
  std::cout << "History:\n";
  for (const auto& h : s["history"]) {
    std::cout << "  " << format_iso8601(h["at"].get<int64_t>()) << "  "
              << h["event"].get<std::string>() << "\n";
  }
}

}  // namespace

void add_rollout_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* rollout = app.add_subcommand(
      "rollout", "Staged rollouts: watch waves and gates; pause, resume, abort or undo");
  rollout->require_subcommand(1);
  rollout->footer(
      "A new revision of a deployment moves to its devices in the waves of spec.rollout\n"
      "(waves, bake, max_unavailable, gates, on_failure, window, offline_grace). A breached\n"
      "gate rolls it back (or pauses it), and a rolled-back spec is refused by apply unless\n"
      "--force. Example: outpost rollout status defect-detector");

  auto name = std::make_shared<std::string>();
  auto* status = rollout->add_subcommand(
      "status", "Waves with per-phase counts, gates with their values, deferred devices, ETA");
  status->add_option("NAME", *name, "Deployment name")->required();
  status->callback([&options, &exit_code, name] {
    Session session(options);
    auto result = session.fetch("/api/v1/deployments/" + url_encode(*name) + "/rollout", exit_code);
    if (!result) return;
    print_status(*result);
  });

  struct Verb {
    const char* name;
    const char* help;
  };
  for (const Verb& verb :
       {Verb{"pause", "Stop admitting devices; what was updated stays"},
        Verb{"resume", "Continue a paused rollout (gates then read only what happens after)"},
        Verb{"abort", "Stop the rollout where it is, for good (devices keep what they run)"},
        Verb{"undo", "Roll back to the revision the rollout started from, as a new rollout"}}) {
    auto target = std::make_shared<std::string>();
    auto* cmd = rollout->add_subcommand(verb.name, verb.help);
    cmd->add_option("NAME", *target, "Deployment name")->required();
    const std::string action = verb.name;
    cmd->callback([&options, &exit_code, target, action] {
      Session session(options);
      auto result = session.perform(
          "POST", "/api/v1/deployments/" + url_encode(*target) + "/rollout/" + action, exit_code);
      if (!result) return;
      print_status(*result);
    });
  }
}

void add_site_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* site = app.add_subcommand("site", "Sites: time zone (for rollout windows) and region");
  site->require_subcommand(1);
  auto* list = site->add_subcommand("list", "List sites with their time zone and device count");
  list->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/sites", exit_code, "sites");
    if (!result) return;
    Table table({"SITE", "TIMEZONE", "REGION", "DEVICES"});
    for (const auto& s : (*result)["sites"]) {
      table.add({s["name"], s["timezone"], s["region"], s["devices"].dump()});
    }
    std::cout << table.render();
  });
  auto name = std::make_shared<std::string>();
  auto timezone = std::make_shared<std::string>();
  auto region = std::make_shared<std::string>();
  auto* set = site->add_subcommand("set", "Set a site's time zone and/or region");
  set->add_option("NAME", *name, "Site name")->required();
  set->add_option("--timezone", *timezone, "IANA time zone, e.g. Europe/Berlin (default UTC)");
  set->add_option("--region", *region, "Region, e.g. eu-central");
  set->footer(
      "Maintenance windows (spec.rollout.window) are read in the site's time zone.\n"
      "Example: outpost site set plant-7 --timezone Europe/Berlin");
  set->callback([&options, &exit_code, name, timezone, region] {
    Session session(options);
    nlohmann::json body = nlohmann::json::object();
    if (!timezone->empty()) body["timezone"] = *timezone;
    if (!region->empty()) body["region"] = *region;
    auto result =
        session.perform("PUT", "/api/v1/sites/" + url_encode(*name), exit_code, body.dump());
    if (!result) return;
    std::cout << "site " << (*result)["name"].get<std::string>() << ": time zone "
              << (*result)["timezone"].get<std::string>() << "\n";
  });
}

}  // namespace outpost::cli
