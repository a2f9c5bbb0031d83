// `outpost`: the control plane (`outpost server`) and the operator CLI in one binary.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <tuple>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "cli/cli.h"
#include "common/units.h"
#include "server/control_plane.h"

int main(int argc, char** argv) {
  CLI::App app{"Outpost: deploy, serve, watch and roll back AI models across edge fleets.",
               "outpost"};
  app.require_subcommand(1);
  // Global options (-o, --server, --token) may also follow the verb: `outpost device list -o json`.
  app.fallthrough();
  app.set_version_flag("--version", "outpost 0.1.0");
  app.footer(
      "Start here:\n"
      "  outpost server --data ./outpost-data            # control plane on SQLite\n"
      "  export OUTPOST_TOKEN=$(cat outpost-data/admin.token)\n"
      "  export OUTPOST_CA_FILE=outpost-data/tls/ca.pem   # the server's development CA\n"
      "  outpost model push defect-net 1.0.0 --variant accelerator=cpu=model.onnx\n"
      "  outpost apply -f examples/defect-detector.yaml\n"
      "Server, token and CA come from --server/--token/--ca-file, "
      "OUTPOST_SERVER/OUTPOST_TOKEN/OUTPOST_CA_FILE, or 'outpost login'.");

  outpost::cli::GlobalOptions globals;
  app.add_option("--server", globals.server, "Control plane URL (default https://127.0.0.1:7400)")
      ->envname("OUTPOST_SERVER");
  app.add_option("--token", globals.token, "Operator bearer token")->envname("OUTPOST_TOKEN");
  app.add_option("--ca-file", globals.ca_file,
                 "PEM CA to trust for an HTTPS server (its development CA is DATA/tls/ca.pem)")
      ->envname("OUTPOST_CA_FILE");
  app.add_option("-o,--output", globals.output, "Output format: table or json")
      ->check(CLI::IsMember({"table", "json"}));

  int exit_code = 0;
  outpost::server::ControlPlaneOptions server_options;
  std::string log_level = "info";
  auto* server = app.add_subcommand("server", "Run the control plane");
  server->add_option("--listen", server_options.listen, "Address to listen on (host:port)")
      ->capture_default_str();
  server
      ->add_option("--data", server_options.data_dir,
                   "Data directory: database, blobs, admin.token, signing key")
      ->capture_default_str();
  server->add_option("--db", server_options.db_url,
                     "Store URL: sqlite:PATH (default sqlite:DATA/outpost.db) or "
                     "postgres://USER:PASSWORD@HOST:PORT/DBNAME[?sslmode=require&pool_size=8] "
                     "(PostgreSQL, for several server replicas sharing one database)");
  server->add_option("--secrets-key", server_options.secrets_key_file,
                     "Master key that encrypts secrets at rest, made on first start (default "
                     "DATA/secrets.key, mode 0600; keep it out of the database's backups)");
  server->add_option("--tls-cert", server_options.tls.cert_file,
                     "PEM certificate chain for HTTPS (default: a development CA and certificate "
                     "made under DATA/tls/)");
  server->add_option("--tls-key", server_options.tls.key_file, "PEM private key of --tls-cert");
  server->add_option("--tls-ca", server_options.tls.ca_file,
                     "With --tls-cert: the CA devices pin (handed out with enrollment tokens)");
  server->add_option("--tls-san", server_options.tls.names,
                     "Extra name or address for the development certificate (repeatable; this "
                     "machine's host name and addresses are always in it)");
  server->add_flag("--insecure-http", server_options.tls.insecure_http,
                   "Serve plain HTTP: credentials cross the network in the clear (tests, or "
                   "behind a TLS-terminating proxy)");
  server->add_option("--io-threads", server_options.io_threads, "HTTP I/O threads")
      ->capture_default_str();
  server
      ->add_option("--workers", server_options.worker_threads,
                   "Worker threads for store and disk work")
      ->capture_default_str();
  server->add_option("--log-level", log_level, "trace|debug|info|warn|error")
      ->capture_default_str();
  std::string telemetry_retention = "7d";
  std::string telemetry_rollup_retention = "400d";
  server
      ->add_option("--telemetry-retention", telemetry_retention,
                   "How long raw telemetry points and events are kept")
      ->capture_default_str();
  server
      ->add_option("--telemetry-rollup-retention", telemetry_rollup_retention,
                   "How long hourly telemetry rollups are kept")
      ->capture_default_str();
  std::string slow_client_timeout = "10s";
  server
      ->add_option("--slow-client-timeout", slow_client_timeout,
                   "A client must send its request header (and finish a TLS handshake) within "
                   "this once it starts; bodies must arrive at 16 KiB/s or better")
      ->capture_default_str();
  std::string rollout_tick = "1s";
  std::string rollout_gate_interval = "5s";
  server
      ->add_option("--rollout-tick", rollout_tick,
                   "How often running rollouts are advanced (waves, bake, gates)")
      ->capture_default_str();
  server
      ->add_option("--rollout-gate-interval", rollout_gate_interval,
                   "How often a rollout reads its telemetry gates at most")
      ->capture_default_str();
  std::string release_targets_ttl = "30d";
  std::string release_timestamp_ttl = "1d";
  server
      ->add_option("--release-targets-ttl", release_targets_ttl,
                   "Signed targets metadata expires this long after signing (re-signed at half)")
      ->capture_default_str();
  server
      ->add_option("--release-timestamp-ttl", release_timestamp_ttl,
                   "Signed timestamp metadata expires this long after signing (re-signed at "
                   "half): how stale metadata a device may be shown before it refuses (freeze)")
      ->capture_default_str();
  server
      ->add_option("--delta-bases", server_options.deltas.bases,
                   "Delta updates: when a model version or app bundle is pushed, make zstd deltas "
                   "from this many earlier versions of it; devices holding one download the "
                   "delta instead of the whole blob (0 turns deltas off)")
      ->check(CLI::Range(0, 16))
      ->capture_default_str();
  server
      ->add_option("--delta-level", server_options.deltas.level,
                   "zstd level for deltas (1-22): higher makes smaller deltas, more slowly")
      ->check(CLI::Range(1, 22))
      ->capture_default_str();
  server->callback([&] {
    spdlog::set_level(spdlog::level::from_str(log_level));
    for (auto [text, slot, flag] :
         {std::tuple{&telemetry_retention, &server_options.telemetry_retention_ms,
                     "--telemetry-retention"},
          std::tuple{&telemetry_rollup_retention, &server_options.telemetry_rollup_retention_ms,
                     "--telemetry-rollup-retention"},
          std::tuple{&rollout_tick, &server_options.rollout_tick_ms, "--rollout-tick"},
          std::tuple{&slow_client_timeout, &server_options.header_timeout_ms,
                     "--slow-client-timeout"},
          std::tuple{&rollout_gate_interval, &server_options.rollout_gate_interval_ms,
                     "--rollout-gate-interval"},
          std::tuple{&release_targets_ttl, &server_options.release.targets_ttl_ms,
                     "--release-targets-ttl"},
          std::tuple{&release_timestamp_ttl, &server_options.release.timestamp_ttl_ms,
                     "--release-timestamp-ttl"}}) {
      auto ms = outpost::parse_duration_ms(*text);
      if (!ms || *ms <= 0) {
        std::fprintf(stderr,
                     "error: %s: expected a positive duration like 7d, 1s or 250ms, got \"%s\"\n",
                     flag, text->c_str());
        exit_code = outpost::cli::kExitUsage;
        return;
      }
      *slot = *ms;
    }
    exit_code = outpost::server::run_server(server_options);
  });

  outpost::cli::add_login_command(app, globals, exit_code);
  outpost::cli::add_token_commands(app, globals, exit_code);
  outpost::cli::add_user_commands(app, globals, exit_code);
  outpost::cli::add_secret_commands(app, globals, exit_code);
  outpost::cli::add_release_commands(app, globals, exit_code);
  outpost::cli::add_device_commands(app, globals, exit_code);
  outpost::cli::add_artifact_commands(app, globals, exit_code);
  outpost::cli::add_model_commands(app, globals, exit_code);
  outpost::cli::add_apply_command(app, globals, exit_code);
  outpost::cli::add_deployment_commands(app, globals, exit_code);
  outpost::cli::add_audit_commands(app, globals, exit_code);
  outpost::cli::add_telemetry_commands(app, globals, exit_code);
  outpost::cli::add_rollout_commands(app, globals, exit_code);
  outpost::cli::add_site_commands(app, globals, exit_code);
  outpost::cli::add_sim_command(app, globals, exit_code);

  return outpost::cli::run_cli(app, argc, argv, globals, exit_code);
}
