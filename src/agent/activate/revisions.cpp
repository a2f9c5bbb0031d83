#include "agent/activate/revisions.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <optional>

#include "agent/activate/bundle.h"
#include "common/digest.h"
#include "common/durable_file.h"

namespace outpost::agent {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
}

// Model files get a name a runtime recognises: "<model>.<format>", e.g. defect-net.onnx.
std::string model_file_name(const std::string& name, const json& variant) {
  std::string format = variant.is_object() ? variant.value("format", "bin") : "bin";
  return name + "." + (format.empty() ? "bin" : format);
}

// obj[key] when it is a string, else "" (signed entries are still checked, never trusted).
std::string string_at(const json& obj, const char* key) {
  return obj.is_object() && obj.contains(key) && obj[key].is_string() ? obj[key].get<std::string>()
                                                                      : "";
}

// A model file of a revision: where it goes (relative to the revision directory) and the
// blob it is made from; `placed` is false when the entry names no variant (nothing to place).
struct ModelFile {
  std::string rel_path;
  std::string digest;
  bool placed = true;
};

// The served model: model/<name>.<format>.
std::optional<ModelFile> primary_model_file(const json& entry) {
  if (!entry.is_object() || !entry.contains("model") || !entry["model"].is_object()) {
    return std::nullopt;
  }
  const json& model = entry["model"];
  static const json kNone;
  const json& variant = model.contains("variant") ? model["variant"] : kNone;
  return ModelFile{"model/" + model_file_name(model.value("name", "model"), variant),
                   string_at(variant, "artifact"), model.contains("variant")};
}

// The fallback model (serve.fallback, with its variant): model/fallback/<name>.<format>.
std::optional<ModelFile> fallback_model_file(const json& entry) {
  if (!entry.is_object() || !entry.contains("serve") || !entry["serve"].is_object()) {
    return std::nullopt;
  }
  const json& serve = entry["serve"];
  if (!serve.contains("fallback") || !serve["fallback"].is_object()) return std::nullopt;
  const json& fb = serve["fallback"];
  if (!fb.contains("variant") || !fb["variant"].is_object()) return std::nullopt;
  return ModelFile{
      "model/fallback/" + model_file_name(fb.value("model", "fallback"), fb["variant"]),
      string_at(fb["variant"], "artifact")};
}

}  // namespace

std::string revision_key(const json& entry) {
  int64_t revision = 0;
  if (entry.is_object() && entry.contains("revision") && entry["revision"].is_number_integer()) {
    revision = entry["revision"].get<int64_t>();
  }
  return "r" + std::to_string(revision) + "-" + sha256_hex(entry.dump()).substr(0, 10);
}

std::vector<std::string> needed_artifacts(const json& entry) {
  // Only well-formed digests: they become file names under artifacts/.
  std::vector<std::string> out;
  auto add = [&](const std::string& digest) {
    if (is_digest_ref(digest)) out.push_back(digest);
  };
  if (auto file = primary_model_file(entry)) add(file->digest);
  if (auto file = fallback_model_file(entry)) add(file->digest);
  if (entry.is_object() && entry.contains("workload")) add(string_at(entry["workload"], "bundle"));
  return out;
}

std::map<std::string, std::vector<DeltaOfferRef>> offered_deltas(const json& doc) {
  std::map<std::string, std::vector<DeltaOfferRef>> out;
  if (!doc.is_object() || !doc.contains("deltas") || !doc["deltas"].is_object()) return out;
  for (const auto& [target, offers] : doc["deltas"].items()) {
    if (!is_digest_ref(target) || !offers.is_array()) continue;
    for (const auto& o : offers) {
      if (!o.is_object()) continue;
      DeltaOfferRef ref{string_at(o, "delta"), string_at(o, "base")};
      if (is_digest_ref(ref.delta) && is_digest_ref(ref.base)) out[target].push_back(ref);
    }
  }
  return out;
}

DeploymentDir::DeploymentDir(const std::string& data_dir, const std::string& name)
    : dir_(data_dir + "/deployments/" + name) {}

Result<DeploymentPointers> DeploymentDir::load() const {
  DeploymentPointers p;
  auto text = read_file(dir_ + "/state.json");
  if (!text) {
    if (text.error().code == Errc::kNotFound) return p;
    return make_error(text.error());
  }
  auto doc = json::parse(*text, nullptr, false);
  if (!doc.is_object()) return make_error(Errc::kIo, dir_ + "/state.json: not a JSON object");
  p.current = doc.value("current", "");
  p.previous = doc.value("previous", "");
  p.trial = doc.value("trial", false);
  if (doc.contains("failed") && doc["failed"].is_object()) {
    for (const auto& [k, v] : doc["failed"].items()) {
      if (v.is_string()) p.failed[k] = v.get<std::string>();
    }
  }
  return p;
}

Status DeploymentDir::save(const DeploymentPointers& p) const {
  OUTPOST_TRY(make_dirs(dir_, 0700));
  json doc = {
      {"current", p.current}, {"previous", p.previous}, {"trial", p.trial}, {"failed", p.failed}};
  return write_file_durably(dir_ + "/state.json", doc.dump());
}

bool DeploymentDir::prepared(const std::string& key) const {
  struct stat st {};
  return !key.empty() && ::stat(revision_path(key).c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string DeploymentDir::model_path(const std::string& key, const json& entry) const {
  auto file = primary_model_file(entry);
  return file ? revision_path(key) + "/" + file->rel_path : "";
}

std::string DeploymentDir::fallback_model_path(const std::string& key, const json& entry) const {
  auto file = fallback_model_file(entry);
  return file ? revision_path(key) + "/" + file->rel_path : "";
}

Status DeploymentDir::prepare(const std::string& key, const json& entry,
                              const ArtifactStore& artifacts) const {
  try {
    return prepare_unchecked(key, entry, artifacts);
  } catch (const json::exception& e) {
    remove_tree(revision_path(key) + ".tmp");
    return make_error(Errc::kInvalidArgument,
                      "preparing " + key + ": malformed deployment entry: " + e.what());
  }
}

Status DeploymentDir::prepare_unchecked(const std::string& key, const json& entry,
                                        const ArtifactStore& artifacts) const {
  if (prepared(key)) return ok();
  const std::string tmp = revision_path(key) + ".tmp";
  remove_tree(tmp);
  OUTPOST_TRY(make_dirs(tmp, 0700));
  auto fail = [&](Error error) -> Status {
    remove_tree(tmp);
    return make_error(error.with_context("preparing " + key));
  };
  // A hard link costs no space and the blob is immutable; copy where links are not allowed.
  auto place_model = [&](const ModelFile& file) -> Status {
    if (!artifacts.has(file.digest)) {
      return make_error(Errc::kNotFound, "artifact " + file.digest + " is not on the device");
    }
    const std::string target = tmp + "/" + file.rel_path;
    OUTPOST_TRY(make_dirs(fs::path(target).parent_path().string(), 0755));
    if (::link(artifacts.path(file.digest).c_str(), target.c_str()) != 0) {
      std::error_code ec;
      fs::copy_file(artifacts.path(file.digest), target, ec);
      if (ec) return make_error(Errc::kIo, "cannot place the model file: " + ec.message());
    }
    return ok();
  };
  for (const auto& file : {primary_model_file(entry), fallback_model_file(entry)}) {
    if (!file || !file->placed) continue;
    if (auto placed = place_model(*file); !placed) return fail(placed.error());
  }
  if (entry.contains("workload") && entry["workload"].is_object()) {
    const std::string bundle = entry["workload"].value("bundle", "");
    if (!bundle.empty()) {
      if (!artifacts.has(bundle)) {
        return fail(Error{Errc::kNotFound, "bundle " + bundle + " is not on the device", ""});
      }
      auto unpacked = unpack_bundle(artifacts.path(bundle), tmp + "/app");
      if (!unpacked) return fail(unpacked.error());
    } else if (auto made = make_dirs(tmp + "/app", 0755); !made) {
      return fail(made.error());
    }
  }
  json config = entry.value("config", json::object());
  if (auto w = write_file_durably(tmp + "/config.json", config.dump(2) + "\n"); !w) {
    return fail(w.error());
  }
  if (auto w = write_file_durably(tmp + "/entry.json", entry.dump()); !w) return fail(w.error());
  if (auto f = fsync_path(tmp); !f) return fail(f.error());
  if (auto r = rename_durably(tmp, revision_path(key)); !r) return fail(r.error());
  return ok();
}

void DeploymentDir::remove_except(const std::vector<std::string>& keep) const {
  for (const auto& name : list_directory(dir_)) {
    if (name == "state.json" || name == "logs") continue;
    if (std::find(keep.begin(), keep.end(), name) != keep.end()) continue;
    remove_tree(dir_ + "/" + name);
  }
}

Result<json> DeploymentDir::entry(const std::string& key) const {
  auto text = read_file(revision_path(key) + "/entry.json");
  if (!text) return make_error(text.error());
  auto doc = json::parse(*text, nullptr, false);
  if (!doc.is_object()) return make_error(Errc::kIo, revision_path(key) + "/entry.json: corrupt");
  return doc;
}

std::vector<std::string> list_deployment_dirs(const std::string& data_dir) {
  return list_directory(data_dir + "/deployments");
}

void remove_deployment_dir(const std::string& data_dir, const std::string& name) {
  remove_tree(data_dir + "/deployments/" + name);
}

}  // namespace outpost::agent
