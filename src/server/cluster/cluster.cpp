#include "server/cluster/cluster.h"

#include <libpq-fe.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include <spdlog/spdlog.h>

namespace outpost::server::cluster {
namespace {

int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The advisory lock key every replica of one database contends for ("outpost leader").
constexpr int64_t kLeaderLockKey = 0x6f757470'6c656164;  // "outplead"

std::string default_replica_id() {
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return std::string(host) + ":" + std::to_string(::getpid());
}

// Without a password, for logs and errors.
std::string shown(const std::string& url) {
  const auto scheme_end = url.find("://");
  if (scheme_end == std::string::npos) return url;
  const auto at = url.find('@', scheme_end);
  const auto slash = url.find('/', scheme_end + 3);
  if (at == std::string::npos || (slash != std::string::npos && slash < at)) return url;
  const auto colon = url.find(':', scheme_end + 3);
  if (colon == std::string::npos || colon > at) return url;
  return url.substr(0, colon + 1) + "***" + url.substr(at);
}

class SingleCluster final : public Cluster {
 public:
  explicit SingleCluster(ClusterOptions options) : options_(std::move(options)) {}
  void on_news(Listener) override {}
  void on_leader_change(LeaderChange change) override { change_ = std::move(change); }
  Status start() override {
    since_ = wall_ms();
    if (change_) change_(true);
    return ok();
  }
  void stop() override {}
  bool leader() const override { return true; }
  Status publish(const std::string&, const std::string&) override { return ok(); }
  nlohmann::json status() const override {
    return {{"backend", "single"},
            {"replica", options_.replica_id},
            {"leader", true},
            {"leader_since", since_}};
  }

 private:
  ClusterOptions options_;
  LeaderChange change_;
  int64_t since_ = 0;
};

struct PgConnDeleter {
  void operator()(PGconn* c) const { PQfinish(c); }
};
using PgConn = std::unique_ptr<PGconn, PgConnDeleter>;

struct PgResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using PgResult = std::unique_ptr<PGresult, PgResultDeleter>;

class PgCluster final : public Cluster {
 public:
  PgCluster(std::string url, ClusterOptions options)
      : url_(std::move(url)), options_(std::move(options)) {}
  ~PgCluster() override { stop(); }

  void on_news(Listener listener) override { listener_ = std::move(listener); }
  void on_leader_change(LeaderChange change) override { change_ = std::move(change); }

  Status start() override {
    // Both connections once here, so a wrong URL fails the start rather than a log line.
    auto listen = connect();
    if (!listen) return make_error(listen.error());
    OUTPOST_TRY(prepare_listen(listen->get()));
    listen_ = std::move(*listen);
    auto send = connect();
    if (!send) return make_error(send.error());
    send_ = std::move(*send);
    pid_ = PQbackendPID(listen_.get());
    stopping_ = false;
    thread_ = std::thread([this] { run(); });
    return ok();
  }

  void stop() override {
    stopping_ = true;
    if (thread_.joinable()) thread_.join();
    if (leader_.exchange(false)) {
      if (listen_) PgResult(PQexec(listen_.get(), "SELECT pg_advisory_unlock_all()"));
      spdlog::info("cluster: replica {} gave up leadership (stopping)", options_.replica_id);
      if (change_) change_(false);
    }
    listen_.reset();
    std::lock_guard lock(send_mu_);
    send_.reset();
  }

  bool leader() const override { return leader_.load(); }

  Status publish(const std::string& channel, const std::string& payload) override {
    std::lock_guard lock(send_mu_);
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (!send_ || PQstatus(send_.get()) != CONNECTION_OK) {
        auto fresh = connect();
        if (!fresh) return note_error(fresh.error());
        send_ = std::move(*fresh);
      }
      const char* values[2] = {channel.c_str(), payload.c_str()};
      PgResult r(PQexecParams(send_.get(), "SELECT pg_notify($1, $2)", 2, nullptr, values, nullptr,
                              nullptr, 0));
      if (PQresultStatus(r.get()) == PGRES_TUPLES_OK) {
        ++sent_;
        return ok();
      }
      const std::string why = PQerrorMessage(send_.get());
      send_.reset();  // and once more on a fresh connection
      if (attempt == 1) return note_error(Error{Errc::kUnavailable, "pg_notify: " + why, ""});
    }
    return ok();
  }

  nlohmann::json status() const override {
    std::lock_guard lock(status_mu_);
    return {{"backend", "postgres"},     {"replica", options_.replica_id},
            {"leader", leader_.load()},  {"leader_since", leader_since_},
            {"news_sent", sent_.load()}, {"news_received", received_.load()},
            {"last_error", last_error_}};
  }

 private:
  Result<PgConn> connect() {
    PgConn conn(PQconnectdb(url_.c_str()));
    if (!conn || PQstatus(conn.get()) != CONNECTION_OK) {
      std::string why = conn ? PQerrorMessage(conn.get()) : "out of memory";
      while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
      return make_error(Errc::kUnavailable,
                        "cluster: cannot connect to " + shown(url_) + ": " + why);
    }
    return conn;
  }

  Status prepare_listen(PGconn* conn) {
    for (const char* channel :
         {kDesiredChannel, kRevokedChannel, kReleaseChannel, kUsersChannel, kDeltasChannel}) {
      const std::string sql = std::string("LISTEN ") + channel;
      PgResult r(PQexec(conn, sql.c_str()));
      if (PQresultStatus(r.get()) != PGRES_COMMAND_OK) {
        return make_error(Errc::kUnavailable, "cluster: " + sql + ": " + PQerrorMessage(conn));
      }
    }
    return ok();
  }

  Status note_error(const Error& e) {
    spdlog::warn("{}", e.message);
    std::lock_guard lock(status_mu_);
    last_error_ = e.message;
    return make_error(e);
  }

  void lose_connection(const std::string& why) {
    listen_.reset();
    if (leader_.exchange(false)) {
      spdlog::warn("cluster: replica {} lost its database connection ({}): no longer the leader",
                   options_.replica_id, why);
      if (change_) change_(false);
    }
    note_error(Error{Errc::kUnavailable, "cluster: " + why, ""});
  }

  // Takes the lock when free (follower) or checks the connection still holds it (leader).
  void check_lock() {
    if (!leader_) {
      PgResult r(PQexecParams(listen_.get(), "SELECT pg_try_advisory_lock($1::bigint)", 1, nullptr,
                              key_values(), nullptr, nullptr, 0));
      if (PQresultStatus(r.get()) != PGRES_TUPLES_OK) {
        return lose_connection(PQerrorMessage(listen_.get()));
      }
      if (std::string(PQgetvalue(r.get(), 0, 0)) == "t") {
        {
          std::lock_guard lock(status_mu_);
          leader_since_ = wall_ms();
        }
        leader_ = true;
        spdlog::info("cluster: replica {} is the leader", options_.replica_id);
        if (change_) change_(true);
      }
      return;
    }
    PgResult r(PQexec(listen_.get(), "SELECT 1"));
    if (PQresultStatus(r.get()) != PGRES_TUPLES_OK) lose_connection(PQerrorMessage(listen_.get()));
  }

  const char* const* key_values() {
    key_text_ = std::to_string(kLeaderLockKey);
    key_ptr_ = key_text_.c_str();
    return &key_ptr_;
  }

  void drain_news() {
    if (PQconsumeInput(listen_.get()) == 0) {
      return lose_connection(PQerrorMessage(listen_.get()));
    }
    while (PGnotify* n = PQnotifies(listen_.get())) {
      const bool own = n->be_pid == pid_ || n->be_pid == send_pid();
      const std::string channel = n->relname;
      const std::string payload = n->extra != nullptr ? n->extra : "";
      PQfreemem(n);
      if (own) continue;
      ++received_;
      if (listener_) listener_(channel, payload);
    }
  }

  int send_pid() {
    std::lock_guard lock(send_mu_);
    return send_ ? PQbackendPID(send_.get()) : -1;
  }

  void run() {
    int64_t next_check = 0;
    int64_t retry_ms = 500;  // reconnecting: 0.5 s, doubling to 5 s
    while (!stopping_) {
      if (!listen_) {
        auto fresh = connect();
        if (fresh && prepare_listen(fresh->get())) {
          listen_ = std::move(*fresh);
          pid_ = PQbackendPID(listen_.get());
          retry_ms = 500;
          spdlog::info("cluster: replica {} reconnected to the database", options_.replica_id);
          // News sent while it was away is lost: the replica's listener re-reads what it holds.
          if (listener_) listener_("", "");
        } else {
          if (!fresh) note_error(fresh.error());
          const int64_t wait = retry_ms;
          retry_ms = std::min<int64_t>(retry_ms * 2, 5'000);
          for (int64_t slept = 0; slept < wait && !stopping_; slept += 100) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
          }
          continue;
        }
      }
      const int64_t now = steady_ms();
      if (now >= next_check) {
        check_lock();
        next_check = now + options_.try_interval_ms;
        if (!listen_) continue;
      }
      pollfd pfd{PQsocket(listen_.get()), POLLIN, 0};
      const int timeout = static_cast<int>(std::min<int64_t>(200, next_check - steady_ms()));
      if (::poll(&pfd, 1, std::max(timeout, 0)) > 0) drain_news();
    }
  }

  const std::string url_;
  ClusterOptions options_;
  Listener listener_;
  LeaderChange change_;
  PgConn listen_;  // the cluster thread's: LISTEN and the advisory lock
  int pid_ = 0;
  std::mutex send_mu_;
  PgConn send_;  // publish()'s
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> leader_{false};
  std::atomic<int64_t> sent_{0}, received_{0};
  mutable std::mutex status_mu_;
  int64_t leader_since_ = 0;
  std::string last_error_;
  std::string key_text_;
  const char* key_ptr_ = nullptr;
};

}  // namespace

Result<std::unique_ptr<Cluster>> open_cluster(const std::string& db_url, ClusterOptions options) {
  if (options.replica_id.empty()) options.replica_id = default_replica_id();
  if (db_url.rfind("postgres://", 0) == 0 || db_url.rfind("postgresql://", 0) == 0) {
    return std::unique_ptr<Cluster>(std::make_unique<PgCluster>(db_url, std::move(options)));
  }
  return std::unique_ptr<Cluster>(std::make_unique<SingleCluster>(std::move(options)));
}

}  // namespace outpost::server::cluster
