#include "server/registry/release_signer.h"

#include <algorithm>
#include <cstdio>

#include <spdlog/spdlog.h>

#include "common/digest.h"
#include "common/durable_file.h"

namespace outpost::server::registry {
namespace {

using json = nlohmann::json;

bool role_is_only(const release::Root& root, std::string_view role, const std::string& keyid) {
  const auto& r = root.roles.at(std::string(role));
  return r.threshold == 1 && r.keyids.size() == 1 && r.keyids[0] == keyid;
}

}  // namespace

ReleaseSigner::ReleaseSigner(store::Store& store, const Clock& clock, std::string data_dir,
                             ReleaseOptions options)
    : store_(store), clock_(clock), dir_(std::move(data_dir) + "/release"), options_(options) {}

ReleaseSigner::~ReleaseSigner() { stop(); }

Status ReleaseSigner::init() {
  std::lock_guard lock(mu_);
  OUTPOST_TRY(make_dirs(dir_, 0700));
  auto online = crypto::load_or_create_key_file(dir_ + "/online.key", "");
  if (!online) return make_error(online.error());
  online_ = *online;
  if (auto text = read_file(dir_ + "/pending.key")) {
    auto pending = crypto::key_pair_from_secret(*text, dir_ + "/pending.key");
    if (!pending) return make_error(pending.error());
    pending_ = *pending;
  }
  OUTPOST_TRY(load_latest_locked());
  return refresh_locked();
}

Status ReleaseSigner::load_latest_locked() {
  auto root = store_.get_release_document(std::string(release::kRoot), 0);
  if (!root) return make_error(root.error());
  if (!*root) return ok();
  auto env = release::parse_envelope((*root)->body, release::kRoot, release::kMaxRootBytes);
  if (!env) return make_error(env.error().with_context("stored root metadata"));
  auto parsed = release::root_from(*env);
  if (!parsed) return make_error(parsed.error().with_context("stored root metadata"));
  root_ = *parsed;
  root_text_ = (*root)->body;
  // A crash after the root naming the pending key was stored, before the key was promoted.
  const std::string online_id = release::key_id(online_.public_key);
  if (pending_ && !role_is_only(*root_, release::kTargets, online_id) &&
      role_is_only(*root_, release::kTargets, release::key_id(pending_->public_key))) {
    OUTPOST_TRY(rename_durably(dir_ + "/pending.key", dir_ + "/online.key"));
    online_ = *pending_;
    pending_.reset();
  }
  bool all_ours = true;
  for (std::string_view role : {release::kTargets, release::kTimestamp}) {
    auto doc = store_.get_release_document(std::string(role), 0);
    if (!doc) return make_error(doc.error());
    if (!*doc) {
      all_ours = false;
      continue;
    }
    auto e = release::parse_envelope(
        (*doc)->body, role,
        role == release::kTargets ? release::kMaxTargetsBytes : release::kMaxTimestampBytes);
    if (!e) return make_error(e.error().with_context("stored metadata"));
    // Signed by a key the root no longer gives the role (a rotation): re-signed below.
    if (!release::verify_signatures(*e, *root_, role)) all_ours = false;
    if (role == release::kTargets) {
      auto t = release::targets_from(*e);
      if (!t) return make_error(t.error());
      targets_ = *t;
      targets_text_ = (*doc)->body;
    } else {
      auto t = release::timestamp_from(*e);
      if (!t) return make_error(t.error());
      timestamp_ = *t;
      timestamp_text_ = (*doc)->body;
    }
  }
  signed_by_ = all_ours ? online_id : "";
  return ok();
}

void ReleaseSigner::start() {
  thread_ = std::thread([this] {
    const int64_t period = std::clamp<int64_t>(
        std::min(options_.timestamp_ttl_ms, options_.targets_ttl_ms) / 4, 1'000, 60'000);
    std::unique_lock lock(mu_);
    while (!stopping_) {
      cv_.wait_for(lock, std::chrono::milliseconds(period));
      if (stopping_) break;
      // Another replica may have signed since: start from the newest stored documents.
      if (auto latest = load_latest_locked(); !latest) {
        spdlog::error("release metadata: {}", latest.error().message);
      }
      if (auto done = refresh_and_tell_locked(); !done) {
        spdlog::error("release metadata: {}", done.error().message);
      }
    }
  });
}

void ReleaseSigner::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Status ReleaseSigner::refresh() {
  std::lock_guard lock(mu_);
  return refresh_and_tell_locked();
}

Status ReleaseSigner::refresh_and_tell_locked() {
  signed_new_ = false;
  Status done = refresh_locked();
  if (signed_new_ && on_signed_) on_signed_();  // both documents are stored by now
  return done;
}

Status ReleaseSigner::reload() {
  std::lock_guard lock(mu_);
  return load_latest_locked();
}

Status ReleaseSigner::refresh_locked() {
  if (!root_) return ok();
  const std::string online_id = release::key_id(online_.public_key);
  for (std::string_view role : {release::kTargets, release::kTimestamp}) {
    const auto& keyids = root_->roles.at(std::string(role)).keyids;
    if (std::find(keyids.begin(), keyids.end(), online_id) == keyids.end()) {
      last_error_ = "root version " + std::to_string(root_->version) + " does not give the " +
                    std::string(role) + " role to this server's online key " +
                    online_id.substr(0, 12) + ": nothing is signed until a root that does";
      return make_error(Errc::kFailedPrecondition, last_error_);
    }
  }
  auto artifacts = store_.list_artifacts();
  if (!artifacts) return make_error(artifacts.error());
  std::map<std::string, int64_t> listed;
  for (const auto& a : *artifacts) listed[a.digest] = a.size;
  const int64_t now = clock_.now_ms();

  // Stores the next version of `role`: one past the newest stored (another replica may have
  // signed one meanwhile, so a taken version is skipped).
  auto store_next = [&](std::string_view role, int64_t from,
                        const std::function<std::string(int64_t)>& sign) -> Result<int64_t> {
    auto newest = store_.get_release_document(std::string(role), 0);
    if (!newest) return make_error(newest.error());
    int64_t version = std::max(from, *newest ? (*newest)->version : 0) + 1;
    for (int attempt = 0; attempt < 8; ++attempt, ++version) {
      store::ReleaseDocument doc{std::string(role), version, sign(version), now};
      auto put = store_.put_release_document(doc);
      if (!put) return make_error(put.error());
      if (*put) {
        signed_new_ = true;
        return version;
      }
    }
    return make_error(Errc::kConflict, "could not store a new " + std::string(role) +
                                           " version: every version tried was taken");
  };

  const bool keys_changed = signed_by_ != online_id;
  const bool targets_stale = !targets_ || targets_->targets != listed ||
                             targets_->expires_ms - now < options_.targets_ttl_ms / 2 ||
                             keys_changed;
  if (targets_stale) {
    release::Targets next;
    next.targets = listed;
    next.expires_ms = now + options_.targets_ttl_ms;
    std::string text;
    auto version = store_next(release::kTargets, targets_ ? targets_->version : 0, [&](int64_t v) {
      next.version = v;
      text = release::sign_document(release::targets_signed(next), {online_.secret_key});
      return text;
    });
    if (!version) return make_error(version.error());
    targets_ = next;
    targets_text_ = text;
    spdlog::info("release metadata: signed targets version {} ({} artifacts, expires {})",
                 next.version, listed.size(), release::format_time(next.expires_ms));
  }
  if (targets_stale || !timestamp_ ||
      timestamp_->expires_ms - now < options_.timestamp_ttl_ms / 2) {
    release::Timestamp next;
    next.expires_ms = now + options_.timestamp_ttl_ms;
    next.targets_version = targets_->version;
    next.targets_sha256 = sha256_hex(targets_text_);
    next.targets_length = static_cast<int64_t>(targets_text_.size());
    std::string text;
    auto version =
        store_next(release::kTimestamp, timestamp_ ? timestamp_->version : 0, [&](int64_t v) {
          next.version = v;
          text = release::sign_document(release::timestamp_signed(next), {online_.secret_key});
          return text;
        });
    if (!version) return make_error(version.error());
    timestamp_ = next;
    timestamp_text_ = text;
  }
  signed_by_ = online_id;
  last_error_.clear();
  return ok();
}

json ReleaseSigner::status() {
  std::lock_guard lock(mu_);
  json out;
  out["online_key"] = {{"keyid", release::key_id(online_.public_key)},
                       {"public", crypto::base64_encode(online_.public_key)}};
  if (pending_) {
    out["pending_key"] = {{"keyid", release::key_id(pending_->public_key)},
                          {"public", crypto::base64_encode(pending_->public_key)}};
  }
  if (!root_) {
    out["root"] = nullptr;
    return out;
  }
  const auto& rr = root_->roles.at(std::string(release::kRoot));
  out["root"] = {{"version", root_->version},
                 {"expires", release::format_time(root_->expires_ms)},
                 {"keys", rr.keyids},
                 {"threshold", rr.threshold}};
  if (targets_) {
    out["targets"] = {{"version", targets_->version},
                      {"expires", release::format_time(targets_->expires_ms)},
                      {"artifacts", targets_->targets.size()}};
  }
  if (timestamp_) {
    out["timestamp"] = {{"version", timestamp_->version},
                        {"expires", release::format_time(timestamp_->expires_ms)}};
  }
  if (!last_error_.empty()) out["error"] = last_error_;
  return out;
}

Result<json> ReleaseSigner::pending_online_key() {
  std::lock_guard lock(mu_);
  if (!pending_) {
    auto made = crypto::load_or_create_key_file(dir_ + "/pending.key", "");
    if (!made) return make_error(made.error());
    pending_ = *made;
  }
  return json{{"keyid", release::key_id(pending_->public_key)},
              {"public", crypto::base64_encode(pending_->public_key)}};
}

Result<release::Root> ReleaseSigner::accept_root(std::string_view text) {
  std::lock_guard lock(mu_);
  auto next = root_ ? release::verify_next_root(*root_, text) : release::verify_first_root(text);
  if (!next) return make_error(next.error());
  if (next->expires_ms <= clock_.now_ms()) {
    return make_error(Errc::kInvalidArgument,
                      "root version " + std::to_string(next->version) + " expired at " +
                          release::format_time(next->expires_ms) + ": sign one that has not");
  }
  const std::string online_id = release::key_id(online_.public_key);
  const std::string pending_id = pending_ ? release::key_id(pending_->public_key) : "";
  std::string chosen;
  for (const std::string& id : {online_id, pending_id}) {
    if (!id.empty() && role_is_only(*next, release::kTargets, id) &&
        role_is_only(*next, release::kTimestamp, id)) {
      chosen = id;
    }
  }
  if (chosen.empty()) {
    return make_error(Errc::kInvalidArgument,
                      "root version " + std::to_string(next->version) +
                          " must give the targets and timestamp roles one key, threshold 1, that "
                          "this server holds (online " +
                          online_id.substr(0, 12) +
                          (pending_id.empty() ? "" : ", pending " + pending_id.substr(0, 12)) +
                          "): `outpost release keys init|rotate` build such a root");
  }
  store::ReleaseDocument doc{std::string(release::kRoot), next->version, std::string(text),
                             clock_.now_ms()};
  auto put = store_.put_release_document(doc);
  if (!put) return make_error(put.error());
  if (!*put) {
    return make_error(Errc::kConflict,
                      "root version " + std::to_string(next->version) + " is stored already");
  }
  if (chosen == pending_id && chosen != online_id) {
    OUTPOST_TRY(rename_durably(dir_ + "/pending.key", dir_ + "/online.key"));
    online_ = *pending_;
    pending_.reset();
  }
  root_ = *next;
  root_text_ = std::string(text);
  if (auto signed_now = refresh_and_tell_locked(); !signed_now) {
    spdlog::error("release metadata: {}", signed_now.error().message);
  }
  spdlog::info("release metadata: root version {} accepted", next->version);
  return *next;
}

std::optional<std::string> ReleaseSigner::root(int64_t version) {
  {
    std::lock_guard lock(mu_);
    if (!root_) return std::nullopt;
    if (version == 0 || version == root_->version) return root_text_;
  }
  auto doc = store_.get_release_document(std::string(release::kRoot), version);
  if (!doc || !*doc) return std::nullopt;
  return (*doc)->body;
}

std::optional<std::string> ReleaseSigner::timestamp() {
  std::lock_guard lock(mu_);
  if (!timestamp_) return std::nullopt;
  return timestamp_text_;
}

std::optional<std::string> ReleaseSigner::targets() {
  std::lock_guard lock(mu_);
  if (!targets_) return std::nullopt;
  return targets_text_;
}

}  // namespace outpost::server::registry
