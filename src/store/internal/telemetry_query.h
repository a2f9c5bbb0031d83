// The checks of a telemetry query both store backends make before reading anything. Internal
// to the store module.
#pragma once

#include "common/error.h"
#include "common/telemetry_metrics.h"
#include "store/store.h"

namespace outpost::store::internal {

// The query's metric, or kInvalidArgument naming the field: an unknown metric (the message
// lists the known ones), a bad `by`, an empty range, a step of 0 or too many steps.
[[nodiscard]] Result<const telemetry::MetricInfo*> check_telemetry_query(const TelemetryQuery& q);

}  // namespace outpost::store::internal
