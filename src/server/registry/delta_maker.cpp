#include "server/registry/delta_maker.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>

#include <spdlog/spdlog.h>

#include "common/crypto.h"
#include "common/units.h"
#include "common/zstd_delta.h"

namespace outpost::server::registry {

DeltaMaker::DeltaMaker(store::Store& store, BlobStore& blobs, const Clock& clock,
                       DeltaOptions options, std::function<void()> on_made)
    : store_(store),
      blobs_(blobs),
      clock_(clock),
      options_(options),
      on_made_(std::move(on_made)) {}

DeltaMaker::~DeltaMaker() { stop(); }

void DeltaMaker::start() {
  if (thread_.joinable() || options_.bases <= 0) return;
  {
    std::lock_guard lock(mu_);
    stopping_ = false;
    catching_up_ = true;
  }
  running_ = true;
  thread_ = std::thread([this] { worker(); });
}

void DeltaMaker::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  running_ = false;
}

bool DeltaMaker::running() const { return running_.load(); }

void DeltaMaker::catch_up_soon() {
  {
    std::lock_guard lock(mu_);
    catch_up_due_ = true;
  }
  cv_.notify_all();
}

void DeltaMaker::request(const std::string& target, const std::vector<std::string>& bases) {
  if (options_.bases <= 0) return;
  if (!running() && poke_) {
    poke_();  // a follower: the leader makes it
    return;
  }
  auto known = store_.list_artifact_deltas(target);
  if (!known) {
    spdlog::error("deltas for {}: {}", target, known.error().message);
    return;
  }
  std::vector<std::string> chosen;
  for (const auto& base : bases) {
    if (base == target || base.empty()) continue;
    if (std::find(chosen.begin(), chosen.end(), base) != chosen.end()) continue;
    chosen.push_back(base);
    if (static_cast<int>(chosen.size()) >= options_.bases) break;
  }
  {
    std::lock_guard lock(mu_);
    for (const auto& base : chosen) {
      const bool done = std::any_of(known->begin(), known->end(),
                                    [&](const store::ArtifactDelta& d) { return d.base == base; });
      if (done || !pending_.insert({target, base}).second) continue;
      queue_.push_back({target, base});
      spdlog::info("delta queued: {} from {}", target, base);
    }
  }
  cv_.notify_all();
}

void DeltaMaker::request_model_version(const std::vector<store::ModelVersion>& versions,
                                       const store::ModelVersion& added) {
  for (size_t i = 0; i < added.variants.size(); ++i) {
    const store::ModelVariant& variant = added.variants[i];
    std::vector<std::string> bases;
    for (auto it = versions.rbegin(); it != versions.rend(); ++it) {
      if (it->version == added.version || it->created_at > added.created_at) continue;
      const store::ModelVariant* match = nullptr;
      for (const auto& v : it->variants) {
        if (v.selector_json == variant.selector_json) {
          match = &v;
          break;
        }
      }
      if (match == nullptr && i < it->variants.size()) match = &it->variants[i];
      if (match != nullptr) bases.push_back(match->artifact_digest);
    }
    request(variant.artifact_digest, bases);
  }
}

namespace {

std::string bundle_of(const store::DeploymentRevision& revision) {
  const nlohmann::json doc =
      nlohmann::json::parse(revision.manifest_json, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) return "";
  const auto spec = doc.find("spec");
  if (spec == doc.end() || !spec->is_object()) return "";
  const auto workload = spec->find("workload");
  if (workload == spec->end() || !workload->is_object()) return "";
  const auto bundle = workload->find("bundle");
  return bundle != workload->end() && bundle->is_string() ? bundle->get<std::string>() : "";
}

}  // namespace

void DeltaMaker::request_deployment(const std::vector<store::DeploymentRevision>& revisions) {
  if (revisions.empty()) return;
  const std::string target = bundle_of(revisions.back());
  if (target.empty()) return;
  std::vector<std::string> bases;
  for (auto it = std::next(revisions.rbegin()); it != revisions.rend(); ++it) {
    std::string bundle = bundle_of(*it);
    if (!bundle.empty()) bases.push_back(std::move(bundle));
  }
  request(target, bases);
}

void DeltaMaker::catch_up() {
  auto models = store_.list_models();
  if (!models) {
    spdlog::error("deltas at start: {}", models.error().message);
    return;
  }
  for (const auto& name : *models) {
    auto versions = store_.list_model_versions(name);
    if (!versions || versions->size() < 2) continue;
    const auto newest =
        std::max_element(versions->begin(), versions->end(),
                         [](const auto& a, const auto& b) { return a.created_at < b.created_at; });
    request_model_version(*versions, *newest);
  }
  auto deployments = store_.list_deployments();
  if (!deployments) {
    spdlog::error("deltas at start: {}", deployments.error().message);
    return;
  }
  for (const auto& d : *deployments) {
    auto revisions = store_.list_deployment_revisions(d.name);
    if (revisions) request_deployment(*revisions);
  }
}

nlohmann::json DeltaMaker::status() {
  std::lock_guard lock(mu_);
  return {{"enabled", options_.bases > 0},
          {"bases", options_.bases},
          {"level", options_.level},
          {"queued", queue_.size()},
          {"making", making_.empty() ? nlohmann::json() : nlohmann::json(making_)},
          {"made", made_},
          {"skipped", skipped_},
          {"failed", failed_},
          {"last_error", last_error_}};
}

bool DeltaMaker::idle() {
  std::lock_guard lock(mu_);
  return !catching_up_ && queue_.empty() && making_.empty();
}

void DeltaMaker::worker() {
  catch_up();
  {
    std::lock_guard lock(mu_);
    catching_up_ = false;
  }
  while (true) {
    Job job;
    bool notify = false;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || catch_up_due_; });
      if (stopping_) return;
      if (catch_up_due_) {
        catch_up_due_ = false;
        lock.unlock();
        catch_up();
        continue;
      }
      job = queue_.front();
      queue_.pop_front();
      making_ = job.target;
    }
    bool stored = false;
    Status result = make_one(job, stored);
    {
      std::lock_guard lock(mu_);
      pending_.erase({job.target, job.base});
      making_.clear();
      if (!result) {
        ++failed_;
        last_error_ = result.error().message;
      }
      if (stored) made_since_notify_ = true;
      if (queue_.empty() && made_since_notify_ && !stopping_) {
        made_since_notify_ = false;
        notify = true;
      }
    }
    if (!result && !stopping_) {
      spdlog::error("delta {} from {}: {}", job.target, job.base, result.error().message);
    }
    if (notify && on_made_) on_made_();
  }
}

Status DeltaMaker::make_one(const Job& job, bool& stored) {
  store::ArtifactDelta row;
  row.target = job.target;
  row.base = job.base;
  row.created_at = clock_.now_ms();
  auto skip = [&](std::string why) -> Status {
    row.state = "skipped";
    row.detail = std::move(why);
    std::lock_guard lock(mu_);
    ++skipped_;
    spdlog::info("delta {} from {} skipped: {}", job.target, job.base, row.detail);
    return ok();
  };
  auto base_size = blobs_.size_of(job.base);
  auto target_size = blobs_.size_of(job.target);
  if (!base_size || !target_size) {
    OUTPOST_TRY(skip(!base_size ? "the base blob is not in the registry"
                                : "the target blob is not in the registry"));
    return store_.put_artifact_delta(row);
  }
  row.target_size = *target_size;
  if (*base_size > options_.max_blob_bytes || *target_size > options_.max_blob_bytes) {
    OUTPOST_TRY(
        skip("larger than the " + format_size(options_.max_blob_bytes) + " a delta is made for"));
    return store_.put_artifact_delta(row);
  }
  const auto started = std::chrono::steady_clock::now();
  const std::string temp = blobs_.temp_dir() + "/delta-" + crypto::random_hex(8);
  auto made = delta::make_delta(blobs_.path_for(job.base), blobs_.path_for(job.target), temp,
                                {.level = options_.level, .cancel = &stopping_});
  if (!made) {
    ::unlink(temp.c_str());
    if (stopping_) return ok();  // made again after the restart: nothing was recorded
    return make_error(made.error());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (static_cast<double>(made->delta_bytes) >
      options_.max_ratio * static_cast<double>(made->target_bytes)) {
    ::unlink(temp.c_str());
    OUTPOST_TRY(skip("the delta (" + format_size(made->delta_bytes) + ") is not smaller than " +
                     std::to_string(static_cast<int>(options_.max_ratio * 100)) + "% of the " +
                     format_size(made->target_bytes) + " blob"));
    return store_.put_artifact_delta(row);
  }
  auto blob = blobs_.ingest(temp);
  if (!blob) return make_error(blob.error());
  store::Artifact artifact;
  artifact.digest = blob->digest;
  artifact.size = blob->size;
  artifact.media_type = delta::kMediaType;
  artifact.created_at = row.created_at;
  auto inserted = store_.put_artifact(artifact);
  if (!inserted) return make_error(inserted.error());
  row.delta = blob->digest;
  row.delta_size = blob->size;
  row.state = "ready";
  char took[32];
  std::snprintf(took, sizeof took, "%.1f", seconds);
  row.detail = "zstd -" + std::to_string(options_.level) + " patch-from, " + took + " s";
  OUTPOST_TRY(store_.put_artifact_delta(row));
  stored = true;
  {
    std::lock_guard lock(mu_);
    ++made_;
  }
  spdlog::info("delta {} from {}: {} of {} ({:.1f}%) in {} s", job.target, job.base,
               format_size(row.delta_size), format_size(row.target_size),
               100.0 * static_cast<double>(row.delta_size) /
                   static_cast<double>(std::max<int64_t>(row.target_size, 1)),
               took);
  return ok();
}

}  // namespace outpost::server::registry
