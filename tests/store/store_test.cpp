// Store behaviour, written once and run against every backend (value-parameterized: add a
// backend by adding one entry to kBackends), plus backend-specific checks at the end. The
// postgres backend runs on the private cluster of tests/support/pg_cluster.h, a fresh database
// per test; where PostgreSQL is not installed its cases skip, saying so.
#include "store/store.h"

#include <libpq-fe.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "common/digest.h"
#include "pg_cluster.h"
#include "store/postgres/postgres_store.h"
#include "store/sqlite/sqlite_store.h"

namespace outpost {
void PrintTo(Errc code, std::ostream* os) { *os << errc_name(code); }
}  // namespace outpost

namespace outpost::store {
namespace {

// Fails the test with the error's text when `expr` (a Result or Status) holds an error.
#define ASSERT_OK(expr)                                                             \
  do {                                                                              \
    const auto& outpost_result_ = (expr);                                           \
    ASSERT_TRUE(outpost_result_.has_value()) << outpost_result_.error().describe(); \
  } while (0)

// A fresh directory for one test, removed with everything in it afterwards.
class TempDir {
 public:
  TempDir() {
    std::string pattern = testing::TempDir() + "/outpost-store-XXXXXX";
    if (mkdtemp(pattern.data()) != nullptr) {
      path_ = pattern;
    }
  }
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) {
      std::filesystem::remove_all(path_, ignored);
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The documented audit hash, computed independently of audit_entry_hash().
// Each field is written as "<length>:<bytes>\n".
std::string sha256_of_joined(const AuditEntry& e) {
  std::string text;
  for (const std::string& f : {std::to_string(e.seq), std::to_string(e.time), e.actor, e.action,
                               e.target, e.details_json, e.prev_hash}) {
    text += std::to_string(f.size()) + ":" + f + "\n";
  }
  return sha256_hex(text);
}

struct Backend {
  std::string name;  // test-name suffix: letters, digits and '_' only
  // Opens the backend's store for a test whose scratch directory is `dir`. Opening twice
  // with the same dir reaches the same data when `persistent`.
  std::function<Result<std::unique_ptr<Store>>(const std::string& dir)> open;
  bool persistent = false;
  // Why the backend cannot run here ("" when it can): its cases skip with this.
  std::function<std::string()> unavailable = [] { return std::string(); };
  // Runs a query returning one integer on the database of `dir`, behind the store's back (-1
  // on failure); for checks of what the tables hold.
  std::function<int64_t(const std::string& dir, const std::string& sql)> scalar;
};

void PrintTo(const Backend& backend, std::ostream* os) { *os << backend.name; }

int64_t sqlite_scalar(const std::string& dir, const std::string& sql) {
  sqlite3* db = nullptr;
  int64_t n = -1;
  if (sqlite3_open_v2((dir + "/outpost.db").c_str(), &db, SQLITE_OPEN_READONLY, nullptr) ==
      SQLITE_OK) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK &&
        sqlite3_step(stmt) == SQLITE_ROW) {
      n = sqlite3_column_int64(stmt, 0);
    }
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
  return n;
}

// The database URL of each test directory, so that opening the same dir again (reopen, a
// second store) reaches the same database.
Result<std::string> postgres_url_for(const std::string& dir) {
  static std::mutex mu;
  static std::map<std::string, std::string> urls;
  std::lock_guard lock(mu);
  if (auto it = urls.find(dir); it != urls.end()) return it->second;
  std::string why;
  testing_support::PgCluster* cluster = testing_support::test_cluster(&why);
  if (cluster == nullptr) return make_error(Errc::kUnavailable, why);
  auto url = cluster->create_database();
  if (!url) return url;
  urls.emplace(dir, *url);
  return url;
}

int64_t postgres_scalar(const std::string& dir, const std::string& sql) {
  auto url = postgres_url_for(dir);
  if (!url) return -1;
  std::unique_ptr<PGconn, decltype(&PQfinish)> conn(PQconnectdb(url->c_str()), &PQfinish);
  if (PQstatus(conn.get()) != CONNECTION_OK) return -1;
  std::unique_ptr<PGresult, decltype(&PQclear)> res(PQexec(conn.get(), sql.c_str()), &PQclear);
  if (PQresultStatus(res.get()) != PGRES_TUPLES_OK || PQntuples(res.get()) != 1) return -1;
  return std::strtoll(PQgetvalue(res.get(), 0, 0), nullptr, 10);
}

const Backend kBackends[] = {
    {"sqlite_file",
     [](const std::string& dir) { return open_store("sqlite:" + dir + "/outpost.db"); }, true,
     [] { return std::string(); }, sqlite_scalar},
    {"sqlite_memory", [](const std::string&) { return open_memory_store(); }, false,
     [] { return std::string(); }, nullptr},
    {"postgres",
     [](const std::string& dir) -> Result<std::unique_ptr<Store>> {
       auto url = postgres_url_for(dir);
       if (!url) return make_error(std::move(url).error());
       return open_store(*url);
     },
     true,
     [] {
       std::string why;
       return testing_support::test_cluster(&why) == nullptr ? why : std::string();
     },
     postgres_scalar},
};

// A telemetry batch of one health record.
telemetry::Batch batch_of_one_health(int64_t seq) {
  telemetry::HealthRecord h;
  h.cpu_percent = 10;
  telemetry::Batch batch;
  batch.first_seq = batch.last_seq = seq;
  batch.records.push_back(telemetry::Record{seq, 1'700'000'000'000 + seq, h});
  return batch;
}

class StoreTest : public testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty()) << "cannot create a temp dir under " << testing::TempDir();
    if (const std::string why = GetParam().unavailable(); !why.empty()) {
      GTEST_SKIP() << GetParam().name << " backend unavailable: " << why;
    }
    auto opened = GetParam().open(dir_.path());
    ASSERT_OK(opened);
    store_ = std::move(*opened);
  }

  // Closes and reopens the store (persistent backends only).
  void reopen() {
    store_.reset();
    auto opened = GetParam().open(dir_.path());
    ASSERT_OK(opened);
    store_ = std::move(*opened);
  }

  EnrollmentToken enrollment_token(const std::string& id, std::optional<int64_t> uses_left,
                                   std::optional<int64_t> expires_at = std::nullopt) {
    return EnrollmentToken{
        .id = id,
        .token_hash = sha_of(id),
        .site = "plant-a",
        .labels = {{"line", "3"}},
        .uses_left = uses_left,
        .expires_at = expires_at,
        .created_at = 1000,
        .created_by = "alice",
    };
  }

  static Device device(const std::string& id, const std::string& site = "plant-a",
                       Labels labels = {}) {
    return Device{
        .id = id,
        .site = site,
        .labels = std::move(labels),
        .facts_json = R"({"arch":"arm64"})",
        .public_key = "pk-" + id,
        .credential_hash = "cred-" + id,
        .enrolled_at = 5000,
    };
  }

  // Enrolls through an unlimited token, for tests that only need devices to exist.
  void add_device(const Device& dev) {
    if (!have_bootstrap_token_) {
      ASSERT_OK(store_->put_enrollment_token(enrollment_token("bootstrap", std::nullopt)));
      have_bootstrap_token_ = true;
    }
    ASSERT_OK(store_->enroll_device(sha_of("bootstrap"), 5000, dev));
  }

  static std::string sha_of(const std::string& text) { return "hash-of-" + text; }

  static ModelVersion model_version(const std::string& model, const std::string& version,
                                    const std::string& content_hash, int64_t created_at) {
    ModelVersion mv{.model = model,
                    .version = version,
                    .content_hash = content_hash,
                    .created_at = created_at,
                    .variants = {}};
    for (const char* accel : {"gpu", "npu", "cpu"}) {
      mv.variants.push_back(ModelVariant{
          .selector_json = std::string(R"({"accelerator":")") + accel + R"("})",
          .needs_json = R"({"min_memory_mb":512})",
          .artifact_digest = std::string("sha256:") + accel,
          .format = "onnx",
          .metadata_json = R"({"opset":17})",
      });
    }
    return mv;
  }

  // Checks the audit chain's links and hashes; returns the number of entries.
  void expect_valid_chain(const std::vector<AuditEntry>& entries) {
    for (size_t i = 0; i < entries.size(); ++i) {
      EXPECT_EQ(entries[i].seq, static_cast<int64_t>(i) + 1);
      EXPECT_EQ(entries[i].prev_hash, i == 0 ? "" : entries[i - 1].hash) << "seq " << i + 1;
      EXPECT_EQ(entries[i].hash, audit_entry_hash(entries[i])) << "seq " << i + 1;
    }
  }

  TempDir dir_;
  std::unique_ptr<Store> store_;
  bool have_bootstrap_token_ = false;
};

INSTANTIATE_TEST_SUITE_P(Backends, StoreTest, testing::ValuesIn(kBackends),
                         [](const testing::TestParamInfo<Backend>& param_info) {
                           return param_info.param.name;
                         });

// ---- Schema ----

TEST_P(StoreTest, MigrationsAreAppliedAtOpen) {
  const auto migrations = sqlite::embedded_migrations();
  ASSERT_FALSE(migrations.empty());
  EXPECT_EQ(migrations.front().version, 1);
  EXPECT_EQ(migrations.front().name, "0001_init.sql");
  auto version = store_->schema_version();
  ASSERT_OK(version);
  EXPECT_EQ(*version, migrations.back().version);
}

TEST_P(StoreTest, ReopenKeepsDataAndSchema) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  ASSERT_OK(store_->put_operator_token({"admin", "h-admin", "admin", "root", 1}));
  ASSERT_OK(store_->create_operator_token({"alice", "h-alice", "operator", "alice", 2, {"p-*"}}));
  ASSERT_OK(store_->revoke_operator_token("alice", 3));
  add_device(device("cam-01"));
  ASSERT_OK(store_->apply_deployment("det", R"({"spec":1})", "s1", "alice", 10));
  ASSERT_OK(store_->append_audit("alice", "deployment.apply", "deployment/det", "{}", 10));

  reopen();

  auto version = store_->schema_version();
  ASSERT_OK(version);
  EXPECT_EQ(*version, sqlite::embedded_migrations().back().version);
  auto token = store_->find_operator_token_by_hash("h-admin");
  ASSERT_OK(token);
  ASSERT_TRUE(token->has_value());
  EXPECT_EQ((*token)->name, "root");
  auto alice = store_->find_operator_token_by_name("alice");
  ASSERT_OK(alice);
  ASSERT_TRUE(alice->has_value());
  EXPECT_EQ((*alice)->sites, std::vector<std::string>{"p-*"});
  EXPECT_EQ((*alice)->revoked_at, 3);
  auto dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  ASSERT_TRUE(dev->has_value());
  EXPECT_EQ((*dev)->facts_json, R"({"arch":"arm64"})");
  auto dep = store_->get_deployment("det");
  ASSERT_OK(dep);
  ASSERT_TRUE(dep->has_value());
  EXPECT_EQ((*dep)->revision, 1);
  // The chain continues across restarts.
  ASSERT_OK(store_->append_audit("bob", "device.cordon", "device/cam-01", "{}", 20));
  auto audit = store_->list_audit(0, 100);
  ASSERT_OK(audit);
  ASSERT_EQ(audit->size(), 2u);
  expect_valid_chain(*audit);
}

// ---- Operator tokens ----

TEST_P(StoreTest, OperatorTokenIsFoundByHash) {
  ASSERT_OK(store_->put_operator_token({"ops1", "h-ops1", "operator", "Olga", 7}));
  auto found = store_->find_operator_token_by_hash("h-ops1");
  ASSERT_OK(found);
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->id, "ops1");
  EXPECT_EQ((*found)->role, "operator");
  EXPECT_EQ((*found)->name, "Olga");
  EXPECT_EQ((*found)->created_at, 7);

  auto missing = store_->find_operator_token_by_hash("h-nobody");
  ASSERT_OK(missing);
  EXPECT_FALSE(missing->has_value());
}

TEST_P(StoreTest, PutOperatorTokenReplacesByIdAndRefusesSharedHash) {
  ASSERT_OK(store_->put_operator_token({"admin", "h1", "admin", "root", 1}));
  ASSERT_OK(store_->put_operator_token({"admin", "h2", "admin", "root", 2}));
  auto old_hash = store_->find_operator_token_by_hash("h1");
  ASSERT_OK(old_hash);
  EXPECT_FALSE(old_hash->has_value());

  auto clash = store_->put_operator_token({"other", "h2", "viewer", "eve", 3});
  ASSERT_FALSE(clash);
  EXPECT_EQ(clash.error().code, Errc::kAlreadyExists);
  EXPECT_NE(clash.error().message.find("other"), std::string::npos) << clash.error().message;
}

TEST_P(StoreTest, UsersAreCreatedListedByNameAndFoundByNameOrHash) {
  OperatorToken alice{"alice", "h-alice", "operator", "alice", 10, {"plant-*", "depot-1"}, 0};
  OperatorToken vic{"vic", "h-vic", "viewer", "vic", 20, {}, 0};
  ASSERT_OK(store_->create_operator_token(vic));
  ASSERT_OK(store_->create_operator_token(alice));

  auto list = store_->list_operator_tokens();
  ASSERT_OK(list);
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].name, "alice");
  EXPECT_EQ((*list)[0].sites, (std::vector<std::string>{"plant-*", "depot-1"}));
  EXPECT_EQ((*list)[0].revoked_at, 0);
  EXPECT_EQ((*list)[1].name, "vic");
  EXPECT_TRUE((*list)[1].sites.empty());

  auto by_name = store_->find_operator_token_by_name("alice");
  ASSERT_OK(by_name);
  ASSERT_TRUE(by_name->has_value());
  EXPECT_EQ((*by_name)->token_hash, "h-alice");
  EXPECT_EQ((*by_name)->role, "operator");
  EXPECT_EQ((*by_name)->created_at, 10);
  auto by_hash = store_->find_operator_token_by_hash("h-alice");
  ASSERT_OK(by_hash);
  ASSERT_TRUE(by_hash->has_value());
  EXPECT_EQ((*by_hash)->sites, (std::vector<std::string>{"plant-*", "depot-1"}));
  auto nobody = store_->find_operator_token_by_name("bob");
  ASSERT_OK(nobody);
  EXPECT_FALSE(nobody->has_value());
}

TEST_P(StoreTest, CreateOperatorTokenRefusesATakenNameEvenAfterRevocation) {
  ASSERT_OK(store_->create_operator_token({"alice", "h1", "operator", "alice", 10, {}, 0}));
  auto again = store_->create_operator_token({"alice", "h2", "viewer", "alice", 20, {}, 0});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::kAlreadyExists);
  EXPECT_EQ(again.error().field, "name");
  EXPECT_NE(again.error().message.find("user alice already exists"), std::string::npos)
      << again.error().message;

  ASSERT_OK(store_->revoke_operator_token("alice", 30));
  auto reused = store_->create_operator_token({"alice", "h3", "viewer", "alice", 40, {}, 0});
  ASSERT_FALSE(reused);
  EXPECT_EQ(reused.error().code, Errc::kAlreadyExists);
  EXPECT_NE(reused.error().message.find("revoked"), std::string::npos) << reused.error().message;
  // Nothing half-written: the old row is as it was.
  auto kept = store_->find_operator_token_by_name("alice");
  ASSERT_OK(kept);
  ASSERT_TRUE(kept->has_value());
  EXPECT_EQ((*kept)->token_hash, "h1");

  // A shared hash is refused too, naming the token.
  auto clash = store_->create_operator_token({"bob", "h1", "viewer", "bob", 50, {}, 0});
  ASSERT_FALSE(clash);
  EXPECT_EQ(clash.error().code, Errc::kAlreadyExists);
  EXPECT_NE(clash.error().message.find("bob"), std::string::npos) << clash.error().message;
}

TEST_P(StoreTest, PutOperatorTokenRefusesAnotherTokensName) {
  ASSERT_OK(store_->create_operator_token({"alice", "h1", "operator", "alice", 10, {}, 0}));
  auto clash = store_->put_operator_token({"other", "h2", "viewer", "alice", 20, {}, 0});
  ASSERT_FALSE(clash);
  EXPECT_EQ(clash.error().code, Errc::kAlreadyExists);
  EXPECT_EQ(clash.error().field, "name");
  EXPECT_NE(clash.error().message.find("user alice already exists"), std::string::npos)
      << clash.error().message;
}

TEST_P(StoreTest, RevokeOperatorTokenKeepsTheFirstTimeAndNamesUnknownUsers) {
  ASSERT_OK(store_->create_operator_token({"alice", "h1", "operator", "alice", 10, {"p-*"}, 0}));
  auto revoked = store_->revoke_operator_token("alice", 50);
  ASSERT_OK(revoked);
  EXPECT_EQ(revoked->revoked_at, 50);
  EXPECT_EQ(revoked->token_hash, "h1");
  EXPECT_EQ(revoked->sites, std::vector<std::string>{"p-*"});
  // Still found by hash (the caller refuses it), with the revocation time.
  auto found = store_->find_operator_token_by_hash("h1");
  ASSERT_OK(found);
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->revoked_at, 50);

  auto twice = store_->revoke_operator_token("alice", 90);
  ASSERT_OK(twice);
  EXPECT_EQ(twice->revoked_at, 50);

  auto unknown = store_->revoke_operator_token("bob", 60);
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.error().code, Errc::kNotFound);
  EXPECT_EQ(unknown.error().field, "name");
  EXPECT_NE(unknown.error().message.find("user bob"), std::string::npos) << unknown.error().message;
}

// ---- Enrollment ----

TEST_P(StoreTest, EnrollmentDecrementsUsesAndStoresDevice) {
  ASSERT_OK(store_->put_enrollment_token(enrollment_token("t1", 2)));
  auto before =
      store_->enroll_device(sha_of("t1"), 2000, device("cam-01", "plant-a", {{"line", "3"}}));
  ASSERT_OK(before);
  EXPECT_EQ(before->id, "t1");
  EXPECT_EQ(before->uses_left, 2);  // as it was before the decrement
  EXPECT_EQ(before->labels, (Labels{{"line", "3"}}));

  auto tokens = store_->list_enrollment_tokens();
  ASSERT_OK(tokens);
  ASSERT_EQ(tokens->size(), 1u);
  EXPECT_EQ((*tokens)[0].uses_left, 1);
  EXPECT_EQ((*tokens)[0].site, "plant-a");
  EXPECT_EQ((*tokens)[0].created_by, "alice");

  auto by_hash = store_->find_enrollment_token_by_hash(sha_of("t1"));
  ASSERT_OK(by_hash);
  ASSERT_TRUE(by_hash->has_value());
  EXPECT_EQ((*by_hash)->id, "t1");
  EXPECT_EQ((*by_hash)->uses_left, 1);
  auto unknown = store_->find_enrollment_token_by_hash(sha_of("nope"));
  ASSERT_OK(unknown);
  EXPECT_FALSE(unknown->has_value());

  auto dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  ASSERT_TRUE(dev->has_value());
  EXPECT_EQ((*dev)->site, "plant-a");
  EXPECT_EQ((*dev)->labels, (Labels{{"line", "3"}}));
  EXPECT_EQ((*dev)->public_key, "pk-cam-01");
  EXPECT_EQ((*dev)->credential_hash, "cred-cam-01");
  EXPECT_EQ((*dev)->enrolled_at, 5000);
  EXPECT_EQ((*dev)->generation, 0);
  EXPECT_EQ((*dev)->desired_json, "{}");
  EXPECT_FALSE((*dev)->cordoned);
}

TEST_P(StoreTest, EnrollmentRefusesUsedUpToken) {
  ASSERT_OK(store_->put_enrollment_token(enrollment_token("t1", 1)));
  ASSERT_OK(store_->enroll_device(sha_of("t1"), 2000, device("cam-01")));
  auto refused = store_->enroll_device(sha_of("t1"), 2000, device("cam-02"));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::kFailedPrecondition);
  EXPECT_EQ(refused.error().message, "enrollment token t1 has no uses left");
  auto dev = store_->get_device("cam-02");
  ASSERT_OK(dev);
  EXPECT_FALSE(dev->has_value());
}

TEST_P(StoreTest, EnrollmentRefusesExpiredToken) {
  const int64_t expiry = 1700000000000;  // 2023-11-14T22:13:20Z
  ASSERT_OK(store_->put_enrollment_token(enrollment_token("t1", 5, expiry)));
  auto refused = store_->enroll_device(sha_of("t1"), expiry, device("cam-01"));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::kFailedPrecondition);
  EXPECT_EQ(refused.error().message, "enrollment token t1 expired at 2023-11-14T22:13:20Z");

  ASSERT_OK(store_->enroll_device(sha_of("t1"), expiry - 1, device("cam-01")));
}

TEST_P(StoreTest, EnrollmentRefusesUnknownToken) {
  ASSERT_OK(store_->put_enrollment_token(enrollment_token("t1", 5)));
  auto refused = store_->enroll_device(sha_of("nope"), 2000, device("cam-01"));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::kUnauthenticated);
  EXPECT_EQ(refused.error().message, "enrollment token is not valid");
}

TEST_P(StoreTest, EnrollmentWithUnlimitedTokenNeverRunsOut) {
  ASSERT_OK(store_->put_enrollment_token(enrollment_token("t1", std::nullopt)));
  for (int i = 0; i < 5; ++i) {
    ASSERT_OK(store_->enroll_device(sha_of("t1"), 2000, device("cam-" + std::to_string(i))));
  }
  auto tokens = store_->list_enrollment_tokens();
  ASSERT_OK(tokens);
  ASSERT_EQ(tokens->size(), 1u);
  EXPECT_EQ((*tokens)[0].uses_left, std::nullopt);
  EXPECT_EQ((*tokens)[0].expires_at, std::nullopt);
}

TEST_P(StoreTest, EnrollmentOfExistingDeviceChangesNothing) {
  ASSERT_OK(store_->put_enrollment_token(enrollment_token("t1", 3)));
  ASSERT_OK(store_->enroll_device(sha_of("t1"), 2000, device("cam-01")));
  auto again = store_->enroll_device(sha_of("t1"), 2000, device("cam-01", "plant-b"));
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::kAlreadyExists);
  EXPECT_EQ(again.error().message, "device cam-01 already exists");
  // The decrement was rolled back with the failed insert.
  auto tokens = store_->list_enrollment_tokens();
  ASSERT_OK(tokens);
  EXPECT_EQ((*tokens)[0].uses_left, 2);
  auto dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_EQ((*dev)->site, "plant-a");
}

TEST_P(StoreTest, LabelsMustBeValidUtf8) {
  EnrollmentToken token = enrollment_token("t1", 1);
  token.labels = {{"line", "\xff\xfe"}};
  auto refused = store_->put_enrollment_token(token);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(refused.error().field, "labels");
}

// ---- Devices ----

TEST_P(StoreTest, ListDevicesFiltersBySiteAndLabels) {
  add_device(device("a1", "plant-a", {{"line", "1"}, {"camera", "yes"}}));
  add_device(device("a2", "plant-a", {{"line", "2"}}));
  add_device(device("b1", "plant-b", {{"line", "1"}}));
  add_device(device("b2", "plant-b", {}));

  auto ids = [&](const DeviceFilter& filter) {
    std::vector<std::string> out;
    auto devices = store_->list_devices(filter);
    EXPECT_TRUE(devices) << devices.error().describe();
    if (devices) {
      for (const auto& d : *devices) {
        out.push_back(d.id);
      }
    }
    return out;
  };
  using Ids = std::vector<std::string>;
  EXPECT_EQ(ids({}), (Ids{"a1", "a2", "b1", "b2"}));
  EXPECT_EQ(ids({.site = "plant-b", .labels = {}}), (Ids{"b1", "b2"}));
  EXPECT_EQ(ids({.site = std::nullopt, .labels = {{"line", "1"}}}), (Ids{"a1", "b1"}));
  EXPECT_EQ(ids({.site = "plant-a", .labels = {{"line", "1"}}}), (Ids{"a1"}));
  EXPECT_EQ(ids({.site = std::nullopt, .labels = {{"line", "1"}, {"camera", "yes"}}}), (Ids{"a1"}));
  EXPECT_EQ(ids({.site = std::nullopt, .labels = {{"camera", "no"}}}), Ids{});
  EXPECT_EQ(ids({.site = "plant-z", .labels = {}}), Ids{});
}

TEST_P(StoreTest, DesiredStatesOfManyDevicesAreWrittenTogetherWithTheSameRules) {
  add_device(device("cam-01"));
  add_device(device("cam-02"));
  ASSERT_OK(store_->update_desired_state("cam-02", R"({"v":1})", "h1", R"({"s":1})"));
  std::vector<store::DesiredStateWrite> writes = {
      {"cam-01", R"({"v":1})", "h1", R"({"s":1})"},  // new: generation 1
      {"cam-02", R"({"v":1})", "h1", R"({"s":9})"},  // unchanged: stays 1, schedule updated
      {"cam-01", R"({"v":2})", "h2", R"({"s":2})"},  // the same device again: 2
  };
  auto generations = store_->update_desired_states(writes);
  ASSERT_OK(generations);
  EXPECT_EQ(*generations, (std::vector<int64_t>{1, 1, 2}));
  auto one = store_->get_device("cam-01");
  ASSERT_OK(one);
  EXPECT_EQ((*one)->generation, 2);
  EXPECT_EQ((*one)->desired_json, R"({"v":2})");
  auto two = store_->get_device("cam-02");
  ASSERT_OK(two);
  EXPECT_EQ((*two)->schedule_json, R"({"s":9})");
  // A device that does not exist fails the group and nothing of it is written.
  auto failed = store_->update_desired_states(
      {{"cam-01", R"({"v":3})", "h3", "{}"}, {"ghost", "{}", "h", "{}"}});
  ASSERT_FALSE(failed.has_value());
  EXPECT_EQ(failed.error().code, Errc::kNotFound);
  one = store_->get_device("cam-01");
  ASSERT_OK(one);
  EXPECT_EQ((*one)->generation, 2);
}

TEST_P(StoreTest, DesiredStateGenerationGrowsOnlyOnRealChange) {
  add_device(device("cam-01"));
  auto gen = store_->update_desired_state("cam-01", R"({"v":1})", "h1", R"({"s":1})");
  ASSERT_OK(gen);
  EXPECT_EQ(*gen, 1);

  gen = store_->update_desired_state("cam-01", R"({"v":"ignored"})", "h1", R"({"s":2})");
  ASSERT_OK(gen);
  EXPECT_EQ(*gen, 1);
  auto dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_EQ((*dev)->generation, 1);
  EXPECT_EQ((*dev)->desired_json, R"({"v":1})");
  EXPECT_EQ((*dev)->desired_hash, "h1");
  EXPECT_EQ((*dev)->schedule_json, R"({"s":2})");  // updated even without a new generation

  gen = store_->update_desired_state("cam-01", R"({"v":2})", "h2", R"({"s":3})");
  ASSERT_OK(gen);
  EXPECT_EQ(*gen, 2);
  dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_EQ((*dev)->desired_json, R"({"v":2})");

  auto missing = store_->update_desired_state("ghost", "{}", "h", "{}");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, Errc::kNotFound);
  EXPECT_EQ(missing.error().message, "device ghost not found");
}

Status as_status(const Result<bool>& result) {
  if (!result) return make_error(result.error());
  return ok();
}

TEST_P(StoreTest, StatusReportsOfManyDevicesInOneGroupEachKeepTheirOwnOutcome) {
  add_device(device("cam-01"));
  add_device(device("cam-02"));
  ASSERT_OK(store_->record_device_status("cam-02", 5, R"({"seq":5})", 50, 10));
  std::vector<store::DeviceStatusWrite> writes = {
      {"cam-01", 1, R"({"seq":1})", 100},
      {"ghost", 1, R"({"seq":1})", 100},                // no such device: fails alone
      {"cam-02", 5, R"({"seq":5,"again":true})", 101},  // a duplicate
      {"cam-02", 4, R"({"seq":4})", 102},               // late: logged, does not replace seq 5
      {"cam-01", 2, R"({"seq":2})", 103},               // the same device twice in one group
  };
  auto outcomes = store_->record_device_statuses(writes, 10);
  ASSERT_OK(outcomes);
  ASSERT_EQ(outcomes->size(), writes.size());
  EXPECT_TRUE((*outcomes)[0].has_value() && *(*outcomes)[0]);
  ASSERT_FALSE((*outcomes)[1].has_value());
  EXPECT_EQ((*outcomes)[1].error().code, Errc::kNotFound);
  EXPECT_TRUE((*outcomes)[2].has_value() && !*(*outcomes)[2]);
  EXPECT_TRUE((*outcomes)[3].has_value() && *(*outcomes)[3]);
  EXPECT_TRUE((*outcomes)[4].has_value() && *(*outcomes)[4]);
  auto one = store_->get_device("cam-01");
  ASSERT_OK(one);
  EXPECT_EQ((*one)->status_json, R"({"seq":2})");
  EXPECT_EQ((*one)->status_at, 103);
  auto two = store_->get_device("cam-02");
  ASSERT_OK(two);
  EXPECT_EQ((*two)->status_json, R"({"seq":5})");
  auto log = store_->list_device_status_log("cam-02", 10);
  ASSERT_OK(log);
  ASSERT_EQ(log->size(), 2u);  // 4 and 5, in seq order
  EXPECT_EQ((*log)[0].seq, 4);
  EXPECT_EQ((*log)[1].seq, 5);
}

TEST_P(StoreTest, StatusLogKeepsReportsInSeqOrderAndIgnoresDuplicatesAndStaleOnes) {
  add_device(device("cam-01"));
  // Sent in order 1, 2, 4, then 3 arrives late and 2 is resent.
  for (int64_t seq : {1, 2, 4}) {
    auto fresh = store_->record_device_status(
        "cam-01", seq, R"({"seq":)" + std::to_string(seq) + "}", 100 + seq, 3);
    ASSERT_OK(fresh);
    EXPECT_TRUE(*fresh);
  }
  auto late = store_->record_device_status("cam-01", 3, R"({"seq":3})", 200, 3);
  ASSERT_OK(late);
  EXPECT_TRUE(*late);
  auto again = store_->record_device_status("cam-01", 2, R"({"seq":2})", 201, 3);
  ASSERT_OK(again);
  EXPECT_FALSE(*again);  // duplicate, and trimmed away or not it must not come back

  auto dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_EQ((*dev)->status_json, R"({"seq":4})");  // the late seq 3 did not replace seq 4

  auto log = store_->list_device_status_log("cam-01", 10);
  ASSERT_OK(log);
  std::vector<int64_t> seqs;
  for (const auto& report : *log) seqs.push_back(report.seq);
  EXPECT_EQ(seqs, (std::vector<int64_t>{2, 3, 4}));  // keep_log 3: the oldest went
  EXPECT_EQ(log->back().status_json, R"({"seq":4})");
  auto newest = store_->list_device_status_log("cam-01", 1);
  ASSERT_OK(newest);
  ASSERT_EQ(newest->size(), 1u);
  EXPECT_EQ(newest->front().seq, 4);

  ASSERT_OK(store_->update_device_facts("cam-01", R"({"arch":"arm64"})"));
  dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_EQ((*dev)->facts_json, R"({"arch":"arm64"})");
}

TEST_P(StoreTest, RecordsStatusLastSeenAndCordon) {
  add_device(device("cam-01"));
  ASSERT_OK(store_->record_device_status("cam-01", 0, R"({"healthy":true})", 7000, 10));
  ASSERT_OK(store_->touch_device("cam-01", 8000));
  ASSERT_OK(store_->touch_device("cam-01", 7500));  // late request: last_seen must not go back
  ASSERT_OK(store_->set_device_cordoned("cam-01", true));
  auto dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_EQ((*dev)->status_json, R"({"healthy":true})");
  EXPECT_EQ((*dev)->status_at, 7000);
  EXPECT_EQ((*dev)->last_seen, 8000);
  EXPECT_TRUE((*dev)->cordoned);

  ASSERT_OK(store_->set_device_cordoned("cam-01", false));
  dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_FALSE((*dev)->cordoned);
  EXPECT_EQ((*dev)->revoked_at, 0);

  ASSERT_OK(store_->set_device_revoked("cam-01", 9000));
  dev = store_->get_device("cam-01");
  ASSERT_OK(dev);
  EXPECT_EQ((*dev)->revoked_at, 9000);

  for (const Status& status :
       {as_status(store_->record_device_status("ghost", 1, "{}", 1, 10)),
        store_->touch_device("ghost", 1), store_->set_device_cordoned("ghost", true),
        store_->set_device_revoked("ghost", 1), store_->update_device_facts("ghost", "{}")}) {
    ASSERT_FALSE(status);
    EXPECT_EQ(status.error().code, Errc::kNotFound);
    EXPECT_EQ(status.error().message, "device ghost not found");
  }
}

TEST_P(StoreTest, GetUnknownDeviceIsEmpty) {
  auto dev = store_->get_device("ghost");
  ASSERT_OK(dev);
  EXPECT_FALSE(dev->has_value());
}

// ---- Artifacts ----

TEST_P(StoreTest, ArtifactsAreDeduplicatedByDigest) {
  const Artifact blob{"sha256:aa", 1234, "application/onnx", 10};
  auto inserted = store_->put_artifact(blob);
  ASSERT_OK(inserted);
  EXPECT_TRUE(*inserted);
  auto again = store_->put_artifact(Artifact{"sha256:aa", 1234, "application/onnx", 99});
  ASSERT_OK(again);
  EXPECT_FALSE(*again);
  ASSERT_OK(store_->put_artifact(Artifact{"sha256:bb", 1, "application/octet-stream", 20}));

  auto got = store_->get_artifact("sha256:aa");
  ASSERT_OK(got);
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->size, 1234);
  EXPECT_EQ((*got)->media_type, "application/onnx");
  EXPECT_EQ((*got)->created_at, 10);  // the first put wins

  auto all = store_->list_artifacts();
  ASSERT_OK(all);
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].digest, "sha256:aa");
  EXPECT_EQ((*all)[1].digest, "sha256:bb");

  auto missing = store_->get_artifact("sha256:cc");
  ASSERT_OK(missing);
  EXPECT_FALSE(missing->has_value());
}

// ---- Models ----

TEST_P(StoreTest, ModelVersionsAreImmutableAndKeepVariantOrder) {
  const ModelVersion v1 = model_version("defect-net", "1.0.0", "c1", 100);
  auto inserted = store_->put_model_version(v1);
  ASSERT_OK(inserted);
  EXPECT_TRUE(*inserted);

  auto same = store_->put_model_version(model_version("defect-net", "1.0.0", "c1", 999));
  ASSERT_OK(same);
  EXPECT_FALSE(*same);

  auto changed = store_->put_model_version(model_version("defect-net", "1.0.0", "c2", 999));
  ASSERT_FALSE(changed);
  EXPECT_EQ(changed.error().code, Errc::kConflict);
  EXPECT_EQ(changed.error().message,
            "model defect-net version 1.0.0 already exists with different content");

  auto got = store_->get_model_version("defect-net", "1.0.0");
  ASSERT_OK(got);
  ASSERT_TRUE(got->has_value());
  const ModelVersion& stored = **got;
  EXPECT_EQ(stored.content_hash, "c1");
  EXPECT_EQ(stored.created_at, 100);
  ASSERT_EQ(stored.variants.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(stored.variants[i].selector_json, v1.variants[i].selector_json);
    EXPECT_EQ(stored.variants[i].needs_json, v1.variants[i].needs_json);
    EXPECT_EQ(stored.variants[i].artifact_digest, v1.variants[i].artifact_digest);
    EXPECT_EQ(stored.variants[i].format, "onnx");
    EXPECT_EQ(stored.variants[i].metadata_json, R"({"opset":17})");
  }

  auto missing = store_->get_model_version("defect-net", "9.9.9");
  ASSERT_OK(missing);
  EXPECT_FALSE(missing->has_value());
}

TEST_P(StoreTest, ListsModelsAndVersions) {
  ASSERT_OK(store_->put_model_version(model_version("zeta", "1.0.0", "z", 50)));
  ASSERT_OK(store_->put_model_version(model_version("alpha", "2.0.0", "a2", 300)));
  ASSERT_OK(store_->put_model_version(model_version("alpha", "1.10.0", "a1", 200)));

  auto models = store_->list_models();
  ASSERT_OK(models);
  EXPECT_EQ(*models, (std::vector<std::string>{"alpha", "zeta"}));

  auto versions = store_->list_model_versions("alpha");
  ASSERT_OK(versions);
  ASSERT_EQ(versions->size(), 2u);
  EXPECT_EQ((*versions)[0].version, "1.10.0");  // by created_at
  EXPECT_EQ((*versions)[1].version, "2.0.0");
  EXPECT_EQ((*versions)[1].variants.size(), 3u);

  auto none = store_->list_model_versions("nobody");
  ASSERT_OK(none);
  EXPECT_TRUE(none->empty());
}

// ---- Deployments ----

TEST_P(StoreTest, DeploymentRevisionsGrowOnlyOnSpecChange) {
  auto first = store_->apply_deployment("det", R"({"v":1})", "s1", "alice", 100);
  ASSERT_OK(first);
  EXPECT_TRUE(first->changed);
  EXPECT_EQ(first->deployment.revision, 1);
  EXPECT_EQ(first->deployment.created_at, 100);

  auto same = store_->apply_deployment("det", R"({"v":1})", "s1", "bob", 200);
  ASSERT_OK(same);
  EXPECT_FALSE(same->changed);
  EXPECT_EQ(same->deployment.revision, 1);
  EXPECT_EQ(same->deployment.updated_at, 100);

  auto second = store_->apply_deployment("det", R"({"v":2})", "s2", "bob", 300);
  ASSERT_OK(second);
  EXPECT_TRUE(second->changed);
  EXPECT_EQ(second->deployment.revision, 2);
  EXPECT_EQ(second->deployment.created_at, 100);
  EXPECT_EQ(second->deployment.updated_at, 300);

  auto got = store_->get_deployment("det");
  ASSERT_OK(got);
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->revision, 2);
  EXPECT_EQ((*got)->manifest_json, R"({"v":2})");
  EXPECT_EQ((*got)->spec_hash, "s2");

  auto revisions = store_->list_deployment_revisions("det");
  ASSERT_OK(revisions);
  ASSERT_EQ(revisions->size(), 2u);
  EXPECT_EQ((*revisions)[0].revision, 1);
  EXPECT_EQ((*revisions)[0].created_by, "alice");
  EXPECT_EQ((*revisions)[0].manifest_json, R"({"v":1})");
  EXPECT_EQ((*revisions)[1].revision, 2);
  EXPECT_EQ((*revisions)[1].created_by, "bob");
  EXPECT_EQ((*revisions)[1].created_at, 300);
}

TEST_P(StoreTest, DeletedDeploymentKeepsRevisionsAndNumberingContinues) {
  ASSERT_OK(store_->apply_deployment("det", "{}", "s1", "alice", 100));
  ASSERT_OK(store_->apply_deployment("det", "{}", "s2", "alice", 200));
  ASSERT_OK(store_->apply_deployment("other", "{}", "o1", "alice", 200));
  ASSERT_OK(store_->delete_deployment("det"));

  auto gone = store_->get_deployment("det");
  ASSERT_OK(gone);
  EXPECT_FALSE(gone->has_value());
  auto listed = store_->list_deployments();
  ASSERT_OK(listed);
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].name, "other");
  auto kept = store_->list_deployment_revisions("det");
  ASSERT_OK(kept);
  EXPECT_EQ(kept->size(), 2u);

  auto again = store_->delete_deployment("det");
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::kNotFound);
  EXPECT_EQ(again.error().message, "deployment det not found");

  // Re-applying the old spec is still a new deployment, numbered after the old revisions.
  auto recreated = store_->apply_deployment("det", "{}", "s2", "bob", 300);
  ASSERT_OK(recreated);
  EXPECT_TRUE(recreated->changed);
  EXPECT_EQ(recreated->deployment.revision, 3);
  EXPECT_EQ(recreated->deployment.created_at, 300);
  kept = store_->list_deployment_revisions("det");
  ASSERT_OK(kept);
  EXPECT_EQ(kept->size(), 3u);
}

TEST_P(StoreTest, ListDeploymentsIsSortedByName) {
  for (const char* name : {"charlie", "alpha", "bravo"}) {
    ASSERT_OK(store_->apply_deployment(name, "{}", "s", "alice", 1));
  }
  auto listed = store_->list_deployments();
  ASSERT_OK(listed);
  ASSERT_EQ(listed->size(), 3u);
  EXPECT_EQ((*listed)[0].name, "alpha");
  EXPECT_EQ((*listed)[1].name, "bravo");
  EXPECT_EQ((*listed)[2].name, "charlie");
}

// ---- Secrets ----

SecretVersion secret_version(const std::string& name, int64_t version, int64_t activate_at,
                             int64_t created_at) {
  return SecretVersion{.name = name,
                       .version = version,
                       .keys = {"password", "user"},
                       .ciphertext = "c-" + name + "-" + std::to_string(version),
                       .activate_at = activate_at,
                       .created_at = created_at,
                       .created_by = "user:alice"};
}

TEST_P(StoreTest, SecretVersionsRoundTripAndSurviveAReopen) {
  ASSERT_OK(store_->put_secret_version(secret_version("db", 1, 1000, 1000), 1000));
  ASSERT_OK(store_->put_secret_version(secret_version("camera", 1, 1500, 1500), 1500));
  auto created_again = store_->put_secret_version(secret_version("db", 1, 1600, 1600), 1600);
  ASSERT_FALSE(created_again.has_value());
  EXPECT_EQ(created_again.error().code, Errc::kAlreadyExists);
  // Version 2 staged for later: version 1 stays, it is the one active now.
  ASSERT_OK(store_->put_secret_version(secret_version("db", 2, 9000, 2000), 2000));
  if (GetParam().persistent) reopen();
  auto db = store_->get_secret("db");
  ASSERT_OK(db);
  ASSERT_TRUE(db->has_value());
  EXPECT_EQ((*db)->created_at, 1000);
  EXPECT_EQ((*db)->updated_at, 2000);
  ASSERT_EQ((*db)->versions.size(), 2u);
  const SecretVersion& v2 = (*db)->versions[1];
  EXPECT_EQ(v2.version, 2);
  EXPECT_EQ(v2.keys, (std::vector<std::string>{"password", "user"}));
  EXPECT_EQ(v2.ciphertext, "c-db-2");
  EXPECT_EQ(v2.activate_at, 9000);
  EXPECT_EQ(v2.created_at, 2000);
  EXPECT_EQ(v2.created_by, "user:alice");
  EXPECT_EQ((*db)->versions[0].ciphertext, "c-db-1");
  auto all = store_->list_secrets();
  ASSERT_OK(all);
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].name, "camera");
  EXPECT_EQ((*all)[0].versions.size(), 1u);
  EXPECT_EQ((*all)[1].name, "db");
  EXPECT_EQ((*all)[1].versions.size(), 2u);
  auto missing = store_->get_secret("nope");
  ASSERT_OK(missing);
  EXPECT_FALSE(missing->has_value());
}

TEST_P(StoreTest, SecretVersionsMustFollowTheNewestAndOldOnesArePrunedOnceSuperseded) {
  auto orphan = store_->put_secret_version(secret_version("db", 2, 0, 1000), 1000);
  ASSERT_FALSE(orphan.has_value());
  EXPECT_EQ(orphan.error().code, Errc::kNotFound);
  ASSERT_OK(store_->put_secret_version(secret_version("db", 1, 1000, 1000), 1000));
  auto skipped = store_->put_secret_version(secret_version("db", 3, 2000, 2000), 2000);
  ASSERT_FALSE(skipped.has_value());
  EXPECT_EQ(skipped.error().code, Errc::kConflict);
  EXPECT_NE(skipped.error().message.find("version 1"), std::string::npos)
      << skipped.error().message;
  // 2 is staged for 5000, 3 for 6000: at 3000 version 1 is still the active one.
  ASSERT_OK(store_->put_secret_version(secret_version("db", 2, 5000, 2000), 2000));
  ASSERT_OK(store_->put_secret_version(secret_version("db", 3, 6000, 3000), 3000));
  auto db = store_->get_secret("db");
  ASSERT_OK(db);
  ASSERT_EQ((*db)->versions.size(), 3u);
  // At 5500 version 2 is active: version 1 is superseded and goes.
  ASSERT_OK(store_->put_secret_version(secret_version("db", 4, 7000, 5500), 5500));
  db = store_->get_secret("db");
  ASSERT_OK(db);
  std::vector<int64_t> kept;
  for (const auto& v : (*db)->versions) kept.push_back(v.version);
  EXPECT_EQ(kept, (std::vector<int64_t>{2, 3, 4}));
  // A version active at once supersedes every older one.
  ASSERT_OK(store_->put_secret_version(secret_version("db", 5, 8000, 8000), 8000));
  db = store_->get_secret("db");
  ASSERT_OK(db);
  ASSERT_EQ((*db)->versions.size(), 1u);
  EXPECT_EQ((*db)->versions[0].version, 5);
}

TEST_P(StoreTest, DeleteSecretRemovesEveryVersionAndNamesAnUnknownOne) {
  ASSERT_OK(store_->put_secret_version(secret_version("db", 1, 1000, 1000), 1000));
  ASSERT_OK(store_->put_secret_version(secret_version("db", 2, 9000, 2000), 2000));
  ASSERT_OK(store_->delete_secret("db"));
  auto gone = store_->get_secret("db");
  ASSERT_OK(gone);
  EXPECT_FALSE(gone->has_value());
  auto again = store_->delete_secret("db");
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, Errc::kNotFound);
  EXPECT_NE(again.error().message.find("secret db"), std::string::npos);
  // The name can be used again, from version 1.
  ASSERT_OK(store_->put_secret_version(secret_version("db", 1, 3000, 3000), 3000));
  auto list = store_->list_secrets();
  ASSERT_OK(list);
  ASSERT_EQ(list->size(), 1u);
  ASSERT_EQ((*list)[0].versions.size(), 1u);
  EXPECT_EQ((*list)[0].versions[0].ciphertext, "c-db-1");
}

// ---- Audit ----

TEST_P(StoreTest, AuditEntriesFormAHashChain) {
  auto first =
      store_->append_audit("alice", "deployment.apply", "deployment/det", R"({"revision":1})", 100);
  ASSERT_OK(first);
  EXPECT_EQ(first->seq, 1);
  EXPECT_EQ(first->prev_hash, "");
  EXPECT_EQ(first->hash, audit_entry_hash(*first));
  EXPECT_EQ(first->hash.size(), 64u);
  ASSERT_OK(store_->append_audit("bob", "device.cordon", "device/cam-01", "{}", 200));
  ASSERT_OK(store_->append_audit("carol", "token.create", "token/t9", "{}", 300));

  auto entries = store_->list_audit(0, 100);
  ASSERT_OK(entries);
  ASSERT_EQ(entries->size(), 3u);
  expect_valid_chain(*entries);
  EXPECT_EQ((*entries)[0].details_json, R"({"revision":1})");
  EXPECT_EQ((*entries)[1].actor, "bob");
  EXPECT_EQ((*entries)[2].time, 300);

  auto since = store_->list_audit(200, 100);
  ASSERT_OK(since);
  ASSERT_EQ(since->size(), 2u);
  EXPECT_EQ((*since)[0].seq, 2);  // oldest first
  auto limited = store_->list_audit(0, 1);
  ASSERT_OK(limited);
  ASSERT_EQ(limited->size(), 1u);
  EXPECT_EQ((*limited)[0].seq, 1);
  auto bad = store_->list_audit(0, -1);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::kInvalidArgument);
}

TEST(AuditEntryHashTest, CoversEveryFieldInTheDocumentedOrder) {
  AuditEntry entry{1, 100, "alice", "a", "t", "{}", "", ""};
  const std::string hash = audit_entry_hash(entry);
  EXPECT_EQ(hash, sha256_of_joined(entry));
  for (const auto& mutate : std::vector<std::function<void(AuditEntry&)>>{
           [](AuditEntry& e) { e.seq = 2; }, [](AuditEntry& e) { e.time = 101; },
           [](AuditEntry& e) { e.actor = "bob"; }, [](AuditEntry& e) { e.action = "b"; },
           [](AuditEntry& e) { e.target = "u"; }, [](AuditEntry& e) { e.details_json = "[]"; },
           [](AuditEntry& e) { e.prev_hash = "x"; }}) {
    AuditEntry changed = entry;
    mutate(changed);
    EXPECT_NE(audit_entry_hash(changed), hash);
  }
}

TEST_P(StoreTest, ConcurrentAuditAppendsKeepTheChainLinear) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 50;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        auto appended = store_->append_audit("thread-" + std::to_string(t), "test.append",
                                             "n/" + std::to_string(i), "{}", 1000 + i);
        if (!appended) {
          ++failures;
        }
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  EXPECT_EQ(failures.load(), 0);

  auto entries = store_->list_audit(0, 1000);
  ASSERT_OK(entries);
  ASSERT_EQ(entries->size(), static_cast<size_t>(kThreads * kPerThread));
  expect_valid_chain(*entries);
}

TEST_P(StoreTest, TwoStoresOnTheSameDataShareOneChain) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  // A second handle stands for a second process (e.g. a CLI run beside the server).
  auto second = GetParam().open(dir_.path());
  ASSERT_OK(second);
  Store* stores[] = {store_.get(), second->get()};
  constexpr int kPerStore = 50;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (Store* store : stores) {
    threads.emplace_back([&, store] {
      for (int i = 0; i < kPerStore; ++i) {
        auto appended = store->append_audit("a", "test.append", "t", "{}", i);
        if (!appended) {
          ADD_FAILURE() << appended.error().describe();
          ++failures;
        }
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  EXPECT_EQ(failures.load(), 0);
  auto entries = store_->list_audit(0, 1000);
  ASSERT_OK(entries);
  ASSERT_EQ(entries->size(), 2u * kPerStore);
  expect_valid_chain(*entries);
}

// ---- Several stores on one database (server replicas) ----

// A second store stands for another server process sharing the database: what one writes, the
// other reads at once (no cache in between), whichever wrote it.
TEST_P(StoreTest, TwoStoresSeeEachOthersWritesAtOnce) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  auto second_or = GetParam().open(dir_.path());
  ASSERT_OK(second_or);
  Store& a = *store_;
  Store& b = **second_or;

  add_device(device("cam-01"));
  ASSERT_OK(a.apply_deployment("det", R"({"v":1})", "s1", "alice", 10));
  ASSERT_OK(a.put_site({"plant-a", "Europe/Berlin", "eu", 11}));
  auto seen = b.get_device("cam-01");
  ASSERT_OK(seen);
  ASSERT_TRUE(seen->has_value());
  auto dep = b.get_deployment("det");
  ASSERT_OK(dep);
  ASSERT_TRUE(dep->has_value());
  EXPECT_EQ((*dep)->revision, 1);
  auto site = b.get_site("plant-a");
  ASSERT_OK(site);
  ASSERT_TRUE(site->has_value());
  EXPECT_EQ((*site)->timezone, "Europe/Berlin");

  // B changes what A read before; A's next read has it.
  ASSERT_OK(b.update_desired_state("cam-01", R"({"v":1})", "h1", "{}"));
  ASSERT_OK(b.set_device_cordoned("cam-01", true));
  ASSERT_OK(b.record_device_status("cam-01", 1, R"({"ok":true})", 20, 10));
  ASSERT_OK(b.apply_deployment("det", R"({"v":2})", "s2", "bob", 30));
  auto after = a.get_device("cam-01");
  ASSERT_OK(after);
  ASSERT_TRUE(after->has_value());
  EXPECT_EQ((*after)->generation, 1);
  EXPECT_TRUE((*after)->cordoned);
  EXPECT_EQ((*after)->status_json, R"({"ok":true})");
  dep = a.get_deployment("det");
  ASSERT_OK(dep);
  EXPECT_EQ((*dep)->revision, 2);
  // A's apply of B's spec is no change; its own next one continues B's numbering.
  auto same = a.apply_deployment("det", R"({"v":2})", "s2", "alice", 40);
  ASSERT_OK(same);
  EXPECT_FALSE(same->changed);
  auto third = a.apply_deployment("det", R"({"v":3})", "s3", "alice", 50);
  ASSERT_OK(third);
  EXPECT_EQ(third->deployment.revision, 3);
  // Telemetry stored through A is counted by B, and the other way round.
  ASSERT_OK(a.ingest_telemetry("cam-01", "plant-a", batch_of_one_health(1), 60));
  ASSERT_OK(b.ingest_telemetry("cam-01", "plant-a", batch_of_one_health(2), 61));
  for (Store* store : {&a, &b}) {
    auto devices = store->list_telemetry_devices();
    ASSERT_OK(devices);
    ASSERT_EQ(devices->size(), 1u);
    EXPECT_EQ((*devices)[0].acked_seq, 2);
    EXPECT_EQ((*devices)[0].batches, 2);
  }
}

// Concurrent writers through two stores (two servers): every status report is logged once and
// the newest wins, overlapping desired-state groups in opposite orders neither deadlock nor
// lose a generation, last_seen only grows, and the audit chain stays one line.
TEST_P(StoreTest, ConcurrentWritersOnTwoStoresLoseNothing) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  auto second_or = GetParam().open(dir_.path());
  ASSERT_OK(second_or);
  Store* stores[] = {store_.get(), second_or->get()};
  constexpr int kDevices = 6;
  constexpr int kRounds = 25;
  std::vector<std::string> ids;
  for (int d = 0; d < kDevices; ++d) {
    ids.push_back("cam-" + std::to_string(d));
    add_device(device(ids.back()));
  }
  std::atomic<int> failures{0};
  auto check = [&](const auto& result) {
    if (!result) {
      ADD_FAILURE() << result.error().describe();
      ++failures;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      Store& store = *stores[t % 2];
      for (int round = 0; round < kRounds; ++round) {
        // Status: thread t sends seqs round*4 + t + 1, each device in one group, plus a resend.
        const int64_t seq = round * 4 + t + 1;
        std::vector<DeviceStatusWrite> writes;
        for (const auto& id : ids) {
          writes.push_back({id, seq, R"({"seq":)" + std::to_string(seq) + "}", 1000 + seq});
        }
        writes.push_back(writes.front());  // a duplicate inside the group
        auto outcomes = store.record_device_statuses(writes, 1000);
        check(outcomes);
        // Desired states: half the threads in id order, the others in reverse.
        std::vector<DesiredStateWrite> desired;
        for (const auto& id : ids) {
          const std::string doc = "t" + std::to_string(t) + "r" + std::to_string(round);
          desired.push_back({id, doc, "h-" + doc, "{}"});
        }
        if (t % 2 == 1) std::reverse(desired.begin(), desired.end());
        check(store.update_desired_states(desired));
        std::vector<std::pair<std::string, int64_t>> seen;
        for (const auto& id : ids) seen.emplace_back(id, 10'000 + seq);
        check(store.touch_devices(seen));
        check(store.append_audit("t" + std::to_string(t), "test.write", "r", "{}", round));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);

  const int64_t last_seq = kRounds * 4;
  for (const auto& id : ids) {
    auto log = store_->list_device_status_log(id, 10'000);
    ASSERT_OK(log);
    ASSERT_EQ(log->size(), static_cast<size_t>(last_seq)) << id;
    for (int64_t i = 0; i < last_seq; ++i) EXPECT_EQ((*log)[i].seq, i + 1) << id;
    auto dev = second_or->get()->get_device(id);
    ASSERT_OK(dev);
    ASSERT_TRUE(dev->has_value());
    EXPECT_EQ((*dev)->status_json, R"({"seq":)" + std::to_string(last_seq) + "}") << id;
    // Every write changed the hash: one generation each, none lost.
    EXPECT_EQ((*dev)->generation, 4 * kRounds) << id;
    EXPECT_EQ((*dev)->last_seen, 10'000 + last_seq) << id;
  }
  auto audit = store_->list_audit(0, 10'000);
  ASSERT_OK(audit);
  ASSERT_EQ(audit->size(), 4u * kRounds);
  expect_valid_chain(*audit);
}

// One enrollment token with a few uses, spent concurrently through two stores: exactly that
// many devices get in.
TEST_P(StoreTest, EnrollmentsThroughTwoStoresSpendEachUseOnce) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  auto second_or = GetParam().open(dir_.path());
  ASSERT_OK(second_or);
  Store* stores[] = {store_.get(), second_or->get()};
  ASSERT_OK(store_->put_enrollment_token(enrollment_token("t5", 5)));
  std::atomic<int> enrolled{0};
  std::atomic<int> used_up{0};
  std::atomic<int> other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 4; ++i) {
        auto r = stores[t % 2]->enroll_device(
            sha_of("t5"), 2000, device("cam-" + std::to_string(t) + "-" + std::to_string(i)));
        if (r) {
          ++enrolled;
        } else if (r.error().code == Errc::kFailedPrecondition) {
          ++used_up;
        } else {
          ADD_FAILURE() << r.error().describe();
          ++other;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(enrolled.load(), 5);
  EXPECT_EQ(used_up.load(), 11);
  EXPECT_EQ(other.load(), 0);
  auto devices = store_->list_devices({});
  ASSERT_OK(devices);
  EXPECT_EQ(devices->size(), 5u);
  auto token = store_->find_enrollment_token_by_hash(sha_of("t5"));
  ASSERT_OK(token);
  ASSERT_TRUE(token->has_value());
  EXPECT_EQ((*token)->uses_left, 0);
}

// Two servers applying at once: the same spec makes one revision; different specs one each,
// numbered without gaps or duplicates.
TEST_P(StoreTest, ConcurrentAppliesThroughTwoStoresNumberRevisionsOnce) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  auto second_or = GetParam().open(dir_.path());
  ASSERT_OK(second_or);
  Store* stores[] = {store_.get(), second_or->get()};
  auto race = [&](const std::function<std::string(int)>& spec_of) {
    std::atomic<int> changed{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        const std::string spec = spec_of(t);
        auto r = stores[t % 2]->apply_deployment("det", "{\"spec\":\"" + spec + "\"}", spec,
                                                 "t" + std::to_string(t), 100 + t);
        if (!r) {
          ADD_FAILURE() << r.error().describe();
          return;
        }
        if (r->changed) ++changed;
      });
    }
    for (auto& thread : threads) thread.join();
    return changed.load();
  };
  EXPECT_EQ(race([](int) { return std::string("same"); }), 1);
  EXPECT_EQ(race([](int t) { return "spec-" + std::to_string(t); }), 4);
  auto revisions = store_->list_deployment_revisions("det");
  ASSERT_OK(revisions);
  ASSERT_EQ(revisions->size(), 5u);
  for (size_t i = 0; i < revisions->size(); ++i) {
    EXPECT_EQ((*revisions)[i].revision, static_cast<int64_t>(i) + 1);
  }
  auto dep = store_->get_deployment("det");
  ASSERT_OK(dep);
  EXPECT_EQ((*dep)->revision, 5);
  EXPECT_EQ((*dep)->stable_revision, 1);
}

// ---- Telemetry ----

constexpr int64_t kT0 = 1'700'000'000'000 - 1'700'000'000'000 % 3'600'000;  // an hour start
constexpr int64_t kMinute = 60'000;
constexpr int64_t kHour = 3'600'000;

telemetry::Record health_record(int64_t seq, int64_t time, double cpu) {
  telemetry::HealthRecord h;
  h.cpu_percent = cpu;
  h.mem_used = 100;
  h.mem_total = 1000;
  h.sync_lag_s = 2.5;
  return telemetry::Record{seq, time, h};
}

// An inference aggregate: `served` requests, one error, latencies in the 0.01 and 0.1 buckets.
telemetry::Record inference_record(int64_t seq, int64_t time, uint64_t served,
                                   const std::string& version = "1.0.0") {
  telemetry::InferenceRecord r;
  r.deployment = "det";
  r.revision = 1;
  r.model = "net";
  r.version = version;
  r.interval_ms = kMinute;
  r.requests = served;
  r.served = served;
  r.errors = 1;
  r.latency.count = served;
  r.latency.sum = 0.05 * static_cast<double>(served);
  r.latency.buckets = {{0.01, served / 2}, {0.1, served - served / 2}};
  r.confidence.count = served;
  r.confidence.sum = 0.9 * static_cast<double>(served);
  r.confidence.buckets = {{1.0, served}};
  return telemetry::Record{seq, time, r};
}

telemetry::Record event_record(int64_t seq, int64_t time, const std::string& event) {
  telemetry::EventRecord e;
  e.deployment = "det";
  e.revision = 1;
  e.event = event;
  return telemetry::Record{seq, time, e};
}

telemetry::Batch batch_of(std::vector<telemetry::Record> records) {
  telemetry::Batch batch;
  batch.first_seq = records.front().seq;
  batch.last_seq = records.back().seq;
  batch.records = std::move(records);
  return batch;
}

// Records seq from..to, one per minute from kT0: inference (served = seq) and, every 4th,
// an event instead.
telemetry::Batch mixed_batch(int64_t from, int64_t to) {
  std::vector<telemetry::Record> records;
  for (int64_t seq = from; seq <= to; ++seq) {
    const int64_t time = kT0 + seq * kMinute;
    records.push_back(seq % 4 == 0 ? event_record(seq, time, "restart")
                                   : inference_record(seq, time, static_cast<uint64_t>(seq)));
  }
  return batch_of(std::move(records));
}

TelemetryQuery query_of(const std::string& metric, int64_t since, int64_t until,
                        int64_t step = kHour, const std::string& by = "") {
  TelemetryQuery q;
  q.metric = metric;
  q.since_ms = since;
  q.until_ms = until;
  q.step_ms = step;
  q.by = by;
  return q;
}

TEST_P(StoreTest, TelemetryIngestStoresEachRecordOnce) {
  // Served counts are the seqs, so which records were stored shows in the sums.
  auto first = store_->ingest_telemetry("cam-01", "plant-a", mixed_batch(1, 6), kT0);
  ASSERT_OK(first);
  EXPECT_EQ(first->acked, 6);
  EXPECT_EQ(first->stored, 6);
  EXPECT_EQ(first->duplicates, 0);
  EXPECT_EQ(first->points, 5 * 6 + 1);  // 5 inference records of 6 points, 1 event

  auto again = store_->ingest_telemetry("cam-01", "plant-a", mixed_batch(1, 6), kT0);
  ASSERT_OK(again);
  EXPECT_EQ(again->acked, 6);
  EXPECT_EQ(again->stored, 0);
  EXPECT_EQ(again->duplicates, 6);
  EXPECT_EQ(again->points, 0);

  auto overlapping = store_->ingest_telemetry("cam-01", "plant-a", mixed_batch(5, 9), kT0);
  ASSERT_OK(overlapping);
  EXPECT_EQ(overlapping->acked, 9);
  EXPECT_EQ(overlapping->stored, 3);
  EXPECT_EQ(overlapping->duplicates, 2);

  auto older = store_->ingest_telemetry("cam-01", "plant-a", mixed_batch(2, 3), kT0);
  ASSERT_OK(older);
  EXPECT_EQ(older->acked, 9);
  EXPECT_EQ(older->stored, 0);
  EXPECT_EQ(older->duplicates, 2);

  // Another device's seqs are its own.
  auto other = store_->ingest_telemetry("cam-02", "plant-b", mixed_batch(1, 2), kT0);
  ASSERT_OK(other);
  EXPECT_EQ(other->stored, 2);

  auto served = store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour));
  ASSERT_OK(served);
  // cam-01: 1+2+3+5+6+7+9 (4 and 8 are events); cam-02: 1+2.
  EXPECT_EQ(served->total.sum, 33 + 3);
  EXPECT_EQ(served->devices, 2);
  auto events = store_->query_telemetry(query_of("events", kT0, kT0 + kHour, kHour, "detail"));
  ASSERT_OK(events);
  ASSERT_EQ(events->series.size(), 1u);
  EXPECT_EQ(events->series[0].group, "restart");
  EXPECT_EQ(events->series[0].total.sum, 2);

  auto devices = store_->list_telemetry_devices();
  ASSERT_OK(devices);
  ASSERT_EQ(devices->size(), 2u);
  EXPECT_EQ((*devices)[0].device_id, "cam-01");
  EXPECT_EQ((*devices)[0].acked_seq, 9);
  EXPECT_EQ((*devices)[0].records, 9);
  EXPECT_EQ((*devices)[0].batches, 4);
}

TEST_P(StoreTest, TelemetryWatermarkCoversRecordsTheDeviceDropped) {
  // seq 3..5 were dropped on the device: last_seq 6 acknowledges them with the batch.
  telemetry::Batch batch = batch_of({inference_record(1, kT0, 1), inference_record(2, kT0, 2)});
  batch.last_seq = 5;
  batch.dropped.samples = 3;
  auto first = store_->ingest_telemetry("cam-01", "plant-a", batch, kT0);
  ASSERT_OK(first);
  EXPECT_EQ(first->acked, 5);

  // A replay of an old batch with older drop counts does not move them back.
  telemetry::Batch old = batch_of({inference_record(1, kT0, 1)});
  old.dropped.samples = 1;
  ASSERT_OK(store_->ingest_telemetry("cam-01", "plant-a", old, kT0));
  auto devices = store_->list_telemetry_devices();
  ASSERT_OK(devices);
  ASSERT_EQ(devices->size(), 1u);
  EXPECT_EQ((*devices)[0].acked_seq, 5);
  EXPECT_EQ((*devices)[0].dropped.samples, 3);
}

TEST_P(StoreTest, TelemetryTotalsEqualTheSumOfRecords) {
  uint64_t served = 0;
  int64_t seq = 0;
  for (const char* device : {"cam-01", "cam-02", "cam-03"}) {
    std::vector<telemetry::Record> records;
    for (int i = 0; i < 10; ++i) {
      const uint64_t n = static_cast<uint64_t>(10 + i);
      records.push_back(inference_record(++seq, kT0 + i * kMinute, n, i % 2 ? "1.0.0" : "1.1.0"));
      served += n;
    }
    // Sent twice: the totals must not notice.
    ASSERT_OK(store_->ingest_telemetry(device, "plant-a", batch_of(records), kT0));
    ASSERT_OK(store_->ingest_telemetry(device, "plant-a", batch_of(records), kT0));
  }
  auto totals = store_->list_telemetry_totals();
  ASSERT_OK(totals);
  ASSERT_EQ(totals->size(), 2u);  // versions 1.0.0 and 1.1.0
  uint64_t total_served = 0;
  uint64_t total_errors = 0;
  uint64_t bucket_sum = 0;
  for (const TelemetryTotal& t : *totals) {
    EXPECT_EQ(t.deployment, "det");
    total_served += t.served;
    total_errors += t.errors;
    EXPECT_EQ(t.latency.count, t.served);
    for (const auto& [le, count] : t.latency.buckets) bucket_sum += count;
  }
  EXPECT_EQ(total_served, served);
  EXPECT_EQ(total_errors, 30u);
  EXPECT_EQ(bucket_sum, served);

  auto by_version =
      store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour, kHour, "version"));
  ASSERT_OK(by_version);
  ASSERT_EQ(by_version->series.size(), 2u);
  EXPECT_EQ(by_version->series[0].group, "1.0.0");
  EXPECT_EQ(static_cast<uint64_t>(by_version->total.sum), served);
  EXPECT_EQ(by_version->series[0].devices.size(), 3u);

  auto latency = store_->query_telemetry(query_of("inference_latency_seconds", kT0, kT0 + kHour));
  ASSERT_OK(latency);
  EXPECT_EQ(latency->kind, telemetry::MetricKind::kHistogram);
  EXPECT_EQ(latency->total.count, served);
  // Half the observations are at or below 0.01, the rest in (0.01, 0.1].
  EXPECT_LE(latency->total.quantile(0.25), 0.01);
  EXPECT_GT(latency->total.quantile(0.95), 0.01);
  EXPECT_LE(latency->total.quantile(0.95), 0.1);
  EXPECT_NEAR(latency->total.mean(), 0.05, 1e-9);
}

TEST_P(StoreTest, TelemetryRollupsAndRetentionKeepQueryAnswers) {
  // Six hours of one record a minute (inference and health alternating).
  std::vector<telemetry::Record> records;
  for (int64_t seq = 1; seq <= 6 * 60; ++seq) {
    const int64_t time = kT0 + (seq - 1) * kMinute;
    records.push_back(seq % 2 ? inference_record(seq, time, 3)
                              : health_record(seq, time, static_cast<double>(seq % 50)));
  }
  ASSERT_OK(store_->ingest_telemetry("cam-01", "plant-a", batch_of(records), kT0));
  const int64_t until = kT0 + 6 * kHour;
  auto ask = [&](const std::string& metric) {
    auto result = store_->query_telemetry(query_of(metric, kT0, until, kHour));
    EXPECT_TRUE(result.has_value()) << result.error().describe();
    return result ? *result : TelemetryQueryResult{};
  };
  const auto requests = ask("inference_requests");
  const auto latency = ask("inference_latency_seconds");
  const auto cpu = ask("cpu_percent");
  EXPECT_EQ(requests.total.sum, 3 * 180);
  EXPECT_FALSE(requests.from_rollups);

  // An hour later: the six complete hours are rolled up, nothing expires yet.
  auto maintained = store_->maintain_telemetry(until + kHour, TelemetryRetention{});
  ASSERT_OK(maintained);
  EXPECT_EQ(maintained->hours_rolled_up, 6);
  EXPECT_EQ(maintained->points_deleted, 0);
  // Idle runs do nothing.
  auto idle = store_->maintain_telemetry(until + kHour, TelemetryRetention{});
  ASSERT_OK(idle);
  EXPECT_EQ(idle->hours_rolled_up, 0);

  // Ten days later: raw points are gone, the rollups answer the same.
  maintained = store_->maintain_telemetry(until + 10 * 24 * kHour, TelemetryRetention{});
  ASSERT_OK(maintained);
  EXPECT_GT(maintained->points_deleted, 0);
  const auto requests_after = ask("inference_requests");
  const auto latency_after = ask("inference_latency_seconds");
  const auto cpu_after = ask("cpu_percent");
  EXPECT_TRUE(requests_after.from_rollups);
  EXPECT_EQ(requests_after.total.sum, requests.total.sum);
  EXPECT_EQ(latency_after.total.count, latency.total.count);
  EXPECT_EQ(latency_after.total.buckets, latency.total.buckets);
  EXPECT_DOUBLE_EQ(latency_after.total.quantile(0.95), latency.total.quantile(0.95));
  EXPECT_DOUBLE_EQ(cpu_after.total.mean(), cpu.total.mean());
  EXPECT_EQ(cpu_after.total.min, cpu.total.min);
  EXPECT_EQ(cpu_after.total.max, cpu.total.max);
  ASSERT_EQ(requests_after.series.size(), 1u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(requests_after.series[0].steps[i].sum, requests.series[0].steps[i].sum) << i;
  }

  // A device that was offline sends data for a rolled-up, expired hour: it still counts.
  ASSERT_OK(store_->ingest_telemetry("cam-02", "plant-a",
                                     batch_of({inference_record(1, kT0 + 5, 7)}), until));
  EXPECT_EQ(ask("inference_requests").total.sum, 3 * 180 + 7);

  // After the rollup retention, nothing is left.
  TelemetryRetention short_rollups;
  short_rollups.rollup_ms = 24 * kHour;
  ASSERT_OK(store_->maintain_telemetry(until + 10 * 24 * kHour, short_rollups));
  EXPECT_EQ(ask("inference_requests").total.points, 0);
  // The fleet totals never expire.
  auto totals = store_->list_telemetry_totals();
  ASSERT_OK(totals);
  ASSERT_EQ(totals->size(), 1u);
  EXPECT_EQ((*totals)[0].served, 3u * 180 + 7);
}

TEST_P(StoreTest, TelemetryBatchThatFailsLeavesNoTrace) {
  // Two records with one seq: the second point collides, the transaction rolls back. (The
  // batch decoder refuses such a batch; this stands for any failure half-way.)
  auto broken = store_->ingest_telemetry(
      "cam-01", "plant-a", batch_of({inference_record(1, kT0, 5), inference_record(1, kT0, 5)}),
      kT0);
  ASSERT_FALSE(broken);
  auto devices = store_->list_telemetry_devices();
  ASSERT_OK(devices);
  EXPECT_TRUE(devices->empty());
  auto totals = store_->list_telemetry_totals();
  ASSERT_OK(totals);
  EXPECT_TRUE(totals->empty());
  auto served = store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour));
  ASSERT_OK(served);
  EXPECT_EQ(served->total.points, 0);

  // The same records, sent right, are stored once (series ids of the failed batch forgotten).
  auto good = store_->ingest_telemetry(
      "cam-01", "plant-a", batch_of({inference_record(1, kT0, 5), health_record(2, kT0, 1)}), kT0);
  ASSERT_OK(good);
  EXPECT_EQ(good->stored, 2);
  served = store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour));
  ASSERT_OK(served);
  EXPECT_EQ(served->total.sum, 5);
}

TEST_P(StoreTest, TelemetryBatchesOfSeveralDevicesCommitTogetherButFailAlone) {
  const telemetry::Batch good = mixed_batch(1, 3);
  const telemetry::Batch bad = batch_of({inference_record(1, kT0, 5), inference_record(1, kT0, 5)});
  auto outcomes = store_->ingest_telemetry_batches({{"cam-01", "plant-a", &good},
                                                    {"cam-02", "plant-a", &bad},
                                                    {"cam-03", "plant-b", &good},
                                                    {"cam-01", "plant-a", &good}},
                                                   kT0);
  ASSERT_OK(outcomes);
  ASSERT_EQ(outcomes->size(), 4u);
  ASSERT_OK((*outcomes)[0]);
  EXPECT_EQ((*outcomes)[0]->stored, 3);
  EXPECT_FALSE((*outcomes)[1]);
  ASSERT_OK((*outcomes)[2]);
  EXPECT_EQ((*outcomes)[2]->stored, 3);
  ASSERT_OK((*outcomes)[3]);  // the same device twice in one group: the second is a duplicate
  EXPECT_EQ((*outcomes)[3]->duplicates, 3);

  auto devices = store_->list_telemetry_devices();
  ASSERT_OK(devices);
  ASSERT_EQ(devices->size(), 2u);
  EXPECT_EQ((*devices)[0].device_id, "cam-01");
  EXPECT_EQ((*devices)[1].device_id, "cam-03");
  auto served = store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour));
  ASSERT_OK(served);
  EXPECT_EQ(served->total.sum, 2 * (1 + 2 + 3));
}

// ---- Telemetry: group commit, caches and a second writer ----

// A batch the store refuses half-way: two inference records with one seq collide on their
// points (the decoder would refuse it; it stands for any store failure). Its first record is
// of a version no other batch uses, so a trace of it would show in the totals and series.
telemetry::Batch failing_batch(int64_t seq) {
  return batch_of({inference_record(seq, kT0 + seq * kMinute, 1000, "9.9.9"),
                   inference_record(seq, kT0 + seq * kMinute, 1000, "9.9.9")});
}

// Fails the test where two stores' telemetry state differs (device rows, fleet totals, and
// the served/event sums by device).
void expect_same_telemetry(Store& actual, Store& expected, const std::string& what) {
  SCOPED_TRACE(what);
  auto devices = actual.list_telemetry_devices();
  auto want_devices = expected.list_telemetry_devices();
  ASSERT_OK(devices);
  ASSERT_OK(want_devices);
  ASSERT_EQ(devices->size(), want_devices->size());
  for (size_t i = 0; i < devices->size(); ++i) {
    const TelemetryDeviceState& a = (*devices)[i];
    const TelemetryDeviceState& e = (*want_devices)[i];
    EXPECT_EQ(a.device_id, e.device_id);
    EXPECT_EQ(a.acked_seq, e.acked_seq) << a.device_id;
    EXPECT_EQ(a.dropped, e.dropped) << a.device_id;
    EXPECT_EQ(a.last_ingest_at, e.last_ingest_at) << a.device_id;
    EXPECT_EQ(a.last_health_at, e.last_health_at) << a.device_id;
    EXPECT_EQ(a.sync_lag_s, e.sync_lag_s) << a.device_id;
    EXPECT_EQ(a.batches, e.batches) << a.device_id;
    EXPECT_EQ(a.records, e.records) << a.device_id;
  }
  auto totals = actual.list_telemetry_totals();
  auto want_totals = expected.list_telemetry_totals();
  ASSERT_OK(totals);
  ASSERT_OK(want_totals);
  ASSERT_EQ(totals->size(), want_totals->size());
  for (size_t i = 0; i < totals->size(); ++i) {
    const TelemetryTotal& a = (*totals)[i];
    const TelemetryTotal& e = (*want_totals)[i];
    EXPECT_EQ(a.version, e.version);
    EXPECT_EQ(a.requests, e.requests) << a.version;
    EXPECT_EQ(a.served, e.served) << a.version;
    EXPECT_EQ(a.errors, e.errors) << a.version;
    EXPECT_EQ(a.latency.count, e.latency.count) << a.version;
    EXPECT_EQ(a.latency.buckets, e.latency.buckets) << a.version;
    EXPECT_EQ(a.confidence.count, e.confidence.count) << a.version;
  }
  for (const auto& [metric, by] :
       {std::pair{"inference_requests", "device"}, std::pair{"inference_requests", "version"},
        std::pair{"events", "device"}, std::pair{"cpu_percent", "device"}}) {
    auto got = actual.query_telemetry(query_of(metric, kT0, kT0 + kHour, kHour, by));
    auto want = expected.query_telemetry(query_of(metric, kT0, kT0 + kHour, kHour, by));
    ASSERT_OK(got);
    ASSERT_OK(want);
    ASSERT_EQ(got->series.size(), want->series.size()) << metric;
    for (size_t i = 0; i < got->series.size(); ++i) {
      EXPECT_EQ(got->series[i].group, want->series[i].group) << metric;
      EXPECT_EQ(got->series[i].total.points, want->series[i].total.points) << metric;
      EXPECT_EQ(got->series[i].total.sum, want->series[i].total.sum) << metric;
    }
  }
}

// Sum of the served counts mixed_batch gives for seqs from..to (every 4th is an event).
double mixed_served(int64_t from, int64_t to) {
  double sum = 0;
  for (int64_t seq = from; seq <= to; ++seq) {
    if (seq % 4 != 0) sum += static_cast<double>(seq);
  }
  return sum;
}

// A group in which some batches fail in the store stores the others exactly as ingesting
// them one by one would (outcomes, device rows, totals, points), and a replay of the whole
// group afterwards stores nothing.
TEST_P(StoreTest, TelemetryGroupWithFailingBatchesEqualsOneByOneIngest) {
  TempDir reference_dir;
  auto reference_or = GetParam().open(reference_dir.path());
  ASSERT_OK(reference_or);
  Store& reference = **reference_or;

  telemetry::Batch health =
      batch_of({inference_record(1, kT0 + kMinute, 7), health_record(2, kT0 + 2 * kMinute, 40),
                inference_record(3, kT0 + 3 * kMinute, 9, "1.1.0")});
  health.dropped = telemetry::DropCounts{.samples = 4, .health = 1};
  const telemetry::Batch cam01_a = mixed_batch(1, 5);
  const telemetry::Batch cam01_b = mixed_batch(4, 9);   // overlaps cam01_a by two
  const telemetry::Batch bad_new = failing_batch(1);    // a device never seen before
  const telemetry::Batch bad_cam01 = failing_batch(6);  // above cam-01's watermark
  const std::vector<TelemetryIngest> group = {
      {"cam-04", "plant-a", &bad_new},  // first in the group
      {"cam-01", "plant-a", &cam01_a},   {"cam-02", "plant-b", &health},
      {"cam-01", "plant-a", &bad_cam01},  // after a stored batch of its own device
      {"cam-03", "plant-b", &bad_new},   {"cam-01", "plant-a", &cam01_b},
      {"cam-02", "plant-b", &health},  // a replay inside the group
  };

  auto outcomes = store_->ingest_telemetry_batches(group, kT0 + kHour);
  ASSERT_OK(outcomes);
  ASSERT_EQ(outcomes->size(), group.size());
  for (size_t i = 0; i < group.size(); ++i) {
    SCOPED_TRACE("slot " + std::to_string(i) + " (" + group[i].device_id + ")");
    auto one =
        reference.ingest_telemetry(group[i].device_id, group[i].site, *group[i].batch, kT0 + kHour);
    ASSERT_EQ((*outcomes)[i].has_value(), one.has_value());
    if (!one) continue;
    EXPECT_EQ((*outcomes)[i]->acked, one->acked);
    EXPECT_EQ((*outcomes)[i]->stored, one->stored);
    EXPECT_EQ((*outcomes)[i]->duplicates, one->duplicates);
    EXPECT_EQ((*outcomes)[i]->points, one->points);
  }
  // The expected outcomes, spelled out (so that the reference cannot be wrong the same way).
  EXPECT_FALSE((*outcomes)[0]);
  EXPECT_FALSE((*outcomes)[3]);
  EXPECT_FALSE((*outcomes)[4]);
  ASSERT_OK((*outcomes)[1]);
  EXPECT_EQ((*outcomes)[1]->stored, 5);
  ASSERT_OK((*outcomes)[2]);
  EXPECT_EQ((*outcomes)[2]->stored, 3);
  ASSERT_OK((*outcomes)[5]);
  EXPECT_EQ((*outcomes)[5]->acked, 9);
  EXPECT_EQ((*outcomes)[5]->stored, 4);
  EXPECT_EQ((*outcomes)[5]->duplicates, 2);
  ASSERT_OK((*outcomes)[6]);
  EXPECT_EQ((*outcomes)[6]->stored, 0);
  EXPECT_EQ((*outcomes)[6]->duplicates, 3);
  EXPECT_EQ((*outcomes)[6]->points, 0);

  expect_same_telemetry(*store_, reference, "after the group");
  auto devices = store_->list_telemetry_devices();
  ASSERT_OK(devices);
  ASSERT_EQ(devices->size(), 2u);  // cam-03 and cam-04 only ever failed: no row
  EXPECT_EQ((*devices)[0].device_id, "cam-01");
  EXPECT_EQ((*devices)[0].acked_seq, 9);
  EXPECT_EQ((*devices)[0].records, 9);
  EXPECT_EQ((*devices)[0].batches, 2);
  EXPECT_EQ((*devices)[1].device_id, "cam-02");
  EXPECT_EQ((*devices)[1].dropped.samples, 4);
  EXPECT_EQ((*devices)[1].batches, 2);
  EXPECT_EQ((*devices)[1].records, 3);
  EXPECT_EQ((*devices)[1].last_health_at, kT0 + 2 * kMinute);
  auto totals = store_->list_telemetry_totals();
  ASSERT_OK(totals);
  ASSERT_EQ(totals->size(), 2u);  // 1.0.0 and 1.1.0; nothing of the failed 9.9.9
  EXPECT_EQ((*totals)[0].version, "1.0.0");
  EXPECT_EQ((*totals)[0].served, static_cast<uint64_t>(mixed_served(1, 9)) + 7);
  EXPECT_EQ((*totals)[1].version, "1.1.0");
  EXPECT_EQ((*totals)[1].served, 9u);
  auto served = store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour));
  ASSERT_OK(served);
  EXPECT_EQ(served->total.sum, mixed_served(1, 9) + 7 + 9);

  // The whole group again (an agent resending after a lost answer): nothing new is stored,
  // the failing batches fail again, and every count stays where it was.
  auto replay = store_->ingest_telemetry_batches(group, kT0 + kHour);
  ASSERT_OK(replay);
  ASSERT_EQ(replay->size(), group.size());
  for (size_t i = 0; i < group.size(); ++i) {
    SCOPED_TRACE("replay slot " + std::to_string(i));
    auto one =
        reference.ingest_telemetry(group[i].device_id, group[i].site, *group[i].batch, kT0 + kHour);
    ASSERT_EQ((*replay)[i].has_value(), one.has_value());
    // cam-01's failing batch (slot 3) is below its watermark now: all duplicates, stored
    // nothing. The batches of cam-03 and cam-04 fail again.
    if (i == 0 || i == 4) {
      EXPECT_FALSE((*replay)[i]);
      continue;
    }
    ASSERT_OK((*replay)[i]);
    EXPECT_EQ((*replay)[i]->stored, 0);
    EXPECT_EQ((*replay)[i]->points, 0);
    EXPECT_EQ((*replay)[i]->duplicates, static_cast<int64_t>(group[i].batch->records.size()));
    EXPECT_EQ((*replay)[i]->acked, one->acked);
  }
  expect_same_telemetry(*store_, reference, "after the replay");
  auto totals_after = store_->list_telemetry_totals();
  ASSERT_OK(totals_after);
  ASSERT_EQ(totals_after->size(), 2u);
  EXPECT_EQ((*totals_after)[0].served, (*totals)[0].served);
  EXPECT_EQ((*totals_after)[1].served, (*totals)[1].served);
  auto served_after = store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour));
  ASSERT_OK(served_after);
  EXPECT_EQ(served_after->total.sum, served->total.sum);
  EXPECT_EQ(served_after->total.points, served->total.points);

  // Later good records with the labels of the failed batches land in their own series (no
  // series id of a rolled-back batch was kept).
  for (Store* store : {store_.get(), &reference}) {
    ASSERT_OK(store->ingest_telemetry(
        "cam-01", "plant-a", batch_of({inference_record(10, kT0 + 10 * kMinute, 13, "9.9.9")}),
        kT0 + kHour));
    ASSERT_OK(store->ingest_telemetry("cam-04", "plant-a",
                                      batch_of({inference_record(1, kT0 + kMinute, 17, "9.9.9")}),
                                      kT0 + kHour));
  }
  expect_same_telemetry(*store_, reference, "after good batches of the failed labels");
  auto by_version =
      store_->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour, kHour, "version"));
  ASSERT_OK(by_version);
  ASSERT_EQ(by_version->series.size(), 3u);
  EXPECT_EQ(by_version->series[2].group, "9.9.9");
  EXPECT_EQ(by_version->series[2].total.sum, 13 + 17);
  EXPECT_EQ(by_version->series[2].devices.size(), 2u);
}

// After transactions that rolled back (a failing single batch; a group whose fast try failed
// and was retried batch by batch), what this store answers and keeps answering equals what a
// store opened afresh on the file reads: no watermark, series id or total of a rolled-back
// transaction survives in a cache.
TEST_P(StoreTest, TelemetryCachesAfterARolledBackTransactionMatchAFreshStore) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  ASSERT_OK(store_->ingest_telemetry("cam-01", "plant-a", mixed_batch(1, 3), kT0));
  // A lone batch that fails half-way, after new series (version 9.9.9) were added for it.
  ASSERT_FALSE(store_->ingest_telemetry("cam-01", "plant-a", failing_batch(4), kT0));

  // A group whose fast try fails at its last batch, after the first ones moved cam-01's and
  // cam-02's watermarks and added series; the retry stores them.
  const telemetry::Batch cam01 = mixed_batch(4, 6);
  const telemetry::Batch cam02 = batch_of(
      {health_record(1, kT0 + kMinute, 10), inference_record(2, kT0 + 2 * kMinute, 11, "2.0.0")});
  const telemetry::Batch bad = failing_batch(20);
  auto outcomes = store_->ingest_telemetry_batches(
      {{"cam-01", "plant-a", &cam01}, {"cam-02", "plant-b", &cam02}, {"cam-01", "plant-a", &bad}},
      kT0);
  ASSERT_OK(outcomes);
  ASSERT_EQ(outcomes->size(), 3u);
  ASSERT_OK((*outcomes)[0]);
  EXPECT_EQ((*outcomes)[0]->stored, 3);
  EXPECT_EQ((*outcomes)[0]->acked, 6);
  ASSERT_OK((*outcomes)[1]);
  EXPECT_EQ((*outcomes)[1]->stored, 2);
  EXPECT_FALSE((*outcomes)[2]);

  // The caches are used now: overlapping batches of both devices through this store.
  auto more01 = store_->ingest_telemetry("cam-01", "plant-a", mixed_batch(5, 8), kT0);
  ASSERT_OK(more01);
  EXPECT_EQ(more01->acked, 8);
  EXPECT_EQ(more01->duplicates, 2);
  EXPECT_EQ(more01->stored, 2);
  auto more02 = store_->ingest_telemetry("cam-02", "plant-b", cam02, kT0);
  ASSERT_OK(more02);
  EXPECT_EQ(more02->duplicates, 2);
  EXPECT_EQ(more02->stored, 0);
  // Good records with the labels of the rolled-back series.
  auto late01 = store_->ingest_telemetry(
      "cam-01", "plant-a", batch_of({inference_record(9, kT0 + 9 * kMinute, 50, "9.9.9")}), kT0);
  ASSERT_OK(late01);
  EXPECT_EQ(late01->stored, 1);

  auto fresh_or = GetParam().open(dir_.path());
  ASSERT_OK(fresh_or);
  Store& fresh = **fresh_or;
  expect_same_telemetry(*store_, fresh, "in-process vs fresh store");
  auto devices = fresh.list_telemetry_devices();
  ASSERT_OK(devices);
  ASSERT_EQ(devices->size(), 2u);
  EXPECT_EQ((*devices)[0].acked_seq, 9);
  EXPECT_EQ((*devices)[0].records, 9);
  EXPECT_EQ((*devices)[1].acked_seq, 2);
  auto totals = fresh.list_telemetry_totals();
  ASSERT_OK(totals);
  ASSERT_EQ(totals->size(), 3u);  // 9.9.9 only from the good record
  EXPECT_EQ((*totals)[0].version, "1.0.0");
  EXPECT_EQ((*totals)[0].served, static_cast<uint64_t>(mixed_served(1, 8)));
  EXPECT_EQ((*totals)[1].version, "2.0.0");
  EXPECT_EQ((*totals)[1].served, 11u);
  EXPECT_EQ((*totals)[2].version, "9.9.9");
  EXPECT_EQ((*totals)[2].served, 50u);
  // Points reach their series (a cached id of a rolled-back series row would strand them).
  auto served =
      fresh.query_telemetry(query_of("inference_requests", kT0, kT0 + kHour, kHour, "version"));
  ASSERT_OK(served);
  ASSERT_EQ(served->series.size(), 3u);
  EXPECT_EQ(served->series[0].total.sum, mixed_served(1, 8));
  EXPECT_EQ(served->series[1].total.sum, 11);
  EXPECT_EQ(served->series[2].total.sum, 50);
  auto series_rows = [&]() {
    const int64_t failed_series = GetParam().scalar(
        dir_.path(), "SELECT COUNT(*) - 6 FROM telemetry_series WHERE version = '9.9.9'");
    const int64_t stranded =
        GetParam().scalar(dir_.path(),
                          "SELECT COUNT(*) FROM telemetry_points p WHERE NOT EXISTS"
                          " (SELECT 1 FROM telemetry_series s WHERE s.id = p.series_id)");
    return failed_series < 0 || stranded < 0 ? -1 : failed_series * 1000 + stranded;
  };
  EXPECT_EQ(series_rows(), 0) << "series of failed batches, or points without a series (x1000 = "
                                 "failed series, units = stranded points)";

  // And the fresh store, given the next batch, agrees with the watermark.
  auto next = fresh.ingest_telemetry("cam-01", "plant-a", mixed_batch(8, 11), kT0);
  ASSERT_OK(next);
  EXPECT_EQ(next->duplicates, 2);
  EXPECT_EQ(next->stored, 2);
}

// Two stores on one file (the server and an operator's tool, or two processes): a watermark
// that one moved is honoured by the other, whose cache holds an older one. Records are
// stored and counted once, whichever store they came through, sequentially and concurrently.
TEST_P(StoreTest, TelemetryWatermarkMovedByAnotherWriterIsHonoured) {
  if (!GetParam().persistent) {
    GTEST_SKIP() << "backend is not persistent";
  }
  auto second = GetParam().open(dir_.path());
  ASSERT_OK(second);
  Store& a = *store_;
  Store& b = **second;

  auto a1 = a.ingest_telemetry("cam-01", "plant-a", mixed_batch(1, 4), kT0);  // A caches 4
  ASSERT_OK(a1);
  EXPECT_EQ(a1->stored, 4);
  auto b1 = b.ingest_telemetry("cam-01", "plant-a", mixed_batch(1, 8), kT0);
  ASSERT_OK(b1);
  EXPECT_EQ(b1->duplicates, 4);
  EXPECT_EQ(b1->stored, 4);
  // Already stored through B: a duplicate through A.
  auto a2 = a.ingest_telemetry("cam-01", "plant-a", mixed_batch(1, 8), kT0);
  ASSERT_OK(a2);
  EXPECT_EQ(a2->acked, 8);
  EXPECT_EQ(a2->stored, 0);
  EXPECT_EQ(a2->duplicates, 8);
  auto a3 = a.ingest_telemetry("cam-01", "plant-a", mixed_batch(7, 10), kT0);
  ASSERT_OK(a3);
  EXPECT_EQ(a3->stored, 2);
  // B's cache says 8; A moved it to 10. The group path too.
  const telemetry::Batch cam01 = mixed_batch(9, 12);
  const telemetry::Batch cam02 = mixed_batch(1, 2);
  auto b2 = b.ingest_telemetry_batches(
      {{"cam-01", "plant-a", &cam01}, {"cam-02", "plant-a", &cam02}}, kT0);
  ASSERT_OK(b2);
  ASSERT_EQ(b2->size(), 2u);
  ASSERT_OK((*b2)[0]);
  EXPECT_EQ((*b2)[0]->duplicates, 2);
  EXPECT_EQ((*b2)[0]->stored, 2);
  EXPECT_EQ((*b2)[0]->acked, 12);

  for (Store* store : {&a, &b}) {
    auto totals = store->list_telemetry_totals();
    ASSERT_OK(totals);
    ASSERT_EQ(totals->size(), 1u);
    EXPECT_EQ((*totals)[0].served, static_cast<uint64_t>(mixed_served(1, 12) + mixed_served(1, 2)));
    auto devices = store->list_telemetry_devices();
    ASSERT_OK(devices);
    ASSERT_EQ(devices->size(), 2u);
    EXPECT_EQ((*devices)[0].acked_seq, 12);
    EXPECT_EQ((*devices)[0].records, 12);
    auto served = store->query_telemetry(query_of("inference_requests", kT0, kT0 + kHour));
    ASSERT_OK(served);
    EXPECT_EQ(served->total.sum, mixed_served(1, 12) + mixed_served(1, 2));
  }

  // Concurrently: both stores get every window of one device's stream, in order (windows of 10
  // records overlapping by 5), as a device resending to two servers would. Every record is
  // stored exactly once, through whichever store got it first.
  constexpr int64_t kWindows = 12;
  std::atomic<int64_t> stored{0};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (Store* store : {&a, &b}) {
    threads.emplace_back([&, store] {
      for (int64_t w = 0; w < kWindows; ++w) {
        auto r =
            store->ingest_telemetry("cam-09", "plant-a", mixed_batch(w * 5 + 1, w * 5 + 10), kT0);
        if (!r) {
          ADD_FAILURE() << r.error().describe();
          ++failures;
          continue;
        }
        stored += r->stored;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  const int64_t last = (kWindows - 1) * 5 + 10;
  EXPECT_EQ(stored.load(), last);
  auto devices = a.list_telemetry_devices();
  ASSERT_OK(devices);
  ASSERT_EQ(devices->size(), 3u);
  EXPECT_EQ((*devices)[2].device_id, "cam-09");
  EXPECT_EQ((*devices)[2].acked_seq, last);
  EXPECT_EQ((*devices)[2].records, last);
  auto totals = b.list_telemetry_totals();
  ASSERT_OK(totals);
  ASSERT_EQ(totals->size(), 1u);
  EXPECT_EQ((*totals)[0].served, static_cast<uint64_t>(mixed_served(1, 12) + mixed_served(1, 2) +
                                                       mixed_served(1, last)));
}

TEST_P(StoreTest, TelemetryQueryRefusesUnknownMetricsAndGroupings) {
  auto unknown = store_->query_telemetry(query_of("inference_latency", kT0, kT0 + kHour));
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(unknown.error().field, "metric");
  EXPECT_NE(unknown.error().message.find("inference_latency_seconds"), std::string::npos);
  auto by = store_->query_telemetry(query_of("cpu_percent", kT0, kT0 + kHour, kHour, "colour"));
  ASSERT_FALSE(by);
  EXPECT_EQ(by.error().field, "by");
  auto steps = store_->query_telemetry(query_of("cpu_percent", kT0, kT0 + 365 * 24 * kHour, 1000));
  ASSERT_FALSE(steps);
  EXPECT_EQ(steps.error().field, "step");
}

// ---- Opening by URL ----

TEST(OpenStoreTest, RejectsUnsupportedSchemesNamingTheUrl) {
  for (const char* url : {"mysql://db/outpost", "/var/lib/outpost.db", "sqlite:", ""}) {
    auto opened = open_store(url);
    ASSERT_FALSE(opened) << url;
    EXPECT_EQ(opened.error().code, Errc::kInvalidArgument) << url;
    EXPECT_NE(opened.error().message.find(url), std::string::npos) << opened.error().message;
  }
}

TEST(OpenStoreTest, PostgresErrorsNameTheUrlWithoutItsPassword) {
  // Port 1 of the loopback: nothing listens, the connection is refused at once.
  for (const char* url :
       {"postgres://outpost:s3cret@127.0.0.1:1/outpost",
        "postgresql://outpost@127.0.0.1:1/outpost?password=s3cret&sslmode=disable"}) {
    auto opened = open_store(url);
    ASSERT_FALSE(opened) << url;
    EXPECT_EQ(opened.error().code, Errc::kUnavailable) << opened.error().message;
    EXPECT_NE(opened.error().message.find("127.0.0.1:1/outpost"), std::string::npos)
        << opened.error().message;
    EXPECT_EQ(opened.error().message.find("s3cret"), std::string::npos)
        << "credentials leaked: " << opened.error().message;
  }
  auto bad_pool = open_store("postgres://outpost:s3cret@127.0.0.1:1/outpost?pool_size=0");
  ASSERT_FALSE(bad_pool);
  EXPECT_EQ(bad_pool.error().code, Errc::kInvalidArgument);
  EXPECT_NE(bad_pool.error().message.find("pool_size"), std::string::npos);
  EXPECT_EQ(bad_pool.error().message.find("s3cret"), std::string::npos);
}

TEST(OpenStoreTest, RedactsPasswordsAndKeepsTheRest) {
  EXPECT_EQ(redact_store_url("postgres://outpost:s3cret@db.local:5432/outpost"),
            "postgres://outpost:***@db.local:5432/outpost");
  EXPECT_EQ(redact_store_url("postgres://outpost@db.local/outpost"),
            "postgres://outpost@db.local/outpost");
  EXPECT_EQ(redact_store_url("postgresql://db.local/o?sslmode=require&password=s3cret&x=1"),
            "postgresql://db.local/o?sslmode=require&password=***&x=1");
  EXPECT_EQ(redact_store_url("sqlite:/var/lib/outpost.db"), "sqlite:/var/lib/outpost.db");
}

TEST(OpenStoreTest, CreatesTheFileInWalMode) {
  TempDir dir;
  const std::string path = dir.path() + "/new.db";
  ASSERT_FALSE(std::filesystem::exists(path));
  auto opened = open_store("sqlite://" + path);  // the "sqlite:///abs/path" form
  ASSERT_OK(opened);
  EXPECT_TRUE(std::filesystem::exists(path));

  // Inspect the file with a connection of our own.
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  std::unique_ptr<sqlite3, decltype(&sqlite3_close)> db(raw, &sqlite3_close);
  auto query = [&](const char* sql) {
    std::vector<std::string> rows;
    sqlite3_exec(
        db.get(), sql,
        [](void* out, int, char** values, char**) {
          static_cast<std::vector<std::string>*>(out)->push_back(values[0] ? values[0] : "NULL");
          return 0;
        },
        &rows, nullptr);
    return rows;
  };
  EXPECT_EQ(query("PRAGMA journal_mode"), std::vector<std::string>{"wal"});
  std::vector<std::string> versions;
  for (const auto& migration : sqlite::embedded_migrations()) {
    versions.push_back(std::to_string(migration.version));
  }
  EXPECT_EQ(query("SELECT version FROM schema_migrations ORDER BY version"), versions);
}

TEST(OpenStoreTest, ReportsUnopenableAndForeignFiles) {
  TempDir dir;
  auto missing_dir = open_store("sqlite:" + dir.path() + "/no/such/dir/x.db");
  ASSERT_FALSE(missing_dir);
  EXPECT_EQ(missing_dir.error().code, Errc::kIo);
  EXPECT_NE(missing_dir.error().message.find("/no/such/dir/x.db"), std::string::npos);

  const std::string junk = dir.path() + "/junk.db";
  std::ofstream(junk) << "this is not an SQLite database, just some bytes that are long enough";
  auto foreign = open_store("sqlite:" + junk);
  ASSERT_FALSE(foreign);
  EXPECT_EQ(foreign.error().code, Errc::kIo);
  EXPECT_NE(foreign.error().message.find(junk), std::string::npos) << foreign.error().message;
}

// ---- SQLite migration runner ----

TEST(SqliteMigrationsTest, FailedMigrationLeavesNoTraceAndLaterOnesResume) {
  TempDir dir;
  const std::string path = dir.path() + "/m.db";
  const sqlite::Migration first{1, "0001_a.sql", "CREATE TABLE a (x INTEGER);"};
  const sqlite::Migration broken{2, "0002_b.sql",
                                 "CREATE TABLE b (x INTEGER); INSERT INTO missing VALUES (1);"};
  const sqlite::Migration fixed{2, "0002_b.sql",
                                "CREATE TABLE b (x INTEGER); INSERT INTO b VALUES (1);"};

  const sqlite::Migration with_broken[] = {first, broken};
  auto failed = sqlite::open_sqlite_store(path, with_broken);
  ASSERT_FALSE(failed);
  EXPECT_NE(failed.error().message.find("0002_b.sql"), std::string::npos) << failed.error().message;

  const sqlite::Migration only_first[] = {first};
  auto reopened = sqlite::open_sqlite_store(path, only_first);
  ASSERT_OK(reopened);
  auto version = (*reopened)->schema_version();
  ASSERT_OK(version);
  EXPECT_EQ(*version, 1);
  reopened->reset();

  // Table b was rolled back with the failed migration, or creating it again would fail.
  const sqlite::Migration with_fixed[] = {first, fixed};
  auto upgraded = sqlite::open_sqlite_store(path, with_fixed);
  ASSERT_OK(upgraded);
  version = (*upgraded)->schema_version();
  ASSERT_OK(version);
  EXPECT_EQ(*version, 2);
  upgraded->reset();

  // Each migration runs once: opening again does not re-create the tables.
  auto again = sqlite::open_sqlite_store(path, with_fixed);
  ASSERT_OK(again);
  again->reset();

  // An older build refuses a newer schema instead of running against it.
  auto older = sqlite::open_sqlite_store(path, only_first);
  ASSERT_FALSE(older);
  EXPECT_EQ(older.error().code, Errc::kFailedPrecondition);
  EXPECT_NE(older.error().message.find("schema version 2"), std::string::npos)
      << older.error().message;
}

TEST(SqliteMigrationsTest, OperatorUsersMigrationKeepsTheAdminTokenUnscoped) {
  TempDir dir;
  const std::string path = dir.path() + "/upgrade.db";
  const auto all = sqlite::embedded_migrations();
  ASSERT_GE(all.size(), 6u);
  ASSERT_EQ(all[5].name, "0006_operator_users.sql");
  {
    auto before = sqlite::open_sqlite_store(path, all.subspan(0, 5));
    ASSERT_OK(before);
  }
  {
    // A token as a build before users wrote it (the old columns only).
    sqlite3* raw = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &raw), SQLITE_OK);
    std::unique_ptr<sqlite3, decltype(&sqlite3_close)> db(raw, &sqlite3_close);
    ASSERT_EQ(sqlite3_exec(db.get(),
                           "INSERT INTO operator_tokens (id, token_hash, role, name, created_at)"
                           " VALUES ('admin', 'h-admin', 'admin', 'admin', 7)",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
  }
  auto upgraded = sqlite::open_sqlite_store(path);
  ASSERT_OK(upgraded);
  auto admin = (*upgraded)->find_operator_token_by_hash("h-admin");
  ASSERT_OK(admin);
  ASSERT_TRUE(admin->has_value());
  EXPECT_EQ((*admin)->name, "admin");
  EXPECT_TRUE((*admin)->sites.empty());
  EXPECT_EQ((*admin)->revoked_at, 0);
  // The name is unique from now on.
  auto clash = (*upgraded)->create_operator_token({"x", "h-x", "viewer", "admin", 8, {}, 0});
  ASSERT_FALSE(clash);
  EXPECT_EQ(clash.error().code, Errc::kAlreadyExists);
}

TEST(SqliteMigrationsTest, RefusesMisnumberedMigrations) {
  const sqlite::Migration gap[] = {{1, "0001_a.sql", "CREATE TABLE a (x INTEGER);"},
                                   {3, "0003_c.sql", "CREATE TABLE c (x INTEGER);"}};
  auto opened = sqlite::open_sqlite_store(":memory:", gap);
  ASSERT_FALSE(opened);
  EXPECT_NE(opened.error().message.find("0003_c.sql"), std::string::npos);
}

// ---- PostgreSQL migration runner and pool ----

TEST(PostgresMigrationsTest, HaveTheSqliteNumbersAndNames) {
  const auto sqlite_migrations = sqlite::embedded_migrations();
  const auto pg_migrations = postgres::embedded_migrations();
  ASSERT_EQ(pg_migrations.size(), sqlite_migrations.size());
  for (size_t i = 0; i < pg_migrations.size(); ++i) {
    EXPECT_EQ(pg_migrations[i].version, sqlite_migrations[i].version);
    EXPECT_EQ(pg_migrations[i].name, sqlite_migrations[i].name);
  }
}

// A fresh database on the test cluster, or the reason there is none.
Result<std::string> fresh_postgres_database() {
  std::string why;
  testing_support::PgCluster* cluster = testing_support::test_cluster(&why);
  if (cluster == nullptr) return make_error(Errc::kUnavailable, why);
  return cluster->create_database();
}

#define OUTPOST_FRESH_POSTGRES(url)                                         \
  auto url##_or = fresh_postgres_database();                                \
  if (!url##_or && url##_or.error().code == Errc::kUnavailable) {           \
    GTEST_SKIP() << "PostgreSQL unavailable: " << url##_or.error().message; \
  }                                                                         \
  ASSERT_OK(url##_or);                                                      \
  const std::string url = *url##_or

TEST(PostgresMigrationsTest, ServersStartingTogetherMigrateOnce) {
  OUTPOST_FRESH_POSTGRES(url);
  constexpr int kServers = 4;
  std::vector<Result<std::unique_ptr<Store>>> opened;
  for (int i = 0; i < kServers; ++i) opened.emplace_back(nullptr);
  std::vector<std::thread> threads;
  for (int i = 0; i < kServers; ++i) {
    threads.emplace_back([&, i] { opened[i] = open_store(url); });
  }
  for (auto& thread : threads) thread.join();
  for (auto& store : opened) {
    ASSERT_OK(store);
    auto version = (*store)->schema_version();
    ASSERT_OK(version);
    EXPECT_EQ(*version, postgres::embedded_migrations().back().version);
  }
  auto rows = [&](const std::string& sql) {
    std::unique_ptr<PGconn, decltype(&PQfinish)> conn(PQconnectdb(url.c_str()), &PQfinish);
    std::unique_ptr<PGresult, decltype(&PQclear)> res(PQexec(conn.get(), sql.c_str()), &PQclear);
    return PQresultStatus(res.get()) == PGRES_TUPLES_OK ? std::atoll(PQgetvalue(res.get(), 0, 0))
                                                        : -1;
  };
  EXPECT_EQ(rows("SELECT COUNT(*) FROM schema_migrations"),
            static_cast<int64_t>(postgres::embedded_migrations().size()));
}

TEST(PostgresMigrationsTest, FailedMigrationLeavesNoTraceAndANewerSchemaIsRefused) {
  OUTPOST_FRESH_POSTGRES(url);
  const Migration first{1, "0001_a.sql", "CREATE TABLE a (x BIGINT);"};
  const Migration broken{2, "0002_b.sql",
                         "CREATE TABLE b (x BIGINT); INSERT INTO missing VALUES (1);"};
  const Migration fixed{2, "0002_b.sql", "CREATE TABLE b (x BIGINT); INSERT INTO b VALUES (1);"};

  const Migration with_broken[] = {first, broken};
  auto failed = postgres::open_postgres_store(url, with_broken);
  ASSERT_FALSE(failed);
  EXPECT_NE(failed.error().message.find("0002_b.sql"), std::string::npos) << failed.error().message;

  const Migration only_first[] = {first};
  auto reopened = postgres::open_postgres_store(url, only_first);
  ASSERT_OK(reopened);
  auto version = (*reopened)->schema_version();
  ASSERT_OK(version);
  EXPECT_EQ(*version, 1);
  reopened->reset();

  // Table b was rolled back with the failed migration, or creating it again would fail.
  const Migration with_fixed[] = {first, fixed};
  auto upgraded = postgres::open_postgres_store(url, with_fixed);
  ASSERT_OK(upgraded);
  version = (*upgraded)->schema_version();
  ASSERT_OK(version);
  EXPECT_EQ(*version, 2);
  upgraded->reset();
  ASSERT_OK(postgres::open_postgres_store(url, with_fixed));  // each migration runs once

  auto older = postgres::open_postgres_store(url, only_first);
  ASSERT_FALSE(older);
  EXPECT_EQ(older.error().code, Errc::kFailedPrecondition);
  EXPECT_NE(older.error().message.find("schema version 2"), std::string::npos)
      << older.error().message;
}

// More callers than connections: they wait their turn instead of failing.
TEST(PostgresPoolTest, ASmallPoolServesManyThreads) {
  OUTPOST_FRESH_POSTGRES(url);
  auto opened = open_store(url + "?pool_size=2");
  ASSERT_OK(opened);
  Store& store = **opened;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        auto r = store.append_audit("t" + std::to_string(t), "test.pool", "x", "{}", i);
        if (!r) {
          ADD_FAILURE() << r.error().describe();
          ++failures;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  auto audit = store.list_audit(0, 1000);
  ASSERT_OK(audit);
  EXPECT_EQ(audit->size(), 160u);
}

#undef OUTPOST_FRESH_POSTGRES

}  // namespace
}  // namespace outpost::store

namespace outpost::store {
namespace {

TEST_P(StoreTest, ReleaseDocumentsKeepEveryVersionAndNeverChangeOne) {
  for (int64_t v = 1; v <= 3; ++v) {
    auto put = store_->put_release_document({"root", v, "root-" + std::to_string(v), 100 + v});
    ASSERT_OK(put);
    EXPECT_TRUE(*put);
  }
  ASSERT_OK(store_->put_release_document({"timestamp", 7, "ts-7", 1}));
  // A version once stored is not replaced (another replica signed it first).
  auto again = store_->put_release_document({"root", 2, "other", 1});
  ASSERT_OK(again);
  EXPECT_FALSE(*again);
  auto two = store_->get_release_document("root", 2);
  ASSERT_OK(two);
  ASSERT_TRUE(two->has_value());
  EXPECT_EQ((*two)->body, "root-2");
  auto newest = store_->get_release_document("root", 0);
  ASSERT_OK(newest);
  ASSERT_TRUE(newest->has_value());
  EXPECT_EQ((*newest)->version, 3);
  auto ts = store_->get_release_document("timestamp", 0);
  ASSERT_OK(ts);
  ASSERT_TRUE(ts->has_value());
  EXPECT_EQ((*ts)->body, "ts-7");
  auto none = store_->get_release_document("targets", 0);
  ASSERT_OK(none);
  EXPECT_FALSE(none->has_value());
  auto missing = store_->get_release_document("root", 9);
  ASSERT_OK(missing);
  EXPECT_FALSE(missing->has_value());
}

}  // namespace
}  // namespace outpost::store
