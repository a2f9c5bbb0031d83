#include "sim/fleet.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <mutex>
#include <optional>
#include <queue>
#include <random>
#include <sstream>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include "agent/activate/revisions.h"
#include "agent/device_api.h"
#include "agent/serve/serving_metrics.h"
#include "agent/sync/desired_sync.h"
#include "agent/telemetry/aggregator.h"
#include "common/crypto.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/telemetry_batch.h"
#include "sim/http_transport.h"

namespace outpost::sim {

namespace asio = boost::asio;

// Not an anonymous namespace: Fleet::Impl holds these (GCC's -Wsubobject-linkage).
namespace fleet_detail {

using json = nlohmann::json;
namespace wire = outpost::telemetry;

constexpr const char* kSimAgentVersion = "0.1.0-sim";
constexpr size_t kOutboxBound = 1'000;     // the agent's StatusOutbox default
constexpr size_t kTelemetryBound = 5'000;  // records a virtual device keeps unacknowledged
constexpr size_t kTelemetryBatchRecords = 1'000;
constexpr size_t kErrorKindsKept = 40;

int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Latency buckets in ms, 15% apart from 50 us to two minutes: percentiles within a few %.
std::vector<double> latency_bounds_ms() {
  std::vector<double> b;
  for (double v = 0.05; v < 120'000; v *= 1.15) b.push_back(v);
  return b;
}

// Deferred work on one event loop: a heap of (when, fn) and one asio timer for the earliest.
// 100,000 devices need several timers each; one heap costs less than as many asio timers.
class Timers {
 public:
  explicit Timers(asio::io_context& io) : timer_(io) {}

  void after(int64_t ms, std::function<void()> fn) {
    const int64_t when = steady_ms() + std::max<int64_t>(ms, 0);
    heap_.push_back({when, seq_++, std::move(fn)});
    std::push_heap(heap_.begin(), heap_.end(), Later{});
    if (when < armed_for_) arm(when);
  }
  void clear() {
    heap_.clear();
    armed_for_ = INT64_MAX;
    timer_.cancel();
  }
  size_t size() const { return heap_.size(); }

 private:
  struct Item {
    int64_t when;
    uint64_t seq;
    std::function<void()> fn;
  };
  struct Later {
    bool operator()(const Item& a, const Item& b) const {
      return a.when != b.when ? a.when > b.when : a.seq > b.seq;
    }
  };
  void arm(int64_t when) {
    armed_for_ = when;
    timer_.expires_at(std::chrono::steady_clock::time_point(std::chrono::milliseconds(when)));
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      fire();
    });
  }
  void fire() {
    armed_for_ = INT64_MAX;
    const int64_t now = steady_ms();
    // Run what is due; work it schedules for now runs in the next round (no starvation).
    std::vector<std::function<void()>> due;
    while (!heap_.empty() && heap_.front().when <= now) {
      std::pop_heap(heap_.begin(), heap_.end(), Later{});
      due.push_back(std::move(heap_.back().fn));
      heap_.pop_back();
    }
    if (!heap_.empty()) arm(heap_.front().when);
    for (auto& fn : due) fn();
  }

  asio::steady_timer timer_;
  std::vector<Item> heap_;
  uint64_t seq_ = 0;
  int64_t armed_for_ = INT64_MAX;
};

// What one deployment is on a virtual device.
struct Workload {
  std::string name;
  int64_t revision = 0;  // desired
  std::string key;       // revision_key of the desired entry
  std::string phase;     // starting | running | rolled-back | failed
  std::string message;
  std::optional<int64_t> current;   // what runs
  std::optional<int64_t> previous;  // what ran before
  std::string running_key;          // key of what runs
  bool running_counted = false;     // counted in the shard's running map under `current`
  uint64_t activation = 0;          // token of the pending activation; 0: none
  json sim = json::object();        // config.sim of the desired revision
  std::string model, version;       // of the desired revision ("" = no model)
  // The stand-in model of what runs: the agent's own metrics object and its last baseline.
  std::unique_ptr<agent::serve::ModelMetrics> metrics;
  std::optional<agent::serve::MetricsSnapshot> baseline;
  json running_sim = json::object();  // config.sim of what runs
  int64_t interval_start_ms = 0;      // steady ms the open telemetry interval began
};

struct Device {
  int64_t index = 0;
  int64_t site_index = 0;
  std::string site;
  agent::Identity id;
  std::string secret_key;  // the device key (raw), kept in the --state file
  bool enrolled = false;
  int enroll_attempts = 0;
  std::mt19937_64 rng;

  int64_t generation = 0;
  std::map<std::string, Workload> workloads;
  int64_t pending_activations = 0;
  bool online = false;
  bool converged = false;
  int64_t last_answer_ms = 0;  // steady ms of the last answer from the server

  // sync
  std::unique_ptr<HttpTransport::Channel> channel;  // long-poll mode
  agent::Backoff sync_backoff{1'000, 60'000};
  bool sync_in_flight = false;
  bool hung_up = false;  // we closed the poll because the simulated link went down

  // status (the agent's outbox, in memory)
  int64_t status_seq = 0;
  std::deque<std::string> outbox;
  int64_t status_dropped = 0;
  bool status_busy = false;  // in flight or waiting for its retry
  agent::Backoff status_backoff{1'000, 60'000};
  std::string last_signature;
  int64_t last_report_ms = 0;

  // telemetry (the agent's buffer, in memory)
  int64_t telemetry_seq = 0;
  struct Pending {
    int64_t seq;
    char kind;  // h, e, i
    std::string text;
  };
  std::deque<Pending> telemetry;
  wire::DropCounts dropped;
  bool telemetry_busy = false;
  agent::Backoff telemetry_backoff{1'000, 60'000};
};

// Signs a request as the virtual device, at the moment it goes out (as the agent's clients do).
agent::ApiRequest signed_as(const Device& d, agent::ApiRequest request) {
  if (d.id.signer)
    request.headers.push_back(d.id.signer->header(request.method, request.path, request.body));
  return request;
}

json sim_facts() {
  return {{"arch", "x86_64"},
          {"cpu_model", "simulated"},
          {"cores", 4},
          {"memory_mb", 4096},
          {"disk_free_mb", 20'000},
          {"disk_total_mb", 32'000},
          {"os", "Outpost simulator"},
          {"kernel", "sim"},
          {"agent_version", kSimAgentVersion},
          {"accelerator", "cpu"},
          {"accelerators", json::array()}};
}

double number_at(const json& obj, const char* key, double fallback) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_number() ? it->get<double>() : fallback;
}

enum Kind { kEnroll = 0, kSync, kStatus, kTelemetry, kCheck, kKinds };
const char* kind_name(int k) {
  static const char* names[] = {"enroll", "sync", "status", "telemetry", "check"};
  return names[k];
}

}  // namespace fleet_detail

using namespace fleet_detail;

// One event loop's devices and everything they need.
class Shard {
 public:
  struct Counters {
    std::atomic<int64_t> enrolled{0}, enroll_failed{0}, connected{0}, converged{0}, updates{0},
        requests{0}, errors{0}, faults{0}, wire_bytes{0}, reports_sent{0}, reports_refused{0},
        telemetry_batches{0}, telemetry_records{0}, telemetry_refused{0}, telemetry_dropped{0},
        activations{0}, crashes{0}, checked{0}, check_converged{0}, check_behind{0},
        check_errors{0}, measured_requests{0};
  };

  Shard(const FleetOptions& options, const LinkModel& link, HttpTransport::Options transport)
      : options_(options),
        link_(link),
        transport_(io_, std::move(transport)),
        timers_(io_),
        work_(asio::make_work_guard(io_)) {
    for (int k = 0; k < kKinds; ++k) {
      latency_.push_back(std::make_unique<agent::serve::Histogram>(latency_bounds_ms()));
    }
  }

  void add(std::unique_ptr<Device> d) { devices_.push_back(std::move(d)); }
  std::vector<std::unique_ptr<Device>>& devices() { return devices_; }
  const Counters& counters() const { return c_; }
  asio::io_context& io() { return io_; }
  void run_loop() { io_.run(); }

  // Enrolls every device that has no identity yet, `parallel` at a time.
  void enroll(std::map<int64_t, std::string> tokens, int parallel) {
    asio::post(io_, [this, tokens = std::move(tokens), parallel] {
      tokens_ = tokens;
      enroll_parallel_ = std::max(parallel, 1);
      for (auto& d : devices_) {
        if (d->enrolled) ++c_.enrolled;
      }
      enroll_next();
    });
  }
  bool enrollment_done() const {
    return c_.enrolled.load() + c_.enroll_failed.load() >= static_cast<int64_t>(devices_.size());
  }

  // Starts every enrolled device, spread over `ramp_ms`; `start` is the run's steady time zero.
  void start(int64_t start_ms) {
    asio::post(io_, [this, start_ms] {
      start_ms_ = start_ms;
      // An agent keeps its sequence numbers on disk; a virtual device starts from the run's
      // start time (2^20 numbers a second), so a later run with the same --state continues
      // above everything an earlier one sent and the server takes its reports as new.
      const int64_t seq_base = (unix_ms() / 1000) << 20;
      for (auto& dp : devices_) {
        Device& d = *dp;
        if (!d.enrolled) continue;
        d.status_seq = seq_base;
        d.telemetry_seq = seq_base;
        d.sync_backoff = agent::Backoff(1'000, options_.backoff_max_ms);
        d.status_backoff = agent::Backoff(1'000, options_.backoff_max_ms);
        d.telemetry_backoff = agent::Backoff(1'000, options_.backoff_max_ms);
        const int64_t delay = options_.ramp_ms > 0 ? std::uniform_int_distribution<int64_t>(
                                                         0, options_.ramp_ms)(d.rng)
                                                   : 0;
        timers_.after(delay, [this, &d] { begin(d); });
      }
      if (options_.link.profile == Profile::kOfflineDaily ||
          options_.link.profile == Profile::kPartition) {
        watch_links();
      }
    });
  }

  // Stops the devices, then asks the server per device whether it runs its newest desired
  // state; the loop ends when every answer is in.
  void stop_and_check() {
    asio::post(io_, [this] {
      stopping_ = true;
      timers_.clear();
      run_queued_max_ = transport_.stats().queued_max;  // the check queues everyone at once
      // What the devices queued and never sent does not hold up the check.
      transport_.drop_queued();
      for (auto& d : devices_) {
        if (d->channel) d->channel->close();
      }
      checking_ = 0;
      for (auto& dp : devices_) {
        Device& d = *dp;
        if (!d.enrolled) continue;
        ++checking_;
        transport_.send(signed_as(d, agent::desired_request(d.generation, 0)), d.id.credential,
                        [this, &d](Result<HttpResponse> r, HttpTransport::Exchange info) {
                          observe(kCheck, info);
                          ++c_.checked;
                          if (!r) {
                            ++c_.check_errors;
                            count_error("check", r.error().message);
                          } else if (r->status == 304) {
                            if (d.pending_activations == 0) {
                              ++c_.check_converged;
                            } else {
                              ++c_.check_behind;
                            }
                          } else if (r->status == 200) {
                            ++c_.check_behind;
                          } else {
                            ++c_.check_errors;
                            count_error("check", error_from_response(*r).message);
                          }
                          if (--checking_ == 0) finish();
                        });
      }
      if (checking_ == 0) finish();
    });
  }

  // deployment -> revision -> devices running it (thread-safe copy).
  std::map<std::string, std::map<int64_t, int64_t>> running() const {
    std::lock_guard lock(running_mu_);
    return running_;
  }
  std::map<std::string, int64_t> error_kinds() const {
    std::lock_guard lock(running_mu_);
    return error_kinds_;
  }
  agent::serve::Histogram::Snapshot latency(int kind) const { return latency_[kind]->snapshot(); }
  int64_t run_queued_max() const { return run_queued_max_; }
  HttpTransport::Stats transport_stats() {
    // Read on the loop's thread; after the loop ended, directly.
    return transport_.stats();
  }

 private:
  int64_t elapsed() const { return steady_ms() - start_ms_; }
  bool link_up(const Device& d) const { return link_.up(d.index, d.site_index, elapsed()); }

  void observe(int kind, const HttpTransport::Exchange& info) {
    // Enrollment and the final check are their own phases; the run's after the warm-up.
    if (kind != kEnroll && kind != kCheck && elapsed() < options_.warmup_ms) return;
    latency_[kind]->observe(static_cast<double>(info.duration_us) / 1000.0);
  }

  void count_error(const std::string& what, const std::string& message) {
    ++c_.errors;
    std::lock_guard lock(running_mu_);
    std::string key = what + ": " + message.substr(0, 160);
    if (error_kinds_.size() >= kErrorKindsKept && !error_kinds_.contains(key)) key = "other";
    ++error_kinds_[key];
  }

  void set_online(Device& d, bool online) {
    if (d.online == online) return;
    d.online = online;
    c_.connected += online ? 1 : -1;
  }
  void set_converged(Device& d) {
    const bool now = d.generation > 0 && d.pending_activations == 0;
    if (d.converged == now) return;
    d.converged = now;
    c_.converged += now ? 1 : -1;
  }
  void count_running(Workload& w, bool add) {
    if (w.running_counted == add || !w.current) return;
    w.running_counted = add;
    std::lock_guard lock(running_mu_);
    running_[w.name][*w.current] += add ? 1 : -1;
    if (running_[w.name][*w.current] == 0) running_[w.name].erase(*w.current);
    if (running_[w.name].empty()) running_.erase(w.name);
  }

  void finish() {
    transport_.shutdown();
    work_.reset();
  }

  // --- enrollment ---
  void enroll_next() {
    if (stopping_) return;
    while (enrolling_ < enroll_parallel_ && next_enroll_ < devices_.size()) {
      Device& d = *devices_[next_enroll_++];
      if (d.enrolled) continue;
      enroll_one(d);
    }
  }

  void enroll_one(Device& d) {
    ++enrolling_;
    agent::EnrollRequest request;
    request.server = options_.devices_via.empty() ? options_.server : options_.devices_via;
    auto token = tokens_.find(d.site_index);
    if (token == tokens_.end()) token = tokens_.find(-1);
    request.token = token == tokens_.end() ? std::string() : token->second;
    request.site = options_.enroll_token.empty() ? d.site : std::string();
    request.labels = options_.labels;
    request.facts = sim_facts();
    const auto keys = crypto::ed25519_generate();
    transport_.send(
        agent::enroll_request(request, crypto::base64_encode(keys.public_key)), "",
        [this, &d, request, keys](Result<HttpResponse> r, HttpTransport::Exchange info) {
          observe(kEnroll, info);
          c_.wire_bytes += info.wire_bytes;
          ++c_.requests;
          --enrolling_;
          const bool retry = !r || r->status >= 500 || r->status == 429 || r->status == 408;
          auto id = agent::enroll_answer(r, request, options_.server);
          if (id) {
            d.id = std::move(*id);
            d.id.signer = std::make_shared<reqsig::Signer>(d.id.device_id, keys.secret_key);
            d.secret_key = keys.secret_key;
            d.site = d.id.site;
            d.enrolled = true;
            ++c_.enrolled;
          } else if (retry && ++d.enroll_attempts < 8) {
            count_error("enroll", id.error().message);
            ++enrolling_;
            timers_.after(agent::Backoff::capped_ms(d.enroll_attempts, 500, 10'000), [this, &d] {
              --enrolling_;
              enroll_one(d);
            });
          } else {
            count_error("enroll", id.error().message);
            ++c_.enroll_failed;
          }
          enroll_next();
        });
  }

  // --- the network, as one device sees it ---
  using Answer = std::function<void(Result<HttpResponse>, bool simulated_fault)>;

  // Sends as device `d` with its link's faults: down -> fails at once; lost before -> fails
  // after the delay without reaching the server; lost after -> the server handled it, the
  // answer is dropped (and the connection with it); a bandwidth cap adds the transfer time.
  void exchange(Device& d, agent::ApiRequest request, int kind, bool on_channel, Answer answer) {
    if (!link_up(d)) {
      asio::post(io_, [answer = std::move(answer)] {
        answer(make_error(Errc::kUnavailable,
                          "network is unreachable (simulated: the device's link is down)"),
               true);
      });
      return;
    }
    const Faults f = link_.draw(d.rng);
    auto go = [this, &d, request = std::move(request), kind, on_channel, f,
               answer = std::move(answer)]() mutable {
      if (stopping_) return;
      if (f.lost_before) {
        answer(make_error(Errc::kUnavailable, "connection lost (simulated: flaky link)"), true);
        return;
      }
      auto done = [this, &d, kind, on_channel, f, answer = std::move(answer)](
                      Result<HttpResponse> r, HttpTransport::Exchange info) mutable {
        // After the stop, what ends (queued requests failed at once, polls hung up) is the
        // simulator winding down, not the server's answers: not counted.
        if (stopping_) return;
        ++c_.requests;
        if (elapsed() >= options_.warmup_ms) ++c_.measured_requests;
        c_.wire_bytes += info.wire_bytes;
        // A held long-poll's time is the server waiting on purpose, not latency.
        if (kind != kSync || options_.sync_interval_ms > 0) observe(kind, info);
        if (f.lost_after && r) {
          if (on_channel && d.channel) d.channel->close();
          answer(make_error(Errc::kUnavailable, "answer lost (simulated: flaky link)"), true);
          return;
        }
        const int64_t transfer = link_.transfer_ms(info.wire_bytes);
        if (transfer <= 0) return answer(std::move(r), false);
        auto shared = std::make_shared<Result<HttpResponse>>(std::move(r));
        timers_.after(transfer, [shared, answer = std::move(answer)]() mutable {
          answer(std::move(*shared), false);
        });
      };
      if (on_channel) {
        d.channel->send(signed_as(d, request), d.id.credential, std::move(done));
      } else {
        transport_.send(signed_as(d, request), d.id.credential, std::move(done));
      }
    };
    if (f.delay_ms > 0) {
      timers_.after(f.delay_ms, std::move(go));
    } else {
      go();
    }
  }

  // --- a device's life ---
  void begin(Device& d) {
    if (stopping_) return;
    if (options_.sync_interval_ms > 0) {
      poll(d);
    } else {
      d.channel = transport_.channel(static_cast<size_t>(d.index));
      long_poll(d);
    }
    if (options_.telemetry_interval_ms > 0) {
      const int64_t first =
          std::uniform_int_distribution<int64_t>(1, options_.telemetry_interval_ms)(d.rng);
      timers_.after(first, [this, &d] { telemetry_tick(d); });
    }
    timers_.after(options_.status_period_ms, [this, &d] { status_tick(d); });
  }

  void long_poll(Device& d) {
    if (stopping_ || d.sync_in_flight) return;
    d.sync_in_flight = true;
    d.hung_up = false;
    exchange(d, agent::desired_request(d.generation, options_.long_poll_s), kSync, true,
             [this, &d](Result<HttpResponse> r, bool fault) {
               d.sync_in_flight = false;
               if (stopping_) return;
               const bool ok = on_sync_answer(d, std::move(r), fault || d.hung_up);
               if (ok) {
                 d.sync_backoff.reset();
                 asio::post(io_, [this, &d] { long_poll(d); });
               } else {
                 timers_.after(d.sync_backoff.next_ms(), [this, &d] { long_poll(d); });
               }
             });
  }

  // Polls every sync_interval on the clock (not from the last answer), so a fleet of N
  // devices asks N / interval times a second however long the answers take.
  void poll(Device& d) {
    if (stopping_) return;
    const int64_t due = steady_ms() + options_.sync_interval_ms;
    exchange(d, agent::desired_request(d.generation, 0), kSync, false,
             [this, &d, due](Result<HttpResponse> r, bool fault) {
               if (stopping_) return;
               const bool ok = on_sync_answer(d, std::move(r), fault);
               int64_t next = std::max<int64_t>(due - steady_ms(), 0);
               if (ok) {
                 d.sync_backoff.reset();
               } else {
                 next = std::min(next, d.sync_backoff.next_ms());
               }
               timers_.after(next, [this, &d] { poll(d); });
             });
  }

  // True when the server answered usefully (the link is good).
  bool on_sync_answer(Device& d, Result<HttpResponse> r, bool fault) {
    agent::SyncAnswer answer = agent::desired_answer(std::move(r), d.generation, d.id);
    if (answer.kind == agent::SyncAnswer::Kind::kProblem) {
      if (fault || !link_up(d)) {
        ++c_.faults;
      } else {
        count_error("sync", answer.problem);
      }
      set_online(d, false);
      return false;
    }
    d.last_answer_ms = steady_ms();
    set_online(d, true);
    if (answer.kind == agent::SyncAnswer::Kind::kNew) apply(d, std::move(*answer.state));
    // The first answer makes the first report (the agent reports once it knows its state).
    if (d.last_report_ms == 0) report(d, false);
    return true;
  }

  void apply(Device& d, agent::DesiredState state) {
    ++c_.updates;
    d.generation = state.generation;
    std::map<std::string, bool> seen;
    for (const auto& entry : state.doc["deployments"]) {
      const std::string name = entry["name"].get<std::string>();
      seen[name] = true;
      Workload& w = d.workloads[name];
      w.name = name;
      const std::string key = agent::revision_key(entry);
      if (w.key == key) continue;
      w.key = key;
      w.revision = entry["revision"].get<int64_t>();
      w.sim = json::object();
      if (auto cfg = entry.find("config"); cfg != entry.end() && cfg->is_object()) {
        if (auto s = cfg->find("sim"); s != cfg->end() && s->is_object()) w.sim = *s;
      }
      w.model.clear();
      w.version.clear();
      if (auto m = entry.find("model"); m != entry.end() && m->is_object()) {
        w.model = m->value("name", "");
        w.version = m->value("version", "");
      }
      if (w.running_key == key) {
        // Back to what already runs (a rollback of a revision still being activated).
        if (w.activation != 0) --d.pending_activations;
        w.activation = 0;
        w.phase = "running";
        w.message.clear();
        continue;
      }
      w.phase = "starting";
      w.message.clear();
      if (w.activation == 0) ++d.pending_activations;
      const uint64_t token = ++activation_tokens_;
      w.activation = token;
      const int64_t base = std::max<int64_t>(options_.activate_ms, 0);
      const int64_t delay =
          base == 0 ? 0 : std::uniform_int_distribution<int64_t>(base / 2, base + base / 2)(d.rng);
      timers_.after(delay, [this, &d, name, token] { activate(d, name, token); });
    }
    for (auto it = d.workloads.begin(); it != d.workloads.end();) {
      if (seen.contains(it->first)) {
        ++it;
        continue;
      }
      close_interval(d, it->second);
      count_running(it->second, false);
      if (it->second.activation != 0) --d.pending_activations;
      it = d.workloads.erase(it);
    }
    set_converged(d);
    report(d, false);
  }

  // The stand-in workload has "started" (or crashed, when config.sim.crash is true).
  void activate(Device& d, const std::string& name, uint64_t token) {
    if (stopping_) return;
    auto it = d.workloads.find(name);
    if (it == d.workloads.end() || it->second.activation != token) return;
    Workload& w = it->second;
    w.activation = 0;
    --d.pending_activations;
    ++c_.activations;
    if (w.sim.value("crash", false)) {
      ++c_.crashes;
      w.message = "revision " + std::to_string(w.revision) +
                  " failed to start: exited with code 3 (simulated crash)";
      w.phase = w.current ? "rolled-back" : "failed";
      event(d, name, w.revision, "rollback", w.message);
    } else {
      close_interval(d, w);
      count_running(w, false);
      w.previous = w.current;
      w.current = w.revision;
      w.running_key = w.key;
      w.running_sim = w.sim;
      w.phase = "running";
      w.message.clear();
      count_running(w, true);
      w.metrics.reset();
      w.baseline.reset();
      w.interval_start_ms = steady_ms();
      if (!w.model.empty()) {
        w.metrics =
            std::make_unique<agent::serve::ModelMetrics>(name, w.model, w.version, "primary");
        w.metrics->set_revision(w.revision);
      }
      event(d, name, w.revision, "activate", "");
    }
    set_converged(d);
    report(d, false);
  }

  // --- status reports: the agent's report rule, its outbox bound and retry rule ---
  void report(Device& d, bool periodic) {
    std::vector<agent::DeploymentReport> deployments;
    for (const auto& [name, w] : d.workloads) {
      agent::DeploymentReport r;
      r.name = name;
      r.revision = w.revision;
      r.key = w.key;
      r.phase = w.phase;
      r.message = w.message;
      r.current_revision = w.current;
      r.previous_revision = w.previous;
      deployments.push_back(std::move(r));
    }
    agent::StatusReportDraft draft =
        agent::draft_status_report(d.generation, unix_ms(), kSimAgentVersion, deployments);
    if (!agent::report_due(draft.signature, d.last_signature, periodic, d.outbox.empty())) return;
    const std::string signature = std::move(draft.signature);
    json doc = std::move(draft.report);
    doc["seq"] = ++d.status_seq;
    d.outbox.push_back(doc.dump());
    while (d.outbox.size() > kOutboxBound) {
      d.outbox.pop_front();
      ++d.status_dropped;
    }
    d.last_signature = signature;
    d.last_report_ms = steady_ms();
    send_status(d);
  }

  void status_tick(Device& d) {
    if (stopping_) return;
    if (d.generation > 0) report(d, true);
    timers_.after(options_.status_period_ms, [this, &d] { status_tick(d); });
  }

  void send_status(Device& d) {
    if (stopping_ || d.status_busy || d.outbox.empty()) return;
    d.status_busy = true;
    std::string body = d.outbox.front();
    if (d.status_dropped > 0) {
      json doc = json::parse(body);
      doc["dropped_before"] = d.status_dropped;
      body = doc.dump();
    }
    const int64_t dropped = d.status_dropped;
    exchange(d, agent::status_request(std::move(body)), kStatus, false,
             [this, &d, dropped](Result<HttpResponse> r, bool fault) {
               if (stopping_) return;
               const agent::Delivery delivery = agent::upload_delivery(r);
               if (delivery != agent::Delivery::kRetry) {
                 if (delivery == agent::Delivery::kRefused) {
                   ++c_.reports_refused;
                   count_error("status", error_from_response(*r).message);
                 } else {
                   ++c_.reports_sent;
                 }
                 d.outbox.pop_front();
                 d.status_dropped -= std::min(d.status_dropped, dropped);
                 d.status_backoff.reset();
                 d.status_busy = false;
                 send_status(d);
                 return;
               }
               if (fault || !link_up(d)) {
                 ++c_.faults;
               } else {
                 count_error("status", r ? error_from_response(*r).message : r.error().message);
               }
               timers_.after(d.status_backoff.next_ms(), [this, &d] {
                 d.status_busy = false;
                 send_status(d);
               });
             });
  }

  // --- telemetry: health, the stand-in models' aggregates and events, shipped and acked ---
  void append(Device& d, wire::RecordBody body, char kind) {
    wire::Record record;
    record.seq = ++d.telemetry_seq;
    record.time = unix_ms();
    record.body = std::move(body);
    d.telemetry.push_back({record.seq, kind, wire::record_to_json(record).dump()});
    while (d.telemetry.size() > kTelemetryBound) {
      // The agent's rule, simplified: the oldest go, counted by class.
      const char k = d.telemetry.front().kind;
      (k == 'h' ? d.dropped.health : k == 'e' ? d.dropped.events : d.dropped.aggregates) += 1;
      d.telemetry.pop_front();
      ++c_.telemetry_dropped;
    }
  }

  void event(Device& d, const std::string& deployment, int64_t revision, const std::string& what,
             const std::string& message) {
    if (options_.telemetry_interval_ms <= 0) return;
    wire::EventRecord e;
    e.deployment = deployment;
    e.revision = revision;
    e.event = what;
    e.message = message.substr(0, wire::kMaxMessageLength);
    append(d, std::move(e), 'e');
  }

  // Serves the interval's stand-in inferences and appends the aggregate record, computed by
  // the agent's own inference_delta from its ModelMetrics.
  void close_interval(Device& d, Workload& w) {
    if (!w.metrics || options_.telemetry_interval_ms <= 0) return;
    const double mean_ms = std::max(number_at(w.running_sim, "latency_ms", 4.0), 0.01);
    const double error_rate = std::clamp(number_at(w.running_sim, "error_rate", 0.0), 0.0, 1.0);
    const double confidence = std::clamp(number_at(w.running_sim, "confidence", 0.9), 0.0, 1.0);
    const int64_t now_ms = steady_ms();
    const int64_t since = std::max<int64_t>(now_ms - w.interval_start_ms, 0);
    w.interval_start_ms = now_ms;
    const auto n = static_cast<int64_t>(
        std::llround(options_.inference_rate * static_cast<double>(since) / 1000.0));
    std::lognormal_distribution<double> latency(std::log(mean_ms / 1000.0), 0.25);
    std::normal_distribution<double> conf(confidence, 0.03);
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    for (int64_t i = 0; i < n; ++i) {
      w.metrics->count_request();
      w.metrics->count_served();
      w.metrics->observe_latency(latency(d.rng));
      if (unit(d.rng) < error_rate) {
        w.metrics->count_error();
      } else {
        w.metrics->observe_confidence(std::clamp(conf(d.rng), 0.0, 1.0));
      }
    }
    agent::serve::MetricsSnapshot now = w.metrics->snapshot();
    auto record = agent::telemetry::inference_delta(now, w.baseline ? &*w.baseline : nullptr);
    w.baseline = std::move(now);
    if (record) {
      record->interval_ms = std::max<int64_t>(since, 1);
      append(d, std::move(*record), 'i');
    }
  }

  void telemetry_tick(Device& d) {
    if (stopping_) return;
    wire::HealthRecord h;
    std::uniform_real_distribution<double> cpu(3.0, 30.0);
    h.cpu_percent = std::round(cpu(d.rng) * 100) / 100;
    h.mem_total = 4LL << 30;
    h.mem_used = (1LL << 30) + static_cast<int64_t>(d.rng() % (1ULL << 29));
    h.disk_total = 32LL << 30;
    h.disk_free = 20LL << 30;
    h.uptime_s = static_cast<double>(elapsed() / 1000);
    h.agent_rss = 16LL << 20;
    int64_t buffered = 0;
    for (const auto& p : d.telemetry) buffered += static_cast<int64_t>(p.text.size());
    h.buffer_bytes = buffered;
    h.sync_lag_s = d.online || d.last_answer_ms == 0
                       ? 0.0
                       : static_cast<double>((steady_ms() - d.last_answer_ms) / 1000);
    append(d, std::move(h), 'h');
    for (auto& [name, w] : d.workloads) close_interval(d, w);
    ship(d);
    timers_.after(options_.telemetry_interval_ms, [this, &d] { telemetry_tick(d); });
  }

  void ship(Device& d) {
    if (stopping_ || d.telemetry_busy || d.telemetry.empty()) return;
    d.telemetry_busy = true;
    std::vector<std::string> texts;
    const size_t n = std::min(d.telemetry.size(), kTelemetryBatchRecords);
    texts.reserve(n);
    for (size_t i = 0; i < n; ++i) texts.push_back(d.telemetry[i].text);
    const int64_t first = d.telemetry.front().seq;
    const int64_t last = d.telemetry[n - 1].seq;
    auto body = agent::telemetry_body(first, last, d.dropped, texts);
    if (!body) {
      count_error("telemetry", body.error().message);
      d.telemetry_busy = false;
      return;
    }
    exchange(d, agent::telemetry_request(std::move(body->compressed)), kTelemetry, false,
             [this, &d, first, last](Result<HttpResponse> r, bool fault) {
               if (stopping_) return;
               const agent::Delivery delivery = agent::upload_delivery(r);
               if (delivery == agent::Delivery::kDelivered) {
                 auto acked = agent::telemetry_acked(*r, first, last);
                 if (acked) {
                   ++c_.telemetry_batches;
                   while (!d.telemetry.empty() && d.telemetry.front().seq <= *acked) {
                     d.telemetry.pop_front();
                     ++c_.telemetry_records;
                   }
                   d.telemetry_backoff.reset();
                   d.telemetry_busy = false;
                   ship(d);
                   return;
                 }
                 count_error("telemetry", acked.error().message);
               } else if (delivery == agent::Delivery::kRefused) {
                 ++c_.telemetry_refused;
                 count_error("telemetry", error_from_response(*r).message);
                 while (!d.telemetry.empty() && d.telemetry.front().seq <= last) {
                   d.telemetry.pop_front();
                 }
                 d.telemetry_busy = false;
                 ship(d);
                 return;
               } else if (fault || !link_up(d)) {
                 ++c_.faults;
               } else {
                 count_error("telemetry", r ? error_from_response(*r).message : r.error().message);
               }
               timers_.after(d.telemetry_backoff.next_ms(), [this, &d] {
                 d.telemetry_busy = false;
                 ship(d);
               });
             });
  }

  // Links that go down cut the polls held on them (the server sees the hang-up).
  void watch_links() {
    if (stopping_) return;
    for (auto& dp : devices_) {
      Device& d = *dp;
      if (!d.enrolled) continue;
      if (!link_up(d)) {
        set_online(d, false);
        if (d.sync_in_flight && d.channel) {
          d.hung_up = true;
          d.channel->close();
        }
      }
    }
    timers_.after(250, [this] { watch_links(); });
  }

  const FleetOptions& options_;
  const LinkModel& link_;
  asio::io_context io_;
  HttpTransport transport_;
  Timers timers_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::vector<std::unique_ptr<Device>> devices_;
  Counters c_;
  std::vector<std::unique_ptr<agent::serve::Histogram>> latency_;
  mutable std::mutex running_mu_;
  std::map<std::string, std::map<int64_t, int64_t>> running_;  // guarded by running_mu_
  std::map<std::string, int64_t> error_kinds_;                 // guarded by running_mu_
  std::map<int64_t, std::string> tokens_;  // site index -> enrollment token (-1: for all)
  int enroll_parallel_ = 1;
  int enrolling_ = 0;
  size_t next_enroll_ = 0;
  int64_t start_ms_ = 0;
  uint64_t activation_tokens_ = 0;
  bool stopping_ = false;
  int64_t checking_ = 0;
  int64_t run_queued_max_ = 0;
};

struct Fleet::Impl {
  FleetOptions options;
  std::unique_ptr<LinkModel> link;
  std::vector<std::unique_ptr<Shard>> shards;
  std::vector<std::thread> threads;
  asio::ip::tcp::endpoint server;
  std::string host_header;
  std::vector<asio::ip::address> sources;
  std::vector<std::string> site_names;
  int64_t enroll_ms = 0;
  int64_t run_ms = 0;
  int64_t check_ms = 0;
  int64_t loaded_from_state = 0;
  // Lines of --state for devices past --devices: written back as they were, so a smaller run
  // does not forget devices a larger one enrolled.
  std::string state_beyond;
  bool ran = false;

  Status parse_server();
  Status load_state(std::vector<std::unique_ptr<Device>>& devices);
  Status save_state(const std::vector<Device*>& devices);
  Result<std::map<int64_t, std::string>> mint_tokens(const std::vector<int64_t>& per_site);
  Progress progress(int64_t elapsed, const std::string& phase) const;
};

Fleet::Fleet(FleetOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
}

Fleet::~Fleet() {
  for (auto& s : impl_->shards) s->stop_and_check();
  for (auto& t : impl_->threads) {
    if (t.joinable()) t.join();
  }
}

Status Fleet::Impl::parse_server() {
  const std::string& url = options.devices_via.empty() ? options.server : options.devices_via;
  const char* flag = options.devices_via.empty() ? "--server" : "--via";
  const std::string scheme = "http://";
  if (url.rfind(scheme, 0) != 0) {
    return make_error(Errc::kInvalidArgument,
                      std::string(flag) +
                          ": expected http://HOST:PORT (the simulator speaks plain HTTP), got \"" +
                          url + "\"",
                      flag + 2);
  }
  std::string rest = url.substr(scheme.size());
  if (auto slash = rest.find('/'); slash != std::string::npos) rest = rest.substr(0, slash);
  const auto colon = rest.rfind(':');
  const std::string host = colon == std::string::npos ? rest : rest.substr(0, colon);
  const std::string port = colon == std::string::npos ? "80" : rest.substr(colon + 1);
  asio::io_context io;
  asio::ip::tcp::resolver resolver(io);
  boost::system::error_code ec;
  auto results = resolver.resolve(host, port, ec);
  if (ec || results.empty()) {
    return make_error(Errc::kInvalidArgument,
                      "--server: cannot resolve " + rest + ": " + ec.message(), "server");
  }
  server = *results.begin();
  host_header = rest;
  return ok();
}

Status Fleet::prepare() {
  Impl& d = *impl_;
  FleetOptions& o = d.options;
  if (o.devices < 1) {
    return make_error(Errc::kInvalidArgument, "--devices: expected at least 1", "devices");
  }
  if (o.sites < 1 || o.sites > o.devices) {
    return make_error(Errc::kInvalidArgument,
                      "--sites: expected 1 to the number of devices (" + std::to_string(o.devices) +
                          "), got " + std::to_string(o.sites),
                      "sites");
  }
  if (o.threads < 1 || o.threads > 64) {
    return make_error(Errc::kInvalidArgument, "--threads: expected 1 to 64", "threads");
  }
  if (o.operator_token.empty() && o.enroll_token.empty()) {
    return make_error(Errc::kInvalidArgument,
                      "no operator token to mint enrollment tokens with: pass --token (or set "
                      "OUTPOST_TOKEN, or `outpost login`), or --enroll-token",
                      "token");
  }
  OUTPOST_TRY(d.parse_server());
  // Open files: one per held long-poll, the pools, and some for us.
  const int64_t pool = static_cast<int64_t>(o.connections) * o.threads;
  const int64_t needed = (o.sync_interval_ms == 0 ? o.devices : 0) + pool + 64;
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  if (limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
    getrlimit(RLIMIT_NOFILE, &limit);
  }
  if (static_cast<int64_t>(limit.rlim_cur) < needed) {
    return make_error(
        Errc::kInvalidArgument,
        "--devices " + std::to_string(o.devices) + " in long-poll mode need " +
            std::to_string(needed) +
            " open files (one held poll per device), and this process "
            "may open " +
            std::to_string(limit.rlim_cur) +
            ": poll on shared connections instead with --sync-interval 30s, or raise the limit "
            "(ulimit -n); the server needs as many",
        "devices");
  }
  // Several loopback source addresses, so one address pair's ephemeral ports do not bound us.
  if (d.server.address().is_loopback()) {
    const int64_t connections = (o.sync_interval_ms == 0 ? o.devices : 0) + pool;
    int n =
        o.source_addresses > 0 ? o.source_addresses : static_cast<int>(1 + connections / 20'000);
    d.sources = loopback_sources(n);
  } else if (o.source_addresses > 0) {
    return make_error(Errc::kInvalidArgument,
                      "--source-addresses: only for a server on a loopback address (127.x)",
                      "source-addresses");
  }
  if (o.link.profile == Profile::kPartition && o.link.partition_length_ms <= 0) {
    return make_error(Errc::kInvalidArgument, "--partition-length: expected a positive duration",
                      "partition-length");
  }
  d.link = std::make_unique<LinkModel>(o.link, o.sites);
  const int width = static_cast<int>(std::to_string(o.sites).size());
  for (int64_t s = 0; s < o.sites; ++s) {
    std::string num = std::to_string(s + 1);
    d.site_names.push_back(o.site_prefix + "-" + std::string(width - num.size(), '0') + num);
  }
  return ok();
}

Result<std::map<int64_t, std::string>> Fleet::Impl::mint_tokens(
    const std::vector<int64_t>& per_site) {
  std::map<int64_t, std::string> tokens;
  if (!options.enroll_token.empty()) {
    tokens[-1] = options.enroll_token;
    return tokens;
  }
  HttpClient client(options.server, options.operator_token);
  for (size_t s = 0; s < per_site.size(); ++s) {
    if (per_site[s] == 0) continue;
    json body = {{"site", site_names[s]}, {"uses", per_site[s]}, {"ttl", "24h"}};
    if (!options.labels.empty()) body["labels"] = options.labels;
    auto r = client.request("POST", "/api/v1/enrollment-tokens", body.dump());
    if (!r) return make_error(r.error().with_context("minting an enrollment token"));
    if (r->status != 201 && r->status != 200) {
      return make_error(
          error_from_response(*r).with_context("minting an enrollment token for " + site_names[s]));
    }
    auto doc = json::parse(r->body, nullptr, false);
    if (!doc.is_object() || !doc.contains("token") || !doc["token"].is_string()) {
      return make_error(Errc::kUnavailable, "the server's enrollment token answer has no token");
    }
    tokens[static_cast<int64_t>(s)] = doc["token"].get<std::string>();
  }
  return tokens;
}

// The state file: a header line, then one line per enrolled device.
Status Fleet::Impl::load_state(std::vector<std::unique_ptr<Device>>& devices) {
  if (options.state_file.empty()) return ok();
  auto text = read_file(options.state_file);
  if (!text) {
    if (text.error().code == Errc::kNotFound) return ok();
    return make_error(text.error().with_context("--state"));
  }
  std::istringstream in(*text);
  std::string line;
  bool header = true;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto doc = json::parse(line, nullptr, false);
    if (!doc.is_object()) {
      return make_error(Errc::kInvalidArgument,
                        "--state " + options.state_file + ": not a simulator state file", "state");
    }
    if (header) {
      header = false;
      if (doc.value("sites", options.sites) != options.sites ||
          doc.value("site_prefix", options.site_prefix) != options.site_prefix) {
        return make_error(Errc::kInvalidArgument,
                          "--state " + options.state_file + ": made with --sites " +
                              std::to_string(doc.value("sites", int64_t{0})) + " --site-prefix " +
                              doc.value("site_prefix", std::string("?")) +
                              "; use the same, another file, or delete it",
                          "state");
      }
      if (doc.value("server", "") != options.server) {
        return make_error(Errc::kInvalidArgument,
                          "--state " + options.state_file + ": its devices were enrolled with " +
                              doc.value("server", std::string("?")) + ", not " + options.server +
                              "; use another file or delete it",
                          "state");
      }
      continue;
    }
    const int64_t i = doc.value("i", int64_t{-1});
    if (i >= static_cast<int64_t>(devices.size())) state_beyond += line + "\n";
    if (i < 0 || i >= static_cast<int64_t>(devices.size())) continue;
    Device& d = *devices[static_cast<size_t>(i)];
    d.id.server = options.server;
    d.id.device_id = doc.value("id", "");
    d.id.credential = doc.value("credential", "");
    d.id.server_public_key = doc.value("server_public_key", "");
    d.id.site = doc.value("site", "");
    d.site = d.id.site;
    auto key = crypto::base64_decode(doc.value("secret_key", ""));
    if (key && key->size() == 64) {
      d.secret_key = *key;
      d.id.signer = std::make_shared<reqsig::Signer>(d.id.device_id, d.secret_key);
    }
    // Devices saved before calls were signed have no key: they enroll again.
    d.enrolled = !d.id.device_id.empty() && !d.id.credential.empty() && d.id.signer;
    loaded_from_state += d.enrolled ? 1 : 0;
  }
  return ok();
}

Status Fleet::Impl::save_state(const std::vector<Device*>& devices) {
  if (options.state_file.empty()) return ok();
  std::string out = json{{"server", options.server},
                         {"kind", "outpost-sim-state"},
                         {"sites", options.sites},
                         {"site_prefix", options.site_prefix}}
                        .dump() +
                    "\n";
  for (const Device* d : devices) {
    if (!d->enrolled) continue;
    out += json{{"i", d->index},
                {"id", d->id.device_id},
                {"credential", d->id.credential},
                {"secret_key", crypto::base64_encode(d->secret_key)},
                {"server_public_key", d->id.server_public_key},
                {"site", d->id.site}}
               .dump() +
           "\n";
  }
  out += state_beyond;
  auto written = write_file_durably(options.state_file, out, 0600);
  if (!written) return make_error(written.error().with_context("--state"));
  return ok();
}

Progress Fleet::Impl::progress(int64_t elapsed, const std::string& phase) const {
  Progress p;
  p.elapsed_ms = elapsed;
  p.phase = phase;
  p.devices = options.devices;
  agent::serve::Histogram::Snapshot sync;
  for (const auto& s : shards) {
    const auto& c = s->counters();
    p.enrolled += c.enrolled;
    p.connected += c.connected;
    p.converged += c.converged;
    p.updates += c.updates;
    p.requests += c.requests;
    p.errors += c.errors;
    p.faults += c.faults;
    for (const auto& [dep, revs] : s->running()) {
      for (const auto& [rev, n] : revs) p.running[dep][rev] += n;
    }
    auto snap = s->latency(kSync);
    if (sync.counts.empty()) {
      sync = snap;
    } else {
      for (size_t i = 0; i < sync.counts.size(); ++i) sync.counts[i] += snap.counts[i];
      sync.count += snap.count;
      sync.sum += snap.sum;
    }
  }
  p.sync_p99_ms = sync.count > 0 ? sync.quantile(0.99) : 0;
  return p;
}

Status Fleet::run(const std::atomic<bool>& stop,
                  const std::function<void(const Progress&)>& on_progress, int64_t progress_ms) {
  Impl& d = *impl_;
  FleetOptions& o = d.options;
  std::vector<std::unique_ptr<Device>> all;
  all.reserve(static_cast<size_t>(o.devices));
  std::vector<int64_t> per_site(static_cast<size_t>(o.sites), 0);
  for (int64_t i = 0; i < o.devices; ++i) {
    auto dev = std::make_unique<Device>();
    dev->index = i;
    dev->site_index = i % o.sites;
    dev->site = d.site_names[static_cast<size_t>(dev->site_index)];
    dev->rng.seed(o.link.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(i));
    all.push_back(std::move(dev));
  }
  OUTPOST_TRY(d.load_state(all));
  for (const auto& dev : all) {
    if (!dev->enrolled) ++per_site[static_cast<size_t>(dev->site_index)];
  }
  std::map<int64_t, std::string> tokens;
  if (std::any_of(per_site.begin(), per_site.end(), [](int64_t n) { return n > 0; })) {
    auto minted = d.mint_tokens(per_site);
    if (!minted) return make_error(minted.error());
    tokens = std::move(*minted);
  }
  std::vector<Device*> index;
  for (auto& dev : all) index.push_back(dev.get());

  // Shards: devices dealt round-robin so every loop gets every site.
  for (int t = 0; t < o.threads; ++t) {
    HttpTransport::Options transport;
    transport.host_header = d.host_header;
    transport.server = d.server;
    transport.sources = d.sources;
    transport.pool_size = o.connections;
    d.shards.push_back(std::make_unique<Shard>(o, *d.link, transport));
  }
  for (auto& dev : all) {
    d.shards[static_cast<size_t>(dev->index % o.threads)]->add(std::move(dev));
  }
  for (auto& s : d.shards) {
    d.threads.emplace_back([shard = s.get()] { shard->run_loop(); });
  }
  d.ran = true;

  const int64_t begin = steady_ms();
  int64_t next_progress = begin;
  auto tick = [&](const std::string& phase, int64_t since) {
    const int64_t now = steady_ms();
    if (progress_ms > 0 && now >= next_progress) {
      next_progress = now + progress_ms;
      on_progress(d.progress(now - since, phase));
    }
  };

  // 1. Enrollment.
  for (auto& s : d.shards) s->enroll(tokens, std::max(o.enroll_parallel / o.threads, 1));
  while (!std::all_of(d.shards.begin(), d.shards.end(),
                      [](const auto& s) { return s->enrollment_done(); })) {
    if (stop) break;
    tick("enrolling", begin);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  d.enroll_ms = steady_ms() - begin;
  OUTPOST_TRY(d.save_state(index));

  // 2. The run.
  const int64_t start = steady_ms();
  next_progress = start;
  if (!stop) {
    for (auto& s : d.shards) s->start(start);
    while (!stop && (o.duration_ms == 0 || steady_ms() - start < o.duration_ms)) {
      tick("running", start);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  d.run_ms = steady_ms() - start;
  if (progress_ms > 0) on_progress(d.progress(d.run_ms, "checking"));

  // 3. Stop and ask the server whether each device runs its newest desired state.
  const int64_t check = steady_ms();
  for (auto& s : d.shards) s->stop_and_check();
  for (auto& t : d.threads) t.join();
  d.threads.clear();
  d.check_ms = steady_ms() - check;
  return ok();
}

json Fleet::summary() const {
  const Impl& d = *impl_;
  const FleetOptions& o = d.options;
  int64_t enrolled = 0, enroll_failed = 0, connected = 0, converged_live = 0, updates = 0,
          requests = 0, errors = 0, faults = 0, wire = 0, reports = 0, reports_refused = 0,
          batches = 0, records = 0, refused = 0, dropped = 0, activations = 0, crashes = 0,
          checked = 0, converged = 0, behind = 0, check_errors = 0, opened = 0, measured = 0,
          queued_max = 0;
  std::map<std::string, std::map<int64_t, int64_t>> running;
  std::map<std::string, int64_t> kinds;
  std::vector<agent::serve::Histogram::Snapshot> lat(kKinds);
  for (const auto& s : d.shards) {
    const auto& c = s->counters();
    enrolled += c.enrolled;
    enroll_failed += c.enroll_failed;
    connected += c.connected;
    converged_live += c.converged;
    updates += c.updates;
    requests += c.requests;
    errors += c.errors;
    faults += c.faults;
    wire += c.wire_bytes;
    reports += c.reports_sent;
    reports_refused += c.reports_refused;
    batches += c.telemetry_batches;
    records += c.telemetry_records;
    refused += c.telemetry_refused;
    dropped += c.telemetry_dropped;
    activations += c.activations;
    crashes += c.crashes;
    checked += c.checked;
    converged += c.check_converged;
    behind += c.check_behind;
    check_errors += c.check_errors;
    measured += c.measured_requests;
    opened += s->transport_stats().opened;
    queued_max = std::max(queued_max, s->run_queued_max());
    for (const auto& [dep, revs] : s->running()) {
      for (const auto& [rev, n] : revs) running[dep][rev] += n;
    }
    for (const auto& [k, n] : s->error_kinds()) kinds[k] += n;
    for (int k = 0; k < kKinds; ++k) {
      auto snap = s->latency(k);
      if (lat[k].counts.empty()) {
        lat[k] = snap;
        continue;
      }
      for (size_t i = 0; i < snap.counts.size(); ++i) lat[k].counts[i] += snap.counts[i];
      lat[k].count += snap.count;
      lat[k].sum += snap.sum;
    }
  }
  const double run_s = std::max<double>(static_cast<double>(d.run_ms) / 1000.0, 0.001);
  const double measured_s = std::max<double>(
      static_cast<double>(d.run_ms - std::min(o.warmup_ms, d.run_ms)) / 1000.0, 0.001);
  json latency = json::object();
  for (int k = 0; k < kKinds; ++k) {
    if (lat[k].count == 0) continue;
    latency[kind_name(k)] = {{"count", lat[k].count},
                             {"p50_ms", lat[k].quantile(0.50)},
                             {"p90_ms", lat[k].quantile(0.90)},
                             {"p99_ms", lat[k].quantile(0.99)}};
  }
  json running_json = json::object();
  for (const auto& [dep, revs] : running) {
    for (const auto& [rev, n] : revs) running_json[dep][std::to_string(rev)] = n;
  }
  json out = {{"devices", o.devices},
              {"enrolled", enrolled},
              {"converged", converged},
              {"errors", errors},
              {"sites", o.sites},
              {"profile", profile_name(o.link.profile)},
              {"sync", o.sync_interval_ms == 0 ? "long-poll" : "interval"},
              {"enroll_failed", enroll_failed},
              {"enrolled_before", d.loaded_from_state},
              {"not_converged", behind},
              {"check_errors", check_errors},
              {"checked", checked},
              {"connected_at_end", connected},
              {"converged_live_at_end", converged_live},
              {"updates", updates},
              {"activations", activations},
              {"crashes", crashes},
              {"faults", faults},
              {"requests", requests},
              {"requests_per_s", static_cast<double>(requests) / run_s},
              {"measured_s", measured_s},
              {"measured_requests_per_s", static_cast<double>(measured) / measured_s},
              {"wire_bytes", wire},
              {"reports_sent", reports},
              {"reports_refused", reports_refused},
              {"telemetry_batches", batches},
              {"telemetry_records", records},
              {"telemetry_refused", refused},
              {"telemetry_dropped", dropped},
              {"connections_opened", opened},
              // Requests that waited for a shared connection at once, at most: when it grows,
              // the simulator (not the server) holds the fleet back; add --connections.
              {"queued_max", queued_max},
              {"source_addresses", d.sources.size()},
              {"threads", o.threads},
              {"enroll_s", static_cast<double>(d.enroll_ms) / 1000.0},
              {"run_s", static_cast<double>(d.run_ms) / 1000.0},
              {"check_s", static_cast<double>(d.check_ms) / 1000.0},
              {"latency", latency},
              {"running", running_json},
              {"error_kinds", kinds}};
  return out;
}

}  // namespace outpost::sim
