// The control plane's persistent state behind one interface. Backends (SQLite, the default, and
// PostgreSQL, for several server replicas) share the schema, the migration numbers and one test
// suite.
//
// Contract: every method is thread-safe and blocking (call it from a worker thread, never
// from an I/O thread). Stores in several processes may share one database (PostgreSQL; SQLite
// on one machine): each method's transaction stays correct with them writing concurrently. Each
// mutating method is one transaction: it either applies fully or not at all. Times are Unix
// milliseconds (UTC). JSON-valued fields hold serialized JSON text; the store does not interpret
// them beyond what its queries need.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "common/telemetry_batch.h"
#include "common/telemetry_metrics.h"

namespace outpost::store {

using Labels = std::map<std::string, std::string>;

// An operator user and its bearer token (one token per user).
struct OperatorToken {
  std::string id;          // public identifier: the user name ("admin" for the bootstrap token)
  std::string token_hash;  // hex sha256 of the secret token
  std::string role;        // viewer | operator | admin
  std::string name;        // the user (unique; the audit actor is "user:<name>")
  int64_t created_at = 0;
  std::vector<std::string> sites;  // site glob patterns the user is scoped to; empty = every site
  int64_t revoked_at = 0;          // when the token was revoked (0 = not revoked)
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
  int64_t revoked_at = 0;  // when `device revoke` refused its credential (0 = not revoked)
};

// One status report as a device sent it (see record_device_status).
struct StatusReport {
  int64_t seq = 0;
  int64_t received_at = 0;
  std::string status_json;
};

// One device's newly computed desired state (update_desired_states).
struct DesiredStateWrite {
  std::string device_id;
  std::string desired_json;
  std::string desired_hash;
  std::string schedule_json;
};

// One status report to store (record_device_statuses).
struct DeviceStatusWrite {
  std::string device_id;
  int64_t seq = 0;
  std::string status_json;
  int64_t now_ms = 0;
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

// A signed release metadata document (common/release_meta.h), as stored and served.
struct ReleaseDocument {
  std::string role;  // "root" | "targets" | "timestamp"
  int64_t version = 0;
  std::string body;
  int64_t created_at = 0;
};

// A delta between two blobs (artifact_deltas): applying `delta` to `base` gives `target`.
struct ArtifactDelta {
  std::string target;
  std::string base;
  std::string delta;  // digest of the delta artifact; "" unless state == "ready"
  int64_t delta_size = 0;
  int64_t target_size = 0;
  std::string state;   // "ready" | "skipped"
  std::string detail;  // why skipped, or how it was made ("zstd -19 patch-from")
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
  int64_t revision = 0;       // current (target) revision, starts at 1
  std::string manifest_json;  // normalized manifest of the current revision
  std::string spec_hash;      // hex sha256 of normalized spec; equal => no new revision
  int64_t created_at = 0;
  int64_t updated_at = 0;
  // What devices without a revision assignment run: the first revision of a new deployment,
  // then the target of the last rollout that completed.
  int64_t stable_revision = 0;
};

struct DeploymentRevision {
  std::string name;
  int64_t revision = 0;
  std::string manifest_json;
  std::string spec_hash;
  int64_t created_at = 0;
  std::string created_by;
  std::string bad_reason;  // why it was rolled back; "" when it is not marked bad
};

// A staged rollout of one deployment from one revision to another (src/server/rollouts/).
struct Rollout {
  int64_t id = 0;  // assigned by create_rollout
  std::string deployment;
  int64_t from_revision = 0;  // the deployment's stable revision when it started
  int64_t to_revision = 0;
  std::string state;            // running | paused | completed | rolled_back | aborted | superseded
  std::string doc_json = "{}";  // the controller's plan and progress
  int64_t created_at = 0;
  int64_t updated_at = 0;
  std::string created_by;
};

// A device that runs another revision of a deployment than the deployment's stable one.
struct RevisionAssignment {
  std::string deployment;
  std::string device_id;
  int64_t revision = 0;
};

// One step of a rollout, applied in one transaction: the rollout row as given, then the
// deployment's assignments and revisions.
struct RolloutUpdate {
  Rollout rollout;                 // id > 0; every field but id, deployment, created_* is written
  bool clear_assignments = false;  // first drop every assignment of the deployment
  std::vector<std::pair<std::string, int64_t>> assign;  // device -> revision
  std::vector<std::string> unassign;                    // devices back to the stable revision
  std::optional<int64_t> stable_revision;               // the deployment's new stable revision
  // The deployment's current revision goes back to this stored revision (its manifest and
  // spec hash): a rollback.
  std::optional<int64_t> reset_to_revision;
  std::optional<std::pair<int64_t, std::string>> mark_bad;  // revision, why
};

// A named group of devices; devices name their site at enrollment, this holds its settings.
struct Site {
  std::string name;
  std::string timezone = "UTC";  // IANA name, for maintenance windows in site-local time
  std::string region;
  int64_t updated_at = 0;
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

// ---- Telemetry (see ingest_telemetry and query_telemetry below) ----
//
// A *point* is one stored value of one series at one time: one row of telemetry_points. A
// series is (device, site, metric, deployment, revision, model, version, role, detail). A
// health record gives 8-10 points (one per gauge), an inference record 6 (requests, errors,
// invalid, fallbacks, and the latency and confidence histograms, each histogram one point
// carrying its count, sum and buckets), an event or a sample record 1.

struct TelemetryIngestOutcome {
  int64_t acked = 0;       // the device's watermark after this batch: highest seq stored or acked
  int64_t stored = 0;      // records stored from this batch
  int64_t duplicates = 0;  // records at or below the watermark, skipped
  int64_t points = 0;      // points written
};

// One device's batch for ingest_telemetry_batches (the batch is borrowed for the call).
struct TelemetryIngest {
  std::string device_id;
  std::string site;
  const telemetry::Batch* batch = nullptr;
};

struct TelemetryRetention {
  int64_t raw_ms = 7LL * 24 * 3600 * 1000;       // raw points and events
  int64_t rollup_ms = 400LL * 24 * 3600 * 1000;  // hourly rollups
};

struct TelemetryMaintenanceOutcome {
  int64_t hours_rolled_up = 0;
  int64_t rollups_written = 0;
  int64_t points_deleted = 0;
  int64_t rollups_deleted = 0;
  int64_t events_deleted = 0;
};

// Merge of points (of one series, bucket or group). Counters: `sum` is the total. Gauges:
// sum/points is the mean. Histograms: `count`, `hist_sum` and `buckets` are the merged
// histogram (per-bucket counts, le ascending, +infinity for the open bucket).
struct TelemetryStats {
  int64_t points = 0;
  double sum = 0;
  double min = 0;
  double max = 0;
  double last = 0;
  int64_t last_time = -1;
  uint64_t count = 0;
  double hist_sum = 0;
  std::map<double, uint64_t> buckets;

  void add_value(int64_t time, double value);
  void add_histogram(int64_t time, uint64_t count, double sum,
                     const std::vector<std::pair<double, uint64_t>>& buckets);
  void merge(const TelemetryStats& other);
  double mean() const;  // gauges: of the values; histograms: of the observations
  // Histogram quantile (0..1) from the merged buckets, interpolated linearly inside the
  // bucket the rank falls in (between the previous bucket's bound, or 0, and its own); in the
  // open bucket the last finite bound is the answer. 0 when empty.
  double quantile(double q) const;
};

struct TelemetryQuery {
  std::string metric;  // one of telemetry::kMetrics
  std::optional<std::string> device;
  std::optional<std::string> site;
  std::optional<std::string> deployment;
  int64_t since_ms = 0;  // inclusive
  int64_t until_ms = 0;  // exclusive
  int64_t step_ms = 0;   // width of the time buckets; at most kMaxTelemetryBuckets of them
  // Group series by: "" (one group), device, site, deployment, revision, model, version, role
  // or detail.
  std::string by;
};

inline constexpr int64_t kMaxTelemetryBuckets = 10'000;

struct TelemetrySeriesResult {
  std::string group;                  // the `by` value ("" when not grouped)
  std::vector<TelemetryStats> steps;  // one per step: [since + i*step, since + (i+1)*step)
  TelemetryStats total;
  std::vector<std::string> devices;  // devices with points in the range, sorted
};

struct TelemetryQueryResult {
  telemetry::MetricKind kind = telemetry::MetricKind::kGauge;
  std::vector<TelemetrySeriesResult> series;  // sorted by group
  TelemetryStats total;
  int64_t devices = 0;        // distinct devices with points in the range
  bool from_rollups = false;  // part of the range was answered from hourly rollups
};

// Running totals per (deployment, model, version, role) since the first record: what the
// fleet served, exact however long ago raw points expired.
struct TelemetryTotal {
  std::string deployment;
  std::string model;
  std::string version;
  std::string role;
  uint64_t requests = 0;
  uint64_t served = 0;
  uint64_t errors = 0;
  uint64_t invalid = 0;
  uint64_t fallbacks = 0;
  TelemetryStats latency;     // histogram fields only
  TelemetryStats confidence;  // histogram fields only
};

// What the control plane knows about one device's telemetry stream.
struct TelemetryDeviceState {
  std::string device_id;
  int64_t acked_seq = 0;
  telemetry::DropCounts dropped;  // as last reported (cumulative on the device)
  int64_t last_ingest_at = 0;
  int64_t last_health_at = 0;        // time of the newest health record
  std::optional<double> sync_lag_s;  // from the newest health record
  int64_t batches = 0;
  int64_t records = 0;
};

// One version of a secret (issue 18). The store never sees plaintext: `ciphertext` is sealed by
// the server's secret vault (src/server/secrets/) and opaque here.
struct SecretVersion {
  std::string name;
  int64_t version = 0;            // 1, 2, 3...
  std::vector<std::string> keys;  // key names, sorted (metadata: shown by `secret show`)
  std::string ciphertext;         // base64, opaque to the store
  int64_t activate_at = 0;        // when devices switch to it (ms)
  int64_t created_at = 0;
  std::string created_by;
};

struct Secret {
  std::string name;
  int64_t created_at = 0;
  int64_t updated_at = 0;
  std::vector<SecretVersion> versions;  // ascending by version
};

// Outcome of apply_deployment.
struct ApplyOutcome {
  Deployment deployment;
  bool changed = false;  // false when the spec hash equals the current one (no new revision)
};

class Store {
 public:
  virtual ~Store() = default;

  // Operator tokens (users). put replaces the token with the same id, or inserts it;
  // kAlreadyExists when another token has the same hash or the same name.
  [[nodiscard]] virtual Status put_operator_token(const OperatorToken& token) = 0;
  // Inserts a new token; kAlreadyExists naming the user (field "name") when the name or id is
  // taken, by a revoked user too (names are audit actors and are never reused).
  [[nodiscard]] virtual Status create_operator_token(const OperatorToken& token) = 0;
  // Revoked tokens are found too (revoked_at > 0): refusing them is the caller's business.
  [[nodiscard]] virtual Result<std::optional<OperatorToken>> find_operator_token_by_hash(
      const std::string& token_hash) = 0;
  [[nodiscard]] virtual Result<std::optional<OperatorToken>> find_operator_token_by_name(
      const std::string& name) = 0;
  [[nodiscard]] virtual Result<std::vector<OperatorToken>> list_operator_tokens() = 0;  // by name
  // Marks the user's token revoked at `revoked_at` and returns it as stored; a token already
  // revoked keeps its first revocation time. kNotFound naming the user when unknown.
  [[nodiscard]] virtual Result<OperatorToken> revoke_operator_token(const std::string& name,
                                                                    int64_t revoked_at) = 0;

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
  // The same for many devices in one transaction (a rollout step or a new revision reaching
  // thousands of devices: one commit instead of one per device). Generations in order; a
  // device that does not exist fails the whole group (kNotFound naming it), nothing written.
  [[nodiscard]] virtual Result<std::vector<int64_t>> update_desired_states(
      const std::vector<DesiredStateWrite>& writes) = 0;
  // Records a status report. Reports with seq > 0 are also appended to the device's status
  // log (a seq already logged is ignored: agents resend when an answer was lost), and only
  // the newest keep_log entries stay. devices.status_json follows the highest seq seen, so a
  // late, older report never replaces a newer one; seq 0 (no seq) always replaces it.
  // Returns false when the report was a duplicate. kNotFound when the device does not exist.
  [[nodiscard]] virtual Result<bool> record_device_status(const std::string& id, int64_t seq,
                                                          const std::string& status_json,
                                                          int64_t now_ms, int64_t keep_log) = 0;
  // Several reports in one transaction (one commit for a whole group of devices), each with
  // record_device_status's rules. One outcome per write, in order: a device that does not exist
  // fails alone (kNotFound); should the group's transaction fail, each write is tried again in
  // a transaction of its own, so one bad write never fails the others.
  [[nodiscard]] virtual Result<std::vector<Result<bool>>> record_device_statuses(
      const std::vector<DeviceStatusWrite>& writes, int64_t keep_log) = 0;
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
  // Marks the device revoked at `revoked_at` (ms; 0 clears it). kNotFound for an unknown id.
  [[nodiscard]] virtual Status set_device_revoked(const std::string& id, int64_t revoked_at) = 0;

  // Release metadata. put inserts; false when that (role, version) is stored already (versions
  // never change once signed). get with version 0 returns the newest of the role.
  [[nodiscard]] virtual Result<bool> put_release_document(const ReleaseDocument& doc) = 0;
  [[nodiscard]] virtual Result<std::optional<ReleaseDocument>> get_release_document(
      const std::string& role, int64_t version) = 0;

  // Artifacts (metadata only; blobs live on disk).
  // Inserts when new; returns false when the digest already existed (dedupe).
  [[nodiscard]] virtual Result<bool> put_artifact(const Artifact& artifact) = 0;
  [[nodiscard]] virtual Result<std::optional<Artifact>> get_artifact(const std::string& digest) = 0;
  [[nodiscard]] virtual Result<std::vector<Artifact>> list_artifacts() = 0;
  // Deltas: put inserts or replaces the (target, base) row; list gives those of one target
  // ("" = all), ordered by target then base.
  [[nodiscard]] virtual Status put_artifact_delta(const ArtifactDelta& delta) = 0;
  [[nodiscard]] virtual Result<std::vector<ArtifactDelta>> list_artifact_deltas(
      const std::string& target) = 0;

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
  // Removes the deployment (its revisions are kept for audit) with its revision assignments;
  // its running or paused rollouts become aborted. kNotFound when absent.
  [[nodiscard]] virtual Status delete_deployment(const std::string& name) = 0;

  // Rollouts. create_rollout inserts a running rollout and marks the deployment's running or
  // paused ones superseded, in one transaction; returns the new id.
  [[nodiscard]] virtual Result<int64_t> create_rollout(const Rollout& rollout) = 0;
  // Applies one step (see RolloutUpdate). kNotFound when the rollout or a revision is absent.
  [[nodiscard]] virtual Status update_rollout(const RolloutUpdate& update) = 0;
  [[nodiscard]] virtual Result<std::optional<Rollout>> get_rollout(int64_t id) = 0;
  // Newest first; only running and paused ones when active_only; "" = every deployment.
  [[nodiscard]] virtual Result<std::vector<Rollout>> list_rollouts(const std::string& deployment,
                                                                   bool active_only,
                                                                   int64_t limit) = 0;
  // Every assignment ("" = of every deployment), by deployment then device.
  [[nodiscard]] virtual Result<std::vector<RevisionAssignment>> list_revision_assignments(
      const std::string& deployment) = 0;

  // Secrets. put_secret_version stores the next version of a secret in one transaction:
  // version 1 creates the secret (kAlreadyExists naming it when it exists); version N > 1 needs
  // the secret's newest version to be N-1 (kNotFound when the secret does not exist, kConflict
  // when another version was added meanwhile: the caller sealed for a version number that is
  // taken). It then deletes the versions superseded at now_ms: those older than the newest
  // version whose activate_at <= now_ms (the new one counts).
  [[nodiscard]] virtual Status put_secret_version(const SecretVersion& version, int64_t now_ms) = 0;
  [[nodiscard]] virtual Result<std::optional<Secret>> get_secret(const std::string& name) = 0;
  [[nodiscard]] virtual Result<std::vector<Secret>> list_secrets() = 0;  // by name, with versions
  // Removes the secret and every version. kNotFound naming it when absent.
  [[nodiscard]] virtual Status delete_secret(const std::string& name) = 0;

  // Sites: put creates or replaces.
  [[nodiscard]] virtual Status put_site(const Site& site) = 0;
  [[nodiscard]] virtual Result<std::optional<Site>> get_site(const std::string& name) = 0;
  [[nodiscard]] virtual Result<std::vector<Site>> list_sites() = 0;  // by name

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

  // Telemetry. ingest_telemetry stores a device's decoded batch in one transaction: records
  // with seq above the device's watermark are stored (points tagged with `site`), the rest are
  // counted as duplicates; the watermark becomes max(watermark, batch.last_seq) (gaps are
  // records the device dropped); the device's drop counts, last-ingest time and the fleet
  // totals (TelemetryTotal) move with it. A resent, replayed or overlapping batch therefore
  // stores and counts each record once. Points of hours already rolled up also merge into
  // the rollup, so late data from a device that was offline is not lost to queries.
  [[nodiscard]] virtual Result<TelemetryIngestOutcome> ingest_telemetry(
      const std::string& device_id, const std::string& site, const telemetry::Batch& batch,
      int64_t now_ms) = 0;
  // Several devices' batches in one transaction (group commit: one fsync for all), each
  // exactly as ingest_telemetry would store it, each in its own savepoint: a batch that fails
  // leaves no trace and gets its error in its slot, the others are stored. The outer error is
  // for a failure of the transaction itself (nothing stored).
  [[nodiscard]] virtual Result<std::vector<Result<TelemetryIngestOutcome>>>
  ingest_telemetry_batches(const std::vector<TelemetryIngest>& batches, int64_t now_ms) = 0;
  // Rolls every complete hour (before now_ms's hour) not yet rolled up into hourly rollups,
  // then deletes raw points and events older than retention.raw_ms (only hours already
  // rolled up) and rollups older than retention.rollup_ms. Each hour's rollup is one
  // transaction, the deletions another: an interrupted run leaves a consistent store and the
  // next run continues. Call it periodically (e.g. every minute; it is cheap when idle).
  [[nodiscard]] virtual Result<TelemetryMaintenanceOutcome> maintain_telemetry(
      int64_t now_ms, const TelemetryRetention& retention) = 0;
  // Time series and aggregates of one metric; kInvalidArgument naming the field for an
  // unknown metric (the message lists the known ones), a bad `by`, an empty range or too
  // many steps. Raw points answer hours not yet expired; hourly rollups answer older hours
  // (and any rolled-up hour when step is a whole number of hours). Rollups have hour
  // granularity: an hour served from them counts whole, in the step its start falls in.
  [[nodiscard]] virtual Result<TelemetryQueryResult> query_telemetry(
      const TelemetryQuery& query) = 0;
  // Fleet running totals, sorted by deployment, model, version, role.
  [[nodiscard]] virtual Result<std::vector<TelemetryTotal>> list_telemetry_totals() = 0;
  // Per-device telemetry state, sorted by device id (devices that never sent telemetry absent).
  [[nodiscard]] virtual Result<std::vector<TelemetryDeviceState>> list_telemetry_devices() = 0;

  // Schema version after migrations (the number of the last applied migration).
  [[nodiscard]] virtual Result<int> schema_version() = 0;
};

// Hash of an audit entry as defined above; shared by backends and by verification.
std::string audit_entry_hash(const AuditEntry& entry);

// Opens a store from a URL: "sqlite:/path/to/outpost.db", or
// "postgres://user:password@host:port/dbname?sslmode=require" (also postgresql://; libpq's URI
// syntax, plus pool_size=N for the connection pool). Runs pending migrations.
[[nodiscard]] Result<std::unique_ptr<Store>> open_store(const std::string& url);

// The URL with its password (user:PASSWORD@, or a password= query parameter) replaced by ***,
// for logs and error messages.
std::string redact_store_url(std::string_view url);

// In-memory backend for tests: an SQLite database in memory with the same migrations.
[[nodiscard]] Result<std::unique_ptr<Store>> open_memory_store();

}  // namespace outpost::store
