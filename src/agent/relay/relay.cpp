#include "agent/relay/relay.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include "agent/activate/revisions.h"
#include "agent/device_api.h"
#include "agent/sync/desired_sync.h"
#include "common/digest.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/json_fields.h"
#include "common/telemetry_batch.h"
#include "http/file_response.h"
#include "http/http_server.h"

namespace outpost::agent::relay {

using json = nlohmann::json;
using Respond = std::function<void(http::Response)>;

namespace {

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string bearer_of(const http::Request& req) {
  const std::string header = req.header("authorization");
  constexpr std::string_view kPrefix = "Bearer ";
  if (header.size() <= kPrefix.size() || header.compare(0, kPrefix.size(), kPrefix) != 0) {
    return {};
  }
  return header.substr(kPrefix.size());
}

// Credentials are "<device id>.<secret>"; the relay cannot check the secret (upstream does),
// so the id is only used to name the child in stats and files.
std::string device_of(const std::string& credential) {
  auto dot = credential.find('.');
  return dot == std::string::npos ? std::string() : credential.substr(0, dot);
}

std::vector<std::string> split_via(const std::string& header) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < header.size()) {
    size_t comma = header.find(',', start);
    if (comma == std::string::npos) comma = header.size();
    std::string id = header.substr(start, comma - start);
    while (!id.empty() && id.front() == ' ') id.erase(0, 1);
    while (!id.empty() && id.back() == ' ') id.pop_back();
    if (!id.empty()) out.push_back(id);
    start = comma + 1;
  }
  return out;
}

int64_t query_int(const http::Request& req, const char* name, int64_t fallback) {
  auto text = req.query_param(name);
  if (!text || text->empty()) return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text->c_str(), &end, 10);
  return *end == '\0' ? value : fallback;
}

// The upstream's answer, relayed as it came (status, body, the headers devices read).
http::Response passthrough(const HttpResponse& up) {
  http::Response resp;
  resp.status = static_cast<int>(up.status);
  resp.body = up.body;
  auto type = up.headers.find("content-type");
  resp.content_type = type == up.headers.end() ? "application/json" : type->second;
  for (const char* name : {"x-outpost-generation", "x-outpost-signature", "retry-after"}) {
    if (auto it = up.headers.find(name); it != up.headers.end()) {
      resp.headers.emplace_back(name, it->second);
    }
  }
  return resp;
}

http::Response desired_response(int64_t generation, const std::string& body,
                                const std::string& signature) {
  http::Response resp = http::Response::json(200, body);
  resp.headers.emplace_back("X-Outpost-Generation", std::to_string(generation));
  resp.headers.emplace_back("X-Outpost-Signature", signature);
  return resp;
}

http::Response not_modified() {
  http::Response resp;
  resp.status = 304;
  return resp;
}

http::Response error_response(Errc code, const std::string& message) {
  return http::Response::error(Error{code, message, ""});
}

// 502 for a blob the relay's own fetch was refused (the upstream served bytes that failed
// verification, more than the signed length, ...), when its last attempt ended that way: a child
// waiting for it would only be told "still fetching" after the wait. A child fetching a delta
// gives it up for the whole blob at once; one fetching a whole blob retries later.
std::optional<http::Response> refusal_for(const std::optional<FetchProgress>& progress,
                                          const std::string& relay_id, const std::string& digest) {
  if (!progress || progress->phase != FetchProgress::Phase::kWaitingRetry ||
      progress->last_code == Errc::kUnavailable || progress->last_error.empty()) {
    return std::nullopt;
  }
  http::Response resp =
      error_response(Errc::kUnavailable, "relay " + relay_id + " could not get a good copy of " +
                                             digest + " from upstream: " + progress->last_error);
  resp.status = 502;
  return resp;
}

}  // namespace

struct Relay::HeldPoll {
  Respond respond;
};

struct Relay::BlobWaiter {
  http::Request request;  // method and Range headers only
  Respond respond;
  std::atomic<bool> done{false};
};

Relay::Relay(RelayOptions options, std::string data_dir, Identity identity)
    : options_(std::move(options)),
      dir_(data_dir + "/relay"),
      identity_(std::move(identity)),
      up_(std::make_unique<AsyncHttpClient>(identity_.ca_file)),
      cache_(dir_),
      backlog_(dir_ + "/backlog", options_.backlog_limit_bytes) {
  own_credential_hash_ = sha256_hex(identity_.credential);
  FetchOptions fetch = options_.fetch;
  // The budget is the relay's to keep (evict() after each fill and before each fetch): the
  // fetcher's own check would refuse a blob the cache could make room for.
  fetch.disk_budget_bytes = 0;
  fetcher_ = std::make_unique<Fetcher>(cache_, identity_, fetch, [this] { on_fetch_change(); });
}

Relay::~Relay() { stop(); }

Status Relay::start() {
  OUTPOST_TRY(make_dirs(dir_, 0700));
  OUTPOST_TRY(make_dirs(dir_ + "/desired", 0700));
  OUTPOST_TRY(cache_.init());
  OUTPOST_TRY(backlog_.load());
  // The desired states cached by a previous run, verified again: a file altered on disk is
  // dropped, never served.
  for (const auto& name : list_directory(dir_ + "/desired")) {
    if (!name.ends_with(".json")) continue;
    const std::string path = dir_ + "/desired/" + name;
    auto text = read_file(path);
    json doc = text ? json::parse(*text, nullptr, false) : json();
    bool ok = doc.is_object();
    CachedDesired entry;
    if (ok) {
      entry.credential_hash = name.substr(0, name.size() - 5);
      entry.device = doc.value("device", "");
      entry.generation = doc.value("generation", static_cast<int64_t>(0));
      entry.body = doc.value("body", "");
      entry.signature = doc.value("signature", "");
      if (doc.contains("via") && doc["via"].is_array()) {
        for (const auto& v : doc["via"]) {
          if (v.is_string()) entry.via.push_back(v.get<std::string>());
        }
      }
      Identity child = identity_;
      child.device_id = entry.device;
      auto verified = verify_desired(entry.body, entry.signature, entry.generation, child);
      ok = verified.has_value();
      if (ok) entry.index(verified->doc);
    }
    if (!ok) {
      spdlog::warn("relay: dropping cached desired state {}: it does not verify", path);
      ::unlink(path.c_str());
      continue;
    }
    desired_[entry.credential_hash] = std::move(entry);
  }
  for (const auto& digest : cache_.list()) {
    struct stat st {};
    if (::stat(cache_.path(digest).c_str(), &st) == 0) {
      last_access_[digest] = static_cast<int64_t>(st.st_mtime) * 1000;
    }
  }

  workers_ = std::make_unique<boost::asio::thread_pool>(2);
  router_ = std::make_unique<http::Router>();
  router_->add("POST", "/api/v1/device/enroll", [this](http::Request&& req, http::Responder r) {
    enroll(std::move(req), std::move(r));
  });
  http::RouteOptions long_poll;
  long_poll.watch_hangup = true;
  router_->add(
      "GET", "/api/v1/device/desired",
      [this](http::Request&& req, http::Responder r) { get_desired(std::move(req), std::move(r)); },
      long_poll);
  router_->add("POST", "/api/v1/device/status", [this](http::Request&& req, http::Responder r) {
    post_upload(std::move(req), std::move(r), false);
  });
  http::RouteOptions telemetry;
  telemetry.body_limit = telemetry::kMaxCompressedBatch;
  router_->add(
      "POST", "/api/v1/device/telemetry",
      [this](http::Request&& req, http::Responder r) {
        post_upload(std::move(req), std::move(r), true);
      },
      telemetry);
  router_->add("GET", "/api/v1/artifacts/{digest}", [this](http::Request&& req, http::Responder r) {
    get_artifact(std::move(req), std::move(r));
  });
  // Signed release metadata: forwarded, and the last good copy kept for when the uplink is down
  // (the documents are signed and expire, so a cached copy can only be stale, never forged).
  router_->add("GET", "/api/v1/device/release/{doc...}",
               [this](http::Request&& req, http::Responder r) {
                 get_release(std::move(req), std::move(r));
               });
  router_->add("GET", "/healthz", [this](http::Request&&, http::Responder r) {
    std::lock_guard lock(mu_);
    r(http::Response::json(200, json{{"ok", true},
                                     {"relay", identity_.device_id},
                                     {"upstream", upstream_up_ ? "up" : "down"}}
                                    .dump()));
  });
  http::ServerOptions server;
  server.listen = options_.listen;
  server.io_threads = options_.io_threads;
  server.temp_dir = dir_;
  // Held long-polls are idle connections from the server's point of view: give them room.
  server.idle_timeout_ms = 180'000;
  server.tls_cert_file = options_.tls_cert_file;
  server.tls_key_file = options_.tls_key_file;
  http_ = std::make_unique<http::HttpServer>(server, *router_);
  OUTPOST_TRY(http_->start());
  fetcher_->start();
  // What the children's cached states reference and the cache lacks (a restart mid-fill).
  std::vector<std::string> missing;
  {
    std::lock_guard lock(mu_);
    for (const auto& [hash, entry] : desired_) {
      for (const auto& d : entry.digests) {
        if (!cache_.has(d)) missing.push_back(d);
      }
    }
  }
  for (const auto& d : missing) fetcher_->want(d);
  forwarder_ = std::thread([this] { forward_loop(); });
  const auto backlog = backlog_.stats();
  spdlog::info(
      "relay {} serving the device API on {}:{} for {} (upstream {}; {} cached desired "
      "states, {} stored uploads)",
      identity_.device_id, options_.listen.substr(0, options_.listen.rfind(':')), port(),
      identity_.site, identity_.server, desired_.size(), backlog.entries);
  return {};
}

void Relay::stop() {
  if (stopping_.exchange(true)) return;
  forward_cv_.notify_all();
  if (forwarder_.joinable()) forwarder_.join();
  if (http_) http_->stop();  // no more requests or hang-ups (they cancel through up_)
  up_.reset();               // in-flight exchanges end now, answered 503 (stopping_ is set)
  if (workers_) workers_->join();
  if (fetcher_) fetcher_->stop();
  std::lock_guard lock(mu_);  // parked answers go before the server they answer through
  held_.clear();
  waiting_.clear();
}

uint16_t Relay::port() const { return http_ ? http_->port() : 0; }

std::string Relay::outgoing_via(const http::Request& req) const {
  std::string via = req.header("x-outpost-via");
  while (!via.empty() && (via.back() == ' ' || via.back() == ',')) via.pop_back();
  return via.empty() ? identity_.device_id : via + "," + identity_.device_id;
}

void Relay::seen(const std::string& device) {
  if (device.empty()) return;
  std::lock_guard lock(mu_);
  children_[device] = wall_ms();
}

std::string Relay::upstream() const { return identity_.url(); }

void Relay::upstream_failed(const std::string& used, const std::string& error) {
  identity_.failed(used, error);  // the next request goes to the next URL, when there is one
  set_upstream(false, error);
}

void Relay::set_upstream(bool up, const std::string& error) {
  std::vector<std::shared_ptr<HeldPoll>> release;
  {
    std::lock_guard lock(mu_);
    if (up == upstream_up_) {
      if (!up) upstream_error_ = error;
      return;
    }
    upstream_up_ = up;
    upstream_error_ = up ? std::string() : error;
    upstream_changed_at_ = wall_ms();
    if (up) {
      // Polls held while the link was down go upstream again now rather than at their timeout.
      for (auto& [id, held] : held_) release.push_back(held);
      held_.clear();
    }
  }
  if (up) {
    spdlog::info("relay {}: upstream {} is reachable again", identity_.device_id, upstream());
  } else {
    spdlog::warn("relay {}: upstream {} is unreachable ({}); serving children from the cache",
                 identity_.device_id, upstream(), error);
  }
  for (auto& held : release) held->respond(not_modified());
  forward_cv_.notify_all();
}

std::optional<std::pair<std::string, std::string>> Relay::child_of(const http::Request& req,
                                                                   const Respond& respond) {
  std::string credential = bearer_of(req);
  std::string device = device_of(credential);
  if (device.empty()) {
    respond(error_response(Errc::kUnauthenticated, "missing or malformed device credential"));
    return std::nullopt;
  }
  seen(device);
  return std::pair(std::move(credential), std::move(device));
}

// --- Desired states ---------------------------------------------------------------------

void Relay::get_desired(http::Request&& req, Respond respond) {
  auto caller = child_of(req, respond);
  if (!caller) return;
  const auto& [credential, device] = *caller;
  const std::string hash = sha256_hex(credential);
  const int64_t known = query_int(req, "generation", 0);
  const int64_t wait_s = std::clamp<int64_t>(query_int(req, "wait", 55), 0, 600);
  bool up = false;
  {
    std::lock_guard lock(mu_);
    up = upstream_up_;
  }
  if (!up) return answer_offline(req, hash, known, wait_s * 1000, respond);

  AsyncRequest forward;
  forward.method = "GET";
  const std::string base = upstream();
  forward.url = base + req.target;
  forward.headers = {{"Authorization", "Bearer " + credential},
                     {"X-Outpost-Via", outgoing_via(req)}};
  if (auto sig = req.header("x-outpost-signature"); !sig.empty()) {
    forward.headers.emplace_back("X-Outpost-Signature", sig);  // the child's, checked upstream
  }
  forward.timeout_ms = wait_s * 1000 + 12'000;
  auto hung_up = std::make_shared<std::atomic<bool>>(false);
  std::vector<std::string> via = split_via(req.header("x-outpost-via"));
  http::Request trimmed;
  trimmed.method = req.method;
  trimmed.target = req.target;
  const uint64_t id =
      up_->submit(std::move(forward), [this, base, hung_up, trimmed = std::move(trimmed),
                                       via = std::move(via), hash, device, known, wait_s,
                                       respond](Result<HttpResponse> answer) mutable {
        if (*hung_up) return;  // the child went away; its socket is gone
        if (stopping_) {
          return respond(error_response(Errc::kUnavailable, "the relay is stopping; retry"));
        }
        if (!answer) {
          upstream_failed(base, answer.error().message);
          return answer_offline(trimmed, hash, known, wait_s * 1000, respond);
        }
        const long status = answer->status;
        if (status >= 500) return answer_offline(trimmed, hash, known, wait_s * 1000, respond);
        set_upstream(true, "");
        if (status == 200) {
          const auto gen_header = answer->headers.find("x-outpost-generation");
          const auto sig_header = answer->headers.find("x-outpost-signature");
          const int64_t generation =
              gen_header == answer->headers.end() ? 0 : std::atoll(gen_header->second.c_str());
          const std::string signature =
              sig_header == answer->headers.end() ? std::string() : sig_header->second;
          Identity child = identity_;
          child.device_id = device;
          auto verified = verify_desired(answer->body, signature, generation, child);
          if (!verified) {
            // Never cached, never relayed: the child would refuse it anyway.
            return respond(error_response(
                Errc::kUnavailable, "relay " + identity_.device_id +
                                        ": the desired state from upstream failed verification (" +
                                        verified.error().message + ")"));
          }
          CachedDesired entry;
          entry.credential_hash = hash;
          entry.device = device;
          entry.generation = generation;
          entry.body = answer->body;
          entry.signature = signature;
          entry.via = via;
          entry.index(verified->doc);
          respond(desired_response(generation, entry.body, entry.signature));
          // Persisting and pre-fetching do disk work: not on the client's thread.
          boost::asio::post(*workers_, [this, entry = std::move(entry)]() mutable {
            store_desired(std::move(entry));
          });
          return;
        }
        if (status == 401 || status == 403 || status == 404) {
          // Upstream no longer knows this credential (revoked, deleted): forget its state.
          std::lock_guard lock(mu_);
          desired_.erase(hash);
          ::unlink((dir_ + "/desired/" + hash + ".json").c_str());
        }
        respond(passthrough(*answer));
      });
  if (req.hangup) {
    req.hangup->on_hangup([this, hung_up, id] {
      *hung_up = true;
      up_->cancel(id);
    });
  }
}

void Relay::answer_offline(const http::Request&, const std::string& hash, int64_t known,
                           int64_t wait_ms, const Respond& respond) {
  std::optional<http::Response> cached;
  uint64_t held_id = 0;
  {
    std::lock_guard lock(mu_);
    auto it = desired_.find(hash);
    if (it != desired_.end() && it->second.generation > known) {
      cached = desired_response(it->second.generation, it->second.body, it->second.signature);
    } else {
      held_id = next_held_++;
      held_[held_id] = std::make_shared<HeldPoll>(HeldPoll{respond});
    }
  }
  if (cached) {
    ++desired_offline_;
    return respond(std::move(*cached));
  }
  // Nothing newer to give: hold the poll as the server would, so children do not spin.
  if (stopping_) return;
  up_->after(std::min(wait_ms, options_.offline_hold_ms), [this, held_id] {
    std::shared_ptr<HeldPoll> held;
    {
      std::lock_guard lock(mu_);
      auto it = held_.find(held_id);
      if (it == held_.end()) return;
      held = it->second;
      held_.erase(it);
    }
    held->respond(not_modified());
  });
}

void Relay::CachedDesired::index(const json& doc) {
  // A child offered a delta holds its base: the relay fetches the delta ahead, not the whole
  // blob, so the site's uplink carries the delta once (the whole blob still comes on demand for
  // a child whose delta fails).
  const auto deltas = offered_deltas(doc);
  for (const auto& d : doc["deployments"]) {
    for (auto& digest : needed_artifacts(d)) {
      digests.insert(digest);
      auto offer = deltas.find(digest);
      if (offer == deltas.end()) {
        prefetch.insert(digest);
        continue;
      }
      for (const auto& ref : offer->second) digests.insert(ref.delta);
      prefetch.insert(offer->second.front().delta);
    }
  }
}

void Relay::store_desired(CachedDesired entry) {
  json doc = {{"device", entry.device}, {"generation", entry.generation},
              {"body", entry.body},     {"signature", entry.signature},
              {"via", entry.via},       {"stored_at", wall_ms()}};
  const std::string path = dir_ + "/desired/" + entry.credential_hash + ".json";
  if (auto written = write_file_durably(path, doc.dump(), 0600); !written) {
    spdlog::error("relay: caching the desired state of {}: {}", entry.device,
                  written.error().message);
  }
  std::vector<std::string> fetch;
  std::vector<std::string> forget;
  {
    std::lock_guard lock(mu_);
    auto& slot = desired_[entry.credential_hash];
    if (slot.generation > entry.generation) return;  // a slower answer of an older poll
    std::set<std::string> before = std::move(slot.digests);
    slot = std::move(entry);
    for (const auto& d : slot.prefetch) {
      if (!cache_.has(d)) fetch.push_back(d);
    }
    for (const auto& d : before) {
      if (slot.digests.count(d) != 0) continue;
      bool needed = false;
      for (const auto& [h, other] : desired_) needed = needed || other.digests.count(d) != 0;
      if (!needed) forget.push_back(d);
    }
  }
  for (const auto& d : forget) fetcher_->forget(d);
  if (!fetch.empty()) {
    evict();
    for (const auto& d : fetch) fetcher_->want(d);  // pre-fetch for the child
  }
}

// --- Uploads: stored, then forwarded ------------------------------------------------------

void Relay::post_upload(http::Request&& req, Respond respond, bool telemetry) {
  boost::asio::post(*workers_, [this, req = std::move(req), respond = std::move(respond),
                                telemetry]() {
    auto caller = child_of(req, respond);
    if (!caller) return;
    const auto& [credential, device] = *caller;
    json answer;
    if (telemetry) {
      if (req.header("content-encoding") != "zstd") {
        return respond(error_response(Errc::kInvalidArgument,
                                      "telemetry: expected a zstd body (Content-Encoding: zstd)"));
      }
      // Checked here as the server would, so nothing malformed waits in the backlog.
      auto batch = telemetry::decode_batch(req.body);
      if (!batch) {
        return respond(
            http::Response::error(batch.error().with_context("telemetry batch at the relay")));
      }
      answer = {{"acked", batch->last_seq},
                {"stored", batch->records.size()},
                {"duplicates", 0},
                {"relayed", true}};
    } else {
      if (auto nesting = json_fields::check_nesting(req.body, "status"); !nesting) {
        return respond(http::Response::error(nesting.error()));
      }
      auto doc = json::parse(req.body, nullptr, false);
      if (!doc.is_object()) {
        return respond(error_response(Errc::kInvalidArgument, "status: expected an object"));
      }
      int64_t seq = 0;
      if (auto it = doc.find("seq"); it != doc.end()) {
        if (!it->is_number_integer() || it->get<int64_t>() < 1) {
          return respond(http::Response::error(
              Error{Errc::kInvalidArgument, "seq: expected an integer >= 1", "seq"}));
        }
        seq = it->get<int64_t>();
      }
      answer = {{"ok", true}, {"seq", seq}, {"duplicate", false}, {"relayed", true}};
    }
    BacklogEntry entry;
    entry.device = device;
    entry.path = req.target;  // signed as sent
    entry.signature = req.header("x-outpost-signature");
    entry.content_type = req.header("content-type");
    entry.content_encoding = req.header("content-encoding");
    entry.authorization = "Bearer " + credential;
    entry.via = outgoing_via(req);
    entry.body = req.body;
    if (auto pushed = backlog_.push(std::move(entry)); !pushed) {
      ++refused_full_;
      return respond(http::Response::error(pushed.error()));
    }
    forward_cv_.notify_all();
    respond(http::Response::json(200, answer.dump()));
  });
}

void Relay::forward_loop() {
  UpstreamClient client(identity_, /*with_credential=*/false);
  Backoff link_backoff(1'000, 30'000);
  std::map<std::string, std::pair<int64_t, Backoff>> device_backoff;  // until (ms), backoff
  int64_t link_retry_at = 0;
  while (!stopping_) {
    const int64_t now = wall_ms();
    bool up = false;
    {
      std::lock_guard lock(mu_);
      up = upstream_up_;
    }
    bool worked = false;
    int64_t next_wake = now + 1'000;
    if (!up && now < link_retry_at) {
      next_wake = link_retry_at;
    } else if (!up && backlog_.devices().empty()) {
      // Nothing to send: probe the link so held polls and the stats learn it is back.
      auto probe =
          client.request("GET", "/healthz", {}, {}, HttpRequestOptions{.timeout_ms = 10'000});
      if (probe && probe->status < 500) {
        set_upstream(true, "");
        link_backoff.reset();
      } else {
        set_upstream(false, probe ? "upstream answered HTTP " + std::to_string(probe->status)
                                  : probe.error().message);
        link_retry_at = wall_ms() + link_backoff.next_ms();
      }
      continue;
    } else {
      for (const auto& device : backlog_.devices()) {
        if (stopping_) break;
        auto bo = device_backoff.find(device);
        if (bo != device_backoff.end() && bo->second.first > now) {
          next_wake = std::min(next_wake, bo->second.first);
          continue;
        }
        auto entry = backlog_.front(device);
        if (!entry) {
          spdlog::error("relay backlog: {}; dropping it", entry.error().message);
          backlog_.pop(device);
          continue;
        }
        if (!*entry) continue;
        HttpRequestOptions opts;
        opts.headers = {{"Authorization", (*entry)->authorization},
                        {"X-Outpost-Via", (*entry)->via}};
        if (!(*entry)->signature.empty()) {
          opts.headers.emplace_back("X-Outpost-Signature", (*entry)->signature);
        }
        if (!(*entry)->content_encoding.empty()) {
          opts.headers.emplace_back("Content-Encoding", (*entry)->content_encoding);
        }
        opts.timeout_ms = 30'000;
        auto sent = client.request(
            "POST", (*entry)->path, (*entry)->body,
            (*entry)->content_type.empty() ? "application/json" : (*entry)->content_type, opts);
        worked = true;
        switch (upload_delivery(sent)) {
          case Delivery::kDelivered:
            backlog_.pop(device);
            ++forwarded_;
            device_backoff.erase(device);
            set_upstream(true, "");
            link_backoff.reset();
            break;
          case Delivery::kRefused:
            spdlog::warn("relay: upstream refused an upload of {} for good (HTTP {}): {}", device,
                         sent->status, error_from_response(*sent).message);
            backlog_.pop(device);
            ++refused_upstream_;
            set_upstream(true, "");
            break;
          case Delivery::kRetry:
            if (!sent || sent->status >= 500) {
              set_upstream(false, sent ? "upstream answered HTTP " + std::to_string(sent->status)
                                       : sent.error().message);
              link_retry_at = wall_ms() + link_backoff.next_ms();
            } else {  // this device's credential or rate: only it waits
              auto& slot =
                  device_backoff.try_emplace(device, 0, Backoff(2'000, 60'000)).first->second;
              slot.first = wall_ms() + slot.second.next_ms();
            }
            break;
        }
        {
          std::lock_guard lock(mu_);
          if (!upstream_up_) break;
        }
      }
    }
    if (worked) continue;
    std::unique_lock lock(forward_mu_);
    forward_cv_.wait_for(lock, std::chrono::milliseconds(std::max<int64_t>(10, next_wake - now)));
  }
}

// --- Artifacts ------------------------------------------------------------------------------

bool Relay::blob_allowed(const std::string& credential_hash, const std::string& digest) const {
  // The relay's own agent (its workloads) takes its blobs from this cache too.
  if (credential_hash == own_credential_hash_) return true;
  std::lock_guard lock(mu_);
  auto self = desired_.find(credential_hash);
  if (self == desired_.end()) return false;
  const std::string& requester = self->second.device;
  for (const auto& [hash, entry] : desired_) {
    if (entry.digests.count(digest) == 0) continue;
    if (entry.device == requester) return true;
    // A relay below this one fetching for its own children.
    if (std::find(entry.via.begin(), entry.via.end(), requester) != entry.via.end()) return true;
  }
  return false;
}

http::Response Relay::serve_blob(const http::Request& req, const std::string& digest) {
  const std::string path = cache_.path(digest);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return error_response(Errc::kUnavailable, "relay " + identity_.device_id + ": blob " + digest +
                                                  " left the cache; retry");
  }
  {
    std::lock_guard lock(mu_);
    last_access_[digest] = wall_ms();
  }
  return http::blob_response(req, digest, path, static_cast<uint64_t>(st.st_size));
}

void Relay::get_artifact(http::Request&& req, Respond respond) {
  const std::string digest = req.params.at("digest");
  if (!is_digest_ref(digest)) {
    return respond(error_response(Errc::kInvalidArgument,
                                  "digest: expected sha256:<64 lowercase hex digits>"));
  }
  auto caller = child_of(req, respond);
  if (!caller) return;
  const auto& [credential, device] = *caller;
  if (!blob_allowed(sha256_hex(credential), digest)) {
    return respond(
        error_response(Errc::kPermissionDenied,
                       "relay " + identity_.device_id + " serves " + digest +
                           " only to devices whose desired state (as relayed) references it"));
  }
  if (cache_.has(digest)) {
    ++cache_hits_;
    return respond(serve_blob(req, digest));
  }
  ++cache_misses_;
  if (auto refused = refusal_for(fetcher_->progress(digest), identity_.device_id, digest)) {
    fetcher_->want(digest);  // its next attempt is already scheduled; this keeps it wanted
    return respond(std::move(*refused));
  }
  auto waiter = std::make_shared<BlobWaiter>();
  waiter->request.method = req.method;
  waiter->request.headers = req.headers;
  waiter->respond = std::move(respond);
  {
    std::lock_guard lock(mu_);
    waiting_[digest].push_back(waiter);
  }
  evict();
  fetcher_->want(digest);
  up_->after(options_.artifact_wait_ms, [this, waiter, digest] {
    if (waiter->done.exchange(true)) return;
    auto progress = fetcher_->progress(digest);
    std::string detail = "not started";
    if (progress) {
      detail = std::to_string(progress->have_bytes) + " of " +
               (progress->total_bytes > 0 ? std::to_string(progress->total_bytes) : "?") + " bytes";
      if (!progress->last_error.empty()) detail += "; last error: " + progress->last_error;
    }
    http::Response busy =
        error_response(Errc::kUnavailable, "relay " + identity_.device_id + " is still fetching " +
                                               digest + " from upstream (" + detail + "); retry");
    busy.headers.emplace_back("Retry-After", "5");
    waiter->respond(std::move(busy));
  });
  on_fetch_change();  // it may have landed between the check and the queueing
}

void Relay::on_fetch_change() {
  evict();  // a fill may have taken the cache past its budget
  std::vector<std::pair<std::string, std::shared_ptr<BlobWaiter>>> ready;
  std::vector<std::pair<http::Response, std::shared_ptr<BlobWaiter>>> refused;
  {
    std::lock_guard lock(mu_);
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      if (cache_.has(it->first)) {
        for (auto& w : it->second) ready.emplace_back(it->first, w);
        it = waiting_.erase(it);
      } else if (auto no =
                     refusal_for(fetcher_->progress(it->first), identity_.device_id, it->first)) {
        for (auto& w : it->second) refused.emplace_back(*no, w);
        it = waiting_.erase(it);
      } else {
        // Drop waiters that already timed out.
        auto& list = it->second;
        list.erase(
            std::remove_if(list.begin(), list.end(), [](const auto& w) { return w->done.load(); }),
            list.end());
        it = list.empty() ? waiting_.erase(it) : std::next(it);
      }
    }
  }
  for (auto& [digest, waiter] : ready) {
    if (waiter->done.exchange(true)) continue;
    waiter->respond(serve_blob(waiter->request, digest));
  }
  for (auto& [resp, waiter] : refused) {
    if (waiter->done.exchange(true)) continue;
    waiter->respond(std::move(resp));
  }
}

void Relay::evict() {
  const int64_t budget = options_.cache_budget_bytes;
  int64_t used = cache_.used_bytes();
  if (budget <= 0 || used <= budget) return;
  std::set<std::string> needed;
  std::vector<std::pair<int64_t, std::string>> candidates;
  {
    std::lock_guard lock(mu_);
    for (const auto& [hash, entry] : desired_)
      needed.insert(entry.digests.begin(), entry.digests.end());
    for (const auto& [digest, list] : waiting_) needed.insert(digest);
    for (const auto& digest : cache_.list()) {
      if (needed.count(digest) != 0) continue;
      auto it = last_access_.find(digest);
      candidates.emplace_back(it == last_access_.end() ? 0 : it->second, digest);
    }
  }
  for (auto& d : fetcher_->wanted()) {
    candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                    [&](const auto& c) { return c.second == d; }),
                     candidates.end());
  }
  std::sort(candidates.begin(), candidates.end());  // least recently served first
  for (const auto& [at, digest] : candidates) {
    if (used <= budget) break;
    struct stat st {};
    const int64_t size =
        ::stat(cache_.path(digest).c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
    spdlog::info("relay: evicting {} ({} bytes; no child's desired state references it)", digest,
                 size);
    cache_.remove(digest);
    used -= size;
    ++cache_evictions_;
    std::lock_guard lock(mu_);
    last_access_.erase(digest);
  }
}

// --- Enrollment -------------------------------------------------------------------------------

void Relay::enroll(http::Request&& req, Respond respond) {
  AsyncRequest forward;
  forward.method = "POST";
  const std::string base = upstream();
  forward.url = base + "/api/v1/device/enroll";
  forward.body = std::move(req.body);
  forward.headers = {{"Content-Type", "application/json"}, {"X-Outpost-Via", outgoing_via(req)}};
  forward.timeout_ms = 30'000;
  up_->submit(std::move(forward), [this, base,
                                   respond = std::move(respond)](Result<HttpResponse> answer) {
    if (stopping_) {
      return respond(error_response(Errc::kUnavailable, "the relay is stopping; retry"));
    }
    if (!answer) {
      upstream_failed(base, answer.error().message);
      return respond(error_response(
          Errc::kUnavailable,
          "relay " + identity_.device_id + " cannot reach the control plane (" +
              answer.error().message +
              "); enrollment needs it to check the token: try again when the link is back"));
    }
    set_upstream(answer->status < 500, "upstream answered HTTP " + std::to_string(answer->status));
    respond(passthrough(*answer));
  });
}

// --- Release metadata --------------------------------------------------------------------------

void Relay::get_release(http::Request&& req, Respond respond) {
  std::string doc = req.params.at("doc");
  // "root", "root/7", "timestamp", "targets": a flat file name for the cache.
  for (char& c : doc) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  const std::string cached = dir_ + "/release-" + doc + ".json";
  AsyncRequest forward;
  const std::string base = upstream();
  forward.url = base + req.target;
  forward.headers = {{"X-Outpost-Via", outgoing_via(req)}};
  forward.timeout_ms = 30'000;
  up_->submit(std::move(forward), [this, base, cached,
                                   respond = std::move(respond)](Result<HttpResponse> answer) {
    if (stopping_) {
      return respond(error_response(Errc::kUnavailable, "the relay is stopping; retry"));
    }
    if (answer && answer->status < 500) {
      set_upstream(true, "");
      if (answer->status == 200) {
        boost::asio::post(*workers_, [cached, body = answer->body] {
          if (auto saved = write_file_durably(cached, body, 0600); !saved) {
            spdlog::warn("relay: caching release metadata: {}", saved.error().message);
          }
        });
      }
      return respond(passthrough(*answer));
    }
    if (!answer) upstream_failed(base, answer.error().message);
    boost::asio::post(*workers_, [this, cached, respond] {
      if (auto text = read_file(cached)) {
        return respond(http::Response::json(200, std::move(*text)));
      }
      respond(error_response(Errc::kUnavailable,
                             "relay " + identity_.device_id +
                                 " cannot reach the control plane and has no copy of this "
                                 "release metadata yet; retry"));
    });
  });
}

// --- Stats ------------------------------------------------------------------------------------

json Relay::stats() const {
  const int64_t now = wall_ms();
  json children = json::array();
  int64_t present = 0;
  json out;
  {
    std::lock_guard lock(mu_);
    for (const auto& [id, at] : children_) {
      if (now - at > options_.child_window_ms) continue;
      ++present;
      if (children.size() < 100) children.push_back(id);
    }
    out["upstream"] = {{"url", upstream()},
                       {"urls", identity_.server},
                       {"state", upstream_up_ ? "up" : "down"},
                       {"error", upstream_error_},
                       {"since", upstream_changed_at_}};
    out["desired_cached"] = desired_.size();
    out["polls_held_offline"] = held_.size();
  }
  const auto backlog = backlog_.stats();
  const auto blobs = cache_.list();
  const auto wanted = fetcher_->wanted();
  out["listen"] =
      options_.listen.substr(0, options_.listen.rfind(':')) + ":" + std::to_string(port());
  out["children"] = {{"count", present}, {"ids", children}};
  out["cache"] = {{"blobs", blobs.size()},
                  {"bytes", cache_.used_bytes()},
                  {"budget_bytes", options_.cache_budget_bytes},
                  {"hits", cache_hits_.load()},
                  {"misses", cache_misses_.load()},
                  {"evictions", cache_evictions_.load()},
                  {"fetching", std::count_if(wanted.begin(), wanted.end(),
                                             [this](const auto& d) { return !cache_.has(d); })}};
  out["backlog"] = {{"entries", backlog.entries},
                    {"bytes", backlog.bytes},
                    {"limit_bytes", backlog.limit_bytes},
                    {"forwarded", forwarded_.load()},
                    {"refused_upstream", refused_upstream_.load()},
                    {"refused_full", refused_full_.load()},
                    {"unreadable", backlog.unreadable}};
  out["desired_answered_offline"] = desired_offline_.load();
  out["upstream_in_flight"] = up_ ? up_->in_flight() : 0;
  return out;
}

}  // namespace outpost::agent::relay
