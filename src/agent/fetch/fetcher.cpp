#include "agent/fetch/fetcher.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include <spdlog/spdlog.h>

#include "agent/sync/desired_sync.h"
#include "common/digest.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/units.h"
#include "common/zstd_delta.h"

namespace outpost::agent {
namespace {

int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string hex_of(const std::string& digest) {
  return digest.rfind("sha256:", 0) == 0 ? digest.substr(7) : digest;
}

int64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
}

struct Transfer {
  FILE* file = nullptr;
  int64_t written = 0;
  const std::atomic<bool>* stopping = nullptr;
  std::function<void(int64_t)> on_bytes;
  std::string write_error;
  int64_t limit = -1;  // bytes this transfer may write (-1: no limit)
  bool overflowed = false;
};

size_t write_to_file(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  size_t n = size * count;
  if (t->limit >= 0 && t->written + static_cast<int64_t>(n) > t->limit) {
    t->overflowed = true;  // not one byte past the signed length reaches the disk
    return 0;
  }
  if (std::fwrite(data, 1, n, t->file) != n) {
    t->write_error = std::string("write failed: ") + std::strerror(errno);
    return 0;
  }
  t->written += static_cast<int64_t>(n);
  if (t->on_bytes) t->on_bytes(static_cast<int64_t>(n));
  return n;
}

int check_stop(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  return static_cast<Transfer*>(user)->stopping->load() ? 1 : 0;
}

}  // namespace

ArtifactStore::ArtifactStore(std::string data_dir) : dir_(std::move(data_dir) + "/artifacts") {}

Status ArtifactStore::init() {
  OUTPOST_TRY(make_dirs(dir_ + "/sha256", 0700));
  OUTPOST_TRY(make_dirs(dir_ + "/partial", 0700));
  // A crash between writing and renaming leaves *.tmp files; they are never used.
  for (const auto& name : list_directory(dir_ + "/sha256")) {
    if (name.find('.') != std::string::npos) ::unlink((dir_ + "/sha256/" + name).c_str());
  }
  return ok();
}

bool ArtifactStore::has(const std::string& digest) const {
  return ::access(path(digest).c_str(), F_OK) == 0;
}
std::string ArtifactStore::path(const std::string& digest) const {
  return dir_ + "/sha256/" + hex_of(digest);
}
std::string ArtifactStore::partial_path(const std::string& digest) const {
  return dir_ + "/partial/" + hex_of(digest);
}

std::vector<std::string> ArtifactStore::list() const {
  std::vector<std::string> out;
  for (const auto& name : list_directory(dir_ + "/sha256")) {
    if (name.size() == 64) out.push_back("sha256:" + name);
  }
  return out;
}

int64_t ArtifactStore::used_bytes() const {
  int64_t total = 0;
  for (const char* sub : {"/sha256/", "/partial/"}) {
    for (const auto& name : list_directory(dir_ + sub)) total += file_size(dir_ + sub + name);
  }
  return total;
}

void ArtifactStore::remove(const std::string& digest) const {
  ::unlink(path(digest).c_str());
  ::unlink(partial_path(digest).c_str());
}

Fetcher::Fetcher(ArtifactStore& store, Identity identity, FetchOptions options,
                 std::function<void()> on_change)
    : store_(store),
      identity_(std::move(identity)),
      options_(options),
      on_change_(std::move(on_change)) {}

Fetcher::~Fetcher() { stop(); }

void Fetcher::start() {
  for (int i = 0; i < std::max(1, options_.max_parallel); ++i) {
    threads_.emplace_back([this] { worker(); });
  }
}

void Fetcher::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

void Fetcher::want(const std::string& digest, int64_t signed_length,
                   std::optional<DeltaPlan> plan) {
  {
    std::lock_guard lock(mu_);
    // A plan is taken while the job has not started on the whole blob (a full download under
    // way is not thrown away for it), and never again once it was given up.
    auto take_plan = [&](const FetchProgress& job) {
      if (!plan || given_up_.contains({digest, plan->delta})) return;
      if (job.phase == FetchProgress::Phase::kDownloading && job.via_delta.empty()) return;
      if (job.have_bytes > 0 && job.via_delta.empty()) return;
      auto& state = plans_[digest];
      if (state.plan.delta != plan->delta) state = PlanState{*plan, 0};
      state.plan.delta_length = plan->delta_length;
    };
    if (auto it = jobs_.find(digest); it != jobs_.end()) {
      it->second.signed_length = signed_length;
      take_plan(it->second);
      return;
    }
    if (store_.has(digest)) return;
    FetchProgress job;
    job.signed_length = signed_length;
    take_plan(job);
    jobs_[digest] = job;
    queue_.push_back(digest);
  }
  cv_.notify_one();
}

void Fetcher::forget(const std::string& digest) {
  std::lock_guard lock(mu_);
  auto it = jobs_.find(digest);
  // A transfer in flight finishes (its worker drops the job after); a waiting one goes now.
  if (it == jobs_.end()) return;
  if (it->second.phase == FetchProgress::Phase::kDownloading ||
      it->second.phase == FetchProgress::Phase::kVerifying) {
    forgotten_.insert(digest);  // its worker drops it when the transfer ends
    return;
  }
  jobs_.erase(it);
  plans_.erase(digest);
  std::erase(queue_, digest);
}

std::optional<FetchProgress> Fetcher::progress(const std::string& digest) const {
  std::lock_guard lock(mu_);
  auto it = jobs_.find(digest);
  if (it == jobs_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> Fetcher::wanted() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [digest, _] : jobs_) out.push_back(digest);
  return out;
}

void Fetcher::set_progress(const std::string& digest,
                           const std::function<void(FetchProgress&)>& edit) {
  std::lock_guard lock(mu_);
  auto it = jobs_.find(digest);
  if (it != jobs_.end()) edit(it->second);
}

void Fetcher::pace(int64_t bytes) {
  const int64_t rate = options_.max_rate_bytes_per_s;
  if (rate <= 0) return;
  int64_t wait_us = 0;
  {
    // One schedule for every transfer, so the cap holds for all of them together: each chunk
    // books its share of time; a burst of at most 100 ms is allowed after an idle spell.
    std::lock_guard lock(rate_mu_);
    const int64_t now = steady_ms() * 1000;
    rate_clock_us_ = std::max(rate_clock_us_, now - 100'000);
    rate_clock_us_ += bytes * 1'000'000 / rate;
    wait_us = rate_clock_us_ - now;
  }
  while (wait_us > 0 && !stopping_) {
    const int64_t slice = std::min<int64_t>(wait_us, 200'000);
    std::this_thread::sleep_for(std::chrono::microseconds(slice));
    wait_us -= slice;
  }
}

void Fetcher::worker() {
  while (true) {
    std::string digest;
    {
      std::unique_lock lock(mu_);
      while (!stopping_) {
        if (!queue_.empty()) break;
        // Move failed jobs whose retry time came back into the queue; sleep until the next.
        int64_t now = steady_ms();
        int64_t next = 0;
        for (auto& [d, p] : jobs_) {
          if (p.phase != FetchProgress::Phase::kWaitingRetry) continue;
          if (p.retry_at_ms <= now) {
            p.phase = FetchProgress::Phase::kQueued;
            queue_.push_back(d);
          } else if (next == 0 || p.retry_at_ms < next) {
            next = p.retry_at_ms;
          }
        }
        if (!queue_.empty()) break;
        if (next == 0) {
          cv_.wait(lock);
        } else {
          cv_.wait_for(lock, std::chrono::milliseconds(next - now));
        }
      }
      if (stopping_) return;
      digest = queue_.front();
      queue_.pop_front();
      jobs_[digest].phase = FetchProgress::Phase::kDownloading;
      jobs_[digest].attempts++;
      ++active_;
    }
    on_change_();
    Status result = fetch_once(digest);
    bool changed = true;
    {
      std::lock_guard lock(mu_);
      --active_;
      auto it = jobs_.find(digest);
      if (forgotten_.erase(digest) > 0 && it != jobs_.end()) {
        jobs_.erase(it);
        plans_.erase(digest);
        it = jobs_.end();
      }
      if (result) plans_.erase(digest);
      if (it != jobs_.end()) {
        if (result) {
          it->second.phase = FetchProgress::Phase::kDone;
          it->second.last_error.clear();
          it->second.last_code = Errc::kUnavailable;
        } else if (!stopping_) {
          // Backoff per blob: 2 s, 4 s, ... capped, with jitter.
          const int64_t delay = Backoff(options_.retry_initial_ms, options_.retry_max_ms)
                                    .delay_for(it->second.attempts - 1);
          it->second.phase = FetchProgress::Phase::kWaitingRetry;
          it->second.last_error = result.error().message;
          it->second.last_code = result.error().code;
          it->second.retry_at_ms = steady_ms() + delay;
          spdlog::warn("fetch {}: {} (retry in {} ms)", digest, result.error().message, delay);
        } else {
          changed = false;
        }
      }
    }
    cv_.notify_all();
    if (changed) on_change_();
  }
}

Status Fetcher::fetch_once(const std::string& digest) {
  if (store_.has(digest)) return ok();
  int64_t signed_length = -1;
  std::optional<DeltaPlan> plan;
  {
    std::lock_guard lock(mu_);
    if (auto it = jobs_.find(digest); it != jobs_.end()) signed_length = it->second.signed_length;
    if (auto it = plans_.find(digest); it != plans_.end()) plan = it->second.plan;
  }
  if (plan) {
    set_progress(digest, [&](FetchProgress& p) { p.via_delta = plan->delta; });
    Status by_delta = fetch_by_delta(digest, *plan, signed_length);
    if (by_delta) return ok();
    if (stopping_) return by_delta;
    bool retry_delta = false;
    {
      std::lock_guard lock(mu_);
      auto it = plans_.find(digest);
      if (by_delta.error().code == Errc::kUnavailable && it != plans_.end() &&
          ++it->second.unreachable < 3) {
        retry_delta = true;  // the whole blob would not come through either: back off
      } else {
        given_up_.insert({digest, plan->delta});
        plans_.erase(digest);
      }
    }
    if (retry_delta) return by_delta;
    spdlog::warn("delta {} for {} given up: {}; fetching the whole blob", plan->delta, digest,
                 by_delta.error().message);
    ::unlink(store_.partial_path(plan->delta).c_str());
    set_progress(digest, [&](FetchProgress& p) {
      p.via_delta.clear();
      p.delta_error = by_delta.error().message;
      p.phase = FetchProgress::Phase::kDownloading;
      p.total_bytes = 0;
      p.have_bytes = 0;
    });
  }
  return download(digest, digest, signed_length, /*into_store=*/true);
}

Status Fetcher::fetch_by_delta(const std::string& digest, const DeltaPlan& plan,
                               int64_t signed_length) {
  OUTPOST_TRY(download(digest, plan.delta, plan.delta_length, /*into_store=*/false));
  if (!store_.has(plan.base)) {
    return make_error(Errc::kNotFound, "its base " + plan.base + " is no longer on this device");
  }
  const std::string delta_file = store_.partial_path(plan.delta);
  const std::string out = store_.partial_path(digest) + ".applying";
  set_progress(digest, [](FetchProgress& p) { p.phase = FetchProgress::Phase::kVerifying; });
  auto applied = delta::apply_delta(store_.path(plan.base), delta_file, out,
                                    signed_length >= 0 ? signed_length : delta::kMaxBlobBytes);
  ::unlink(delta_file.c_str());  // used once, either way
  if (!applied) {
    ::unlink(out.c_str());
    return make_error(applied.error().code == Errc::kUnavailable ? Errc::kIo : applied.error().code,
                      applied.error().message);
  }
  if ("sha256:" + applied->sha256_hex != digest) {
    ::unlink(out.c_str());
    return make_error(Errc::kIo, "the delta against " + plan.base +
                                     " rebuilt sha256:" + applied->sha256_hex + ", not " + digest +
                                     " (is the base on this device damaged?)");
  }
  OUTPOST_TRY(rename_durably(out, store_.path(digest)));
  spdlog::info("artifact {} rebuilt from delta {} ({}) against {}", digest, plan.delta,
               format_size(file_size(store_.path(digest))), plan.base);
  return ok();
}

Status Fetcher::download(const std::string& key, const std::string& blob, int64_t signed_length,
                         bool into_store) {
  const std::string& digest = blob;
  const std::string partial = store_.partial_path(digest);
  const std::string server = identity_.url();
  const std::string url = server + "/api/v1/artifacts/" + digest;
  CURL* curl = curl_easy_init();
  if (curl == nullptr) return make_error(Errc::kInternal, "curl_easy_init failed");
  struct Cleanup {
    CURL* c;
    curl_slist* h = nullptr;
    ~Cleanup() {
      curl_slist_free_all(h);
      curl_easy_cleanup(c);
    }
  } cleanup{curl};
  const std::string target = "/api/v1/artifacts/" + digest;
  // Each request carries its own signature (a fresh nonce), so the headers are made per call.
  auto common = [&](const char* method) {
    curl_slist_free_all(cleanup.h);
    cleanup.h =
        curl_slist_append(nullptr, ("Authorization: Bearer " + identity_.credential).c_str());
    if (identity_.signer) {
      auto [name, value] = identity_.signer->header(method, target, {});
      cleanup.h = curl_slist_append(cleanup.h, (name + ": " + value).c_str());
    }
    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, cleanup.h);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 10'000L);
    apply_proxy_from_env(curl, url);
    // A stalled link (no byte for 30 s) is a failure to retry, not a hang.
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME, 30L);
    if (!identity_.ca_file.empty())
      curl_easy_setopt(curl, CURLOPT_CAINFO, identity_.ca_file.c_str());
  };

  // 1. Size first: the disk budget is checked before any byte is fetched.
  common("HEAD");
  curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  CURLcode rc = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  if (rc != CURLE_OK) {
    const std::string why = std::string("cannot reach ") + server + ": " + curl_easy_strerror(rc);
    if (!stopping_) identity_.failed(server, why);
    return make_error(Errc::kUnavailable, why);
  }
  if (worth_failover(static_cast<int>(status))) {
    identity_.failed(server, "HTTP " + std::to_string(status));
  }
  if (status != 200) {
    // Busy or unreachable upstream (503, 504, 429; a relay still fetching answers 503) may work
    // on the next try; any other answer says the server has no good copy to give (a relay
    // answers 502 when its upstream served bytes that failed verification).
    const Errc code = status == 404                                     ? Errc::kNotFound
                      : status == 401 || status == 403                  ? Errc::kPermissionDenied
                      : status == 503 || status == 504 || status == 429 ? Errc::kUnavailable
                                                                        : Errc::kIo;
    return make_error(code,
                      "artifact " + digest + ": server answered HTTP " + std::to_string(status));
  }
  curl_off_t length = -1;
  curl_easy_getinfo(curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
  int64_t total = length >= 0 ? static_cast<int64_t>(length) : 0;
  if (signed_length >= 0) {
    if (total > signed_length) {
      return make_error(Errc::kPermissionDenied, "endless data refused: the server offers " +
                                                     std::to_string(total) + " bytes of artifact " +
                                                     digest + ", the signed release metadata " +
                                                     std::to_string(signed_length));
    }
    total = signed_length;  // and never more than that is read below
  }
  int64_t have = file_size(partial);
  if (have > total) {  // not ours (a different blob would not share the name): start over
    ::unlink(partial.c_str());
    have = 0;
  }
  set_progress(key, [&](FetchProgress& p) {
    p.total_bytes = total;
    p.have_bytes = have;
  });
  const int64_t need = total - have;
  if (options_.disk_budget_bytes > 0) {
    int64_t used = store_.used_bytes();
    if (used + need > options_.disk_budget_bytes) {
      return make_error(Errc::kResourceExhausted,
                        "disk budget: artifact " + digest + " needs " + format_size(need) +
                            " more, " + format_size(used) + " of the " +
                            format_size(options_.disk_budget_bytes) + " budget is in use");
    }
  }
  struct statvfs vfs {};
  if (::statvfs(partial.substr(0, partial.rfind('/')).c_str(), &vfs) == 0) {
    int64_t free_bytes = static_cast<int64_t>(vfs.f_bavail) * static_cast<int64_t>(vfs.f_frsize);
    if (need + options_.free_disk_reserve_bytes > free_bytes) {
      return make_error(Errc::kResourceExhausted,
                        "disk full: artifact " + digest + " needs " + format_size(need) + " and " +
                            format_size(free_bytes) + " is free (keeping " +
                            format_size(options_.free_disk_reserve_bytes) + " spare)");
    }
  }

  // 2. The missing bytes: Range from what is already on disk.
  if (need > 0) {
    FILE* file = std::fopen(partial.c_str(), "ab");
    if (file == nullptr) {
      return make_error(Errc::kIo, "cannot open " + partial + ": " + std::strerror(errno));
    }
    Transfer t;
    t.file = file;
    t.stopping = &stopping_;
    t.limit = signed_length >= 0 ? need : -1;
    t.on_bytes = [&](int64_t n) {
      set_progress(key, [n](FetchProgress& p) {
        p.have_bytes += n;
        p.fetched_bytes += n;
      });
      pace(n);
    };
    common("GET");
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, write_to_file);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &t);
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, check_stop);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &t);
    if (have > 0) curl_easy_setopt(curl, CURLOPT_RESUME_FROM_LARGE, static_cast<curl_off_t>(have));
    if (options_.max_rate_bytes_per_s > 0) {
      // Small reads, so the pacing in the write callback is smooth (libcurl's own speed
      // limit lets the first megabytes through at full speed).
      curl_easy_setopt(curl, CURLOPT_BUFFERSIZE, 16'384L);
    }
    // A server that ignores Range answers 200 with the whole blob: start the file over.
    curl_easy_setopt(curl, CURLOPT_FAILONERROR, 1L);
    rc = curl_easy_perform(curl);
    status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    bool flushed = std::fflush(file) == 0 && ::fsync(::fileno(file)) == 0;
    std::fclose(file);
    if (rc == CURLE_ABORTED_BY_CALLBACK) {
      return make_error(Errc::kUnavailable, "download of " + digest + " interrupted (stopping)");
    }
    if (t.overflowed) {
      return make_error(Errc::kPermissionDenied,
                        "endless data refused: the server sent more of artifact " + digest +
                            " than the " + std::to_string(signed_length) +
                            " bytes the signed release metadata gives it; stopped reading");
    }
    if (!t.write_error.empty()) return make_error(Errc::kIo, partial + ": " + t.write_error);
    if (rc == CURLE_RANGE_ERROR || (rc == CURLE_OK && have > 0 && status == 200)) {
      ::unlink(partial.c_str());
      return make_error(Errc::kUnavailable,
                        "server ignored the Range request for " + digest + "; starting over");
    }
    if (rc != CURLE_OK) {
      return make_error(Errc::kUnavailable, "download of " + digest + " stopped at " +
                                                format_size(file_size(partial)) + " of " +
                                                format_size(total) + ": " + curl_easy_strerror(rc));
    }
    if (!flushed) return make_error(Errc::kIo, "cannot flush " + partial);
  }

  // 3. Verify before the blob may be used; a mismatch deletes it so it is fetched afresh.
  set_progress(key, [](FetchProgress& p) { p.phase = FetchProgress::Phase::kVerifying; });
  auto actual = sha256_file_hex(partial);
  if (!actual) return make_error(actual.error());
  if ("sha256:" + *actual != digest) {
    ::unlink(partial.c_str());
    return make_error(Errc::kIo, "sha256 mismatch for " + digest +
                                     ": the downloaded bytes hash to sha256:" + *actual +
                                     "; deleted, will download again");
  }
  if (into_store) OUTPOST_TRY(rename_durably(partial, store_.path(digest)));
  return ok();
}

}  // namespace outpost::agent
