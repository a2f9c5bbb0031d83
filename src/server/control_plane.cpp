#include "server/control_plane.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>

#include "common/crypto.h"
#include "common/durable_file.h"
#include "http/http_server.h"
#include "server/api/api.h"
#include "server/cluster/cluster.h"
#include "server/desired_states.h"
#include "server/operator_auth.h"
#include "server/registry/blob_store.h"
#include "server/rollouts/controller.h"
#include "server/secrets/secret_vault.h"
#include "server/sync/sync_hub.h"
#include "store/store.h"

namespace outpost::server {

namespace {

// Loads DATA/server.key (the Ed25519 key that signs desired states), creating it on first start.
Result<crypto::Ed25519KeyPair> load_or_create_signing_key(const std::string& data_dir) {
  return crypto::load_or_create_key_file(data_dir + "/server.key", data_dir + "/server.pub");
}

// An exclusive lock on DATA/.init.lock (flock), released when the returned holder is reset:
// replicas starting together on one shared DATA directory make its keys once.
struct FdCloser {
  void operator()(int* fd) const {
    ::close(*fd);  // releases the flock
    delete fd;
  }
};
using LockHolder = std::unique_ptr<int, FdCloser>;

Result<LockHolder> lock_data_dir(const std::string& data_dir) {
  const std::string path = data_dir + "/.init.lock";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return make_error(Errc::kIo, "cannot open " + path + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX) != 0) {
    const int err = errno;
    ::close(fd);
    return make_error(Errc::kIo, "cannot lock " + path + ": " + std::strerror(err));
  }
  return LockHolder(new int(fd));
}

}  // namespace

struct ControlPlane::Impl {
  explicit Impl(ControlPlaneOptions o) : options(std::move(o)), workers(options.worker_threads) {}

  ControlPlaneOptions options;
  SystemClock clock;
  std::unique_ptr<store::Store> store;
  std::unique_ptr<registry::BlobStore> blobs;
  std::unique_ptr<OperatorAuth> auth;
  boost::asio::thread_pool workers;
  http::Router router;
  std::unique_ptr<http::HttpServer> http;
  std::unique_ptr<sync::SyncHub> hub;
  std::unique_ptr<DesiredStateUpdater> desired;
  std::unique_ptr<SecretVault> vault;
  std::unique_ptr<rollouts::RolloutController> rollouts;
  std::unique_ptr<boost::asio::steady_timer> rollout_timer;
  std::unique_ptr<DeviceSessions> sessions;
  std::unique_ptr<registry::ReleaseSigner> release;
  std::unique_ptr<registry::DeltaMaker> deltas;
  std::unique_ptr<cluster::Cluster> cluster;
  // Batches devices' last_seen; runs on a strand of the workers so stop() can cancel it.
  std::unique_ptr<boost::asio::strand<boost::asio::thread_pool::executor_type>> flush_strand;
  std::unique_ptr<boost::asio::steady_timer> flush_timer;
  std::unique_ptr<boost::asio::steady_timer> telemetry_timer;

  void schedule_flush() {
    flush_timer->expires_after(std::chrono::milliseconds(options.last_seen_flush_ms));
    flush_timer->async_wait([this](const boost::system::error_code& ec) {
      if (ec || stopped) return;
      flush_last_seen();
      schedule_flush();
    });
  }
  // Rolls telemetry up into hours and expires old rows, on the same strand (a worker thread:
  // it is store work).
  void schedule_telemetry_maintenance() {
    telemetry_timer->expires_after(std::chrono::milliseconds(options.telemetry_maintenance_ms));
    telemetry_timer->async_wait([this](const boost::system::error_code& ec) {
      if (ec || stopped) return;
      if (cluster->leader()) maintain_telemetry();
      schedule_telemetry_maintenance();
    });
  }
  void maintain_telemetry() {
    store::TelemetryRetention retention;
    retention.raw_ms = options.telemetry_retention_ms;
    retention.rollup_ms = options.telemetry_rollup_retention_ms;
    auto done = store->maintain_telemetry(clock.now_ms(), retention);
    if (!done) {
      spdlog::warn("telemetry rollup and retention: {}", done.error().message);
    } else if (done->hours_rolled_up > 0 || done->points_deleted > 0) {
      spdlog::info("telemetry: {} hours rolled up, {} points and {} rollups expired",
                   done->hours_rolled_up, done->points_deleted, done->rollups_deleted);
    }
  }
  // Advances running rollouts, on the same strand (store work).
  void schedule_rollout_tick() {
    rollout_timer->expires_after(std::chrono::milliseconds(options.rollout_tick_ms));
    rollout_timer->async_wait([this](const boost::system::error_code& ec) {
      if (ec || stopped) return;
      // Replicas: one leader advances rollouts and switches secrets; the others serve.
      if (cluster->leader()) {
        (void)rollouts->tick();  // failures are logged by the controller
        // A staged secret version that became active: documents drop the superseded one.
        if (auto switched = desired->reconcile_if_secret_switched(clock.now_ms()); !switched) {
          spdlog::error("secret rotation: {}", switched.error().message);
        }
      }
      schedule_rollout_tick();
    });
  }
  void flush_last_seen() {
    auto written = sessions->flush();
    if (!written) spdlog::warn("{}", written.error().message);
  }
  void wire_cluster();
  std::unique_ptr<api::ApiContext> ctx;
  std::string admin_token_path;
  TlsSetup tls;
  std::atomic<bool> ready{false};
  std::atomic<bool> stopped{false};
};

// News between replicas (server/cluster): what one replica wrote that the others hold in memory.
void ControlPlane::Impl::wire_cluster() {
  auto& d = *this;
  d.desired->set_news([&d](const std::vector<std::string>& ids) {
    // NOTIFY payloads stay under 8000 bytes: ids in groups.
    std::string payload;
    for (const auto& id : ids) {
      if (!payload.empty() && payload.size() + id.size() > 7'000) {
        (void)d.cluster->publish(cluster::kDesiredChannel, payload);
        payload.clear();
      }
      payload += (payload.empty() ? "" : ",") + id;
    }
    if (!payload.empty()) (void)d.cluster->publish(cluster::kDesiredChannel, payload);
  });
  d.release->set_on_signed([&d] { (void)d.cluster->publish(cluster::kReleaseChannel, ""); });
  d.deltas->set_on_follower_request(
      [&d] { (void)d.cluster->publish(cluster::kDeltasChannel, ""); });
  d.cluster->on_leader_change([&d](bool leader) {
    if (leader) {
      d.deltas->start();
    } else {
      d.deltas->stop();
    }
  });
  d.cluster->on_news([&d](const std::string& channel, const std::string& payload) {
    // Store reads: on a worker, not the cluster thread.
    boost::asio::post(d.workers, [&d, channel, payload] {
      if (d.stopped) return;
      if (channel == cluster::kDesiredChannel || channel.empty()) {
        std::vector<std::string> ids;
        if (channel.empty()) {
          ids = d.hub->parked_devices();  // back after a lost connection: re-read the parked
        } else {
          for (size_t start = 0; start < payload.size();) {
            size_t end = payload.find(',', start);
            if (end == std::string::npos) end = payload.size();
            if (end > start) ids.push_back(payload.substr(start, end - start));
            start = end + 1;
          }
        }
        if (auto done = d.desired->refresh_from_store(ids); !done) {
          spdlog::warn("cluster news: {}", done.error().message);
        }
      }
      if (channel == cluster::kRevokedChannel) {
        const auto colon = payload.rfind(':');
        if (colon != std::string::npos) {
          const std::string id = payload.substr(0, colon);
          d.sessions->revoke(id, std::strtoll(payload.c_str() + colon + 1, nullptr, 10));
          d.hub->release(id);
        }
      }
      if (channel == cluster::kUsersChannel || channel.empty()) d.auth->forget_cached();
      if (channel == cluster::kReleaseChannel || channel.empty()) {
        if (auto done = d.release->reload(); !done) {
          spdlog::warn("cluster news: release metadata: {}", done.error().message);
        }
      }
      if (channel == cluster::kDeltasChannel && d.deltas->running()) d.deltas->catch_up_soon();
    });
  });
}

ControlPlane::ControlPlane(ControlPlaneOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

ControlPlane::~ControlPlane() { stop(); }

uint16_t ControlPlane::port() const { return impl_->http ? impl_->http->port() : 0; }
const std::string& ControlPlane::admin_token_path() const { return impl_->admin_token_path; }
const TlsSetup& ControlPlane::tls() const { return impl_->tls; }

Status ControlPlane::start() {
  auto& d = *impl_;
  crypto::init();
  OUTPOST_TRY(make_dirs(d.options.data_dir, 0750));
  std::string db_url =
      d.options.db_url.empty() ? "sqlite:" + d.options.data_dir + "/outpost.db" : d.options.db_url;
  auto store = store::open_store(db_url);
  // The URL may hold a database password: the error names it redacted.
  if (!store) {
    return make_error(
        store.error().with_context("opening the store " + store::redact_store_url(db_url)));
  }
  d.store = std::move(*store);
  auto cluster = cluster::open_cluster(db_url, cluster::ClusterOptions{});
  if (!cluster) return make_error(cluster.error());
  d.cluster = std::move(*cluster);
  // Replicas share DATA (keys, blobs, the admin token): one at a time makes what is missing.
  auto init_lock = lock_data_dir(d.options.data_dir);
  if (!init_lock) return make_error(init_lock.error());
  d.blobs = std::make_unique<registry::BlobStore>(d.options.data_dir + "/blobs");
  OUTPOST_TRY(d.blobs->init());
  d.auth = std::make_unique<OperatorAuth>(*d.store);
  auto token_path = d.auth->ensure_admin_token(d.options.data_dir, d.clock.now_ms());
  if (!token_path) return make_error(token_path.error());
  d.admin_token_path = *token_path;
  auto key = load_or_create_signing_key(d.options.data_dir);
  if (!key) return make_error(key.error());

  auto listen = http::split_host_port(d.options.listen);
  if (!listen) return make_error(listen.error().with_context("--listen"));
  auto tls = prepare_tls(d.options.tls, d.options.data_dir, listen->first);
  if (!tls) return make_error(tls.error().with_context("setting up HTTPS"));
  d.tls = *tls;

  http::ServerOptions http_options;
  http_options.listen = d.options.listen;
  http_options.header_timeout_ms = d.options.header_timeout_ms;
  http_options.tls_cert_file = d.tls.cert_file;
  http_options.tls_key_file = d.tls.key_file;
  http_options.io_threads = d.options.io_threads;
  http_options.temp_dir = d.blobs->temp_dir();
  d.http = std::make_unique<http::HttpServer>(http_options, d.router);
  d.hub = std::make_unique<sync::SyncHub>(d.http->io_context());
  d.desired = std::make_unique<DesiredStateUpdater>(*d.store, *d.hub, key->secret_key);
  // The master key of secrets at rest (issue 18): DATA/secrets.key unless kept elsewhere.
  const std::string secrets_key_path = d.options.secrets_key_file.empty()
                                           ? d.options.data_dir + "/secrets.key"
                                           : d.options.secrets_key_file;
  if (const auto parent = std::filesystem::path(secrets_key_path).parent_path();
      !d.options.secrets_key_file.empty() && !parent.empty()) {
    OUTPOST_TRY(make_dirs(parent.string(), 0700));
  }
  auto secrets_key = crypto::load_or_create_secret_key_file(secrets_key_path);
  if (!secrets_key) return make_error(secrets_key.error().with_context("--secrets-key"));
  d.vault = std::make_unique<SecretVault>(*d.store, std::move(*secrets_key));
  d.desired->set_secrets(d.vault.get(), &d.clock);
  d.sessions = std::make_unique<DeviceSessions>(*d.store);
  d.release = std::make_unique<registry::ReleaseSigner>(*d.store, d.clock, d.options.data_dir,
                                                        d.options.release);
  if (auto release = d.release->init(); !release) {
    // A root that does not name this server's key must not stop the server: devices keep what
    // they trust, and `outpost release status` shows why nothing is signed.
    if (release.error().code != Errc::kFailedPrecondition) {
      return make_error(release.error().with_context("release metadata"));
    }
    spdlog::warn("release metadata: {}", release.error().message);
  }
  rollouts::ControllerOptions rollout_options;
  rollout_options.gate_interval_ms = d.options.rollout_gate_interval_ms;
  d.rollouts =
      std::make_unique<rollouts::RolloutController>(*d.store, *d.desired, d.clock, rollout_options);
  d.ctx = std::make_unique<api::ApiContext>(api::ApiContext{
      *d.store, *d.blobs, *d.hub, *d.desired, *d.rollouts, *d.sessions, *d.auth, *d.release,
      d.clock, d.workers, crypto::base64_encode(key->public_key), d.options.long_poll_ms});
  d.ctx->secrets = d.vault.get();
  d.ctx->ca_pem = d.tls.ca_pem;
  d.ctx->ca_pin = d.tls.ca_pin;
  // New deltas are listed in signed release metadata first, then offered to devices.
  d.deltas =
      std::make_unique<registry::DeltaMaker>(*d.store, *d.blobs, d.clock, d.options.deltas, [&d] {
        if (auto signed_now = d.release->refresh(); !signed_now) {
          spdlog::error("release metadata after new deltas: {}", signed_now.error().message);
        }
        if (auto summary = d.desired->reconcile_all(); !summary) {
          spdlog::error("scheduling devices after new deltas: {}", summary.error().message);
        } else {
          spdlog::info("new deltas offered: {} device(s) got a new desired state",
                       summary->changed);
        }
      });
  d.ctx->deltas = d.deltas.get();
  d.ctx->cluster = d.cluster.get();
  d.wire_cluster();
  init_lock->reset();

  api::register_enrollment_token_routes(d.router, *d.ctx);
  api::register_device_routes(d.router, *d.ctx);
  api::register_device_sync_routes(d.router, *d.ctx);
  api::register_artifact_routes(d.router, *d.ctx);
  api::register_model_routes(d.router, *d.ctx);
  api::register_deployment_routes(d.router, *d.ctx);
  api::register_audit_routes(d.router, *d.ctx);
  api::register_telemetry_routes(d.router, *d.ctx);
  api::register_rollout_routes(d.router, *d.ctx);
  api::register_user_routes(d.router, *d.ctx);
  api::register_release_routes(d.router, *d.ctx);
  api::register_secret_routes(d.router, *d.ctx);
  d.router.add("GET", "/healthz", [&d](http::Request&&, http::Responder respond) {
    respond(d.ready ? http::Response::json(200, R"({"status":"ok"})")
                    : http::Response::json(503, R"({"status":"starting"})"));
  });
  // Unauthenticated: a device fetches it before it trusts the server, and checks it against
  // the pin its enrollment token came with (outpost-agent --ca-pin).
  d.router.add("GET", "/api/v1/device/ca", [&d](http::Request&&, http::Responder respond) {
    if (d.tls.ca_pem.empty()) {
      return respond(http::Response::error(
          Error{Errc::kNotFound,
                d.tls.enabled ? "this server was started with --tls-cert but without --tls-ca: "
                                "give devices the CA with --ca-file"
                              : "this server speaks plain HTTP (--insecure-http): there is no CA",
                {}}));
    }
    respond(http::Response::text(200, d.tls.ca_pem, "application/x-pem-file"));
  });
  d.router.add("GET", "/metrics", [&d](http::Request&&, http::Responder respond) {
    // Fleet numbers come from the store: a worker builds the page.
    api::run_on_worker(*d.ctx, std::move(respond), [&d]() -> Result<http::Response> {
      std::string text;
      text += "# HELP outpost_sync_waiting Device long-polls currently held.\n";
      text += "# TYPE outpost_sync_waiting gauge\n";
      text += "outpost_sync_waiting " + std::to_string(d.hub->waiting()) + "\n";
      auto counts = d.hub->counts();
      text += "# HELP outpost_sync_answers_total Device long-polls answered, by how.\n";
      text += "# TYPE outpost_sync_answers_total counter\n";
      text +=
          "outpost_sync_answers_total{how=\"at_once\"} " + std::to_string(counts.at_once) + "\n";
      text += "outpost_sync_answers_total{how=\"woken\"} " + std::to_string(counts.woken) + "\n";
      text += "outpost_sync_answers_total{how=\"timed_out\"} " + std::to_string(counts.timed_out) +
              "\n";
      text +=
          "outpost_sync_answers_total{how=\"hung_up\"} " + std::to_string(counts.hung_up) + "\n";
      text +=
          "# HELP outpost_last_seen_writes_skipped_total Device syncs that needed no store "
          "write.\n";
      text += "# TYPE outpost_last_seen_writes_skipped_total counter\n";
      text += "outpost_last_seen_writes_skipped_total " +
              std::to_string(d.sessions->writes_saved()) + "\n";
      auto fleet = api::fleet_metrics_text(*d.ctx);
      if (!fleet) return make_error(fleet.error());
      text += *fleet;
      return http::Response::text(200, text, "text/plain; version=0.0.4");
    });
  });

  // Bring every device's desired state up to date with what is stored (e.g. after an upgrade
  // changed the scheduler) before serving.
  auto summary = d.desired->reconcile_all();
  if (!summary) return make_error(summary.error().with_context("scheduling devices at start"));
  OUTPOST_TRY(d.http->start());
  d.release->start();
  // Makes deltas once this replica leads (at once with SQLite: a single replica always does).
  OUTPOST_TRY(d.cluster->start());
  d.flush_strand = std::make_unique<boost::asio::strand<boost::asio::thread_pool::executor_type>>(
      d.workers.get_executor());
  d.flush_timer = std::make_unique<boost::asio::steady_timer>(*d.flush_strand);
  d.schedule_flush();
  d.telemetry_timer = std::make_unique<boost::asio::steady_timer>(*d.flush_strand);
  d.schedule_telemetry_maintenance();
  d.rollout_timer = std::make_unique<boost::asio::steady_timer>(*d.flush_strand);
  d.schedule_rollout_tick();
  d.ready = true;
  return ok();
}

void ControlPlane::stop() {
  auto& d = *impl_;
  if (d.stopped.exchange(true)) return;
  d.ready = false;
  if (d.hub) d.hub->shutdown();  // held long-polls get 304 and come back to the next server
  if (d.flush_timer) boost::asio::post(*d.flush_strand, [&d] { d.flush_timer->cancel(); });
  if (d.telemetry_timer) {
    boost::asio::post(*d.flush_strand, [&d] { d.telemetry_timer->cancel(); });
  }
  if (d.rollout_timer) boost::asio::post(*d.flush_strand, [&d] { d.rollout_timer->cancel(); });
  if (d.cluster) d.cluster->stop();  // a leader hands over now, not when its socket closes
  d.workers.join();
  if (d.deltas) d.deltas->stop();
  if (d.release) d.release->stop();
  if (d.sessions) d.flush_last_seen();
  if (d.http) d.http->stop();
}

int run_server(const ControlPlaneOptions& options) {
  // Block the stop signals in every thread (the pools inherit this mask); sigwait below
  // receives them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  // Every held long-poll is an open socket: use all the descriptors the system allows us.
  rlimit files{};
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &files) != 0) spdlog::warn("cannot raise the open-file limit");
  }
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < 65536) {
    spdlog::warn(
        "open-file limit is {}: at most about that many devices can hold a long-poll; "
        "raise it (ulimit -n, or LimitNOFILE= in the service unit)",
        static_cast<uint64_t>(files.rlim_cur));
  }

  ControlPlane plane(options);
  if (auto started = plane.start(); !started) {
    std::fprintf(stderr, "error: %s\n", started.error().describe().c_str());
    return 1;
  }
  auto host = http::split_host_port(options.listen);
  if (plane.tls().generated) {
    std::printf("HTTPS with the development CA %s (pin %s)\n",
                (options.data_dir + "/tls/ca.pem").c_str(), plane.tls().ca_pin.c_str());
  } else if (!plane.tls().enabled) {
    std::printf(
        "WARNING: plain HTTP (--insecure-http): credentials and data cross the network "
        "in the clear\n");
  }
  std::printf("outpost server listening on %s://%s:%u\n", plane.tls().enabled ? "https" : "http",
              host ? host->first.c_str() : options.listen.c_str(),
              static_cast<unsigned>(plane.port()));
  std::printf("data directory: %s\n", options.data_dir.c_str());
  std::printf("admin token: %s (use: export OUTPOST_TOKEN=$(cat %s))\n",
              plane.admin_token_path().c_str(), plane.admin_token_path().c_str());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&set, &sig);
  std::printf("outpost server: received %s, stopping\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  std::fflush(stdout);
  plane.stop();
  return 0;
}

}  // namespace outpost::server
