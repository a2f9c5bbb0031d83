// App bundles: create/unpack round trip, reproducible bytes, and refusal of hostile archives
// (built here with libarchive's write API, since create_bundle never makes them).
#include "agent/activate/bundle.h"

#include <archive.h>
#include <archive_entry.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/digest.h"

namespace outpost::agent {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

void write_file(const fs::path& path, const std::string& contents, mode_t mode = 0644) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << contents;
  ASSERT_EQ(::chmod(path.c_str(), mode), 0) << path;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

mode_t mode_of(const fs::path& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

// Writes tar archives entry by entry, hostile ones included.
class TarWriter {
 public:
  enum class Filter { kNone, kGzip, kZstd };

  explicit TarWriter(const fs::path& path, Filter filter = Filter::kZstd)
      : a_(archive_write_new()) {
    archive_write_set_format_pax_restricted(a_);
    if (filter == Filter::kGzip) archive_write_add_filter_gzip(a_);
    if (filter == Filter::kZstd) archive_write_add_filter_zstd(a_);
    EXPECT_EQ(archive_write_open_filename(a_, path.c_str()), ARCHIVE_OK);
  }
  ~TarWriter() { archive_write_free(a_); }
  TarWriter(const TarWriter&) = delete;
  TarWriter& operator=(const TarWriter&) = delete;

  TarWriter& file(const std::string& name, const std::string& data, mode_t perm = 0644) {
    return add(
        name, AE_IFREG, perm,
        [&](archive_entry* e) { archive_entry_set_size(e, static_cast<la_int64_t>(data.size())); },
        data);
  }
  TarWriter& dir(const std::string& name, mode_t perm = 0755) {
    return add(name, AE_IFDIR, perm, [](archive_entry*) {});
  }
  TarWriter& symlink(const std::string& name, const std::string& target) {
    return add(name, AE_IFLNK, 0777,
               [&](archive_entry* e) { archive_entry_copy_symlink(e, target.c_str()); });
  }
  TarWriter& hardlink(const std::string& name, const std::string& target) {
    return add(name, AE_IFREG, 0644,
               [&](archive_entry* e) { archive_entry_copy_hardlink(e, target.c_str()); });
  }
  TarWriter& char_device(const std::string& name) {
    return add(name, AE_IFCHR, 0666,
               [](archive_entry* e) { archive_entry_set_rdev(e, makedev(1, 3)); });
  }
  void close() { EXPECT_EQ(archive_write_close(a_), ARCHIVE_OK); }

 private:
  TarWriter& add(const std::string& name, mode_t type, mode_t perm,
                 const std::function<void(archive_entry*)>& set, const std::string& data = "") {
    archive_entry* e = archive_entry_new();
    archive_entry_copy_pathname(e, name.c_str());
    archive_entry_set_filetype(e, type);
    archive_entry_set_perm(e, perm);
    set(e);
    EXPECT_EQ(archive_write_header(a_, e), ARCHIVE_OK) << name << ": " << archive_error_string(a_);
    if (!data.empty()) {
      EXPECT_EQ(archive_write_data(a_, data.data(), data.size()),
                static_cast<la_ssize_t>(data.size()));
    }
    archive_entry_free(e);
    return *this;
  }
  archive* a_;
};

class BundleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "bundle_test.XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    archive_ = root_ / "bundle.tar.zst";
    dest_ = root_ / "out" / "app";
  }
  void TearDown() override { fs::remove_all(root_); }

  // Unpacks archive_ into dest_ and expects a refusal naming `expected`; nothing may remain.
  void expect_refused(const std::string& expected, const UnpackLimits& limits = {}) {
    auto result = unpack_bundle(archive_, dest_, limits);
    ASSERT_FALSE(result.has_value()) << "unpacked " << result->files << " files";
    EXPECT_EQ(result.error().code, Errc::kInvalidArgument) << result.error().message;
    EXPECT_THAT(result.error().message, HasSubstr(expected));
    EXPECT_FALSE(fs::exists(fs::symlink_status(dest_))) << dest_;
  }

  fs::path root_;
  fs::path archive_;
  fs::path dest_;
};

TEST_F(BundleTest, RoundTripKeepsContentExecBitsAndRelativeSymlinks) {
  fs::path src = root_ / "src";
  write_file(src / "bin" / "run.sh", "#!/bin/sh\necho hello\n", 0755);
  write_file(src / "etc" / "config.json", "{\"threshold\": 0.8}\n", 0600);
  write_file(src / "lib" / "libx.so.1", std::string(100'000, 'x'));
  fs::create_symlink("libx.so.1", src / "lib" / "libx.so");
  fs::create_symlink("../lib", src / "bin" / "lib");
  fs::create_directories(src / "empty");

  ASSERT_TRUE(create_bundle(src, archive_).has_value());
  auto summary = unpack_bundle(archive_, dest_);
  ASSERT_TRUE(summary.has_value()) << summary.error().message;
  EXPECT_EQ(summary->files, 3);
  EXPECT_EQ(summary->directories, 4);  // bin, empty, etc, lib
  EXPECT_EQ(summary->symlinks, 2);
  EXPECT_EQ(summary->bytes, 21 + 19 + 100'000);

  EXPECT_EQ(read_file(dest_ / "bin" / "run.sh"), "#!/bin/sh\necho hello\n");
  EXPECT_EQ(read_file(dest_ / "etc" / "config.json"), "{\"threshold\": 0.8}\n");
  EXPECT_EQ(read_file(dest_ / "lib" / "libx.so.1"), std::string(100'000, 'x'));
  EXPECT_EQ(mode_of(dest_ / "bin" / "run.sh"), 0755u);
  EXPECT_EQ(mode_of(dest_ / "etc" / "config.json"), 0644u);  // normalized by create_bundle
  EXPECT_EQ(fs::read_symlink(dest_ / "lib" / "libx.so"), "libx.so.1");
  EXPECT_EQ(fs::read_symlink(dest_ / "bin" / "lib"), "../lib");
  EXPECT_EQ(read_file(dest_ / "bin" / "lib" / "libx.so"), std::string(100'000, 'x'));
  EXPECT_TRUE(fs::is_directory(dest_ / "empty"));
}

TEST_F(BundleTest, CreateIsReproducible) {
  fs::path src = root_ / "src";
  write_file(src / "b.txt", "b");
  write_file(src / "a" / "model.onnx", "weights", 0755);
  fs::create_symlink("a/model.onnx", src / "current");
  ASSERT_TRUE(create_bundle(src, root_ / "one.tar.zst").has_value());
  // Same tree, other mtimes: same bytes.
  fs::last_write_time(src / "b.txt", fs::file_time_type::clock::now() - std::chrono::hours(5));
  ASSERT_TRUE(create_bundle(src.string() + "/", root_ / "two.tar.zst").has_value());
  auto one = sha256_file_hex(root_ / "one.tar.zst");
  auto two = sha256_file_hex(root_ / "two.tar.zst");
  ASSERT_TRUE(one.has_value() && two.has_value());
  EXPECT_EQ(*one, *two);
  EXPECT_FALSE(fs::exists(root_ / ("one.tar.zst.tmp." + std::to_string(::getpid()))));
}

TEST_F(BundleTest, CreateRefusesSymlinksThatLeaveTheTree) {
  fs::path src = root_ / "src";
  write_file(src / "a", "a");
  fs::create_symlink("/etc/passwd", src / "passwd");
  auto absolute = create_bundle(src, archive_);
  ASSERT_FALSE(absolute.has_value());
  EXPECT_THAT(absolute.error().message, HasSubstr("symlink target /etc/passwd is absolute"));
  EXPECT_FALSE(fs::exists(archive_));
  fs::remove(src / "passwd");
  fs::create_symlink("../../x", src / "up");
  auto up = create_bundle(src, archive_);
  ASSERT_FALSE(up.has_value());
  EXPECT_THAT(up.error().message, HasSubstr("escapes the bundle directory"));
}

TEST_F(BundleTest, AcceptsGzipAndPlainTar) {
  for (auto filter : {TarWriter::Filter::kGzip, TarWriter::Filter::kNone}) {
    {
      TarWriter tar(archive_, filter);
      tar.dir("./").dir("./bin").file("./bin/app", "binary", 0755).close();
    }
    auto summary = unpack_bundle(archive_, dest_);
    ASSERT_TRUE(summary.has_value()) << summary.error().message;
    EXPECT_EQ(summary->files, 1);
    EXPECT_EQ(summary->directories, 1);
    EXPECT_EQ(read_file(dest_ / "bin" / "app"), "binary");
    fs::remove_all(dest_);
  }
}

TEST_F(BundleTest, UnpacksIntoAnExistingEmptyDirectoryAndKeepsHardLinksInside) {
  {
    TarWriter tar(archive_);
    tar.file("data/a", "shared").hardlink("data/b", "data/a").close();
  }
  fs::create_directories(dest_);
  auto summary = unpack_bundle(archive_, dest_);
  ASSERT_TRUE(summary.has_value()) << summary.error().message;
  EXPECT_EQ(summary->files, 2);
  EXPECT_EQ(read_file(dest_ / "data" / "b"), "shared");
  EXPECT_EQ(fs::hard_link_count(dest_ / "data" / "a"), 2u);
}

TEST_F(BundleTest, RefusesDotDotEntries) {
  {
    TarWriter tar(archive_);
    tar.file("ok", "fine").file("../x", "evil").close();
  }
  expect_refused("bundle entry ../x: escapes the bundle directory");
  EXPECT_FALSE(fs::exists(dest_.parent_path() / "x"));
}

TEST_F(BundleTest, RefusesAbsolutePaths) {
  fs::path outside = root_ / "absolute-x";
  {
    TarWriter tar(archive_);
    tar.file("ok", "fine").file(outside.string(), "evil").close();
  }
  expect_refused("bundle entry " + outside.string() + ": is an absolute path");
  EXPECT_FALSE(fs::exists(outside));
  {
    TarWriter tar(archive_);
    tar.file("/tmp/x", "evil").close();
  }
  expect_refused("bundle entry /tmp/x: is an absolute path");
}

TEST_F(BundleTest, RefusesSymlinkToAnAbsolutePath) {
  {
    TarWriter tar(archive_);
    tar.file("ok", "fine").symlink("passwd", "/etc/passwd").close();
  }
  expect_refused("bundle entry passwd: symlink target /etc/passwd is absolute");
}

TEST_F(BundleTest, RefusesSymlinksThatClimbOut) {
  {
    TarWriter tar(archive_);
    tar.symlink("a", "../../x").close();
  }
  expect_refused("bundle entry a: symlink target ../../x escapes the bundle directory");
  {
    TarWriter tar(archive_);
    tar.symlink("lib/up", "../..").close();
  }
  expect_refused("bundle entry lib/up: symlink target ../.. escapes the bundle directory");
  // Each link alone stays inside, but "s/.." climbs from where s points (the root).
  {
    TarWriter tar(archive_);
    tar.symlink("d/s", "..").symlink("e", "d/s/..").close();
  }
  expect_refused("bundle entry e: symlink target d/s/.. has .. after a name");
}

TEST_F(BundleTest, RefusesWritingThroughASymlink) {
  fs::path outside = root_ / "outside";
  fs::create_directories(outside);
  {
    TarWriter tar(archive_);
    tar.symlink("d", outside.string()).file("d/x", "evil").close();
  }
  expect_refused("bundle entry d: symlink target " + outside.string() + " is absolute");
  EXPECT_FALSE(fs::exists(outside / "x"));
  // A symlink that is fine by itself still may not be written through.
  {
    TarWriter tar(archive_);
    tar.dir("real").symlink("d", "real").file("d/x", "sneaky").close();
  }
  expect_refused("bundle entry d/x: goes through the symlink d unpacked earlier");
}

TEST_F(BundleTest, RefusesDevicesAndDuplicatesAndStrayHardLinks) {
  {
    TarWriter tar(archive_);
    tar.file("ok", "fine").char_device("dev/null").close();
  }
  expect_refused("bundle entry dev/null: is a character device");
  {
    TarWriter tar(archive_);
    tar.symlink("f", "g").file("f", "replaces the link").close();
  }
  expect_refused("bundle entry f: is in the bundle twice");
  {
    TarWriter tar(archive_);
    tar.hardlink("h", "../../etc/passwd").close();
  }
  expect_refused("bundle entry h: hard link target ../../etc/passwd escapes the bundle directory");
  {
    TarWriter tar(archive_);
    tar.hardlink("h", "/etc/passwd").close();
  }
  expect_refused("bundle entry h: hard link target /etc/passwd is an absolute path");
  {
    TarWriter tar(archive_);
    tar.symlink("s", "x").hardlink("h", "s").close();
  }
  expect_refused("bundle entry h: hard link target s is not a file unpacked earlier");
}

TEST_F(BundleTest, EnforcesLimits) {
  {
    TarWriter tar(archive_);
    tar.file("a", "12345").file("b", "678901").close();
  }
  expect_refused("bundle entry b: takes the bundle over its limit of 10 bytes",
                 UnpackLimits{.max_total_bytes = 10});
  expect_refused("has more than 1 entries", UnpackLimits{.max_entries = 1});
  ASSERT_TRUE(unpack_bundle(archive_, dest_, UnpackLimits{.max_total_bytes = 11, .max_entries = 2})
                  .has_value());
}

TEST_F(BundleTest, RefusesANonEmptyDestinationAndLeavesItAlone) {
  fs::path src = root_ / "src";
  write_file(src / "a", "a");
  ASSERT_TRUE(create_bundle(src, archive_).has_value());
  write_file(dest_ / "precious", "keep me");
  auto result = unpack_bundle(archive_, dest_);
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code, Errc::kAlreadyExists);
  EXPECT_THAT(result.error().message, HasSubstr("not an empty directory"));
  EXPECT_EQ(read_file(dest_ / "precious"), "keep me");
}

TEST_F(BundleTest, ClearsSetuidSetgidAndStickyBits) {
  {
    TarWriter tar(archive_);
    tar.dir("tmp", 01777).file("tmp/su", "root me", 06755).close();
  }
  ASSERT_TRUE(unpack_bundle(archive_, dest_).has_value());
  EXPECT_EQ(mode_of(dest_ / "tmp" / "su"), 0755u);
  EXPECT_EQ(mode_of(dest_ / "tmp"), 0777u);
}

TEST_F(BundleTest, CorruptOrTruncatedArchivesAreErrorsNotCrashes) {
  auto missing = unpack_bundle(root_ / "no-such.tar.zst", dest_);
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code, Errc::kNotFound);
  EXPECT_FALSE(fs::exists(dest_));

  write_file(archive_, "this is not an archive at all, not even close to one");
  auto garbage = unpack_bundle(archive_, dest_);
  ASSERT_FALSE(garbage.has_value());
  EXPECT_EQ(garbage.error().code, Errc::kInvalidArgument) << garbage.error().message;
  EXPECT_FALSE(fs::exists(dest_));

  // Incompressible data, so cutting the archive in half cuts into the second file.
  std::mt19937 rng(7);
  std::string noise(256 * 1024, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  fs::path src = root_ / "src";
  write_file(src / "a", noise);
  write_file(src / "b", noise);
  ASSERT_TRUE(create_bundle(src, archive_).has_value());
  fs::resize_file(archive_, fs::file_size(archive_) * 3 / 4);
  auto truncated = unpack_bundle(archive_, dest_);
  ASSERT_FALSE(truncated.has_value());
  EXPECT_EQ(truncated.error().code, Errc::kInvalidArgument) << truncated.error().message;
  EXPECT_FALSE(fs::exists(dest_));

  // Bytes flipped across the stream: zstd frames carry no checksum here (the agent checks the
  // artifact's sha256 before unpacking), so this may unpack; it must not crash or leave debris.
  for (int cut = 1; cut < 8; ++cut) {
    ASSERT_TRUE(create_bundle(src, archive_).has_value());
    {
      std::fstream f(archive_, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(fs::file_size(archive_) * cut / 8));
      f.write("\xff\x00\xff\x00\xff\x00\xff\x00", 8);
    }
    auto flipped = unpack_bundle(archive_, dest_);
    if (!flipped) {
      EXPECT_FALSE(fs::exists(dest_)) << flipped.error().message;
    }
    fs::remove_all(dest_);
  }
}

}  // namespace
}  // namespace outpost::agent
