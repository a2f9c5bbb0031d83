// The registry's delta maker (server/registry/delta_maker): a delta is made once per (target,
// base) pair, stored as a blob with a "ready" row whose bytes rebuild the target, or recorded
// "skipped" with the reason; how bases are chosen for model versions and deployments; the
// catch-up at start; and the on_made callback once per drained batch.
#include "server/registry/delta_maker.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/clock.h"
#include "common/crypto.h"
#include "common/digest.h"
#include "common/durable_file.h"
#include "common/zstd_delta.h"
#include "store/store.h"

namespace outpost::server::registry {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

std::string random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string out(n, '\0');
  for (auto& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

// `bytes` with `fraction` of it replaced by fresh random bytes, in ten runs spread over it (as
// retraining a few layers of a model changes some tensors and keeps the rest).
std::string changed(std::string bytes, double fraction, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const size_t runs = 10;
  const size_t run = static_cast<size_t>(static_cast<double>(bytes.size()) * fraction) / runs;
  for (size_t r = 0; r < runs; ++r) {
    const size_t start = r * (bytes.size() / runs);
    for (size_t i = start; i < start + run && i < bytes.size(); ++i) {
      bytes[i] = static_cast<char>(rng() & 0xff);
    }
  }
  return bytes;
}

bool wait_until(const std::function<bool()>& done, std::chrono::milliseconds timeout = 30s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return done();
}

store::ModelVariant variant(const std::string& digest, json selector = json::object()) {
  store::ModelVariant v;
  v.selector_json = selector.dump();
  v.artifact_digest = digest;
  v.format = "onnx";
  return v;
}

store::ModelVersion version(const std::string& number, int64_t created_at,
                            std::vector<store::ModelVariant> variants) {
  store::ModelVersion v;
  v.model = "defect-net";
  v.version = number;
  v.content_hash = sha256_hex(number);
  v.created_at = created_at;
  v.variants = std::move(variants);
  return v;
}

std::string deployment_manifest(const std::string& bundle) {
  json workload = {{"command", {"bin/run"}}};
  if (!bundle.empty()) workload["bundle"] = bundle;
  return json({{"apiVersion", "outpost/v1"},
               {"kind", "Deployment"},
               {"metadata", {{"name", "line-monitor"}}},
               {"spec", {{"workload", workload}}}})
      .dump();
}

store::DeploymentRevision revision(int64_t number, std::string manifest_json) {
  store::DeploymentRevision r;
  r.name = "line-monitor";
  r.revision = number;
  r.manifest_json = std::move(manifest_json);
  return r;
}

class DeltaMakerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("outpost-delta-maker-" + crypto::random_hex(6));
    ASSERT_TRUE(fs::create_directories(dir_));
    blobs_ = std::make_unique<BlobStore>((dir_ / "blobs").string());
    ASSERT_TRUE(blobs_->init().has_value());
    auto opened = store::open_memory_store();
    ASSERT_TRUE(opened.has_value()) << opened.error().message;
    store_ = std::move(*opened);
    options_.level = 3;  // the level only trades time for size; the tests need speed
  }
  void TearDown() override {
    maker_.reset();  // joins the worker before the store and blobs go
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Stores `bytes` in the registry's blob store as an upload would; returns its digest.
  std::string put_blob(const std::string& bytes) {
    const std::string temp = blobs_->temp_dir() + "/upload-" + crypto::random_hex(6);
    EXPECT_TRUE(write_file_durably(temp, bytes).has_value());
    auto blob = blobs_->ingest(temp);
    EXPECT_TRUE(blob.has_value()) << blob.error().message;
    return blob ? blob->digest : "";
  }

  DeltaMaker& maker() {
    if (!maker_) {
      maker_ = std::make_unique<DeltaMaker>(*store_, *blobs_, clock_, options_, [this] {
        // Runs on the worker: the batch must be over by now.
        queued_at_notify_ = maker_->status()["queued"].get<int64_t>();
        ++notified_;
      });
    }
    return *maker_;
  }

  // Jobs finished (made, skipped or failed) so far.
  uint64_t finished() {
    const json s = maker().status();
    return s["made"].get<uint64_t>() + s["skipped"].get<uint64_t>() + s["failed"].get<uint64_t>();
  }
  // Waits until `jobs` jobs have finished and nothing more is queued or being made.
  void wait_finished(uint64_t jobs) {
    EXPECT_TRUE(wait_until([&] { return finished() >= jobs && maker().idle(); }))
        << maker().status().dump();
  }

  std::vector<store::ArtifactDelta> rows(const std::string& target = "") {
    auto listed = store_->list_artifact_deltas(target);
    EXPECT_TRUE(listed.has_value()) << listed.error().message;
    return listed ? *listed : std::vector<store::ArtifactDelta>{};
  }

  // The bytes that applying the stored delta to `base` gives.
  std::string rebuild(const std::string& base, const std::string& delta) {
    const std::string out = (dir_ / ("rebuilt-" + crypto::random_hex(4))).string();
    auto applied = delta::apply_delta(blobs_->path_for(base), blobs_->path_for(delta), out,
                                      delta::kMaxBlobBytes);
    EXPECT_TRUE(applied.has_value()) << applied.error().message;
    auto bytes = read_file(out);
    return bytes ? *bytes : "";
  }

  fs::path dir_;
  std::unique_ptr<BlobStore> blobs_;
  std::unique_ptr<store::Store> store_;
  ManualClock clock_;
  DeltaOptions options_;
  std::atomic<int> notified_{0};
  std::atomic<int64_t> queued_at_notify_{-1};
  std::unique_ptr<DeltaMaker> maker_;
};

TEST_F(DeltaMakerTest, MakesAReadyDeltaThatRebuildsTheTarget) {
  options_ = DeltaOptions{};  // the server's defaults, zstd -19 included
  const std::string v1 = random_bytes(1 << 20, 1);
  const std::string v2 = changed(v1, 0.10, 2);
  const std::string d1 = put_blob(v1);
  const std::string d2 = put_blob(v2);
  maker().request(d2, {d1});
  maker().start();
  wait_finished(1);

  auto made = rows(d2);
  ASSERT_EQ(made.size(), 1u);
  const store::ArtifactDelta& row = made[0];
  EXPECT_EQ(row.target, d2);
  EXPECT_EQ(row.base, d1);
  EXPECT_EQ(row.state, "ready");
  EXPECT_THAT(row.detail, HasSubstr("zstd -19 patch-from"));
  EXPECT_EQ(row.created_at, clock_.now_ms());
  EXPECT_EQ(row.target_size, 1 << 20);
  // The delta is a blob of the registry like any other, listed as an artifact of its own type.
  ASSERT_TRUE(is_digest_ref(row.delta)) << row.delta;
  auto size = blobs_->size_of(row.delta);
  ASSERT_TRUE(size.has_value());
  EXPECT_EQ(row.delta_size, *size);
  // 10 % changed: the delta carries about that, not the megabyte.
  EXPECT_LT(row.delta_size, (1 << 20) / 5) << row.delta_size;
  auto artifact = store_->get_artifact(row.delta);
  ASSERT_TRUE(artifact.has_value() && artifact->has_value());
  EXPECT_EQ((*artifact)->media_type, delta::kMediaType);
  EXPECT_EQ((*artifact)->size, row.delta_size);

  EXPECT_EQ(rebuild(d1, row.delta), v2);

  const json status = maker().status();
  EXPECT_EQ(status["made"], 1);
  EXPECT_EQ(status["skipped"], 0);
  EXPECT_EQ(status["failed"], 0);
  EXPECT_EQ(status["queued"], 0);
  EXPECT_TRUE(status["making"].is_null());
  EXPECT_EQ(notified_.load(), 1);
  // Nothing is left behind in the blob store's temp folder.
  EXPECT_TRUE(fs::is_empty(blobs_->temp_dir()));
}

TEST_F(DeltaMakerTest, OneBaseMakesOnlyTheDeltaFromTheNewestEarlierVersion) {
  const std::string b1 = random_bytes(64 << 10, 3);
  const std::string b2 = changed(b1, 0.1, 4);
  const std::string b3 = changed(b2, 0.1, 5);
  const std::string d1 = put_blob(b1), d2 = put_blob(b2), d3 = put_blob(b3);
  const std::vector<store::ModelVersion> versions = {
      version("1.0.0", 100, {variant(d1)}),
      version("1.1.0", 200, {variant(d2)}),
      version("1.2.0", 300, {variant(d3)}),
  };
  options_.bases = 1;
  maker().request_model_version(versions, versions[2]);
  EXPECT_EQ(maker().status()["queued"], 1);
  maker().start();
  wait_finished(1);
  auto made = rows();
  ASSERT_EQ(made.size(), 1u);
  EXPECT_EQ(made[0].target, d3);
  EXPECT_EQ(made[0].base, d2);
  EXPECT_EQ(made[0].state, "ready");
  EXPECT_EQ(rebuild(d2, made[0].delta), b3);
}

TEST_F(DeltaMakerTest, TwoBasesMakeDeltasFromBothEarlierVersions) {
  const std::string b1 = random_bytes(64 << 10, 3);
  const std::string b2 = changed(b1, 0.1, 4);
  const std::string b3 = changed(b2, 0.1, 5);
  const std::string d1 = put_blob(b1), d2 = put_blob(b2), d3 = put_blob(b3);
  const std::vector<store::ModelVersion> versions = {
      version("1.0.0", 100, {variant(d1)}),
      version("1.1.0", 200, {variant(d2)}),
      version("1.2.0", 300, {variant(d3)}),
  };
  ASSERT_EQ(options_.bases, 2);
  maker().request_model_version(versions, versions[2]);
  maker().start();
  wait_finished(2);
  auto made = rows(d3);
  ASSERT_EQ(made.size(), 2u);
  for (const auto& row : made) {
    SCOPED_TRACE(row.base);
    EXPECT_EQ(row.state, "ready");
    EXPECT_EQ(rebuild(row.base, row.delta), b3);
  }
  std::vector<std::string> bases = {made[0].base, made[1].base};
  std::sort(bases.begin(), bases.end());
  std::vector<std::string> want = {d1, d2};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(bases, want);
  // A version that is older than the one added is never a target nor later than it a base.
  EXPECT_THAT(rows(d2), IsEmpty());
}

TEST_F(DeltaMakerTest, VariantsMatchBySelectorElseByIndex) {
  // 1.0.0: [cpu, gpu]; 1.1.0: [gpu, npu]. The gpu variant moved to index 0 and still gets its
  // delta from the old gpu variant; npu is new, so it takes index 1 of 1.0.0 (the gpu one).
  const std::string cpu1 = random_bytes(32 << 10, 6);
  const std::string gpu1 = random_bytes(32 << 10, 7);
  const std::string gpu2 = changed(gpu1, 0.1, 8);
  const std::string npu2 = changed(gpu1, 0.2, 9);
  const std::string dc1 = put_blob(cpu1), dg1 = put_blob(gpu1);
  const std::string dg2 = put_blob(gpu2), dn2 = put_blob(npu2);
  const std::vector<store::ModelVersion> versions = {
      version("1.0.0", 100,
              {variant(dc1, {{"accelerator", "cpu"}}), variant(dg1, {{"accelerator", "gpu"}})}),
      version("1.1.0", 200,
              {variant(dg2, {{"accelerator", "gpu"}}), variant(dn2, {{"accelerator", "npu"}})}),
  };
  options_.bases = 1;
  maker().request_model_version(versions, versions[1]);
  maker().start();
  wait_finished(2);
  auto gpu = rows(dg2);
  ASSERT_EQ(gpu.size(), 1u);
  EXPECT_EQ(gpu[0].base, dg1);  // by selector, not index 0 (the cpu variant)
  auto npu = rows(dn2);
  ASSERT_EQ(npu.size(), 1u);
  EXPECT_EQ(npu[0].base, dg1);  // by index 1
  EXPECT_EQ(rows().size(), 2u);
}

TEST_F(DeltaMakerTest, UnrelatedBlobsAreRecordedSkippedWithTheRatio) {
  const std::string d1 = put_blob(random_bytes(256 << 10, 10));
  const std::string d2 = put_blob(random_bytes(256 << 10, 11));
  maker().request(d2, {d1});
  maker().start();
  wait_finished(1);
  auto made = rows();
  ASSERT_EQ(made.size(), 1u);
  EXPECT_EQ(made[0].target, d2);
  EXPECT_EQ(made[0].base, d1);
  EXPECT_EQ(made[0].state, "skipped");
  EXPECT_EQ(made[0].delta, "");
  EXPECT_EQ(made[0].delta_size, 0);
  EXPECT_EQ(made[0].target_size, 256 << 10);
  EXPECT_THAT(made[0].detail, HasSubstr("is not smaller than 75% of the"));
  const json status = maker().status();
  EXPECT_EQ(status["made"], 0);
  EXPECT_EQ(status["skipped"], 1);
  EXPECT_EQ(status["failed"], 0);
  EXPECT_EQ(notified_.load(), 0);  // nothing new to offer
  // No delta blob was kept: only the two uploads are in the store, no artifact row was made.
  size_t blob_files = 0;
  for (const auto& e : fs::directory_iterator(dir_ / "blobs" / "sha256")) {
    (void)e;
    ++blob_files;
  }
  EXPECT_EQ(blob_files, 2u);
  EXPECT_TRUE(fs::is_empty(blobs_->temp_dir()));
  auto artifacts = store_->list_artifacts();
  ASSERT_TRUE(artifacts.has_value());
  EXPECT_THAT(*artifacts, IsEmpty());
}

TEST_F(DeltaMakerTest, MissingOrOversizedBlobsAreRecordedSkipped) {
  const std::string present = put_blob(random_bytes(8 << 10, 12));
  const std::string big = put_blob(random_bytes(40 << 10, 13));
  const std::string absent = "sha256:" + std::string(64, 'e');
  options_.max_blob_bytes = 32 << 10;
  maker().request(present, {absent});
  maker().request(absent, {present});
  maker().request(big, {present});
  maker().start();
  wait_finished(3);
  auto detail = [&](const std::string& target, const std::string& base) {
    for (const auto& r : rows(target)) {
      if (r.base == base) return r.state + ": " + r.detail;
    }
    return std::string("(no row)");
  };
  EXPECT_EQ(detail(present, absent), "skipped: the base blob is not in the registry");
  EXPECT_EQ(detail(absent, present), "skipped: the target blob is not in the registry");
  EXPECT_THAT(detail(big, present), HasSubstr("skipped: larger than the"));
  EXPECT_EQ(maker().status()["skipped"], 3);
  EXPECT_EQ(notified_.load(), 0);
}

TEST_F(DeltaMakerTest, OnMadeRunsOnceAfterABatchAndAgainForTheNext) {
  const std::string b1 = random_bytes(64 << 10, 14);
  const std::string d1 = put_blob(b1);
  std::vector<std::string> targets;
  for (uint64_t i = 0; i < 3; ++i) targets.push_back(put_blob(changed(b1, 0.1, 20 + i)));
  for (const auto& t : targets) maker().request(t, {d1});
  EXPECT_EQ(maker().status()["queued"], 3);
  maker().start();
  wait_finished(3);
  EXPECT_EQ(maker().status()["made"], 3);
  EXPECT_EQ(notified_.load(), 1);
  EXPECT_EQ(queued_at_notify_.load(), 0);  // called once the queue had drained

  const std::string next = put_blob(changed(b1, 0.1, 30));
  maker().request(next, {d1});
  wait_finished(4);
  EXPECT_TRUE(wait_until([&] { return notified_.load() == 2; })) << notified_.load();
}

TEST_F(DeltaMakerTest, APairMadeOrSkippedIsNotQueuedAgain) {
  const std::string b1 = random_bytes(64 << 10, 15);
  const std::string d1 = put_blob(b1);
  const std::string d2 = put_blob(changed(b1, 0.1, 16));
  const std::string unrelated = put_blob(random_bytes(64 << 10, 17));
  // Asked twice while queued: one job.
  maker().request(d2, {d1});
  maker().request(d2, {d1, d1});
  maker().request(unrelated, {d1});
  EXPECT_EQ(maker().status()["queued"], 2);
  maker().start();
  wait_finished(2);
  const auto before = rows();
  ASSERT_EQ(before.size(), 2u);
  const json counters = maker().status();
  ASSERT_EQ(counters["made"], 1);
  ASSERT_EQ(counters["skipped"], 1);

  clock_.advance_ms(60'000);  // a row made again would carry the new time
  maker().request(d2, {d1});
  maker().request(unrelated, {d1});
  EXPECT_EQ(maker().status()["queued"], 0);
  EXPECT_TRUE(maker().idle());
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(maker().status(), counters);
  const auto after = rows();
  ASSERT_EQ(after.size(), 2u);
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_EQ(after[i].created_at, before[i].created_at);
    EXPECT_EQ(after[i].delta, before[i].delta);
  }
  EXPECT_EQ(notified_.load(), 1);
}

TEST_F(DeltaMakerTest, BaseEqualToTargetOrEmptyIsNotADelta) {
  const std::string d1 = put_blob(random_bytes(8 << 10, 18));
  maker().request(d1, {d1, ""});
  EXPECT_EQ(maker().status()["queued"], 0);
}

TEST_F(DeltaMakerTest, RequestDeploymentTakesBundlesFromTheRevisionsManifests) {
  const std::string b1 = random_bytes(64 << 10, 40);
  const std::string b2 = changed(b1, 0.1, 41);
  const std::string b3 = changed(b2, 0.1, 42);
  const std::string d1 = put_blob(b1), d2 = put_blob(b2), d3 = put_blob(b3);
  // Oldest first: r2 has no bundle and r3 is not JSON; r5 keeps r4's bundle.
  const std::vector<store::DeploymentRevision> revisions = {
      revision(1, deployment_manifest(d1)),
      revision(2, deployment_manifest("")),
      revision(3, "{not json"),
      revision(4, deployment_manifest(d2)),
      revision(5, deployment_manifest(d3)),
  };
  maker().request_deployment(revisions);
  EXPECT_EQ(maker().status()["queued"], 2);  // d3 from d2, d3 from d1 (bases = 2)
  maker().start();
  wait_finished(2);
  auto made = rows();
  ASSERT_EQ(made.size(), 2u);
  for (const auto& row : made) {
    SCOPED_TRACE(row.base);
    EXPECT_EQ(row.target, d3);
    EXPECT_EQ(row.state, "ready");
    EXPECT_EQ(rebuild(row.base, row.delta), b3);
  }
  EXPECT_NE(made[0].base, made[1].base);
  for (const auto& row : made) EXPECT_TRUE(row.base == d1 || row.base == d2) << row.base;
}

TEST_F(DeltaMakerTest, RequestDeploymentWithoutANewBundleDoesNothing) {
  const std::string d1 = put_blob(random_bytes(8 << 10, 43));
  // The newest revision has no bundle; or it keeps the bundle of the one before.
  maker().request_deployment({revision(1, deployment_manifest(d1)), revision(2, "{}")});
  maker().request_deployment(
      {revision(1, deployment_manifest(d1)), revision(2, deployment_manifest(d1))});
  maker().request_deployment({});
  maker().request_deployment({revision(1, deployment_manifest(d1))});
  EXPECT_EQ(maker().status()["queued"], 0);
}

TEST_F(DeltaMakerTest, ZeroBasesTurnsDeltasOff) {
  const std::string b1 = random_bytes(64 << 10, 50);
  const std::string d1 = put_blob(b1);
  const std::string d2 = put_blob(changed(b1, 0.1, 51));
  ASSERT_TRUE(store_->put_model_version(version("1.0.0", 100, {variant(d1)})).has_value());
  ASSERT_TRUE(store_->put_model_version(version("1.1.0", 200, {variant(d2)})).has_value());
  options_.bases = 0;
  maker().request(d2, {d1});
  EXPECT_EQ(maker().status()["queued"], 0);
  EXPECT_EQ(maker().status()["enabled"], false);
  maker().start();  // no worker, so no catch-up either
  std::this_thread::sleep_for(100ms);
  EXPECT_THAT(rows(), IsEmpty());
  EXPECT_EQ(maker().status()["made"], 0);
}

TEST_F(DeltaMakerTest, CatchUpAtStartMakesWhatAStopLeftUnmade) {
  // Versions and revisions pushed while no worker ran (the server stopped before it got to
  // them): the store has them, but no artifact_deltas rows.
  const std::string m1 = random_bytes(64 << 10, 60);
  const std::string m2 = changed(m1, 0.1, 61);
  const std::string dm1 = put_blob(m1), dm2 = put_blob(m2);
  ASSERT_TRUE(store_->put_model_version(version("1.0.0", 100, {variant(dm1)})).has_value());
  ASSERT_TRUE(store_->put_model_version(version("1.1.0", 200, {variant(dm2)})).has_value());
  const std::string a1 = random_bytes(64 << 10, 62);
  const std::string a2 = changed(a1, 0.1, 63);
  const std::string da1 = put_blob(a1), da2 = put_blob(a2);
  for (const auto& bundle : {da1, da2}) {
    auto applied = store_->apply_deployment("line-monitor", deployment_manifest(bundle),
                                            sha256_hex(bundle), "tester", clock_.now_ms());
    ASSERT_TRUE(applied.has_value()) << applied.error().message;
  }
  ASSERT_THAT(rows(), IsEmpty());

  maker().start();
  // idle() must not say so before the catch-up has queued its work.
  wait_finished(0);
  EXPECT_EQ(maker().status()["made"], 2) << maker().status().dump();
  auto model = rows(dm2);
  ASSERT_EQ(model.size(), 1u);
  EXPECT_EQ(model[0].base, dm1);
  EXPECT_EQ(rebuild(dm1, model[0].delta), m2);
  auto bundle = rows(da2);
  ASSERT_EQ(bundle.size(), 1u);
  EXPECT_EQ(bundle[0].base, da1);
  EXPECT_EQ(rebuild(da1, bundle[0].delta), a2);
  EXPECT_EQ(notified_.load(), 1);

  // The next start finds every pair made: it makes nothing more.
  maker_.reset();
  notified_ = 0;
  maker().start();
  wait_finished(0);
  EXPECT_EQ(maker().status()["made"], 0);
  EXPECT_EQ(rows().size(), 2u);
  EXPECT_EQ(notified_.load(), 0);
}

}  // namespace
}  // namespace outpost::server::registry
