#include "agent/agent.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <set>

#include <chrono>
#include <filesystem>

#include <spdlog/spdlog.h>

#include "agent/facts.h"
#include "agent/serve/onnx_session.h"
#include "common/durable_file.h"
#include "common/units.h"
#include "http/http_server.h"

namespace outpost::agent {
namespace {

using json = nlohmann::json;

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// A free loopback port for a workload that did not name one.
int pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// "${NAME}" in commands and env values takes the workload's environment; unknown names stay.
std::string expand(const std::string& text, const std::map<std::string, std::string>& env) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    if (text.compare(i, 2, "${") == 0) {
      size_t end = text.find('}', i + 2);
      if (end != std::string::npos) {
        auto it = env.find(text.substr(i + 2, end - i - 2));
        if (it != env.end()) {
          out += it->second;
          i = end + 1;
          continue;
        }
      }
    }
    out += text[i++];
  }
  return out;
}

// Where the model server answers for a deployment: serve.route, else /models/<name>.
std::string serve_route(const json& entry, const std::string& name) {
  std::string route = "/models/" + name;
  if (entry.contains("serve") && entry["serve"].is_object()) {
    route = entry["serve"].value("route", route);
  }
  return route;
}

// "r12-..." -> 12 (the revision a prepared revision's key names); 0 when it names none.
int64_t revision_of_key(const std::string& key) {
  if (key.size() < 2 || key[0] != 'r') return 0;
  return std::atoll(key.c_str() + 1);
}

// A workload's state change as telemetry events: restarts, exits (clean or not), unhealthy.
void workload_events(telemetry::Pipeline* sink, const std::string& deployment, int64_t revision,
                     const WorkloadEvent& before, const WorkloadEvent& ev) {
  if (!sink) return;
  if (ev.restarts > before.restarts) sink->event(deployment, revision, "restart", ev.message);
  if (ev.state == before.state) return;
  switch (ev.state) {
    case WorkloadState::kBackoff:  // exited after being healthy; a restart follows
    case WorkloadState::kExited:
      sink->event(deployment, revision, ev.exit_code.value_or(1) == 0 ? "exit" : "crash",
                  ev.message);
      break;
    case WorkloadState::kUnhealthy:
      sink->event(deployment, revision, "unhealthy", ev.message);
      break;
    default:
      break;
  }
}

int64_t duration_field(const json& obj, const char* key, int64_t fallback) {
  if (!obj.is_object() || !obj.contains(key) || !obj[key].is_string()) return fallback;
  auto ms = parse_duration_ms(obj[key].get<std::string>());
  return ms ? *ms : fallback;
}

}  // namespace

// One deployment as the event loop sees it.
struct Agent::Runtime {
  std::string name;
  json entry;          // from the desired state; null once the deployment was removed
  std::string target;  // revision key of `entry`
  DeploymentDir dir;
  DeploymentPointers ptr;
  std::unique_ptr<Supervisor> process;
  std::string served_key;   // revision whose model the model server has
  std::string serve_note;   // what the model server said about it (degraded, no fallback)
  std::string process_key;  // revision the process runs
  int64_t process_started = 0;
  int port = 0;
  std::string phase = "pending";
  std::string message;
  int restarts = 0;  // across supervisors of this deployment since the agent started
  int64_t bytes_downloaded = 0;
  int64_t retry_at = 0;  // a failed start is tried again then (0 = not waiting)
  int failures = 0;
  std::map<std::string, json> entries;  // entry.json of prepared revisions, read once
  // Secret versions whose files the running process was given (name -> version).
  std::map<std::string, int64_t> secret_versions;
  Runtime(const std::string& data_dir, const std::string& n) : name(n), dir(data_dir, n) {}

  // The entry of a prepared revision; cached, since the event loop asks twice a second.
  Result<json> entry_of(const std::string& key) {
    if (auto it = entries.find(key); it != entries.end()) return it->second;
    auto loaded = dir.entry(key);
    if (loaded) entries[key] = *loaded;
    return loaded;
  }
};

Agent::Agent(AgentOptions options, Identity identity)
    : options_(std::move(options)), identity_(std::move(identity)), artifacts_(options_.data_dir) {
  // Workloads run in their own folders: every path handed to them must be absolute.
  std::error_code ec;
  if (auto absolute = std::filesystem::absolute(options_.data_dir, ec); !ec) {
    options_.data_dir = absolute.lexically_normal().string();
    artifacts_ = ArtifactStore(options_.data_dir);
  }
  serve::SessionLoader loader = options_.session_loader;
  if (!loader) loader = serve::load_onnx_session;
  models_ = std::make_unique<serve::ModelServer>(std::move(loader));
}

Agent::~Agent() {
  if (http_) http_->stop();
  if (sync_) sync_->stop();
  if (fetcher_) fetcher_->stop();
  if (release_) release_->stop();
  if (outbox_) outbox_->stop();
  for (auto& [name, rt] : deployments_) stop_process(*rt);
  if (telemetry_) telemetry_->stop();
}

void Agent::record_event(const std::string& deployment, int64_t revision, const std::string& event,
                         const std::string& message) {
  if (telemetry_) telemetry_->event(deployment, revision, event, message);
}

int64_t Agent::now_ms() const { return wall_ms(); }

void Agent::post(std::function<void()> fn) {
  {
    std::lock_guard lock(inbox_mu_);
    inbox_.push_back(std::move(fn));
  }
  inbox_cv_.notify_one();
}

uint16_t Agent::local_port() const { return http_ ? http_->port() : 0; }

Status Agent::start() {
  OUTPOST_TRY(artifacts_.init());
  OUTPOST_TRY(make_dirs(options_.data_dir + "/deployments", 0700));
  if (auto text = read_file(options_.data_dir + "/facts.json")) {
    reported_facts_ = json::parse(*text, nullptr, false);
  }
  FactsSources sources;
  sources.data_dir = options_.data_dir;
  facts_ = collect_facts(sources, kAgentVersion);
  last_facts_at_ = now_ms();

  // Telemetry before anything runs: workloads started below already make events, and the
  // model server's observer must be in place before its first request.
  telemetry_ = std::make_unique<telemetry::Pipeline>(
      options_.data_dir, identity_, options_.telemetry, clock_,
      [this] { return models_->metrics_snapshots(); });
  OUTPOST_TRY(telemetry_->init());
  models_->set_observer([sink = telemetry_.get()](const serve::InferenceOutcome& outcome) {
    sink->sampler().observe(outcome);
  });

  // Secrets: the key that opens them, and a clean private folder for the plaintext files (what
  // a previous run left behind is removed; the workloads get fresh copies when they start).
  if (auto key = load_device_key(options_.data_dir)) {
    device_key_ = std::move(*key);
  } else {
    spdlog::error("secrets: cannot read the device key: {}", key.error().message);
  }
  bool on_tmpfs = false;
  if (auto base = prepare_secrets_base(options_.secrets_dir, options_.data_dir, identity_.device_id,
                                       &on_tmpfs)) {
    SecretFiles(*base).remove_all();
    auto again = prepare_secrets_base(options_.secrets_dir, options_.data_dir, identity_.device_id,
                                      &on_tmpfs);
    if (again) secrets_base_ = *again;
    if (!on_tmpfs) {
      spdlog::warn("secrets: no tmpfs for workloads' secret files; using {} (on disk)",
                   secrets_base_);
    }
  } else {
    spdlog::error("secrets: {}; workloads that need secrets will not start", base.error().message);
  }

  // Local state first: a device without network still starts what it ran before.
  auto saved = load_desired(options_.data_dir, identity_);
  if (!saved) {
    spdlog::error("ignoring the saved desired state: {}", saved.error().message);
  } else if (*saved) {
    spdlog::info("starting from the saved desired state, generation {}", (*saved)->generation);
    apply_desired((*saved)->doc, (*saved)->generation);
  }

  outbox_ = std::make_unique<StatusOutbox>(options_.data_dir, identity_, StatusOutbox::Options{});
  OUTPOST_TRY(outbox_->init());
  // A relay's own workloads are fed from its site cache, so the site's uplink carries each blob
  // once however many of its devices (the relay included) run it.
  Identity fetch_identity = identity_;
  if (!options_.artifact_source.empty()) {
    fetch_identity.server = options_.artifact_source;
    fetch_identity.servers = nullptr;  // the site cache alone, whatever the upstream list
    if (!options_.artifact_source_ca_file.empty()) {
      fetch_identity.ca_file = options_.artifact_source_ca_file;
    }
  }
  fetcher_ = std::make_unique<Fetcher>(artifacts_, fetch_identity, options_.fetch,
                                       [this] { post([] {}); });
  // Release metadata from the control plane (through the relay, if any): its own server, not
  // the artifact source, which is only a cache.
  release_ = std::make_unique<ReleaseTrust>(options_.data_dir, identity_, clock_, options_.release,
                                            [this] { post([] {}); });
  OUTPOST_TRY(release_->init());
  sync_ = std::make_unique<DesiredSync>(
      options_.data_dir, identity_, generation_, options_.sync,
      [this](const DesiredState& state) {
        post([this, doc = state.doc, g = state.generation] { apply_desired(doc, g); });
      },
      [this](bool online, const std::string& error) {
        post([this, online, error] {
          online_ = online;
          link_error_ = error;
          if (online) last_sync_ms_ = now_ms();
          telemetry_->set_link(online, last_sync_ms_);
        });
      });

  router_ = std::make_unique<http::Router>();
  router_->add("GET", "/v1/status", [this](http::Request&&, http::Responder respond) {
    respond(http::Response::json(200, status().dump(2) + "\n"));
  });
  router_->add("GET", "/v1/telemetry", [this](http::Request&&, http::Responder respond) {
    respond(http::Response::json(200, telemetry_status().dump(2) + "\n"));
  });
  router_->add("GET", "/healthz", [](http::Request&&, http::Responder respond) {
    respond(http::Response::json(200, R"({"ok":true})"));
  });
  router_->add("GET", "/v1/services", [this](http::Request&&, http::Responder respond) {
    const std::string base = "http://127.0.0.1:" + std::to_string(local_port());
    respond(http::Response::json(200, models_->services(base).dump(2) + "\n"));
  });
  router_->add("GET", "/metrics", [this](http::Request&&, http::Responder respond) {
    respond(http::Response::text(200, models_->prometheus(), "text/plain; version=0.0.4"));
  });
  // Everything else is the model server's: /v2/... and each deployment's serve.route.
  auto serve_or_404 = [this](http::Request&& request, http::Responder respond) {
    if (auto answer = models_->handle(request)) {
      respond(std::move(*answer));
      return;
    }
    respond(http::Response::error(Error{
        Errc::kNotFound, "nothing is served at " + request.path + " (see GET /v1/services)", ""}));
  };
  http::RouteOptions infer_options;
  infer_options.body_limit = 64u << 20;  // tensors in JSON are wordy
  router_->add("GET", "/{path...}", serve_or_404);
  router_->add("POST", "/{path...}", serve_or_404, infer_options);
  http::ServerOptions http_options;
  http_options.listen = options_.listen;
  http_options.io_threads = std::max(1, options_.serve_threads);
  http_ = std::make_unique<http::HttpServer>(http_options, *router_);
  if (auto started = http_->start(); !started) {
    return make_error(started.error().with_context("local API on " + options_.listen));
  }

  reconcile();
  collect_garbage();
  publish_snapshot();
  outbox_->start();
  fetcher_->start();
  release_->start();
  sync_->start();
  telemetry_->start();
  return ok();
}

void Agent::run(const std::atomic<bool>& stop) {
  while (!stop) {
    std::deque<std::function<void()>> batch;
    {
      std::unique_lock lock(inbox_mu_);
      // Something in motion (a start deadline, a retry, a download) is looked at twice a
      // second; a settled device sleeps until an event (sync, fetch, workload) or 5 s.
      // Woken in slices of 250 ms to see `stop` (set by a signal handler, which cannot notify).
      // A staged secret version switches at its rotate time, not up to 5 s later.
      int64_t wait_ms = settled() ? 5'000 : 500;
      if (const int64_t next = next_secret_activation(sealed_, now_ms()); next > 0) {
        wait_ms = std::clamp<int64_t>(next - now_ms() + 1, 0, wait_ms);
      }
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
      while (inbox_.empty() && !stop && std::chrono::steady_clock::now() < until) {
        inbox_cv_.wait_for(
            lock, std::min<std::chrono::steady_clock::duration>(
                      std::chrono::milliseconds(250), until - std::chrono::steady_clock::now()));
      }
      batch.swap(inbox_);
    }
    for (auto& fn : batch) fn();
    reconcile();
    rotate_secrets();
    const int64_t now = now_ms();
    if (now - last_facts_at_ >= options_.facts_period_ms) {
      FactsSources sources;
      sources.data_dir = options_.data_dir;
      facts_ = collect_facts(sources, kAgentVersion);
      last_facts_at_ = now;
    }
    report_if_changed(now - last_report_at_ >= options_.status_period_ms);
    publish_snapshot();
  }
  spdlog::info("stopping: workloads get SIGTERM");
  if (http_) http_->stop();
  sync_->stop();
  fetcher_->stop();
  release_->stop();
  for (auto& [name, rt] : deployments_) stop_process(*rt);
  // Plaintext does not outlive the workloads; the next start writes it again from the sealed copy.
  if (!secrets_base_.empty()) SecretFiles(secrets_base_).remove_all();
  report_if_changed(false);
  outbox_->stop();
  telemetry_->stop();  // ends the interval now: what was counted is kept for the next start
}

bool Agent::settled() const {
  for (const auto& [name, rt] : deployments_) {
    if (rt->retry_at != 0 ||
        (rt->phase != "running" && rt->phase != "rolled-back" && rt->phase != "completed")) {
      return false;
    }
  }
  return true;
}

void Agent::apply_desired(const json& doc, int64_t generation) {
  // verify_desired checked the shape; entries are objects with a safe name and a revision.
  generation_ = generation;
  sealed_ = sealed_secrets_of(doc);
  delta_offers_.clear();
  for (const auto& [target, offers] : offered_deltas(doc)) {
    for (const auto& o : offers) delta_offers_[target].push_back(DeltaPlan{o.delta, o.base, -1});
  }
  std::map<std::string, json> wanted;
  for (const auto& entry : doc["deployments"]) {
    if (entry.is_object() && entry.contains("name") && entry["name"].is_string()) {
      wanted[entry["name"].get<std::string>()] = entry;
    }
  }
  for (auto& [name, rt] : deployments_) {
    if (!wanted.contains(name)) rt->entry = nullptr;
  }
  if (telemetry_) {
    std::map<std::string, telemetry::SamplingPolicy> policies;
    for (const auto& [name, entry] : wanted) {
      telemetry::SamplingPolicy policy;
      const json t = entry.value("telemetry", json::object());
      if (t.is_object()) {
        if (t.contains("sample") && t["sample"].is_number()) policy.sample = t["sample"];
        if (t.contains("on_anomaly") && t["on_anomaly"].is_number()) {
          policy.on_anomaly = t["on_anomaly"];
        }
      }
      policies[name] = policy;
    }
    telemetry_->set_policies(std::move(policies));
  }
  for (auto& [name, entry] : wanted) {
    auto& rt = deployments_[name];
    if (!rt) {
      rt = std::make_unique<Runtime>(options_.data_dir, name);
      auto pointers = rt->dir.load();
      if (!pointers) {
        spdlog::error("deployment {}: {}; starting it afresh", name, pointers.error().message);
      } else {
        rt->ptr = *pointers;
      }
    }
    std::string key = revision_key(entry);
    if (key != rt->target) {
      rt->retry_at = 0;
      rt->failures = 0;
      rt->bytes_downloaded = 0;
    }
    rt->entry = entry;
    rt->target = key;
  }
  spdlog::info("desired state generation {}: {} deployment(s)", generation, wanted.size());
}

void Agent::reconcile() {
  for (auto it = deployments_.begin(); it != deployments_.end();) {
    Runtime& rt = *it->second;
    if (rt.entry.is_null()) {
      spdlog::info("deployment {} removed: stopping it and deleting its files", rt.name);
      stop_process(rt);
      models_->remove(rt.name);
      remove_deployment_dir(options_.data_dir, rt.name);
      if (!secrets_base_.empty()) SecretFiles(secrets_base_ + "/" + rt.name).remove_all();
      it = deployments_.erase(it);
      collect_garbage();
      continue;
    }
    try {
      reconcile_one(rt);
    } catch (const std::exception& e) {
      // A signed but malformed entry (wrong JSON types) fails that deployment, not the agent.
      rt.phase = "failed";
      rt.message = std::string("malformed desired state entry: ") + e.what();
    }
    ++it;
  }
}

Status Agent::save_pointers(Runtime& rt) {
  auto saved = rt.dir.save(rt.ptr);
  if (!saved) spdlog::error("deployment {}: {}", rt.name, saved.error().message);
  return saved;
}

std::optional<DeltaPlan> Agent::delta_plan_for(const std::string& digest, bool* pending) {
  if (pending != nullptr) *pending = false;
  auto it = delta_offers_.find(digest);
  if (it == delta_offers_.end()) return std::nullopt;
  for (const DeltaPlan& offer : it->second) {
    if (!artifacts_.has(offer.base)) continue;
    DeltaPlan plan = offer;
    if (release_) {
      // A delta is a blob like any other: signed release metadata must list it. A new delta
      // may be newer than the targets this device holds: wait for the refresh rather than
      // fetch the whole blob; a refused one is passed over for the next, or the whole blob.
      const auto verdict = release_->check(offer.delta);
      using Kind = ReleaseTrust::Verdict::Kind;
      if (verdict.kind == Kind::kPending) {
        if (pending != nullptr) *pending = true;
        return std::nullopt;
      }
      if (verdict.kind != Kind::kTrusted && verdict.kind != Kind::kUnchecked) continue;
      plan.delta_length = verdict.length;
    }
    return plan;
  }
  return std::nullopt;
}

void Agent::reconcile_one(Runtime& rt) {
  const std::string& key = rt.target;
  DeploymentPointers& p = rt.ptr;
  const int64_t revision = rt.entry.value("revision", static_cast<int64_t>(0));

  // A revision that failed and was rolled back stays off until the desired state moves on.
  if (auto failed = p.failed.find(key); failed != p.failed.end()) {
    if (!p.current.empty() && rt.dir.prepared(p.current)) check_current(rt);
    rt.phase = p.current.empty() ? "failed" : "rolled-back";
    rt.message = "revision " + std::to_string(revision) + " failed: " + failed->second;
    if (!p.current.empty()) rt.message += "; running " + p.current + " instead";
    return;
  }
  if (p.current == key && rt.dir.prepared(key)) {
    check_current(rt);
    return;
  }

  // Keep the current revision running while the new one is fetched and prepared.
  if (!p.current.empty() && rt.dir.prepared(p.current) && ensure_serving(rt, p.current)) {
    ensure_running(rt, p.current);
  }
  // Signed release metadata first: nothing is fetched, nor activated from what is on disk,
  // unless the current targets list it (see agent/release).
  std::map<std::string, int64_t> signed_lengths;
  if (release_) {
    for (const auto& digest : needed_artifacts(rt.entry)) {
      const auto verdict = release_->check(digest);
      using Kind = ReleaseTrust::Verdict::Kind;
      if (verdict.kind == Kind::kRefused) {
        if (fetcher_) fetcher_->forget(digest);
        rt.phase = "failed";
        rt.message = "release metadata: " + verdict.reason;
        return;
      }
      if (verdict.kind == Kind::kPending) {
        rt.phase = "pending";
        rt.message = "checking signed release metadata" +
                     (verdict.reason.empty() ? std::string() : ": " + verdict.reason);
        return;
      }
      signed_lengths[digest] = verdict.length;
      bool delta_pending = false;
      if (!artifacts_.has(digest)) (void)delta_plan_for(digest, &delta_pending);
      if (delta_pending) {
        rt.phase = "pending";
        rt.message = "checking signed release metadata for the delta of " + digest;
        return;
      }
    }
  }
  bool missing = false;
  std::string waiting_phase = "pending";
  std::string problem;
  int64_t fetched = 0;
  for (const auto& digest : needed_artifacts(rt.entry)) {
    if (artifacts_.has(digest)) {
      if (auto prog = fetcher_ ? fetcher_->progress(digest) : std::nullopt) {
        fetched += prog->fetched_bytes;
      }
      continue;
    }
    missing = true;
    if (!fetcher_) continue;  // start(): the fetcher comes up right after
    auto length = signed_lengths.find(digest);
    fetcher_->want(digest, length == signed_lengths.end() ? -1 : length->second,
                   delta_plan_for(digest));
    auto prog = fetcher_->progress(digest);
    if (!prog) continue;
    fetched += prog->fetched_bytes;
    using Phase = FetchProgress::Phase;
    if (prog->phase == Phase::kDownloading) waiting_phase = "downloading";
    if (prog->phase == Phase::kVerifying) waiting_phase = "verifying";
    if (prog->phase == Phase::kWaitingRetry) {
      problem = prog->last_error;
      if (waiting_phase == "pending") waiting_phase = "failed";
    }
    if (prog->phase == Phase::kDownloading && prog->total_bytes > 0 && problem.empty()) {
      rt.message = format_size(prog->have_bytes) + " of " + format_size(prog->total_bytes) +
                   (prog->via_delta.empty() ? "" : " (delta)") +
                   (prog->attempts > 1 ? " (resumed)" : "");
    }
    if (!prog->delta_error.empty() && problem.empty() && prog->via_delta.empty()) {
      rt.message += (rt.message.empty() ? "" : "; ") +
                    std::string("delta given up, fetching the whole blob: ") + prog->delta_error;
    }
  }
  rt.bytes_downloaded = std::max(rt.bytes_downloaded, fetched);
  if (missing) {
    rt.phase = waiting_phase;
    if (!problem.empty()) {
      rt.message = problem + " (retrying)";
    } else if (waiting_phase == "pending") {
      rt.message = "waiting for artifacts";
    }
    return;
  }
  if (rt.retry_at > now_ms()) return;
  rt.retry_at = 0;

  if (auto prepared = rt.dir.prepare(key, rt.entry, artifacts_); !prepared) {
    rt.phase = "failed";
    rt.message = prepared.error().message;
    rt.retry_at = now_ms() + options_.retry_initial_ms;
    spdlog::error("deployment {}: {}", rt.name, rt.message);
    return;
  }
  // The switch: one durable rewrite of the pointer file. The old revision stays on disk.
  stop_process(rt);
  if (!p.current.empty() && p.current != key && rt.dir.prepared(p.current)) {
    p.previous = p.current;
  }
  p.current = key;
  p.trial = !p.previous.empty();
  if (!save_pointers(rt)) return;
  spdlog::info("deployment {}: activated {} (previous {})", rt.name, key,
               p.previous.empty() ? "none" : p.previous);
  record_event(rt.name, revision_of_key(key), "activate",
               p.previous.empty() ? "" : "previous " + p.previous);
  if (fetcher_) {
    for (const auto& digest : needed_artifacts(rt.entry)) fetcher_->forget(digest);
  }
  rt.failures = 0;
  check_current(rt);
  collect_garbage();
}

void Agent::ensure_running(Runtime& rt, const std::string& key) {
  if (rt.process && rt.process_key == key) return;
  if (rt.retry_at > now_ms()) return;
  rt.retry_at = 0;
  auto entry = rt.entry_of(key);
  if (!entry) {
    fail_revision(rt, entry.error().message);
    return;
  }
  if (!entry->contains("workload") || !(*entry)["workload"].is_object()) return;
  stop_process(rt);
  const json& w = (*entry)["workload"];
  const std::string rev_dir = rt.dir.revision_path(key);
  WorkloadSpec spec;
  spec.name = rt.name;
  spec.cwd = rev_dir + "/app";
  spec.log_dir = rt.dir.path() + "/logs";
  if (auto made = make_dirs(spec.log_dir, 0700); !made) {
    fail_revision(rt, made.error().message);
    return;
  }
  rt.port =
      w.contains("port") && w["port"].is_number_integer() ? w["port"].get<int>() : pick_free_port();
  std::map<std::string, std::string> env = {
      {"OUTPOST_DEPLOYMENT", rt.name},
      {"OUTPOST_REVISION", std::to_string(entry->value("revision", static_cast<int64_t>(0)))},
      {"OUTPOST_DEVICE_ID", identity_.device_id},
      {"OUTPOST_CONFIG", rev_dir + "/config.json"},
      {"OUTPOST_PORT", std::to_string(rt.port)},
      {"OUTPOST_DATA", rev_dir},
  };
  if (entry->contains("model")) {
    env["OUTPOST_MODEL_PATH"] = rt.dir.model_path(key, *entry);
    env["OUTPOST_MODEL_URL"] =
        "http://127.0.0.1:" + std::to_string(local_port()) + serve_route(*entry, rt.name);
  }
  if (!materialize_secrets(rt, *entry, &env)) return;
  if (w.contains("env") && w["env"].is_object()) {
    for (const auto& [k, v] : w["env"].items()) {
      if (v.is_string()) env[k] = expand(v.get<std::string>(), env);
    }
  }
  for (const auto& arg : w.value("command", json::array())) {
    if (arg.is_string()) spec.argv.push_back(expand(arg.get<std::string>(), env));
  }
  spec.env = std::move(env);
  std::string restart = w.value("restart", "on-failure");
  spec.restart = restart == "always"  ? RestartPolicy::kAlways
                 : restart == "never" ? RestartPolicy::kNever
                                      : RestartPolicy::kOnFailure;
  spec.stop_grace_ms = duration_field(w, "stop_grace", 10'000);
  if (w.contains("health") && w["health"].is_object()) {
    const json& h = w["health"];
    HealthCheck check;
    if (h.contains("http")) {
      check.http_path = h.value("http", "/healthz");
      check.port = rt.port;
    } else {
      for (const auto& arg : h.value("exec", json::array())) {
        if (arg.is_string()) check.exec.push_back(expand(arg.get<std::string>(), spec.env));
      }
    }
    check.period_ms = duration_field(h, "period", 10'000);
    check.timeout_ms = duration_field(h, "timeout", 5'000);
    spec.health = check;
  }
  if (w.contains("resources") && w["resources"].is_object()) {
    const json& r = w["resources"];
    if (r.contains("memory") && r["memory"].is_string()) {
      if (auto bytes = parse_size_bytes(r["memory"].get<std::string>())) {
        spec.limits.memory_bytes = *bytes;
      }
    }
    if (r.contains("cpus") && r["cpus"].is_number()) spec.limits.cpus = r["cpus"].get<double>();
    if (r.contains("open_files") && r["open_files"].is_number_integer()) {
      spec.limits.open_files = r["open_files"].get<int64_t>();
    }
  }
  spec.cgroup_parent = options_.cgroup_parent;
  // A process a crashed agent left behind would hold the port and double the work.
  Supervisor::kill_leftover(spec.log_dir);
  const int64_t revision = entry->value("revision", static_cast<int64_t>(0));
  auto seen = std::make_shared<WorkloadEvent>();  // the last event, on the supervisor's thread
  auto process = std::make_unique<Supervisor>(
      std::move(spec),
      [this, sink = telemetry_.get(), seen, name = rt.name, revision](const WorkloadEvent& ev) {
        workload_events(sink, name, revision, *seen, ev);
        *seen = ev;
        post([] {});
      });
  if (auto started = process->start(); !started) {
    fail_revision(rt, started.error().message);
    return;
  }
  record_event(rt.name, revision, "start", "");
  rt.process = std::move(process);
  rt.process_key = key;
  rt.process_started = now_ms();
  rt.phase = "starting";
  rt.message.clear();
}

bool Agent::ensure_serving(Runtime& rt, const std::string& key) {
  if (rt.served_key == key) return true;
  auto entry = rt.entry_of(key);
  if (!entry || !entry->contains("model") || !(*entry)["model"].is_object()) return true;
  const json& model = (*entry)["model"];
  const json variant = model.value("variant", json::object());
  if (variant.value("format", "") != "onnx") return true;  // staged for the workload only
  if (rt.retry_at > now_ms()) return false;
  serve::ServiceConfig config;
  config.deployment = rt.name;
  config.route = serve_route(*entry, rt.name);
  config.revision = entry->value("revision", static_cast<int64_t>(0));
  config.primary = {model.value("name", ""), model.value("version", ""),
                    rt.dir.model_path(key, *entry)};
  config.session.intra_op_threads = options_.inference_threads;
  if (entry->contains("serve") && (*entry)["serve"].is_object()) {
    const json& serve = (*entry)["serve"];
    if (serve.contains("fallback") && serve["fallback"].is_object()) {
      const json& fb = serve["fallback"];
      if (auto path = rt.dir.fallback_model_path(key, *entry); !path.empty()) {
        config.fallback = serve::ModelRef{fb.value("model", ""), fb.value("version", ""), path};
        config.min_confidence = fb.value("min_confidence", 0.0);
      }
    }
  }
  auto served = models_->activate(config);
  if (!served) {
    // A model that cannot be served fails its revision like a workload that cannot start.
    fail_revision(rt, served.error().message);
    return false;
  }
  rt.served_key = key;
  rt.serve_note = *served;
  return true;
}

void Agent::check_current(Runtime& rt) {
  const std::string key = rt.ptr.current;
  auto entry = rt.entry_of(key);
  if (!ensure_serving(rt, key)) return;
  const bool has_workload =
      entry && entry->contains("workload") && (*entry)["workload"].is_object();
  if (!has_workload) {
    // A model without a companion process: running once it is served (or staged, for
    // formats the agent does not serve itself).
    if (rt.ptr.trial) {
      rt.ptr.trial = false;
      (void)save_pointers(rt);
    }
    rt.phase = "running";
    rt.message.clear();
    if (entry && entry->contains("model")) {
      rt.message = rt.served_key == key
                       ? "serving at http://127.0.0.1:" + std::to_string(local_port()) +
                             serve_route(*entry, rt.name)
                       : "model ready at " + rt.dir.model_path(key, *entry);
      if (!rt.serve_note.empty()) rt.message += " (" + rt.serve_note + ")";
    }
    return;
  }
  ensure_running(rt, key);
  if (!rt.process || rt.process_key != key) return;  // waiting for a retry
  WorkloadEvent ev = rt.process->snapshot();
  const int64_t deadline =
      duration_field((*entry)["workload"].value("health", json::object()), "deadline", 60'000);
  switch (ev.state) {
    case WorkloadState::kHealthy:
    case WorkloadState::kUnhealthy:
      rt.phase = "running";
      rt.message = ev.state == WorkloadState::kUnhealthy ? "unhealthy: " + ev.message : "";
      rt.failures = 0;
      if (rt.ptr.trial && ev.ever_healthy) {
        rt.ptr.trial = false;  // the new revision proved itself; previous stays for rollback
        (void)save_pointers(rt);
        spdlog::info("deployment {}: {} is healthy", rt.name, key);
      }
      break;
    case WorkloadState::kStarting:
    case WorkloadState::kBackoff:
      rt.phase = "starting";
      rt.message = ev.state == WorkloadState::kBackoff ? "restarting after: " + ev.message : "";
      if (!ev.ever_healthy && now_ms() - rt.process_started > deadline) {
        fail_revision(rt, "not healthy within " + format_duration_ms(deadline) +
                              (ev.message.empty() ? "" : " (" + ev.message + ")"));
      }
      break;
    case WorkloadState::kExited:
      if (!ev.ever_healthy) {
        fail_revision(rt, "failed to start: " + ev.message);
      } else {
        rt.phase = ev.exit_code.value_or(1) == 0 ? "completed" : "failed";
        rt.message = ev.message;
      }
      break;
    case WorkloadState::kStopped:
      break;
  }
  rt.restarts = std::max(rt.restarts, ev.restarts);
}

void Agent::fail_revision(Runtime& rt, const std::string& reason) {
  DeploymentPointers& p = rt.ptr;
  const std::string failed = p.current;
  stop_process(rt);
  if (p.trial && !p.previous.empty() && rt.dir.prepared(p.previous)) {
    spdlog::error("deployment {}: {} {}; rolling back to {}", rt.name, failed, reason, p.previous);
    record_event(rt.name, revision_of_key(failed), "rollback", reason + "; back to " + p.previous);
    p.failed[failed] = reason;
    p.current = p.previous;
    p.previous.clear();
    p.trial = false;
    (void)save_pointers(rt);
    ensure_running(rt, p.current);
    rt.phase = "rolled-back";
    // The same words reconcile_one uses while the failed revision stays off, so the report
    // sent right now already says why.
    rt.message = "revision " + std::to_string(rt.entry.value("revision", static_cast<int64_t>(0))) +
                 " failed: " + reason + "; running " + p.current + " instead";
    return;
  }
  // Nothing to go back to: say so, and try again later (the cause may be outside, e.g. a camera).
  ++rt.failures;
  const int64_t delay =
      Backoff::capped_ms(rt.failures - 1, options_.retry_initial_ms, options_.retry_max_ms);
  rt.retry_at = now_ms() + delay;
  rt.phase = "failed";
  rt.message = reason + " (trying again in " + format_duration_ms(delay) + ")";
  spdlog::error("deployment {}: {}", rt.name, rt.message);
  record_event(rt.name, revision_of_key(failed.empty() ? rt.target : failed), "failed", reason);
}

void Agent::stop_process(Runtime& rt) {
  if (!rt.process) return;
  rt.restarts = std::max(rt.restarts, rt.process->snapshot().restarts);
  rt.process->stop();
  rt.process.reset();
  rt.process_key.clear();
}

bool Agent::materialize_secrets(Runtime& rt, const json& entry,
                                std::map<std::string, std::string>* env) {
  std::set<std::string> names;
  for (const auto& n : entry.value("secrets", json::array())) {
    if (n.is_string()) names.insert(n.get<std::string>());
  }
  if (names.empty()) {
    rt.secret_versions.clear();
    if (!secrets_base_.empty()) SecretFiles(secrets_base_ + "/" + rt.name).remove_all();
    return true;
  }
  if (secrets_base_.empty()) {
    rt.phase = "failed";
    rt.message = "no private folder for secret files (see the agent log)";
    return false;
  }
  const json w = entry.value("workload", json::object());
  const bool as_env = w.is_object() && w.contains("secret_env") && w["secret_env"] == true;
  const int64_t now = now_ms();
  SecretFiles files(secrets_base_ + "/" + rt.name);
  // A secret no longer delivered (deleted on the server) loses its files at once.
  std::set<std::string> present;
  for (const auto& name : names) {
    auto it = sealed_.find(name);
    if (it != sealed_.end() && active_secret_version(it->second, now) != nullptr) {
      present.insert(name);
    }
  }
  if (present.empty()) {
    files.remove_all();
  } else {
    files.remove_except(present);
  }
  std::map<std::string, int64_t> versions;
  for (const auto& name : names) {
    auto it = sealed_.find(name);
    const SealedSecretVersion* v =
        it == sealed_.end() ? nullptr : active_secret_version(it->second, now);
    if (v == nullptr) {
      rt.phase = "pending";
      rt.message = "waiting for secret " + name + " (not delivered to this device yet)";
      return false;
    }
    auto values = open_secret_version(name, *v, device_key_);
    if (!values) {
      rt.phase = "failed";
      rt.message = values.error().message;
      return false;
    }
    auto written = files.write(name, v->version, *values);
    if (written && as_env && env != nullptr) {
      for (const auto& [key, value] : *values) {
        if (value.find('\0') == std::string::npos) (*env)[secret_env_name(name, key)] = value;
      }
    }
    for (auto& [key, value] : *values) crypto::wipe(value);
    if (!written) {
      rt.phase = "failed";
      rt.message = written.error().message;
      return false;
    }
    versions[name] = v->version;
  }
  files.remove_except(names);
  if (env != nullptr) (*env)["OUTPOST_SECRETS_DIR"] = files.dir();
  rt.secret_versions = std::move(versions);
  return true;
}

void Agent::rotate_secrets() {
  const int64_t now = now_ms();
  for (auto& [name, rtp] : deployments_) {
    Runtime& rt = *rtp;
    if (!rt.process || rt.process_key.empty()) continue;
    auto entry = rt.entry_of(rt.process_key);
    if (!entry) continue;
    std::map<std::string, int64_t> wanted;
    bool missing = false;
    for (const auto& n : entry->value("secrets", json::array())) {
      if (!n.is_string()) continue;
      auto it = sealed_.find(n.get<std::string>());
      const SealedSecretVersion* v =
          it == sealed_.end() ? nullptr : active_secret_version(it->second, now);
      if (v == nullptr) {
        missing = true;
      } else {
        wanted[n.get<std::string>()] = v->version;
      }
    }
    if (!missing && wanted == rt.secret_versions) continue;
    std::string what;
    for (const auto& [secret, version] : wanted) {
      auto had = rt.secret_versions.find(secret);
      if (had != rt.secret_versions.end() && had->second == version) continue;
      what += (what.empty() ? "" : ", ") + secret + " version " + std::to_string(version);
    }
    if (missing) what += (what.empty() ? "" : ", ") + std::string("a secret was withdrawn");
    const json w = entry->value("workload", json::object());
    const bool sighup = w.is_object() && w.value("on_secret_rotate", "restart") == "sighup";
    spdlog::info("deployment {}: secrets now {}; {}", rt.name, what,
                 sighup && !missing ? "SIGHUP" : "restarting the workload");
    record_event(rt.name, revision_of_key(rt.process_key), "secret-rotate", what);
    if (sighup && !missing && materialize_secrets(rt, *entry, nullptr) &&
        rt.process->signal(SIGHUP)) {
      continue;
    }
    const std::string key = rt.process_key;
    stop_process(rt);
    ensure_running(rt, key);
  }
}

json Agent::secrets_report() const {
  std::set<std::string> names;
  for (const auto& [name, rt] : deployments_) {
    if (!rt->entry.is_object()) continue;
    for (const auto& n : rt->entry.value("secrets", json::array())) {
      if (n.is_string()) names.insert(n.get<std::string>());
    }
  }
  const int64_t now = now_ms();
  json out = json::array();
  for (const auto& name : names) {
    json item = {{"name", name}, {"version", 0}};
    if (auto it = sealed_.find(name); it != sealed_.end()) {
      if (const auto* active = active_secret_version(it->second, now)) {
        item["version"] = active->version;
      }
      if (const auto* staged = staged_secret_version(it->second, now)) {
        item["staged"] = staged->version;
        item["staged_at"] = staged->activate_at;
      }
    }
    out.push_back(std::move(item));
  }
  return out;
}

void Agent::collect_garbage() {
  // Keep what any deployment runs, keeps for rollback, or is about to run; drop the rest.
  std::vector<std::string> keep_digests;
  for (auto& [name, rt] : deployments_) {
    std::vector<std::string> keep_keys;
    for (const std::string& key : {rt->ptr.current, rt->ptr.previous, rt->target}) {
      if (key.empty()) continue;
      keep_keys.push_back(key);
      if (auto entry = rt->entry_of(key)) {
        for (auto& d : needed_artifacts(*entry)) keep_digests.push_back(d);
      }
    }
    if (!rt->entry.is_null()) {
      for (auto& d : needed_artifacts(rt->entry)) keep_digests.push_back(d);
    }
    rt->dir.remove_except(keep_keys);
    std::erase_if(rt->entries, [&](const auto& kv) {
      return std::find(keep_keys.begin(), keep_keys.end(), kv.first) == keep_keys.end();
    });
  }
  // Deployment folders of deployments the desired state no longer has; only with a verified
  // desired state in hand (an unreadable one must not wipe what the site runs).
  for (const auto& name : list_deployment_dirs(options_.data_dir)) {
    if (generation_ > 0 && !deployments_.contains(name)) {
      remove_deployment_dir(options_.data_dir, name);
    }
  }
  if (fetcher_) {
    for (auto& d : fetcher_->wanted()) keep_digests.push_back(d);
  }
  for (const auto& digest : artifacts_.list()) {
    if (std::find(keep_digests.begin(), keep_digests.end(), digest) == keep_digests.end()) {
      spdlog::info("removing unused artifact {}", digest);
      artifacts_.remove(digest);
    }
  }
}

DeploymentReport Agent::deployment_report(const Runtime& rt) const {
  auto revision_of = [&](const std::string& key) -> std::optional<int64_t> {
    if (key.empty()) return std::nullopt;
    auto dash = key.find('-');
    return std::atoll(key.substr(1, dash - 1).c_str());
  };
  DeploymentReport r;
  r.name = rt.name;
  r.revision = rt.entry.value("revision", static_cast<int64_t>(0));
  r.key = rt.target;
  r.phase = rt.phase;
  r.message = rt.message;
  r.restarts = rt.restarts;
  // Of the revision running now (what a rollout's restart gate reads).
  r.revision_restarts =
      rt.process && rt.process_key == rt.ptr.current ? rt.process->snapshot().restarts : 0;
  r.bytes_downloaded = rt.bytes_downloaded;
  r.current_revision = revision_of(rt.ptr.current);
  r.previous_revision = revision_of(rt.ptr.previous);
  return r;
}

void Agent::report_if_changed(bool periodic) {
  std::vector<DeploymentReport> deployments;
  for (const auto& [name, rt] : deployments_) deployments.push_back(deployment_report(*rt));
  std::vector<std::string> held = artifacts_.list();
  std::sort(held.begin(), held.end());
  StatusReportDraft draft =
      draft_status_report(generation_, now_ms(), kAgentVersion, deployments, held);
  json secrets = secrets_report();
  draft.signature += secrets.dump();  // a switch is a change worth a report
  draft.report["secrets"] = std::move(secrets);
  if (!report_due(draft.signature, last_report_, periodic, outbox_->pending() == 0)) return;
  json report = std::move(draft.report);
  std::string signature = std::move(draft.signature);
  json stable = stable_facts(facts_);
  if (stable != reported_facts_) {
    report["facts"] = facts_;
  }
  if (options_.relay_stats) report["relay"] = options_.relay_stats();
  auto seq = outbox_->enqueue(std::move(report));
  if (!seq) {
    spdlog::error("cannot queue a status report: {}", seq.error().message);
    return;
  }
  if (stable != reported_facts_) {
    // Queued durably: it will reach the server; do not send the facts again.
    reported_facts_ = stable;
    (void)write_file_durably(options_.data_dir + "/facts.json", stable.dump());
  }
  last_report_ = signature;
  last_report_at_ = now_ms();
}

void Agent::publish_snapshot() {
  json deployments = json::array();
  for (const auto& [name, rt] : deployments_) {
    json d = deployment_report_json(deployment_report(*rt));
    if (rt->process) {
      WorkloadEvent ev = rt->process->snapshot();
      d["process"] = {{"pid", ev.pid},
                      {"state", workload_state_name(ev.state)},
                      {"port", rt->port},
                      {"limits", ev.limits_note}};
    }
    deployments.push_back(std::move(d));
  }
  json snap = {{"device_id", identity_.device_id},
               {"server", identity_.server},
               {"server_in_use", identity_.url()},
               {"server_failovers", identity_.servers ? identity_.servers->failovers() : 0},
               {"site", identity_.site},
               {"generation", generation_},
               {"online", online_},
               {"link_error", link_error_},
               {"last_sync_at", last_sync_ms_},
               {"status_queued", outbox_ ? outbox_->pending() : 0},
               {"agent_version", kAgentVersion},
               {"secrets", secrets_report()},
               {"deployments", std::move(deployments)}};
  std::lock_guard lock(snapshot_mu_);
  snapshot_ = std::move(snap);
}

json Agent::status() const {
  json out;
  {
    std::lock_guard lock(snapshot_mu_);
    out = snapshot_;
  }
  if (outbox_) out["status_queued"] = outbox_->pending();  // live: the sender moves on its own
  if (options_.relay_stats) out["relay"] = options_.relay_stats();
  if (release_) out["release"] = release_->status();
  if (telemetry_) {
    json t = telemetry_->stats_json();
    out["telemetry"] = {
        {"buffered_records", t["buffer"]["records"]},   {"buffer_bytes", t["buffer"]["used_bytes"]},
        {"acked_seq", t["buffer"]["acked_seq"]},        {"dropped", t["dropped"]},
        {"batches_sent", t["shipper"]["batches_sent"]}, {"last_error", t["last_error"]}};
  }
  return out;
}

json Agent::telemetry_status() const {
  return telemetry_ ? telemetry_->stats_json() : json::object();
}

}  // namespace outpost::agent
