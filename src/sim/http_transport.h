// Asynchronous HTTP/1.1 from many virtual devices to one control plane, on one event loop: a
// shared pool of keep-alive connections for short requests (enrollment, status, telemetry,
// periodic polls), and channels, connections a device keeps for itself while it holds a
// long-poll. Connections are spread over several source addresses (127.0.0.x on loopback), so
// a fleet is not bound by the ~28,000 ephemeral ports of one address pair.
//
// Not thread-safe: construct, call and destroy it on the thread that runs its io_context.
// Every Done is called exactly once, on that thread, never from inside send().
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "agent/device_api.h"
#include "common/error.h"
#include "common/http_client.h"

namespace outpost::sim {

class Connection;

class HttpTransport {
 public:
  struct Options {
    std::string host_header;  // "127.0.0.1:7400"
    boost::asio::ip::tcp::endpoint server;
    std::vector<boost::asio::ip::address> sources;  // local addresses to bind; empty = any
    size_t pool_size = 64;
    uint64_t body_limit = 16 << 20;
  };
  struct Stats {
    int64_t opened = 0;    // connections opened
    int64_t open = 0;      // open now
    int64_t requests = 0;  // exchanges finished (ok or not)
    int64_t queued = 0;    // waiting for a pooled connection now
    int64_t queued_max = 0;
  };
  // What one exchange cost: the bytes it put on the wire both ways (heads and bodies), and its
  // time on the connection (from connecting or writing to the answer; not the queueing for a
  // pooled connection), which is what the server's latency looks like from a device.
  struct Exchange {
    int64_t wire_bytes = 0;
    int64_t duration_us = 0;
  };
  // The answer (any HTTP status) or a transport error (kUnavailable / kDeadlineExceeded).
  using Done = std::function<void(Result<HttpResponse>, Exchange)>;

  HttpTransport(boost::asio::io_context& io, Options options);
  ~HttpTransport();
  HttpTransport(const HttpTransport&) = delete;
  HttpTransport& operator=(const HttpTransport&) = delete;

  // On a pooled keep-alive connection; queued while all are busy.
  void send(const agent::ApiRequest& request, const std::string& bearer, Done done);

  // A connection of one device's own, opened on first use and kept alive between requests.
  class Channel {
   public:
    ~Channel();
    void send(const agent::ApiRequest& request, const std::string& bearer, Done done);
    // Hangs up: what is in flight ends with an error (its Done still runs).
    void close();
    bool busy() const;

   private:
    friend class HttpTransport;
    Channel(HttpTransport& transport, size_t source);
    HttpTransport& transport_;
    size_t source_;
    std::shared_ptr<Connection> connection_;
  };
  std::unique_ptr<Channel> channel(size_t source_hint);

  Stats stats() const;
  // Fails every request still waiting for a pooled connection (in-flight ones finish).
  void drop_queued();
  // Closes every connection (in-flight exchanges end with errors). Later sends fail at once.
  void shutdown();

 private:
  friend class Connection;
  struct Pending {
    agent::ApiRequest request;
    std::string bearer;
    Done done;
  };
  std::shared_ptr<Connection> make_connection(size_t source);
  void dispatch(Pending pending);
  void pump();

  boost::asio::io_context& io_;
  Options options_;
  std::shared_ptr<Stats> shared_stats_;  // shared with the connections, which may outlive a call
  int64_t queued_max_ = 0;
  bool shut_down_ = false;
  size_t created_ = 0;
  size_t busy_ = 0;
  std::vector<std::shared_ptr<Connection>> idle_;
  std::deque<Pending> queue_;
  std::vector<std::weak_ptr<Connection>> all_;  // for shutdown; pruned as they close
};

// Loopback addresses 127.0.0.1 .. 127.0.0.n (n >= 1) to bind connections to.
std::vector<boost::asio::ip::address> loopback_sources(int n);

}  // namespace outpost::sim
