// Keeps every device's desired state in step with the deployments: recomputes it with the
// scheduler (each device on the revision a rollout gives it: its assignment, else the
// deployment's stable revision), stores it (the generation grows only on a real change), signs it,
// and publishes it to waiting long-polls. Secrets the device's deployments name are added at the
// top level ("secrets"), each version sealed to the device's own key (see reconcile()).
#pragma once

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/error.h"
#include "server/sync/sync_hub.h"
#include "store/store.h"

namespace outpost::server {

// Thread-safe: reconciliations are serialized by mu_ so generations move in order.
class SecretVault;

class DesiredStateUpdater {
 public:
  DesiredStateUpdater(store::Store& store, sync::SyncHub& hub, std::string signing_secret_key);

  // Where secrets come from, and the clock that says which versions are active. Without a vault
  // (tests of other things) documents carry no secrets. Set before the first reconcile.
  void set_secrets(const SecretVault* vault, const Clock* clock) {
    vault_ = vault;
    clock_ = clock;
  }

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

  // Reconciles every device when a staged secret version became active since the last pass
  // (so documents stop carrying the superseded one). Cheap otherwise: call it periodically.
  [[nodiscard]] Result<bool> reconcile_if_secret_switched(int64_t now_ms);

  // Replicas (server/cluster): `news` is told the ids of devices whose desired state this
  // updater changed, after each stored group, so other replicas wake their long-polls. Set
  // before the first reconcile.
  void set_news(std::function<void(const std::vector<std::string>&)> news) {
    news_ = std::move(news);
  }
  // Another replica changed these devices: their documents are read from the store, signed and
  // published to parked long-polls (an older or equal generation changes nothing).
  [[nodiscard]] Status refresh_from_store(const std::vector<std::string>& device_ids);

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
  std::function<void(const std::vector<std::string>&)> news_;
  const SecretVault* vault_ = nullptr;
  const Clock* clock_ = nullptr;
  // The earliest activate_at of a staged secret version seen by the last pass that loaded the
  // secrets (0 = none).
  std::atomic<int64_t> next_secret_switch_ms_{0};
  std::mutex mu_;
};

}  // namespace outpost::server
