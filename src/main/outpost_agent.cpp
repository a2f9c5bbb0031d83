// `outpost-agent`: the device agent. Argument parsing and wiring only; the work is in src/agent.
#include <csignal>
#include <cstdio>
#include <iostream>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "agent/agent.h"
#include "agent/facts.h"
#include "agent/identity.h"
#include "agent/relay/relay.h"
#include "agent/serve/onnx_session.h"
#include "common/crypto.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/units.h"
#include "http/http_server.h"

namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

int fail(int code, const std::string& message) {
  std::cerr << "outpost-agent: " << message << "\n";
  return code;
}

// `outpost-agent status`: asks the running agent's local API what it runs.
int print_status(const std::string& address, bool as_json) {
  outpost::HttpClient client("http://" + address, "");
  outpost::HttpRequestOptions options;
  options.timeout_ms = 5'000;
  auto resp = client.request("GET", "/v1/status", {}, {}, options);
  if (!resp)
    return fail(kExitFailure, "no agent answers at " + address + ": " + resp.error().message);
  if (resp->status != 200) {
    return fail(kExitFailure,
                "agent at " + address + " answered HTTP " + std::to_string(resp->status));
  }
  if (as_json) {
    std::cout << resp->body;
    return kExitOk;
  }
  auto doc = nlohmann::json::parse(resp->body, nullptr, false);
  if (!doc.is_object()) return fail(kExitFailure, "agent at " + address + " sent invalid JSON");
  std::cout << "Device:     " << doc.value("device_id", "?") << " (site " << doc.value("site", "?")
            << ")\n"
            << "Server:     " << doc.value("server", "?") << "  "
            << (doc.value("online", false) ? "online" : "OFFLINE");
  if (!doc.value("link_error", "").empty()) std::cout << " (" << doc.value("link_error", "") << ")";
  std::cout << "\nGeneration: " << doc.value("generation", 0) << "\n"
            << "Queued:     " << doc.value("status_queued", 0) << " status report(s)\n";
  std::printf("%-24s %-8s %-12s %-8s %-10s %s\n", "DEPLOYMENT", "REVISION", "PHASE", "RESTARTS",
              "FETCHED", "MESSAGE");
  for (const auto& d : doc.value("deployments", nlohmann::json::array())) {
    std::printf("%-24s %-8lld %-12s %-8d %-10s %s\n", d.value("name", "").c_str(),
                static_cast<long long>(d.value("revision", 0LL)), d.value("phase", "").c_str(),
                d.value("restarts", 0),
                outpost::format_size(d.value("bytes_downloaded", 0LL)).c_str(),
                d.value("message", "").c_str());
  }
  if (doc.value("deployments", nlohmann::json::array()).empty()) std::cout << "(no deployments)\n";
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Outpost device agent: enrolls this device, keeps its desired state (also offline), fetches\n"
      "and verifies artifacts, activates them atomically with automatic rollback, and supervises\n"
      "workloads, and serves deployed ONNX models with the Open Inference Protocol (KServe v2)\n"
      "on its --listen address (GET /v1/services lists the routes; GET /metrics has the "
      "numbers).\n\n"
      "First start:  outpost-agent --server URL --enroll-token TOKEN --data DIR [--label k=v]...\n"
      "Later starts: outpost-agent --data DIR\n"
      "What it runs: outpost-agent status [--listen ADDR]",
      "outpost-agent"};
  app.set_version_flag("--version", std::string("outpost-agent ") + outpost::agent::kAgentVersion);
  std::string server, token, data, site,
      listen = "127.0.0.1:7410", rate, budget, ca_file, cgroup, log_level = "info",
      status_period = "60s", telemetry_buffer = "64M", telemetry_interval = "60s",
      telemetry_flush = "5s", telemetry_rate = "32K", telemetry_batch = "256K";
  std::vector<std::string> labels;
  int parallel = 2;
  int serve_threads = 2, inference_threads = 1;
  std::string onnxruntime;
  app.add_option("--server", server,
                 "Control plane URL, or several comma-separated (replicas of one control plane, "
                 "or a site's relays): the agent uses the first that answers and moves to the "
                 "next when one fails. Needed at the first start; given later, it replaces the "
                 "kept list. E.g. https://cp1:7400,https://cp2:7400");
  app.add_option("--enroll-token", token,
                 "Enrollment token from 'outpost token create' (first start)");
  app.add_option("--data", data, "Data directory: identity, desired state, artifacts, logs");
  app.add_option("--site", site, "Site; must match the token's (first start)");
  app.add_option("--label", labels, "Label k=v, adds to or overrides the token's (first start)");
  app.add_option("--listen", listen, "Local API address (GET /v1/status)")->capture_default_str();
  app.add_option("--max-download-rate", rate, "Cap on download speed per second, e.g. 1M, 500K");
  app.add_option("--disk-budget", budget, "Most disk the artifacts may use, e.g. 2G");
  app.add_option("--max-parallel-downloads", parallel, "Downloads at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 16));
  app.add_option("--ca-file", ca_file, "PEM CA bundle to trust for an HTTPS control plane");
  std::string ca_pin;
  app.add_option("--ca-pin", ca_pin,
                 "sha256:HEX from 'outpost token create' (first start): fetch the server's CA, "
                 "check it against this pin, and trust it from then on (DATA/ca.pem)");
  app.add_option("--cgroup-parent", cgroup,
                 "Delegated cgroup v2 directory for workload limits (else rlimits)");
  app.add_option("--status-period", status_period, "Periodic status report interval")
      ->capture_default_str();
  app.add_option("--serve-threads", serve_threads,
                 "Threads answering the local API and inference requests at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--inference-threads", inference_threads,
                 "ONNX Runtime threads one inference may use")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--onnxruntime", onnxruntime,
                 "Path of libonnxruntime.so.1 (default: $OUTPOST_ONNXRUNTIME, else the one the "
                 "build found); opened only when a model is served");
  app.add_option("--telemetry-buffer", telemetry_buffer,
                 "Most disk the telemetry buffer may use (oldest raw samples go first), >= 256K")
      ->capture_default_str();
  app.add_option("--telemetry-interval", telemetry_interval,
                 "Telemetry interval: aggregates, health, shipping (e.g. 60s, 500ms)")
      ->capture_default_str();
  app.add_option("--telemetry-flush", telemetry_flush,
                 "How often counts of the open interval are saved (a crash loses at most this)")
      ->capture_default_str();
  app.add_option("--telemetry-rate", telemetry_rate,
                 "Cap on telemetry upload (compressed bytes per second), e.g. 32K")
      ->capture_default_str();
  app.add_option("--telemetry-batch", telemetry_batch,
                 "Most record JSON in one upload before compression (smaller for flaky links), "
                 "4K..4M")
      ->capture_default_str();
  bool relay = false;
  std::string relay_listen = "0.0.0.0:7400";
  std::string relay_cache = "10G";
  std::string relay_backlog = "256M";
  app.add_flag("--relay", relay,
               "Also serve the device API to the devices of this site that cannot reach the "
               "control plane (they use --server http://THIS-HOST:PORT): desired states passed "
               "through as signed, one download per blob for the site, uploads stored and "
               "forwarded while the uplink is down");
  app.add_option("--relay-listen", relay_listen, "Relay: address the site's devices reach")
      ->capture_default_str();
  app.add_option("--relay-cache", relay_cache,
                 "Relay: disk budget of the artifact cache (least recently served blobs that no "
                 "device still needs are evicted)")
      ->capture_default_str();
  app.add_option("--relay-backlog", relay_backlog,
                 "Relay: most disk for uploads stored while the uplink is down (when full, "
                 "devices keep theirs and retry)")
      ->capture_default_str();
  std::string relay_tls_cert, relay_tls_key, relay_tls_ca;
  std::string secrets_dir;
  app.add_option("--secrets-dir", secrets_dir,
                 "Where workloads' secret files go (default: a private folder on tmpfs, "
                 "$XDG_RUNTIME_DIR or /dev/shm; DATA/secrets-run when there is none)");
  app.add_option("--relay-tls-cert", relay_tls_cert,
                 "Relay: serve the site's devices over HTTPS with this PEM certificate chain "
                 "(they trust its CA with --ca-file)");
  app.add_option("--relay-tls-key", relay_tls_key, "Relay: the PEM key of --relay-tls-cert");
  app.add_option("--relay-tls-ca", relay_tls_ca,
                 "Relay: the CA that issued --relay-tls-cert, for this agent's own downloads from "
                 "its relay (default: the certificate file itself, for a self-signed one)");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error")->capture_default_str();
  auto* status_cmd = app.add_subcommand("status", "Print what the agent on this device runs");
  std::string output = "text";
  status_cmd->add_option("-o,--output", output, "text or json (the local API's JSON)")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  status_cmd->fallthrough();  // --data and --listen also after the verb
  app.require_subcommand(0, 1);
  CLI11_PARSE(app, argc, argv);

  if (status_cmd->parsed()) {
    if (!data.empty() && app.get_option("--listen")->count() == 0) {
      if (auto addr = outpost::read_file(data + "/agent.addr")) listen = *addr;
    }
    return print_status(listen, output == "json");
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  if (data.empty()) return fail(kExitUsage, "--data is required (see --help)");
  outpost::crypto::init();

  outpost::agent::AgentOptions options;
  options.data_dir = data;
  options.listen = listen;
  options.cgroup_parent = cgroup;
  options.secrets_dir = secrets_dir;
  options.fetch.max_parallel = parallel;
  options.serve_threads = serve_threads;
  options.inference_threads = inference_threads;
  if (!onnxruntime.empty()) outpost::agent::serve::set_onnxruntime_library(onnxruntime);
  if (!rate.empty()) {
    auto bytes = outpost::parse_size_bytes(rate);
    if (!bytes || *bytes <= 0)
      return fail(kExitUsage, "--max-download-rate: expected a size like 1M, got \"" + rate + "\"");
    options.fetch.max_rate_bytes_per_s = *bytes;
  }
  if (!budget.empty()) {
    auto bytes = outpost::parse_size_bytes(budget);
    if (!bytes || *bytes <= 0)
      return fail(kExitUsage, "--disk-budget: expected a size like 2G, got \"" + budget + "\"");
    options.fetch.disk_budget_bytes = *bytes;
  }
  auto period = outpost::parse_duration_ms(status_period);
  if (!period || *period <= 0)
    return fail(kExitUsage, "--status-period: expected a duration like 60s");
  options.status_period_ms = *period;
  auto buffer_bytes = outpost::parse_size_bytes(telemetry_buffer);
  if (!buffer_bytes) {
    return fail(kExitUsage,
                "--telemetry-buffer: expected a size like 64M, got \"" + telemetry_buffer + "\"");
  }
  if (*buffer_bytes < outpost::agent::telemetry::kMinBufferBytes) {
    return fail(kExitUsage, "--telemetry-buffer: " + telemetry_buffer +
                                " is too small; the buffer needs at least 256K");
  }
  options.telemetry.buffer_bytes = *buffer_bytes;
  auto interval = outpost::parse_duration_ms(telemetry_interval);
  if (!interval || *interval <= 0) {
    return fail(kExitUsage, "--telemetry-interval: expected a duration like 60s or 500ms, got \"" +
                                telemetry_interval + "\"");
  }
  options.telemetry.interval_ms = *interval;
  auto flush = outpost::parse_duration_ms(telemetry_flush);
  if (!flush || *flush <= 0) {
    return fail(kExitUsage, "--telemetry-flush: expected a duration like 5s or 200ms, got \"" +
                                telemetry_flush + "\"");
  }
  options.telemetry.flush_ms = std::min(*flush, *interval);
  auto telemetry_bytes_per_s = outpost::parse_size_bytes(telemetry_rate);
  if (!telemetry_bytes_per_s || *telemetry_bytes_per_s <= 0) {
    return fail(kExitUsage, "--telemetry-rate: expected a size per second like 32K, got \"" +
                                telemetry_rate + "\"");
  }
  options.telemetry.rate_bytes_per_s = *telemetry_bytes_per_s;
  auto batch_bytes = outpost::parse_size_bytes(telemetry_batch);
  if (!batch_bytes || *batch_bytes < 4096 || *batch_bytes > (4 << 20)) {
    return fail(kExitUsage, "--telemetry-batch: expected a size from 4K to 4M, got \"" +
                                telemetry_batch + "\"");
  }
  options.telemetry.max_batch_json = *batch_bytes;

  outpost::agent::relay::RelayOptions relay_options;
  if (relay) {
    relay_options.listen = relay_listen;
    if (auto hp = outpost::http::split_host_port(relay_listen); !hp) {
      return fail(kExitUsage, "--relay-listen: " + hp.error().message);
    }
    auto cache_bytes = outpost::parse_size_bytes(relay_cache);
    if (!cache_bytes || *cache_bytes <= 0) {
      return fail(kExitUsage,
                  "--relay-cache: expected a size like 10G, got \"" + relay_cache + "\"");
    }
    relay_options.cache_budget_bytes = *cache_bytes;
    auto backlog_bytes = outpost::parse_size_bytes(relay_backlog);
    if (!backlog_bytes || *backlog_bytes < (1 << 20)) {
      return fail(kExitUsage,
                  "--relay-backlog: expected a size of at least 1M, got \"" + relay_backlog + "\"");
    }
    relay_options.backlog_limit_bytes = *backlog_bytes;
    relay_options.fetch = options.fetch;
    if (relay_tls_cert.empty() != relay_tls_key.empty()) {
      return fail(kExitUsage, "--relay-tls-cert and --relay-tls-key go together");
    }
    if (!relay_tls_ca.empty() && relay_tls_cert.empty()) {
      return fail(kExitUsage, "--relay-tls-ca needs --relay-tls-cert");
    }
    relay_options.tls_cert_file = relay_tls_cert;
    relay_options.tls_key_file = relay_tls_key;
  } else {
    for (const char* flag : {"--relay-listen", "--relay-cache", "--relay-backlog",
                             "--relay-tls-cert", "--relay-tls-key", "--relay-tls-ca"}) {
      if (app.get_option(flag)->count() > 0) {
        return fail(kExitUsage, std::string(flag) + " needs --relay");
      }
    }
  }

  auto identity = outpost::agent::load_identity(data);
  if (!identity && identity.error().code != outpost::Errc::kNotFound) {
    return fail(kExitFailure, identity.error().message);
  }
  if (!identity) {
    if (server.empty() || token.empty()) {
      return fail(kExitUsage,
                  "this device is not enrolled yet: the first start needs --server URL "
                  "and --enroll-token TOKEN (from 'outpost token create')");
    }
    auto parsed = outpost::agent::parse_labels(labels);
    if (!parsed) return fail(kExitUsage, parsed.error().message);
    outpost::agent::EnrollRequest request;
    request.server = server;
    request.token = token;
    request.site = site;
    request.labels = *parsed;
    request.ca_file = ca_file;
    request.ca_pin = ca_pin;
    outpost::agent::FactsSources sources;
    sources.data_dir = data;
    request.facts = outpost::agent::collect_facts(sources, outpost::agent::kAgentVersion);
    identity = outpost::agent::enroll(data, request);
    if (!identity) {
      bool refused = identity.error().code != outpost::Errc::kUnavailable;
      return fail(refused ? kExitUsage : kExitFailure, identity.error().message);
    }
    spdlog::info("enrolled as {} at site {} with {}", identity->device_id, identity->site,
                 identity->server);
  } else {
    if (!token.empty()) {
      spdlog::info("already enrolled as {}; --enroll-token ignored", identity->device_id);
    }
    if (!server.empty()) {
      const std::string before = identity->server;
      if (auto updated = outpost::agent::update_servers(data, *identity, server); !updated) {
        return fail(kExitUsage, "--server: " + updated.error().message);
      }
      if (identity->server != before) {
        spdlog::info("server list changed from {} to {}", before, identity->server);
      }
    }
  }

  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  std::signal(SIGPIPE, SIG_IGN);
  std::unique_ptr<outpost::agent::relay::Relay> site_relay;
  if (relay) {
    site_relay = std::make_unique<outpost::agent::relay::Relay>(relay_options, data, *identity);
    if (auto started = site_relay->start(); !started) {
      return fail(kExitFailure, "--relay: " + started.error().message);
    }
    const std::string scheme = relay_tls_cert.empty() ? "" : "https://";
    const std::string relay_addr = scheme + relay_listen.substr(0, relay_listen.rfind(':')) + ":" +
                                   std::to_string(site_relay->port());
    (void)outpost::write_file_durably(data + "/relay.addr", relay_addr);
    options.relay_stats = [r = site_relay.get()] { return r->stats(); };
    std::string host = relay_listen.substr(0, relay_listen.rfind(':'));
    if (host == "0.0.0.0" || host.empty()) host = "127.0.0.1";
    if (host == "::" || host == "[::]") host = "[::1]";
    options.artifact_source = (relay_tls_cert.empty() ? "http://" : "https://") + host + ":" +
                              std::to_string(site_relay->port());
    if (!relay_tls_cert.empty()) {
      options.artifact_source_ca_file = relay_tls_ca.empty() ? relay_tls_cert : relay_tls_ca;
    }
  }
  outpost::agent::Agent agent(options, *identity);
  if (auto started = agent.start(); !started) return fail(kExitFailure, started.error().message);
  const std::string addr =
      listen.substr(0, listen.rfind(':')) + ":" + std::to_string(agent.local_port());
  (void)outpost::write_file_durably(data + "/agent.addr", addr);
  spdlog::info("agent {} running; local API on http://{}", identity->device_id, addr);
  agent.run(g_stop);
  if (site_relay) site_relay->stop();
  spdlog::info("agent stopped");
  return kExitOk;
}
