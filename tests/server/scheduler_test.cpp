#include <map>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/digest.h"
#include "server/scheduler/desired_state.h"
#include "server/scheduler/selector.h"
#include "server/scheduler/variant.h"

namespace outpost::scheduler {
namespace {

using deployments::Manifest;
using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kDigestA = "sha256:" + std::string(64, 'a');
const std::string kDigestB = "sha256:" + std::string(64, 'b');
const std::string kDigestC = "sha256:" + std::string(64, 'c');

store::Device make_device(std::string id, std::string site, store::Labels labels,
                          json facts = json::object()) {
  store::Device d;
  d.id = std::move(id);
  d.site = std::move(site);
  d.labels = std::move(labels);
  d.facts_json = facts.dump();
  return d;
}

json cpu_facts(int memory_mb = 7900) {
  return {{"arch", "x86_64"}, {"cores", 4},           {"memory_mb", memory_mb},
          {"os", "linux"},    {"accelerator", "cpu"}, {"runtimes", {{"onnx", "1.16"}}}};
}

json gpu_facts() {
  json f = cpu_facts(32000);
  f["accelerator"] = "gpu";
  return f;
}

store::ModelVariant variant(json selector, json needs, std::string digest,
                            std::string format = "onnx") {
  store::ModelVariant v;
  v.selector_json = selector.dump();
  v.needs_json = needs.dump();
  v.artifact_digest = std::move(digest);
  v.format = std::move(format);
  return v;
}

store::ModelVersion model_version(std::string model, std::string version,
                                  std::vector<store::ModelVariant> variants) {
  store::ModelVersion v;
  v.model = std::move(model);
  v.version = std::move(version);
  v.variants = std::move(variants);
  return v;
}

// defect-net 1.4.0: [0] gpu fp16, [1] cpu fp32 needing 2048 MB.
store::ModelVersion defect_net() {
  return model_version("defect-net", "1.4.0",
                       {variant({{"accelerator", "gpu"}}, {{"precision", "fp16"}}, kDigestA),
                        variant({{"accelerator", "cpu"}}, {{"min_memory_mb", 2048}}, kDigestB)});
}

Manifest::Selector selector(std::vector<std::string> sites,
                            std::map<std::string, std::string> labels,
                            std::vector<std::string> devices) {
  return Manifest::Selector{std::move(sites), std::move(labels), std::move(devices)};
}

// ---- device attributes and deployment selectors

TEST(DeviceAttributesTest, FactsThenLabelsThenSite) {
  store::Device d = make_device("d-1", "plant-7", {{"accelerator", "gpu"}, {"line", "assembly"}},
                                {{"arch", "arm64"},
                                 {"cores", 4},
                                 {"memory_mb", 1024},
                                 {"load", 0.5},
                                 {"battery", false},
                                 {"nested", {{"x", 1}}},
                                 {"nothing", nullptr},
                                 {"accelerator", "cpu"},
                                 {"site", "spoofed"}});
  Attributes a = device_attributes(d);
  EXPECT_EQ(a.at("arch"), "arm64");
  EXPECT_EQ(a.at("cores"), "4");
  EXPECT_EQ(a.at("memory_mb"), "1024");
  EXPECT_EQ(a.at("load"), "0.5");
  EXPECT_EQ(a.at("battery"), "false");
  EXPECT_FALSE(a.contains("nested"));
  EXPECT_FALSE(a.contains("nothing"));
  EXPECT_EQ(a.at("accelerator"), "gpu");  // the label wins over the fact
  EXPECT_EQ(a.at("line"), "assembly");
  EXPECT_EQ(a.at("site"), "plant-7");
}

TEST(DeviceAttributesTest, MissingAcceleratorMeansCpuAndBadFactsAreIgnored) {
  store::Device d = make_device("d-1", "s", {});
  d.facts_json = "not json";
  Attributes a = device_attributes(d);
  EXPECT_EQ(a.at("accelerator"), "cpu");
  EXPECT_EQ(a.at("site"), "s");
  EXPECT_EQ(a.size(), 2u);
}

TEST(SelectorMatchesTest, SitesAreGlobs) {
  store::Device d = make_device("d-1", "plant-7", {});
  EXPECT_TRUE(selector_matches(selector({"plant-*"}, {}, {}), d));
  EXPECT_TRUE(selector_matches(selector({"warehouse-*", "plant-?"}, {}, {}), d));
  EXPECT_TRUE(selector_matches(selector({"plant-[0-9]"}, {}, {}), d));
  EXPECT_FALSE(selector_matches(selector({"warehouse-*"}, {}, {}), d));
  EXPECT_FALSE(selector_matches(selector({"plant"}, {}, {}), d));
  EXPECT_TRUE(selector_matches(selector({}, {}, {}), d));  // no sites: any site
}

TEST(SelectorMatchesTest, LabelsMustAllMatchAndFactsDoNotCount) {
  store::Device d =
      make_device("d-1", "plant-7", {{"line", "assembly"}, {"zone", "a"}}, cpu_facts());
  EXPECT_TRUE(selector_matches(selector({}, {{"line", "assembly"}}, {}), d));
  EXPECT_TRUE(selector_matches(selector({}, {{"line", "assembly"}, {"zone", "a"}}, {}), d));
  EXPECT_FALSE(selector_matches(selector({}, {{"line", "assembly"}, {"zone", "b"}}, {}), d));
  EXPECT_FALSE(selector_matches(selector({}, {{"line", "paint"}}, {}), d));
  EXPECT_FALSE(selector_matches(selector({}, {{"arch", "x86_64"}}, {}), d));  // a fact
}

TEST(SelectorMatchesTest, DevicesListMustContainTheDevice) {
  store::Device d = make_device("d-12", "plant-7", {{"line", "assembly"}});
  EXPECT_TRUE(selector_matches(selector({}, {}, {"d-11", "d-12"}), d));
  EXPECT_FALSE(selector_matches(selector({}, {}, {"d-11"}), d));
  EXPECT_FALSE(selector_matches(selector({"plant-*"}, {{"line", "paint"}}, {"d-12"}), d));
  EXPECT_TRUE(selector_matches(selector({"plant-*"}, {{"line", "assembly"}}, {"d-12"}), d));
}

// ---- variant selector strings

TEST(ParseSelectorTest, ParsesPairs) {
  auto s = parse_selector("accelerator=gpu,arch=arm64");
  ASSERT_TRUE(s.has_value()) << s.error().message;
  EXPECT_EQ(*s, (std::map<std::string, std::string>{{"accelerator", "gpu"}, {"arch", "arm64"}}));
  EXPECT_EQ(format_selector(*s), "accelerator=gpu,arch=arm64");
  EXPECT_TRUE(parse_selector("").value().empty());
  EXPECT_EQ(parse_selector("runtime=onnx-1.16").value().at("runtime"), "onnx-1.16");
}

TEST(ParseSelectorTest, RefusesMalformedSelectors) {
  struct Case {
    const char* text;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{
           {"accelerator", "expected key=value"},
           {"=gpu", "empty key"},
           {"accelerator=", "empty value"},
           {"a=b,,c=d", "empty entry"},
           {"a=b,", "empty entry"},
           {",a=b", "empty entry"},
           {"a=b,a=c", "key a given twice"},
           {"a b=c", "may only use letters"},
           {"a=b=c", "may only use letters"},
           {"a=\xc3\xa9", "may only use letters"},
       }) {
    auto s = parse_selector(c.text);
    ASSERT_FALSE(s.has_value()) << c.text;
    EXPECT_EQ(s.error().code, Errc::kInvalidArgument);
    EXPECT_THAT(s.error().message, HasSubstr(c.message)) << c.text;
  }
}

TEST(AttributesMatchTest, EveryKeyMustMatch) {
  Attributes attrs = {{"accelerator", "gpu"}, {"arch", "arm64"}};
  EXPECT_TRUE(attributes_match({}, attrs));
  EXPECT_TRUE(attributes_match({{"arch", "arm64"}}, attrs));
  EXPECT_FALSE(attributes_match({{"arch", "arm64"}, {"os", "linux"}}, attrs));
}

// ---- variant choice

TEST(ChooseVariantTest, GpuDevicePicksTheGpuVariant) {
  store::ModelVersion v =
      model_version("defect-net", "1.4.0",
                    {variant({{"accelerator", "cpu"}}, json::object(), kDigestB),
                     variant({{"accelerator", "gpu"}}, json::object(), kDigestA)});
  auto choice = choose_variant(v, make_device("d-1", "plant-7", {}, gpu_facts()));
  ASSERT_TRUE(choice.has_value()) << choice.error().message;
  EXPECT_EQ(choice->index, 1u);
  EXPECT_EQ(choice->variant.artifact_digest, kDigestA);
  EXPECT_THAT(choice->explanation, HasSubstr("matches accelerator gpu"));
  EXPECT_THAT(choice->explanation, HasSubstr("[0] accelerator=cpu: ranked lower"));
}

TEST(ChooseVariantTest, CpuOnlyModelStillRunsOnGpuDevice) {
  store::ModelVersion v = model_version(
      "defect-net", "1.4.0", {variant({{"accelerator", "cpu"}}, json::object(), kDigestB)});
  auto choice = choose_variant(v, make_device("d-1", "plant-7", {}, gpu_facts()));
  ASSERT_TRUE(choice.has_value()) << choice.error().message;
  EXPECT_EQ(choice->index, 0u);
  EXPECT_THAT(choice->explanation, Not(HasSubstr("matches accelerator")));
}

TEST(ChooseVariantTest, CpuDevicePicksTheCpuVariant) {
  auto choice = choose_variant(defect_net(), make_device("d-1", "plant-7", {}, cpu_facts()));
  ASSERT_TRUE(choice.has_value()) << choice.error().message;
  EXPECT_EQ(choice->index, 1u);
  EXPECT_EQ(choice->variant.artifact_digest, kDigestB);
}

TEST(ChooseVariantTest, AcceleratorMatchBeatsPrecisionAndAnyDeviceVariant) {
  store::ModelVersion v = model_version(
      "m", "1.0.0",
      {variant(json::object(), {{"precision", "fp32"}}, kDigestA),  // runs anywhere
       variant({{"accelerator", "gpu"}, {"precision", "int8"}}, json::object(), kDigestB)});
  auto gpu = choose_variant(v, make_device("d-1", "s", {}, gpu_facts()));
  ASSERT_TRUE(gpu.has_value());
  EXPECT_EQ(gpu->index, 1u);
  auto cpu = choose_variant(v, make_device("d-2", "s", {}, cpu_facts()));
  ASSERT_TRUE(cpu.has_value());
  EXPECT_EQ(cpu->index, 0u);
}

TEST(ChooseVariantTest, HigherPrecisionWinsThenSpecificityThenOrder) {
  store::Device d = make_device("d-1", "s", {}, cpu_facts());
  store::ModelVersion precision = model_version(
      "m", "1.0.0",
      {variant({{"accelerator", "cpu"}}, json::object(), kDigestA),
       variant({{"accelerator", "cpu"}, {"precision", "int8"}}, json::object(), kDigestB),
       variant({{"accelerator", "cpu"}}, {{"precision", "fp32"}}, kDigestC),
       variant({{"accelerator", "cpu"}, {"precision", "fp16"}}, json::object(), kDigestA)});
  EXPECT_EQ(choose_variant(precision, d).value().index, 2u);
  precision.variants.erase(precision.variants.begin() + 2);   // no fp32 left
  EXPECT_EQ(choose_variant(precision, d).value().index, 2u);  // fp16
  precision.variants.pop_back();                              // no fp16 left
  EXPECT_EQ(choose_variant(precision, d).value().index, 1u);  // int8 > unspecified

  store::ModelVersion specific = model_version(
      "m", "1.0.0",
      {variant({{"accelerator", "cpu"}}, json::object(), kDigestA),
       variant({{"accelerator", "cpu"}, {"arch", "x86_64"}}, json::object(), kDigestB)});
  EXPECT_EQ(choose_variant(specific, d).value().index, 1u);

  store::ModelVersion tie = model_version("m", "1.0.0",
                                          {variant({{"arch", "x86_64"}}, json::object(), kDigestA),
                                           variant({{"os", "linux"}}, json::object(), kDigestB)});
  EXPECT_EQ(choose_variant(tie, d).value().index, 0u);
}

TEST(ChooseVariantTest, MemoryNeedExcludes) {
  store::ModelVersion v = model_version("m", "1.0.0",
                                        {variant({{"accelerator", "cpu"}, {"precision", "fp32"}},
                                                 {{"min_memory_mb", 4096}}, kDigestA),
                                         variant({{"accelerator", "cpu"}, {"precision", "int8"}},
                                                 {{"min_memory_mb", 512}}, kDigestB)});
  EXPECT_EQ(choose_variant(v, make_device("small", "s", {}, cpu_facts(1024))).value().index, 1u);
  EXPECT_EQ(choose_variant(v, make_device("big", "s", {}, cpu_facts(8192))).value().index, 0u);
  // Unknown memory does not exclude.
  EXPECT_EQ(choose_variant(v, make_device("unknown", "s", {})).value().index, 0u);
}

TEST(ChooseVariantTest, LabelOverridesFacts) {
  store::Device posing = make_device("d-1", "plant-7", {{"accelerator", "gpu"}}, cpu_facts());
  auto choice = choose_variant(defect_net(), posing);
  ASSERT_TRUE(choice.has_value());
  EXPECT_EQ(choice->index, 0u);
}

TEST(ChooseVariantTest, NeedsAcceleratorAndOtherNeeds) {
  store::ModelVersion v =
      model_version("m", "1.0.0",
                    {variant(json::object(), {{"accelerator", "gpu"}}, kDigestA),
                     variant(json::object(), {{"os", "windows"}}, kDigestB),
                     variant(json::object(), {{"min_cores", 8}}, kDigestC)});
  auto choice = choose_variant(v, make_device("d-1", "s", {}, cpu_facts()));
  ASSERT_FALSE(choice.has_value());
  EXPECT_EQ(choice.error().message,
            "no variant of m 1.0.0 fits device d-1: [0] (any device): needs accelerator gpu, "
            "device has cpu; [1] (any device): needs os=windows, device has os=linux; [2] (any "
            "device): needs cores >= 8, device has 4");
}

TEST(ChooseVariantTest, UnschedulableReasonListsEveryVariant) {
  auto choice = choose_variant(defect_net(), make_device("d-12", "plant-7", {}, cpu_facts(1024)));
  ASSERT_FALSE(choice.has_value());
  EXPECT_EQ(choice.error().code, Errc::kFailedPrecondition);
  EXPECT_EQ(choice.error().message,
            "no variant of defect-net 1.4.0 fits device d-12: [0] accelerator=gpu: device has "
            "accelerator=cpu; [1] accelerator=cpu: needs 2048 MB memory, device has 1024 MB");
}

TEST(ChooseVariantTest, NoVariantsAtAll) {
  auto choice = choose_variant(model_version("m", "1.0.0", {}), make_device("d-1", "s", {}));
  ASSERT_FALSE(choice.has_value());
  EXPECT_EQ(choice.error().message,
            "no variant of m 1.0.0 fits device d-1: the version has no variants");
}

TEST(ChooseVariantTest, MissingSelectorKeyIsNamed) {
  store::ModelVersion v = model_version(
      "m", "1.0.0", {variant({{"arch", "arm64"}, {"npu", "hailo8"}}, json::object(), kDigestA)});
  auto choice = choose_variant(v, make_device("d-1", "s", {}, cpu_facts()));
  ASSERT_FALSE(choice.has_value());
  EXPECT_THAT(choice.error().message,
              HasSubstr("[0] arch=arm64,npu=hailo8: device has arch=x86_64, device has no npu"));
}

// ---- desired state

const char* kDetector = R"({"apiVersion":"outpost/v1","kind":"Deployment",
  "metadata":{"name":"defect-detector"},
  "spec":{"selector":{"sites":["plant-*"],"labels":{"line":"assembly"}},
    "model":{"name":"defect-net","version":"1.4.0"},
    "serve":{"route":"/models/defect-detector",
             "fallback":{"model":"defect-net-tiny","version":"1.0.0","min_confidence":0.6}},
    "config":{"threshold":0.8},"secrets":["camera-credentials"]}})";

const char* kMonitor = R"({"apiVersion":"outpost/v1","kind":"Deployment",
  "metadata":{"name":"line-monitor"},
  "spec":{"workload":{"command":["bin/monitor"],"env":{"LOG_LEVEL":"info"}}}})";

const char* kPaintOnly = R"({"apiVersion":"outpost/v1","kind":"Deployment",
  "metadata":{"name":"paint-inspector"},
  "spec":{"selector":{"labels":{"line":"paint"}},
    "model":{"name":"defect-net","version":"1.4.0"}}})";

Manifest manifest(const std::string& text, const std::function<void(json&)>& edit = {}) {
  json doc = json::parse(text);
  if (edit) edit(doc);
  auto m = deployments::validate_manifest(doc);
  EXPECT_TRUE(m.has_value()) << m.error().message;
  return m ? *m : Manifest{};
}

struct FakeModels {
  std::map<std::pair<std::string, std::string>, store::ModelVersion> versions;
  int calls = 0;
  bool fail = false;

  FakeModels() {
    versions[{"defect-net", "1.4.0"}] = defect_net();
    versions[{"defect-net-tiny", "1.0.0"}] = model_version(
        "defect-net-tiny", "1.0.0", {variant(json::object(), json::object(), kDigestC)});
  }

  ModelLookup lookup() {
    return [this](const std::string& model,
                  const std::string& version) -> Result<std::optional<store::ModelVersion>> {
      ++calls;
      if (fail) return make_error(Errc::kUnavailable, "database is down");
      auto it = versions.find({model, version});
      if (it == versions.end()) return std::optional<store::ModelVersion>();
      return std::optional<store::ModelVersion>(it->second);
    };
  }
};

store::Device assembly_gpu() {
  return make_device("d-12", "plant-7", {{"line", "assembly"}}, gpu_facts());
}

DesiredComputation must_compute(const store::Device& device, const std::vector<DeploymentInput>& in,
                                const ModelLookup& lookup) {
  auto out = compute_desired_state(device, in, lookup);
  EXPECT_TRUE(out.has_value()) << out.error().message;
  return out ? *out : DesiredComputation{};
}

TEST(DesiredStateTest, BuildsTheDocumentForMatchingDeploymentsSortedByName) {
  Manifest detector = manifest(kDetector);
  Manifest monitor = manifest(kMonitor);
  Manifest paint = manifest(kPaintOnly);
  FakeModels models;
  DesiredComputation out =
      must_compute(assembly_gpu(), {{&paint, 1}, {&monitor, 3}, {&detector, 2}}, models.lookup());

  const json& d = out.desired;
  EXPECT_EQ(d["device"], "d-12");
  EXPECT_FALSE(d.contains("generation"));
  ASSERT_EQ(d["deployments"].size(), 2u);
  const json& first = d["deployments"][0];
  EXPECT_EQ(first["name"], "defect-detector");
  EXPECT_EQ(first["revision"], 2);
  EXPECT_EQ(first["model"]["name"], "defect-net");
  EXPECT_EQ(first["model"]["version"], "1.4.0");
  EXPECT_EQ(first["model"]["variant"], json({{"index", 0},
                                             {"selector", {{"accelerator", "gpu"}}},
                                             {"artifact", kDigestA},
                                             {"format", "onnx"}}));
  EXPECT_EQ(first["serve"]["route"], "/models/defect-detector");
  EXPECT_EQ(first["serve"]["fallback"]["model"], "defect-net-tiny");
  EXPECT_DOUBLE_EQ(first["serve"]["fallback"]["min_confidence"].get<double>(), 0.6);
  EXPECT_EQ(first["serve"]["fallback"]["variant"]["artifact"], kDigestC);
  EXPECT_EQ(first["config"], json({{"threshold", 0.8}}));
  EXPECT_EQ(first["secrets"], json({"camera-credentials"}));
  EXPECT_EQ(first["placement"], json({{"per_device", true}}));
  EXPECT_EQ(first["telemetry"], json({{"sample", 0.1}, {"on_anomaly", 1.0}}));
  EXPECT_FALSE(first.contains("workload"));
  EXPECT_FALSE(first.contains("rollout"));

  const json& second = d["deployments"][1];
  EXPECT_EQ(second["name"], "line-monitor");
  EXPECT_EQ(second["revision"], 3);
  EXPECT_FALSE(second.contains("model"));
  EXPECT_EQ(second["workload"]["command"], json({"bin/monitor"}));
  EXPECT_EQ(second["workload"]["restart"], "on-failure");

  EXPECT_EQ(out.desired_json, d.dump());
  EXPECT_EQ(out.desired_hash, sha256_hex(out.desired_json));
  EXPECT_EQ(out.schedule, json::parse(R"({"deployments":{
              "defect-detector":{"state":"scheduled","revision":2,"variant":0,"fallback_variant":0},
              "line-monitor":{"state":"scheduled","revision":3}}})"));
}

TEST(DesiredStateTest, SameInputsGiveTheSameHashInAnyOrder) {
  Manifest detector = manifest(kDetector);
  Manifest monitor = manifest(kMonitor);
  FakeModels models;
  auto a = must_compute(assembly_gpu(), {{&detector, 2}, {&monitor, 1}}, models.lookup());
  auto b = must_compute(assembly_gpu(), {{&monitor, 1}, {&detector, 2}}, models.lookup());
  EXPECT_EQ(a.desired_json, b.desired_json);
  EXPECT_EQ(a.desired_hash, b.desired_hash);
  // A manifest parsed again from YAML gives the same document.
  auto yaml = deployments::parse_manifest(
      "apiVersion: outpost/v1\nkind: Deployment\nmetadata: {name: line-monitor}\n"
      "spec:\n  workload:\n    env: {LOG_LEVEL: info}\n    command: [bin/monitor]\n");
  ASSERT_TRUE(yaml.has_value());
  auto c = must_compute(assembly_gpu(), {{&detector, 2}, {&*yaml, 1}}, models.lookup());
  EXPECT_EQ(a.desired_hash, c.desired_hash);
}

TEST(DesiredStateTest, RevisionVariantAndSpecChangesChangeTheHash) {
  Manifest detector = manifest(kDetector);
  FakeModels models;
  const std::string base =
      must_compute(assembly_gpu(), {{&detector, 2}}, models.lookup()).desired_hash;

  EXPECT_NE(must_compute(assembly_gpu(), {{&detector, 3}}, models.lookup()).desired_hash, base);

  store::Device as_cpu = assembly_gpu();
  as_cpu.labels["accelerator"] = "cpu";  // the cpu variant now
  auto cpu = must_compute(as_cpu, {{&detector, 2}}, models.lookup());
  EXPECT_EQ(cpu.schedule["deployments"]["defect-detector"]["variant"], 1);
  EXPECT_NE(cpu.desired_hash, base);

  for (const auto& edit : std::vector<std::function<void(json&)>>{
           [](json& d) { d["spec"]["config"]["threshold"] = 0.9; },
           [](json& d) { d["spec"]["serve"]["route"] = "/models/other"; },
           [](json& d) { d["spec"]["serve"]["fallback"]["min_confidence"] = 0.5; },
           [](json& d) { d["spec"]["secrets"] = json::array(); },
           [](json& d) {
             d["spec"]["telemetry"] = {{"sample", 0.5}};
           },
           [](json& d) {
             d["spec"]["placement"] = {{"replicas_per_site", 1}};
           },
       }) {
    Manifest changed = manifest(kDetector, edit);
    EXPECT_NE(must_compute(assembly_gpu(), {{&changed, 2}}, models.lookup()).desired_hash, base);
  }

  // The generation and cordoning are not part of the document.
  store::Device later = assembly_gpu();
  later.generation = 41;
  later.cordoned = true;
  EXPECT_EQ(must_compute(later, {{&detector, 2}}, models.lookup()).desired_hash, base);
}

TEST(DesiredStateTest, UnfitDeploymentIsLeftOutAndReported) {
  Manifest detector = manifest(kDetector);
  Manifest monitor = manifest(kMonitor);
  FakeModels models;
  store::Device small = make_device("d-12", "plant-7", {{"line", "assembly"}}, cpu_facts(1024));
  auto out = must_compute(small, {{&detector, 2}, {&monitor, 1}}, models.lookup());
  ASSERT_EQ(out.desired["deployments"].size(), 1u);
  EXPECT_EQ(out.desired["deployments"][0]["name"], "line-monitor");
  const json& entry = out.schedule["deployments"]["defect-detector"];
  EXPECT_EQ(entry["state"], "unschedulable");
  EXPECT_EQ(entry["revision"], 2);
  EXPECT_EQ(entry["reason"],
            "no variant of defect-net 1.4.0 fits device d-12: [0] accelerator=gpu: device has "
            "accelerator=cpu; [1] accelerator=cpu: needs 2048 MB memory, device has 1024 MB");
}

TEST(DesiredStateTest, MissingModelVersionIsUnschedulable) {
  Manifest detector = manifest(kDetector, [](json& d) { d["spec"]["model"]["version"] = "9.9.9"; });
  FakeModels models;
  auto out = must_compute(assembly_gpu(), {{&detector, 2}}, models.lookup());
  EXPECT_TRUE(out.desired["deployments"].empty());
  EXPECT_EQ(out.schedule["deployments"]["defect-detector"]["reason"],
            "model defect-net version 9.9.9 does not exist");
}

TEST(DesiredStateTest, UnfitFallbackLeavesThePrimaryServing) {
  Manifest detector = manifest(kDetector);
  FakeModels models;
  models.versions[{"defect-net-tiny", "1.0.0"}] = model_version(
      "defect-net-tiny", "1.0.0", {variant({{"arch", "arm64"}}, json::object(), kDigestC)});
  auto out = must_compute(assembly_gpu(), {{&detector, 2}}, models.lookup());
  ASSERT_EQ(out.desired["deployments"].size(), 1u);
  const json& serve = out.desired["deployments"][0]["serve"];
  EXPECT_EQ(serve["route"], "/models/defect-detector");
  EXPECT_FALSE(serve.contains("fallback"));
  const json& entry = out.schedule["deployments"]["defect-detector"];
  EXPECT_EQ(entry["state"], "scheduled");
  EXPECT_THAT(entry["fallback_reason"].get<std::string>(),
              HasSubstr("no variant of defect-net-tiny 1.0.0 fits device d-12: [0] arch=arm64"));
}

TEST(DesiredStateTest, NonMatchingDevicesGetNothing) {
  Manifest detector = manifest(kDetector);
  FakeModels models;
  store::Device elsewhere = make_device("d-9", "warehouse-1", {{"line", "assembly"}}, gpu_facts());
  auto out = must_compute(elsewhere, {{&detector, 2}}, models.lookup());
  EXPECT_EQ(out.desired, json({{"device", "d-9"}, {"deployments", json::array()}}));
  EXPECT_EQ(out.schedule, json({{"deployments", json::object()}}));
  EXPECT_EQ(models.calls, 0);
}

TEST(DesiredStateTest, CordonedDevicesKeepTheirDeployments) {
  Manifest detector = manifest(kDetector);
  FakeModels models;
  store::Device cordoned = assembly_gpu();
  cordoned.cordoned = true;
  auto out = must_compute(cordoned, {{&detector, 2}}, models.lookup());
  EXPECT_EQ(out.desired["deployments"].size(), 1u);
}

TEST(DesiredStateTest, LookupFailureIsAnError) {
  Manifest detector = manifest(kDetector);
  FakeModels models;
  models.fail = true;
  auto out = compute_desired_state(assembly_gpu(), {{&detector, 2}}, models.lookup());
  ASSERT_FALSE(out.has_value());
  EXPECT_EQ(out.error().code, Errc::kUnavailable);
  EXPECT_EQ(out.error().message,
            "deployment defect-detector: looking up model defect-net version 1.4.0: database is "
            "down");
}

// ---- delta offers

std::string digest_of(char c) { return "sha256:" + std::string(64, c); }

const std::string kOldA = digest_of('1');   // an earlier gpu variant of defect-net
const std::string kOldA2 = digest_of('2');  // an even earlier one
const std::string kOldB = digest_of('3');   // an earlier cpu variant
const std::string kOldC = digest_of('4');   // an earlier defect-net-tiny
const std::string kBundle = digest_of('5');
const std::string kOldBundle = digest_of('6');

// Ready deltas to everything the detector and the bundled monitor can need, and more.
DeltaIndex delta_index() {
  return {
      {kDigestA, {{kOldA, digest_of('7'), 1000}, {kOldA2, digest_of('8'), 2000}}},
      {kDigestB, {{kOldB, digest_of('9'), 500}}},
      {kDigestC, {{kOldC, digest_of('d'), 300}}},
      {kBundle, {{kOldBundle, digest_of('e'), 70}}},
  };
}

store::Device holding(const json& artifacts) {
  store::Device d = assembly_gpu();
  d.status_json = json({{"generation", 3}, {"artifacts", artifacts}}).dump();
  return d;
}

Manifest bundled_monitor() {
  return manifest(kMonitor, [](json& d) { d["spec"]["workload"]["bundle"] = kBundle; });
}

json offer(const std::string& base, const std::string& delta, int64_t size) {
  return {{"base", base}, {"delta", delta}, {"size", size}};
}

DesiredComputation compute_with(const store::Device& device, const std::vector<DeploymentInput>& in,
                                const DeltaIndex& index) {
  FakeModels models;
  auto out = compute_desired_state(device, in, models.lookup(), &index);
  EXPECT_TRUE(out.has_value()) << out.error().message;
  return out ? *out : DesiredComputation{};
}

TEST(DeltaOffersTest, OffersDeltasFromTheBasesTheDeviceHoldsForWhatItNeeds) {
  Manifest detector = manifest(kDetector);
  Manifest monitor = bundled_monitor();
  // It holds the old gpu variant, the old fallback, the old bundle, and an old cpu variant
  // that this gpu device does not run (so the cpu variant's delta is no use to it).
  const store::Device device = holding({kOldBundle, kOldA, kOldC, kOldB});
  auto out = compute_with(device, {{&detector, 2}, {&monitor, 1}}, delta_index());
  json want = json::object();
  want[kDigestA] = json::array({offer(kOldA, digest_of('7'), 1000)});
  want[kDigestC] = json::array({offer(kOldC, digest_of('d'), 300)});
  want[kBundle] = json::array({offer(kOldBundle, digest_of('e'), 70)});
  EXPECT_EQ(out.desired["deltas"], want) << out.desired["deltas"].dump();
  // Offers sit beside the deployments and leave every entry as it was.
  FakeModels models;
  auto plain = must_compute(device, {{&detector, 2}, {&monitor, 1}}, models.lookup());
  EXPECT_FALSE(plain.desired.contains("deltas"));
  EXPECT_EQ(out.desired["deployments"], plain.desired["deployments"]);
  EXPECT_EQ(out.desired_json, out.desired.dump());
  EXPECT_EQ(out.desired_hash, sha256_hex(out.desired_json));
}

TEST(DeltaOffersTest, EveryHeldBaseIsOfferedInTheIndexOrder) {
  Manifest detector = manifest(kDetector);
  auto out = compute_with(holding({kOldA2, kOldA}), {{&detector, 2}}, delta_index());
  const json& offers = out.desired["deltas"][kDigestA];
  ASSERT_EQ(offers.size(), 2u) << out.desired.dump();
  EXPECT_EQ(offers[0]["base"], kOldA);
  EXPECT_EQ(offers[1]["base"], kOldA2);
  EXPECT_EQ(offers[1]["delta"], digest_of('8'));
  EXPECT_EQ(offers[1]["size"], 2000);
  EXPECT_EQ(out.desired["deltas"].size(), 1u);  // it holds no base of the fallback
}

TEST(DeltaOffersTest, NoOfferForATargetTheDeviceHoldsAlready) {
  Manifest detector = manifest(kDetector);
  auto out = compute_with(holding({kOldA, kDigestA, kOldC}), {{&detector, 2}}, delta_index());
  EXPECT_FALSE(out.desired["deltas"].contains(kDigestA)) << out.desired.dump();
  EXPECT_TRUE(out.desired["deltas"].contains(kDigestC));
}

TEST(DeltaOffersTest, NoOffersForTargetsTheDesiredStateDoesNotReference) {
  // Holds bases of everything in the index, but runs only the monitor (no bundle in it).
  Manifest monitor = manifest(kMonitor);
  auto out = compute_with(holding({kOldA, kOldA2, kOldB, kOldC, kOldBundle}), {{&monitor, 1}},
                          delta_index());
  EXPECT_FALSE(out.desired.contains("deltas")) << out.desired.dump();
  // A deployment that cannot be scheduled there needs nothing either.
  store::Device small = make_device("d-12", "plant-7", {{"line", "assembly"}}, cpu_facts(1024));
  small.status_json = json({{"artifacts", {kOldA, kOldB}}}).dump();
  Manifest detector = manifest(kDetector);
  out = compute_with(small, {{&detector, 2}}, delta_index());
  EXPECT_FALSE(out.desired.contains("deltas")) << out.desired.dump();
}

TEST(DeltaOffersTest, NoOffersWhenTheDeviceReportsNothingItHolds) {
  Manifest detector = manifest(kDetector);
  FakeModels models;
  const std::string plain_hash =
      must_compute(assembly_gpu(), {{&detector, 2}}, models.lookup()).desired_hash;
  std::vector<std::string> statuses = {
      "",                                     // never reported
      "not json",                             //
      R"({"generation":3})",                  // an agent from before deltas
      R"({"artifacts":[]})",                  //
      R"({"artifacts":")" + kOldA + R"("})",  // not a list
      R"({"artifacts":[1,null,{"d":2}]})",    // no strings in it
      R"(["artifacts"])",                     // not an object
  };
  for (const auto& status : statuses) {
    SCOPED_TRACE(status);
    store::Device device = assembly_gpu();
    device.status_json = status;
    auto out = compute_with(device, {{&detector, 2}}, delta_index());
    EXPECT_FALSE(out.desired.contains("deltas")) << out.desired.dump();
    EXPECT_EQ(out.desired_hash, plain_hash);
  }
  // And no index, or an empty one, offers nothing to a device that holds every base.
  auto none = compute_with(holding({kOldA, kOldC}), {{&detector, 2}}, DeltaIndex{});
  EXPECT_FALSE(none.desired.contains("deltas"));
  auto no_index =
      compute_desired_state(holding({kOldA, kOldC}), {{&detector, 2}}, models.lookup(), nullptr);
  ASSERT_TRUE(no_index.has_value());
  EXPECT_FALSE(no_index->desired.contains("deltas"));
}

TEST(DeltaOffersTest, HeldArtifactsAreTheStringsOfTheStatusListSorted) {
  store::Device device = assembly_gpu();
  device.status_json = json({{"artifacts", {kOldC, 7, kOldA, nullptr}}}).dump();
  EXPECT_EQ(held_artifacts(device), (std::vector<std::string>{kOldA, kOldC}));
  device.status_json = R"({"deployments":[]})";
  EXPECT_TRUE(held_artifacts(device).empty());
}

}  // namespace
}  // namespace outpost::scheduler
