#include "store/internal/telemetry_query.h"

#include <set>
#include <string>

namespace outpost::store::internal {

Result<const telemetry::MetricInfo*> check_telemetry_query(const TelemetryQuery& q) {
  const telemetry::MetricInfo* metric = telemetry::find_metric(q.metric);
  if (metric == nullptr) {
    return make_error(Errc::kInvalidArgument,
                      "metric: unknown metric \"" + q.metric +
                          "\"; expected one of: " + telemetry::known_metric_names(),
                      "metric");
  }
  static const std::set<std::string, std::less<>> kGroupings = {
      "", "device", "site", "deployment", "revision", "model", "version", "role", "detail"};
  if (!kGroupings.contains(q.by)) {
    return make_error(Errc::kInvalidArgument,
                      "by: cannot group by \"" + q.by +
                          "\"; expected device, site, deployment, revision, model, version, "
                          "role or detail",
                      "by");
  }
  if (q.until_ms <= q.since_ms) {
    return make_error(Errc::kInvalidArgument, "until: must be after since", "until");
  }
  if (q.step_ms <= 0) {
    return make_error(Errc::kInvalidArgument, "step: must be more than 0", "step");
  }
  const int64_t steps = (q.until_ms - q.since_ms + q.step_ms - 1) / q.step_ms;
  if (steps > kMaxTelemetryBuckets) {
    return make_error(Errc::kInvalidArgument,
                      "step: " + std::to_string(steps) + " steps in the range, at most " +
                          std::to_string(kMaxTelemetryBuckets) + "; use a larger step",
                      "step");
  }
  return metric;
}

}  // namespace outpost::store::internal
