// Keeps every device's desired state in step with the deployments: recomputes it with the
// scheduler (each device on the revision a rollout gives it: its assignment, else the
// deployment's stable revision), stores it (the generation grows only on a real change), signs it, and
// publishes it to waiting long-polls.
#pragma once

#include <mutex>
#include <string>

#include "common/error.h"
#include "server/sync/sync_hub.h"
#include "store/store.h"

namespace outpost::server {

// Thread-safe: reconciliations are serialized by mu_ so generations move in order.
class DesiredStateUpdater {
 public:
  DesiredStateUpdater(store::Store& store, sync::SyncHub& hub, std::string signing_secret_key);

  struct Summary {
    size_t devices = 0;
    size_t changed = 0;
    size_t unschedulable = 0;
  };
  // Recomputes every device (after a deployment or model change).
  [[nodiscard]] Result<Summary> reconcile_all();
  // Recomputes one device (after enroll or a label change).
  [[nodiscard]] Result<Summary> reconcile_device(const std::string& device_id);
  // Recomputes these devices (a rollout moved them), as loaded by the caller.
  [[nodiscard]] Result<Summary> reconcile_devices(const std::vector<store::Device>& devices) {
    return reconcile(devices);
  }

  // The signed document of the device's current generation (from memory, else the store).
  [[nodiscard]] Result<sync::SignedDesired> signed_desired(const std::string& device_id);

  // Body bytes as sent to devices: the desired document with its generation first.
  static std::string document_body(int64_t generation, const std::string& desired_json);

 private:
  [[nodiscard]] Result<Summary> reconcile(const std::vector<store::Device>& devices);
  sync::SignedDesired sign(int64_t generation, const std::string& desired_json) const;

  store::Store& store_;
  sync::SyncHub& hub_;
  std::string signing_secret_key_;
  std::mutex mu_;
};

}  // namespace outpost::server
