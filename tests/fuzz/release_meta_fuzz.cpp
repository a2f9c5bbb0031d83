// Fuzz target for signed release metadata (common/release_meta), which every device parses from
// whatever its server, relay or a mirror answers: any bytes give a document that keeps the
// parsers' promises, or an error -- never a crash, a hang or an exception -- and nothing
// verifies against a root whose keys did not sign it.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/crypto.h"
#include "common/release_meta.h"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

// A root of fresh keys: no input can carry a valid signature by them.
const outpost::release::Root& fresh_root() {
  static const outpost::release::Root root = [] {
    outpost::crypto::init();
    outpost::release::Root r;
    r.version = 1;
    r.expires_ms = 4'000'000'000'000;
    auto key = outpost::crypto::ed25519_generate();
    const std::string id = outpost::release::key_id(key.public_key);
    r.keys[id] = key.public_key;
    for (const char* role : {"root", "targets", "timestamp"}) r.roles[role] = {{id}, 1};
    return r;
  }();
  return root;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace release = outpost::release;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const release::Root& root = fresh_root();
  if (auto env = release::parse_envelope(text, release::kRoot, release::kMaxRootBytes)) {
    if (auto r = release::root_from(*env)) {
      for (const auto& [name, role] : r->roles) {
        check(role.threshold >= 1 && role.threshold <= static_cast<int>(role.keyids.size()));
        for (const auto& id : role.keyids) check(r->keys.contains(id));
      }
      // Parsed roots verify (under their own keys) only when really signed by them.
      (void)release::verify_first_root(text);
    }
  }
  if (auto env = release::parse_envelope(text, release::kTargets, release::kMaxTargetsBytes)) {
    if (auto t = release::targets_from(*env)) {
      for (const auto& [digest, length] : t->targets) check(length >= 0 && digest.size() == 71);
    }
  }
  if (auto env = release::parse_envelope(text, release::kTimestamp, release::kMaxTimestampBytes)) {
    if (auto t = release::timestamp_from(*env)) {
      check(t->targets_sha256.size() == 64 && t->targets_length >= 1);
    }
  }
  check(!release::verify_timestamp(root, text, std::nullopt, 0));
  check(!release::verify_next_root(root, text));
  release::Timestamp ts{1, 4'000'000'000'000, 1, std::string(64, '0'), 1 << 20};
  check(!release::verify_targets(root, ts, text, std::nullopt, 0));
  return 0;
}
