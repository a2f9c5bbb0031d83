// The control plane's persistent state behind one interface. Backends (SQLite now,
// PostgreSQL later) share the schema, the migrations and one test suite.
//
// Contract: every method is thread-safe and blocking (call it from a worker thread, never
// from an I/O thread). Each mutating method is one transaction: it either applies fully or
// not at all. Times are Unix milliseconds (UTC). JSON-valued fields hold serialized JSON
// text; the store does not interpret them beyond what its queries need.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::store {

using Labels = std::map<std::string, std::string>;

struct OperatorToken {
  std::string id;          // public identifier, e.g. "admin" or a random id
  std::string token_hash;  // hex sha256 of the secret token
  std::string role;        // viewer | operator | admin
  std::string name;        // who holds it (audit actor)
  int64_t created_at = 0;
};

struct EnrollmentToken {
  std::string id;          // short public id (shown in lists and audit)
  std::string token_hash;  // hex sha256 of the secret
  std::string site;
  Labels labels;
  std::optional<int64_t> uses_left;   // nullopt = unlimited
  std::optional<int64_t> expires_at;  // nullopt = never
  int64_t created_at = 0;
  std::string created_by;
};

struct Device {
  std::string id;
  std::string site;
  Labels labels;
  std::string facts_json = "{}";  // hardware facts reported by the agent
  std::string public_key;         // base64 Ed25519 public key
  std::string credential_hash;    // hex sha256 of the device credential secret
  int64_t enrolled_at = 0;
  int64_t last_seen = 0;
  int64_t generation = 0;           // desired-state generation; only grows
  std::string desired_json = "{}";  // desired state document (unsigned payload)
  std::string desired_hash;         // hex sha256 of desired_json, to detect real changes
  std::string status_json = "{}";   // last status the device reported
  int64_t status_at = 0;
  std::string schedule_json =
      "{}";  // scheduler's per-deployment outcome incl. unschedulable reasons
  bool cordoned = false;
};

// One status report as a device sent it (see record_device_status).
struct StatusReport {
  int64_t seq = 0;
  int64_t received_at = 0;
  std::string status_json;
};

struct DeviceFilter {
  std::optional<std::string> site;  // exact site name
  Labels labels;                    // every label must match exactly
};

struct Artifact {
  std::string digest;  // "sha256:<hex>"
  int64_t size = 0;
  std::string media_type;  // e.g. "application/onnx", "application/octet-stream"
  int64_t created_at = 0;
};

struct ModelVariant {
  std::string selector_json = "{}";  // {"accelerator":"gpu","arch":"arm64"}
  std::string needs_json = "{}";     // {"min_memory_mb":512,"accelerator":"gpu"}
  std::string artifact_digest;       // "sha256:<hex>"
  std::string format;                // "onnx"
  std::string metadata_json = "{}";  // format facts: opset, inputs, outputs...
};

struct ModelVersion {
  std::string model;
  std::string version;  // semver
  std::string
      content_hash;  // hex sha256 over the variants (selector+needs+digest); immutability check
  int64_t created_at = 0;
  std::vector<ModelVariant> variants;
};

struct Deployment {
  std::string name;
  int64_t revision = 0;       // current revision, starts at 1
  std::string manifest_json;  // normalized manifest of the current revision
  std::string spec_hash;      // hex sha256 of normalized spec; equal => no new revision
  int64_t created_at = 0;
  int64_t updated_at = 0;
};

struct DeploymentRevision {
  std::string name;
  int64_t revision = 0;
  std::string manifest_json;
  std::string spec_hash;
  int64_t created_at = 0;
  std::string created_by;
};

struct AuditEntry {
  int64_t seq = 0;  // assigned by the store, 1, 2, 3...
  int64_t time = 0;
  std::string actor;
  std::string action;  // e.g. "deployment.apply"
  std::string target;  // e.g. "deployment/defect-detector"
  std::string details_json = "{}";
  std::string prev_hash;  // hash of the entry before ("" for the first)
  std::string hash;       // hex sha256 over the length-prefixed (seq, time, actor, action, target,
                          // details, prev_hash)
};

// Outcome of apply_deployment.
struct ApplyOutcome {
  Deployment deployment;
  bool changed = false;  // false when the spec hash equals the current one (no new revision)
};

class Store {
 public:
  virtual ~Store() = default;

  // Operator tokens.
  [[nodiscard]] virtual Status put_operator_token(const OperatorToken& token) = 0;
  [[nodiscard]] virtual Result<std::optional<OperatorToken>> find_operator_token_by_hash(
      const std::string& token_hash) = 0;

  // Enrollment tokens.
  [[nodiscard]] virtual Status put_enrollment_token(const EnrollmentToken& token) = 0;
  [[nodiscard]] virtual Result<std::vector<EnrollmentToken>> list_enrollment_tokens() = 0;
  [[nodiscard]] virtual Result<std::optional<EnrollmentToken>> find_enrollment_token_by_hash(
      const std::string& token_hash) = 0;
  // Atomically: finds the token by hash, checks it is not expired (now_ms) and has uses left,
  // decrements uses_left, inserts the device. Errors: kUnauthenticated (unknown token),
  // kFailedPrecondition (expired or used up; message says which), kAlreadyExists (device id).
  // On success returns the token as it was before the decrement.
  [[nodiscard]] virtual Result<EnrollmentToken> enroll_device(const std::string& token_hash,
                                                              int64_t now_ms,
                                                              const Device& device) = 0;

  // Devices.
  [[nodiscard]] virtual Result<std::optional<Device>> get_device(const std::string& id) = 0;
  [[nodiscard]] virtual Result<std::vector<Device>> list_devices(const DeviceFilter& filter) = 0;
  // Replaces the desired state when desired_hash differs from the stored one: sets
  // desired_json, desired_hash, schedule_json and generation = old generation + 1; returns
  // the new generation. When the hash is equal it only updates schedule_json and returns
  // the unchanged generation.
  [[nodiscard]] virtual Result<int64_t> update_desired_state(const std::string& id,
                                                             const std::string& desired_json,
                                                             const std::string& desired_hash,
                                                             const std::string& schedule_json) = 0;
  // Records a status report. Reports with seq > 0 are also appended to the device's status
  // log (a seq already logged is ignored: agents resend when an answer was lost), and only
  // the newest keep_log entries stay. devices.status_json follows the highest seq seen, so a
  // late, older report never replaces a newer one; seq 0 (no seq) always replaces it.
  // Returns false when the report was a duplicate. kNotFound when the device does not exist.
  [[nodiscard]] virtual Result<bool> record_device_status(const std::string& id, int64_t seq,
                                                          const std::string& status_json,
                                                          int64_t now_ms, int64_t keep_log) = 0;
  // The newest `limit` logged reports of a device, oldest first.
  [[nodiscard]] virtual Result<std::vector<StatusReport>> list_device_status_log(
      const std::string& id, int64_t limit) = 0;
  // Replaces the device's hardware facts (the agent reports a change).
  [[nodiscard]] virtual Status update_device_facts(const std::string& id,
                                                   const std::string& facts_json) = 0;
  [[nodiscard]] virtual Status touch_device(const std::string& id, int64_t now_ms) = 0;
  // Many last_seen updates in one transaction (the sync path batches them). last_seen never
  // goes back; ids that no longer exist are skipped. Returns how many devices were updated.
  [[nodiscard]] virtual Result<int64_t> touch_devices(
      const std::vector<std::pair<std::string, int64_t>>& seen) = 0;
  [[nodiscard]] virtual Status set_device_cordoned(const std::string& id, bool cordoned) = 0;

  // Artifacts (metadata only; blobs live on disk).
  // Inserts when new; returns false when the digest already existed (dedupe).
  [[nodiscard]] virtual Result<bool> put_artifact(const Artifact& artifact) = 0;
  [[nodiscard]] virtual Result<std::optional<Artifact>> get_artifact(const std::string& digest) = 0;
  [[nodiscard]] virtual Result<std::vector<Artifact>> list_artifacts() = 0;

  // Models. put_model_version inserts the version with its variants; when the version
  // exists with the same content_hash it returns false (no-op); with a different one it
  // fails with kConflict ("model M version V already exists with different content").
  [[nodiscard]] virtual Result<bool> put_model_version(const ModelVersion& version) = 0;
  [[nodiscard]] virtual Result<std::optional<ModelVersion>> get_model_version(
      const std::string& model, const std::string& version) = 0;
  [[nodiscard]] virtual Result<std::vector<ModelVersion>> list_model_versions(
      const std::string& model) = 0;  // ordered by created_at
  [[nodiscard]] virtual Result<std::vector<std::string>> list_models() = 0;  // names, sorted

  // Deployments. apply_deployment creates revision 1, or a new revision (+1) when
  // spec_hash differs from the current one; otherwise changes nothing (changed=false).
  [[nodiscard]] virtual Result<ApplyOutcome> apply_deployment(const std::string& name,
                                                              const std::string& manifest_json,
                                                              const std::string& spec_hash,
                                                              const std::string& actor,
                                                              int64_t now_ms) = 0;
  [[nodiscard]] virtual Result<std::optional<Deployment>> get_deployment(
      const std::string& name) = 0;
  [[nodiscard]] virtual Result<std::vector<Deployment>> list_deployments() = 0;  // by name
  [[nodiscard]] virtual Result<std::vector<DeploymentRevision>> list_deployment_revisions(
      const std::string& name) = 0;
  // Removes the deployment (its revisions are kept for audit). kNotFound when absent.
  [[nodiscard]] virtual Status delete_deployment(const std::string& name) = 0;

  // Audit log: append computes seq, prev_hash and hash inside the transaction (so the chain
  // stays linear under concurrent writers) and returns the stored entry.
  [[nodiscard]] virtual Result<AuditEntry> append_audit(const std::string& actor,
                                                        const std::string& action,
                                                        const std::string& target,
                                                        const std::string& details_json,
                                                        int64_t now_ms) = 0;
  // Entries with time >= since_ms, oldest first, at most limit.
  [[nodiscard]] virtual Result<std::vector<AuditEntry>> list_audit(int64_t since_ms,
                                                                   int64_t limit) = 0;

  // Schema version after migrations (the number of the last applied migration).
  [[nodiscard]] virtual Result<int> schema_version() = 0;
};

// Hash of an audit entry as defined above; shared by backends and by verification.
std::string audit_entry_hash(const AuditEntry& entry);

// Opens a store from a URL: "sqlite:/path/to/outpost.db". Runs pending migrations.
[[nodiscard]] Result<std::unique_ptr<Store>> open_store(const std::string& url);

// In-memory backend for tests: an SQLite database in memory with the same migrations.
[[nodiscard]] Result<std::unique_ptr<Store>> open_memory_store();

}  // namespace outpost::store
