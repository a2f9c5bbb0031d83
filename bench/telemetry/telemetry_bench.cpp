// outpost-telemetry-bench: the two load generators behind bench/telemetry/run.sh.
//
//   load    paced inference requests against an agent's infer route (the device-side traffic
//           whose telemetry the wire figure measures);
//   ingest  enrolls a fleet of stand-in devices and uploads their telemetry backlogs as the
//           agent would (zstd batches, contiguous seqs) from a few keep-alive connections,
//           then reports records/s and points/s as the server counted them in /metrics.
//
// Every failure is counted and reported; a run with failures exits 1. See bench/README.md.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/crypto.h"
#include "common/http_client.h"
#include "common/request_signature.h"
#include "common/telemetry_batch.h"

namespace outpost::bench {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace telemetry = outpost::telemetry;

double seconds_since(Clock::time_point from) {
  return std::chrono::duration<double>(Clock::now() - from).count();
}

// Sum of every sample of a metric family in Prometheus text (labels ignored); nullopt when the
// server does not expose it.
std::optional<double> metric_sum(HttpClient& client, const std::string& name) {
  auto res = client.request("GET", "/metrics");
  if (!res || res->status != 200) return std::nullopt;
  std::optional<double> sum;
  size_t pos = 0;
  const std::string& text = res->body;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    if (line.empty() || line[0] == '#' || line.substr(0, name.size()) != name) continue;
    char next = line.size() > name.size() ? line[name.size()] : '\0';
    if (next != ' ' && next != '{') continue;
    size_t space = line.rfind(' ');
    if (space == std::string_view::npos) continue;
    sum = sum.value_or(0) + std::strtod(std::string(line.substr(space + 1)).c_str(), nullptr);
  }
  return sum;
}

// ---- load -------------------------------------------------------------------------------------

struct LoadOptions {
  std::string url;  // e.g. http://127.0.0.1:7410/models/bench/infer
  double rate = 10;
  double seconds = 60;
  int inputs = 4;
};

int run_load(const LoadOptions& opt) {
  auto slash = opt.url.find('/', opt.url.find("://") + 3);
  if (slash == std::string::npos) {
    std::fprintf(stderr, "error: --url %s has no path\n", opt.url.c_str());
    return 2;
  }
  HttpClient client(opt.url.substr(0, slash), "");
  const std::string path = opt.url.substr(slash);
  std::mt19937 rng(42);
  std::normal_distribution<float> value(0.0f, 1.0f);
  const auto started = Clock::now();
  const auto interval = std::chrono::duration<double>(1.0 / opt.rate);
  uint64_t sent = 0, failed = 0;
  for (auto next = started; seconds_since(started) < opt.seconds;) {
    std::vector<float> row(static_cast<size_t>(opt.inputs));
    for (auto& v : row) v = value(rng);
    json body = {
        {"inputs",
         {{{"name", "input"}, {"datatype", "FP32"}, {"shape", {1, opt.inputs}}, {"data", row}}}}};
    auto r = client.request("POST", path, body.dump());
    ++sent;
    if (!r || r->status != 200) ++failed;
    next += std::chrono::duration_cast<Clock::duration>(interval);
    std::this_thread::sleep_until(next);
  }
  std::printf("{\"sent\":%llu,\"failed\":%llu,\"seconds\":%.1f}\n",
              static_cast<unsigned long long>(sent), static_cast<unsigned long long>(failed),
              seconds_since(started));
  return failed == 0 ? 0 : 1;
}

// ---- ingest -----------------------------------------------------------------------------------

struct IngestOptions {
  std::string server;
  std::string token;
  int devices = 200;
  int minutes = 60;        // backlog per device, in minutes of records
  int batch_minutes = 10;  // minutes of records per batch
  int clients = 2;
  double request_rate = 1.0;  // inference requests/s each device served (sets the samples)
  double sample = 0.1;        // the default policy
  std::string points_metric = "outpost_telemetry_points_total";
  std::string records_metric = "outpost_telemetry_records_total";
};

struct Device {
  std::string id;
  std::string credential;
  std::string secret_key;            // signs each upload, as the agent does
  std::vector<std::string> batches;  // compressed, in seq order
};

telemetry::Histogram latency_histogram(std::mt19937& rng, uint64_t count) {
  static const std::vector<double> bounds = {0.0005, 0.001, 0.0025, 0.005, 0.01,
                                             0.025,  0.05,  0.1,    0.25};
  telemetry::Histogram h;
  std::discrete_distribution<int> pick({2, 10, 30, 30, 15, 8, 3, 1, 0.5, 0.5});
  std::vector<uint64_t> counts(bounds.size() + 1, 0);
  for (uint64_t i = 0; i < count; ++i) counts[static_cast<size_t>(pick(rng))]++;
  for (size_t i = 0; i < counts.size(); ++i) {
    double le = i < bounds.size() ? bounds[i] : INFINITY;
    h.buckets.emplace_back(le, counts[i]);
    h.sum += counts[i] * (i < bounds.size() ? bounds[i] * 0.7 : 0.5);
  }
  h.count = count;
  return h;
}

// One device's backlog: per minute one health record, one inference aggregate (latency and
// confidence histograms, four input features) and the sampled inferences; an event now and then.
std::vector<std::string> device_backlog(const IngestOptions& opt, int device_index,
                                        size_t& records) {
  std::mt19937 rng(static_cast<uint32_t>(1000 + device_index));
  std::uniform_real_distribution<double> unit(0, 1);
  const int64_t start = 1'790'000'000'000 - static_cast<int64_t>(opt.minutes) * 60'000;
  int64_t seq = 0;
  std::vector<std::string> batches;
  std::vector<std::string> texts;
  int64_t first = 1;
  auto flush = [&] {
    if (texts.empty()) return;
    auto frame = telemetry::compress(telemetry::batch_json(first, seq, {}, texts));
    batches.push_back(std::move(*frame));
    records += texts.size();
    texts.clear();
    first = seq + 1;
  };
  const uint64_t per_minute = static_cast<uint64_t>(opt.request_rate * 60);
  for (int m = 0; m < opt.minutes; ++m) {
    const int64_t t = start + static_cast<int64_t>(m) * 60'000;
    telemetry::HealthRecord h;
    h.cpu_percent = 5 + 20 * unit(rng);
    h.mem_used = 900'000'000 + static_cast<int64_t>(unit(rng) * 1e8);
    h.mem_total = 4'000'000'000;
    h.disk_free = 20'000'000'000;
    h.disk_total = 32'000'000'000;
    h.uptime_s = 86400 + m * 60.0;
    h.agent_rss = 48'000'000;
    h.buffer_bytes = 4096;
    h.temp_c = 45 + 5 * unit(rng);
    h.sync_lag_s = 0.2;
    texts.push_back(telemetry::record_to_json({++seq, t, h}).dump());

    telemetry::InferenceRecord a;
    a.deployment = "defect-detector";
    a.revision = 3;
    a.model = "defect-net";
    a.version = "1.4.0";
    a.interval_ms = 60'000;
    a.requests = a.served = per_minute;
    a.errors = unit(rng) < 0.05 ? 1 : 0;
    a.latency = latency_histogram(rng, per_minute);
    a.confidence.count = per_minute;
    a.confidence.sum = 0.9 * static_cast<double>(per_minute);
    a.confidence.buckets = {
        {0.5, per_minute / 20},
        {0.8, per_minute / 10},
        {0.9, per_minute / 4},
        {0.95, per_minute / 4},
        {1.0, per_minute - per_minute / 20 - per_minute / 10 - 2 * (per_minute / 4)}};
    for (int f = 0; f < 4; ++f) {
      a.inputs["input"][std::to_string(f)] =
          telemetry::FeatureStats{per_minute, unit(rng) - 0.5, 60 * unit(rng)};
    }
    texts.push_back(telemetry::record_to_json({++seq, t + 60'000, a}).dump());

    for (uint64_t i = 0; i < per_minute; ++i) {
      if (unit(rng) >= opt.sample) continue;
      telemetry::SampleRecord s;
      s.deployment = a.deployment;
      s.revision = a.revision;
      s.model = a.model;
      s.version = a.version;
      s.latency_s = 0.001 + 0.004 * unit(rng);
      s.confidence = 0.6 + 0.4 * unit(rng);
      texts.push_back(
          telemetry::record_to_json({++seq, t + static_cast<int64_t>(i) * 1000, s}).dump());
    }
    if (unit(rng) < 0.1) {
      telemetry::EventRecord e{"defect-detector", 3, "restart", "exited with status 1"};
      texts.push_back(telemetry::record_to_json({++seq, t + 30'000, e}).dump());
    }
    if ((m + 1) % opt.batch_minutes == 0) flush();
  }
  flush();
  return batches;
}

int run_ingest(const IngestOptions& opt) {
  crypto::init();
  HttpClient admin(opt.server, opt.token);
  json token_body = {{"site", "bench"}, {"uses", opt.devices}, {"ttl", "1h"}};
  auto created = admin.request("POST", "/api/v1/enrollment-tokens", token_body.dump());
  if (!created || created->status != 201) {
    std::fprintf(stderr, "error: creating an enrollment token: %s\n",
                 created ? error_from_response(*created).describe().c_str()
                         : created.error().describe().c_str());
    return 1;
  }
  const std::string enroll_token = json::parse(created->body).value("token", "");

  std::fprintf(stderr, "ingest: enrolling %d devices and building their backlogs...\n",
               opt.devices);
  std::vector<Device> devices(static_cast<size_t>(opt.devices));
  size_t records = 0, batches = 0, compressed_bytes = 0;
  HttpClient enroller(opt.server, "");
  for (int i = 0; i < opt.devices; ++i) {
    const auto key = crypto::ed25519_generate();
    devices[i].secret_key = key.secret_key;
    json body = {{"token", enroll_token},
                 {"public_key", crypto::base64_encode(key.public_key)},
                 {"facts", {{"arch", "x86_64"}, {"cores", 4}, {"accelerator", "cpu"}}}};
    auto r = enroller.request("POST", "/api/v1/device/enroll", body.dump());
    if (!r || r->status != 201) {
      std::fprintf(stderr, "error: enrolling device %d: %s\n", i,
                   r ? error_from_response(*r).describe().c_str() : r.error().describe().c_str());
      return 1;
    }
    auto doc = json::parse(r->body);
    devices[i].id = doc.value("device_id", "");
    devices[i].credential = doc.value("credential", "");
    devices[i].batches = device_backlog(opt, i, records);
    batches += devices[i].batches.size();
    for (const auto& b : devices[i].batches) compressed_bytes += b.size();
  }

  const double points_before = metric_sum(admin, opt.points_metric).value_or(0);
  const double records_before = metric_sum(admin, opt.records_metric).value_or(0);
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> failures{0}, acked_records{0};
  std::mutex err_mu;
  std::string first_error;
  // Work items: each device's batches in order, devices interleaved so that the clients do
  // not all write the same device (as a fleet coming back online would).
  std::vector<std::pair<size_t, size_t>> work;
  size_t max_batches = 0;
  for (const auto& d : devices) max_batches = std::max(max_batches, d.batches.size());
  for (size_t b = 0; b < max_batches; ++b) {
    for (size_t d = 0; d < devices.size(); ++d) {
      if (b < devices[d].batches.size()) work.emplace_back(d, b);
    }
  }
  // A device's batch b+1 is not sent before its batch b was answered (as an agent would not):
  // a client that takes it early waits for its turn.
  std::vector<std::atomic<size_t>> answered(devices.size());
  const auto started = Clock::now();
  std::vector<std::thread> clients;
  for (int c = 0; c < opt.clients; ++c) {
    clients.emplace_back([&] {
      HttpClient http(opt.server, "");  // one keep-alive connection per client
      HttpRequestOptions request;
      while (true) {
        size_t i = next.fetch_add(1);
        if (i >= work.size()) return;
        auto [d, b] = work[i];
        while (answered[d].load() != b) std::this_thread::yield();
        const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count();
        request.headers = {{"Content-Encoding", "zstd"},
                           {"Authorization", "Bearer " + devices[d].credential},
                           {std::string(reqsig::kHeader),
                            reqsig::sign(devices[d].id, devices[d].secret_key, now, "POST",
                                         "/api/v1/device/telemetry", devices[d].batches[b])}};
        auto r = http.request("POST", "/api/v1/device/telemetry", devices[d].batches[b],
                              "application/json", request);
        answered[d].store(b + 1);
        if (!r || r->status != 200) {
          failures++;
          std::lock_guard elock(err_mu);
          if (first_error.empty()) {
            first_error = r ? error_from_response(*r).describe() : r.error().describe();
          }
          continue;
        }
        acked_records += json::parse(r->body, nullptr, false).value("stored", 0);
      }
    });
  }
  for (auto& t : clients) t.join();
  const double elapsed = seconds_since(started);
  const double points = metric_sum(admin, opt.points_metric).value_or(0) - points_before;
  const double stored = metric_sum(admin, opt.records_metric).value_or(0) - records_before;

  json out = {{"devices", opt.devices},
              {"batches", batches},
              {"records", records},
              {"records_stored", acked_records.load()},
              {"records_counted_by_server", stored},
              {"points", points},
              {"seconds", std::round(elapsed * 1000) / 1000},
              {"records_per_s", std::round(static_cast<double>(records) / elapsed)},
              {"points_per_s", std::round(points / elapsed)},
              {"compressed_bytes", compressed_bytes},
              {"failures", failures.load()}};
  if (!first_error.empty()) out["first_error"] = first_error;
  std::printf("%s\n", out.dump().c_str());
  return failures == 0 && acked_records == records ? 0 : 1;
}

}  // namespace
}  // namespace outpost::bench

int main(int argc, char** argv) {
  using namespace outpost::bench;
  CLI::App app{"Load generators for the telemetry benchmarks (see bench/README.md)."};
  app.require_subcommand(1);
  LoadOptions load;
  auto* l = app.add_subcommand("load", "Paced inference requests against an agent's route.");
  l->add_option("--url", load.url, "Infer URL, e.g. http://127.0.0.1:7410/models/bench/infer")
      ->required();
  l->add_option("--rate", load.rate, "Requests per second")->check(CLI::PositiveNumber);
  l->add_option("--seconds", load.seconds, "How long")->check(CLI::PositiveNumber);
  l->add_option("--inputs", load.inputs, "Width of the model's FP32 input row");
  IngestOptions ingest;
  auto* i = app.add_subcommand("ingest", "Upload many devices' telemetry backlogs.");
  i->add_option("--server", ingest.server, "Control plane URL")->required();
  i->add_option("--token", ingest.token, "Operator token (admin)")->required();
  i->add_option("--devices", ingest.devices, "Stand-in devices to enroll");
  i->add_option("--minutes", ingest.minutes, "Backlog per device, in minutes of records");
  i->add_option("--batch-minutes", ingest.batch_minutes, "Minutes of records per batch");
  i->add_option("--clients", ingest.clients, "Concurrent keep-alive connections");
  i->add_option("--request-rate", ingest.request_rate, "Inferences/s each device served");
  i->add_option("--sample", ingest.sample, "Sampling rate of raw inference records");
  i->add_option("--points-metric", ingest.points_metric, "Server counter of stored points");
  i->add_option("--records-metric", ingest.records_metric, "Server counter of stored records");
  CLI11_PARSE(app, argc, argv);
  if (l->parsed()) return run_load(load);
  return run_ingest(ingest);
}
