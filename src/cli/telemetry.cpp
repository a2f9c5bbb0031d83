// `outpost telemetry query`: the fleet's telemetry as series, aggregates and a compact
// time series per series.
#include <cmath>
#include <cstdio>
#include <iostream>

#include "cli/cli.h"
#include "common/clock.h"
#include "common/telemetry_metrics.h"

namespace outpost::cli {
namespace {

std::string metric_list() {
  std::string out = "Metrics:\n";
  for (const auto& m : telemetry::kMetrics) {
    std::string name(m.name);
    name.resize(std::max<size_t>(name.size(), 27), ' ');
    out += "  " + name + " " + std::string(telemetry::metric_kind_name(m.kind)) + ": " +
           std::string(m.help) + "\n";
  }
  return out;
}

std::string num(const nlohmann::json& v) {
  if (!v.is_number()) return "-";
  const double d = v.get<double>();
  char buf[32];
  if (d != 0 && (std::fabs(d) < 0.01 || std::fabs(d) >= 1e7)) {
    std::snprintf(buf, sizeof buf, "%.3g", d);
  } else if (d == std::floor(d)) {
    std::snprintf(buf, sizeof buf, "%.0f", d);
  } else {
    std::snprintf(buf, sizeof buf, "%.3f", d);
  }
  return buf;
}

// Eight levels of block characters scaled to the series' own range; gaps are spaces.
std::string sparkline(const nlohmann::json& points, int64_t since, int64_t step, int64_t until) {
  static const char* kLevels[] = {"▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
  const int64_t steps = step > 0 ? (until - since + step - 1) / step : 0;
  if (steps <= 0 || steps > 120) return "";
  std::vector<std::optional<double>> values(static_cast<size_t>(steps));
  double lo = INFINITY, hi = -INFINITY;
  for (const auto& p : points) {
    if (!p.is_array() || p.size() != 2 || !p[1].is_number()) continue;
    const int64_t i = (p[0].get<int64_t>() - since) / step;
    if (i < 0 || i >= steps) continue;
    const double v = p[1].get<double>();
    values[static_cast<size_t>(i)] = v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  std::string out;
  for (const auto& v : values) {
    if (!v) {
      out += " ";
      continue;
    }
    const int level = hi > lo ? static_cast<int>((*v - lo) / (hi - lo) * 7.0 + 0.5) : 3;
    out += kLevels[std::clamp(level, 0, 7)];
  }
  return out;
}

// The aggregate's columns for a metric kind.
std::vector<std::string> aggregate_headers(const std::string& kind) {
  if (kind == "counter") return {"SUM", "RATE/S"};
  if (kind == "histogram") return {"COUNT", "MEAN", "P50", "P95", "P99"};
  return {"AVG", "MIN", "MAX", "LAST"};
}

std::vector<std::string> aggregate_cells(const std::string& kind, const nlohmann::json& a) {
  if (kind == "counter") return {num(a["sum"]), num(a["rate"])};
  if (kind == "histogram") {
    return {num(a["count"]), num(a["mean"]), num(a["p50"]), num(a["p95"]), num(a["p99"])};
  }
  return {num(a["avg"]), num(a["min"]), num(a["max"]), num(a["last"])};
}

}  // namespace

void add_telemetry_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* telemetry = app.add_subcommand("telemetry", "Fleet telemetry: metrics, events, samples");
  telemetry->require_subcommand(1);

  struct QueryArgs {
    std::string metric, device, site, deployment, since = "1h", until = "now", step, by;
  };
  auto args = std::make_shared<QueryArgs>();
  auto* query = telemetry->add_subcommand(
      "query",
      "Time series and aggregates of one metric across the fleet: counters sum (and rate), "
      "gauges average (min, max, last), histograms merge their buckets (p50, p95, p99)");
  query->add_option("METRIC", args->metric, "Metric name (listed below)")->required();
  query->add_option("--device", args->device, "Only this device");
  query->add_option("--site", args->site, "Only devices of this site");
  query->add_option("--deployment", args->deployment, "Only this deployment");
  query->add_option("--since", args->since, "Start: a duration back from now (1h, 7d)")
      ->capture_default_str();
  query->add_option("--until", args->until, "End: a duration back from now, or now")
      ->capture_default_str();
  query->add_option("--step", args->step,
                    "Width of a time-series step (default: about 60 steps over the range)");
  query->add_option("--by", args->by,
                    "One series per: device, site, deployment, revision, model, version, role "
                    "or detail (event kind, sample outcome)");
  query->footer(metric_list() +
                "\nExamples:\n"
                "  outpost telemetry query inference_latency_seconds --deployment defect-detector "
                "--by version\n"
                "  outpost telemetry query inference_requests --since 24h --step 1h --by site\n"
                "  outpost telemetry query events --device d-1a2b3c --by detail\n"
                "Older than the raw retention (--telemetry-retention, 7d) answers come from "
                "hourly rollups.");
  query->callback([&options, &exit_code, args] {
    Session session(options);
    std::string path = "/api/v1/telemetry/query?metric=" + url_encode(args->metric) +
                       "&since=" + url_encode(args->since) + "&until=" + url_encode(args->until);
    for (auto [name, value] : {std::pair{"device", &args->device}, std::pair{"site", &args->site},
                               std::pair{"deployment", &args->deployment},
                               std::pair{"step", &args->step}, std::pair{"by", &args->by}}) {
      if (!value->empty()) path += std::string("&") + name + "=" + url_encode(*value);
    }
    auto result = session.fetch(path, exit_code);
    if (!result) return;
    const auto& r = *result;
    const std::string kind = r.value("kind", "gauge");
    const std::string by = r.value("by", "");
    const int64_t since = r.value("since", int64_t{0});
    const int64_t until = r.value("until", int64_t{0});
    const int64_t step = r.value("step", int64_t{0});
    std::cout << r.value("metric", "") << " (" << kind << ") from " << format_iso8601(since)
              << " to " << format_iso8601(until) << ", step " << step / 1000 << "s"
              << (r.value("from_rollups", false) ? ", partly from hourly rollups" : "") << "\n";
    std::vector<std::string> headers = {by.empty() ? "SERIES" : [&] {
      std::string h = by;
      for (char& c : h) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      return h;
    }()};
    for (auto& h : aggregate_headers(kind)) headers.push_back(h);
    headers.push_back("DEVICES");
    headers.push_back(kind == "counter"     ? "PER STEP"
                      : kind == "histogram" ? "P95 PER STEP"
                                            : "AVG PER STEP");
    Table table(headers);
    for (const auto& s : r["series"]) {
      std::vector<std::string> row = {by.empty() ? "all" : s.value(by, "")};
      if (row[0].empty()) row[0] = "(none)";
      for (auto& c : aggregate_cells(kind, s["aggregate"])) row.push_back(c);
      row.push_back(std::to_string(s.value("devices", 0)));
      row.push_back(sparkline(s["points"], since, step, until));
      table.add(row);
    }
    if (r["series"].size() > 1) {
      std::vector<std::string> row = {"TOTAL"};
      for (auto& c : aggregate_cells(kind, r["aggregate"])) row.push_back(c);
      row.push_back(std::to_string(r.value("devices", 0)));
      row.push_back("");
      table.add(row);
    }
    std::cout << table.render();
    if (table.empty()) std::cerr << "no points in this range\n";
    exit_code = kExitOk;
  });
}

}  // namespace outpost::cli
