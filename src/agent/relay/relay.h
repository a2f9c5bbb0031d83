// A site relay (`outpost-agent --relay`): serves the device API to the devices of a network
// segment that cannot reach the control plane, from a gateway that can. It never holds keys
// that could forge anything: desired states pass through signed by the control plane (the relay
// verifies them before caching and devices verify them again), blobs are content-addressed
// and verified by SHA-256 on every hop, and the children's credentials are forwarded, not
// replaced. What it adds is what a thin or broken uplink needs:
//   - desired long-polls forwarded upstream one per child, each child's last verified state
//     kept on disk and answered from there while the upstream is down;
//   - an artifact cache by digest: one download per site however many devices want a blob,
//     Range/HEAD served from the cache, pre-fetched when a child's desired state names it,
//     bounded by a disk budget with LRU eviction of blobs no child's state references;
//   - store-and-forward of status reports and telemetry (Backlog), forwarded in each child's
//     order; the server's per-device sequence numbers keep it exactly-once end to end;
//   - enrollment forwarded (the token is checked upstream), refused with a retryable 503 naming
//     the cause while the upstream is down.
// Relays chain: a relay's --server may be another relay. Each hop adds its device id to the
// X-Outpost-Via header, which is how the control plane learns the topology.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/fetch/fetcher.h"
#include "agent/identity.h"
#include "agent/relay/backlog.h"
#include "common/async_http.h"
#include "common/error.h"

namespace boost::asio {
class thread_pool;
}  // namespace boost::asio

namespace outpost::http {
class HttpServer;
class Router;
struct Request;
struct Response;
}  // namespace outpost::http

namespace outpost::agent::relay {

struct RelayOptions {
  std::string listen = "0.0.0.0:7400";        // where the children reach the device API
  int64_t cache_budget_bytes = 10LL << 30;    // artifact cache
  int64_t backlog_limit_bytes = 256LL << 20;  // stored uploads while upstream is slow/down
  int io_threads = 2;
  int64_t artifact_wait_ms = 25'000;     // a child waits this long for a blob being fetched
  int64_t offline_hold_ms = 30'000;      // a poll is held this long while the upstream is down
  int64_t child_window_ms = 5 * 60'000;  // a child counts as present when seen this recently
  FetchOptions fetch;                    // the cache's downloads (rate cap, parallelism)
  // HTTPS for the children (PEM chain and key); empty: plain HTTP on the site network.
  std::string tls_cert_file;
  std::string tls_key_file;
};

class Relay {
 public:
  // `identity` is the relay's own (its upstream is identity.server); data under DIR/relay/.
  Relay(RelayOptions options, std::string data_dir, Identity identity);
  ~Relay();
  Relay(const Relay&) = delete;
  Relay& operator=(const Relay&) = delete;

  // Loads the cached desired states and the backlog, binds the listener, starts forwarding.
  [[nodiscard]] Status start();
  void stop();  // idempotent
  uint16_t port() const;
  // For the relay's own status report and local API: children, cache, backlog, upstream.
  nlohmann::json stats() const;

 private:
  struct CachedDesired {
    std::string credential_hash;
    std::string device;
    int64_t generation = 0;
    std::string body;
    std::string signature;
    std::vector<std::string> via;    // relays below this one on the child's path
    std::set<std::string> digests;   // what the child may fetch through this relay
    std::set<std::string> prefetch;  // fetched ahead for it: a delta where one is offered
    // Reads digests and prefetch from a verified desired document.
    void index(const nlohmann::json& doc);
  };
  struct HeldPoll;
  struct BlobWaiter;

  void get_desired(http::Request&& req, std::function<void(http::Response)> respond);
  void answer_offline(const http::Request& req, const std::string& hash, int64_t known,
                      int64_t wait_ms, const std::function<void(http::Response)>& respond);
  void store_desired(CachedDesired entry);
  void post_upload(http::Request&& req, std::function<void(http::Response)> respond,
                   bool telemetry);
  void get_artifact(http::Request&& req, std::function<void(http::Response)> respond);
  void enroll(http::Request&& req, std::function<void(http::Response)> respond);
  void get_release(http::Request&& req, std::function<void(http::Response)> respond);
  void on_fetch_change();
  http::Response serve_blob(const http::Request& req, const std::string& digest);
  void evict();
  void forward_loop();
  void set_upstream(bool up, const std::string& error);
  // The upstream URL in use now (identity_.servers: the agent's --server list, shared with the
  // relay's own device clients), and a request to `used` that failed: the next URL, and down.
  std::string upstream() const;
  void upstream_failed(const std::string& used, const std::string& error);
  std::string outgoing_via(const http::Request& req) const;
  void seen(const std::string& device);
  // The child's credential and device id (and it counts as seen), or nullopt once it was
  // answered 401.
  std::optional<std::pair<std::string, std::string>> child_of(
      const http::Request& req, const std::function<void(http::Response)>& respond);
  bool blob_allowed(const std::string& credential_hash, const std::string& digest) const;

  RelayOptions options_;
  std::string dir_;
  Identity identity_;
  std::string own_credential_hash_;
  std::unique_ptr<AsyncHttpClient> up_;  // reset first in stop(): its callbacks use the rest
  ArtifactStore cache_;
  std::unique_ptr<Fetcher> fetcher_;
  Backlog backlog_;
  std::unique_ptr<http::Router> router_;
  std::unique_ptr<http::HttpServer> http_;
  std::unique_ptr<boost::asio::thread_pool> workers_;  // disk work off the I/O threads

  mutable std::mutex mu_;                         // guards everything below up to the counters
  std::map<std::string, CachedDesired> desired_;  // by credential hash
  std::map<std::string, int64_t> children_;       // device id -> last seen (ms)
  std::map<std::string, int64_t> last_access_;    // digest -> last served (ms)
  std::map<uint64_t, std::shared_ptr<HeldPoll>> held_;
  uint64_t next_held_ = 1;
  std::map<std::string, std::vector<std::shared_ptr<BlobWaiter>>> waiting_;  // by digest
  bool upstream_up_ = true;
  std::string upstream_error_;
  int64_t upstream_changed_at_ = 0;

  std::atomic<int64_t> cache_hits_{0};
  std::atomic<int64_t> cache_misses_{0};
  std::atomic<int64_t> cache_evictions_{0};
  std::atomic<int64_t> desired_offline_{0};   // polls answered from the cache, upstream down
  std::atomic<int64_t> forwarded_{0};         // uploads delivered upstream
  std::atomic<int64_t> refused_upstream_{0};  // uploads upstream refused for good (4xx)
  std::atomic<int64_t> refused_full_{0};      // uploads refused because the backlog was full

  std::mutex forward_mu_;
  std::condition_variable forward_cv_;
  std::atomic<bool> stopping_{false};
  std::thread forwarder_;
};

}  // namespace outpost::agent::relay
