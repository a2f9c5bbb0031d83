// Binary deltas between two versions of a blob (a model file, an app bundle) with zstd's
// "patch-from" mode: the base is the compression dictionary (a raw-content prefix), and long
// distance matching finds the unchanged runs anywhere in it. The delta is one ordinary zstd
// frame that records the target's size, so applying it needs no other metadata; the result
// must still be checked against the target's SHA-256 by the caller.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "common/error.h"

namespace outpost::delta {

// Media type the registry gives delta artifacts.
inline constexpr const char* kMediaType = "application/vnd.outpost.delta.zstd";

// zstd's patch-from needs the window to cover base and target: 2 GiB is its limit on 64-bit.
inline constexpr int64_t kMaxBlobBytes = 1LL << 31;

struct MakeOptions {
  int level = 19;   // zstd level 1..22 (19+ gives the smallest deltas of model weights)
  int threads = 0;  // zstd worker threads (0: compress on the calling thread)
  // Checked between slices of input; when it turns true make_delta stops with kUnavailable.
  const std::atomic<bool>* cancel = nullptr;
};

struct MakeResult {
  int64_t delta_bytes = 0;
  int64_t target_bytes = 0;
};

// Writes the delta that turns base_path into target_path to out_path (created or truncated;
// the caller makes it durable and names it). Both inputs are mapped, not read into memory.
// Errors: kNotFound/kIo for files, kInvalidArgument when an input exceeds kMaxBlobBytes,
// kInternal for a zstd failure (with zstd's message).
[[nodiscard]] Result<MakeResult> make_delta(const std::string& base_path,
                                            const std::string& target_path,
                                            const std::string& out_path,
                                            const MakeOptions& options = {});

struct ApplyResult {
  int64_t output_bytes = 0;
  std::string sha256_hex;  // of the output, so the caller compares it with the target digest
};

// Applies delta_path to base_path and writes the result to out_path (created or truncated and
// fsynced; the caller renames it into place once the digest matches). The output is written
// straight into a mapping of out_path, so memory stays near the size of the pages in use rather
// than base + target. Refuses a delta whose frame declares more than max_output_bytes (or no
// size at all) before writing anything.
// Errors: kNotFound/kIo for files, kInvalidArgument for a delta that is not one sized zstd
// frame or is too large, kIo when decompression fails (a corrupt delta or wrong base).
[[nodiscard]] Result<ApplyResult> apply_delta(const std::string& base_path,
                                              const std::string& delta_path,
                                              const std::string& out_path,
                                              int64_t max_output_bytes);

}  // namespace outpost::delta
