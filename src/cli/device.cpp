// `outpost device list|show|cordon|uncordon|revoke`.
#include <iostream>
#include <map>

#include "common/clock.h"
#include "common/units.h"

#include "cli/cli.h"

namespace outpost::cli {
namespace {

// Where the device sits: the relays between it and the control plane, and for a relay, what it
// does for the devices below it (from its last status report).
void print_topology(const nlohmann::json& d) {
  const auto& via = list_of(d, "via");
  if (!via.empty()) {
    std::string path = "device";
    for (const auto& hop : via) path += " -> " + (hop.is_string() ? hop.get<std::string>() : "?");
    std::cout << "Path:        " << path << " -> control plane\n";
  }
  const auto& relay = object_of(object_of(d, "status"), "relay");
  if (relay.empty()) return;
  const auto& children = list_of(d, "children");
  std::string ids;
  for (const auto& c : children)
    ids += (ids.empty() ? "" : ", ") + (c.is_string() ? c.get<std::string>() : "?");
  const auto& up = object_of(relay, "upstream");
  const auto& cache = object_of(relay, "cache");
  const auto& backlog = object_of(relay, "backlog");
  std::cout << "Relay:       on " << text_of(relay, "listen") << ", upstream "
            << text_of(up, "state");
  if (!text_of(up, "error").empty()) std::cout << " (" << text_of(up, "error") << ")";
  std::cout << "\n"
            << "  Children:  " << children.size() << (ids.empty() ? "" : " (" + ids + ")");
  if (int_of(d, "behind") > static_cast<int64_t>(children.size())) {
    std::cout << "; " << int_of(d, "behind") << " devices behind it in all";
  }
  std::cout << "\n"
            << "  Cache:     " << int_of(cache, "blobs") << " blobs, "
            << format_size(int_of(cache, "bytes")) << " of "
            << format_size(int_of(cache, "budget_bytes")) << "; " << int_of(cache, "hits")
            << " hits, " << int_of(cache, "misses") << " misses, " << int_of(cache, "evictions")
            << " evicted, " << int_of(cache, "fetching") << " fetching\n"
            << "  Backlog:   " << int_of(backlog, "entries") << " uploads, "
            << format_size(int_of(backlog, "bytes")) << " of "
            << format_size(int_of(backlog, "limit_bytes")) << "; " << int_of(backlog, "forwarded")
            << " forwarded, " << int_of(backlog, "refused_upstream") << " refused upstream, "
            << int_of(backlog, "refused_full") << " refused while full\n"
            << "  Offline:   " << int_of(relay, "desired_answered_offline")
            << " desired states answered from the cache while upstream was down\n";
}

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
    Table table({"ID", "SITE", "STATE", "LAST SEEN", "SYNC LAG", "VIA", "LABELS", "ARCH", "ACCEL",
                 "GEN", "REPORTED", "NOTES"});
    const int64_t now = now_ms();
    size_t online = 0;
    for (const auto& d : (*result)["devices"]) {
      std::string notes;
      if (d.value("revoked_at", int64_t{0}) > 0) notes += "REVOKED ";
      if (d.value("cordoned", false)) notes += "cordoned ";
      if (d.value("relay", false)) notes += "relay ";
      // The relay the device's reports come through (the one nearest to it); "-" for direct.
      const auto& via = list_of(d, "via");
      const std::string via_text =
          via.empty() || !via[0].is_string() ? "-" : via[0].get<std::string>();
      if (!d["unschedulable"].empty())
        notes += "unschedulable(" + std::to_string(d["unschedulable"].size()) + ") ";
      // Fleet health from the device's telemetry: lag of its last sync, records it dropped.
      std::string lag = "-";
      const auto& t = d.value("telemetry", nlohmann::json());
      if (t.is_object()) {
        if (t["sync_lag_s"].is_number()) {
          lag = format_duration_ms(static_cast<int64_t>(t["sync_lag_s"].get<double>() * 1000));
        }
        if (t.value("dropped", int64_t{0}) > 0) {
          notes += "telemetry dropped " + std::to_string(t["dropped"].get<int64_t>()) + " ";
        }
      }
      const bool is_online = d.value("online", false);
      if (is_online) ++online;
      table.add({d["id"], d["site"], is_online ? "ONLINE" : "OFFLINE",
                 ago(d["last_seen"].get<int64_t>(), now), lag, via_text, labels_text(d["labels"]),
                 fact(d["facts"], "arch"),
                 d["labels"].contains("accelerator") ? d["labels"]["accelerator"].get<std::string>()
                                                     : fact(d["facts"], "accelerator"),
                 std::to_string(d["generation"].get<int64_t>()),
                 std::to_string(d["reported_generation"].get<int64_t>()), notes});
    }
    std::cout << table.render();
    if (!table.empty()) {
      std::cout << online << " of " << (*result)["devices"].size() << " online\n";
    }
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
    if (d.value("revoked_at", int64_t{0}) > 0) {
      std::cout << "Revoked:     " << format_iso8601(d["revoked_at"].get<int64_t>())
                << " (every call is refused)\n";
    }
    print_topology(d);
    std::cout << "Deployments:\n";
    const auto& schedule = d["schedule"].value("deployments", nlohmann::json::object());
    // What the device itself last said about each deployment (its status report).
    std::map<std::string, nlohmann::json> reported;
    for (const auto& r : d["status"].value("deployments", nlohmann::json::array())) {
      if (r.is_object()) reported[r.value("name", "")] = r;
    }
    if (schedule.empty()) std::cout << "  (none)\n";
    for (const auto& [name, entry] : schedule.items()) {
      std::cout << "  " << name << "  revision " << entry.value("revision", 0) << "  "
                << entry.value("state", "");
      if (entry.contains("reason")) std::cout << ": " << entry["reason"].get<std::string>();
      if (auto it = reported.find(name); it != reported.end()) {
        const auto& r = it->second;
        std::cout << "  | device: " << r.value("phase", "?") << " revision "
                  << r.value("revision", 0);
        if (r.contains("current_revision") && r["current_revision"].is_number() &&
            r["current_revision"] != r["revision"]) {
          std::cout << " (running " << r["current_revision"] << ")";
        }
        if (r.value("restarts", 0) > 0) std::cout << ", " << r["restarts"] << " restarts";
        if (!r.value("message", "").empty()) std::cout << ": " << r.value("message", "");
      }
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
    // Secret versions: what the server delivers, and what the device says is active (names and
    // versions only; values never leave the device's workloads).
    const auto& delivered = object_of(object_of(d, "desired"), "secrets");
    if (!delivered.empty()) {
      std::map<std::string, nlohmann::json> active;
      for (const auto& s : list_of(object_of(d, "status"), "secrets")) {
        if (s.is_object()) active[text_of(s, "name")] = s;
      }
      std::cout << "Secrets:\n";
      for (const auto& [name, versions] : delivered.items()) {
        std::cout << "  " << name << "  delivered";
        for (const auto& v : versions) {
          std::cout << " v" << int_of(v, "version");
          if (int_of(v, "activate_at") > now_ms()) {
            std::cout << " (from " << format_iso8601(int_of(v, "activate_at")) << ")";
          }
        }
        if (auto it = active.find(name); it != active.end()) {
          std::cout << "  | device: active v" << int_of(it->second, "version");
          if (int_of(it->second, "staged") > 0) {
            std::cout << ", staged v" << int_of(it->second, "staged");
          }
        }
        std::cout << "\n";
      }
    }
    if (!d["status"].empty()) {
      std::cout << "Reported:    " << ago(d.value("status_at", static_cast<int64_t>(0)), now_ms())
                << " (report " << d["status"].value("seq", 0) << ", agent "
                << d["status"].value("agent_version", "?") << ")\n";
    }
    if (const auto& t = d.value("telemetry", nlohmann::json()); t.is_object()) {
      const auto& dropped = t.value("dropped_by_class", nlohmann::json::object());
      std::cout << "Telemetry:   " << t.value("records", int64_t{0}) << " records in "
                << t.value("batches", int64_t{0}) << " batches, last "
                << ago(t.value("last_ingest_at", int64_t{0}), now_ms()) << ", acked seq "
                << t.value("acked_seq", int64_t{0})
                << "; dropped on the device: " << dropped.value("samples", int64_t{0})
                << " samples, " << dropped.value("health", int64_t{0}) << " health, "
                << dropped.value("aggregates", int64_t{0}) << " aggregates, "
                << dropped.value("events", int64_t{0}) << " events\n";
    }
    exit_code = kExitOk;
  });

  auto log_id = std::make_shared<std::string>();
  auto limit = std::make_shared<int>(20);
  auto* status_log = device->add_subcommand(
      "status-log",
      "Status reports a device sent, in its order (also those sent after being offline)");
  status_log->add_option("ID", *log_id, "Device id")->required();
  status_log->add_option("--limit", *limit, "How many of the newest reports (1-500)")
      ->capture_default_str();
  status_log->callback([&options, &exit_code, log_id, limit] {
    Session session(options);
    auto result = session.fetch(
        "/api/v1/devices/" + url_encode(*log_id) + "/status-log?limit=" + std::to_string(*limit),
        exit_code);
    if (!result) return;
    Table table({"SEQ", "AT (DEVICE)", "RECEIVED", "GEN", "DEPLOYMENTS"});
    for (const auto& r : (*result)["reports"]) {
      const auto& st = r["status"];
      std::string deployments;
      for (const auto& d : st.value("deployments", nlohmann::json::array())) {
        deployments += (deployments.empty() ? "" : "; ") + d.value("name", "") + " r" +
                       std::to_string(d.value("revision", 0)) + " " + d.value("phase", "");
      }
      table.add({std::to_string(r.value("seq", 0)),
                 format_iso8601(st.value("at", static_cast<int64_t>(0))),
                 format_iso8601(r.value("received_at", static_cast<int64_t>(0))),
                 std::to_string(st.value("generation", 0)), deployments});
    }
    std::cout << table.render();
    if (table.empty()) std::cerr << "no status reports from " << *log_id << " yet\n";
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

  auto revoke_id = std::make_shared<std::string>();
  auto* revoke = device->add_subcommand(
      "revoke", "Refuse a device's credential from now on (a lost, stolen or retired device)");
  revoke->add_option("ID", *revoke_id, "Device id")->required();
  revoke->footer(
      "The device's next call is refused (its held long-poll too), whatever key or credential\n"
      "it presents; the device keeps running what it has, offline. Its history stays. To bring\n"
      "it back, wipe its data directory and enroll it again with a new token.\n"
      "Example: outpost device revoke d-1a2b3c4d");
  revoke->callback([&options, &exit_code, revoke_id] {
    Session session(options);
    auto result =
        session.perform("POST", "/api/v1/devices/" + url_encode(*revoke_id) + "/revoke", exit_code);
    if (result) {
      std::cout << "device " << *revoke_id << " revoked at "
                << format_iso8601((*result)["revoked_at"].get<int64_t>()) << "\n";
    }
  });
}

}  // namespace outpost::cli
