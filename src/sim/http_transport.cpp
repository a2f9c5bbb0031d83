#include "sim/http_transport.h"

#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <optional>

#include <boost/asio/post.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>

namespace outpost::sim {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

// One keep-alive connection; one exchange at a time. Lives as long as an exchange holds it
// (shared_from_this in every handler) or the transport keeps it idle.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using Finish = std::function<void(Result<HttpResponse>, HttpTransport::Exchange, bool reusable)>;

  Connection(asio::io_context& io, std::shared_ptr<HttpTransport::Stats> stats,
             tcp::endpoint server, std::optional<asio::ip::address> source, uint64_t body_limit)
      : stream_(io),
        stats_(std::move(stats)),
        server_(server),
        source_(source),
        body_limit_(body_limit) {}
  ~Connection() {
    if (counted_open_) --stats_->open;
  }

  bool busy() const { return static_cast<bool>(finish_); }

  void start(const agent::ApiRequest& request, const std::string& bearer, const std::string& host,
             Finish finish) {
    finish_ = std::move(finish);
    started_ = std::chrono::steady_clock::now();
    if (cancelled_) return fail("starting", asio::error::operation_aborted);
    timeout_ms_ = std::max<int64_t>(request.timeout_ms, 1);
    bytes_ = 0;
    retried_ = false;
    req_ = {};
    req_.method_string(request.method);
    req_.target(request.path);
    req_.version(11);
    req_.set(bhttp::field::host, host);
    req_.set(bhttp::field::user_agent, "outpost-sim");
    if (!bearer.empty()) req_.set(bhttp::field::authorization, "Bearer " + bearer);
    if (!request.content_type.empty()) req_.set(bhttp::field::content_type, request.content_type);
    for (const auto& [name, value] : request.headers) req_.set(name, value);
    req_.body() = request.body;
    req_.keep_alive(true);
    req_.prepare_payload();
    if (stream_.socket().is_open()) {
      reused_ = true;
      write();
    } else {
      reused_ = false;
      connect();
    }
  }

  // For good: an exchange started later fails at once (a channel's hang-up).
  void cancel() {
    cancelled_ = true;
    close();
  }

  void close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
    if (counted_open_) {
      counted_open_ = false;
      --stats_->open;
    }
  }

 private:
  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(timeout_ms_); }
  HttpTransport::Exchange exchange() const {
    return {bytes_, std::chrono::duration_cast<std::chrono::microseconds>(
                        std::chrono::steady_clock::now() - started_)
                        .count()};
  }

  void connect() {
    close();
    beast::error_code ec;
    auto& socket = stream_.socket();
    socket.open(server_.protocol(), ec);
    if (!ec && source_) {
      // Choose the port at connect time, from the whole 4-tuple: bound with port 0 the kernel
      // must find a port free for every destination, which slows down to a crawl (and runs
      // out) with thousands of connections.
      int one = 1;
      ::setsockopt(socket.native_handle(), IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
      socket.bind(tcp::endpoint(*source_, 0), ec);
    }
    if (ec) return fail("opening a socket", ec);
    counted_open_ = true;
    ++stats_->open;
    ++stats_->opened;
    stream_.expires_after(std::min(timeout(), std::chrono::milliseconds(10'000)));
    stream_.async_connect(server_, [self = shared_from_this()](beast::error_code cec) {
      if (cec) return self->fail("connecting", cec);
      beast::error_code opt;
      self->stream_.socket().set_option(tcp::no_delay(true), opt);
      self->write();
    });
  }

  void write() {
    stream_.expires_after(timeout());
    bhttp::async_write(stream_, req_, [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->bytes_ += static_cast<int64_t>(n);
      if (ec) return self->retry_or_fail("sending", ec, false);
      self->read();
    });
  }

  void read() {
    parser_.emplace();
    parser_->body_limit(body_limit_);
    stream_.expires_after(timeout());
    bhttp::async_read(stream_, buffer_, *parser_,
                      [self = shared_from_this()](beast::error_code ec, size_t n) {
                        self->bytes_ += static_cast<int64_t>(n);
                        if (ec) return self->retry_or_fail("reading the answer", ec, n > 0);
                        self->succeed();
                      });
  }

  // A kept-alive connection the server has meanwhile closed fails at once: try a fresh one.
  void retry_or_fail(const char* step, beast::error_code ec, bool got_bytes) {
    const bool stale = reused_ && !retried_ && !got_bytes && ec != beast::error::timeout &&
                       ec != asio::error::operation_aborted;
    if (stale) {
      retried_ = true;
      reused_ = false;
      buffer_.clear();
      return connect();
    }
    fail(step, ec);
  }

  void succeed() {
    auto& msg = parser_->get();
    HttpResponse response;
    response.status = static_cast<long>(msg.result_int());
    for (const auto& field : msg) {
      std::string name(field.name_string());
      std::transform(name.begin(), name.end(), name.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      response.headers[name] = std::string(field.value());
    }
    response.body = std::move(msg.body());
    const bool keep = msg.keep_alive();
    parser_.reset();
    if (!keep) close();
    ++stats_->requests;
    auto finish = std::move(finish_);
    finish_ = nullptr;
    finish(std::move(response), exchange(), keep);
  }

  void fail(const char* step, beast::error_code ec) {
    close();
    buffer_.clear();
    parser_.reset();
    ++stats_->requests;
    const bool timed_out = ec == beast::error::timeout;
    Error error;
    error.code = timed_out ? Errc::kDeadlineExceeded : Errc::kUnavailable;
    error.message = std::string(timed_out ? "timed out " : "failed ") + step + " (" +
                    server_.address().to_string() + ":" + std::to_string(server_.port()) +
                    "): " + ec.message();
    auto finish = std::move(finish_);
    finish_ = nullptr;
    if (finish) finish(make_error(std::move(error)), exchange(), false);
  }

  beast::tcp_stream stream_;
  std::shared_ptr<HttpTransport::Stats> stats_;
  tcp::endpoint server_;
  std::optional<asio::ip::address> source_;
  uint64_t body_limit_;
  beast::flat_buffer buffer_;
  bhttp::request<bhttp::string_body> req_;
  std::optional<bhttp::response_parser<bhttp::string_body>> parser_;
  Finish finish_;
  int64_t timeout_ms_ = 30'000;
  int64_t bytes_ = 0;
  std::chrono::steady_clock::time_point started_;
  bool reused_ = false;
  bool retried_ = false;
  bool counted_open_ = false;
  bool cancelled_ = false;
};

namespace {

Result<HttpResponse> shut_down_error() {
  return make_error(Errc::kUnavailable, "the simulator is shutting down");
}

}  // namespace

std::vector<asio::ip::address> loopback_sources(int n) {
  std::vector<asio::ip::address> out;
  for (int i = 1; i <= std::max(n, 1); ++i) {
    out.push_back(asio::ip::make_address_v4(asio::ip::address_v4::uint_type(0x7F000000u) +
                                            static_cast<asio::ip::address_v4::uint_type>(i)));
  }
  return out;
}

HttpTransport::HttpTransport(asio::io_context& io, Options options)
    : io_(io), options_(std::move(options)), shared_stats_(std::make_shared<Stats>()) {
  options_.pool_size = std::max<size_t>(options_.pool_size, 1);
}

HttpTransport::~HttpTransport() { shutdown(); }

HttpTransport::Stats HttpTransport::stats() const {
  Stats s = *shared_stats_;
  s.queued = static_cast<int64_t>(queue_.size());
  s.queued_max = queued_max_;
  return s;
}

std::shared_ptr<Connection> HttpTransport::make_connection(size_t source) {
  std::optional<asio::ip::address> bind;
  if (!options_.sources.empty()) bind = options_.sources[source % options_.sources.size()];
  auto c =
      std::make_shared<Connection>(io_, shared_stats_, options_.server, bind, options_.body_limit);
  if (all_.size() > 64 && all_.size() % 64 == 0) {
    all_.erase(std::remove_if(all_.begin(), all_.end(), [](auto& w) { return w.expired(); }),
               all_.end());
  }
  all_.push_back(c);
  return c;
}

void HttpTransport::send(const agent::ApiRequest& request, const std::string& bearer, Done done) {
  if (shut_down_) {
    asio::post(io_, [done = std::move(done)] { done(shut_down_error(), {}); });
    return;
  }
  Pending pending{request, bearer, std::move(done)};
  if (busy_ >= options_.pool_size) {
    queue_.push_back(std::move(pending));
    queued_max_ = std::max(queued_max_, static_cast<int64_t>(queue_.size()));
    return;
  }
  // Started from the loop, so a Done never runs inside send().
  asio::post(io_, [this, pending = std::move(pending)]() mutable { dispatch(std::move(pending)); });
  ++busy_;
}

void HttpTransport::dispatch(Pending pending) {
  // busy_ was counted when the exchange was admitted.
  if (shut_down_) {
    --busy_;
    pending.done(shut_down_error(), {});
    return;
  }
  std::shared_ptr<Connection> c;
  if (!idle_.empty()) {
    c = std::move(idle_.back());
    idle_.pop_back();
  } else {
    c = make_connection(created_++);
  }
  c->start(pending.request, pending.bearer, options_.host_header,
           [this, c, done = std::move(pending.done)](Result<HttpResponse> r, Exchange info,
                                                     bool reusable) mutable {
             --busy_;
             if (reusable && !shut_down_) idle_.push_back(std::move(c));
             pump();
             done(std::move(r), info);
           });
}

void HttpTransport::pump() {
  while (!queue_.empty() && busy_ < options_.pool_size) {
    Pending next = std::move(queue_.front());
    queue_.pop_front();
    ++busy_;
    asio::post(io_, [this, next = std::move(next)]() mutable { dispatch(std::move(next)); });
  }
}

void HttpTransport::drop_queued() {
  while (!queue_.empty()) {
    Pending p = std::move(queue_.front());
    queue_.pop_front();
    asio::post(io_, [done = std::move(p.done)] {
      done(make_error(Errc::kUnavailable, "dropped from the queue: the simulator is stopping"), {});
    });
  }
}

void HttpTransport::shutdown() {
  shut_down_ = true;
  for (auto& w : all_) {
    if (auto c = w.lock()) c->close();
  }
  all_.clear();
  idle_.clear();
  while (!queue_.empty()) {
    Pending p = std::move(queue_.front());
    queue_.pop_front();
    asio::post(io_, [done = std::move(p.done)] { done(shut_down_error(), {}); });
  }
}

std::unique_ptr<HttpTransport::Channel> HttpTransport::channel(size_t source_hint) {
  return std::unique_ptr<Channel>(new Channel(*this, source_hint));
}

HttpTransport::Channel::Channel(HttpTransport& transport, size_t source)
    : transport_(transport), source_(source) {}

HttpTransport::Channel::~Channel() { close(); }

bool HttpTransport::Channel::busy() const { return connection_ && connection_->busy(); }

void HttpTransport::Channel::send(const agent::ApiRequest& request, const std::string& bearer,
                                  Done done) {
  if (transport_.shut_down_) {
    asio::post(transport_.io_, [done = std::move(done)] { done(shut_down_error(), {}); });
    return;
  }
  if (!connection_) connection_ = transport_.make_connection(source_);
  auto c = connection_;
  asio::post(transport_.io_, [c, request, bearer, host = transport_.options_.host_header,
                              done = std::move(done)]() mutable {
    c->start(request, bearer, host,
             [done = std::move(done)](Result<HttpResponse> r, Exchange info, bool) {
               done(std::move(r), info);
             });
  });
}

void HttpTransport::Channel::close() {
  // The next send gets a new connection: the old one's aborted handlers still finish its own
  // exchange.
  if (connection_) connection_->cancel();
  connection_.reset();
}

}  // namespace outpost::sim
