#include "server/deployments/manifest.h"

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace outpost::deployments {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::StartsWith;

const std::string kBundle =
    "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

// DESIGN §3, verbatim but for a real bundle digest.
const std::string kDesignYaml = R"(apiVersion: outpost/v1
kind: Deployment
metadata: {name: defect-detector}
spec:
  selector: {sites: ["plant-*"], labels: {line: assembly}}
  model: {name: defect-net, version: 1.4.0}           # variant picked per device
  serve:                                              # built-in model server
    route: /models/defect-detector                    # local ingress path on the agent
    fallback: {model: defect-net-tiny, version: 1.0.0, min_confidence: 0.6}
  workload:                                           # optional companion process
    bundle: )" + kBundle + R"(                         # tar.zst app bundle
    command: ["bin/line-monitor", "--model-url", "${OUTPOST_MODEL_URL}"]
    env: {LOG_LEVEL: info}
    health: {http: /healthz, period: 10s}
    restart: on-failure
  config: {threshold: 0.8}
  secrets: [camera-credentials]
  placement: {per_device: true}                       # or {replicas_per_site: 1, migrate_after: 5m}
  rollout:
    waves: [1%, 10%, 50%, 100%]
    bake: 10m
    max_unavailable: 10%
    gates: {max_error_rate: 0.01, max_p95_latency_ms: 50, max_restarts: 3}
    on_failure: rollback
    window: "02:00-04:00"                             # site-local maintenance window
  telemetry: {sample: 0.1, on_anomaly: 1.0}
)";

// The same manifest as JSON, keys in a different order.
const std::string kDesignJson = R"({
  "spec": {
    "telemetry": {"on_anomaly": 1.0, "sample": 0.1},
    "rollout": {
      "window": "02:00-04:00", "on_failure": "rollback",
      "gates": {"max_restarts": 3, "max_p95_latency_ms": 50, "max_error_rate": 0.01},
      "max_unavailable": "10%", "bake": "10m", "waves": ["1%", "10%", "50%", "100%"]
    },
    "placement": {"per_device": true},
    "secrets": ["camera-credentials"],
    "config": {"threshold": 0.8},
    "workload": {
      "restart": "on-failure",
      "health": {"period": "10s", "http": "/healthz"},
      "env": {"LOG_LEVEL": "info"},
      "command": ["bin/line-monitor", "--model-url", "${OUTPOST_MODEL_URL}"],
      "bundle": ")" + kBundle + R"("
    },
    "serve": {
      "fallback": {"min_confidence": 0.6, "version": "1.0.0", "model": "defect-net-tiny"},
      "route": "/models/defect-detector"
    },
    "model": {"version": "1.4.0", "name": "defect-net"},
    "selector": {"labels": {"line": "assembly"}, "sites": ["plant-*"]}
  },
  "metadata": {"name": "defect-detector"},
  "kind": "Deployment",
  "apiVersion": "outpost/v1"
})";

json design_doc() {
  auto doc = parse_document(kDesignJson);
  EXPECT_TRUE(doc.has_value());
  return *doc;
}

Manifest must_validate(const json& doc) {
  auto m = validate_manifest(doc);
  EXPECT_TRUE(m.has_value()) << m.error().message;
  return m ? *m : Manifest{};
}

Manifest must_parse(std::string_view text) {
  auto m = parse_manifest(text);
  EXPECT_TRUE(m.has_value()) << m.error().message;
  return m ? *m : Manifest{};
}

// A small valid manifest for the refusal cases to break.
json minimal_doc() {
  return json::parse(R"({"apiVersion":"outpost/v1","kind":"Deployment",
    "metadata":{"name":"app"},"spec":{"model":{"name":"defect-net","version":"1.4.0"}}})");
}

TEST(ManifestTest, DesignExampleValidatesWithTypedFields) {
  Manifest m = must_parse(kDesignYaml);
  EXPECT_EQ(m.name, "defect-detector");
  EXPECT_EQ(m.selector.sites, std::vector<std::string>{"plant-*"});
  EXPECT_EQ(m.selector.labels, (std::map<std::string, std::string>{{"line", "assembly"}}));
  EXPECT_TRUE(m.selector.devices.empty());
  ASSERT_TRUE(m.model.has_value());
  EXPECT_EQ(m.model->name, "defect-net");
  EXPECT_EQ(m.model->version, "1.4.0");
  ASSERT_TRUE(m.serve.has_value());
  EXPECT_EQ(m.serve->route, "/models/defect-detector");
  ASSERT_TRUE(m.serve->fallback.has_value());
  EXPECT_EQ(m.serve->fallback->model, "defect-net-tiny");
  EXPECT_EQ(m.serve->fallback->version, "1.0.0");
  EXPECT_DOUBLE_EQ(m.serve->fallback->min_confidence, 0.6);
  ASSERT_TRUE(m.workload.has_value());
  EXPECT_EQ(m.workload->bundle, kBundle);
  EXPECT_EQ(m.workload->command,
            (std::vector<std::string>{"bin/line-monitor", "--model-url", "${OUTPOST_MODEL_URL}"}));
  EXPECT_EQ(m.workload->env.at("LOG_LEVEL"), "info");
  ASSERT_TRUE(m.workload->health.has_value());
  EXPECT_EQ(m.workload->health->http, "/healthz");
  EXPECT_EQ(m.workload->health->period_ms, 10'000);
  EXPECT_EQ(m.workload->restart, Manifest::Restart::kOnFailure);
  EXPECT_EQ(m.config, json({{"threshold", 0.8}}));
  EXPECT_EQ(m.secrets, std::vector<std::string>{"camera-credentials"});
  EXPECT_TRUE(m.placement.per_device);
  ASSERT_EQ(m.rollout.waves.size(), 4u);
  EXPECT_EQ(m.rollout.waves[0], (Manifest::Amount{true, 1}));
  EXPECT_EQ(m.rollout.waves[3], (Manifest::Amount{true, 100}));
  EXPECT_EQ(m.rollout.bake_ms, 600'000);
  EXPECT_EQ(m.rollout.max_unavailable, (Manifest::Amount{true, 10}));
  EXPECT_DOUBLE_EQ(*m.rollout.gates.max_error_rate, 0.01);
  EXPECT_DOUBLE_EQ(*m.rollout.gates.max_p95_latency_ms, 50);
  EXPECT_EQ(*m.rollout.gates.max_restarts, 3);
  EXPECT_FALSE(m.rollout.gates.max_fallback_rate.has_value());
  EXPECT_EQ(m.rollout.on_failure, Manifest::OnFailure::kRollback);
  ASSERT_TRUE(m.rollout.window.has_value());
  EXPECT_EQ(m.rollout.window->start_minute, 120);
  EXPECT_EQ(m.rollout.window->end_minute, 240);
  EXPECT_DOUBLE_EQ(m.telemetry.sample, 0.1);
  EXPECT_DOUBLE_EQ(m.telemetry.on_anomaly, 1.0);
  EXPECT_EQ(m.spec_hash().size(), 64u);
}

TEST(ManifestTest, YamlAndJsonOfTheSameContentHaveTheSameHash) {
  Manifest from_yaml = must_parse(kDesignYaml);
  Manifest from_json = must_parse(kDesignJson);
  EXPECT_EQ(from_yaml.normalized, from_json.normalized);
  EXPECT_EQ(from_yaml.spec_hash(), from_json.spec_hash());
}

TEST(ManifestTest, KeyOrderAndLayoutDoNotChangeTheHash) {
  const std::string block = R"(
kind: Deployment
apiVersion: outpost/v1
spec:
  model:
    version: 1.4.0
    name: defect-net
  telemetry:
    on_anomaly: 1.0
    sample: 0.1
metadata:
  name: app
)";
  const std::string flow =
      "{apiVersion: outpost/v1, kind: Deployment, metadata: {name: app}, spec: {telemetry: "
      "{sample: 0.1, on_anomaly: 1.0}, model: {name: defect-net, version: 1.4.0}}}";
  EXPECT_EQ(must_parse(block).spec_hash(), must_parse(flow).spec_hash());
  EXPECT_EQ(must_parse(block).spec_hash(), must_validate(minimal_doc()).spec_hash());
}

TEST(ManifestTest, ReapplyingGivesTheSameHash) {
  EXPECT_EQ(must_parse(kDesignYaml).spec_hash(), must_parse(kDesignYaml).spec_hash());
}

TEST(ManifestTest, EquivalentSpellingsAndDefaultsHaveTheSameHash) {
  json explicit_defaults = minimal_doc();
  explicit_defaults["spec"]["selector"] = {{"sites", json::array()}};
  explicit_defaults["spec"]["placement"] = {{"per_device", true}};
  explicit_defaults["spec"]["rollout"] = {{"waves", json::array({"100%"})},
                                          {"bake", "0s"},
                                          {"max_unavailable", "10%"},
                                          {"on_failure", "rollback"}};
  explicit_defaults["spec"]["telemetry"] = {{"sample", 0.1}, {"on_anomaly", 1}};
  explicit_defaults["spec"]["config"] = json::object();
  explicit_defaults["spec"]["secrets"] = json::array();
  EXPECT_EQ(must_validate(minimal_doc()).spec_hash(), must_validate(explicit_defaults).spec_hash());

  json ten_minutes = minimal_doc();
  ten_minutes["spec"]["rollout"] = {{"bake", "10m"}};
  json six_hundred_seconds = minimal_doc();
  six_hundred_seconds["spec"]["rollout"] = {{"bake", "600s"}};
  Manifest a = must_validate(ten_minutes);
  EXPECT_EQ(a.spec_hash(), must_validate(six_hundred_seconds).spec_hash());
  EXPECT_EQ(a.normalized["spec"]["rollout"]["bake"], "10m");

  json sorted = minimal_doc();
  sorted["spec"]["secrets"] = {"a", "b"};
  sorted["spec"]["selector"] = {{"sites", {"plant-1", "plant-2"}}};
  json reversed = minimal_doc();
  reversed["spec"]["secrets"] = {"b", "a"};
  reversed["spec"]["selector"] = {{"sites", {"plant-2", "plant-1"}}};
  EXPECT_EQ(must_validate(sorted).spec_hash(), must_validate(reversed).spec_hash());
}

TEST(ManifestTest, AnyRealChangeChangesTheHash) {
  const json base = design_doc();
  const std::string base_hash = must_validate(base).spec_hash();
  std::vector<std::pair<std::string, json>> changes = {
      {"/spec/config/threshold", 0.9},
      {"/spec/model/version", "1.4.1"},
      {"/spec/rollout/waves/1", "20%"},
      {"/spec/rollout/bake", "11m"},
      {"/spec/serve/fallback/min_confidence", 0.7},
      {"/spec/workload/command/2", "x"},
      {"/spec/selector/labels/line", "paint"},
      {"/metadata/labels", json{{"team", "vision"}}},
      {"/spec/telemetry/sample", 0.2},
  };
  std::set<std::string> hashes = {base_hash};
  for (const auto& [pointer, value] : changes) {
    json changed = base;
    changed[json::json_pointer(pointer)] = value;
    std::string hash = must_validate(changed).spec_hash();
    EXPECT_NE(hash, base_hash) << pointer;
    hashes.insert(hash);
  }
  EXPECT_EQ(hashes.size(), changes.size() + 1);
}

TEST(ManifestTest, NormalizedFormValidatesToItself) {
  Manifest m = must_parse(kDesignYaml);
  Manifest again = must_validate(m.normalized);
  EXPECT_EQ(again.normalized, m.normalized);
  EXPECT_EQ(again.spec_hash(), m.spec_hash());
  EXPECT_EQ(m.normalized["spec"]["rollout"]["max_unavailable"], "10%");
  EXPECT_EQ(m.normalized["spec"]["workload"]["health"]["timeout"], "5s");
  EXPECT_EQ(m.normalized["spec"]["workload"]["health"]["deadline"], "1m");
  EXPECT_EQ(m.normalized["spec"]["workload"]["stop_grace"], "10s");
}

TEST(ManifestTest, WorkloadPortGraceDeadlineAndResources) {
  json doc = must_parse(kDesignYaml).normalized;
  doc["spec"]["workload"]["port"] = 8080;
  doc["spec"]["workload"]["stop_grace"] = "3s";
  doc["spec"]["workload"]["health"]["deadline"] = "20s";
  doc["spec"]["workload"]["resources"] = {{"memory", "256M"}, {"cpus", 0.5}, {"open_files", 1024}};
  Manifest m = must_validate(doc);
  ASSERT_TRUE(m.workload.has_value());
  EXPECT_EQ(m.workload->port, 8080);
  EXPECT_EQ(m.workload->stop_grace_ms, 3'000);
  EXPECT_EQ(m.workload->health->deadline_ms, 20'000);
  EXPECT_EQ(m.workload->resources.memory_bytes, 256LL << 20);
  EXPECT_EQ(m.workload->resources.cpus, 0.5);
  EXPECT_EQ(m.workload->resources.open_files, 1024);
  // "256M" and its byte count mean the same thing: same normalized form, same hash.
  doc["spec"]["workload"]["resources"]["memory"] = std::to_string(256LL << 20);
  EXPECT_EQ(must_validate(doc).spec_hash(), m.spec_hash());
  EXPECT_EQ(must_validate(m.normalized).normalized, m.normalized);
}

struct Refusal {
  std::string name;
  std::function<void(json&)> edit;
  std::string field;
  std::string message;  // expected substring of the message (exact when `exact`)
  bool exact = false;
};

// Keeps CTest's listing readable: gtest would otherwise dump the struct's bytes.
void PrintTo(const Refusal& r, std::ostream* os) { *os << r.name; }

class ManifestRefusalTest : public ::testing::TestWithParam<Refusal> {};

TEST_P(ManifestRefusalTest, RefusedWithFieldPath) {
  const Refusal& r = GetParam();
  json doc = design_doc();
  r.edit(doc);
  auto m = validate_manifest(doc);
  ASSERT_FALSE(m.has_value()) << r.name;
  EXPECT_EQ(m.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(m.error().field, r.field) << m.error().message;
  if (r.exact) {
    EXPECT_EQ(m.error().message, r.message);
  } else {
    EXPECT_THAT(m.error().message, HasSubstr(r.message));
  }
  if (!r.field.empty()) {
    EXPECT_THAT(m.error().message, StartsWith(r.field + ": "));
  }
}

json& spec(json& doc) { return doc["spec"]; }

const Refusal kRefusals[] = {
    {"unknown_top_level", [](json& d) { d["status"] = "x"; }, "status",
     "status: unknown field (expected one of: apiVersion, kind, metadata, spec)", true},
    {"unknown_in_spec",
     [](json& d) {
       spec(d)["rolout"] = spec(d)["rollout"];
       spec(d).erase("rollout");
     },
     "spec.rolout",
     "spec.rolout: unknown field (expected one of: selector, model, serve, workload, config, "
     "secrets, placement, rollout, telemetry)",
     true},
    {"unknown_nested", [](json& d) { spec(d)["rollout"]["gates"]["max_errors"] = 1; },
     "spec.rollout.gates.max_errors", "unknown field (expected one of: max_error_rate,"},
    {"unknown_in_health", [](json& d) { spec(d)["workload"]["health"]["retries"] = 3; },
     "spec.workload.health.retries", "unknown field"},
    {"wrong_type_string", [](json& d) { d["metadata"]["name"] = 5; }, "metadata.name",
     "metadata.name: expected a string, got a number (5)", true},
    {"wrong_type_map", [](json& d) { spec(d)["rollout"] = "fast"; }, "spec.rollout",
     "expected a map, got a string"},
    {"wrong_type_list", [](json& d) { spec(d)["secrets"] = "camera"; }, "spec.secrets",
     "expected a list of secret names, got a string"},
    {"wrong_type_bool", [](json& d) { spec(d)["placement"]["per_device"] = "yes"; },
     "spec.placement.per_device", "expected true or false, got a string"},
    {"wave_over_100", [](json& d) { spec(d)["rollout"]["waves"][2] = "150%"; },
     "spec.rollout.waves[2]", "spec.rollout.waves[2]: 150% is over 100%", true},
    {"wave_zero", [](json& d) { spec(d)["rollout"]["waves"][0] = "0%"; }, "spec.rollout.waves[0]",
     "0% is not over 0%"},
    {"waves_not_increasing",
     [](json& d) {
       spec(d)["rollout"]["waves"] = {"10%", "10%", "100%"};
     },
     "spec.rollout.waves[1]", "10% is not more than the wave before it (10%)"},
    {"counts_not_increasing",
     [](json& d) {
       spec(d)["rollout"]["waves"] = {5, 3, "100%"};
     },
     "spec.rollout.waves[1]", "3 is not more than the wave before it (5)"},
    {"wave_garbage", [](json& d) { spec(d)["rollout"]["waves"][0] = "ten%"; },
     "spec.rollout.waves[0]", "expected a percentage like 10% or a device count"},
    {"wave_negative_count", [](json& d) { spec(d)["rollout"]["waves"][0] = -1; },
     "spec.rollout.waves[0]", "positive integer"},
    {"last_wave_not_100",
     [](json& d) {
       spec(d)["rollout"]["waves"] = {"10%", "50%"};
     },
     "spec.rollout.waves", "spec.rollout.waves: the last wave must be 100%", true},
    {"waves_empty", [](json& d) { spec(d)["rollout"]["waves"] = json::array(); },
     "spec.rollout.waves", "at least one wave"},
    {"bad_duration", [](json& d) { spec(d)["rollout"]["bake"] = "ten"; }, "spec.rollout.bake",
     "spec.rollout.bake: expected a duration like 10m or 1h30m, got \"ten\"", true},
    {"duration_without_unit", [](json& d) { spec(d)["rollout"]["bake"] = 10; }, "spec.rollout.bake",
     "expected a duration like 10m, got 10"},
    {"port_out_of_range", [](json& d) { spec(d)["workload"]["port"] = 70000; },
     "spec.workload.port", "expected a port from 1 to 65535"},
    {"tiny_memory",
     [](json& d) {
       spec(d)["workload"]["resources"] = {{"memory", "12K"}};
     },
     "spec.workload.resources.memory", "expected a size of at least 1M"},
    {"unknown_resource",
     [](json& d) {
       spec(d)["workload"]["resources"] = {{"gpus", 1}};
     },
     "spec.workload.resources.gpus", "unknown field"},
    {"zero_deadline", [](json& d) { spec(d)["workload"]["health"]["deadline"] = "0s"; },
     "spec.workload.health.deadline", "expected a duration over 0s"},
    {"bad_health_period", [](json& d) { spec(d)["workload"]["health"]["period"] = "1.5s"; },
     "spec.workload.health.period", "expected a duration like 10m"},
    {"bad_window_hour", [](json& d) { spec(d)["rollout"]["window"] = "25:00-04:00"; },
     "spec.rollout.window", "expected a daily window like \"02:00-04:00\""},
    {"bad_window_shape", [](json& d) { spec(d)["rollout"]["window"] = "2am-4am"; },
     "spec.rollout.window", "got \"2am-4am\""},
    {"empty_window", [](json& d) { spec(d)["rollout"]["window"] = "02:00-02:00"; },
     "spec.rollout.window", "is empty"},
    {"bad_semver", [](json& d) { spec(d)["model"]["version"] = "1.4"; }, "spec.model.version",
     "expected a semver version like 1.4.0"},
    {"semver_leading_zero", [](json& d) { spec(d)["model"]["version"] = "01.4.0"; },
     "spec.model.version", "semver"},
    {"semver_as_number", [](json& d) { spec(d)["model"]["version"] = 1.4; }, "spec.model.version",
     "got a number (1.4)"},
    {"bad_fallback_semver", [](json& d) { spec(d)["serve"]["fallback"]["version"] = "v1"; },
     "spec.serve.fallback.version", "semver"},
    {"bad_name_upper", [](json& d) { d["metadata"]["name"] = "Defect-Detector"; }, "metadata.name",
     "\"Defect-Detector\" is not a valid deployment name"},
    {"bad_name_digit_first", [](json& d) { d["metadata"]["name"] = "1app"; }, "metadata.name",
     "starting with a letter"},
    {"bad_name_too_long", [](json& d) { d["metadata"]["name"] = std::string(64, 'a'); },
     "metadata.name", "1-63 characters"},
    {"bad_model_name", [](json& d) { spec(d)["model"]["name"] = "Defect Net"; }, "spec.model.name",
     "is not a valid model name"},
    {"missing_name", [](json& d) { d["metadata"].erase("name"); }, "metadata.name",
     "missing required field"},
    {"missing_model_version", [](json& d) { spec(d)["model"].erase("version"); },
     "spec.model.version", "missing required field"},
    {"wrong_api_version", [](json& d) { d["apiVersion"] = "outpost/v2"; }, "apiVersion",
     "expected \"outpost/v1\", got \"outpost/v2\""},
    {"wrong_kind", [](json& d) { d["kind"] = "Service"; }, "kind", "expected \"Deployment\""},
    {"missing_spec", [](json& d) { d.erase("spec"); }, "spec", "missing required field"},
    {"neither_model_nor_workload",
     [](json& d) {
       spec(d).erase("model");
       spec(d).erase("workload");
       spec(d).erase("serve");
     },
     "spec", "spec: expected at least one of model or workload", true},
    {"serve_without_model", [](json& d) { spec(d).erase("model"); }, "spec.serve",
     "serving needs spec.model"},
    {"bad_route", [](json& d) { spec(d)["serve"]["route"] = "models/x"; }, "spec.serve.route",
     "starting with '/'"},
    {"route_dotdot", [](json& d) { spec(d)["serve"]["route"] = "/models/../admin"; },
     "spec.serve.route", "\"..\""},
    {"min_confidence_over_1", [](json& d) { spec(d)["serve"]["fallback"]["min_confidence"] = 1.5; },
     "spec.serve.fallback.min_confidence",
     "spec.serve.fallback.min_confidence: expected a number from 0 to 1, got 1.5", true},
    {"both_placement_modes",
     [](json& d) {
       spec(d)["placement"] = {{"per_device", true}, {"replicas_per_site", 1}};
     },
     "spec.placement", "not both"},
    {"replicas_zero",
     [](json& d) {
       spec(d)["placement"] = {{"replicas_per_site", 0}};
     },
     "spec.placement.replicas_per_site", "at least 1"},
    {"migrate_without_replicas", [](json& d) { spec(d)["placement"]["migrate_after"] = "5m"; },
     "spec.placement.migrate_after", "only applies with replicas_per_site"},
    {"per_device_false_alone", [](json& d) { spec(d)["placement"]["per_device"] = false; },
     "spec.placement.per_device", "needs replicas_per_site"},
    {"bad_bundle", [](json& d) { spec(d)["workload"]["bundle"] = "sha256:abc"; },
     "spec.workload.bundle", "sha256:<64 lowercase hex digits>"},
    {"missing_command", [](json& d) { spec(d)["workload"].erase("command"); },
     "spec.workload.command", "missing required field"},
    {"empty_command", [](json& d) { spec(d)["workload"]["command"] = json::array(); },
     "spec.workload.command", "non-empty command"},
    {"command_item_type", [](json& d) { spec(d)["workload"]["command"][1] = 7; },
     "spec.workload.command[1]", "expected a string, got a number (7)"},
    {"bad_env_name", [](json& d) { spec(d)["workload"]["env"]["1BAD"] = "x"; },
     "spec.workload.env.1BAD", "is not a valid key"},
    {"env_value_type", [](json& d) { spec(d)["workload"]["env"]["LEVEL"] = 3; },
     "spec.workload.env.LEVEL", "expected a string, got a number"},
    {"bad_restart", [](json& d) { spec(d)["workload"]["restart"] = "sometimes"; },
     "spec.workload.restart", "expected one of always, on-failure, never, got \"sometimes\""},
    {"health_both_checks",
     [](json& d) { spec(d)["workload"]["health"]["exec"] = json::array({"bin/check"}); },
     "spec.workload.health", "not both"},
    {"selector_label_type", [](json& d) { spec(d)["selector"]["labels"]["gpu"] = true; },
     "spec.selector.labels.gpu", "expected a string, got a boolean (true)"},
    {"selector_empty_site", [](json& d) { spec(d)["selector"]["sites"] = json::array({""}); },
     "spec.selector.sites[0]", "is not a valid site pattern"},
    {"selector_duplicate_device",
     [](json& d) {
       spec(d)["selector"]["devices"] = {"d-1", "d-1"};
     },
     "spec.selector.devices[1]", "duplicate device id"},
    {"duplicate_secret",
     [](json& d) {
       spec(d)["secrets"] = {"a", "a"};
     },
     "spec.secrets[1]", "duplicate secret name \"a\""},
    {"config_not_map", [](json& d) { spec(d)["config"] = json::array(); }, "spec.config",
     "expected a map, got a list"},
    {"sample_over_1", [](json& d) { spec(d)["telemetry"]["sample"] = 2; }, "spec.telemetry.sample",
     "expected a number from 0 to 1, got 2"},
    {"error_rate_negative", [](json& d) { spec(d)["rollout"]["gates"]["max_error_rate"] = -0.1; },
     "spec.rollout.gates.max_error_rate", "from 0 to 1"},
    {"latency_zero", [](json& d) { spec(d)["rollout"]["gates"]["max_p95_latency_ms"] = 0; },
     "spec.rollout.gates.max_p95_latency_ms", "expected a number over 0"},
    {"restarts_fraction", [](json& d) { spec(d)["rollout"]["gates"]["max_restarts"] = 1.5; },
     "spec.rollout.gates.max_restarts", "expected an integer of at least 0, got 1.5"},
    {"bad_on_failure", [](json& d) { spec(d)["rollout"]["on_failure"] = "panic"; },
     "spec.rollout.on_failure", "expected one of rollback, pause"},
    {"max_unavailable_over", [](json& d) { spec(d)["rollout"]["max_unavailable"] = "101%"; },
     "spec.rollout.max_unavailable", "101% is over 100%"},
    {"metadata_label_value",
     [](json& d) {
       d["metadata"]["labels"] = {{"team", "a b"}};
     },
     "metadata.labels.team", "is not a valid value"},
};

INSTANTIATE_TEST_SUITE_P(Refusals, ManifestRefusalTest, ::testing::ValuesIn(kRefusals),
                         [](const ::testing::TestParamInfo<Refusal>& param) {
                           return param.param.name;
                         });

TEST(ManifestTest, TopLevelMustBeAMap) {
  auto m = validate_manifest(json::array());
  ASSERT_FALSE(m.has_value());
  EXPECT_THAT(m.error().message, HasSubstr("expected a manifest"));
}

TEST(ManifestTest, FreeFormMapsTakeAnyKeys) {
  json doc = design_doc();
  spec(doc)["config"] = {{"anything", {{"nested", {1, 2, 3}}}}, {"Mixed-Case key", nullptr}};
  spec(doc)["workload"]["env"] = {{"MY_VAR_2", "x"}, {"_PRIVATE", ""}};
  spec(doc)["selector"]["labels"] = {{"example.com/role", "edge"}, {"Zone", "A_1"}};
  Manifest m = must_validate(doc);
  EXPECT_EQ(m.config["anything"]["nested"], json({1, 2, 3}));
  EXPECT_EQ(m.workload->env.size(), 2u);
  EXPECT_EQ(m.selector.labels.at("example.com/role"), "edge");
}

TEST(ManifestTest, PlacementReplicasPerSite) {
  json doc = minimal_doc();
  spec(doc)["placement"] = {{"replicas_per_site", 2}};
  Manifest m = must_validate(doc);
  EXPECT_FALSE(m.placement.per_device);
  EXPECT_EQ(m.placement.replicas_per_site, 2);
  EXPECT_EQ(m.placement.migrate_after_ms, 5 * 60'000);
  spec(doc)["placement"] = {
      {"per_device", false}, {"replicas_per_site", 1}, {"migrate_after", "90s"}};
  m = must_validate(doc);
  EXPECT_EQ(m.placement.migrate_after_ms, 90'000);
  EXPECT_EQ(m.normalized["spec"]["placement"]["migrate_after"], "1m30s");
}

TEST(ManifestTest, WorkloadOnlyAndDefaults) {
  Manifest m = must_parse(R"(
apiVersion: outpost/v1
kind: Deployment
metadata: {name: monitor}
spec:
  workload: {command: [bin/monitor]}
)");
  EXPECT_FALSE(m.model.has_value());
  ASSERT_TRUE(m.workload.has_value());
  EXPECT_FALSE(m.workload->bundle.has_value());
  EXPECT_EQ(m.workload->restart, Manifest::Restart::kOnFailure);
  EXPECT_EQ(m.rollout.waves, std::vector<Manifest::Amount>{(Manifest::Amount{true, 100})});
  EXPECT_EQ(m.rollout.bake_ms, 0);
  EXPECT_EQ(m.rollout.max_unavailable, (Manifest::Amount{true, 10}));
  EXPECT_DOUBLE_EQ(m.telemetry.sample, 0.1);
  EXPECT_DOUBLE_EQ(m.telemetry.on_anomaly, 1.0);
  EXPECT_TRUE(m.placement.per_device);
  EXPECT_EQ(m.normalized["spec"]["workload"]["restart"], "on-failure");
}

TEST(ManifestTest, ServeRouteDefaultsToTheDeploymentName) {
  json doc = minimal_doc();
  spec(doc)["serve"] = json::object();
  Manifest m = must_validate(doc);
  EXPECT_EQ(m.serve->route, "/models/app");
  EXPECT_FALSE(m.serve->fallback.has_value());
}

TEST(ManifestTest, MixedWavesOfCountsThenPercentages) {
  json doc = minimal_doc();
  spec(doc)["rollout"] = {{"waves", {5, 50, "10%", "100%"}}, {"max_unavailable", 3}};
  Manifest m = must_validate(doc);
  EXPECT_EQ(m.rollout.waves[0], (Manifest::Amount{false, 5}));
  EXPECT_EQ(m.rollout.waves[2], (Manifest::Amount{true, 10}));
  EXPECT_EQ(m.rollout.max_unavailable, (Manifest::Amount{false, 3}));
  spec(doc)["rollout"] = {{"waves", {1, 10, 100}}};  // counts only: no 100% needed
  EXPECT_TRUE(validate_manifest(doc).has_value());
}

// ---- parse_document: YAML typing, syntax errors

TEST(ParseDocumentTest, YamlScalarsFollowTheCoreSchema) {
  auto doc = parse_document(R"(
int: 42
quoted_int: "42"
single_quoted: '42'
float: 0.8
negative: -3
plus: +7
exp: 1e3
hex: 0x1F
octal: 0o17
yes_bool: true
upper_bool: FALSE
quoted_bool: "true"
yes_word: yes
tilde: ~
null_word: null
empty:
semver: 1.4.0
percent: 10%
window: 02:00-04:00
tagged: !!str 12
big: 123456789012345678901234567890
inf: .inf
literal: |
  two
  lines
)");
  ASSERT_TRUE(doc.has_value()) << doc.error().message;
  const json& d = *doc;
  EXPECT_TRUE(d["int"].is_number_integer());
  EXPECT_EQ(d["int"], 42);
  EXPECT_EQ(d["quoted_int"], "42");
  EXPECT_EQ(d["single_quoted"], "42");
  EXPECT_TRUE(d["float"].is_number_float());
  EXPECT_DOUBLE_EQ(d["float"].get<double>(), 0.8);
  EXPECT_EQ(d["negative"], -3);
  EXPECT_EQ(d["plus"], 7);
  EXPECT_TRUE(d["exp"].is_number_float());
  EXPECT_EQ(d["hex"], 31);
  EXPECT_EQ(d["octal"], 15);
  EXPECT_EQ(d["yes_bool"], true);
  EXPECT_EQ(d["upper_bool"], false);
  EXPECT_EQ(d["quoted_bool"], "true");
  EXPECT_EQ(d["yes_word"], "yes");
  EXPECT_TRUE(d["tilde"].is_null());
  EXPECT_TRUE(d["null_word"].is_null());
  EXPECT_TRUE(d["empty"].is_null());
  EXPECT_EQ(d["semver"], "1.4.0");
  EXPECT_EQ(d["percent"], "10%");
  EXPECT_EQ(d["window"], "02:00-04:00");
  EXPECT_EQ(d["tagged"], "12");
  EXPECT_TRUE(d["big"].is_number_float());
  EXPECT_EQ(d["inf"], ".inf");
  EXPECT_EQ(d["literal"], "two\nlines\n");
}

TEST(ParseDocumentTest, QuotedNumberStaysAStringAndIsRefusedWhereANumberIsExpected) {
  auto m = parse_manifest(R"(
apiVersion: outpost/v1
kind: Deployment
metadata: {name: app}
spec:
  model: {name: defect-net, version: 1.4.0}
  telemetry: {sample: "0.5"}
)");
  ASSERT_FALSE(m.has_value());
  EXPECT_EQ(m.error().field, "spec.telemetry.sample");
  EXPECT_THAT(m.error().message, HasSubstr("expected a number from 0 to 1, got a string"));
}

TEST(ParseDocumentTest, UnquotedVersionThatLooksLikeAFloatIsRefused) {
  auto m = parse_manifest(
      "apiVersion: outpost/v1\nkind: Deployment\nmetadata: {name: app}\n"
      "spec: {model: {name: defect-net, version: 1.4}}\n");
  ASSERT_FALSE(m.has_value());
  EXPECT_EQ(m.error().field, "spec.model.version");
  EXPECT_THAT(m.error().message, HasSubstr("got a number (1.4)"));
}

TEST(ParseDocumentTest, YamlSyntaxErrorSaysLineAndColumn) {
  auto doc = parse_document("a: 1\nb: [1, 2\n");
  ASSERT_FALSE(doc.has_value());
  EXPECT_EQ(doc.error().code, Errc::kInvalidArgument);
  EXPECT_THAT(doc.error().message, HasSubstr("invalid YAML at line 3, column 1"));
}

TEST(ParseDocumentTest, JsonSyntaxErrorSaysLineAndColumn) {
  auto doc = parse_document("{\n  \"a\": 1,\n  \"b\": @\n}");
  ASSERT_FALSE(doc.has_value());
  EXPECT_THAT(doc.error().message, HasSubstr("invalid JSON at line 3, column 8"));
}

TEST(ParseDocumentTest, DuplicateKeysAreRefused) {
  auto yaml = parse_document("a: 1\nb:\n  c: 1\n  c: 2\n");
  ASSERT_FALSE(yaml.has_value());
  EXPECT_THAT(yaml.error().message, HasSubstr("line 4, column 3: duplicate key \"c\""));
  auto json_doc = parse_document(R"({"a": {"list": [{"x": 1, "x": 2}]}})");
  ASSERT_FALSE(json_doc.has_value());
  EXPECT_THAT(json_doc.error().message, HasSubstr("duplicate key \"x\" at a.list[0].x"));
}

TEST(ParseDocumentTest, RefusesEmptyMultipleAndInvalidDocuments) {
  EXPECT_THAT(parse_document("").error().message, HasSubstr("empty"));
  EXPECT_THAT(parse_document("  \n# just a comment\n").error().message, HasSubstr("empty"));
  EXPECT_THAT(parse_document("a: 1\n---\nb: 2\n").error().message,
              HasSubstr("expected one document"));
  EXPECT_THAT(parse_document("a: \xff\xfe\n").error().message, HasSubstr("not valid UTF-8"));
  EXPECT_THAT(parse_document("a: !custom 5\n").error().message, HasSubstr("unsupported tag"));
  EXPECT_THAT(parse_document("? [1, 2]\n: x\n").error().message,
              HasSubstr("map keys must be plain text"));
}

TEST(ParseDocumentTest, AliasBombsAndDeepNestingAreRefused) {
  std::string bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n";
  char prev = 'a';
  for (char c = 'b'; c <= 'h'; ++c) {
    bomb += std::string(1, c) + ": &" + c + " [";
    for (int i = 0; i < 10; ++i) bomb += std::string(i ? ", *" : "*") + prev;
    bomb += "]\n";
    prev = c;
  }
  auto doc = parse_document(bomb);
  ASSERT_FALSE(doc.has_value());
  EXPECT_THAT(doc.error().message, HasSubstr("too large"));

  std::string deep_json = std::string(200, '[') + std::string(200, ']');
  EXPECT_THAT(parse_document("{\"a\": " + deep_json + "}").error().message,
              HasSubstr("nested more than"));
  std::string deep_yaml = "a: " + deep_json + "\n";
  EXPECT_FALSE(parse_document(deep_yaml).has_value());
}

TEST(ParseDocumentTest, YamlFlowMappingAtTheTopIsStillYaml) {
  auto doc = parse_document("{name: app, version: 1.4.0, n: 3}");
  ASSERT_TRUE(doc.has_value()) << doc.error().message;
  EXPECT_EQ(*doc, json({{"name", "app"}, {"version", "1.4.0"}, {"n", 3}}));
  // Broken either way: the JSON message is the one shown.
  EXPECT_THAT(parse_document("{\"a\": [1, 2}").error().message,
              HasSubstr("invalid JSON at line 1"));
}

TEST(ParseDocumentTest, JsonIsDetectedByTheOpeningBrace) {
  auto doc = parse_document("  \n {\"n\": 1.0, \"s\": \"1.4.0\"}");
  ASSERT_TRUE(doc.has_value());
  EXPECT_TRUE((*doc)["n"].is_number_float());
}

// ---- durations and windows

TEST(DurationTest, ParsesAndFormats) {
  EXPECT_EQ(parse_duration("0s").value(), 0);
  EXPECT_EQ(parse_duration("250ms").value(), 250);
  EXPECT_EQ(parse_duration("10m").value(), 600'000);
  EXPECT_EQ(parse_duration("1h30m").value(), 5'400'000);
  EXPECT_EQ(parse_duration("2d").value(), 172'800'000);
  EXPECT_EQ(parse_duration("1d2h3m4s5ms").value(), 93'784'005);
  EXPECT_EQ(parse_duration("3650d").value(), 3650LL * 86'400'000);
  for (const char* bad : {"", "ten", "10", "m", "1.5h", "10x", "1m1h", "1m1m", "-5s", "1 m",
                          "99999999999999999999d", "106751991168d", "3651d"}) {
    auto result = parse_duration(bad);
    EXPECT_FALSE(result.has_value()) << bad;
    if (!result) {
      EXPECT_THAT(result.error().message, HasSubstr("expected a duration like 10m"));
    }
  }
  EXPECT_EQ(format_duration(0), "0s");
  EXPECT_EQ(format_duration(5'400'000), "1h30m");
  EXPECT_EQ(format_duration(1'500), "1s500ms");
  EXPECT_EQ(format_duration(86'400'000), "1d");
}

TEST(WindowTest, ContainsWrapsPastMidnight) {
  Manifest::Window night{22 * 60, 2 * 60};
  EXPECT_TRUE(night.contains(23 * 60));
  EXPECT_TRUE(night.contains(60));
  EXPECT_FALSE(night.contains(2 * 60));
  EXPECT_FALSE(night.contains(12 * 60));
  Manifest::Window day{2 * 60, 4 * 60};
  EXPECT_TRUE(day.contains(2 * 60));
  EXPECT_FALSE(day.contains(4 * 60));
}

// ---- references

struct FakeRegistry {
  std::set<std::pair<std::string, std::string>> versions;
  std::set<std::string> artifacts;
  bool fail = false;

  ReferenceLookup lookup(bool with_model_exists) {
    ReferenceLookup l;
    l.model_version_exists = [this](const std::string& model,
                                    const std::string& version) -> Result<bool> {
      if (fail) return make_error(Errc::kUnavailable, "database is down");
      return versions.contains({model, version});
    };
    l.artifact_exists = [this](const std::string& digest) -> Result<bool> {
      return artifacts.contains(digest);
    };
    if (with_model_exists) {
      l.model_exists = [this](const std::string& model) -> Result<bool> {
        return std::any_of(versions.begin(), versions.end(),
                           [&](const auto& v) { return v.first == model; });
      };
    }
    return l;
  }
};

TEST(CheckReferencesTest, AllPresentPasses) {
  FakeRegistry registry{{{"defect-net", "1.4.0"}, {"defect-net-tiny", "1.0.0"}}, {kBundle}};
  EXPECT_TRUE(check_references(must_parse(kDesignYaml), registry.lookup(true)).has_value());
  EXPECT_TRUE(check_references(must_parse(kDesignYaml), registry.lookup(false)).has_value());
}

TEST(CheckReferencesTest, MissingModelVersion) {
  FakeRegistry registry{{{"defect-net", "1.0.0"}, {"defect-net-tiny", "1.0.0"}}, {kBundle}};
  json doc = design_doc();
  spec(doc)["model"]["version"] = "9.9.9";
  auto status = check_references(must_validate(doc), registry.lookup(true));
  ASSERT_FALSE(status.has_value());
  EXPECT_EQ(status.error().code, Errc::kInvalidArgument);
  EXPECT_EQ(status.error().field, "spec.model.version");
  EXPECT_EQ(status.error().message,
            "spec.model.version: model defect-net version 9.9.9 does not exist");
}

TEST(CheckReferencesTest, MissingModelAltogether) {
  FakeRegistry registry{{{"defect-net-tiny", "1.0.0"}}, {kBundle}};
  auto status = check_references(must_parse(kDesignYaml), registry.lookup(true));
  ASSERT_FALSE(status.has_value());
  EXPECT_EQ(status.error().field, "spec.model.name");
  EXPECT_THAT(status.error().message, HasSubstr("model defect-net does not exist"));
  // Without model_exists the version is what is reported.
  status = check_references(must_parse(kDesignYaml), registry.lookup(false));
  ASSERT_FALSE(status.has_value());
  EXPECT_EQ(status.error().field, "spec.model.version");
}

TEST(CheckReferencesTest, MissingFallback) {
  FakeRegistry registry{{{"defect-net", "1.4.0"}, {"defect-net-tiny", "0.9.0"}}, {kBundle}};
  auto status = check_references(must_parse(kDesignYaml), registry.lookup(true));
  ASSERT_FALSE(status.has_value());
  EXPECT_EQ(status.error().field, "spec.serve.fallback.version");
  EXPECT_THAT(status.error().message,
              HasSubstr("model defect-net-tiny version 1.0.0 does not exist"));
}

TEST(CheckReferencesTest, MissingBundle) {
  FakeRegistry registry{{{"defect-net", "1.4.0"}, {"defect-net-tiny", "1.0.0"}}, {}};
  auto status = check_references(must_parse(kDesignYaml), registry.lookup(true));
  ASSERT_FALSE(status.has_value());
  EXPECT_EQ(status.error().field, "spec.workload.bundle");
  EXPECT_EQ(status.error().message, "spec.workload.bundle: artifact " + kBundle +
                                        " does not exist; push it with 'outpost artifact push'");
}

TEST(CheckReferencesTest, LookupFailureIsPassedOnWithContext) {
  FakeRegistry registry;
  registry.fail = true;
  auto status = check_references(must_parse(kDesignYaml), registry.lookup(false));
  ASSERT_FALSE(status.has_value());
  EXPECT_EQ(status.error().code, Errc::kUnavailable);
  EXPECT_EQ(status.error().message, "looking up model defect-net version 1.4.0: database is down");
}

// ---- the shipped example

TEST(ExampleManifestTest, DefectDetectorExampleValidates) {
  std::ifstream in(std::string(OUTPOST_EXAMPLES_DIR) + "/defect-detector.yaml");
  ASSERT_TRUE(in.good());
  std::stringstream text;
  text << in.rdbuf();
  Manifest m = must_parse(text.str());
  EXPECT_EQ(m.name, "defect-detector");
  ASSERT_TRUE(m.model.has_value());
  EXPECT_EQ(m.model->name, "defect-net");
  EXPECT_EQ(m.model->version, "1.0.0");
  EXPECT_TRUE(m.serve.has_value());
  EXPECT_FALSE(m.workload.has_value());
  EXPECT_TRUE(m.secrets.empty());
  FakeRegistry registry{{{"defect-net", "1.0.0"}}, {}};
  EXPECT_TRUE(check_references(m, registry.lookup(true)).has_value());
}

}  // namespace
// Issue 18: how a workload gets its secrets, beyond the files under $OUTPOST_SECRETS_DIR.
TEST(ManifestTest, SecretWorkloadFieldsValidateAndDefaultsKeepTheHash) {
  json doc = design_doc();
  const std::string base_hash = must_validate(doc).spec_hash();
  json defaults = doc;
  defaults["spec"]["workload"]["secret_env"] = false;
  defaults["spec"]["workload"]["on_secret_rotate"] = "restart";
  Manifest plain = must_validate(defaults);
  EXPECT_EQ(plain.spec_hash(), base_hash);  // an upgrade does not make new revisions
  ASSERT_TRUE(plain.workload.has_value());
  EXPECT_FALSE(plain.workload->secret_env);
  EXPECT_EQ(plain.workload->on_secret_rotate, Manifest::SecretRotate::kRestart);

  json sighup = doc;
  sighup["spec"]["workload"]["on_secret_rotate"] = "sighup";
  Manifest m = must_validate(sighup);
  EXPECT_EQ(m.workload->on_secret_rotate, Manifest::SecretRotate::kSighup);
  EXPECT_EQ(m.normalized["spec"]["workload"]["on_secret_rotate"], "sighup");
  EXPECT_NE(m.spec_hash(), base_hash);
  EXPECT_EQ(must_validate(m.normalized).normalized, m.normalized);

  json env = doc;
  env["spec"]["workload"]["secret_env"] = true;
  Manifest e = must_validate(env);
  EXPECT_TRUE(e.workload->secret_env);
  EXPECT_EQ(e.normalized["spec"]["workload"]["secret_env"], true);
  EXPECT_NE(e.spec_hash(), base_hash);
}

TEST(ManifestTest, SecretWorkloadFieldsAreRefusedWithTheirPath) {
  auto refused = [](json doc, const std::string& field, const std::string& words) {
    auto m = validate_manifest(doc);
    ASSERT_FALSE(m.has_value()) << field;
    EXPECT_EQ(m.error().field, field);
    EXPECT_NE(m.error().message.find(words), std::string::npos) << m.error().message;
    EXPECT_EQ(m.error().message.rfind(field + ":", 0), 0u) << m.error().message;
  };
  json doc = design_doc();
  json wrong_type = doc;
  wrong_type["spec"]["workload"]["secret_env"] = "yes";
  refused(wrong_type, "spec.workload.secret_env", "true or false");
  json wrong_value = doc;
  wrong_value["spec"]["workload"]["on_secret_rotate"] = "reload";
  refused(wrong_value, "spec.workload.on_secret_rotate", "reload");
  json env_and_sighup = doc;
  env_and_sighup["spec"]["workload"]["secret_env"] = true;
  env_and_sighup["spec"]["workload"]["on_secret_rotate"] = "sighup";
  refused(env_and_sighup, "spec.workload.on_secret_rotate", "secret_env");
  json no_secrets = doc;
  no_secrets["spec"].erase("secrets");
  json env_only = no_secrets;
  env_only["spec"]["workload"]["secret_env"] = true;
  refused(env_only, "spec.workload.secret_env", "spec.secrets");
  json sighup_only = no_secrets;
  sighup_only["spec"]["workload"]["on_secret_rotate"] = "sighup";
  refused(sighup_only, "spec.workload.on_secret_rotate", "spec.secrets");

  EXPECT_TRUE(check_secret_name("db.main_2", "name").has_value());
  auto bad = check_secret_name("../etc", "name");
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().field, "name");
  EXPECT_NE(bad.error().message.find("\"../etc\""), std::string::npos) << bad.error().message;
}

}  // namespace outpost::deployments
