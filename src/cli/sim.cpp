// `outpost sim`: runs a fleet of virtual devices against a control plane (src/sim/), prints live
// progress on stderr and a summary at the end (one JSON line with -o json).
#include <csignal>
#include <cstdio>
#include <iostream>

#include "agent/identity.h"
#include "cli/cli.h"
#include "common/units.h"
#include "sim/fleet.h"

namespace outpost::cli {
namespace {

std::atomic<bool> g_sim_stop{false};
void on_sim_signal(int) { g_sim_stop = true; }

struct SimFlags {
  int64_t devices = 100;
  int64_t sites = 1;
  std::string site_prefix = "sim";
  std::vector<std::string> labels;
  std::string profile = "steady";
  std::string duration = "60s";
  std::string ramp = "0s";
  std::string warmup = "0s";
  uint64_t seed = 1;
  std::string sync_interval = "0s";
  std::string long_poll = "55s";
  std::string status_period = "60s";
  std::string telemetry_interval = "60s";
  double inference_rate = 1.0;
  std::string activate = "500ms";
  std::string backoff_max = "60s";
  double drop_rate = 0.05;
  std::string latency = "20ms-400ms";
  std::string bandwidth;
  std::string day = "24h";
  int windows = 3;
  std::string window = "20m";
  std::string partition_start;
  std::string partition_length;
  std::string partition_sites = "25%";
  int threads = 1;
  size_t connections = 256;
  int source_addresses = 0;
  int enroll_parallel = 32;
  std::string enroll_token;
  std::string via;
  std::string state_file;
  std::string progress = "1s";
};

Result<int64_t> duration_flag(const std::string& flag, const std::string& text, bool allow_zero) {
  auto ms = text == "0" ? Result<int64_t>(0) : parse_duration_ms(text);
  if (!ms || *ms < 0 || (!allow_zero && *ms == 0)) {
    return make_error(Errc::kInvalidArgument,
                      flag + ": expected a duration like 30s, 5m or 250ms" +
                          (allow_zero ? "" : " (more than 0)") + ", got \"" + text + "\"",
                      flag);
  }
  return *ms;
}

Result<double> share_flag(const std::string& flag, const std::string& text) {
  std::string t = text;
  bool percent = !t.empty() && t.back() == '%';
  if (percent) t.pop_back();
  char* end = nullptr;
  const double v = std::strtod(t.c_str(), &end);
  const double share = percent ? v / 100.0 : v;
  if (t.empty() || end != t.c_str() + t.size() || share < 0 || share > 1) {
    return make_error(Errc::kInvalidArgument,
                      flag + ": expected a share like 25% or 0.25, got \"" + text + "\"", flag);
  }
  return share;
}

Result<sim::FleetOptions> to_options(const SimFlags& f, Session& session) {
  sim::FleetOptions o;
  o.server = session.server();
  o.operator_token = session.token();
  o.enroll_token = f.enroll_token;
  o.devices_via = f.via;
  o.devices = f.devices;
  o.sites = f.sites;
  o.site_prefix = f.site_prefix;
  auto labels = agent::parse_labels(f.labels);
  if (!labels) return make_error(labels.error());
  o.labels = *labels;
  auto profile = sim::parse_profile(f.profile);
  if (!profile) return make_error(profile.error());
  o.link.profile = *profile;
  o.link.seed = f.seed;
  auto set = [](Result<int64_t> r, int64_t& slot) -> Status {
    if (!r) return make_error(r.error());
    slot = *r;
    return ok();
  };
  OUTPOST_TRY(set(duration_flag("--duration", f.duration, true), o.duration_ms));
  OUTPOST_TRY(set(duration_flag("--ramp", f.ramp, true), o.ramp_ms));
  OUTPOST_TRY(set(duration_flag("--warmup", f.warmup, true), o.warmup_ms));
  OUTPOST_TRY(set(duration_flag("--sync-interval", f.sync_interval, true), o.sync_interval_ms));
  int64_t long_poll_ms = 0;
  OUTPOST_TRY(set(duration_flag("--long-poll", f.long_poll, false), long_poll_ms));
  o.long_poll_s = std::max<int64_t>(long_poll_ms / 1000, 1);
  OUTPOST_TRY(set(duration_flag("--status-period", f.status_period, false), o.status_period_ms));
  OUTPOST_TRY(set(duration_flag("--telemetry-interval", f.telemetry_interval, true),
                  o.telemetry_interval_ms));
  OUTPOST_TRY(set(duration_flag("--activate", f.activate, true), o.activate_ms));
  OUTPOST_TRY(set(duration_flag("--backoff-max", f.backoff_max, false), o.backoff_max_ms));
  if (f.inference_rate < 0) {
    return make_error(Errc::kInvalidArgument, "--inference-rate: expected 0 or more",
                      "inference-rate");
  }
  o.inference_rate = f.inference_rate;
  if (f.drop_rate < 0 || f.drop_rate > 1) {
    return make_error(Errc::kInvalidArgument, "--drop-rate: expected 0 to 1", "drop-rate");
  }
  o.link.drop_rate = f.drop_rate;
  const auto dash = f.latency.find('-');
  if (dash == std::string::npos) {
    return make_error(Errc::kInvalidArgument,
                      "--latency: expected MIN-MAX like 20ms-400ms, got \"" + f.latency + "\"",
                      "latency");
  }
  OUTPOST_TRY(
      set(duration_flag("--latency", f.latency.substr(0, dash), true), o.link.latency_min_ms));
  OUTPOST_TRY(
      set(duration_flag("--latency", f.latency.substr(dash + 1), true), o.link.latency_max_ms));
  if (!f.bandwidth.empty()) {
    auto bytes = parse_size_bytes(f.bandwidth);
    if (!bytes || *bytes <= 0) {
      return make_error(
          Errc::kInvalidArgument,
          "--bandwidth: expected bytes per second like 64K or 1M, got \"" + f.bandwidth + "\"",
          "bandwidth");
    }
    o.link.bandwidth_bytes_per_s = *bytes;
  }
  OUTPOST_TRY(set(duration_flag("--day", f.day, false), o.link.day_ms));
  if (f.windows < 1) {
    return make_error(Errc::kInvalidArgument, "--windows: expected at least 1", "windows");
  }
  o.link.windows_per_day = f.windows;
  OUTPOST_TRY(set(duration_flag("--window", f.window, false), o.link.window_ms));
  // A partition by default cuts a quarter of the sites for the second quarter of the run.
  const int64_t base = o.duration_ms > 0 ? o.duration_ms : 60'000;
  o.link.partition_start_ms = base / 4;
  o.link.partition_length_ms = base / 4;
  if (!f.partition_start.empty()) {
    OUTPOST_TRY(set(duration_flag("--partition-start", f.partition_start, true),
                    o.link.partition_start_ms));
  }
  if (!f.partition_length.empty()) {
    OUTPOST_TRY(set(duration_flag("--partition-length", f.partition_length, false),
                    o.link.partition_length_ms));
  }
  auto share = share_flag("--partition-sites", f.partition_sites);
  if (!share) return make_error(share.error());
  o.link.partition_sites = *share;
  o.threads = f.threads;
  if (f.connections < 1) {
    return make_error(Errc::kInvalidArgument, "--connections: expected at least 1", "connections");
  }
  o.connections = f.connections;
  o.source_addresses = f.source_addresses;
  o.enroll_parallel = std::max(f.enroll_parallel, 1);
  o.state_file = f.state_file;
  return o;
}

std::string running_text(const std::map<std::string, std::map<int64_t, int64_t>>& running) {
  std::string out;
  size_t shown = 0;
  for (const auto& [dep, revs] : running) {
    if (shown++ == 3) {
      out += " ...";
      break;
    }
    out += " " + dep + ":";
    bool first = true;
    for (const auto& [rev, n] : revs) {
      out += (first ? "" : ",") + std::string(" r") + std::to_string(rev) + "=" + std::to_string(n);
      first = false;
    }
  }
  return out;
}

void print_progress(const sim::Progress& p) {
  char line[256];
  std::snprintf(line, sizeof line,
                "[%5.0fs] %-9s enrolled %lld/%lld  connected %lld  converged %lld  updates %lld  "
                "requests %lld  errors %lld  faults %lld",
                static_cast<double>(p.elapsed_ms) / 1000.0, p.phase.c_str(),
                static_cast<long long>(p.enrolled), static_cast<long long>(p.devices),
                static_cast<long long>(p.connected), static_cast<long long>(p.converged),
                static_cast<long long>(p.updates), static_cast<long long>(p.requests),
                static_cast<long long>(p.errors), static_cast<long long>(p.faults));
  std::string text = line;
  if (p.sync_p99_ms > 0) {
    char lat[48];
    std::snprintf(lat, sizeof lat, "  sync p99 %.1f ms", p.sync_p99_ms);
    text += lat;
  }
  text += running_text(p.running);
  std::fprintf(stderr, "%s\n", text.c_str());
}

void print_summary(const nlohmann::json& s) {
  auto n = [&](const char* k) { return s[k].dump(); };
  std::cout << "Simulated " << n("devices") << " devices in " << n("sites") << " site(s), profile "
            << s["profile"].get<std::string>() << ", " << s["sync"].get<std::string>()
            << " sync, for " << s["run_s"].get<double>() << " s\n";
  Table t({"DEVICES", "ENROLLED", "CONVERGED", "NOT CONVERGED", "ERRORS", "FAULTS", "REQUESTS",
           "REQ/S"});
  char rps[32];
  std::snprintf(rps, sizeof rps, "%.0f", s["requests_per_s"].get<double>());
  t.add({n("devices"), n("enrolled"), n("converged"), n("not_converged"), n("errors"), n("faults"),
         n("requests"), rps});
  std::cout << t.render();
  if (!s["latency"].empty()) {
    Table l({"REQUEST", "COUNT", "P50 MS", "P90 MS", "P99 MS"});
    for (const auto& [kind, v] : s["latency"].items()) {
      char p50[32], p90[32], p99[32];
      std::snprintf(p50, sizeof p50, "%.2f", v["p50_ms"].get<double>());
      std::snprintf(p90, sizeof p90, "%.2f", v["p90_ms"].get<double>());
      std::snprintf(p99, sizeof p99, "%.2f", v["p99_ms"].get<double>());
      l.add({kind, v["count"].dump(), p50, p90, p99});
    }
    std::cout << l.render();
  }
  std::cout << "Desired states received: " << n("updates") << ", activations " << n("activations")
            << " (" << n("crashes") << " simulated crashes); status reports " << n("reports_sent")
            << "; telemetry " << n("telemetry_batches") << " batches, " << n("telemetry_records")
            << " records; " << n("wire_bytes") << " bytes on the wire; " << n("connections_opened")
            << " connections from " << n("source_addresses") << " source address(es)\n";
  for (const auto& [dep, revs] : s["running"].items()) {
    std::cout << "Running " << dep << ":";
    for (const auto& [rev, count] : revs.items())
      std::cout << " revision " << rev << " on " << count;
    std::cout << "\n";
  }
  if (!s["error_kinds"].empty()) {
    std::cout << "Errors by kind:\n";
    for (const auto& [kind, count] : s["error_kinds"].items()) {
      std::cout << "  " << count << "  " << kind << "\n";
    }
  }
}

}  // namespace

void add_sim_command(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto f = std::make_shared<SimFlags>();
  auto* sim = app.add_subcommand(
      "sim", "Fleet simulator: many virtual devices against a control plane, faults included");
  sim->add_option("--devices", f->devices, "Virtual devices")->capture_default_str();
  sim->add_option("--sites", f->sites, "Sites the devices are spread over (round-robin)")
      ->capture_default_str();
  sim->add_option("--site-prefix", f->site_prefix, "Site names: PREFIX-1, PREFIX-2, ...")
      ->capture_default_str();
  sim->add_option("--label", f->labels, "k=v label of every device (repeatable)");
  sim->add_option("--profile", f->profile,
                  "Connectivity: steady, flaky (drops and latency), offline-daily (a few windows "
                  "a day), partition (a share of the sites cut off for a while)")
      ->capture_default_str();
  sim->add_option("--duration", f->duration, "How long the devices run (0: until Ctrl-C)")
      ->capture_default_str();
  sim->add_option("--ramp", f->ramp, "Devices start spread over this long")->capture_default_str();
  sim->add_option("--warmup", f->warmup,
                  "Latencies and the measured request rate count only after this long")
      ->capture_default_str();
  sim->add_option("--seed", f->seed, "Seed of every random choice (faults, windows, timings)")
      ->capture_default_str();
  sim->add_option("--sync-interval", f->sync_interval,
                  "0: long-poll like the agent (one connection per device); else poll this "
                  "often on shared connections (fleets beyond the open-file limit)")
      ->capture_default_str();
  sim->add_option("--long-poll", f->long_poll, "How long the server may hold a poll")
      ->capture_default_str();
  sim->add_option("--status-period", f->status_period,
                  "Status report at least this often (and on every change)")
      ->capture_default_str();
  sim->add_option("--telemetry-interval", f->telemetry_interval,
                  "Telemetry batch (health, model aggregates, events) this often (0: none)")
      ->capture_default_str();
  sim->add_option("--inference-rate", f->inference_rate,
                  "Stand-in inferences per second per served model and device")
      ->capture_default_str();
  sim->add_option("--activate", f->activate,
                  "Stand-in time to fetch and start a revision (each device +-50%)")
      ->capture_default_str();
  sim->add_option("--backoff-max", f->backoff_max,
                  "Longest wait between retries after a failure (the agent's is 60s)")
      ->capture_default_str();
  sim->add_option("--drop-rate", f->drop_rate, "flaky: share of requests lost")
      ->capture_default_str();
  sim->add_option("--latency", f->latency, "flaky: delay added to each request, MIN-MAX")
      ->capture_default_str();
  sim->add_option("--bandwidth", f->bandwidth,
                  "Each device's link in bytes/s, e.g. 64K (any "
                  "profile; default no cap)");
  sim->add_option("--day", f->day, "offline-daily: length of a day (shorten it to see windows)")
      ->capture_default_str();
  sim->add_option("--windows", f->windows, "offline-daily: connected windows per day")
      ->capture_default_str();
  sim->add_option("--window", f->window, "offline-daily: length of each window")
      ->capture_default_str();
  sim->add_option("--partition-start", f->partition_start,
                  "partition: when the cut starts (default a quarter into the run)");
  sim->add_option("--partition-length", f->partition_length,
                  "partition: how long it lasts (default a quarter of the run)");
  sim->add_option("--partition-sites", f->partition_sites,
                  "partition: share of the sites cut off (100% = every device)")
      ->capture_default_str();
  sim->add_option("--threads", f->threads, "Event loops the devices are spread over")
      ->capture_default_str();
  sim->add_option("--connections", f->connections,
                  "Shared keep-alive connections per event loop (enrollment, status, "
                  "telemetry, interval polls)")
      ->capture_default_str();
  sim->add_option("--source-addresses", f->source_addresses,
                  "127.0.0.x addresses to connect from (0: one per 20,000 connections)")
      ->capture_default_str();
  sim->add_option("--enroll-parallel", f->enroll_parallel, "Enrollments in flight at once")
      ->capture_default_str();
  sim->add_option("--via", f->via,
                  "Put the devices behind this site relay (http://HOST:PORT of an "
                  "'outpost-agent --relay'); operator calls still go to --server");
  sim->add_option("--enroll-token", f->enroll_token,
                  "One enrollment token for every device (default: one minted per site with "
                  "the operator token)");
  sim->add_option("--state", f->state_file,
                  "File that keeps the devices' identities: a later run with the same file and "
                  "server skips enrollment");
  sim->add_option("--progress", f->progress, "Progress line on stderr this often (0: none)")
      ->capture_default_str();
  sim->footer(
      "Each virtual device enrolls, syncs its signed desired state, activates it with a\n"
      "stand-in workload (a revision whose config has sim: {crash: true} fails to start;\n"
      "sim: {error_rate: 0.3, latency_ms: 8, confidence: 0.7} shapes its model's telemetry),\n"
      "reports status and ships telemetry, with the agent's own request and answer code.\n"
      "At the end it asks the server, per device, whether it runs its newest desired state.\n"
      "Examples:\n"
      "  outpost sim --devices 1000 --duration 60s\n"
      "  outpost sim --devices 200 --sites 8 --profile flaky --drop-rate 0.1 -o json\n"
      "  outpost sim --devices 100000 --sync-interval 30s --threads 1 --state fleet.state\n"
      "  outpost sim --devices 10000 --profile partition --partition-sites 100%\n"
      "Exit code: 0 when every device enrolled and nothing failed that the simulated\n"
      "network did not cause (errors 0); converged is in the summary.");
  sim->callback([&options, &exit_code, f] {
    Session session(options);
    auto parsed = to_options(*f, session);
    if (!parsed) {
      exit_code = session.fail(parsed.error());
      return;
    }
    auto progress_ms = duration_flag("--progress", f->progress, true);
    if (!progress_ms) {
      exit_code = session.fail(progress_ms.error());
      return;
    }
    sim::Fleet fleet(*parsed);
    if (auto prepared = fleet.prepare(); !prepared) {
      exit_code = session.fail(prepared.error());
      return;
    }
    std::signal(SIGINT, on_sim_signal);
    std::signal(SIGTERM, on_sim_signal);
    std::signal(SIGPIPE, SIG_IGN);
    auto ran = fleet.run(g_sim_stop, print_progress, *progress_ms);
    if (!ran) {
      exit_code = session.fail(ran.error());
      return;
    }
    const nlohmann::json summary = fleet.summary();
    if (session.json_output()) {
      std::cout << summary.dump() << "\n";
    } else {
      print_summary(summary);
    }
    const bool good = summary["enrolled"] == summary["devices"] && summary["errors"] == 0;
    exit_code = good ? kExitOk : kExitError;
  });
}

}  // namespace outpost::cli
