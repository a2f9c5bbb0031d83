// Telemetry: devices upload zstd batches (POST /api/v1/device/telemetry), operators query
// them (GET /api/v1/telemetry/query), Prometheus scrapes the fleet's running totals (/metrics).
#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "common/prometheus_text.h"
#include "common/telemetry_batch.h"
#include "common/telemetry_metrics.h"
#include "common/units.h"
#include "server/api/api.h"

namespace outpost::server::api {
namespace {

// A JSON number, or null for NaN/infinity (JSON has neither).
nlohmann::json finite(double value) {
  return std::isfinite(value) ? nlohmann::json(value) : nlohmann::json();
}

// At most this many batches in one transaction: bounds how long the store's lock is held.
constexpr size_t kMaxIngestGroup = 256;

// Checks and decodes an upload and queues it for the store (the telemetry writer); answers
// through `respond` once it is stored, or at once when it is refused. Blocking: runs on a
// worker.
void post_telemetry(ApiContext& ctx, const http::Request& req, http::Responder respond) {
  auto refuse = [&](const Error& error, int status = 0) {
    http::Response resp = http::Response::error(error);
    if (status != 0) resp.status = status;
    respond(std::move(resp));
  };
  auto caller = authenticate_device(ctx, req);
  if (!caller) return refuse(caller.error());
  TelemetryIngestCounters& counters = *ctx.telemetry;
  counters.bytes += req.body.size();
  std::string encoding = req.header("content-encoding");
  if (encoding != "zstd") {
    ++counters.refused_encoding;
    return refuse(
        Error{Errc::kInvalidArgument,
              "Content-Encoding: expected zstd (one zstd frame of the batch JSON), got \"" +
                  encoding + "\"",
              "Content-Encoding"},
        415);
  }
  auto batch = telemetry::decode_batch(req.body);
  if (!batch) {
    if (batch.error().code == Errc::kPayloadTooLarge) {
      ++counters.refused_too_large;
    } else {
      ++counters.refused_invalid;
    }
    spdlog::debug("telemetry batch from {} refused: {}", caller->device_id, batch.error().message);
    return refuse(batch.error().with_context("telemetry batch"));
  }
  // The site from the sessions' memory: a store read here would wait for the writer.
  std::string site = ctx.sessions.site(caller->device_id);
  if (site.empty()) {
    auto device = ctx.store.get_device(caller->device_id);
    if (!device) return refuse(device.error());
    if (!*device) return refuse(Error{Errc::kNotFound, "device " + caller->device_id + " is gone"});
    site = (*device)->site;
  }
  ctx.sessions.seen(caller->device_id, ctx.clock.now_ms());
  TelemetryUpload upload{caller->device_id, site, std::move(*batch)};
  auto done = [&counters,
               respond = std::move(respond)](Result<store::TelemetryIngestOutcome> outcome) {
    if (!outcome) {
      ++counters.refused_store;
      respond(http::Response::error(outcome.error()));
      return;
    }
    ++counters.batches;
    counters.records += static_cast<uint64_t>(outcome->stored);
    counters.duplicates += static_cast<uint64_t>(outcome->duplicates);
    counters.points += static_cast<uint64_t>(outcome->points);
    respond(json_response(200, {{"acked", outcome->acked},
                                {"stored", outcome->stored},
                                {"duplicates", outcome->duplicates}}));
  };
  ctx.telemetry_queue->submit(ctx.workers, std::move(upload), std::move(done));
}

// The per-kind numbers of a merged set of points.
nlohmann::json stats_json(const store::TelemetryStats& s, telemetry::MetricKind kind,
                          int64_t range_ms) {
  nlohmann::json out = {{"points", s.points}};
  switch (kind) {
    case telemetry::MetricKind::kCounter:
      out["sum"] = finite(s.sum);
      out["rate"] = finite(range_ms > 0 ? s.sum * 1000.0 / static_cast<double>(range_ms) : 0.0);
      break;
    case telemetry::MetricKind::kGauge:
      out["avg"] = finite(s.mean());
      out["min"] = finite(s.min);
      out["max"] = finite(s.max);
      out["last"] = finite(s.last);
      break;
    case telemetry::MetricKind::kHistogram:
      out["count"] = s.count;
      out["mean"] = finite(s.mean());
      out["p50"] = finite(s.quantile(0.5));
      out["p95"] = finite(s.quantile(0.95));
      out["p99"] = finite(s.quantile(0.99));
      break;
  }
  return out;
}

// The one number a time-series step shows: counters their sum, gauges their mean,
// histograms their p95.
double step_value(const store::TelemetryStats& s, telemetry::MetricKind kind) {
  switch (kind) {
    case telemetry::MetricKind::kCounter:
      return s.sum;
    case telemetry::MetricKind::kGauge:
      return s.mean();
    case telemetry::MetricKind::kHistogram:
      return s.quantile(0.95);
  }
  return 0;
}

// A time: a duration back from now ("1h"), "now", or Unix milliseconds.
Result<int64_t> parse_time(const std::string& text, int64_t now, const char* field) {
  if (text == "now") return now;
  if (!text.empty() &&
      std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
      text.size() >= 10) {
    return std::stoll(text);
  }
  auto ago = parse_duration_ms(text);
  if (!ago) {
    return make_error(Errc::kInvalidArgument,
                      std::string(field) +
                          ": expected a duration back from now (1h, 30m, 7d), \"now\" or Unix "
                          "milliseconds, got \"" +
                          text + "\"",
                      field);
  }
  return now - *ago;
}

// A scoped user must name a site or a device inside the scope (a query over more is refused,
// not quietly narrowed: its aggregates would not mean what the user asked for).
Status require_query_in_scope(ApiContext& ctx, const Caller& caller,
                              const store::TelemetryQuery& q) {
  if (caller.scope.unrestricted()) return ok();
  if (!q.site && !q.device) {
    return make_error(Errc::kPermissionDenied,
                      "user " + caller.user + " is scoped to sites " + caller.scope.describe() +
                          "; a telemetry query across sites is fleet-wide: name a site (--site) "
                          "or a device (--device) inside the scope");
  }
  if (q.site) {
    OUTPOST_TRY(require_site_in_scope(caller, *q.site, "site " + *q.site + " is outside it"));
  }
  if (q.device) {
    auto device = device_in_scope(ctx, caller, *q.device);
    if (!device) return make_error(device.error());
  }
  return ok();
}

Result<http::Response> query_telemetry(ApiContext& ctx, const http::Request& req,
                                       const Caller& caller) {
  const int64_t now = ctx.clock.now_ms();
  store::TelemetryQuery q;
  auto metric = req.query_param("metric");
  if (!metric || metric->empty()) {
    return make_error(Errc::kInvalidArgument,
                      "metric: required; one of: " + telemetry::known_metric_names(), "metric");
  }
  q.metric = *metric;
  for (auto [name, slot] : {std::pair{"device", &q.device}, std::pair{"site", &q.site},
                            std::pair{"deployment", &q.deployment}}) {
    if (auto value = req.query_param(name); value && !value->empty()) *slot = *value;
  }
  OUTPOST_TRY(require_query_in_scope(ctx, caller, q));
  auto since = parse_time(req.query_param("since").value_or("1h"), now, "since");
  if (!since) return make_error(since.error());
  auto until = parse_time(req.query_param("until").value_or("now"), now, "until");
  if (!until) return make_error(until.error());
  q.since_ms = *since;
  q.until_ms = *until;
  if (auto step = req.query_param("step"); step && !step->empty()) {
    auto ms = parse_duration_ms(*step);
    if (!ms || *ms <= 0) {
      return make_error(Errc::kInvalidArgument,
                        "step: expected a duration like 5m or 1h, got \"" + *step + "\"", "step");
    }
    q.step_ms = *ms;
  } else {
    // About 60 steps over the range, in whole minutes.
    q.step_ms = std::max<int64_t>(60'000, (q.until_ms - q.since_ms) / 60 / 60'000 * 60'000);
  }
  q.by = req.query_param("by").value_or("");
  auto result = ctx.store.query_telemetry(q);
  if (!result) return make_error(result.error());

  const int64_t range = q.until_ms - q.since_ms;
  nlohmann::json series = nlohmann::json::array();
  for (const auto& s : result->series) {
    nlohmann::json points = nlohmann::json::array();
    for (size_t i = 0; i < s.steps.size(); ++i) {
      const auto& cell = s.steps[i];
      if (cell.points == 0) continue;
      points.push_back({q.since_ms + static_cast<int64_t>(i) * q.step_ms,
                        finite(step_value(cell, result->kind))});
    }
    nlohmann::json entry = {{"aggregate", stats_json(s.total, result->kind, range)},
                            {"devices", s.devices.size()},
                            {"points", points}};
    if (!q.by.empty()) entry[q.by] = s.group;
    series.push_back(std::move(entry));
  }
  nlohmann::json out = {{"metric", q.metric},
                        {"kind", telemetry::metric_kind_name(result->kind)},
                        {"since", q.since_ms},
                        {"until", q.until_ms},
                        {"step", q.step_ms},
                        {"by", q.by},
                        {"from_rollups", result->from_rollups},
                        {"devices", result->devices},
                        {"aggregate", stats_json(result->total, result->kind, range)},
                        {"series", series}};
  return json_response(200, out);
}

void header(std::string& out, const char* name, const char* type, const char* help) {
  out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void histogram_lines(std::string& out, const std::string& name, const std::string& labels,
                     const store::TelemetryStats& h) {
  prometheus::append_histogram(out, name, labels, {h.buckets.begin(), h.buckets.end()}, h.hist_sum,
                               h.count);
}

}  // namespace

Result<std::string> fleet_metrics_text(ApiContext& ctx) {
  std::string out;
  const TelemetryIngestCounters& c = *ctx.telemetry;
  const ArtifactCounters& a = *ctx.artifact_counters;
  header(out, "outpost_artifact_downloads_total", "counter",
         "Artifact downloads answered (GET and HEAD, whole or ranged).");
  out += "outpost_artifact_downloads_total " + std::to_string(a.downloads.load()) + "\n";
  header(out, "outpost_artifact_bytes_sent_total", "counter",
         "Artifact body bytes sent to devices, relays and operators.");
  out += "outpost_artifact_bytes_sent_total " + std::to_string(a.bytes_sent.load()) + "\n";
  header(out, "outpost_telemetry_batches_total", "counter", "Telemetry batches stored.");
  out += "outpost_telemetry_batches_total " + std::to_string(c.batches.load()) + "\n";
  header(out, "outpost_telemetry_records_total", "counter",
         "Telemetry records stored (duplicates not counted).");
  out += "outpost_telemetry_records_total " + std::to_string(c.records.load()) + "\n";
  header(out, "outpost_telemetry_duplicate_records_total", "counter",
         "Telemetry records received again and skipped (exactly-once).");
  out += "outpost_telemetry_duplicate_records_total " + std::to_string(c.duplicates.load()) + "\n";
  header(out, "outpost_telemetry_points_total", "counter", "Telemetry points stored.");
  out += "outpost_telemetry_points_total " + std::to_string(c.points.load()) + "\n";
  header(out, "outpost_telemetry_received_bytes_total", "counter",
         "Compressed telemetry bytes received.");
  out += "outpost_telemetry_received_bytes_total " + std::to_string(c.bytes.load()) + "\n";
  header(out, "outpost_telemetry_refused_batches_total", "counter",
         "Telemetry batches refused, by reason.");
  out += "outpost_telemetry_refused_batches_total{reason=\"encoding\"} " +
         std::to_string(c.refused_encoding.load()) + "\n";
  out += "outpost_telemetry_refused_batches_total{reason=\"too_large\"} " +
         std::to_string(c.refused_too_large.load()) + "\n";
  out += "outpost_telemetry_refused_batches_total{reason=\"invalid\"} " +
         std::to_string(c.refused_invalid.load()) + "\n";
  out += "outpost_telemetry_refused_batches_total{reason=\"store\"} " +
         std::to_string(c.refused_store.load()) + "\n";

  // Devices online/offline by site, and per deployment by the phase the device reports.
  auto devices = ctx.store.list_devices({});
  if (!devices) return make_error(devices.error());
  const int64_t now = ctx.clock.now_ms();
  std::map<std::string, std::pair<int64_t, int64_t>> by_site;     // online, offline
  std::map<std::pair<std::string, std::string>, int64_t> phases;  // (deployment, phase)
  for (const auto& d : *devices) {
    auto& counts = by_site[d.site];
    (device_online(d.last_seen, now) ? counts.first : counts.second) += 1;
    nlohmann::json status = parse_object_or_empty(d.status_json);
    if (!status.contains("deployments") || !status["deployments"].is_array()) continue;
    for (const auto& dep : status["deployments"]) {
      if (!dep.is_object()) continue;
      phases[{dep.value("name", ""), dep.value("phase", "unknown")}] += 1;
    }
  }
  header(out, "outpost_devices", "gauge",
         "Enrolled devices by site and state (online: seen in the last 3 minutes).");
  for (const auto& [site, counts] : by_site) {
    out += "outpost_devices{site=\"" + prometheus::label_value(site) + "\",state=\"online\"} " +
           std::to_string(counts.first) + "\n";
    out += "outpost_devices{site=\"" + prometheus::label_value(site) + "\",state=\"offline\"} " +
           std::to_string(counts.second) + "\n";
  }
  header(out, "outpost_deployment_devices", "gauge",
         "Devices by deployment and the phase they last reported (rollout progress).");
  for (const auto& [key, count] : phases) {
    out += "outpost_deployment_devices{deployment=\"" + prometheus::label_value(key.first) +
           "\",phase=\"" + prometheus::label_value(key.second) + "\"} " + std::to_string(count) +
           "\n";
  }

  auto totals = ctx.store.list_telemetry_totals();
  if (!totals) return make_error(totals.error());
  auto labels_of = [](const store::TelemetryTotal& t) {
    return "deployment=\"" + prometheus::label_value(t.deployment) + "\",model=\"" +
           prometheus::label_value(t.model) + "\",version=\"" + prometheus::label_value(t.version) +
           "\",role=\"" + prometheus::label_value(t.role) + "\"";
  };
  struct Counter {
    const char* name;
    const char* help;
    uint64_t store::TelemetryTotal::*field;
  };
  const Counter counters[] = {
      {"outpost_inference_requests_total",
       "Inferences served across the fleet, each counted once (by the version and role that "
       "served it).",
       &store::TelemetryTotal::served},
      {"outpost_inference_errors_total", "Inferences that failed across the fleet.",
       &store::TelemetryTotal::errors},
      {"outpost_inference_invalid_total", "Inference requests refused as invalid.",
       &store::TelemetryTotal::invalid},
      {"outpost_inference_fallbacks_total", "Inferences the fallback model took over.",
       &store::TelemetryTotal::fallbacks},
  };
  for (const Counter& counter : counters) {
    header(out, counter.name, "counter", counter.help);
    for (const auto& t : *totals) {
      out += std::string(counter.name) + "{" + labels_of(t) + "} " +
             std::to_string(t.*(counter.field)) + "\n";
    }
  }
  header(out, "outpost_inference_latency_seconds", "histogram",
         "Inference latency across the fleet (merged device histograms).");
  for (const auto& t : *totals) {
    histogram_lines(out, "outpost_inference_latency_seconds", labels_of(t), t.latency);
  }

  auto states = ctx.store.list_telemetry_devices();
  if (!states) return make_error(states.error());
  telemetry::DropCounts dropped;
  for (const auto& s : *states) {
    dropped.samples += s.dropped.samples;
    dropped.health += s.dropped.health;
    dropped.aggregates += s.dropped.aggregates;
    dropped.events += s.dropped.events;
  }
  header(out, "outpost_telemetry_dropped_total", "counter",
         "Telemetry records devices dropped to keep their buffer bound, as last reported.");
  out += "outpost_telemetry_dropped_total{class=\"samples\"} " + std::to_string(dropped.samples) +
         "\n";
  out +=
      "outpost_telemetry_dropped_total{class=\"health\"} " + std::to_string(dropped.health) + "\n";
  out += "outpost_telemetry_dropped_total{class=\"aggregates\"} " +
         std::to_string(dropped.aggregates) + "\n";
  out +=
      "outpost_telemetry_dropped_total{class=\"events\"} " + std::to_string(dropped.events) + "\n";
  return out;
}

Result<nlohmann::json> deployment_fleet_summary(ApiContext& ctx, const std::string& deployment,
                                                int64_t window_ms) {
  const int64_t now = ctx.clock.now_ms();
  auto ask = [&](const char* metric) {
    store::TelemetryQuery q;
    q.metric = metric;
    q.deployment = deployment;
    q.since_ms = now - window_ms;
    q.until_ms = now;
    q.step_ms = window_ms;
    return ctx.store.query_telemetry(q);
  };
  auto requests = ask("inference_requests");
  if (!requests) return make_error(requests.error());
  auto errors = ask("inference_errors");
  if (!errors) return make_error(errors.error());
  auto fallbacks = ask("inference_fallbacks");
  if (!fallbacks) return make_error(fallbacks.error());
  auto latency = ask("inference_latency_seconds");
  if (!latency) return make_error(latency.error());
  const double served = requests->total.sum;
  const double failed = errors->total.sum;
  return nlohmann::json{{"window_ms", window_ms},
                        {"requests", served},
                        {"errors", failed},
                        // served counts every request of the deployment once (errors included).
                        {"error_rate", served > 0 ? failed / served : 0.0},
                        {"fallbacks", fallbacks->total.sum},
                        {"p95_latency_seconds", finite(latency->total.quantile(0.95))},
                        {"devices_reporting", requests->devices}};
}

std::unique_ptr<TelemetryWriter> make_telemetry_writer(store::Store& store, const Clock& clock) {
  return std::make_unique<TelemetryWriter>(
      "storing telemetry", kMaxIngestGroup, [&store, &clock](std::vector<TelemetryUpload>& group) {
        std::vector<store::TelemetryIngest> batches;
        batches.reserve(group.size());
        for (const TelemetryUpload& u : group) batches.push_back({u.device_id, u.site, &u.batch});
        // Answered only after this commit: a crash before it makes the agent send again, and
        // the watermark turns the resent records into duplicates.
        return store.ingest_telemetry_batches(batches, clock.now_ms());
      });
}

bool device_online(int64_t last_seen, int64_t now_ms) {
  return last_seen > 0 && now_ms - last_seen <= kOnlineWindowMs;
}

void register_telemetry_routes(http::Router& router, ApiContext& ctx) {
  http::RouteOptions upload;
  upload.body_limit = telemetry::kMaxCompressedBatch;
  add_deferred_route(router, ctx, "POST", "/api/v1/device/telemetry", "telemetry upload",
                     post_telemetry, upload);
  add_operator_route(router, ctx, "GET", "/api/v1/telemetry/query", Role::kViewer, query_telemetry);
}

}  // namespace outpost::server::api
