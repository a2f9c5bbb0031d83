// Deltas (common/zstd_delta): a patch-from delta rebuilds the target byte for byte, is far
// smaller than the target when little changed, and a corrupt delta, a wrong base or a frame
// that declares too much is refused rather than written.
#include "common/zstd_delta.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "common/crypto.h"
#include "common/digest.h"
#include "common/durable_file.h"

namespace outpost::delta {
namespace {

namespace fs = std::filesystem;

class DeltaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("outpost-delta-" + crypto::random_hex(6));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  void write(const std::string& name, const std::string& bytes) {
    ASSERT_TRUE(write_file_durably(path(name), bytes));
  }
  fs::path dir_;
};

// Random float weights (as bytes), the hard case for a compressor: no redundancy inside.
std::string random_weights(size_t floats, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::string out(floats * sizeof(float), '\0');
  for (size_t i = 0; i < floats; ++i) {
    float f = dist(rng);
    std::memcpy(out.data() + i * sizeof(float), &f, sizeof f);
  }
  return out;
}

// Changes `fraction` of the floats (in runs, as fine-tuning a few layers does).
std::string change_weights(std::string bytes, double fraction, uint32_t seed) {
  const size_t floats = bytes.size() / sizeof(float);
  const size_t run = 1024;
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  const size_t runs = static_cast<size_t>(static_cast<double>(floats) * fraction) / run;
  for (size_t r = 0; r < runs; ++r) {
    const size_t start = (r * (floats / std::max<size_t>(runs, 1))) / run * run;
    for (size_t i = start; i < start + run && i < floats; ++i) {
      float f = dist(rng);
      std::memcpy(bytes.data() + i * sizeof(float), &f, sizeof f);
    }
  }
  return bytes;
}

TEST_F(DeltaTest, RebuildsTheTargetAndIsSmallWhenLittleChanged) {
  const std::string base = random_weights(1 << 20, 1);  // 4 MiB
  const std::string target = change_weights(base, 0.10, 2);
  ASSERT_NE(base, target);
  write("base", base);
  write("target", target);
  auto made = make_delta(path("base"), path("target"), path("delta"), {.level = 9});
  ASSERT_TRUE(made) << made.error().message;
  EXPECT_EQ(made->target_bytes, static_cast<int64_t>(target.size()));
  EXPECT_EQ(made->delta_bytes, static_cast<int64_t>(fs::file_size(path("delta"))));
  // 10% of the weights changed: the delta carries about that, not the whole file.
  EXPECT_LT(made->delta_bytes, static_cast<int64_t>(target.size() * 0.15)) << made->delta_bytes;

  auto applied = apply_delta(path("base"), path("delta"), path("out"), target.size());
  ASSERT_TRUE(applied) << applied.error().message;
  EXPECT_EQ(applied->output_bytes, static_cast<int64_t>(target.size()));
  EXPECT_EQ(applied->sha256_hex, sha256_hex(target));
  auto out = read_file(path("out"));
  ASSERT_TRUE(out);
  EXPECT_EQ(*out, target);
}

TEST_F(DeltaTest, UnrelatedOrEmptyInputsStillRoundTrip) {
  write("a", random_weights(10000, 3));
  write("b", "a bundle that shares nothing with its base");
  write("empty", "");
  for (auto [base, target] :
       {std::pair{"a", "b"}, std::pair{"empty", "a"}, std::pair{"a", "empty"}}) {
    SCOPED_TRACE(std::string(base) + " -> " + target);
    auto made = make_delta(path(base), path(target), path("d"));
    ASSERT_TRUE(made) << made.error().message;
    auto applied = apply_delta(path(base), path("d"), path("o"), 1 << 20);
    ASSERT_TRUE(applied) << applied.error().message;
    EXPECT_EQ(applied->sha256_hex, sha256_hex(*read_file(path(target))));
  }
}

TEST_F(DeltaTest, RefusesCorruptDeltasWrongBasesAndOversizedFrames) {
  const std::string base = random_weights(1 << 16, 4);
  write("base", base);
  write("target", change_weights(base, 0.05, 5));
  ASSERT_TRUE(make_delta(path("base"), path("target"), path("delta")));
  const std::string good = *read_file(path("delta"));

  // A flipped byte in the middle: zstd's checksum (or its decoder) notices.
  std::string bad = good;
  bad[bad.size() / 2] ^= 0x5a;
  write("bad", bad);
  auto corrupt = apply_delta(path("base"), path("bad"), path("out"), 1 << 20);
  if (corrupt) {
    // A flip zstd cannot see still cannot give the target's digest.
    EXPECT_NE(corrupt->sha256_hex, sha256_hex(*read_file(path("target"))));
  } else {
    EXPECT_EQ(corrupt.error().code, Errc::kIo) << corrupt.error().message;
  }

  // The right delta against another base does not rebuild the target.
  write("other", random_weights(1 << 16, 6));
  auto wrong = apply_delta(path("other"), path("delta"), path("out"), 1 << 20);
  if (wrong) {
    EXPECT_NE(wrong->sha256_hex, sha256_hex(*read_file(path("target"))));
  }

  // Frames that declare more than the caller expects are refused before writing.
  auto big = apply_delta(path("base"), path("delta"), path("out2"), 100);
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, Errc::kInvalidArgument);
  EXPECT_NE(big.error().message.find("more than 100"), std::string::npos) << big.error().message;
  EXPECT_FALSE(fs::exists(path("out2")));

  // Not zstd at all; and a delta with bytes after its frame.
  write("junk", "not a zstd frame");
  EXPECT_FALSE(apply_delta(path("base"), path("junk"), path("o"), 1 << 20));
  write("trailing", good + "x");
  auto trailing = apply_delta(path("base"), path("trailing"), path("o"), 1 << 20);
  ASSERT_FALSE(trailing);
  EXPECT_NE(trailing.error().message.find("one zstd frame"), std::string::npos);

  auto missing = make_delta(path("nope"), path("target"), path("d"));
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, Errc::kNotFound);
}

}  // namespace
}  // namespace outpost::delta
