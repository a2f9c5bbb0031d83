#include "server/rollouts/controller.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>

#include <spdlog/spdlog.h>

#include "common/json_fields.h"
#include "server/deployments/manifest.h"
#include "server/desired_states.h"
#include "server/rollouts/plan.h"
#include "server/scheduler/selector.h"

namespace outpost::rollouts {
namespace {

using json = nlohmann::json;
using deployments::Manifest;

constexpr const char* kControllerActor = "rollouts-controller";
constexpr size_t kHistoryKept = 200;

using json_fields::parse_object_or_empty;

int64_t int_at(const json& obj, const char* key, int64_t fallback = 0) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_number_integer() ? it->get<int64_t>() : fallback;
}

std::string text_at(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string();
}

void add_history(json& doc, int64_t now, const std::string& event) {
  json& h = doc["history"];
  if (!h.is_array()) h = json::array();
  h.push_back({{"at", now}, {"event", event}});
  if (h.size() > kHistoryKept) h.erase(h.begin());
}

std::string window_text(const Manifest::Window& w) {
  auto two = [](int v) { return (v < 10 ? "0" : "") + std::to_string(v); };
  return two(w.start_minute / 60) + ":" + two(w.start_minute % 60) + "-" + two(w.end_minute / 60) +
         ":" + two(w.end_minute % 60);
}

Result<Manifest> load_manifest(store::Store& store, const std::string& name, int64_t revision) {
  auto revisions = store.list_deployment_revisions(name);
  if (!revisions) return make_error(revisions.error());
  for (const auto& r : *revisions) {
    if (r.revision != revision) continue;
    json doc = json::parse(r.manifest_json, nullptr, false);
    if (doc.is_discarded()) {
      return make_error(Errc::kInternal, "stored manifest of " + name + " revision " +
                                             std::to_string(revision) + " is not JSON");
    }
    auto m = deployments::validate_manifest(doc);
    if (!m) return make_error(m.error().with_context("stored deployment " + name));
    return std::move(*m);
  }
  return make_error(Errc::kNotFound,
                    "deployment " + name + " has no revision " + std::to_string(revision));
}

// What a device last said about the deployment, read once per step.
struct DeviceInfo {
  const store::Device* device = nullptr;
  bool reported = false;  // it reported an entry for the new revision
  std::string phase;      // that entry's phase
  std::string message;
  int64_t current_revision = 0;  // what it actually runs
  int64_t restarts = 0;          // restarts of the revision it runs
  bool unschedulable = false;    // the scheduler found no variant of the new revision for it
  std::string unschedulable_reason;
  int64_t heard_at = 0;  // last contact: a sync or a report
};

DeviceInfo device_info(const store::Device& d, const std::string& name, int64_t to) {
  DeviceInfo info;
  info.device = &d;
  info.heard_at = std::max(d.last_seen, d.status_at);
  const json schedule = parse_object_or_empty(d.schedule_json);
  if (auto s = schedule.find("deployments"); s != schedule.end() && s->is_object()) {
    if (auto e = s->find(name); e != s->end() && e->is_object() &&
                                text_at(*e, "state") == "unschedulable" &&
                                int_at(*e, "revision") == to) {
      info.unschedulable = true;
      info.unschedulable_reason = text_at(*e, "reason");
    }
  }
  const json status = parse_object_or_empty(d.status_json);
  if (auto list = status.find("deployments"); list != status.end() && list->is_array()) {
    for (const auto& e : *list) {
      if (!e.is_object() || text_at(e, "name") != name || int_at(e, "revision") != to) continue;
      info.reported = true;
      info.phase = text_at(e, "phase");
      info.message = text_at(e, "message");
      info.current_revision = int_at(e, "current_revision");
      info.restarts = int_at(e, "revision_restarts", int_at(e, "restarts"));
    }
  }
  return info;
}

struct View {
  size_t index = 0;
  int wave = 0;
  std::string id;
  std::string site;
  int64_t prev = 0;
  int64_t at = 0;
  std::string phase;  // pending held updating healthy failed deferred unschedulable gone
  std::string message;
  int64_t restarts = 0;
  bool cordoned = false;
};

bool settled(const View& v) {
  return v.phase == "healthy" || v.phase == "deferred" || v.phase == "unschedulable" ||
         v.phase == "gone" || (v.phase == "held" && v.cordoned);
}

// Everything a step or a status needs, loaded once.
struct Snapshot {
  store::Deployment deployment;
  Manifest manifest;  // of the rollout's target revision
  std::vector<store::Device> device_rows;
  std::map<std::string, DeviceInfo> info;
  std::map<std::string, std::string> zones;  // site -> time zone
  int64_t grace_ms = 0;
};

int wave_of(const json& waves, size_t index) {
  for (size_t w = 0; w < waves.size(); ++w) {
    if (static_cast<int64_t>(index) < waves[w].get<int64_t>()) return static_cast<int>(w);
  }
  return static_cast<int>(waves.size()) - 1;
}

std::vector<View> compute_views(const json& doc, const Snapshot& s, int64_t now) {
  std::vector<View> out;
  const json& waves = doc["waves"];
  const int current = static_cast<int>(int_at(doc, "wave"));
  const auto& window = s.manifest.rollout.window;
  std::map<std::string, bool> open;  // per site, while this runs
  auto window_open = [&](const std::string& site, std::string* why) {
    if (!window) return true;
    auto it = open.find(site);
    if (it == open.end()) {
      auto zone = s.zones.find(site);
      const std::string tz = zone == s.zones.end() ? "UTC" : zone->second;
      auto minute = local_minute_of_day(tz, now);
      it = open.emplace(site, minute ? window->contains(*minute) : true).first;
    }
    if (!it->second && why) {
      auto zone = s.zones.find(site);
      *why = "outside the maintenance window " + window_text(*window) + " (" +
             (zone == s.zones.end() ? std::string("UTC") : zone->second) + ")";
    }
    return it->second;
  };
  const json& devices = doc["devices"];
  out.reserve(devices.size());
  for (size_t i = 0; i < devices.size(); ++i) {
    const json& d = devices[i];
    View v;
    v.index = i;
    v.wave = wave_of(waves, i);
    v.id = text_at(d, "id");
    v.site = text_at(d, "site");
    v.prev = int_at(d, "prev");
    v.at = int_at(d, "at");
    if (auto fin = d.find("final"); fin != d.end() && fin->is_object()) {
      // Rolled back: what the device did in this rollout, not what it runs since.
      v.phase = text_at(*fin, "phase");
      v.message = text_at(*fin, "message");
      out.push_back(std::move(v));
      continue;
    }
    auto found = s.info.find(v.id);
    if (found == s.info.end()) {
      v.phase = "gone";
      v.message = "device no longer enrolled";
      out.push_back(std::move(v));
      continue;
    }
    const DeviceInfo& info = found->second;
    v.cordoned = info.device->cordoned;
    if (v.at == 0) {
      if (v.cordoned) {
        v.phase = "held";
        v.message = "cordoned: keeps revision " + std::to_string(v.prev);
      } else if (v.wave <= current && !window_open(v.site, &v.message)) {
        v.phase = "held";
      } else {
        v.phase = "pending";
      }
      out.push_back(std::move(v));
      continue;
    }
    if (info.unschedulable) {
      v.phase = "unschedulable";
      v.message = info.unschedulable_reason;
    } else if (info.reported) {
      v.message = info.message;
      v.restarts = info.restarts;
      const int64_t target = int_at(doc, "to_revision");
      if ((info.phase == "running" || info.phase == "completed") &&
          info.current_revision == target) {
        v.phase = "healthy";
      } else if (info.phase == "rolled-back" ||
                 (info.phase == "failed" && info.current_revision == target)) {
        v.phase = "failed";
      } else {
        v.phase = "updating";
      }
    } else {
      v.phase = "updating";
    }
    if (v.phase == "updating" && now - v.at >= s.grace_ms && info.heard_at < v.at) {
      v.phase = "deferred";
      v.message =
          "offline: not heard from since it was given the revision; updated when it "
          "returns";
    }
    out.push_back(std::move(v));
  }
  return out;
}

// Telemetry of the deployment since `since`, split into the new revision and all others.
struct Side {
  double requests = 0;  // served (failed ones included)
  double errors = 0;
  double fallbacks = 0;
  store::TelemetryStats latency;
  store::TelemetryStats confidence;
};

Result<std::pair<Side, Side>> read_sides(store::Store& store, const std::string& name, int64_t to,
                                         int64_t since, int64_t now, const Manifest::Gates& g) {
  Side fresh, old;
  const std::string mine = std::to_string(to);
  auto query = [&](const char* metric, auto&& take) -> Status {
    store::TelemetryQuery q;
    q.metric = metric;
    q.deployment = name;
    q.since_ms = since;
    q.until_ms = std::max(now, since) + 1;
    q.step_ms = q.until_ms - q.since_ms;
    q.by = "revision";
    auto r = store.query_telemetry(q);
    if (!r) return make_error(r.error().with_context(std::string("reading ") + metric));
    for (const auto& series : r->series) take(series.group == mine ? fresh : old, series.total);
    return ok();
  };
  OUTPOST_TRY(query("inference_requests",
                    [](Side& side, const store::TelemetryStats& t) { side.requests += t.sum; }));
  // inference_requests counts every request the version served, failed ones included.
  OUTPOST_TRY(query("inference_errors",
                    [](Side& side, const store::TelemetryStats& t) { side.errors += t.sum; }));
  if (g.max_fallback_rate) {
    OUTPOST_TRY(query("inference_fallbacks",
                      [](Side& side, const store::TelemetryStats& t) { side.fallbacks += t.sum; }));
  }
  if (g.max_p95_latency_ms) {
    OUTPOST_TRY(query("inference_latency_seconds",
                      [](Side& side, const store::TelemetryStats& t) { side.latency.merge(t); }));
  }
  if (g.max_confidence_shift) {
    OUTPOST_TRY(query("inference_confidence", [](Side& side, const store::TelemetryStats& t) {
      side.confidence.merge(t);
    }));
  }
  return std::make_pair(fresh, old);
}

struct GateReport {
  json results = json::array();
  std::optional<json> breach;  // the first gate that broke: name, limit, value, baseline
};

void add_gate(GateReport& report, const std::string& name, double limit,
              std::optional<double> value, std::optional<double> baseline, bool broken,
              const std::string& note) {
  json g = {{"name", name}, {"limit", limit}};
  g["value"] = value ? json(*value) : json(nullptr);
  g["baseline"] = baseline ? json(*baseline) : json(nullptr);
  g["state"] = broken ? "breached" : (value ? "ok" : "waiting for data");
  if (!note.empty()) g["note"] = note;
  if (broken && !report.breach) report.breach = g;
  report.results.push_back(std::move(g));
}

// Gates read from the devices' reports: failed devices and restarts.
GateReport device_gates(const std::vector<View>& views, const Manifest::Gates& g,
                        int64_t failures_accepted) {
  GateReport report;
  int64_t failed = 0;
  int64_t restarts = 0;
  std::vector<std::string> failed_ids;
  for (const auto& v : views) {
    if (v.phase == "failed") {
      ++failed;
      if (failed_ids.size() < 10) failed_ids.push_back(v.id + ": " + v.message);
    }
    if (v.at > 0) restarts = std::max(restarts, v.restarts);
  }
  const int64_t counted = std::max<int64_t>(failed - failures_accepted, 0);
  std::string note;
  for (const auto& f : failed_ids) note += (note.empty() ? "" : "; ") + f;
  add_gate(report, "max_failed_devices", static_cast<double>(g.max_failed_devices),
           static_cast<double>(counted), std::nullopt, counted > g.max_failed_devices, note);
  if (g.max_restarts) {
    add_gate(report, "max_restarts", static_cast<double>(*g.max_restarts),
             static_cast<double>(restarts), std::nullopt, restarts > *g.max_restarts,
             "most restarts of the new revision on one device");
  }
  return report;
}

void telemetry_gates(GateReport& report, const Side& fresh, const Side& old,
                     const Manifest::Gates& g) {
  const bool enough = fresh.requests >= static_cast<double>(g.min_requests) && fresh.requests > 0;
  const std::string waiting = enough
                                  ? ""
                                  : std::to_string(static_cast<int64_t>(fresh.requests)) + " of " +
                                        std::to_string(g.min_requests) + " requests needed";
  auto rate = [&](const char* name, std::optional<double> limit, double num_new, double num_old) {
    if (!limit) return;
    std::optional<double> value, baseline;
    if (enough) value = num_new / fresh.requests;
    if (old.requests > 0) baseline = num_old / old.requests;
    const bool broken = value && *value > *limit && (!baseline || *value > *baseline);
    add_gate(report, name, *limit, value, baseline, broken, waiting);
  };
  rate("max_error_rate", g.max_error_rate, fresh.errors, old.errors);
  rate("max_fallback_rate", g.max_fallback_rate, fresh.fallbacks, old.fallbacks);
  if (g.max_p95_latency_ms) {
    std::optional<double> value, baseline;
    if (enough && fresh.latency.count > 0) value = fresh.latency.quantile(0.95) * 1000;
    if (old.latency.count > 0) baseline = old.latency.quantile(0.95) * 1000;
    const bool broken =
        value && *value > *g.max_p95_latency_ms && (!baseline || *value > *baseline);
    add_gate(report, "max_p95_latency_ms", *g.max_p95_latency_ms, value, baseline, broken, waiting);
  }
  if (g.max_confidence_shift) {
    std::optional<double> value, baseline;
    std::string note = waiting;
    if (old.confidence.count > 0) baseline = old.confidence.mean();
    if (enough && fresh.confidence.count > 0 && baseline) {
      value = std::abs(fresh.confidence.mean() - *baseline);
    } else if (enough && !baseline) {
      note = "no devices on the old revision to compare with";
    }
    add_gate(report, "max_confidence_shift", *g.max_confidence_shift, value, baseline,
             value && *value > *g.max_confidence_shift, note);
  }
}

bool has_telemetry_gates(const Manifest::Gates& g) {
  return g.max_error_rate || g.max_p95_latency_ms || g.max_fallback_rate || g.max_confidence_shift;
}

std::string breach_text(const json& b) {
  auto num = [](const json& v) {
    if (!v.is_number()) return std::string("-");
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.4g", v.get<double>());
    return std::string(buf);
  };
  std::string text = "gate " + b.value("name", std::string()) + " breached: " + num(b["value"]) +
                     " over the limit " + num(b["limit"]);
  if (b["baseline"].is_number()) text += " (old revision: " + num(b["baseline"]) + ")";
  if (b.contains("note")) text += "; " + b["note"].get<std::string>();
  return text;
}

}  // namespace

RolloutController::RolloutController(store::Store& store, server::DesiredStateUpdater& desired,
                                     const Clock& clock, ControllerOptions options)
    : store_(store), desired_(desired), clock_(clock), options_(options) {}

void RolloutController::audit(const std::string& actor, const std::string& action,
                              const std::string& deployment, const json& details) {
  auto entry = store_.append_audit(actor, action, "deployment/" + deployment, details.dump(),
                                   clock_.now_ms());
  if (!entry) spdlog::error("audit of {} {}: {}", action, deployment, entry.error().message);
}

namespace {

Result<Snapshot> load_snapshot(store::Store& store, const store::Rollout& r,
                               const ControllerOptions& options) {
  Snapshot s;
  auto d = store.get_deployment(r.deployment);
  if (!d) return make_error(d.error());
  if (*d) {
    s.deployment = **d;
  } else {
    s.deployment.name = r.deployment;
    s.deployment.revision = r.to_revision;
  }
  auto m = load_manifest(store, r.deployment, r.to_revision);
  if (!m) return make_error(m.error());
  s.manifest = std::move(*m);
  s.grace_ms = s.manifest.rollout.offline_grace_ms.value_or(options.default_offline_grace_ms);
  auto devices = store.list_devices({});
  if (!devices) return make_error(devices.error());
  s.device_rows = std::move(*devices);
  for (const auto& dev : s.device_rows) {
    s.info.emplace(dev.id, device_info(dev, r.deployment, r.to_revision));
  }
  if (s.manifest.rollout.window) {
    auto sites = store.list_sites();
    if (!sites) return make_error(sites.error());
    for (const auto& site : *sites) s.zones[site.name] = site.timezone;
  }
  return s;
}

}  // namespace

Result<int64_t> RolloutController::start(const std::string& deployment, int64_t previous_revision,
                                         const std::string& actor, const std::string& kind,
                                         bool first_step) {
  std::lock_guard lock(mu_);
  return start_locked(deployment, previous_revision, actor, kind, first_step);
}

Result<int64_t> RolloutController::start_locked(const std::string& deployment,
                                                int64_t previous_revision, const std::string& actor,
                                                const std::string& kind, bool first_step) {
  auto found = store_.get_deployment(deployment);
  if (!found) return make_error(found.error());
  if (!*found) return make_error(Errc::kNotFound, "deployment " + deployment + " does not exist");
  const store::Deployment d = **found;
  if (d.revision == d.stable_revision) {
    // A first revision: nothing runs that could be compared with or gone back to.
    auto summary = desired_.reconcile_all();
    if (!summary) return make_error(summary.error().with_context("scheduling devices"));
    return int64_t{0};
  }
  auto manifest = load_manifest(store_, deployment, d.revision);
  if (!manifest) return make_error(manifest.error());
  auto devices = store_.list_devices({});
  if (!devices) return make_error(devices.error());
  auto assigned = store_.list_revision_assignments(deployment);
  if (!assigned) return make_error(assigned.error());
  std::map<std::string, int64_t> current;
  for (const auto& a : *assigned) current[a.device_id] = a.revision;
  std::vector<PlannedDevice> targets;
  for (const auto& dev : *devices) {
    if (scheduler::selector_matches(manifest->selector, dev)) targets.push_back({dev.id, dev.site});
  }
  const auto ordered = order_devices(deployment, std::move(targets));
  const int64_t n = static_cast<int64_t>(ordered.size());
  const int64_t now = clock_.now_ms();
  json doc = {{"kind", kind},
              {"to_revision", d.revision},
              {"previous_target", previous_revision},
              {"waves", wave_sizes(manifest->rollout.waves, n)},
              {"wave", 0},
              {"max_unavailable", max_unavailable_count(manifest->rollout.max_unavailable, n)},
              {"wave_started_at", now},
              {"wave_settled_at", 0},
              {"gates_since", now},
              {"gates_at", 0},
              {"failures_accepted", 0},
              {"gates", json::array()},
              {"wave_times", json::array()},
              {"history", json::array()}};
  json list = json::array();
  for (const auto& p : ordered) {
    auto it = current.find(p.id);
    list.push_back({{"id", p.id},
                    {"site", p.site},
                    {"prev", it == current.end() ? d.stable_revision : it->second},
                    {"at", 0}});
  }
  doc["devices"] = std::move(list);
  std::string waves_text;
  for (const auto& w : doc["waves"]) waves_text += (waves_text.empty() ? "" : ", ") + w.dump();
  add_history(doc, now,
              std::string(kind == "undo" ? "undo" : "started") + ": revision " +
                  std::to_string(d.stable_revision) + " -> " + std::to_string(d.revision) + ", " +
                  std::to_string(n) + " devices in waves of " + waves_text + " (cumulative)");
  store::Rollout r;
  r.deployment = deployment;
  r.from_revision = d.stable_revision;
  r.to_revision = d.revision;
  r.state = "running";
  r.doc_json = doc.dump();
  r.created_at = r.updated_at = now;
  r.created_by = actor;
  auto id = store_.create_rollout(r);
  if (!id) return make_error(id.error());
  r.id = *id;
  audit(actor, kind == "undo" ? "rollout.undo" : "rollout.start", deployment,
        {{"rollout", r.id},
         {"from_revision", r.from_revision},
         {"to_revision", r.to_revision},
         {"devices", n}});
  spdlog::info("rollout {} of {}: revision {} -> {} over {} devices", r.id, deployment,
               r.from_revision, r.to_revision, n);
  if (first_step) {
    bool done = false;
    OUTPOST_TRY(step_locked(r, &done));
  }
  return r.id;
}

Status RolloutController::tick() {
  std::lock_guard lock(mu_);
  auto active = store_.list_rollouts("", true, 1'000);
  if (!active) return make_error(active.error());
  Status result = ok();
  for (auto& r : *active) {
    if (r.state != "running") continue;
    bool done = false;
    if (auto stepped = step_locked(r, &done); !stepped) {
      spdlog::warn("rollout {} of {}: {}", r.id, r.deployment, stepped.error().message);
      result = stepped;
    }
  }
  return result;
}

Status RolloutController::step_locked(store::Rollout& r, bool* finished) {
  *finished = false;
  if (r.state != "running") return ok();
  auto loaded = load_snapshot(store_, r, options_);
  if (!loaded) return make_error(loaded.error().with_context("rollout of " + r.deployment));
  Snapshot& s = *loaded;
  json doc = parse_object_or_empty(r.doc_json);
  const json before = doc;
  const int64_t now = clock_.now_ms();
  const Manifest::Gates& gates = s.manifest.rollout.gates;
  store::RolloutUpdate update;
  std::vector<std::string> touched;  // devices whose desired state must be recomputed
  bool reconcile_everything = false;

  auto finish = [&](const std::string& state) {
    r.state = state;
    doc["finished_at"] = now;
    *finished = true;
  };
  auto fail = [&](const json& breach, const std::vector<View>& views) {
    const std::string why = breach_text(breach);
    doc["breach"] = breach;
    doc["reason"] = why;
    if (s.manifest.rollout.on_failure == Manifest::OnFailure::kPause) {
      r.state = "paused";
      add_history(doc, now, "paused: " + why);
      audit(kControllerActor, "rollout.pause", r.deployment,
            {{"rollout", r.id}, {"revision", r.to_revision}, {"gate", breach}});
      spdlog::warn("rollout {} of {} paused: {}", r.id, r.deployment, why);
      return;
    }
    for (const auto& v : views) {
      if (v.at == 0 || v.phase == "gone") continue;
      // Kept for `rollout status`: once back on their revision, the devices no longer report
      // the new one, and the rollout would show them as updating.
      doc["devices"][v.index]["final"] = {
          {"phase", v.phase},
          {"message", v.phase == "deferred" ? "offline: gets revision " + std::to_string(v.prev) +
                                                  " back when it returns"
                                            : v.message}};
      if (v.prev == s.deployment.stable_revision) {
        update.unassign.push_back(v.id);
      } else {
        update.assign.emplace_back(v.id, v.prev);
      }
      touched.push_back(v.id);
    }
    const int64_t back_to = int_at(doc, "previous_target", r.from_revision);
    if (back_to != s.deployment.revision && back_to > 0) update.reset_to_revision = back_to;
    update.mark_bad = std::make_pair(r.to_revision, why);
    finish("rolled_back");
    add_history(doc, now,
                "rolled back: " + why + "; " + std::to_string(touched.size()) +
                    " devices return to the revision they had");
    audit(kControllerActor, "rollout.rollback", r.deployment,
          {{"rollout", r.id},
           {"revision", r.to_revision},
           {"back_to", back_to},
           {"gate", breach},
           {"devices", touched.size()}});
    spdlog::warn("rollout {} of {}: revision {} rolled back: {}", r.id, r.deployment, r.to_revision,
                 why);
  };

  const json& waves = doc["waves"];
  std::vector<View> views = compute_views(doc, s, now);
  // Gates first: a breach stops the rollout before anyone else gets the revision.
  auto evaluate = [&](bool force_telemetry) -> std::optional<json> {
    GateReport report = device_gates(views, gates, int_at(doc, "failures_accepted"));
    const bool due = force_telemetry || now - int_at(doc, "gates_at") >= options_.gate_interval_ms;
    if (has_telemetry_gates(gates)) {
      if (due) {
        auto sides =
            read_sides(store_, r.deployment, r.to_revision, int_at(doc, "gates_since"), now, gates);
        if (sides) {
          telemetry_gates(report, sides->first, sides->second, gates);
          doc["gates_at"] = now;
        } else {
          spdlog::warn("rollout {} of {}: {}", r.id, r.deployment, sides.error().message);
        }
      } else {
        // Keep the last telemetry readings; the device gates are fresh.
        for (const auto& g : doc["gates"]) {
          const std::string name = g.value("name", std::string());
          if (name == "max_failed_devices" || name == "max_restarts") continue;
          report.results.push_back(g);
          if (!report.breach && g.value("state", std::string()) == "breached") report.breach = g;
        }
      }
    }
    doc["gates"] = report.results;
    return report.breach;
  };

  if (auto breach = evaluate(false)) {
    fail(*breach, views);
  } else if (waves.empty()) {
    finish("completed");
  } else {
    const int64_t max_unavailable = int_at(doc, "max_unavailable", 1);
    while (true) {
      const int w = static_cast<int>(int_at(doc, "wave"));
      const int64_t target = waves[w].get<int64_t>();
      int64_t busy = 0;
      for (const auto& v : views) {
        if (v.phase == "updating" && !doc["devices"][v.index].value("off", false)) ++busy;
      }
      int64_t slots = max_unavailable - busy;
      bool all_settled = true;
      for (auto& v : views) {
        if (static_cast<int64_t>(v.index) >= target) break;
        if (v.phase == "pending") {
          const DeviceInfo& info = s.info.at(v.id);
          const bool offline = now - info.heard_at > options_.online_window_ms;
          if (offline || slots > 0) {
            if (!offline) --slots;
            json& entry = doc["devices"][v.index];
            entry["at"] = now;
            if (offline) entry["off"] = true;
            v.at = now;
            v.phase = "updating";
            update.assign.emplace_back(v.id, r.to_revision);
            touched.push_back(v.id);
          }
        }
        if (!settled(v)) all_settled = false;
      }
      if (!all_settled) break;
      if (int_at(doc, "wave_settled_at") == 0) {
        doc["wave_settled_at"] = now;
        add_history(
            doc, now,
            "wave " + std::to_string(w + 1) + " settled (" + std::to_string(target) + " devices)" +
                (s.manifest.rollout.bake_ms > 0
                     ? "; baking for " + deployments::format_duration(s.manifest.rollout.bake_ms)
                     : ""));
      }
      if (now < int_at(doc, "wave_settled_at") + s.manifest.rollout.bake_ms) break;
      // Baked: the gates are read once more, fresh, before the next wave.
      if (has_telemetry_gates(gates) || gates.max_restarts) {
        if (auto late = evaluate(true)) {
          fail(*late, views);
          break;
        }
      }
      doc["wave_times"].push_back(now - int_at(doc, "wave_started_at"));
      if (w + 1 >= static_cast<int>(waves.size())) {
        finish("completed");
        break;
      }
      doc["wave"] = w + 1;
      doc["wave_started_at"] = now;
      doc["wave_settled_at"] = 0;
      add_history(doc, now,
                  "wave " + std::to_string(w + 2) + " started (" +
                      std::to_string(waves[w + 1].get<int64_t>()) + " devices in all)");
      views = compute_views(doc, s, now);
    }
  }

  if (r.state == "completed") {
    // Everyone not held back now runs the new revision as the stable one.
    update.clear_assignments = true;
    update.assign.clear();
    for (const auto& v : views) {
      if (v.at == 0 && v.cordoned && v.prev != r.to_revision)
        update.assign.emplace_back(v.id, v.prev);
    }
    update.stable_revision = r.to_revision;
    reconcile_everything = true;
    int64_t deferred = 0;
    for (const auto& v : views) deferred += v.phase == "deferred" ? 1 : 0;
    add_history(doc, now,
                "completed: revision " + std::to_string(r.to_revision) + " is stable" +
                    (deferred > 0 ? "; " + std::to_string(deferred) +
                                        " deferred devices get it when they return"
                                  : ""));
    audit(kControllerActor, "rollout.complete", r.deployment,
          {{"rollout", r.id}, {"revision", r.to_revision}, {"deferred", deferred}});
    spdlog::info("rollout {} of {}: revision {} completed", r.id, r.deployment, r.to_revision);
  }

  const bool changed =
      doc != before || r.state != "running" || !update.assign.empty() || !update.unassign.empty();
  if (!changed) return ok();
  r.doc_json = doc.dump();
  r.updated_at = now;
  update.rollout = r;
  OUTPOST_TRY(store_.update_rollout(update));
  if (reconcile_everything) {
    auto summary = desired_.reconcile_all();
    if (!summary) return make_error(summary.error().with_context("scheduling devices"));
  } else if (!touched.empty()) {
    std::sort(touched.begin(), touched.end());
    std::vector<store::Device> rows;
    for (const auto& dev : s.device_rows) {
      if (std::binary_search(touched.begin(), touched.end(), dev.id)) rows.push_back(dev);
    }
    auto summary = desired_.reconcile_devices(rows);
    if (!summary) return make_error(summary.error().with_context("scheduling devices"));
  }
  return ok();
}

Result<store::Rollout> RolloutController::newest_locked(const std::string& deployment) {
  auto list = store_.list_rollouts(deployment, false, 1);
  if (!list) return make_error(list.error());
  if (list->empty()) {
    return make_error(Errc::kNotFound, "deployment " + deployment +
                                           " has no rollout (a first revision runs at once)");
  }
  return list->front();
}

Result<json> RolloutController::status(const std::string& deployment) {
  std::lock_guard lock(mu_);
  return status_locked(deployment);
}

Result<json> RolloutController::status_locked(const std::string& deployment) {
  auto r = newest_locked(deployment);
  if (!r) return make_error(r.error());
  auto loaded = load_snapshot(store_, *r, options_);
  if (!loaded) return make_error(loaded.error());
  const json doc = parse_object_or_empty(r->doc_json);
  const int64_t now = clock_.now_ms();
  const std::vector<View> views = compute_views(doc, *loaded, now);
  const json& waves = doc["waves"];
  const int current = static_cast<int>(int_at(doc, "wave"));
  json out = {{"deployment", deployment},
              {"id", r->id},
              {"state", r->state},
              {"kind", doc.value("kind", std::string("apply"))},
              {"from_revision", r->from_revision},
              {"to_revision", r->to_revision},
              {"created_at", r->created_at},
              {"created_by", r->created_by},
              {"updated_at", r->updated_at},
              {"devices", views.size()},
              {"max_unavailable", int_at(doc, "max_unavailable", 1)},
              {"wave", current + 1},
              {"reason", doc.value("reason", std::string())},
              {"gates", doc.value("gates", json::array())},
              {"history", doc.value("history", json::array())}};
  if (doc.contains("breach")) out["breach"] = doc["breach"];
  if (doc.contains("finished_at")) out["finished_at"] = doc["finished_at"];
  const int64_t bake = loaded->manifest.rollout.bake_ms;
  json wave_list = json::array();
  int64_t lower = 0;
  for (size_t w = 0; w < waves.size(); ++w) {
    const int64_t upper = waves[w].get<int64_t>();
    json counts = json::object();
    for (const char* p : {"pending", "held", "updating", "healthy", "failed", "deferred",
                          "unschedulable", "gone"}) {
      counts[p] = 0;
    }
    for (const auto& v : views) {
      if (v.wave == static_cast<int>(w)) counts[v.phase] = counts[v.phase].get<int64_t>() + 1;
    }
    std::string state = static_cast<int>(w) < current ? "done"
                        : static_cast<int>(w) == current
                            ? (r->state == "completed" ? "done"
                               : r->state != "running" ? r->state  // paused, rolled_back, aborted
                               : int_at(doc, "wave_settled_at") > 0 ? "baking"
                                                                    : "active")
                            : "waiting";
    json entry = {{"wave", w + 1},
                  {"devices", upper - lower},
                  {"upto", upper},
                  {"state", state},
                  {"counts", counts}};
    if (static_cast<int>(w) == current && int_at(doc, "wave_settled_at") > 0 && bake > 0) {
      entry["bake_until"] = int_at(doc, "wave_settled_at") + bake;
    }
    wave_list.push_back(std::move(entry));
    lower = upper;
  }
  out["waves"] = std::move(wave_list);
  json deferred = json::array(), held = json::array(), failed = json::array();
  json counts = json::object();
  for (const auto& v : views) {
    counts[v.phase] = counts.value(v.phase, int64_t{0}) + 1;
    json item = {{"device", v.id}, {"site", v.site}, {"wave", v.wave + 1}, {"message", v.message}};
    if (v.phase == "deferred") deferred.push_back(item);
    if (v.phase == "held") held.push_back(item);
    if (v.phase == "failed") failed.push_back(item);
  }
  out["counts"] = std::move(counts);
  out["deferred"] = std::move(deferred);
  out["held"] = std::move(held);
  out["failed"] = std::move(failed);
  if (r->state == "running" && !waves.empty()) {
    // A rough estimate: the rest of this wave (its bake at least), then the waves after it at
    // the mean time a wave took so far (or this one so far), each at least its bake.
    const int64_t elapsed = now - int_at(doc, "wave_started_at");
    int64_t per_wave = elapsed;
    const json& times = doc["wave_times"];
    if (times.is_array() && !times.empty()) {
      int64_t sum = 0;
      for (const auto& t : times) sum += t.get<int64_t>();
      per_wave = std::max<int64_t>(sum / static_cast<int64_t>(times.size()), per_wave);
    }
    per_wave = std::max(per_wave, bake);
    const int64_t settled_at = int_at(doc, "wave_settled_at");
    const int64_t this_wave = settled_at > 0 ? std::max<int64_t>(settled_at + bake - now, 0)
                                             : std::max(per_wave - elapsed, bake);
    const int64_t after = static_cast<int64_t>(waves.size()) - current - 1;
    out["eta_ms"] = now + this_wave + after * per_wave;
  }
  return out;
}

Result<json> RolloutController::pause(const std::string& deployment, const std::string& actor) {
  std::lock_guard lock(mu_);
  auto r = newest_locked(deployment);
  if (!r) return make_error(r.error());
  if (r->state != "running") {
    return make_error(Errc::kFailedPrecondition, "rollout " + std::to_string(r->id) + " of " +
                                                     deployment + " is " + r->state +
                                                     ", not running");
  }
  json doc = parse_object_or_empty(r->doc_json);
  add_history(doc, clock_.now_ms(), "paused by " + actor);
  doc["reason"] = "paused by " + actor;
  store::RolloutUpdate u;
  r->state = "paused";
  r->doc_json = doc.dump();
  r->updated_at = clock_.now_ms();
  u.rollout = *r;
  OUTPOST_TRY(store_.update_rollout(u));
  audit(actor, "rollout.pause", deployment, {{"rollout", r->id}, {"revision", r->to_revision}});
  return status_locked(deployment);
}

Result<json> RolloutController::resume(const std::string& deployment, const std::string& actor) {
  std::lock_guard lock(mu_);
  auto r = newest_locked(deployment);
  if (!r) return make_error(r.error());
  if (r->state != "paused") {
    return make_error(Errc::kFailedPrecondition, "rollout " + std::to_string(r->id) + " of " +
                                                     deployment + " is " + r->state +
                                                     ", not paused");
  }
  auto loaded = load_snapshot(store_, *r, options_);
  if (!loaded) return make_error(loaded.error());
  json doc = parse_object_or_empty(r->doc_json);
  const int64_t now = clock_.now_ms();
  // The operator has seen what broke: gates read only what happens from now on, and the
  // devices that failed so far are accepted.
  int64_t failed = 0;
  for (const auto& v : compute_views(doc, *loaded, now)) failed += v.phase == "failed" ? 1 : 0;
  doc["failures_accepted"] = failed;
  doc["gates_since"] = now;
  doc["gates_at"] = 0;
  doc["gates"] = json::array();
  doc.erase("breach");
  doc["reason"] = "";
  add_history(doc, now,
              "resumed by " + actor +
                  (failed > 0 ? " (" + std::to_string(failed) + " failed devices accepted)" : ""));
  r->state = "running";
  r->doc_json = doc.dump();
  r->updated_at = now;
  store::RolloutUpdate u;
  u.rollout = *r;
  OUTPOST_TRY(store_.update_rollout(u));
  audit(actor, "rollout.resume", deployment, {{"rollout", r->id}, {"revision", r->to_revision}});
  bool done = false;
  OUTPOST_TRY(step_locked(*r, &done));
  return status_locked(deployment);
}

Result<json> RolloutController::abort(const std::string& deployment, const std::string& actor) {
  std::lock_guard lock(mu_);
  auto r = newest_locked(deployment);
  if (!r) return make_error(r.error());
  if (r->state != "running" && r->state != "paused") {
    return make_error(Errc::kFailedPrecondition, "rollout " + std::to_string(r->id) + " of " +
                                                     deployment + " is " + r->state +
                                                     ": nothing to abort");
  }
  json doc = parse_object_or_empty(r->doc_json);
  const int64_t now = clock_.now_ms();
  doc["finished_at"] = now;
  doc["reason"] = "aborted by " + actor;
  add_history(doc, now,
              "aborted by " + actor + ": devices keep what they run; `rollout undo` goes back");
  r->state = "aborted";
  r->doc_json = doc.dump();
  r->updated_at = now;
  store::RolloutUpdate u;
  u.rollout = *r;
  OUTPOST_TRY(store_.update_rollout(u));
  audit(actor, "rollout.abort", deployment, {{"rollout", r->id}, {"revision", r->to_revision}});
  return status_locked(deployment);
}

Result<json> RolloutController::undo(const std::string& deployment, const std::string& actor) {
  std::lock_guard lock(mu_);
  auto r = newest_locked(deployment);
  if (!r) return make_error(r.error());
  auto d = store_.get_deployment(deployment);
  if (!d) return make_error(d.error());
  if (!*d) return make_error(Errc::kNotFound, "deployment " + deployment + " does not exist");
  auto revisions = store_.list_deployment_revisions(deployment);
  if (!revisions) return make_error(revisions.error());
  const store::DeploymentRevision* back = nullptr;
  for (const auto& rev : *revisions) {
    if (rev.revision == r->from_revision) back = &rev;
  }
  if (back == nullptr) {
    return make_error(Errc::kNotFound, "revision " + std::to_string(r->from_revision) + " of " +
                                           deployment + " is not stored");
  }
  if (back->spec_hash == (*d)->spec_hash) {
    return make_error(Errc::kFailedPrecondition, "nothing to undo: deployment " + deployment +
                                                     " is already at the spec of "
                                                     "revision " +
                                                     std::to_string(back->revision) + " (rollout " +
                                                     std::to_string(r->id) + " is " + r->state +
                                                     ")");
  }
  const int64_t previous = (*d)->revision;
  auto applied = store_.apply_deployment(deployment, back->manifest_json, back->spec_hash, actor,
                                         clock_.now_ms());
  if (!applied) return make_error(applied.error());
  auto id = start_locked(deployment, previous, actor, "undo");
  if (!id) return make_error(id.error());
  return status_locked(deployment);
}

}  // namespace outpost::rollouts
