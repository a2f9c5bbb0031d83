// Revisions of a deployment on disk, prepared beside each other, and the one pointer file that
// says which is current: activation and rollback are a single atomic rewrite of that file.
//
//   DIR/deployments/<name>/state.json
//   {"current":KEY,"previous":KEY,"trial":bool,"failed":{KEY:why}} DIR/deployments/<name>/<KEY>/
//   entry.json, config.json, model/<file>, model/fallback/<file>, app/ (the bundle)
//
// A revision directory exists only once it is complete (built as <KEY>.tmp, then renamed), and
// it is built only from verified artifacts, so whatever a pointer names is safe to run.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/fetch/fetcher.h"
#include "common/error.h"

namespace outpost::agent {

struct DeploymentPointers {
  std::string current;   // revision key running (or to run); "" = none
  std::string previous;  // kept for instant rollback
  bool trial = false;    // current is new and not yet healthy: roll back to previous if it fails
  std::map<std::string, std::string> failed;  // keys that failed and were rolled back, with why
};

// "r<revision>-<10 hex of the entry's hash>": a new revision, or the same revision with another
// variant (the device's hardware changed), gets a new key.
std::string revision_key(const nlohmann::json& entry);
// Artifacts an entry needs on the device: the model variant, the fallback model's variant
// (serve.fallback.variant) and the workload bundle.
std::vector<std::string> needed_artifacts(const nlohmann::json& entry);
// Delta offers of a whole desired document (its top-level "deltas"), well-formed ones only:
// target -> (delta, base) digests, in the server's order.
struct DeltaOfferRef {
  std::string delta;
  std::string base;
};
std::map<std::string, std::vector<DeltaOfferRef>> offered_deltas(const nlohmann::json& doc);

class DeploymentDir {
 public:
  DeploymentDir(const std::string& data_dir, const std::string& name);
  const std::string& path() const { return dir_; }
  std::string revision_path(const std::string& key) const { return dir_ + "/" + key; }

  // Missing state.json = no pointers (a fresh deployment).
  [[nodiscard]] Result<DeploymentPointers> load() const;
  [[nodiscard]] Status save(const DeploymentPointers& pointers) const;

  bool prepared(const std::string& key) const;
  // Builds the revision directory from verified artifacts (idempotent). Errors: a missing
  // artifact, a refused bundle (its entry named), disk errors.
  [[nodiscard]] Status prepare(const std::string& key, const nlohmann::json& entry,
                               const ArtifactStore& artifacts) const;
  // Removes revision directories not in `keep` and leftover *.tmp builds.
  void remove_except(const std::vector<std::string>& keep) const;
  // The deployment's entry.json of a prepared revision.
  [[nodiscard]] Result<nlohmann::json> entry(const std::string& key) const;
  // Path of the model file of a prepared revision ("" when it has no model).
  std::string model_path(const std::string& key, const nlohmann::json& entry) const;
  // Path of the fallback model file (model/fallback/<name>.<format>; "" when there is none).
  std::string fallback_model_path(const std::string& key, const nlohmann::json& entry) const;

 private:
  [[nodiscard]] Status prepare_unchecked(const std::string& key, const nlohmann::json& entry,
                                         const ArtifactStore& artifacts) const;
  std::string dir_;
};

// Names of the deployment directories under DIR/deployments.
std::vector<std::string> list_deployment_dirs(const std::string& data_dir);
// Removes a whole deployment directory (the deployment is gone from the desired state).
void remove_deployment_dir(const std::string& data_dir, const std::string& name);

}  // namespace outpost::agent
