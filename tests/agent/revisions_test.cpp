// Tests for deployment revisions on disk: revision keys, the artifacts an entry needs, the
// pointer file, building a revision directory from verified artifacts, and cleanup.
#include "agent/activate/revisions.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "test_support.h"

#include "agent/activate/bundle.h"
#include "common/digest.h"

namespace outpost::agent {
namespace {

using namespace test_support;  // TempDir, read_text, write_text, exists, wait_until

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

json sample_entry(const std::string& model_digest = "sha256:" + std::string(64, 'a'),
                  const std::string& bundle_digest = "sha256:" + std::string(64, 'b')) {
  return {{"name", "cam"},
          {"revision", 3},
          {"model",
           {{"name", "defect-net"},
            {"version", "1.2"},
            {"variant",
             {{"index", 0},
              {"selector", json::object()},
              {"artifact", model_digest},
              {"format", "onnx"}}}}},
          {"workload", {{"bundle", bundle_digest}, {"command", {"./run.sh"}}}},
          {"config", {{"threshold", 0.5}, {"camera", "/dev/video0"}}}};
}

// ---------------------------------------------------------------------------------------
// revision_key / needed_artifacts

TEST(RevisionKeyTest, StableForTheSameEntry) {
  json entry = sample_entry();
  const std::string key = revision_key(entry);
  EXPECT_TRUE(std::regex_match(key, std::regex("r3-[0-9a-f]{10}"))) << key;
  EXPECT_EQ(revision_key(entry), key);
  EXPECT_EQ(revision_key(json::parse(entry.dump())), key);  // same content, another object
  EXPECT_EQ(revision_key(json::parse(entry.dump(2))), key);
}

TEST(RevisionKeyTest, ChangesWithRevisionOrAnyField) {
  const json base = sample_entry();
  const std::string key = revision_key(base);

  json revised = base;
  revised["revision"] = 4;
  EXPECT_TRUE(revision_key(revised).starts_with("r4-")) << revision_key(revised);
  EXPECT_NE(revision_key(revised), key);

  std::vector<json> variants;
  json e = base;
  e["model"]["variant"]["artifact"] = "sha256:" + std::string(64, 'c');  // another variant
  variants.push_back(e);
  e = base;
  e["model"]["variant"]["index"] = 1;
  variants.push_back(e);
  e = base;
  e["config"]["threshold"] = 0.6;
  variants.push_back(e);
  e = base;
  e["workload"]["command"] = {"./run.sh", "--fast"};
  variants.push_back(e);
  e = base;
  e["name"] = "cam2";
  variants.push_back(e);
  e = base;
  e["secrets"] = {{"token", "x"}};
  variants.push_back(e);
  for (const auto& v : variants) {
    EXPECT_NE(revision_key(v), key) << v.dump();
    EXPECT_TRUE(revision_key(v).starts_with("r3-"));
  }
}

TEST(NeededArtifactsTest, ListsModelVariantAndBundle) {
  const std::string model = "sha256:" + std::string(64, '1');
  const std::string bundle = "sha256:" + std::string(64, '2');
  EXPECT_THAT(needed_artifacts(sample_entry(model, bundle)), ElementsAre(model, bundle));

  json no_workload = sample_entry(model, bundle);
  no_workload.erase("workload");
  EXPECT_THAT(needed_artifacts(no_workload), ElementsAre(model));

  json no_model = sample_entry(model, bundle);
  no_model.erase("model");
  EXPECT_THAT(needed_artifacts(no_model), ElementsAre(bundle));

  json no_bundle = sample_entry(model, bundle);
  no_bundle["workload"].erase("bundle");
  EXPECT_THAT(needed_artifacts(no_bundle), ElementsAre(model));

  EXPECT_TRUE(needed_artifacts(json{{"name", "x"}, {"revision", 1}}).empty());
}

// offered_deltas: the desired document's top-level "deltas". Whatever is kept becomes a file
// name under artifacts/partial/ and a download URL, so only well-formed digests pass.
std::string digest(char c) { return "sha256:" + std::string(64, c); }

json offer(const json& base, const json& delta) {
  json o = {{"size", 100}};
  if (!base.is_null()) o["base"] = base;
  if (!delta.is_null()) o["delta"] = delta;
  return o;
}

TEST(OfferedDeltasTest, ParsesEveryWellFormedOfferInTheServersOrder) {
  const json doc = {
      {"device", "d-1"},
      {"deployments", json::array()},
      {"deltas",
       {{digest('a'), {offer(digest('1'), digest('2')), offer(digest('3'), digest('4'))}},
        {digest('b'), {offer(digest('5'), digest('6'))}}}}};
  auto offers = offered_deltas(doc);
  ASSERT_EQ(offers.size(), 2u);
  ASSERT_EQ(offers[digest('a')].size(), 2u);
  EXPECT_EQ(offers[digest('a')][0].base, digest('1'));
  EXPECT_EQ(offers[digest('a')][0].delta, digest('2'));
  EXPECT_EQ(offers[digest('a')][1].base, digest('3'));
  EXPECT_EQ(offers[digest('a')][1].delta, digest('4'));
  ASSERT_EQ(offers[digest('b')].size(), 1u);
  EXPECT_EQ(offers[digest('b')][0].base, digest('5'));
  EXPECT_EQ(offers[digest('b')][0].delta, digest('6'));
}

TEST(OfferedDeltasTest, IgnoresMalformedOffersAndKeepsTheGoodOnes) {
  const std::string traversal = "sha256:../../../etc/passwd" + std::string(45, 'a');
  const std::string upper = "sha256:" + std::string(64, 'A');
  json deltas = {
      // One good offer among bad ones: only it is kept.
      {digest('a'),
       {offer(digest('1'), digest('2')), offer(nullptr, digest('3')),  // no base
        offer(digest('4'), nullptr),                                   // no delta
        offer(42, digest('5')),                                        // base not a string
        offer(digest('6'), json::array({digest('7')})),                // delta not a string
        offer("model.onnx", digest('8')),                              // not digests
        offer(digest('9'), traversal),                                 //
        offer(upper, digest('c')),                                     //
        offer(digest('d'), "sha256:" + std::string(63, 'e')),
        "sha256:" + std::string(64, 'f'),  // an offer that is not an object
        nullptr}},
      // Targets that are not digests, and offer lists that are not lists.
      {"model.onnx", {offer(digest('1'), digest('2'))}},
      {traversal, {offer(digest('1'), digest('2'))}},
      {digest('b'), offer(digest('1'), digest('2'))},
      {digest('c'), "sha256:" + std::string(64, '2')},
      // Only malformed offers: the target is left out altogether.
      {digest('d'), {offer(digest('1'), "x")}},
  };
  auto offers = offered_deltas(json{{"deltas", deltas}});
  ASSERT_EQ(offers.size(), 1u);
  ASSERT_TRUE(offers.contains(digest('a')));
  ASSERT_EQ(offers[digest('a')].size(), 1u);
  EXPECT_EQ(offers[digest('a')][0].base, digest('1'));
  EXPECT_EQ(offers[digest('a')][0].delta, digest('2'));
}

TEST(OfferedDeltasTest, NoDeltasOrTheWrongShapeGiveNone) {
  EXPECT_TRUE(offered_deltas(json{{"device", "d-1"}, {"deployments", json::array()}}).empty());
  EXPECT_TRUE(offered_deltas(json{{"deltas", nullptr}}).empty());
  EXPECT_TRUE(offered_deltas(json{{"deltas", json::array({digest('a')})}}).empty());
  EXPECT_TRUE(offered_deltas(json{{"deltas", "sha256:" + std::string(64, 'a')}}).empty());
  EXPECT_TRUE(offered_deltas(json::array({json{{"deltas", json::object()}}})).empty());
  EXPECT_TRUE(offered_deltas(json()).empty());
}

TEST(RevisionKeyTest, MalformedEntriesDoNotThrow) {
  // Entries come from a signed desired state, but a server bug or version skew must not end
  // the agent with an exception (it would recur on every restart from desired.json).
  json string_revision = sample_entry();
  string_revision["revision"] = "3";
  EXPECT_NO_THROW((void)revision_key(string_revision));
  json numeric_artifact = sample_entry();
  numeric_artifact["model"]["variant"]["artifact"] = 42;
  EXPECT_NO_THROW((void)needed_artifacts(numeric_artifact));
  json array_variant = sample_entry();
  array_variant["model"]["variant"] = json::array();
  EXPECT_NO_THROW((void)needed_artifacts(array_variant));
}

// ---------------------------------------------------------------------------------------
// DeploymentDir: pointers

TEST(DeploymentDirTest, MissingStateIsNoPointers) {
  TempDir dir;
  DeploymentDir deployment(dir.path(), "cam");
  EXPECT_EQ(deployment.path(), dir.path() + "/deployments/cam");
  auto p = deployment.load();
  ASSERT_TRUE(p.has_value()) << p.error().message;
  EXPECT_EQ(p->current, "");
  EXPECT_EQ(p->previous, "");
  EXPECT_FALSE(p->trial);
  EXPECT_TRUE(p->failed.empty());
}

TEST(DeploymentDirTest, SaveLoadRoundTrip) {
  TempDir dir;
  DeploymentDir deployment(dir.path(), "cam");
  DeploymentPointers saved;
  saved.current = "r4-0123456789";
  saved.previous = "r3-abcdefabcd";
  saved.trial = true;
  saved.failed = {{"r2-1111111111", "health check failed 3 times"}, {"r1-2222222222", "exit 1"}};
  ASSERT_TRUE(deployment.save(saved).has_value());
  EXPECT_TRUE(fs::exists(deployment.path() + "/state.json"));

  auto loaded = DeploymentDir(dir.path(), "cam").load();
  ASSERT_TRUE(loaded.has_value()) << loaded.error().message;
  EXPECT_EQ(loaded->current, saved.current);
  EXPECT_EQ(loaded->previous, saved.previous);
  EXPECT_TRUE(loaded->trial);
  EXPECT_EQ(loaded->failed, saved.failed);

  // Rewritten: the latest pointers win, nothing of the old ones lingers.
  DeploymentPointers next;
  next.current = saved.previous;
  ASSERT_TRUE(deployment.save(next).has_value());
  loaded = deployment.load();
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->current, "r3-abcdefabcd");
  EXPECT_EQ(loaded->previous, "");
  EXPECT_FALSE(loaded->trial);
  EXPECT_TRUE(loaded->failed.empty());
  EXPECT_THAT(names_in(deployment.path()), ElementsAre("state.json"));  // no temp files
}

TEST(DeploymentDirTest, CorruptStateIsAnError) {
  TempDir dir;
  DeploymentDir deployment(dir.path(), "cam");
  write_text(deployment.path() + "/state.json", "{\"current\":");
  EXPECT_FALSE(deployment.load().has_value());
}

// ---------------------------------------------------------------------------------------
// DeploymentDir: prepare

class PrepareTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(store_.init().has_value());
    // The model blob, as the fetcher would leave it: verified, under its digest.
    model_bytes_ = std::string(5'000, 'm') + "end of model";
    model_digest_ = "sha256:" + sha256_hex(model_bytes_);
    write_text(store_.path(model_digest_), model_bytes_);
    // The app bundle, made with create_bundle.
    const std::string src = dir_.path() + "/bundle-src";
    write_text(src + "/run.sh", "#!/bin/sh\necho hello\n");
    ASSERT_EQ(::chmod((src + "/run.sh").c_str(), 0755), 0);
    write_text(src + "/data/labels.txt", "ok\ndefect\n");
    const std::string archive = dir_.path() + "/bundle.tar.zst";
    ASSERT_TRUE(create_bundle(src, archive).has_value());
    auto hex = sha256_file_hex(archive);
    ASSERT_TRUE(hex.has_value());
    bundle_digest_ = "sha256:" + *hex;
    fs::rename(archive, store_.path(bundle_digest_));
  }

  TempDir dir_;
  ArtifactStore store_{dir_.path()};
  std::string model_bytes_;
  std::string model_digest_;
  std::string bundle_digest_;
};

TEST_F(PrepareTest, BuildsRevisionFromVerifiedArtifacts) {
  const json entry = sample_entry(model_digest_, bundle_digest_);
  const std::string key = revision_key(entry);
  DeploymentDir deployment(dir_.path(), "cam");
  EXPECT_FALSE(deployment.prepared(key));
  auto prepared = deployment.prepare(key, entry, store_);
  ASSERT_TRUE(prepared.has_value()) << prepared.error().message;
  EXPECT_TRUE(deployment.prepared(key));
  const std::string rev = deployment.revision_path(key);
  EXPECT_EQ(rev, deployment.path() + "/" + key);

  // The model, under a name a runtime recognises, hard-linked to the verified blob.
  const std::string model = rev + "/model/defect-net.onnx";
  EXPECT_EQ(deployment.model_path(key, entry), model);
  ASSERT_TRUE(fs::exists(model));
  EXPECT_EQ(read_text(model), model_bytes_);
  struct stat blob_st {};
  struct stat model_st {};
  ASSERT_EQ(::stat(store_.path(model_digest_).c_str(), &blob_st), 0);
  ASSERT_EQ(::stat(model.c_str(), &model_st), 0);
  EXPECT_EQ(model_st.st_ino, blob_st.st_ino);
  EXPECT_EQ(model_st.st_dev, blob_st.st_dev);

  // The bundle, unpacked into app/.
  EXPECT_EQ(read_text(rev + "/app/run.sh"), "#!/bin/sh\necho hello\n");
  EXPECT_EQ(read_text(rev + "/app/data/labels.txt"), "ok\ndefect\n");
  struct stat run_st {};
  ASSERT_EQ(::stat((rev + "/app/run.sh").c_str(), &run_st), 0);
  EXPECT_NE(run_st.st_mode & S_IXUSR, 0u);

  // config.json is the entry's config; entry.json the entry itself.
  EXPECT_EQ(json::parse(read_text(rev + "/config.json")), entry["config"]);
  EXPECT_EQ(json::parse(read_text(rev + "/entry.json")), entry);
  auto read_back = deployment.entry(key);
  ASSERT_TRUE(read_back.has_value()) << read_back.error().message;
  EXPECT_EQ(*read_back, entry);

  EXPECT_THAT(names_in(rev), ElementsAre("app", "config.json", "entry.json", "model"));
  EXPECT_FALSE(fs::exists(rev + ".tmp"));
  EXPECT_THAT(names_in(deployment.path()), ElementsAre(key));

  // Idempotent.
  EXPECT_TRUE(deployment.prepare(key, entry, store_).has_value());
  EXPECT_EQ(read_text(model), model_bytes_);
}

TEST_F(PrepareTest, EntryWithoutModelOrBundle) {
  json entry = {{"name", "job"},
                {"revision", 1},
                {"workload", {{"command", {"/bin/true"}}}},
                {"config", json::object()}};
  const std::string key = revision_key(entry);
  DeploymentDir deployment(dir_.path(), "job");
  auto prepared = deployment.prepare(key, entry, store_);
  ASSERT_TRUE(prepared.has_value()) << prepared.error().message;
  const std::string rev = deployment.revision_path(key);
  EXPECT_EQ(deployment.model_path(key, entry), "");
  EXPECT_FALSE(fs::exists(rev + "/model"));
  EXPECT_TRUE(fs::is_directory(rev + "/app"));
  EXPECT_TRUE(names_in(rev + "/app").empty());
  EXPECT_EQ(json::parse(read_text(rev + "/config.json")), json::object());
}

TEST_F(PrepareTest, MissingModelArtifactLeavesNothing) {
  const std::string absent = "sha256:" + std::string(64, 'e');
  const json entry = sample_entry(absent, bundle_digest_);
  const std::string key = revision_key(entry);
  DeploymentDir deployment(dir_.path(), "cam");
  auto prepared = deployment.prepare(key, entry, store_);
  ASSERT_FALSE(prepared.has_value());
  EXPECT_EQ(prepared.error().code, Errc::kNotFound);
  EXPECT_THAT(prepared.error().message, HasSubstr(absent));
  EXPECT_THAT(prepared.error().message, HasSubstr(key));
  EXPECT_FALSE(deployment.prepared(key));
  EXPECT_FALSE(fs::exists(deployment.revision_path(key)));
  EXPECT_FALSE(fs::exists(deployment.revision_path(key) + ".tmp"));
}

TEST_F(PrepareTest, MissingBundleLeavesNothing) {
  // The model is linked first; the missing bundle must still undo it.
  const std::string absent = "sha256:" + std::string(64, 'f');
  const json entry = sample_entry(model_digest_, absent);
  const std::string key = revision_key(entry);
  DeploymentDir deployment(dir_.path(), "cam");
  auto prepared = deployment.prepare(key, entry, store_);
  ASSERT_FALSE(prepared.has_value());
  EXPECT_THAT(prepared.error().message, HasSubstr(absent));
  EXPECT_FALSE(fs::exists(deployment.revision_path(key)));
  EXPECT_FALSE(fs::exists(deployment.revision_path(key) + ".tmp"));
  EXPECT_TRUE(store_.has(model_digest_));  // the blob itself is untouched
}

TEST_F(PrepareTest, RefusedBundleLeavesNothing) {
  // A "bundle" that is not an archive: unpacking fails, the build is removed.
  const std::string junk = "not a tar archive";
  const std::string junk_digest = "sha256:" + sha256_hex(junk);
  write_text(store_.path(junk_digest), junk);
  const json entry = sample_entry(model_digest_, junk_digest);
  const std::string key = revision_key(entry);
  DeploymentDir deployment(dir_.path(), "cam");
  ASSERT_FALSE(deployment.prepare(key, entry, store_).has_value());
  EXPECT_FALSE(fs::exists(deployment.revision_path(key)));
  EXPECT_FALSE(fs::exists(deployment.revision_path(key) + ".tmp"));
}

TEST_F(PrepareTest, LeftoverTmpBuildIsReplaced) {
  // A crash mid-build left <key>.tmp with junk; the next prepare starts clean.
  const json entry = sample_entry(model_digest_, bundle_digest_);
  const std::string key = revision_key(entry);
  DeploymentDir deployment(dir_.path(), "cam");
  write_text(deployment.revision_path(key) + ".tmp/app/stale.txt", "old");
  ASSERT_TRUE(deployment.prepare(key, entry, store_).has_value());
  EXPECT_FALSE(fs::exists(deployment.revision_path(key) + "/app/stale.txt"));
  EXPECT_FALSE(fs::exists(deployment.revision_path(key) + ".tmp"));
  EXPECT_TRUE(fs::exists(deployment.revision_path(key) + "/app/run.sh"));
}

// ---------------------------------------------------------------------------------------
// DeploymentDir: cleanup

TEST(DeploymentDirTest, RemoveExceptKeepsListedStateAndLogs) {
  TempDir dir;
  DeploymentDir deployment(dir.path(), "cam");
  DeploymentPointers pointers;
  pointers.current = "r2-aaaaaaaaaa";
  pointers.previous = "r1-bbbbbbbbbb";
  ASSERT_TRUE(deployment.save(pointers).has_value());
  for (const char* key : {"r1-bbbbbbbbbb", "r2-aaaaaaaaaa", "r0-cccccccccc", "r3-dddddddddd.tmp"}) {
    write_text(deployment.revision_path(key) + "/entry.json", "{}");
  }
  write_text(deployment.path() + "/logs/workload.log", "line\n");

  deployment.remove_except({"r2-aaaaaaaaaa", "r1-bbbbbbbbbb"});
  EXPECT_THAT(names_in(deployment.path()),
              ElementsAre("logs", "r1-bbbbbbbbbb", "r2-aaaaaaaaaa", "state.json"));
  EXPECT_EQ(read_text(deployment.path() + "/logs/workload.log"), "line\n");
  EXPECT_TRUE(fs::exists(deployment.revision_path("r2-aaaaaaaaaa") + "/entry.json"));
  auto loaded = deployment.load();
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->current, "r2-aaaaaaaaaa");

  deployment.remove_except({});
  EXPECT_THAT(names_in(deployment.path()), ElementsAre("logs", "state.json"));
}

TEST(DeploymentDirTest, ListAndRemoveDeploymentDirs) {
  TempDir dir;
  EXPECT_TRUE(list_deployment_dirs(dir.path()).empty());
  ASSERT_TRUE(DeploymentDir(dir.path(), "cam").save({}).has_value());
  ASSERT_TRUE(DeploymentDir(dir.path(), "gate").save({}).has_value());
  EXPECT_THAT(list_deployment_dirs(dir.path()), UnorderedElementsAre("cam", "gate"));
  remove_deployment_dir(dir.path(), "cam");
  EXPECT_THAT(list_deployment_dirs(dir.path()), UnorderedElementsAre("gate"));
  EXPECT_FALSE(fs::exists(dir.path() + "/deployments/cam"));
}

}  // namespace
}  // namespace outpost::agent
