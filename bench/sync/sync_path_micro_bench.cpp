// outpost-micro-bench: the per-request pieces of a device sync, one at a time (Google
// Benchmark). Each sync authenticates (get_device + SHA-256 of the credential) and records
// last_seen (touch_device, one SQLite write transaction); these show what each costs alone
// and whether it scales with threads. The disk store lives under $OUTPOST_BENCH_DIR (default
// /tmp): its file system decides what an fsync costs. $OUTPOST_BENCH_DEVICES (default 1000)
// sets how many devices the store holds (each is enrolled with its own commit at setup).
#include <stdlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "common/crypto.h"
#include "common/digest.h"
#include "store/store.h"

namespace outpost::bench {
namespace {

int device_count() {
  const char* text = std::getenv("OUTPOST_BENCH_DEVICES");
  const int count = text && *text ? std::atoi(text) : 1000;
  return count > 0 ? count : 1000;
}

// One store shared by every thread of a benchmark run, set up and torn down around it.
struct SharedStore {
  std::string dir;
  std::unique_ptr<store::Store> store;
  std::vector<std::string> device_ids;
};
// Google Benchmark's setup hooks are plain functions, so the store they share is a static.
std::unique_ptr<SharedStore> shared;

void fail(const std::string& what) {
  std::fprintf(stderr, "outpost-micro-bench: %s\n", what.c_str());
  std::abort();  // a benchmark with no store would measure nothing
}

void open_store(bool on_disk) {
  crypto::init();
  shared = std::make_unique<SharedStore>();
  Result<std::unique_ptr<store::Store>> opened = store::open_memory_store();
  if (on_disk) {
    const char* parent = std::getenv("OUTPOST_BENCH_DIR");
    std::string templ = std::string(parent && *parent ? parent : "/tmp") + "/outpost-micro.XXXXXX";
    if (!mkdtemp(templ.data())) fail("cannot create a temp dir under " + templ);
    shared->dir = templ;
    opened = store::open_store("sqlite:" + shared->dir + "/outpost.db");
  }
  if (!opened) fail("opening the store: " + opened.error().describe());
  shared->store = std::move(*opened);

  store::EnrollmentToken token;
  token.id = "et-bench";
  token.token_hash = sha256_hex("bench-token");
  token.site = "bench";
  if (auto put = shared->store->put_enrollment_token(token); !put) {
    fail("putting the enrollment token: " + put.error().describe());
  }
  for (int i = 0, n = device_count(); i < n; ++i) {
    store::Device device;
    device.id = crypto::random_hex(6, "d-");
    device.site = "bench";
    device.public_key = crypto::base64_encode(crypto::ed25519_generate().public_key);
    device.credential_hash = sha256_hex(crypto::random_hex(32));
    if (auto enrolled = shared->store->enroll_device(token.token_hash, 1, device); !enrolled) {
      fail("enrolling a device: " + enrolled.error().describe());
    }
    shared->device_ids.push_back(device.id);
  }
}

void close_store() {
  shared->store.reset();
  if (!shared->dir.empty()) std::filesystem::remove_all(shared->dir);
  shared.reset();
}

void setup_disk(const benchmark::State&) { open_store(true); }
void setup_memory(const benchmark::State&) { open_store(false); }
void teardown(const benchmark::State&) { close_store(); }

const std::string& device_for(const benchmark::State& state, int64_t i) {
  const auto& ids = shared->device_ids;
  return ids[static_cast<size_t>(i * state.threads() + state.thread_index()) % ids.size()];
}

// touch_device: the write every sync makes (UPDATE last_seen; a commit).
void BM_TouchDevice(benchmark::State& state) {
  int64_t i = 0;
  int64_t now = 1'000'000;
  for (auto _ : state) {
    auto touched = shared->store->touch_device(device_for(state, i++), ++now);
    if (!touched) state.SkipWithError(touched.error().describe().c_str());
  }
  state.SetItemsProcessed(state.iterations());
}

// get_device: the read device authentication makes on every request.
void BM_GetDevice(benchmark::State& state) {
  int64_t i = 0;
  for (auto _ : state) {
    auto device = shared->store->get_device(device_for(state, i++));
    if (!device || !*device) state.SkipWithError("get_device failed");
    benchmark::DoNotOptimize(device);
  }
  state.SetItemsProcessed(state.iterations());
}

// The credential check: SHA-256 of the 64-hex-character secret.
void BM_CredentialHash(benchmark::State& state) {
  const std::string secret = std::string(64, 'a');
  for (auto _ : state) benchmark::DoNotOptimize(sha256_hex(secret));
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(BM_TouchDevice)
    ->Name("touch_device/disk")
    ->Setup(setup_disk)
    ->Teardown(teardown)
    ->UseRealTime()
    ->ThreadRange(1, 4);
BENCHMARK(BM_TouchDevice)
    ->Name("touch_device/memory")
    ->Setup(setup_memory)
    ->Teardown(teardown)
    ->UseRealTime()
    ->ThreadRange(1, 4);
BENCHMARK(BM_GetDevice)
    ->Name("get_device/disk")
    ->Setup(setup_disk)
    ->Teardown(teardown)
    ->UseRealTime()
    ->ThreadRange(1, 4);
BENCHMARK(BM_CredentialHash)->Name("sha256_credential");

}  // namespace
}  // namespace outpost::bench

BENCHMARK_MAIN();
