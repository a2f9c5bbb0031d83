// The metric names the control plane stores telemetry under and answers queries for, with
// their kind (which decides how points merge: counters add, gauges average, histograms merge
// buckets). Shared by the store (ingest, query), the API (errors) and the CLI (--help).
#pragma once

#include <array>
#include <string>
#include <string_view>

namespace outpost::telemetry {

enum class MetricKind { kCounter, kGauge, kHistogram };

struct MetricInfo {
  std::string_view name;
  MetricKind kind;
  std::string_view help;
};

// Ordered as `outpost telemetry query --help` lists them.
inline constexpr std::array kMetrics = {
    MetricInfo{"inference_requests", MetricKind::kCounter,
               "requests answered (a deployment's requests, each counted once by the version and "
               "role that served it)"},
    MetricInfo{"inference_errors", MetricKind::kCounter, "requests that failed"},
    MetricInfo{"inference_invalid", MetricKind::kCounter, "requests refused as invalid input"},
    MetricInfo{"inference_fallbacks", MetricKind::kCounter,
               "requests the fallback model took over"},
    MetricInfo{"inference_latency_seconds", MetricKind::kHistogram, "latency of inferences"},
    MetricInfo{"inference_confidence", MetricKind::kHistogram, "confidence of answers (0..1)"},
    MetricInfo{"events", MetricKind::kCounter,
               "workload events (start, crash, restart, rollback...); --by detail splits by kind"},
    MetricInfo{"sample_latency_seconds", MetricKind::kGauge,
               "latency of sampled single inferences; detail = outcome"},
    MetricInfo{"cpu_percent", MetricKind::kGauge, "CPU use of all cores, 0..100"},
    MetricInfo{"memory_used_bytes", MetricKind::kGauge, "memory in use"},
    MetricInfo{"memory_total_bytes", MetricKind::kGauge, "memory installed"},
    MetricInfo{"disk_free_bytes", MetricKind::kGauge, "free space on the agent's data disk"},
    MetricInfo{"disk_total_bytes", MetricKind::kGauge, "size of the agent's data disk"},
    MetricInfo{"temperature_celsius", MetricKind::kGauge, "temperature, where readable"},
    MetricInfo{"uptime_seconds", MetricKind::kGauge, "machine uptime"},
    MetricInfo{"sync_lag_seconds", MetricKind::kGauge,
               "time since the agent last heard from the control plane"},
    MetricInfo{"agent_rss_bytes", MetricKind::kGauge, "resident memory of the agent"},
    MetricInfo{"telemetry_buffer_bytes", MetricKind::kGauge, "telemetry buffer in use on device"},
};

inline const MetricInfo* find_metric(std::string_view name) {
  for (const MetricInfo& m : kMetrics) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

inline std::string_view metric_kind_name(MetricKind kind) {
  switch (kind) {
    case MetricKind::kCounter:
      return "counter";
    case MetricKind::kGauge:
      return "gauge";
    case MetricKind::kHistogram:
      return "histogram";
  }
  return "gauge";
}

// "inference_requests, inference_errors, ..." for error messages.
inline std::string known_metric_names() {
  std::string out;
  for (const MetricInfo& m : kMetrics) {
    if (!out.empty()) out += ", ";
    out += m.name;
  }
  return out;
}

}  // namespace outpost::telemetry
