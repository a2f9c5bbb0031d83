// The rollouts controller: moves a deployment from its stable revision to a new one wave by
// wave, watching the devices' reports and telemetry, and rolls it back (or pauses) when a gate
// breaks. All of its state is in the store (rollouts, revision assignments), so a restarted
// server continues where it was.
//
// How a rollout moves (DESIGN §4 "Rollout"):
// - Devices targeted by the new revision are ordered once (plan.h) and cut into cumulative
//   waves. A device joins when its wave is current, its site's maintenance window is open and
//   fewer than max_unavailable devices are updating; it then gets a revision assignment and a
//   new desired state. Cordoned devices are skipped and keep what they run.
// - Per device: pending, held (window closed; or cordoned), updating, healthy (reports the new
//   revision running), failed (the agent rolled it back or cannot run it), deferred (assigned,
//   not heard from within offline_grace: it gets the revision when it returns), unschedulable.
// - A wave is settled when every device in it is healthy, deferred, skipped or unschedulable;
//   it then bakes for `bake`, the gates are read once more, and the next wave starts.
// - Gates: failed devices (max_failed_devices, default 0), max_restarts (from device reports),
//   and from telemetry since the rollout (or its resume) began, the new revision against the
//   devices on other revisions: error rate, p95 latency, fallback rate (each breaks when over
//   its limit and worse than the old revision's value), mean confidence shift. Rate gates wait
//   for min_requests requests.
// - A breach: on_failure rollback returns every device it touched to the revision it had,
//   marks the revision bad (an apply of the same spec is refused without force) and resets the
//   deployment to the revision before; pause stops where it is, with the reason.
//
// Thread-safety: every public method may be called from any thread; they are serialized.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/error.h"
#include "store/store.h"

namespace outpost::server {
class DesiredStateUpdater;
}

namespace outpost::rollouts {

struct ControllerOptions {
  int64_t gate_interval_ms = 5'000;                // telemetry gates are read this often at most
  int64_t default_offline_grace_ms = 10 * 60'000;  // spec.rollout.offline_grace when absent
  int64_t online_window_ms = 3 * 60'000;           // a device not heard from this long is offline
};

class RolloutController {
 public:
  RolloutController(store::Store& store, server::DesiredStateUpdater& desired, const Clock& clock,
                    ControllerOptions options = {});

  // After an apply stored a new revision of `deployment` (previous_revision is the one it had):
  // starts a rollout from the stable revision to the new one, superseding an active rollout,
  // and takes its first step. A first revision (nothing to roll from) reconciles every device
  // at once. Returns the rollout's id, 0 when none was needed. kind: "apply" or "undo".
  // With first_step false the first wave waits for the next tick().
  [[nodiscard]] Result<int64_t> start(const std::string& deployment, int64_t previous_revision,
                                      const std::string& actor, const std::string& kind = "apply",
                                      bool first_step = true);
  // One step of every running rollout. Call it periodically (every second or so).
  [[nodiscard]] Status tick();

  // The newest rollout of the deployment, as `outpost rollout status` shows it.
  [[nodiscard]] Result<nlohmann::json> status(const std::string& deployment);
  // Operator control; each returns the status after it. Errors: kNotFound (no rollout),
  // kFailedPrecondition (e.g. resume of one that is not paused).
  [[nodiscard]] Result<nlohmann::json> pause(const std::string& deployment,
                                             const std::string& actor);
  [[nodiscard]] Result<nlohmann::json> resume(const std::string& deployment,
                                              const std::string& actor);
  [[nodiscard]] Result<nlohmann::json> abort(const std::string& deployment,
                                             const std::string& actor);
  // Applies the revision the newest rollout started from again, as a new revision, and rolls
  // it out like any other.
  [[nodiscard]] Result<nlohmann::json> undo(const std::string& deployment,
                                            const std::string& actor);

 private:
  [[nodiscard]] Status step_locked(store::Rollout& rollout, bool* advanced_to_end);
  [[nodiscard]] Result<nlohmann::json> status_locked(const std::string& deployment);
  [[nodiscard]] Result<store::Rollout> newest_locked(const std::string& deployment);
  [[nodiscard]] Result<int64_t> start_locked(const std::string& deployment,
                                             int64_t previous_revision, const std::string& actor,
                                             const std::string& kind, bool first_step = true);
  void audit(const std::string& actor, const std::string& action, const std::string& deployment,
             const nlohmann::json& details);

  store::Store& store_;
  server::DesiredStateUpdater& desired_;
  const Clock& clock_;
  ControllerOptions options_;
  std::mutex mu_;
};

}  // namespace outpost::rollouts
