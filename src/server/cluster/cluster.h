// What several server replicas on one PostgreSQL database share beyond the store: which of
// them leads (runs the rollouts controller, telemetry maintenance, delta making and release
// re-signing), and news of writes so that a long-poll parked on replica A wakes when replica B
// changed the device's desired state.
//
// Leadership is a PostgreSQL session advisory lock (pg_try_advisory_lock) held on a connection
// of its own: when the leader dies its connection closes, PostgreSQL drops the lock, and
// another replica takes it at its next try (every `try_interval_ms`). News goes out with
// pg_notify on a second connection and comes in through LISTEN on the first.
//
// With SQLite (one process) the single replica always leads and news stays in the process.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace outpost::server::cluster {

struct ClusterOptions {
  std::string replica_id;           // shown in status and logs (default: host:pid)
  int64_t try_interval_ms = 1'000;  // a follower tries the lock this often; the leader checks
                                    // its connection as often
};

// Channels of news (payloads are small strings).
inline constexpr const char* kDesiredChannel = "outpost_desired";  // "<device id>[,<id>...]"
inline constexpr const char* kRevokedChannel = "outpost_revoked";  // "<device id>:<ms>"
inline constexpr const char* kReleaseChannel = "outpost_release";  // "" (re-read the store)
inline constexpr const char* kUsersChannel = "outpost_users";      // "" (a user was revoked)
inline constexpr const char* kDeltasChannel = "outpost_deltas";    // "" (the leader catches up)

class Cluster {
 public:
  using Listener = std::function<void(const std::string& channel, const std::string& payload)>;
  using LeaderChange = std::function<void(bool leader)>;

  virtual ~Cluster() = default;
  // Subscribe before start(). Callbacks run on the cluster's thread; keep them short.
  virtual void on_news(Listener listener) = 0;
  virtual void on_leader_change(LeaderChange change) = 0;
  [[nodiscard]] virtual Status start() = 0;
  virtual void stop() = 0;  // a leader gives the lock up at once

  virtual bool leader() const = 0;
  // Sends news to every other replica (not back to this one). Best effort: an error is logged
  // and returned; followers also catch up at their next long-poll timeout.
  virtual Status publish(const std::string& channel, const std::string& payload) = 0;
  // {"backend","replica","leader","leader_since","news_sent","news_received","last_error"}
  virtual nlohmann::json status() const = 0;
};

// "sqlite:..." (or empty): the single-process cluster. "postgres://..." or "postgresql://...":
// the database the store uses.
[[nodiscard]] Result<std::unique_ptr<Cluster>> open_cluster(const std::string& db_url,
                                                            ClusterOptions options);

}  // namespace outpost::server::cluster
