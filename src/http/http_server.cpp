#include "http/http_server.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <limits>
#include <mutex>
#include <random>
#include <set>
#include <type_traits>

#include <spdlog/spdlog.h>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <nlohmann/json.hpp>

#include "common/request_signature.h"

namespace outpost::http {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;

// ---------------------------------------------------------------------------------------
// Request / Response helpers

std::string Request::header(const std::string& lower_name) const {
  auto it = headers.find(lower_name);
  return it == headers.end() ? std::string() : it->second;
}

std::optional<std::string> Request::query_param(const std::string& name) const {
  auto it = query.find(name);
  if (it == query.end()) return std::nullopt;
  return it->second;
}

Response Response::json(int status, std::string body) {
  Response r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

Response Response::error(const Error& error) {
  nlohmann::json doc = {
      {"error",
       {{"code", errc_name(error.code)}, {"message", error.describe()}, {"field", error.field}}}};
  return json(errc_http_status(error.code), doc.dump());
}

Response Response::text(int status, std::string body, std::string content_type) {
  Response r;
  r.status = status;
  r.body = std::move(body);
  r.content_type = std::move(content_type);
  return r;
}

std::string percent_decode(std::string_view text, bool plus_is_space) {
  std::string out;
  out.reserve(text.size());
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '%' && i + 2 < text.size()) {
      int hi = hex(text[i + 1]);
      int lo = hex(text[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
        continue;
      }
    }
    out.push_back(plus_is_space && c == '+' ? ' ' : c);
  }
  return out;
}

Result<std::pair<std::string, uint16_t>> split_host_port(const std::string& text) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon + 1 >= text.size()) {
    return make_error(Errc::kInvalidArgument,
                      "expected host:port like 127.0.0.1:7400, got \"" + text + "\"");
  }
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host.empty()) host = "0.0.0.0";
  unsigned long port = 0;
  try {
    size_t used = 0;
    port = std::stoul(text.substr(colon + 1), &used);
    if (used != text.size() - colon - 1 || port > 65535) throw std::out_of_range("port");
  } catch (...) {
    return make_error(Errc::kInvalidArgument, "port in \"" + text + "\" is not a number 0-65535");
  }
  return std::make_pair(host, static_cast<uint16_t>(port));
}

// ---------------------------------------------------------------------------------------
// Router

namespace {

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i < path.size()) {
    while (i < path.size() && path[i] == '/') ++i;
    if (i >= path.size()) break;
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    parts.push_back(path.substr(i, j - i));
    i = j;
  }
  return parts;
}

bool match_segments(const std::vector<std::string>& pattern, const std::vector<std::string>& path,
                    std::map<std::string, std::string>& params) {
  for (size_t i = 0; i < pattern.size(); ++i) {
    const std::string& seg = pattern[i];
    bool is_param = seg.size() > 2 && seg.front() == '{' && seg.back() == '}';
    if (is_param && seg.size() > 5 && seg.compare(seg.size() - 4, 4, "...}") == 0) {
      if (i >= path.size()) return false;
      std::string rest;
      for (size_t k = i; k < path.size(); ++k) rest += (k == i ? "" : "/") + path[k];
      params[seg.substr(1, seg.size() - 5)] = rest;
      return true;
    }
    if (i >= path.size()) return false;
    if (is_param) {
      params[seg.substr(1, seg.size() - 2)] = path[i];
    } else if (seg != path[i]) {
      return false;
    }
  }
  return pattern.size() == path.size();
}

}  // namespace

void Router::add(std::string method, std::string pattern, Handler handler, RouteOptions options) {
  routes_.push_back(Route{std::move(method), split_path(pattern), std::move(handler), options});
}

Router::Match Router::match(const std::string& method, const std::string& path) const {
  Match result;
  auto parts = split_path(path);
  for (const auto& route : routes_) {
    std::map<std::string, std::string> params;
    if (!match_segments(route.segments, parts, params)) continue;
    result.path_known = true;
    if (route.method == method || (method == "HEAD" && route.method == "GET")) {
      result.handler = &route.handler;
      result.options = route.options;
      result.params = std::move(params);
      return result;
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// A body that streams a byte range of an open file, reading with pread.

namespace {

struct FileRangeBody {
  struct value_type {
    std::shared_ptr<int> fd;  // closes on last release
    uint64_t offset = 0;
    uint64_t length = 0;
  };

  static uint64_t size(const value_type& body) { return body.length; }

  class writer {
   public:
    using const_buffers_type = net::const_buffer;

    template <bool isRequest, class Fields>
    writer(const bhttp::header<isRequest, Fields>&, const value_type& body) : body_(body) {}

    void init(beast::error_code& ec) { ec = {}; }

    boost::optional<std::pair<const_buffers_type, bool>> get(beast::error_code& ec) {
      uint64_t remaining = body_.length - sent_;
      if (remaining == 0) {
        ec = {};
        return boost::none;
      }
      size_t want = static_cast<size_t>(std::min<uint64_t>(remaining, sizeof buf_));
      ssize_t n;
      do {
        n = ::pread(*body_.fd, buf_, want, static_cast<off_t>(body_.offset + sent_));
      } while (n < 0 && errno == EINTR);
      if (n <= 0) {
        // The file shrank or failed under us: end the response early (client sees a
        // short body and can retry with Range).
        ec = beast::error_code(n < 0 ? errno : EIO, beast::generic_category());
        return boost::none;
      }
      sent_ += static_cast<uint64_t>(n);
      ec = {};
      return {{net::const_buffer(buf_, static_cast<size_t>(n)), sent_ < body_.length}};
    }

   private:
    const value_type& body_;
    uint64_t sent_ = 0;
    char buf_[64 * 1024];
  };
};

// The Date header (devices learn the server's clock from it to sign their requests inside its
// window), formatted once a second per thread.
const std::string& http_date_now() {
  thread_local int64_t second = -1;
  thread_local std::string text;
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  if (now != second) {
    second = now;
    text = reqsig::format_http_date(now * 1000);
  }
  return text;
}

std::string make_temp_path(const std::string& dir) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return dir + "/upload-" + std::to_string(rng()) + ".part";
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Session: one connection, requests handled one at a time (HTTP/1.1 keep-alive).

void Hangup::on_hangup(std::function<void()> action) {
  std::unique_lock lock(mu_);
  if (!fired_) {
    action_ = std::move(action);
    return;
  }
  lock.unlock();
  action();
}

void Hangup::fire() {
  std::function<void()> action;
  {
    std::lock_guard lock(mu_);
    if (fired_) return;
    fired_ = true;
    action = std::move(action_);
  }
  if (action) action();
}

// Stream is beast::tcp_stream (plain HTTP) or beast::ssl_stream<beast::tcp_stream> (HTTPS);
// timeouts and the socket are always those of the TCP layer underneath.
template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;
  using std::enable_shared_from_this<Session<Stream>>::shared_from_this;

 public:
  template <class... StreamArgs>
  Session(const Router& router, const ServerOptions& options, std::shared_ptr<void> slot,
          tcp::socket socket, StreamArgs&&... stream_args)
      : stream_(std::move(socket), std::forward<StreamArgs>(stream_args)...),
        router_(router),
        options_(options),
        slot_(std::move(slot)) {
    beast::error_code ec;
    auto ep = lowest().socket().remote_endpoint(ec);
    if (!ec) remote_ = ep.address().to_string() + ":" + std::to_string(ep.port());
    lowest().socket().set_option(tcp::no_delay(true), ec);
  }

  void start() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] {
      if constexpr (kTls) {
        // A client that connects and never finishes the handshake is cut at the header
        // timeout, like one that never finishes a request header.
        self->lowest().expires_after(std::chrono::milliseconds(self->options_.header_timeout_ms));
        self->stream_.async_handshake(net::ssl::stream_base::server, [self](beast::error_code ec) {
          if (ec) return self->shutdown();
          self->wait_for_request();
        });
      } else {
        self->wait_for_request();
      }
    });
  }

 private:
  beast::tcp_stream& lowest() { return beast::get_lowest_layer(stream_); }

  // Two clocks guard a connection (slowloris): an idle keep-alive connection may wait
  // idle_timeout_ms for its next request, but once the first byte of a request arrives its
  // header must be complete within header_timeout_ms and its body at a minimum rate.
  void wait_for_request() {
    if (buffer_.size() > 0) return read_header();  // pipelined: already here
    // Reads whatever arrives first through the stream (decrypted when TLS), so bytes a TLS
    // engine buffered during the handshake are seen as well.
    lowest().expires_after(std::chrono::milliseconds(options_.idle_timeout_ms));
    stream_.async_read_some(buffer_.prepare(4096),
                            [self = shared_from_this()](beast::error_code ec, size_t n) {
                              if (ec) return self->shutdown();
                              self->buffer_.commit(n);
                              self->read_header();
                            });
  }

  void read_header() {
    header_parser_.emplace();
    header_parser_->header_limit(16 * 1024);
    // The route's own limit applies once it is known; Beast would otherwise refuse any
    // Content-Length over its 1 MB default while parsing the header.
    header_parser_->body_limit(std::numeric_limits<std::uint64_t>::max());
    string_parser_.reset();
    file_parser_.reset();
    lowest().expires_after(std::chrono::milliseconds(options_.header_timeout_ms));
    bhttp::async_read_header(
        stream_, buffer_, *header_parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
  }

  void on_header(beast::error_code ec) {
    if (ec == bhttp::error::header_limit) {
      keep_alive_ = false;
      return write(Response::json(
          431, nlohmann::json{{"error",
                               {{"code", "header_too_large"},
                                {"message", "request header is over the limit of 16 KiB"},
                                {"field", ""}}}}
                   .dump()));
    }
    if (ec) return shutdown();
    auto& msg = header_parser_->get();
    request_ = Request{};
    request_.method = std::string(msg.method_string());
    request_.target = std::string(msg.target());
    request_.remote = remote_;
    keep_alive_ = msg.keep_alive();
    version_ = msg.version();
    for (const auto& field : msg) {
      std::string name(field.name_string());
      for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      request_.headers[name] = std::string(field.value());
    }
    std::string_view target(msg.target().data(), msg.target().size());
    auto qpos = target.find('?');
    request_.path = percent_decode(target.substr(0, qpos), false);
    if (qpos != std::string_view::npos) {
      std::string_view q = target.substr(qpos + 1);
      while (!q.empty()) {
        auto amp = q.find('&');
        std::string_view pair = q.substr(0, amp);
        auto eq = pair.find('=');
        std::string key = percent_decode(pair.substr(0, eq), true);
        std::string value = eq == std::string_view::npos
                                ? std::string()
                                : percent_decode(pair.substr(eq + 1), true);
        if (!key.empty()) request_.query[key] = value;
        if (amp == std::string_view::npos) break;
        q.remove_prefix(amp + 1);
      }
    }

    auto match = router_.match(request_.method, request_.path);
    if (!match.handler) {
      keep_alive_ = false;  // we do not read the body of a request we will not serve
      Error err{Errc::kNotFound, "no route for " + request_.method + " " + request_.path, {}};
      Response resp = Response::error(err);
      if (match.path_known) {
        resp = Response::json(
            405,
            nlohmann::json{{"error",
                            {{"code", "method_not_allowed"},
                             {"message", request_.method + " is not allowed on " + request_.path},
                             {"field", ""}}}}
                .dump());
      }
      return write(std::move(resp));
    }
    request_.params = match.params;
    handler_ = match.handler;
    watch_hangup_ = match.options.watch_hangup;
    head_ = request_.method == "HEAD";

    if (bhttp::token_list{msg[bhttp::field::expect]}.exists("100-continue")) {
      auto cont =
          std::make_shared<bhttp::response<bhttp::empty_body>>(bhttp::status::continue_, version_);
      bhttp::async_write(stream_, *cont,
                         [self = shared_from_this(), cont, match](beast::error_code wec, size_t) {
                           if (wec) return self->shutdown();
                           self->read_body(match.options);
                         });
      return;
    }
    read_body(match.options);
  }

  void read_body(const RouteOptions& options) {
    // Beast reads at most the buffer's free space (512 bytes when it is empty), so a 12 KB
    // body would take 24 reads, each re-arming the timer. Room for the body (up to 64 KB)
    // makes it one or two; sessions without a body (long-polls) keep their small buffer.
    const auto length = header_parser_->content_length();
    // Beast checks a Content-Length against the body limit only while it parses the header,
    // when the route (and so its limit) was not known yet: refuse here, before any byte.
    if (length && *length > options.body_limit) {
      keep_alive_ = false;
      return write(Response::error(
          Error{Errc::kPayloadTooLarge,
                "request body of " + std::to_string(*length) + " bytes is over the limit of " +
                    std::to_string(options.body_limit) + " for " + request_.path,
                {}}));
    }
    if (length && *length > 512) {
      buffer_.reserve(static_cast<size_t>(std::min<uint64_t>(*length, 64 * 1024)));
    }
    // The body must arrive at options_.min_body_rate bytes/s or better (a chunked body of
    // unknown length gets the route's limit as its length).
    const uint64_t expected = length ? *length : options.body_limit;
    const int64_t rate = std::max<int64_t>(1, options_.min_body_rate);
    lowest().expires_after(std::chrono::milliseconds(
        options_.header_timeout_ms +
        static_cast<int64_t>(
            std::min<uint64_t>(expected / static_cast<uint64_t>(rate), uint64_t{24} * 3600) *
            1000)));
    if (options.stream_body_to_file) {
      file_parser_.emplace(std::move(*header_parser_));
      file_parser_->body_limit(options.body_limit);
      temp_path_ = make_temp_path(options_.temp_dir);
      beast::error_code ec;
      file_parser_->get().body().open(temp_path_.c_str(), beast::file_mode::write, ec);
      if (ec) {
        keep_alive_ = false;
        return write(Response::error(
            Error{Errc::kIo, "cannot create upload file " + temp_path_ + ": " + ec.message(), {}}));
      }
      bhttp::async_read(
          stream_, buffer_, *file_parser_,
          [self = shared_from_this()](beast::error_code rec, size_t) { self->on_body(rec); });
    } else {
      string_parser_.emplace(std::move(*header_parser_));
      string_parser_->body_limit(options.body_limit);
      bhttp::async_read(
          stream_, buffer_, *string_parser_,
          [self = shared_from_this()](beast::error_code rec, size_t) { self->on_body(rec); });
    }
  }

  void on_body(beast::error_code ec) {
    if (file_parser_) {
      file_parser_->get().body().close();
    }
    if (ec == bhttp::error::body_limit) {
      discard_temp();
      keep_alive_ = false;
      return write(Response::error(Error{
          Errc::kPayloadTooLarge, "request body is over the limit for " + request_.path, {}}));
    }
    if (ec) {
      discard_temp();
      return shutdown();
    }
    if (string_parser_) {
      request_.body = std::move(string_parser_->get().body());
    } else {
      request_.body_file = temp_path_;
      temp_path_.clear();  // the handler owns it now
    }
    lowest().expires_never();  // a held long-poll must not time out at the stream level
    if (watch_hangup_) {
      request_.hangup = std::make_shared<Hangup>();
      watch_for_hangup(request_.hangup);
    }
    auto self = shared_from_this();
    Responder responder = [self](Response resp) {
      net::post(self->stream_.get_executor(),
                [self, resp = std::move(resp)]() mutable { self->write(std::move(resp)); });
    };
    try {
      (*handler_)(std::move(request_), std::move(responder));
    } catch (const std::exception& e) {
      // A handler bug must not take the server down; the responder was moved into the
      // handler, so the connection closes when the handler's copy is gone.
      spdlog::error("handler for {} threw: {}", request_.path, e.what());
    }
  }

  // While a request waits for its response, a readable socket means the client hung up
  // (EOF or reset) or pipelined another request (left alone: read after the response).
  void watch_for_hangup(std::shared_ptr<Hangup> hangup) {
    lowest().socket().async_wait(
        tcp::socket::wait_read, [self = shared_from_this(), hangup](beast::error_code ec) {
          if (ec) return;  // cancelled or closed: nothing to report
          char byte = 0;
          ssize_t n =
              ::recv(self->lowest().socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
          if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) hangup->fire();
        });
  }

  template <class Message>
  void send(std::shared_ptr<Message> msg) {
    lowest().expires_after(std::chrono::seconds(60));
    bhttp::async_write(
        stream_, *msg,
        [self = shared_from_this(), msg](beast::error_code ec, size_t) { self->on_written(ec); });
  }

  void write(Response resp) {
    auto status = static_cast<bhttp::status>(resp.status);
    auto add_headers = [&](auto& msg) {
      msg.set(bhttp::field::server, "outpost");
      msg.set(bhttp::field::date, http_date_now());
      msg.set(bhttp::field::content_type, resp.content_type);
      for (const auto& [k, v] : resp.headers) msg.set(k, v);
      msg.keep_alive(keep_alive_);
    };
    if (head_) {
      auto msg = std::make_shared<bhttp::response<bhttp::empty_body>>(status, version_);
      add_headers(*msg);
      msg->content_length(resp.file ? resp.file->length : resp.body.size());
      return send(msg);
    }
    if (resp.file) {
      int fd = ::open(resp.file->path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        return write(Response::error(Error{Errc::kIo, "cannot open " + resp.file->path, {}}));
      }
      auto msg = std::make_shared<bhttp::response<FileRangeBody>>(status, version_);
      add_headers(*msg);
      msg->body().fd = std::shared_ptr<int>(new int(fd), [](int* p) {
        ::close(*p);
        delete p;
      });
      msg->body().offset = resp.file->offset;
      msg->body().length = resp.file->length;
      msg->prepare_payload();
      return send(msg);
    }
    auto msg = std::make_shared<bhttp::response<bhttp::string_body>>(status, version_);
    add_headers(*msg);
    msg->body() = std::move(resp.body);
    msg->prepare_payload();
    send(msg);
  }

  void on_written(beast::error_code ec) {
    if (ec || !keep_alive_) return shutdown();
    wait_for_request();
  }

  void discard_temp() {
    if (!temp_path_.empty()) {
      ::unlink(temp_path_.c_str());
      temp_path_.clear();
    }
  }

  void shutdown() {
    discard_temp();
    beast::error_code ec;
    lowest().socket().shutdown(tcp::socket::shutdown_send, ec);
    lowest().socket().close(ec);
  }

  Stream stream_;
  bool watch_hangup_ = false;
  beast::flat_buffer buffer_;
  const Router& router_;
  const ServerOptions& options_;
  std::optional<bhttp::request_parser<bhttp::empty_body>> header_parser_;
  std::optional<bhttp::request_parser<bhttp::string_body>> string_parser_;
  std::optional<bhttp::request_parser<bhttp::file_body>> file_parser_;
  Request request_;
  const Handler* handler_ = nullptr;
  std::string temp_path_;
  std::string remote_;
  bool keep_alive_ = true;
  bool head_ = false;
  unsigned version_ = 11;
  std::shared_ptr<void> slot_;  // this connection's place under the connection cap
};

// ---------------------------------------------------------------------------------------
// Listener

class HttpServer::Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(net::io_context& io, const Router& router, const ServerOptions& options)
      : io_(io),
        acceptor_(net::make_strand(io)),
        retry_timer_(acceptor_.get_executor()),
        router_(router),
        options_(options) {}

  // HTTPS: TLS 1.2 or newer with the certificate chain and key from the options.
  Status use_tls(const std::string& cert_file, const std::string& key_file) {
    auto ctx = std::make_unique<net::ssl::context>(net::ssl::context::tls_server);
    beast::error_code ec;
    ctx->set_options(net::ssl::context::default_workarounds | net::ssl::context::no_sslv2 |
                         net::ssl::context::no_sslv3 | net::ssl::context::no_tlsv1 |
                         net::ssl::context::no_tlsv1_1 | net::ssl::context::single_dh_use,
                     ec);
    ctx->use_certificate_chain_file(cert_file, ec);
    if (ec) {
      return make_error(
          Errc::kInvalidArgument,
          "--tls-cert " + cert_file + ": cannot use it as a PEM certificate chain: " + ec.message(),
          "tls-cert");
    }
    ctx->use_private_key_file(key_file, net::ssl::context::pem, ec);
    if (ec) {
      return make_error(
          Errc::kInvalidArgument,
          "--tls-key " + key_file + ": cannot use it as the PEM private key: " + ec.message(),
          "tls-key");
    }
    if (SSL_CTX_check_private_key(ctx->native_handle()) != 1) {
      return make_error(
          Errc::kInvalidArgument,
          "--tls-key " + key_file + " does not belong to the certificate in " + cert_file,
          "tls-key");
    }
    tls_ = std::move(ctx);
    return ok();
  }

  int64_t connections() const { return counters_->open.load(); }
  int64_t refused() const { return counters_->refused.load(); }

  Status open(const std::string& host, uint16_t port) {
    beast::error_code ec;
    tcp::resolver resolver(io_);
    auto results = resolver.resolve(host, std::to_string(port), ec);
    if (ec || results.empty()) {
      return make_error(Errc::kInvalidArgument, "cannot resolve listen host " + host);
    }
    tcp::endpoint endpoint = results.begin()->endpoint();
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(net::socket_base::max_listen_connections, ec);
    if (ec) {
      return make_error(Errc::kUnavailable, "cannot listen on " + host + ":" +
                                                std::to_string(port) + ": " + ec.message());
    }
    return ok();
  }

  uint16_t port() const { return acceptor_.local_endpoint().port(); }

  void accept() {
    acceptor_.async_accept(net::make_strand(io_), [self = shared_from_this()](beast::error_code ec,
                                                                              tcp::socket socket) {
      if (ec == net::error::operation_aborted) return;
      if (!ec) {
        self->start_session(std::move(socket));
      } else if (ec == net::error::no_descriptors || ec == net::error::no_buffer_space ||
                 ec == net::error::no_memory) {
        // Out of descriptors: accepting again at once would spin. Pending connections wait
        // in the kernel's backlog; try again shortly and say so at most once a second.
        auto now = std::chrono::steady_clock::now();
        ++self->refused_;
        if (now - self->last_warning_ >= std::chrono::seconds(1)) {
          spdlog::warn("accept: {} ({} times); raise the open-file limit (ulimit -n)", ec.message(),
                       self->refused_);
          self->last_warning_ = now;
        }
        self->retry_timer_.expires_after(std::chrono::milliseconds(50));
        self->retry_timer_.async_wait([self](beast::error_code wait_ec) {
          if (!wait_ec && self->acceptor_.is_open()) self->accept();
        });
        return;
      }
      if (self->acceptor_.is_open()) self->accept();
    });
  }

  void close() {
    net::post(acceptor_.get_executor(), [self = shared_from_this()] {
      beast::error_code ec;
      self->retry_timer_.cancel();
      self->acceptor_.close(ec);
    });
  }

 private:
  struct Counters {
    std::atomic<int64_t> open{0};
    std::atomic<int64_t> refused{0};
  };

  void start_session(tcp::socket socket) {
    if (counters_->open.load() >= options_.max_connections) {
      // Over the cap: close at once rather than let a flood of connections starve the
      // clients already served. Said at most once a second.
      ++counters_->refused;
      auto now = std::chrono::steady_clock::now();
      if (now - last_cap_warning_ >= std::chrono::seconds(1)) {
        spdlog::warn("connection cap of {} reached; refused {} connections so far",
                     options_.max_connections, counters_->refused.load());
        last_cap_warning_ = now;
      }
      beast::error_code ignored;
      socket.close(ignored);
      return;
    }
    ++counters_->open;
    // The slot gives the place back when the session (and every handler holding it) is gone.
    std::shared_ptr<void> slot(nullptr, [counters = counters_](void*) { --counters->open; });
    if (tls_) {
      auto session = std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(
          router_, options_, std::move(slot), std::move(socket), *tls_);
      session->start();
    } else {
      auto session = std::make_shared<Session<beast::tcp_stream>>(
          router_, options_, std::move(slot), std::move(socket));
      session->start();
    }
  }

  net::io_context& io_;
  std::unique_ptr<net::ssl::context> tls_;
  std::shared_ptr<Counters> counters_ = std::make_shared<Counters>();
  std::chrono::steady_clock::time_point last_cap_warning_{};
  tcp::acceptor acceptor_;
  net::steady_timer retry_timer_;  // on the acceptor's strand
  std::chrono::steady_clock::time_point last_warning_{};
  int64_t refused_ = 0;
  const Router& router_;
  const ServerOptions& options_;
};

HttpServer::HttpServer(ServerOptions options, const Router& router)
    : options_(std::move(options)), router_(router), io_(options_.io_threads) {}

HttpServer::~HttpServer() { stop(); }

Status HttpServer::start() {
  auto hp = split_host_port(options_.listen);
  if (!hp) return make_error(hp.error());
  listener_ = std::make_shared<Listener>(io_, router_, options_);
  if (!options_.tls_cert_file.empty() || !options_.tls_key_file.empty()) {
    if (options_.tls_cert_file.empty() || options_.tls_key_file.empty()) {
      return make_error(Errc::kInvalidArgument, "HTTPS needs both --tls-cert and --tls-key");
    }
    OUTPOST_TRY(listener_->use_tls(options_.tls_cert_file, options_.tls_key_file));
  }
  OUTPOST_TRY(listener_->open(hp->first, hp->second));
  port_ = listener_->port();
  listener_->accept();
  for (int i = 0; i < std::max(1, options_.io_threads); ++i) {
    threads_.emplace_back([this] { io_.run(); });
  }
  return ok();
}

int64_t HttpServer::connections() const { return listener_ ? listener_->connections() : 0; }
int64_t HttpServer::connections_refused() const { return listener_ ? listener_->refused() : 0; }

void HttpServer::stop() {
  if (stopped_.exchange(true)) return;
  if (listener_) listener_->close();
  io_.stop();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

}  // namespace outpost::http
