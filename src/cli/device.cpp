// `outpost device list|show|cordon|uncordon`.
#include <iostream>

#include "cli/cli.h"

namespace outpost::cli {
namespace {

std::string labels_text(const nlohmann::json& labels) {
  std::string out;
  for (const auto& [k, v] : labels.items()) {
    out += (out.empty() ? "" : ",") + k + "=" + (v.is_string() ? v.get<std::string>() : v.dump());
  }
  return out;
}

std::string fact(const nlohmann::json& facts, const char* key) {
  if (!facts.contains(key)) return "-";
  const auto& v = facts[key];
  return v.is_string() ? v.get<std::string>() : v.dump();
}

}  // namespace

void add_device_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* device = app.add_subcommand("device", "Devices in the fleet");
  device->require_subcommand(1);

  auto site = std::make_shared<std::string>();
  auto selector = std::make_shared<std::string>();
  auto* list =
      device->add_subcommand("list", "List devices with their site, labels and sync state");
  list->add_option("--site", *site, "Only devices of this site");
  list->add_option("--selector", *selector, "Only devices with these labels, k=v[,k=v...]");
  list->callback([&options, &exit_code, site, selector] {
    Session session(options);
    std::string path =
        "/api/v1/devices?site=" + url_encode(*site) + "&selector=" + url_encode(*selector);
    auto result = session.fetch(path, exit_code, "devices");
    if (!result) return;
    Table table({"ID", "SITE", "LABELS", "ARCH", "ACCEL", "LAST SEEN", "GEN", "REPORTED", "NOTES"});
    const int64_t now = now_ms();
    for (const auto& d : (*result)["devices"]) {
      std::string notes;
      if (d.value("cordoned", false)) notes += "cordoned ";
      if (!d["unschedulable"].empty())
        notes += "unschedulable(" + std::to_string(d["unschedulable"].size()) + ")";
      table.add({d["id"], d["site"], labels_text(d["labels"]), fact(d["facts"], "arch"),
                 fact(d["facts"], "accelerator"), ago(d["last_seen"].get<int64_t>(), now),
                 std::to_string(d["generation"].get<int64_t>()),
                 std::to_string(d["reported_generation"].get<int64_t>()), notes});
    }
    std::cout << table.render();
    if (table.empty())
      std::cerr << "no devices; enroll one with 'outpost token create --site SITE'\n";
    exit_code = kExitOk;
  });

  auto id = std::make_shared<std::string>();
  auto* show =
      device->add_subcommand("show", "Show one device: facts, desired state, schedule, status");
  show->add_option("ID", *id, "Device id")->required();
  show->callback([&options, &exit_code, id] {
    Session session(options);
    auto result = session.fetch("/api/v1/devices/" + url_encode(*id), exit_code);
    if (!result) return;
    const auto& d = *result;
    std::cout << "Device:      " << d["id"].get<std::string>() << "\n"
              << "Site:        " << d["site"].get<std::string>() << "\n"
              << "Labels:      " << labels_text(d["labels"]) << "\n"
              << "Last seen:   " << ago(d["last_seen"].get<int64_t>(), now_ms()) << "\n"
              << "Generation:  " << d["generation"] << " (device reports "
              << d["reported_generation"] << ")\n"
              << "Facts:       " << d["facts"].dump() << "\n";
    std::cout << "Deployments:\n";
    const auto& schedule = d["schedule"].value("deployments", nlohmann::json::object());
    if (schedule.empty()) std::cout << "  (none)\n";
    for (const auto& [name, entry] : schedule.items()) {
      std::cout << "  " << name << "  revision " << entry.value("revision", 0) << "  "
                << entry.value("state", "");
      if (entry.contains("reason")) std::cout << ": " << entry["reason"].get<std::string>();
      std::cout << "\n";
    }
    for (const auto& dep : d["desired"].value("deployments", nlohmann::json::array())) {
      if (dep.contains("model")) {
        const auto& m = dep["model"];
        std::cout << "  " << dep["name"].get<std::string>() << " model " << m.value("name", "")
                  << " " << m.value("version", "") << " variant "
                  << m.value("variant", nlohmann::json::object())
                         .value("selector", nlohmann::json::object())
                         .dump()
                  << " " << m.value("variant", nlohmann::json::object()).value("artifact", "")
                  << "\n";
      }
    }
    if (!d["status"].empty()) std::cout << "Status:      " << d["status"].dump() << "\n";
    exit_code = kExitOk;
  });

  for (const char* verb : {"cordon", "uncordon"}) {
    auto target = std::make_shared<std::string>();
    auto* cmd = device->add_subcommand(verb, std::string(verb) == "cordon"
                                                 ? "Keep new placements off a device"
                                                 : "Allow placements on a device again");
    cmd->add_option("ID", *target, "Device id")->required();
    std::string v = verb;
    cmd->callback([&options, &exit_code, target, v] {
      Session session(options);
      auto result =
          session.perform("POST", "/api/v1/devices/" + url_encode(*target) + "/" + v, exit_code);
      if (result) std::cout << "device " << *target << " " << v << "ed\n";
    });
  }
}

}  // namespace outpost::cli
