// Deployment manifests (DESIGN §3): parsing YAML/JSON text, strict validation into a typed
// Manifest with a normalized form whose hash decides whether an apply makes a new revision.
//
// Nothing here throws: the YAML and JSON libraries are wrapped and their failures come back
// as Error values. Validation errors carry the offending field's path in `Error::field`
// ("spec.rollout.waves[2]") and their message starts with that path.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace outpost::deployments {

// Parses a manifest document. Text whose first non-space character is '{' is read as
// JSON, anything else as YAML (1.2 core schema: plain `42`, `0.8`, `true`, `null`/`~` become
// numbers, booleans and null; quoted scalars and things like `1.4.0`, `10%`, `02:00-04:00`
// stay strings). Refuses duplicate keys, several documents, and invalid UTF-8. Syntax
// errors (kInvalidArgument) say "line L, column C".
[[nodiscard]] Result<nlohmann::json> parse_document(std::string_view text);

struct Manifest {
  // Which devices the deployment targets. Empty lists mean "no restriction".
  struct Selector {
    std::vector<std::string> sites;             // shell globs against the device's site
    std::map<std::string, std::string> labels;  // every label must equal the device's
    std::vector<std::string> devices;           // device ids
  };
  struct ModelRef {
    std::string name;
    std::string version;
  };
  struct Fallback {
    std::string model;
    std::string version;
    double min_confidence = 0.0;  // answers under this go to the fallback; 0 = never
  };
  struct Serve {
    std::string route;  // defaults to "/models/<deployment name>"
    std::optional<Fallback> fallback;
  };
  struct Health {
    std::optional<std::string> http;  // path polled on the workload's port
    std::vector<std::string> exec;    // command whose exit code 0 means healthy
    int64_t period_ms = 10'000;
    int64_t timeout_ms = 5'000;
    // A new version must pass its first check within this, or the agent rolls it back.
    int64_t deadline_ms = 60'000;
  };
  struct Resources {
    std::optional<int64_t> memory_bytes;
    std::optional<double> cpus;  // fraction of cores, e.g. 0.5
    std::optional<int64_t> open_files;
  };
  enum class Restart { kAlways, kOnFailure, kNever };
  enum class SecretRotate { kRestart, kSighup };
  struct Workload {
    std::optional<std::string> bundle;  // "sha256:<hex>" app bundle
    std::vector<std::string> command;   // never empty
    std::map<std::string, std::string> env;
    std::optional<Health> health;
    Restart restart = Restart::kOnFailure;
    // Where it listens (health.http polls it); absent: the agent picks a free port. Either way
    // the workload gets it as OUTPOST_PORT.
    std::optional<int64_t> port;
    int64_t stop_grace_ms = 10'000;  // SIGTERM, then SIGKILL after this
    Resources resources;
    // spec.secrets as environment variables too: OUTPOST_SECRET_<NAME>_<KEY> (upper case,
    // other characters '_'), besides the files under $OUTPOST_SECRETS_DIR. Needs spec.secrets.
    bool secret_env = false;
    // What the agent does when a secret version switches: restart the process, or rewrite the
    // files and send it SIGHUP (not with secret_env: the environment of a running process
    // cannot change). Normalized only when not the default.
    SecretRotate on_secret_rotate = SecretRotate::kRestart;
  };
  struct Placement {
    bool per_device = true;
    int64_t replicas_per_site = 0;  // > 0 exactly when !per_device
    int64_t migrate_after_ms = 0;   // only with replicas_per_site
  };
  // A wave or max_unavailable: either a percentage of the targeted devices or a count.
  struct Amount {
    bool percent = true;
    int64_t value = 0;
    bool operator==(const Amount&) const = default;
  };
  struct Gates {
    std::optional<double> max_error_rate;
    std::optional<double> max_p95_latency_ms;
    std::optional<int64_t> max_restarts;
    std::optional<double> max_fallback_rate;
    std::optional<double> max_confidence_shift;
    // Devices of the rollout whose new revision failed (the agent rolled it back or could not
    // start it) before the rollout fails.
    int64_t max_failed_devices = 0;
    // Requests the new revision must have served before the rate, latency and confidence
    // gates judge it (fewer: "waiting for data", which does not stop a wave).
    int64_t min_requests = 20;
  };
  enum class OnFailure { kRollback, kPause };
  // Daily window in site-local minutes since midnight; end < start wraps past midnight.
  struct Window {
    int start_minute = 0;
    int end_minute = 0;
    bool contains(int minute_of_day) const;
  };
  struct Rollout {
    std::vector<Amount> waves;  // default [100%]
    int64_t bake_ms = 0;
    Amount max_unavailable{true, 10};
    Gates gates;
    OnFailure on_failure = OnFailure::kRollback;
    std::optional<Window> window;
    std::optional<int64_t> offline_grace_ms;
  };
  struct Telemetry {
    double sample = 0.1;
    double on_anomaly = 1.0;
  };

  std::string name;
  std::map<std::string, std::string> labels;  // metadata.labels
  Selector selector;
  std::optional<ModelRef> model;
  std::optional<Serve> serve;
  std::optional<Workload> workload;
  nlohmann::json config = nlohmann::json::object();
  std::vector<std::string> secrets;  // sorted
  Placement placement;
  Rollout rollout;
  Telemetry telemetry;

  // The whole manifest with every default filled in, in one canonical form: object keys
  // sorted, durations in canonical units ("600s" -> "10m"), fractions as floating point,
  // unordered lists (sites, devices, secrets) sorted. Validating it again gives itself.
  nlohmann::json normalized;

  // Hex sha256 of normalized.dump(): equal for manifests that mean the same thing (YAML or
  // JSON, any key order), different for any real change.
  [[nodiscard]] std::string spec_hash() const;
};

// Strictly validates a parsed document (see DESIGN §3): unknown fields, wrong types and
// impossible values are refused with kInvalidArgument naming the field's path.
[[nodiscard]] Result<Manifest> validate_manifest(const nlohmann::json& doc);

// What spec.selector.sites accepts: a site name or a shell glob (fnmatch) like plant-*, 1-128
// printable characters without spaces.
bool is_site_pattern(std::string_view text);

// What spec.secrets and `outpost secret` accept as a secret name: lowercase letters, digits,
// '-', '.' and '_', 1-63 characters, starting with a letter. kInvalidArgument on `field` saying so.
[[nodiscard]] Status check_secret_name(std::string_view name, const std::string& field);

// parse_document + validate_manifest.
[[nodiscard]] Result<Manifest> parse_manifest(std::string_view text);

// Durations as manifests write them: "<int><unit>" parts with units d, h, m, s, ms in
// descending order, each at most once ("1h30m", "250ms", "0s"). Returns milliseconds.
[[nodiscard]] Result<int64_t> parse_duration(std::string_view text);
// Canonical text of a duration: "10m", "1h30m", "0s".
std::string format_duration(int64_t ms);

// How check_references looks up what a manifest points at. Callbacks may fail (store
// down); their errors come back from check_references with context.
struct ReferenceLookup {
  std::function<Result<bool>(const std::string& model, const std::string& version)>
      model_version_exists;
  std::function<Result<bool>(const std::string& digest)> artifact_exists;
  // Optional: when set, a model with no versions at all is reported on spec.model.name.
  std::function<Result<bool>(const std::string& model)> model_exists;
};

// Checks that spec.model, spec.serve.fallback and spec.workload.bundle exist. A missing one
// is kInvalidArgument with the field's path, e.g. field "spec.model.version", message
// "spec.model.version: model defect-net version 9.9.9 does not exist".
[[nodiscard]] Status check_references(const Manifest& manifest, const ReferenceLookup& lookup);

}  // namespace outpost::deployments
