// outpost-sync-bench: load generator for the control plane's device sync endpoint.
// Enrolls a fleet, parks long-polls for part of it, then measures immediate syncs
// (GET /api/v1/device/desired?generation=0) from a few keep-alive connections, either as fast
// as they are answered or paced at a fixed rate (--rate). See bench/README.md.
//
// One Asio event loop drives every connection, so thousands of held long-polls cost sockets,
// not threads. Every failure (transport error, unexpected status, a held poll answered early)
// is counted by kind and reported; nothing is retried silently.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <nlohmann/json.hpp>

#include "common/crypto.h"
#include "common/error.h"
#include "common/http_client.h"
#include "common/request_signature.h"

namespace outpost::bench {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using HttpRequest = bhttp::request<bhttp::string_body>;

constexpr int kSpareFds = 64;  // libcurl, /proc reads, stdio, the resolver

struct Options {
  std::string server;
  std::string ca_file;
  std::string token;
  int devices = 1000;
  int held = -1;  // -1: as many as devices
  int clients = 32;
  double rate = 0;  // syncs/s, open loop; 0: closed loop, as fast as the server answers
  double duration_s = 10;
  double warmup_s = 1;
  int hold_wait_s = -1;  // -1: 55 (the server's limit), or warmup + duration + 10 if longer
  int enroll_concurrency = 16;
  int threads = 1;
  int timeout_s = 10;
  int server_pid = 0;
  std::string site = "bench";
  std::string output = "text";
};

struct Device {
  std::string id;
  std::string credential;
  std::string secret_key;   // the device key: every call is signed, as the agent signs it
  int64_t generation = -1;  // -1: not fetched
};

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// ---------------------------------------------------------------------------------------
// Failures, counted by kind ("sync: status 500", "enroll: read: Connection reset by peer").

class ErrorTally {
 public:
  void add(const std::string& kind, uint64_t count = 1) {
    std::lock_guard lock(mu_);
    counts_[kind] += count;
  }
  uint64_t total() const {
    std::lock_guard lock(mu_);
    uint64_t sum = 0;
    for (const auto& [kind, count] : counts_) sum += count;
    return sum;
  }
  std::map<std::string, uint64_t> counts() const {
    std::lock_guard lock(mu_);
    return counts_;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> counts_;  // GUARDED_BY(mu_)
};

// A non-2xx answer as "status 401: device credential is not valid" (the server's message
// when the body carries one).
std::string describe_status(unsigned status, const std::string& body) {
  std::string kind = "status " + std::to_string(status);
  try {
    auto doc = nlohmann::json::parse(body);
    if (doc.contains("error") && doc["error"].contains("message")) {
      kind += ": " + doc["error"]["message"].get<std::string>();
    }
  } catch (const std::exception&) {
    // not JSON: the status alone says enough
  }
  return kind;
}

// ---------------------------------------------------------------------------------------
// Process figures from /proc.

struct ProcessSample {
  bool ok = false;
  double cpu_s = 0;    // utime + stime
  int64_t rss_kb = 0;  // VmRSS
  int64_t hwm_kb = 0;  // VmHWM (peak RSS)
};

ProcessSample sample_process(int pid) {
  ProcessSample sample;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  auto paren = text.rfind(')');
  if (paren == std::string::npos) return sample;
  // Fields after the command name start at field 3 (state); utime and stime are 14 and 15.
  std::istringstream fields(text.substr(paren + 2));
  std::vector<std::string> parts;
  for (std::string part; fields >> part && parts.size() < 13;) parts.push_back(part);
  if (parts.size() < 13) return sample;
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  try {
    sample.cpu_s = (std::stod(parts[11]) + std::stod(parts[12])) / ticks;
    std::ifstream status("/proc/" + std::to_string(pid) + "/status");
    for (std::string line; std::getline(status, line);) {
      auto value_kb = [&line] { return std::stoll(line.substr(line.find(':') + 1)); };
      if (line.rfind("VmRSS:", 0) == 0) sample.rss_kb = value_kb();
      if (line.rfind("VmHWM:", 0) == 0) sample.hwm_kb = value_kb();
    }
  } catch (const std::exception&) {
    return sample;  // the process went away mid-read
  }
  sample.ok = true;
  return sample;
}

// The soft "Max open files" limit of another process, from /proc/PID/limits.
std::optional<long long> process_fd_limit(int pid) {
  std::ifstream limits("/proc/" + std::to_string(pid) + "/limits");
  for (std::string line; std::getline(limits, line);) {
    if (line.rfind("Max open files", 0) != 0) continue;
    std::istringstream words(line.substr(std::string("Max open files").size()));
    std::string soft;
    words >> soft;
    if (soft == "unlimited") return std::nullopt;
    try {
      return std::stoll(soft);
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
  return std::nullopt;
}

double own_cpu_s() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  auto secs = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + tv.tv_usec / 1e6; };
  return secs(usage.ru_utime) + secs(usage.ru_stime);
}

// Raises the soft RLIMIT_NOFILE to the hard limit; fails when `needed` still does not fit.
Status raise_fd_limit(long long needed) {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return make_error(Errc::kInternal, "getrlimit(RLIMIT_NOFILE) failed");
  }
  limit.rlim_cur = limit.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return make_error(Errc::kInternal, "setrlimit(RLIMIT_NOFILE) to the hard limit failed");
  }
  if (limit.rlim_cur != RLIM_INFINITY && static_cast<long long>(limit.rlim_cur) < needed) {
    return make_error(
        Errc::kResourceExhausted,
        "this run needs " + std::to_string(needed) + " file descriptors (held + connections + " +
            std::to_string(kSpareFds) + " spare) but the hard RLIMIT_NOFILE is " +
            std::to_string(limit.rlim_cur) + "; raise it (ulimit -Hn) or lower --held");
  }
  return ok();
}

// ---------------------------------------------------------------------------------------
// Connections and what they do.

struct Outcome {
  std::string transport_error;  // empty when a response arrived
  unsigned status = 0;
  std::string generation;  // X-Outpost-Generation
  bool has_signature = false;
  std::string body;
  Clock::time_point sent_at;
  Clock::duration latency{};
};

// Where a connection's requests come from and where their outcomes go. Methods are called
// from I/O threads, each connection's calls one at a time; implementations keep
// per-connection state in per-connection slots and shared state in atomics.
class Workload {
 public:
  virtual ~Workload() = default;
  // Fills the next request of connection `conn`; false when the connection is done.
  // `send_at` comes in as now; a paced workload moves it later (latency counts from it).
  virtual bool next(size_t conn, HttpRequest& req, Clock::time_point& send_at) = 0;
  // Called once per request: it was written, or connecting/writing failed.
  virtual void on_write_settled(size_t /*conn*/) {}
  virtual void on_outcome(size_t conn, Outcome&& outcome) = 0;
  // Last call for the connection: next() said it is done, or it was closed.
  virtual void on_closed(size_t conn) = 0;
};

// One keep-alive HTTP/1.1 connection running requests from a Workload one after another.
// A transport failure is reported as an outcome; the next request reconnects.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  // tls: the client context for an https:// server (nullptr: plain HTTP).
  Connection(net::io_context& io, tcp::endpoint endpoint, std::string host, net::ssl::context* tls,
             Workload& workload, size_t index, Clock::duration timeout)
      : tls_(tls),
        stream_(std::make_unique<Stream>(net::make_strand(io), tls ? *tls : plain_context())),
        retry_timer_(tcp().get_executor()),
        endpoint_(endpoint),
        host_(std::move(host)),
        workload_(workload),
        index_(index),
        timeout_(timeout) {}

  // Call once.
  void start() {
    [[maybe_unused]] const bool twice = started_.exchange(true);
    assert(!twice && "Connection::start called twice");
    net::post(tcp().get_executor(), [self = shared_from_this()] { self->run_next(); });
  }

  // Closes the socket; a request in flight ends without an outcome.
  void close() {
    net::post(tcp().get_executor(), [self = shared_from_this()] {
      self->closing_ = true;
      self->retry_timer_.cancel();
      beast::error_code ec;
      self->tcp().socket().close(ec);
      if (!self->busy_) self->finish();
    });
  }

 private:
  void run_next() {
    if (closing_) return finish();
    req_ = {};
    Clock::time_point send_at = Clock::now();
    if (!workload_.next(index_, req_, send_at)) return finish();
    req_.version(11);
    req_.set(bhttp::field::host, host_);
    req_.set(bhttp::field::user_agent, "outpost-sync-bench");
    req_.keep_alive(true);
    req_.prepare_payload();
    write_settled_ = false;
    busy_ = true;
    // Latency counts from here: a reconnect, or a paced request sent late because this
    // connection was still busy, is part of the latency of the request that waited.
    sent_at_ = send_at;
    if (send_at <= Clock::now()) return send();
    retry_timer_.expires_at(send_at);
    retry_timer_.async_wait([self = shared_from_this()](beast::error_code) {
      if (self->closing_) {
        self->busy_ = false;
        return self->finish();
      }
      self->send();
    });
  }

  void send() {
    if (tcp().socket().is_open()) return write();
    buffer_.clear();
    // A TLS session cannot be reused after its socket closed: a fresh stream, same strand.
    if (tls_) stream_ = std::make_unique<Stream>(tcp().get_executor(), *tls_);
    tcp().expires_after(timeout_);
    tcp().async_connect(endpoint_, [self = shared_from_this()](beast::error_code ec) {
      if (ec) return self->fail("connect", ec);
      beast::error_code opt_ec;
      self->tcp().socket().set_option(tcp::no_delay(true), opt_ec);
      if (!self->tls_) return self->write();
      self->stream_->async_handshake(net::ssl::stream_base::client,
                                     [self](beast::error_code hs_ec) {
                                       if (hs_ec) return self->fail("tls handshake", hs_ec);
                                       self->write();
                                     });
    });
  }

  // Runs `op` on the TLS stream, or on the TCP stream under it for plain HTTP.
  template <typename Op>
  void on_stream(Op&& op) {
    if (tls_) {
      op(*stream_);
    } else {
      op(tcp());
    }
  }

  void write() {
    tcp().expires_after(timeout_);
    on_stream([&](auto& s) {
      bhttp::async_write(s, req_, [self = shared_from_this()](beast::error_code ec, size_t) {
        if (ec) return self->fail("write", ec);
        self->write_settled_ = true;
        self->workload_.on_write_settled(self->index_);
        self->read();
      });
    });
  }

  void read() {
    parser_.emplace();
    parser_->body_limit(16 * 1024 * 1024);
    tcp().expires_after(timeout_);
    on_stream([&](auto& s) {
      bhttp::async_read(
          s, buffer_, *parser_,
          [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
    });
  }

  void on_read(beast::error_code ec) {
    if (ec) return fail("read", ec);
    busy_ = false;
    auto& res = parser_->get();
    Outcome outcome;
    outcome.status = res.result_int();
    outcome.generation = std::string(res["X-Outpost-Generation"]);
    outcome.has_signature = res.find("X-Outpost-Signature") != res.end();
    outcome.body = std::move(res.body());
    outcome.sent_at = sent_at_;
    outcome.latency = Clock::now() - sent_at_;
    const bool keep_alive = res.keep_alive();
    parser_.reset();
    workload_.on_outcome(index_, std::move(outcome));
    if (!keep_alive) {
      beast::error_code close_ec;
      tcp().socket().close(close_ec);
    }
    run_next();
  }

  void fail(const char* step, beast::error_code ec) {
    busy_ = false;
    beast::error_code close_ec;
    tcp().socket().close(close_ec);
    if (!write_settled_) {
      write_settled_ = true;
      workload_.on_write_settled(index_);
    }
    if (closing_) return finish();  // closed by the bench: not a failure
    Outcome outcome;
    outcome.transport_error = std::string(step) + ": " + ec.message();
    outcome.sent_at = sent_at_;
    outcome.latency = Clock::now() - sent_at_;
    workload_.on_outcome(index_, std::move(outcome));
    if (std::string_view(step) != "connect") return run_next();
    // A refused connect fails at once: pause so a dead server does not make us spin.
    retry_timer_.expires_after(std::chrono::milliseconds(100));
    retry_timer_.async_wait([self = shared_from_this()](beast::error_code timer_ec) {
      if (timer_ec == net::error::operation_aborted && self->closing_) return self->finish();
      self->run_next();
    });
  }

  void finish() {
    if (finished_) return;
    finished_ = true;
    beast::error_code ec;
    tcp().socket().close(ec);
    workload_.on_closed(index_);
  }

  using Stream = beast::ssl_stream<beast::tcp_stream>;
  static net::ssl::context& plain_context() {
    static net::ssl::context unused(net::ssl::context::tls_client);  // plain HTTP: never used
    return unused;
  }
  beast::tcp_stream& tcp() { return stream_->next_layer(); }

  net::ssl::context* tls_;
  std::unique_ptr<Stream> stream_;
  net::steady_timer retry_timer_;
  beast::flat_buffer buffer_;
  HttpRequest req_;
  std::optional<bhttp::response_parser<bhttp::string_body>> parser_;
  tcp::endpoint endpoint_;
  std::string host_;
  Workload& workload_;
  size_t index_;
  Clock::duration timeout_;
  Clock::time_point sent_at_;
  bool write_settled_ = false;
  bool busy_ = false;  // a request is in flight (its handler will see the close)
  bool closing_ = false;
  bool finished_ = false;
  std::atomic<bool> started_{false};
};

struct Endpoint {
  tcp::endpoint address;
  std::string host;                        // Host header
  std::shared_ptr<net::ssl::context> tls;  // https:// servers
};

class ConnectionSet {
 public:
  ConnectionSet(net::io_context& io, const Endpoint& endpoint, Workload& workload, size_t count,
                Clock::duration timeout) {
    for (size_t i = 0; i < count; ++i) {
      conns_.push_back(std::make_shared<Connection>(io, endpoint.address, endpoint.host,
                                                    endpoint.tls.get(), workload, i, timeout));
    }
  }
  void start(size_t i) { conns_[i]->start(); }
  void start_all() {
    for (auto& conn : conns_) conn->start();
  }
  void close_all() {
    for (auto& conn : conns_) conn->close();
  }
  size_t size() const { return conns_.size(); }

 private:
  std::vector<std::shared_ptr<Connection>> conns_;
};

// A fixed list of requests spread over a few keep-alive connections; outcomes are kept by
// request index.
class BatchWorkload final : public Workload {
 public:
  BatchWorkload(std::vector<HttpRequest> requests, size_t connections)
      : requests_(std::move(requests)),
        outcomes_(requests_.size()),
        current_(connections),
        open_(connections) {}

  bool next(size_t conn, HttpRequest& req, Clock::time_point&) override {
    size_t i = next_.fetch_add(1);
    if (i >= requests_.size()) return false;
    current_[conn] = i;
    req = std::move(requests_[i]);
    return true;
  }
  void on_outcome(size_t conn, Outcome&& outcome) override {
    outcomes_[current_[conn]] = std::move(outcome);
    done_.fetch_add(1);
  }
  void on_closed(size_t) override { open_.fetch_sub(1); }

  size_t open() const { return open_.load(); }
  size_t done() const { return done_.load(); }
  size_t total() const { return outcomes_.size(); }
  std::vector<Outcome>& outcomes() { return outcomes_; }

 private:
  std::vector<HttpRequest> requests_;
  std::vector<Outcome> outcomes_;
  std::vector<size_t> current_;  // per connection: the request index in flight
  std::atomic<size_t> next_{0};
  std::atomic<size_t> done_{0};
  std::atomic<size_t> open_;
};

HttpRequest make_request(bhttp::verb verb, std::string target, const std::string& bearer,
                         std::string body = {}) {
  HttpRequest req{verb, target, 11};
  if (!bearer.empty()) req.set(bhttp::field::authorization, "Bearer " + bearer);
  if (!body.empty()) {
    req.set(bhttp::field::content_type, "application/json");
    req.body() = std::move(body);
  }
  return req;
}

// A device's call: its credential and its signature (common/request_signature.h), made now.
HttpRequest device_request(bhttp::verb verb, std::string target, const Device& device) {
  HttpRequest req = make_request(verb, target, device.credential);
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  req.set(std::string(reqsig::kHeader),
          reqsig::sign(device.id, device.secret_key, now, std::string(bhttp::to_string(verb)),
                       target, ""));
  return req;
}

// Long-polls, one per connection, opened a window at a time so the server's accept queue
// never overflows. A 304 at the server's deadline is renewed, as an agent would; a 200 means
// the generation moved, which nothing in this bench does, so it is counted as answered early.
class HeldWorkload final : public Workload {
 public:
  HeldWorkload(const std::vector<Device>& devices, int wait_s, ErrorTally& errors)
      : devices_(devices), wait_s_(wait_s), errors_(errors), state_(devices.size()) {}

  void attach(ConnectionSet& conns, size_t window) {
    conns_ = &conns;
    // Started connections bump next_launch_ from I/O threads at once: loop on a copy.
    const size_t first = std::min(window, conns.size());
    next_launch_ = first;
    for (size_t i = 0; i < first; ++i) conns.start(i);
  }

  bool next(size_t conn, HttpRequest& req, Clock::time_point&) override {
    if (state_[conn] == State::kStopped) return false;
    const Device& device = devices_[conn];
    req = device_request(bhttp::verb::get,
                         "/api/v1/device/desired?generation=" + std::to_string(device.generation) +
                             "&wait=" + std::to_string(wait_s_),
                         device);
    return true;
  }
  void on_write_settled(size_t conn) override {
    if (state_[conn] != State::kNew) return;
    state_[conn] = State::kHeld;
    settled_.fetch_add(1);
    size_t i = next_launch_.fetch_add(1);
    if (i < conns_->size()) conns_->start(i);
  }
  void on_outcome(size_t conn, Outcome&& outcome) override {
    if (!outcome.transport_error.empty()) {
      errors_.add("held: " + outcome.transport_error);
    } else if (outcome.status == 304) {
      renewed_.fetch_add(1);
      return;  // next() renews it
    } else if (outcome.status == 200) {
      answered_early_.fetch_add(1);
      errors_.add("held: answered 200 before its deadline (generation moved?)");
    } else {
      errors_.add("held: " + describe_status(outcome.status, outcome.body));
    }
    state_[conn] = State::kStopped;
    lost_.fetch_add(1);
  }
  void on_closed(size_t) override { closed_.fetch_add(1); }

  size_t settled() const { return settled_.load(); }
  size_t lost() const { return lost_.load(); }  // held polls that ended (error or early answer)
  size_t answered_early() const { return answered_early_.load(); }
  size_t renewed() const { return renewed_.load(); }
  size_t closed() const { return closed_.load(); }

 private:
  enum class State { kNew, kHeld, kStopped };
  const std::vector<Device>& devices_;
  int wait_s_;
  ErrorTally& errors_;
  std::vector<State> state_;  // per connection
  ConnectionSet* conns_ = nullptr;
  std::atomic<size_t> next_launch_{0};
  std::atomic<size_t> settled_{0};
  std::atomic<size_t> lost_{0};
  std::atomic<size_t> answered_early_{0};
  std::atomic<size_t> renewed_{0};
  std::atomic<size_t> closed_{0};
};

// Immediate syncs (generation=0) round-robin over the devices until `stop_at`; latencies of
// requests sent from `measure_from` on are kept.
class SyncLoadWorkload final : public Workload {
 public:
  // rate > 0: request k is due at start + k / rate (open loop); 0: each connection sends
  // its next request as soon as the last one is answered (closed loop).
  SyncLoadWorkload(const std::vector<Device>& devices, size_t connections, double rate,
                   Clock::time_point start, Clock::time_point measure_from,
                   Clock::time_point stop_at, ErrorTally& errors)
      : devices_(devices),
        rate_(rate),
        start_(start),
        measure_from_(measure_from),
        stop_at_(stop_at),
        errors_(errors),
        slots_(connections),
        open_(connections) {
    for (auto& slot : slots_) slot.latencies_ns.reserve(1 << 16);
  }

  bool next(size_t, HttpRequest& req, Clock::time_point& send_at) override {
    const uint64_t k = counter_.fetch_add(1);
    if (rate_ > 0) {
      send_at = start_ + std::chrono::duration_cast<Clock::duration>(
                             std::chrono::duration<double>(static_cast<double>(k) / rate_));
    }
    if (send_at >= stop_at_) return false;
    const Device& device = devices_[k % devices_.size()];
    req = device_request(bhttp::verb::get, "/api/v1/device/desired?generation=0", device);
    return true;
  }
  void on_outcome(size_t conn, Outcome&& outcome) override {
    const bool measured = outcome.sent_at >= measure_from_;
    const char* phase = measured ? "sync: " : "sync (warm-up): ";
    Slot& slot = slots_[conn];
    if (!outcome.transport_error.empty()) {
      errors_.add(phase + outcome.transport_error);
      if (measured) ++slot.failed;
    } else if (outcome.status != 200) {
      errors_.add(phase + describe_status(outcome.status, outcome.body));
      if (measured) ++slot.failed;
    } else if (!outcome.has_signature || outcome.generation.empty()) {
      errors_.add(std::string(phase) + "200 without X-Outpost-Signature/X-Outpost-Generation");
      if (measured) ++slot.failed;
    } else if (measured) {
      slot.latencies_ns.push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(outcome.latency).count());
      slot.last_done = std::max(slot.last_done, outcome.sent_at + outcome.latency);
    }
  }
  void on_closed(size_t) override { open_.fetch_sub(1); }

  size_t open() const { return open_.load(); }

  struct Totals {
    std::vector<int64_t> latencies_ns;  // sorted
    uint64_t failed = 0;
    Clock::time_point last_done{};
  };
  // Call after every connection closed.
  Totals totals() const {
    Totals t;
    for (const auto& slot : slots_) {
      t.latencies_ns.insert(t.latencies_ns.end(), slot.latencies_ns.begin(),
                            slot.latencies_ns.end());
      t.failed += slot.failed;
      t.last_done = std::max(t.last_done, slot.last_done);
    }
    std::sort(t.latencies_ns.begin(), t.latencies_ns.end());
    return t;
  }

 private:
  struct Slot {
    std::vector<int64_t> latencies_ns;
    uint64_t failed = 0;
    Clock::time_point last_done{};
  };
  const std::vector<Device>& devices_;
  double rate_;
  Clock::time_point start_;
  Clock::time_point measure_from_;
  Clock::time_point stop_at_;
  ErrorTally& errors_;
  std::vector<Slot> slots_;
  std::atomic<uint64_t> counter_{0};
  std::atomic<size_t> open_;
};

// ---------------------------------------------------------------------------------------

Result<Endpoint> resolve_server(net::io_context& io, const std::string& url,
                                const std::string& ca_file) {
  const bool https = url.rfind("https://", 0) == 0;
  if (!https && url.rfind("http://", 0) != 0) {
    return make_error(
        Errc::kInvalidArgument,
        "--server: expected http://HOST:PORT or https://HOST:PORT, got \"" + url + "\"", "server");
  }
  std::string authority = url.substr(https ? 8 : 7);
  authority = authority.substr(0, authority.find('/'));
  auto colon = authority.rfind(':');
  std::string host = colon == std::string::npos ? authority : authority.substr(0, colon);
  std::string port =
      colon == std::string::npos ? (https ? "443" : "80") : authority.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  beast::error_code ec;
  tcp::resolver resolver(io);
  auto results = resolver.resolve(host, port, ec);
  if (ec || results.empty()) {
    return make_error(Errc::kUnavailable,
                      "--server: cannot resolve " + authority + ": " + ec.message());
  }
  Endpoint out{results.begin()->endpoint(), authority, nullptr};
  if (https) {
    // Verified like a device does: the CA it pinned (--ca-file), the name in the certificate.
    out.tls = std::make_shared<net::ssl::context>(net::ssl::context::tls_client);
    out.tls->set_verify_mode(net::ssl::verify_peer);
    if (ca_file.empty()) {
      out.tls->set_default_verify_paths();
    } else {
      out.tls->load_verify_file(ca_file, ec);
      if (ec) {
        return make_error(Errc::kInvalidArgument,
                          "--ca-file: cannot load " + ca_file + ": " + ec.message(), "ca_file");
      }
    }
    out.tls->set_verify_callback(net::ssl::host_name_verification(host));
  }
  return out;
}

// One unlabelled sample from GET /metrics (Prometheus text); nullopt when absent.
std::optional<long long> server_metric(HttpClient& client, const std::string& name) {
  auto res = client.request("GET", "/metrics");
  if (!res || res->status != 200) return std::nullopt;
  const std::string line_start = "\n" + name + " ";
  auto pos = ("\n" + res->body).find(line_start);
  if (pos == std::string::npos) return std::nullopt;
  try {
    return std::stoll(res->body.substr(pos + line_start.size() - 1));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// The long-polls the server holds right now.
std::optional<long long> server_waiting(HttpClient& client) {
  return server_metric(client, "outpost_sync_waiting");
}

// Syncs the server answered without writing last_seen to its store (servers that throttle
// those writes export it; nullopt from others).
constexpr const char* kWritesSkippedMetric = "outpost_last_seen_writes_skipped_total";

// Waits for `done`, printing "label count/total" to stderr once a second.
void wait_with_progress(const char* label, const std::function<bool()>& done, size_t total,
                        const std::function<size_t()>& count) {
  auto last = Clock::now();
  while (!done()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (Clock::now() - last >= std::chrono::seconds(1)) {
      std::fprintf(stderr, "%s %zu/%zu\n", label, count(), total);
      last = Clock::now();
    }
  }
}

double percentile_ms(const std::vector<int64_t>& sorted_ns, double q) {
  if (sorted_ns.empty()) return 0;
  auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted_ns.size())));
  rank = std::clamp<size_t>(rank, 1, sorted_ns.size());
  return static_cast<double>(sorted_ns[rank - 1]) / 1e6;
}

double round_to(double value, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(value * scale) / scale;
}

int run(const Options& opt) {
  const int held_wanted = opt.held < 0 ? opt.devices : opt.held;
  // Long enough to outlast opening them all plus the measurement, so that no renewal adds
  // load to it; 55 s is also the server's (and the agent's) long-poll limit.
  const int hold_wait_s =
      opt.hold_wait_s > 0
          ? opt.hold_wait_s
          : std::max(55, static_cast<int>(std::ceil(opt.warmup_s + opt.duration_s)) + 10);
  const long long fds_needed = static_cast<long long>(held_wanted) +
                               std::max(opt.clients, opt.enroll_concurrency) + kSpareFds;
  if (auto raised = raise_fd_limit(fds_needed); !raised) {
    std::fprintf(stderr, "error: %s\n", raised.error().describe().c_str());
    return 1;
  }
  if (opt.server_pid > 0) {
    if (!sample_process(opt.server_pid).ok) {
      std::fprintf(stderr, "error: --server-pid %d: no such process (or /proc unreadable)\n",
                   opt.server_pid);
      return 1;
    }
    auto server_limit = process_fd_limit(opt.server_pid);
    if (server_limit && *server_limit < fds_needed) {
      std::fprintf(stderr,
                   "error: the server (pid %d) may open %lld files but this run needs about %lld "
                   "(held + connections + spare); start it with a higher `ulimit -n`\n",
                   opt.server_pid, *server_limit, fds_needed);
      return 1;
    }
  }

  crypto::init();
  ErrorTally errors;
  HttpClient admin(opt.server, opt.token, opt.ca_file);

  // Enrollment token for the whole fleet.
  nlohmann::json token_body = {{"site", opt.site}, {"uses", opt.devices}, {"ttl", "1h"}};
  auto created = admin.request("POST", "/api/v1/enrollment-tokens", token_body.dump());
  if (!created) {
    std::fprintf(stderr, "error: %s\n", created.error().describe().c_str());
    return 1;
  }
  if (created->status != 201) {
    std::fprintf(stderr, "error: creating an enrollment token: %s\n",
                 error_from_response(*created).describe().c_str());
    return 1;
  }
  std::string enroll_token;
  try {
    enroll_token = nlohmann::json::parse(created->body).at("token").get<std::string>();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: enrollment token response has no \"token\": %s\n", e.what());
    return 1;
  }

  net::io_context io(opt.threads);
  auto endpoint = resolve_server(io, opt.server, opt.ca_file);
  if (!endpoint) {
    std::fprintf(stderr, "error: %s\n", endpoint.error().describe().c_str());
    return 1;
  }
  auto guard = net::make_work_guard(io);
  std::vector<std::thread> io_threads;
  for (int i = 0; i < opt.threads; ++i) io_threads.emplace_back([&io] { io.run(); });
  const auto timeout = std::chrono::seconds(opt.timeout_s);

  // 1. Enroll the fleet.
  std::vector<Device> devices;
  double enroll_s = 0;
  ProcessSample server_before_enroll =
      opt.server_pid ? sample_process(opt.server_pid) : ProcessSample{};
  ProcessSample server_after_enroll;
  {
    std::vector<HttpRequest> requests;
    requests.reserve(opt.devices);
    std::vector<std::string> secret_keys;  // by request, as the outcomes are
    for (int i = 0; i < opt.devices; ++i) {
      const auto key = crypto::ed25519_generate();
      secret_keys.push_back(key.secret_key);
      nlohmann::json body = {
          {"token", enroll_token},
          {"public_key", crypto::base64_encode(key.public_key)},
          {"facts",
           {{"arch", "x86_64"}, {"cores", 4}, {"memory_mb", 4096}, {"accelerator", "cpu"}}}};
      requests.push_back(make_request(bhttp::verb::post, "/api/v1/device/enroll", "", body.dump()));
    }
    const size_t conns = std::min<size_t>(opt.enroll_concurrency, requests.size());
    BatchWorkload batch(std::move(requests), conns);
    ConnectionSet set(io, *endpoint, batch, conns, timeout);
    const auto started = Clock::now();
    set.start_all();
    wait_with_progress(
        "enrolled", [&] { return batch.open() == 0; }, batch.total(), [&] { return batch.done(); });
    enroll_s = seconds_between(started, Clock::now());
    if (opt.server_pid) server_after_enroll = sample_process(opt.server_pid);
    for (size_t i = 0; i < batch.outcomes().size(); ++i) {
      const Outcome& outcome = batch.outcomes()[i];
      if (!outcome.transport_error.empty()) {
        errors.add("enroll: " + outcome.transport_error);
      } else if (outcome.status != 201) {
        errors.add("enroll: " + describe_status(outcome.status, outcome.body));
      } else {
        try {
          auto doc = nlohmann::json::parse(outcome.body);
          devices.push_back(Device{doc.at("device_id").get<std::string>(),
                                   doc.at("credential").get<std::string>(), secret_keys[i]});
        } catch (const std::exception& e) {
          errors.add(std::string("enroll: 201 without device_id/credential: ") + e.what());
        }
      }
    }
    std::fprintf(stderr, "enrolled %zu/%d devices in %.2f s\n", devices.size(), opt.devices,
                 enroll_s);
  }
  if (devices.empty()) {
    std::fprintf(stderr, "error: no device enrolled; nothing to measure\n");
    guard.reset();
    io.stop();
    for (auto& t : io_threads) t.join();
    return 1;
  }

  // 2. Each held device's current generation, then its long-poll.
  const size_t held_count = std::min<size_t>(held_wanted, devices.size());
  std::vector<Device> held_devices;
  if (held_count > 0) {
    std::vector<HttpRequest> requests;
    for (size_t i = 0; i < held_count; ++i) {
      requests.push_back(
          device_request(bhttp::verb::get, "/api/v1/device/desired?generation=0", devices[i]));
    }
    const size_t conns = std::min<size_t>(opt.clients, requests.size());
    BatchWorkload batch(std::move(requests), conns);
    ConnectionSet set(io, *endpoint, batch, conns, timeout);
    set.start_all();
    wait_with_progress(
        "generations fetched", [&] { return batch.open() == 0; }, batch.total(),
        [&] { return batch.done(); });
    for (size_t i = 0; i < held_count; ++i) {
      const Outcome& outcome = batch.outcomes()[i];
      if (!outcome.transport_error.empty()) {
        errors.add("generation: " + outcome.transport_error);
      } else if (outcome.status != 200) {
        errors.add("generation: " + describe_status(outcome.status, outcome.body));
      } else {
        try {
          Device device = devices[i];
          device.generation = std::stoll(outcome.generation);
          held_devices.push_back(device);
        } catch (const std::exception&) {
          errors.add("generation: 200 without a numeric X-Outpost-Generation");
        }
      }
    }
  }

  std::optional<long long> waiting_baseline = server_waiting(admin);
  HeldWorkload held(held_devices, hold_wait_s, errors);
  ConnectionSet held_set(io, *endpoint, held, held_devices.size(),
                         std::chrono::seconds(hold_wait_s + 30));
  // The server's count of parked long-polls (above the baseline), polled until it reaches
  // every held poll still open or `patience` passes; an error when it does not.
  auto confirm_held = [&](std::chrono::seconds patience, const char* when) {
    std::optional<long long> seen;
    const auto deadline = Clock::now() + patience;
    while (waiting_baseline) {
      if (auto waiting = server_waiting(admin)) seen = *waiting - *waiting_baseline;
      const auto expected = static_cast<long long>(held_devices.size() - held.lost());
      if ((seen && *seen >= expected) || Clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (!seen || *seen < static_cast<long long>(held_devices.size() - held.lost())) {
      errors.add(std::string("held: the server's outpost_sync_waiting is below the long-polls "
                             "open ") +
                 when);
    }
    return seen;
  };
  std::optional<long long> confirmed;
  if (!held_devices.empty()) {
    held.attach(held_set, 256);
    wait_with_progress(
        "long-polls opened", [&] { return held.settled() == held_devices.size(); },
        held_devices.size(), [&] { return held.settled(); });
    // Written is not parked: the server authenticates on a worker first.
    confirmed = confirm_held(std::chrono::seconds(30), "before the sync phase");
    std::fprintf(stderr, "holding %zu long-polls (server reports %lld)\n",
                 held_devices.size() - held.lost(), confirmed ? *confirmed : -1LL);
  }
  const size_t lost_before_sync = held.lost();
  const size_t renewed_before_sync = held.renewed();

  // 3. Immediate syncs for warm-up + duration.
  const auto sync_start = Clock::now();
  const auto measure_from = sync_start + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(opt.warmup_s));
  const auto stop_at = measure_from + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(opt.duration_s));
  SyncLoadWorkload load(devices, opt.clients, opt.rate, sync_start, measure_from, stop_at, errors);
  ConnectionSet load_set(io, *endpoint, load, opt.clients, timeout);
  ProcessSample server_before, server_after;
  double client_cpu_before = 0;
  load_set.start_all();
  std::this_thread::sleep_until(measure_from);
  if (opt.server_pid) server_before = sample_process(opt.server_pid);
  client_cpu_before = own_cpu_s();
  const auto skipped_before = server_metric(admin, kWritesSkippedMetric);
  std::fprintf(stderr, "measuring %d connections for %.1f s\n", opt.clients, opt.duration_s);
  std::this_thread::sleep_until(stop_at);
  const auto skipped_after = server_metric(admin, kWritesSkippedMetric);
  if (opt.server_pid) server_after = sample_process(opt.server_pid);
  const double client_cpu = own_cpu_s() - client_cpu_before;
  while (load.open() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const auto sync = load.totals();
  const double sync_s =
      std::max(seconds_between(measure_from, stop_at),
               sync.last_done > measure_from ? seconds_between(measure_from, sync.last_done) : 0.0);

  // 4. Were the long-polls held throughout? Then let them go.
  const size_t renewed_during_sync = held.renewed() - renewed_before_sync;
  std::optional<long long> still_held;
  if (!held_devices.empty()) {
    still_held = confirm_held(std::chrono::seconds(5), "after the sync phase");
    held_set.close_all();
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (held.closed() < held_devices.size() && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  guard.reset();
  io.stop();
  for (auto& t : io_threads) t.join();

  // Report.
  const auto& lat = sync.latencies_ns;
  double mean_ms = 0;
  for (int64_t ns : lat) mean_ms += static_cast<double>(ns) / 1e6;
  if (!lat.empty()) mean_ms /= static_cast<double>(lat.size());
  nlohmann::json report;
  report["bench"] = "sync";
  report["server"] = opt.server;
  report["tls"] = opt.server.rfind("https://", 0) == 0;
  report["config"] = {{"devices", opt.devices},
                      {"held", held_wanted},
                      {"clients", opt.clients},
                      {"duration_s", opt.duration_s},
                      {"warmup_s", opt.warmup_s},
                      {"hold_wait_s", hold_wait_s},
                      {"enroll_concurrency", opt.enroll_concurrency},
                      {"rate", opt.rate},
                      {"client_threads", opt.threads}};
  report["enroll"] = {{"requested", opt.devices},
                      {"enrolled", devices.size()},
                      {"seconds", round_to(enroll_s, 3)},
                      {"per_s", round_to(static_cast<double>(devices.size()) / enroll_s, 1)}};
  report["held"] = {
      {"requested", held_wanted},
      {"opened", held_devices.size()},
      {"lost_before_sync", lost_before_sync},
      {"lost_during_sync", held.lost() - lost_before_sync},
      {"answered_early", held.answered_early()},
      {"renewed_after_304", held.renewed()},
      {"renewed_during_sync", renewed_during_sync},
      {"server_waiting_before_sync", confirmed ? nlohmann::json(*confirmed) : nullptr},
      {"server_waiting_after_sync", still_held ? nlohmann::json(*still_held) : nullptr}};
  const double sync_rate = static_cast<double>(lat.size()) / sync_s;
  report["sync"] = {
      {"target_rate", opt.rate > 0 ? nlohmann::json(opt.rate) : nlohmann::json("max")},
      // How often each device synced: against the server's last_seen write interval, this
      // says whether the write path was measured.
      {"device_revisit_s",
       lat.empty() ? nlohmann::json(nullptr)
                   : nlohmann::json(round_to(static_cast<double>(devices.size()) / sync_rate, 3))},
      {"server_writes_skipped", skipped_before && skipped_after
                                    ? nlohmann::json(*skipped_after - *skipped_before)
                                    : nullptr},
      {"requests", lat.size()},
      {"failed", sync.failed},
      {"seconds", round_to(sync_s, 3)},
      {"per_s", round_to(sync_rate, 1)},
      {"latency_ms",
       {{"p50", round_to(percentile_ms(lat, 0.50), 3)},
        {"p90", round_to(percentile_ms(lat, 0.90), 3)},
        {"p99", round_to(percentile_ms(lat, 0.99), 3)},
        {"max", round_to(lat.empty() ? 0.0 : static_cast<double>(lat.back()) / 1e6, 3)},
        {"mean", round_to(mean_ms, 3)}}}};
  nlohmann::json by_kind = nlohmann::json::object();
  for (const auto& [kind, count] : errors.counts()) by_kind[kind] = count;
  report["errors"] = {{"total", errors.total()}, {"by_kind", by_kind}};
  if (opt.server_pid && server_before.ok && server_after.ok) {
    const double cpu = server_after.cpu_s - server_before.cpu_s;
    report["server_process"] = {
        {"pid", opt.server_pid},
        {"rss_mb_before_sync", round_to(static_cast<double>(server_before.rss_kb) / 1024, 1)},
        {"rss_mb_after_sync", round_to(static_cast<double>(server_after.rss_kb) / 1024, 1)},
        {"peak_rss_mb", round_to(static_cast<double>(server_after.hwm_kb) / 1024, 1)},
        {"cpu_s_enroll", server_after_enroll.ok && server_before_enroll.ok
                             ? round_to(server_after_enroll.cpu_s - server_before_enroll.cpu_s, 2)
                             : 0.0},
        {"cpu_s_sync", round_to(cpu, 2)},
        {"cpu_cores_sync", round_to(cpu / opt.duration_s, 2)},
        {"cpu_us_per_sync",
         lat.empty() ? 0.0 : round_to(cpu * 1e6 / static_cast<double>(lat.size()), 1)}};
  } else {
    report["server_process"] = nullptr;
  }
  report["client_process"] = {{"cpu_s_sync", round_to(client_cpu, 2)},
                              {"cpu_cores_sync", round_to(client_cpu / opt.duration_s, 2)}};

  char target[32] = "max";
  if (opt.rate > 0) std::snprintf(target, sizeof target, "%.0f/s", opt.rate);
  if (opt.output == "json") {
    std::printf("%s\n", report.dump(2).c_str());
  } else {
    std::printf("enroll:  %zu/%d devices in %.2f s = %.0f devices/s\n", devices.size(), opt.devices,
                enroll_s, static_cast<double>(devices.size()) / enroll_s);
    std::printf(
        "held:    %zu long-polls opened, %zu lost (%zu answered early), %zu renewed after a "
        "304 (%zu during the sync phase), server reports %lld before and %lld after the sync "
        "phase\n",
        held_devices.size(), held.lost(), held.answered_early(), held.renewed(),
        renewed_during_sync, confirmed ? *confirmed : -1LL, still_held ? *still_held : -1LL);
    std::printf(
        "sync:    %zu requests in %.2f s = %.0f syncs/s over %d connections (target: %s); "
        "each device synced every %.2f s\n",
        lat.size(), sync_s, sync_rate, opt.clients, target,
        lat.empty() ? 0.0 : static_cast<double>(devices.size()) / sync_rate);
    if (skipped_before && skipped_after) {
      std::printf("server:  %lld syncs answered without a last_seen store write\n",
                  *skipped_after - *skipped_before);
    }
    std::printf("latency: p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms\n",
                percentile_ms(lat, 0.5), percentile_ms(lat, 0.9), percentile_ms(lat, 0.99),
                lat.empty() ? 0.0 : static_cast<double>(lat.back()) / 1e6);
    if (report["server_process"].is_object()) {
      const auto& sp = report["server_process"];
      std::printf("server:  %.2f cores during sync, RSS %.1f MB (peak %.1f MB)\n",
                  sp["cpu_cores_sync"].get<double>(), sp["rss_mb_after_sync"].get<double>(),
                  sp["peak_rss_mb"].get<double>());
    }
    std::printf("client:  %.2f cores during sync\n", client_cpu / opt.duration_s);
    std::printf("errors:  %llu\n", static_cast<unsigned long long>(errors.total()));
    for (const auto& [kind, count] : errors.counts()) {
      std::printf("  %8llu  %s\n", static_cast<unsigned long long>(count), kind.c_str());
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------
// --summarize: several JSON reports as one markdown table, a row per (held, devices,
// clients), each figure the median of the runs with their min-max.

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  if (n == 0) return 0;
  return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

std::string spread(const std::vector<double>& values, int digits) {
  if (values.empty()) return "n/a";
  auto [lo, hi] = std::minmax_element(values.begin(), values.end());
  auto text = [digits](double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return std::string(buf);
  };
  const std::string lo_text = text(*lo), hi_text = text(*hi);
  if (lo_text == hi_text) return text(median(values));
  return text(median(values)) + " (" + lo_text + "–" + hi_text + ")";
}

int summarize(const std::vector<std::string>& files) {
  using Key = std::tuple<int, int, int, double>;  // held, devices, clients, rate (0: max)
  std::map<Key, std::vector<nlohmann::json>> groups;
  for (const auto& file : files) {
    std::ifstream in(file);
    if (!in) {
      std::fprintf(stderr, "error: --summarize: cannot read %s\n", file.c_str());
      return 1;
    }
    try {
      auto doc = nlohmann::json::parse(in);
      const auto& config = doc.at("config");
      groups[{config.at("held").get<int>(), config.at("devices").get<int>(),
              config.at("clients").get<int>(), config.value("rate", 0.0)}]
          .push_back(std::move(doc));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: --summarize: %s is not a report of this bench: %s\n",
                   file.c_str(), e.what());
      return 1;
    }
  }
  std::printf(
      "| held | devices | clients | rate | runs | syncs/s | device revisit s | p50 ms | p90 ms "
      "| p99 ms | max ms | enroll/s | server cores | server µs/sync | last_seen writes skipped "
      "| server peak RSS MB | client cores | held confirmed | errors |\n");
  std::printf(
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
      "---:|---:|---:|\n");
  std::map<std::string, uint64_t> error_kinds;
  for (const auto& [key, runs] : groups) {
    auto collect = [&runs](const std::function<double(const nlohmann::json&)>& get) {
      std::vector<double> values;
      for (const auto& run : runs) {
        try {
          values.push_back(get(run));
        } catch (const std::exception&) {
          // absent figure (e.g. no --server-pid): left out
        }
      }
      return values;
    };
    auto at = [](const char* a, const char* b) {
      return [a, b](const nlohmann::json& doc) { return doc.at(a).at(b).get<double>(); };
    };
    auto latency = [](const char* q) {
      return [q](const nlohmann::json& doc) {
        return doc.at("sync").at("latency_ms").at(q).get<double>();
      };
    };
    // The smallest long-poll count the server reported over all runs; -1 when it did not say.
    std::optional<long long> held_confirmed;
    uint64_t errors = 0;
    for (const auto& run : runs) {
      const auto& held = run.at("held");
      for (const char* field : {"server_waiting_before_sync", "server_waiting_after_sync"}) {
        long long value = held.at(field).is_number() ? held.at(field).get<long long>() : -1;
        if (held.at("opened").get<long long>() == 0) value = 0;  // nothing held, nothing asked
        held_confirmed = std::min(held_confirmed.value_or(value), value);
      }
      errors += run.at("errors").at("total").get<uint64_t>();
      for (const auto& [kind, count] : run.at("errors").at("by_kind").items()) {
        error_kinds[kind] += count.get<uint64_t>();
      }
    }
    const auto [held, devices, clients, rate] = key;
    char rate_text[32] = "max";
    if (rate > 0) std::snprintf(rate_text, sizeof rate_text, "%.0f", rate);
    // Share of the measured syncs that the server answered without a store write.
    auto skipped_pct = [](const nlohmann::json& doc) {
      const auto& sync = doc.at("sync");
      return 100.0 * sync.at("server_writes_skipped").get<double>() /
             std::max(1.0, sync.at("requests").get<double>());
    };
    const auto skipped = collect(skipped_pct);
    std::printf(
        "| %d | %d | %d | %s | %zu | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | "
        "%s | %llu |\n",
        held, devices, clients, rate_text, runs.size(),
        spread(collect(at("sync", "per_s")), 0).c_str(),
        spread(collect(at("sync", "device_revisit_s")), 2).c_str(),
        spread(collect(latency("p50")), 2).c_str(), spread(collect(latency("p90")), 2).c_str(),
        spread(collect(latency("p99")), 2).c_str(), spread(collect(latency("max")), 1).c_str(),
        spread(collect(at("enroll", "per_s")), 0).c_str(),
        spread(collect(at("server_process", "cpu_cores_sync")), 2).c_str(),
        spread(collect(at("server_process", "cpu_us_per_sync")), 0).c_str(),
        skipped.empty() ? "n/a" : (spread(skipped, 0) + " %").c_str(),
        spread(collect(at("server_process", "peak_rss_mb")), 1).c_str(),
        spread(collect(at("client_process", "cpu_cores_sync")), 2).c_str(),
        *held_confirmed < 0 ? "n/a" : std::to_string(*held_confirmed).c_str(),
        static_cast<unsigned long long>(errors));
  }
  if (!error_kinds.empty()) {
    std::printf("\nErrors, all runs together:\n\n");
    for (const auto& [kind, count] : error_kinds) {
      std::printf("- %llu × %s\n", static_cast<unsigned long long>(count), kind.c_str());
    }
  }
  return 0;
}

}  // namespace
}  // namespace outpost::bench

int main(int argc, char** argv) {
  outpost::bench::Options opt;
  CLI::App app{
      "Measures the control plane's device sync endpoint: enrolls --devices devices, holds "
      "--held long-polls open, then runs immediate syncs from --clients keep-alive connections "
      "for --duration seconds."};
  std::vector<std::string> summarize_files;
  app.add_option("--ca-file", opt.ca_file,
                 "PEM CA to verify an https:// server with (its development CA: DATA/tls/ca.pem)");
  app.add_option("--server", opt.server, "Server URL, http(s)://HOST:PORT (required)")
      ->envname("OUTPOST_SERVER");
  app.add_option("--token", opt.token, "Operator (admin) bearer token (required)")
      ->envname("OUTPOST_TOKEN");
  app.add_option("--devices", opt.devices, "Devices to enroll")
      ->check(CLI::Range(1, 1'000'000))
      ->capture_default_str();
  app.add_option("--held", opt.held,
                 "Long-polls held open during the measurement (default: --devices)")
      ->check(CLI::Range(0, 1'000'000));
  app.add_option("--rate", opt.rate,
                 "Syncs per second, paced (open loop; latency counts from each request's due "
                 "time); 0: as fast as --clients connections get answers")
      ->check(CLI::Range(0.0, 1e7))
      ->capture_default_str();
  app.add_option("--clients", opt.clients, "Connections doing immediate syncs")
      ->check(CLI::Range(1, 10'000))
      ->capture_default_str();
  app.add_option("--duration", opt.duration_s, "Seconds measured")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  app.add_option("--warmup", opt.warmup_s, "Seconds of syncs before the measurement")
      ->check(CLI::Range(0.0, 600.0))
      ->capture_default_str();
  app.add_option("--hold-wait", opt.hold_wait_s,
                 "wait= of the held long-polls in seconds (default: 55, or warmup + duration + 10 "
                 "when longer; the server caps it at its long-poll limit; a 304 is renewed)")
      ->check(CLI::Range(1, 3600));
  app.add_option("--enroll-concurrency", opt.enroll_concurrency, "Connections enrolling")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--threads", opt.threads, "Client I/O threads")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app.add_option("--timeout", opt.timeout_s, "Seconds before a request counts as timed out")
      ->check(CLI::Range(1, 600))
      ->capture_default_str();
  app.add_option("--server-pid", opt.server_pid,
                 "Server process to sample (RSS, CPU time) from /proc");
  app.add_option("--site", opt.site, "Site of the enrolled devices")->capture_default_str();
  app.add_option("-o,--output", opt.output, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--summarize", summarize_files,
                 "Measure nothing: print a markdown table (median and min-max) of these -o json "
                 "reports")
      ->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);
  if (!summarize_files.empty()) return outpost::bench::summarize(summarize_files);
  if (opt.server.empty() || opt.token.empty()) {
    std::fprintf(stderr,
                 "error: --server and --token are required (or OUTPOST_SERVER and "
                 "OUTPOST_TOKEN)\n");
    return 2;
  }
  if (opt.held > opt.devices) {
    std::fprintf(stderr, "error: --held %d is more than --devices %d\n", opt.held, opt.devices);
    return 2;
  }
  return outpost::bench::run(opt);
}
