// The agent's side of secrets (issue 18): sealed versions from the desired document, which one is
// in force when, opening with the device key, and the files a workload reads.
#include "agent/secrets/secret_files.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include <gtest/gtest.h>

#include "common/durable_file.h"

namespace outpost::agent {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

json sealed_version(int64_t version, int64_t activate_at, const std::string& name,
                    const std::string& password, const std::string& public_key) {
  json payload = {{"name", name},
                  {"version", version},
                  {"data", {{"password", crypto::base64_encode(password)}}}};
  auto sealed = crypto::seal_to_ed25519(payload.dump(), public_key);
  EXPECT_TRUE(sealed.has_value());
  return {{"version", version},
          {"activate_at", activate_at},
          {"sealed", crypto::base64_encode(sealed.value_or(""))}};
}

mode_t mode_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
  return st.st_mode & 0777;
}

TEST(SecretFilesTest, VersionsSwitchAtTheirTimeAndOpenOnlyWithTheDeviceKey) {
  auto device = crypto::ed25519_generate();
  auto other = crypto::ed25519_generate();
  json doc = {{"secrets",
               {{"camera",
                 {sealed_version(2, 5000, "camera", "pw-two", device.public_key),
                  sealed_version(1, 1000, "camera", "pw-one", device.public_key)}},
                {"../evil", {sealed_version(1, 0, "x", "x", device.public_key)}}}}};
  SealedSecrets secrets = sealed_secrets_of(doc);
  ASSERT_EQ(secrets.size(), 1u);  // the unsafe name is left out
  const auto& camera = secrets.at("camera");
  ASSERT_EQ(camera.size(), 2u);
  EXPECT_EQ(camera[0].version, 1);  // sorted

  EXPECT_EQ(active_secret_version(camera, 999), nullptr);
  EXPECT_EQ(active_secret_version(camera, 1000)->version, 1);
  EXPECT_EQ(staged_secret_version(camera, 1000)->version, 2);
  EXPECT_EQ(next_secret_activation(secrets, 1000), 5000);
  EXPECT_EQ(active_secret_version(camera, 4999)->version, 1);
  EXPECT_EQ(active_secret_version(camera, 5000)->version, 2);
  EXPECT_EQ(staged_secret_version(camera, 5000), nullptr);
  EXPECT_EQ(next_secret_activation(secrets, 5000), 0);

  auto opened = open_secret_version("camera", camera[1], device);
  ASSERT_TRUE(opened.has_value()) << opened.error().message;
  EXPECT_EQ(opened->at("password"), "pw-two");
  EXPECT_FALSE(open_secret_version("camera", camera[1], other).has_value());
  // A payload sealed for another secret or version is refused even with the right key.
  EXPECT_FALSE(open_secret_version("other", camera[1], device).has_value());
  SealedSecretVersion relabelled = camera[1];
  relabelled.version = 7;
  EXPECT_FALSE(open_secret_version("camera", relabelled, device).has_value());
}

TEST(SecretFilesTest, FilesArePrivateAndASwitchReplacesAllKeysAtOnce) {
  const std::string root = fs::temp_directory_path() / ("outpost-secrets-" + crypto::random_hex(4));
  fs::create_directories(root);
  bool on_tmpfs = true;
  auto base = prepare_secrets_base(root + "/run", root + "/data", "d-1", &on_tmpfs);
  ASSERT_TRUE(base.has_value()) << base.error().message;
  EXPECT_EQ(*base, root + "/run/outpost-agent-d-1");
  EXPECT_EQ(mode_of(*base), 0700u);

  SecretFiles files(*base + "/line");
  ASSERT_TRUE(files.write("camera", 1, {{"password", "pw-one"}, {"user", "cam"}}).has_value());
  ASSERT_TRUE(files.write("db", 4, {{"url", "postgres://x"}}).has_value());
  EXPECT_EQ(mode_of(files.dir()), 0700u);
  EXPECT_EQ(outpost::read_file(files.dir() + "/camera/password").value_or(""), "pw-one");
  EXPECT_EQ(mode_of(fs::canonical(files.dir() + "/camera/password").string()), 0400u);

  ASSERT_TRUE(files.write("camera", 2, {{"password", "pw-two"}}).has_value());
  EXPECT_EQ(outpost::read_file(files.dir() + "/camera/password").value_or(""), "pw-two");
  EXPECT_FALSE(fs::exists(files.dir() + "/camera/user"));  // the new version's keys only
  EXPECT_FALSE(fs::exists(files.dir() + "/.camera.v1"));   // the old version is gone

  files.remove_except({"camera"});
  EXPECT_FALSE(fs::exists(files.dir() + "/db"));
  EXPECT_TRUE(fs::exists(files.dir() + "/camera/password"));
  files.remove_all();
  EXPECT_FALSE(fs::exists(files.dir()));

  // Not a folder of ours: refused.
  fs::create_directories(root + "/elsewhere");
  fs::create_directory_symlink(root + "/elsewhere", root + "/run2");
  fs::create_directories(root + "/run3");
  fs::create_directory_symlink(root + "/elsewhere", root + "/run3/outpost-agent-d-1");
  EXPECT_FALSE(prepare_secrets_base(root + "/run3", root + "/data", "d-1", nullptr).has_value());
  EXPECT_FALSE(files.write("../x", 1, {{"k", "v"}}).has_value());
  EXPECT_EQ(secret_env_name("camera.main", "pass-word"), "OUTPOST_SECRET_CAMERA_MAIN_PASS_WORD");
  fs::remove_all(root);
}

}  // namespace
}  // namespace outpost::agent
