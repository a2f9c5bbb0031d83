#include "agent/release/release_trust.h"

#include <spdlog/spdlog.h>

#include "agent/device_api.h"
#include "common/digest.h"
#include "common/durable_file.h"
#include "common/http_client.h"

namespace outpost::agent {
namespace {

using json = nlohmann::json;

constexpr int kMaxRootSteps = 64;  // root versions walked in one refresh

bool is_transport(const Error& e) {
  return e.code == Errc::kUnavailable || e.code == Errc::kDeadlineExceeded;
}

}  // namespace

ReleaseTrust::ReleaseTrust(std::string data_dir, Identity identity, const Clock& clock,
                           ReleaseTrustOptions options, std::function<void()> on_change)
    : dir_(std::move(data_dir) + "/release"),
      identity_(std::move(identity)),
      clock_(clock),
      options_(options),
      on_change_(std::move(on_change)) {}

ReleaseTrust::~ReleaseTrust() { stop(); }

Status ReleaseTrust::init() {
  OUTPOST_TRY(make_dirs(dir_, 0700));
  std::lock_guard lock(mu_);
  auto root_text = read_file(dir_ + "/root.json");
  if (!root_text) {
    if (root_text.error().code == Errc::kNotFound) return ok();
    return make_error(root_text.error());
  }
  // Written only after it verified (each root is signed by a threshold of its own keys too);
  // checked again so a damaged file is noticed, not trusted.
  auto root = release::verify_first_root(*root_text);
  if (!root) return make_error(root.error().with_context(dir_ + "/root.json"));
  root_ = *root;
  auto load = [&](std::string_view role, size_t max) -> Result<std::optional<release::Envelope>> {
    auto text = read_file(dir_ + "/" + std::string(role) + ".json");
    if (!text) {
      if (text.error().code == Errc::kNotFound) return std::optional<release::Envelope>{};
      return make_error(text.error());
    }
    auto env = release::parse_envelope(*text, role, max);
    if (!env) return make_error(env.error().with_context(dir_));
    if (role == release::kTargets) targets_sha256_ = sha256_hex(*text);
    return std::optional<release::Envelope>(std::move(*env));
  };
  auto ts = load(release::kTimestamp, release::kMaxTimestampBytes);
  if (!ts) return make_error(ts.error());
  if (*ts) {
    auto t = release::timestamp_from(**ts);
    if (!t) return make_error(t.error());
    timestamp_ = *t;
  }
  auto tg = load(release::kTargets, release::kMaxTargetsBytes);
  if (!tg) return make_error(tg.error());
  if (*tg) {
    auto t = release::targets_from(**tg);
    if (!t) return make_error(t.error());
    targets_ = *t;
  }
  // A crash between the two writes: the targets are not the ones the timestamp names. Keep the
  // versions for rollback checks; the next refresh fetches the matching document.
  if (timestamp_ && targets_ && timestamp_->targets_sha256 != targets_sha256_)
    targets_sha256_.clear();
  return ok();
}

void ReleaseTrust::start() {
  thread_ = std::thread([this] {
    std::unique_lock lock(mu_);
    while (!stopping_) {
      const int64_t now = clock_.now_ms();
      if (refresh_due_ == 0 || refresh_due_ > now) {
        const int64_t wait =
            refresh_due_ == 0 ? 60'000 : std::min<int64_t>(refresh_due_ - now, 60'000);
        cv_.wait_for(lock, std::chrono::milliseconds(std::max<int64_t>(wait, 10)));
        continue;
      }
      refresh_due_ = 0;
      lock.unlock();
      auto done = refresh_now();
      if (!done) spdlog::warn("release metadata: {}", done.error().message);
      if (on_change_) on_change_();
      lock.lock();
    }
  });
}

void ReleaseTrust::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ReleaseTrust::request_refresh_locked(int64_t now) {
  if (refreshing_) return;
  int64_t interval = options_.min_refresh_ms;
  if (!last_error_.empty()) interval = options_.retry_ms;
  if (!root_ && server_has_no_root_) interval = options_.no_root_recheck_ms;
  // Nothing new was asked since the last refresh: do not poll the server every second for a
  // digest it already said it does not list.
  bool news = false;
  for (const auto& [digest, at] : asked_at_) news = news || at >= last_refresh_start_;
  if (!news && last_error_.empty() && root_) interval = options_.retry_ms;
  const int64_t due = std::max(now, last_refresh_end_ + interval);
  if (refresh_due_ == 0 || due < refresh_due_) {
    refresh_due_ = due;
    cv_.notify_all();
  }
}

ReleaseTrust::Verdict ReleaseTrust::check(const std::string& digest) {
  std::lock_guard lock(mu_);
  const int64_t now = clock_.now_ms();
  Verdict v;
  if (!root_ && server_has_no_root_) {
    request_refresh_locked(now);
    v.kind = Verdict::Kind::kUnchecked;
    return v;
  }
  const bool fresh = root_ && timestamp_ && targets_ && !targets_sha256_.empty() &&
                     root_->expires_ms > now && timestamp_->expires_ms > now &&
                     targets_->expires_ms > now;
  if (fresh) {
    if (auto it = targets_->targets.find(digest); it != targets_->targets.end()) {
      asked_at_.erase(digest);
      v.kind = Verdict::Kind::kTrusted;
      v.length = it->second;
      return v;
    }
  }
  const int64_t asked = asked_at_.emplace(digest, now).first->second;
  request_refresh_locked(now);
  if (!last_error_.empty()) {
    v.kind = last_error_transport_ ? Verdict::Kind::kPending : Verdict::Kind::kRefused;
    v.reason = last_error_;
    return v;
  }
  if (!refreshing_ && last_refresh_end_ > 0 && last_refresh_start_ >= asked && fresh) {
    v.kind = Verdict::Kind::kRefused;
    v.reason = "artifact " + digest + " is not in the signed release metadata (targets version " +
               std::to_string(targets_->version) + "): refusing to install it";
    return v;
  }
  v.kind = Verdict::Kind::kPending;
  return v;
}

Result<std::optional<std::string>> ReleaseTrust::fetch(const std::string& path, size_t max_bytes) {
  UpstreamClient client(identity_, /*with_credential=*/false);
  HttpRequestOptions options;
  options.max_body_bytes = max_bytes;
  options.timeout_ms = 30'000;
  auto resp = client.request("GET", "/api/v1/device/release/" + path, {}, "", options);
  if (!resp) return make_error(resp.error());
  if (resp->status == 404) return std::optional<std::string>{};
  if (resp->status != 200) {
    return make_error(error_from_response(*resp).with_context("fetching " + path + " metadata"));
  }
  return std::optional<std::string>(std::move(resp->body));
}

Status ReleaseTrust::refresh_now() {
  {
    std::lock_guard lock(mu_);
    refreshing_ = true;
    last_refresh_start_ = clock_.now_ms();
  }
  Status done = refresh_once();
  std::lock_guard lock(mu_);
  refreshing_ = false;
  last_refresh_end_ = clock_.now_ms();
  if (done) {
    last_error_.clear();
    last_error_transport_ = false;
  } else {
    last_error_ = done.error().message;
    last_error_transport_ = is_transport(done.error());
  }
  return done;
}

Status ReleaseTrust::refresh_once() {
  // The network part runs unlocked; what it learns is committed under the lock.
  std::optional<release::Root> root;
  std::optional<release::Timestamp> previous_ts;
  std::optional<release::Targets> previous_targets;
  std::string trusted_targets_sha;
  {
    std::lock_guard lock(mu_);
    root = root_;
    previous_ts = timestamp_;
    previous_targets = targets_;
    trusted_targets_sha = targets_sha256_;
  }
  if (!root) {
    auto text = fetch("root", release::kMaxRootBytes);
    if (!text) return make_error(text.error());
    if (!*text) {
      std::lock_guard lock(mu_);
      server_has_no_root_ = true;
      return ok();
    }
    auto first = release::verify_first_root(**text);
    if (!first) return make_error(first.error());
    OUTPOST_TRY(write_file_durably(dir_ + "/root.json", **text, 0600));
    spdlog::info("release metadata: trusting root version {} from {}", first->version,
                 identity_.url());
    root = *first;
    std::lock_guard lock(mu_);
    root_ = root;
    server_has_no_root_ = false;
  }
  for (int step = 0; step < kMaxRootSteps; ++step) {
    auto text = fetch("root/" + std::to_string(root->version + 1), release::kMaxRootBytes);
    if (!text) return make_error(text.error());
    if (!*text) break;
    auto next = release::verify_next_root(*root, **text);
    if (!next) return make_error(next.error());
    OUTPOST_TRY(write_file_durably(dir_ + "/root.json", **text, 0600));
    spdlog::info("release metadata: root version {} replaces version {}", next->version,
                 root->version);
    root = *next;
    std::lock_guard lock(mu_);
    root_ = root;
  }
  const int64_t now = clock_.now_ms();
  if (root->expires_ms <= now) {
    return make_error(Errc::kPermissionDenied,
                      "freeze refused: root metadata version " + std::to_string(root->version) +
                          " expired at " + release::format_time(root->expires_ms) +
                          ": the operator must sign a new one (`outpost release keys rotate`)");
  }
  auto ts_text = fetch("timestamp", release::kMaxTimestampBytes);
  if (!ts_text) return make_error(ts_text.error());
  if (!*ts_text) {
    return make_error(Errc::kFailedPrecondition,
                      "the server publishes root metadata but no timestamp metadata");
  }
  auto ts = release::verify_timestamp(*root, **ts_text, previous_ts, now);
  if (!ts) return make_error(ts.error());
  std::optional<release::Targets> targets;
  std::string targets_sha = trusted_targets_sha;
  if (ts->targets_sha256 != trusted_targets_sha) {
    auto text = fetch("targets", static_cast<size_t>(ts->targets_length));
    if (!text) return make_error(text.error());
    if (!*text) return make_error(Errc::kFailedPrecondition, "the server has no targets metadata");
    auto verified = release::verify_targets(*root, *ts, **text, previous_targets, now);
    if (!verified) return make_error(verified.error());
    // Targets before timestamp: a crash between them leaves a timestamp that names other
    // targets, which init() notices.
    OUTPOST_TRY(write_file_durably(dir_ + "/targets.json", **text, 0600));
    targets = *verified;
    targets_sha = ts->targets_sha256;
  } else if (previous_targets && previous_targets->expires_ms <= now) {
    return make_error(Errc::kPermissionDenied,
                      "freeze refused: targets metadata version " +
                          std::to_string(previous_targets->version) + " expired at " +
                          release::format_time(previous_targets->expires_ms) +
                          " and the server's timestamp still names it");
  }
  OUTPOST_TRY(write_file_durably(dir_ + "/timestamp.json", **ts_text, 0600));
  std::lock_guard lock(mu_);
  timestamp_ = *ts;
  if (targets) targets_ = *targets;
  targets_sha256_ = targets_sha;
  return ok();
}

json ReleaseTrust::status() const {
  std::lock_guard lock(mu_);
  json out;
  if (!root_) {
    out["state"] = server_has_no_root_ ? "unchecked" : "pending";
    if (server_has_no_root_) {
      out["note"] = "the server publishes no release metadata: artifacts are checked by digest";
    }
  } else {
    out["state"] = last_error_.empty() ? "trusted" : last_error_transport_ ? "offline" : "refused";
    out["root"] = {{"version", root_->version},
                   {"expires", release::format_time(root_->expires_ms)}};
    if (timestamp_) {
      out["timestamp"] = {{"version", timestamp_->version},
                          {"expires", release::format_time(timestamp_->expires_ms)}};
    }
    if (targets_) {
      out["targets"] = {{"version", targets_->version},
                        {"expires", release::format_time(targets_->expires_ms)},
                        {"artifacts", targets_->targets.size()}};
    }
  }
  if (!last_error_.empty()) out["error"] = last_error_;
  return out;
}

}  // namespace outpost::agent
