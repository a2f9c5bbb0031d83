// Signed release metadata, TUF-style: what the control plane publishes about the artifacts it
// serves and what a device checks before it installs one. Shared by the server (signs), the
// CLI (makes and signs root with the offline keys) and the agent (verifies).
//
// Three roles, each a JSON document {"signed": {...}, "signatures": [{"keyid", "sig"}]}:
//   root       keys and thresholds of every role; signed by a threshold of the root keys, which
//              stay offline with the operator (`outpost release keys init|rotate`). Version N+1
//              must be signed by a threshold of version N's root keys and of its own.
//   targets    every artifact the registry serves: digest -> length; signed by the server's
//              online targets key; version grows on every change; expires (default 30 days).
//   timestamp  the version, SHA-256 and length of the current targets document; signed by the
//              online timestamp key; short expiry (default 1 day). It takes TUF's snapshot role
//              too: with one targets document, naming its hash is what snapshot would do.
// A device refuses: metadata that is not signed by its role's threshold of keys (forgery or a
// stolen single key), a version below one it trusted (rollback), expired metadata (freeze), a
// targets document other than the one the timestamp names (mix-and-match), documents longer
// than their bound or the length signed for them (endless data), and blobs that are not in
// targets or longer than their signed length (see agent/release).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace outpost::release {

// Bounds on documents as fetched (endless-data protection before any signature is checked).
inline constexpr size_t kMaxRootBytes = 64 * 1024;
inline constexpr size_t kMaxTimestampBytes = 16 * 1024;
inline constexpr size_t kMaxTargetsBytes = 16 * 1024 * 1024;
inline constexpr int kMaxKeysPerRole = 32;

// The role names, as they appear in root's "roles".
inline constexpr std::string_view kRoot = "root";
inline constexpr std::string_view kTargets = "targets";
inline constexpr std::string_view kTimestamp = "timestamp";

// Hex SHA-256 of the raw 32-byte Ed25519 public key.
std::string key_id(std::string_view public_key);

struct RoleKeys {
  std::vector<std::string> keyids;
  int threshold = 1;
};

struct Root {
  int64_t version = 0;
  int64_t expires_ms = 0;                   // unix ms
  std::map<std::string, std::string> keys;  // keyid -> raw public key
  std::map<std::string, RoleKeys> roles;    // "root", "targets", "timestamp"
};

struct Targets {
  int64_t version = 0;
  int64_t expires_ms = 0;
  std::map<std::string, int64_t> targets;  // "sha256:<hex>" -> length in bytes
};

struct Timestamp {
  int64_t version = 0;
  int64_t expires_ms = 0;
  int64_t targets_version = 0;
  std::string targets_sha256;  // hex
  int64_t targets_length = 0;
};

// A parsed, not yet verified document.
struct Envelope {
  std::string type;  // the role: "root", "targets", "timestamp"
  nlohmann::json signed_part;
  std::vector<std::pair<std::string, std::string>> signatures;  // keyid, raw signature
};

// The bytes a signature covers: a context line, then the "signed" object as compact JSON with
// sorted keys (nlohmann's objects are ordered maps, so one value has one form).
std::string signing_bytes(const nlohmann::json& signed_part);

// Signs `signed_part` with each secret key (64 raw bytes) and returns the document text.
std::string sign_document(const nlohmann::json& signed_part,
                          const std::vector<std::string>& secret_keys);

// Parses a document of role `expected_type`, refusing more than max_bytes, deep nesting,
// a missing field or a wrong type (each error names the field).
[[nodiscard]] Result<Envelope> parse_envelope(std::string_view text, std::string_view expected_type,
                                              size_t max_bytes);
[[nodiscard]] Result<Root> root_from(const Envelope& env);
[[nodiscard]] Result<Targets> targets_from(const Envelope& env);
[[nodiscard]] Result<Timestamp> timestamp_from(const Envelope& env);

nlohmann::json root_signed(const Root& root);
nlohmann::json targets_signed(const Targets& targets);
nlohmann::json timestamp_signed(const Timestamp& timestamp);

// Counts the distinct keys of `root`'s `role` whose signature over env verifies; an error naming
// the document, the count and the threshold when it is short.
[[nodiscard]] Status verify_signatures(const Envelope& env, const Root& root,
                                       std::string_view role);

// RFC 3339 UTC ("2027-01-07T12:00:00Z"), as the documents carry expiry.
std::string format_time(int64_t unix_ms);
[[nodiscard]] Result<int64_t> parse_time(const std::string& text);

// --- Verification, as a device does it. Errors say which attack a refusal stops. -----------

// The first root: signed by a threshold of its own root keys.
[[nodiscard]] Result<Root> verify_first_root(std::string_view text);
// Root version trusted.version+1: signed by a threshold of the trusted root keys and of its own.
[[nodiscard]] Result<Root> verify_next_root(const Root& trusted, std::string_view text);
// A timestamp document: signatures, no rollback below `previous`, not expired at now_ms.
[[nodiscard]] Result<Timestamp> verify_timestamp(const Root& root, std::string_view text,
                                                 const std::optional<Timestamp>& previous,
                                                 int64_t now_ms);
// The targets document `timestamp` names: length and hash first, then signatures, version and
// expiry; no rollback below `previous`.
[[nodiscard]] Result<Targets> verify_targets(const Root& root, const Timestamp& timestamp,
                                             std::string_view text,
                                             const std::optional<Targets>& previous,
                                             int64_t now_ms);

}  // namespace outpost::release
