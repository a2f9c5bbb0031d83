// outpost-serve-bench: what the agent's inference endpoint adds over calling the runtime
// directly (DESIGN §8: < 0.2 ms p50). For each model it times, on the same loaded session:
//   direct   session->run() on prepared tensors;
//   codec    parse_infer_request + run + encode_infer_response (the JSON codec's share);
//   handle   ModelServer::handle() on a ready Request (routing, metrics, codec; no socket);
//   http     POST {route}/infer to ModelServer behind http::HttpServer on 127.0.0.1, wired
//            as the agent wires it, from a blocking keep-alive client on one connection;
//   http-null the same request to a route that ignores the body and answers {} (transport
//            and client alone, for the same request size).
// The modes take turns in blocks, so slow drift of the machine spreads over all of them.
// See bench/README.md.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "agent/serve/inference_protocol.h"
#include "agent/serve/model_server.h"
#include "agent/serve/onnx_session.h"
#include "common/onnx/onnx_builder.h"
#include "http/http_server.h"

#ifndef OUTPOST_SOURCE_DIR
#define OUTPOST_SOURCE_DIR "."
#endif

namespace outpost::bench {
namespace {

namespace fs = std::filesystem;
namespace serve = outpost::agent::serve;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using serve::DataType;
using serve::Tensor;
using serve::TensorSpec;

constexpr double kTargetAddedP50Ms = 0.2;  // DESIGN.md §8
constexpr std::array<const char*, 5> kModes = {"direct", "codec", "handle", "http", "http-null"};

struct Options {
  int requests = 2000;  // measured, per model and mode
  int warmup = 200;     // per model and mode
  int block = 100;      // requests of one mode before the next mode's turn
  int serve_threads = 2;
  int intra_op_threads = 1;
  std::string silero = OUTPOST_SOURCE_DIR "/third_party/models/silero_vad_v5.onnx";
  std::string onnxruntime;
  std::string models = "small,large,silero";
  std::string output = "text";
};

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "outpost-serve-bench: %s\n", message.c_str());
  std::exit(1);
}

long status_kb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, n, key) == 0 && line.size() > n && line[n] == ':') {
      return std::strtol(line.c_str() + n + 1, nullptr, 10);
    }
  }
  return -1;
}

double cpu_seconds(int who) {
  rusage ru{};
  getrusage(who, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// ---------------------------------------------------------------------------------------
// Models and their inputs

struct ModelCase {
  std::string label;  // also the deployment name and the route's last segment
  std::string path;
  std::string description;
  // Shape and value of each input by name; inputs not listed get -1 dims as 1 and zeros.
  std::map<std::string, std::vector<int64_t>> shapes;
  std::function<double(const std::string& input, size_t index)> value;
};

std::vector<int64_t> concrete_shape(const TensorSpec& spec, const ModelCase& model) {
  if (auto it = model.shapes.find(spec.name); it != model.shapes.end()) return it->second;
  std::vector<int64_t> shape = spec.shape;
  for (auto& d : shape) d = d < 0 ? 1 : d;
  return shape;
}

// The tensors for session->run() and the same values as an infer request body.
std::pair<std::vector<Tensor>, std::string> make_request(const std::vector<TensorSpec>& specs,
                                                         const ModelCase& model) {
  std::vector<Tensor> tensors;
  json inputs = json::array();
  for (const auto& spec : specs) {
    Tensor t;
    t.name = spec.name;
    t.type = spec.type;
    t.shape = concrete_shape(spec, model);
    auto count = serve::element_count(t.shape, size_t{1} << 26);
    if (!count) die("model " + model.label + ": bad shape for input " + spec.name);
    t.data.resize(*count * serve::datatype_size(t.type));
    json data = json::array();
    for (size_t i = 0; i < *count; ++i) {
      const double v = model.value ? model.value(spec.name, i) : 0.0;
      switch (t.type) {
        case DataType::kFp32: {
          const float f = static_cast<float>(v);
          std::memcpy(t.data.data() + i * 4, &f, 4);
          data.push_back(f);
          break;
        }
        case DataType::kInt64: {
          const auto l = static_cast<int64_t>(v);
          std::memcpy(t.data.data() + i * 8, &l, 8);
          data.push_back(l);
          break;
        }
        default:
          die("model " + model.label + ": input " + spec.name + " is " +
              std::string(serve::datatype_name(t.type)) + "; this bench sends FP32 and INT64");
      }
    }
    inputs.push_back({{"name", t.name},
                      {"datatype", std::string(serve::datatype_name(t.type))},
                      {"shape", t.shape},
                      {"data", std::move(data)}});
    tensors.push_back(std::move(t));
  }
  return {std::move(tensors), json{{"inputs", std::move(inputs)}}.dump()};
}

// ---------------------------------------------------------------------------------------
// A blocking HTTP/1.1 client on one keep-alive connection: the request is formatted once,
// written with one send(), and the response read into a reused buffer, parsing only the
// status line and Content-Length. About as little work as a client can do.

class KeepAliveClient {
 public:
  explicit KeepAliveClient(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) die(std::string("socket: ") + std::strerror(errno));
    int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      die("connect 127.0.0.1:" + std::to_string(port) + ": " + std::strerror(errno));
    }
    buffer_.resize(1 << 16);
  }
  ~KeepAliveClient() { ::close(fd_); }
  KeepAliveClient(const KeepAliveClient&) = delete;
  KeepAliveClient& operator=(const KeepAliveClient&) = delete;

  static std::string format_post(uint16_t port, const std::string& target,
                                 const std::string& body) {
    return "POST " + target + " HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) +
           "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
           "\r\n\r\n" + body;
  }

  // Sends one formatted request and reads its response; returns the status. The body is
  // then body() until the next call.
  int exchange(const std::string& request) {
    for (size_t sent = 0; sent < request.size();) {
      const ssize_t n = ::send(fd_, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) die(std::string("send: ") + std::strerror(errno));
      sent += static_cast<size_t>(n);
    }
    size_t have = 0;
    size_t header_end = std::string::npos;
    size_t total = std::string::npos;
    int status = 0;
    while (total == std::string::npos || have < total) {
      if (have == buffer_.size()) buffer_.resize(buffer_.size() * 2);
      const ssize_t n = ::recv(fd_, buffer_.data() + have, buffer_.size() - have, 0);
      if (n <= 0) die(n == 0 ? "the server closed the connection" : std::strerror(errno));
      have += static_cast<size_t>(n);
      if (header_end != std::string::npos) continue;
      std::string_view view(buffer_.data(), have);
      const size_t end = view.find("\r\n\r\n");
      if (end == std::string_view::npos) continue;
      header_end = end + 4;
      // "HTTP/1.1 200 OK"
      if (view.size() < 12) die("short status line");
      status = std::atoi(buffer_.data() + 9);
      size_t length = 0;
      bool found = false;
      for (size_t pos = view.find("\r\n") + 2; pos < end;) {
        const size_t eol = view.find("\r\n", pos);
        std::string_view line = view.substr(pos, eol - pos);
        if (line.size() > 15 && strncasecmp(line.data(), "content-length:", 15) == 0) {
          length = std::strtoul(std::string(line.substr(15)).c_str(), nullptr, 10);
          found = true;
        }
        pos = eol + 2;
      }
      if (!found) die("response without Content-Length");
      total = header_end + length;
    }
    if (have != total) die("bytes after the response (pipelining is not expected)");
    body_ = std::string_view(buffer_.data() + header_end, total - header_end);
    return status;
  }
  std::string_view body() const { return body_; }

 private:
  int fd_ = -1;
  std::vector<char> buffer_;
  std::string_view body_;
};

// ---------------------------------------------------------------------------------------
// Figures

struct Figures {
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, mean_ms = 0, min_ms = 0, max_ms = 0;
};

Figures figures(std::vector<double> ms) {
  Figures f;
  if (ms.empty()) return f;
  std::sort(ms.begin(), ms.end());
  auto rank = [&](double p) {
    const auto i = static_cast<size_t>(std::ceil(p * static_cast<double>(ms.size())));
    return ms[std::min(ms.size() - 1, i == 0 ? 0 : i - 1)];
  };
  double sum = 0;
  for (double v : ms) sum += v;
  f.p50_ms = rank(0.50);
  f.p90_ms = rank(0.90);
  f.p99_ms = rank(0.99);
  f.mean_ms = sum / static_cast<double>(ms.size());
  f.min_ms = ms.front();
  f.max_ms = ms.back();
  return f;
}

double round4(double v) { return std::round(v * 1e4) / 1e4; }  // ms to 0.1 µs

json figures_json(const Figures& f) {
  auto r = round4;
  return {{"p50_ms", r(f.p50_ms)},   {"p90_ms", r(f.p90_ms)}, {"p99_ms", r(f.p99_ms)},
          {"mean_ms", r(f.mean_ms)}, {"min_ms", r(f.min_ms)}, {"max_ms", r(f.max_ms)}};
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// ---------------------------------------------------------------------------------------
// One model

struct Bench {
  const Options& opt;
  serve::ModelServer& server;
  uint16_t port;
  std::map<std::string, std::shared_ptr<serve::InferenceSession>>& sessions;  // by path
};

json bench_model(Bench& b, const ModelCase& model, json& rss) {
  // Load once; the model server gets the same session through its loader (see main), so
  // every mode runs the very same runtime session.
  auto loaded = serve::load_onnx_session(model.path, {b.opt.intra_op_threads});
  if (!loaded) die("loading " + model.path + ": " + loaded.error().message);
  auto session = *loaded;
  b.sessions[model.path] = session;
  serve::ServiceConfig config;
  config.deployment = model.label;
  config.route = "/models/" + model.label;
  config.primary = {model.label, "1.0.0", model.path};
  config.session.intra_op_threads = b.opt.intra_op_threads;
  if (auto activated = b.server.activate(config); !activated) {
    die("activating " + model.label + ": " + activated.error().message);
  } else if (!activated->empty()) {
    die("activating " + model.label + ": " + *activated);
  }
  rss.push_back({{"when", model.label + " loaded"}, {"vmrss_kb", status_kb("VmRSS")}});

  const auto& in_specs = session->inputs();
  const auto& out_specs = session->outputs();
  auto [tensors, body] = make_request(in_specs, model);
  const std::string target = config.route + "/infer";
  const std::string http_request = KeepAliveClient::format_post(b.port, target, body);
  const std::string null_request = KeepAliveClient::format_post(b.port, "/bench/null", body);
  http::Request handle_request;
  handle_request.method = "POST";
  handle_request.target = target;
  handle_request.path = target;
  handle_request.headers["content-type"] = "application/json";
  handle_request.body = body;
  KeepAliveClient client(b.port);

  // Correctness first: the HTTP answer carries what the runtime computes directly.
  auto direct = session->run(tensors, {});
  if (!direct) die(model.label + ": run: " + direct.error().message);
  const int status = client.exchange(http_request);
  if (status != 200)
    die(model.label + ": HTTP " + std::to_string(status) + ": " + std::string(client.body()));
  const std::string response_body(client.body());
  {
    auto answer = json::parse(response_body);
    const Tensor& want = direct->front();
    const auto& got = answer.at("outputs").at(0).at("data");
    if (got.size() != want.element_count()) die(model.label + ": HTTP answer size differs");
    for (size_t i = 0; i < got.size(); ++i) {
      if (std::fabs(got[i].get<double>() - want.value_as_double(i)) > 1e-6) {
        die(model.label + ": HTTP answer differs from the direct run at " + std::to_string(i));
      }
    }
  }

  std::map<std::string, std::vector<double>> samples;
  std::vector<double> parse_ms, run_in_codec_ms, encode_ms;
  double http_client_cpu = 0, http_process_cpu = 0, http_wall = 0;
  int errors = 0;

  auto one = [&](const std::string& mode, bool record) {
    const auto t0 = Clock::now();
    if (mode == "direct") {
      auto out = session->run(tensors, {});
      if (!out) ++errors;
    } else if (mode == "codec") {
      auto request = serve::parse_infer_request(body, in_specs, out_specs);
      const auto t1 = Clock::now();
      if (!request) {
        ++errors;
        return;
      }
      auto out = session->run(request->inputs, request->outputs);
      const auto t2 = Clock::now();
      if (!out) {
        ++errors;
        return;
      }
      std::string encoded =
          serve::encode_infer_response(model.label, "1.0.0", request->id, *out, json::object());
      if (record) {
        parse_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        run_in_codec_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
        encode_ms.push_back(ms_since(t2));
      }
      if (encoded.empty()) ++errors;
    } else if (mode == "handle") {
      auto answer = b.server.handle(handle_request);
      if (!answer || answer->status != 200) ++errors;
    } else if (mode == "http") {
      if (client.exchange(http_request) != 200) ++errors;
    } else {
      if (client.exchange(null_request) != 200) ++errors;
    }
    if (record) samples[mode].push_back(ms_since(t0));
  };

  for (const char* mode : kModes) {
    for (int i = 0; i < b.opt.warmup; ++i) one(mode, false);
  }
  // The model server's own latency histogram (parse, run, confidence; not routing, not
  // encoding, not the socket) as (count, sum s), to compare the same work done on this thread
  // (handle) and on an HTTP I/O thread (http).
  auto server_latency = [&] {
    for (const auto& m : b.server.metrics_json()) {
      if (m.value("deployment", "") == model.label) {
        const auto& l = m.at("latency_seconds");
        return std::pair{l.at("count").get<double>(), l.at("sum").get<double>()};
      }
    }
    return std::pair{0.0, 0.0};
  };
  std::map<std::string, std::pair<double, double>> in_server;  // mode -> (count, sum s)
  for (int done = 0; done < b.opt.requests;) {
    const int n = std::min(b.opt.block, b.opt.requests - done);
    for (const char* mode : kModes) {
      const bool http = std::string(mode) == "http";
      const double thread0 = http ? cpu_seconds(RUSAGE_THREAD) : 0;
      const double self0 = http ? cpu_seconds(RUSAGE_SELF) : 0;
      const auto latency0 = server_latency();
      const auto t0 = Clock::now();
      for (int i = 0; i < n; ++i) one(mode, true);
      if (http) {
        http_wall += ms_since(t0) / 1e3;
        http_client_cpu += cpu_seconds(RUSAGE_THREAD) - thread0;
        http_process_cpu += cpu_seconds(RUSAGE_SELF) - self0;
      }
      const auto latency1 = server_latency();
      in_server[mode].first += latency1.first - latency0.first;
      in_server[mode].second += latency1.second - latency0.second;
    }
    done += n;
  }
  auto in_server_mean_ms = [&](const char* mode) {
    const auto& [count, sum] = in_server[mode];
    return count > 0 ? round4(sum / count * 1e3) : 0.0;
  };
  if (errors > 0) die(model.label + ": " + std::to_string(errors) + " failed requests");

  json modes = json::object();
  std::map<std::string, Figures> f;
  for (const char* mode : kModes) {
    f[mode] = figures(samples[mode]);
    modes[mode] = figures_json(f[mode]);
  }
  const double requests = b.opt.requests;
  auto us = [](double v) { return std::round(v * 10) / 10; };
  json out = {
      {"model", model.label},
      {"description", model.description},
      {"file", model.path},
      {"file_bytes", static_cast<int64_t>(fs::file_size(model.path))},
      {"request_bytes", body.size()},
      {"response_bytes", response_body.size()},
      {"http_request_bytes", http_request.size()},
      {"modes", modes},
      {"codec_parse_p50_ms", round4(figures(parse_ms).p50_ms)},
      {"codec_run_p50_ms", round4(figures(run_in_codec_ms).p50_ms)},
      {"codec_encode_p50_ms", round4(figures(encode_ms).p50_ms)},
      {"added_p50_ms", round4(f["http"].p50_ms - f["direct"].p50_ms)},
      {"codec_added_p50_ms", round4(f["codec"].p50_ms - f["direct"].p50_ms)},
      {"handle_added_p50_ms", round4(f["handle"].p50_ms - f["direct"].p50_ms)},
      {"transport_added_p50_ms", round4(f["http"].p50_ms - f["handle"].p50_ms)},
      {"http_client_cpu_us_per_request", us(http_client_cpu / requests * 1e6)},
      {"http_server_cpu_us_per_request", us((http_process_cpu - http_client_cpu) / requests * 1e6)},
      {"http_wall_us_per_request", us(http_wall / requests * 1e6)},
      {"server_infer_mean_ms_handle", in_server_mean_ms("handle")},
      {"server_infer_mean_ms_http", in_server_mean_ms("http")},
  };
  out["target_met"] = out["added_p50_ms"].get<double>() < kTargetAddedP50Ms;
  return out;
}

// ---------------------------------------------------------------------------------------
// Output

std::string fmt3(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", v);
  return buf;
}

void print_text(const json& report) {
  std::printf(
      "outpost-serve-bench: %d requests per model and mode after %d warm-up, blocks of "
      "%d, %d HTTP I/O threads, %d intra-op thread(s); latency in ms\n\n",
      report["requests"].get<int>(), report["warmup"].get<int>(), report["block"].get<int>(),
      report["serve_threads"].get<int>(), report["intra_op_threads"].get<int>());
  std::printf(
      "| model | request B | (a) direct p50 / p99 / mean | (b) +codec p50 / p99 | "
      "handle() p50 / p99 | (c) HTTP p50 / p99 / mean | HTTP null p50 | added p50 (c-a) "
      "| of it codec / server / transport | < 0.2 ms |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (const auto& m : report["models"]) {
    const auto& md = m["modes"];
    auto v = [&](const char* mode, const char* key) { return fmt3(md[mode][key].get<double>()); };
    const double codec = m["codec_added_p50_ms"].get<double>();
    const double server = m["handle_added_p50_ms"].get<double>() - codec;
    std::printf(
        "| %s | %lld | %s / %s / %s | %s / %s | %s / %s | %s / %s / %s | %s | %s | %s / %s "
        "/ %s | %s |\n",
        m["model"].get<std::string>().c_str(), m["request_bytes"].get<long long>(),
        v("direct", "p50_ms").c_str(), v("direct", "p99_ms").c_str(),
        v("direct", "mean_ms").c_str(), v("codec", "p50_ms").c_str(), v("codec", "p99_ms").c_str(),
        v("handle", "p50_ms").c_str(), v("handle", "p99_ms").c_str(), v("http", "p50_ms").c_str(),
        v("http", "p99_ms").c_str(), v("http", "mean_ms").c_str(), v("http-null", "p50_ms").c_str(),
        fmt3(m["added_p50_ms"].get<double>()).c_str(), fmt3(codec).c_str(), fmt3(server).c_str(),
        fmt3(m["transport_added_p50_ms"].get<double>()).c_str(),
        m["target_met"].get<bool>() ? "met" : "missed");
  }
  std::printf(
      "\ncodec split (p50 ms: parse / run / encode), response bytes, HTTP CPU per request "
      "(client thread / rest of the process), the model server's infer() mean:\n");
  for (const auto& m : report["models"]) {
    std::printf(
        "  %-8s %s / %s / %s; response %lld B; CPU %.1f / %.1f us (wall %.1f us); infer() "
        "mean %.3f ms by handle(), %.3f ms over HTTP\n",
        m["model"].get<std::string>().c_str(), fmt3(m["codec_parse_p50_ms"].get<double>()).c_str(),
        fmt3(m["codec_run_p50_ms"].get<double>()).c_str(),
        fmt3(m["codec_encode_p50_ms"].get<double>()).c_str(), m["response_bytes"].get<long long>(),
        m["http_client_cpu_us_per_request"].get<double>(),
        m["http_server_cpu_us_per_request"].get<double>(),
        m["http_wall_us_per_request"].get<double>(), m["server_infer_mean_ms_handle"].get<double>(),
        m["server_infer_mean_ms_http"].get<double>());
  }
  std::printf("\nVmRSS kB:");
  for (const auto& r : report["rss"]) {
    std::printf(" %s: %lld;", r["when"].get<std::string>().c_str(), r["vmrss_kb"].get<long long>());
  }
  std::printf("\n");
  for (const auto& m : report["models"]) {
    std::printf("%s_added_p50_ms=%s\n", m["model"].get<std::string>().c_str(),
                fmt3(m["added_p50_ms"].get<double>()).c_str());
  }
}

// Median (min-max) of the same figure over several reports.
std::string spread(const std::vector<double>& values, int decimals) {
  std::vector<double> v = values;
  std::sort(v.begin(), v.end());
  const double median =
      v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
  auto f = [&](double x) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.*f", decimals, x);
    return std::string(buf);
  };
  if (v.size() == 1 || f(v.front()) == f(v.back())) return f(median);
  return f(median) + " (" + f(v.front()) + "–" + f(v.back()) + ")";
}

int summarize(const std::vector<std::string>& files) {
  std::vector<json> reports;
  for (const auto& file : files) {
    std::ifstream in(file);
    if (!in) die("--summarize: cannot read " + file);
    try {
      reports.push_back(json::parse(in));
      (void)reports.back().at("models").at(0).at("modes");
    } catch (const std::exception& e) {
      die("--summarize: " + file + " is not a report of this bench: " + e.what());
    }
  }
  const auto& first = reports.front();
  std::printf("median of %zu runs (min–max); %d requests per model and mode each; ms\n\n",
              reports.size(), first["requests"].get<int>());
  std::printf(
      "| model | request B | response B | (a) direct p50 | direct p99 | (b) +codec p50 | "
      "handle() p50 | (c) HTTP p50 | HTTP p99 | HTTP null p50 | **added p50 (c−a)** | "
      "codec share | transport share | HTTP CPU µs/req client / server | target < 0.2 ms "
      "|\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (size_t i = 0; i < first["models"].size(); ++i) {
    auto collect = [&](const std::function<double(const json&)>& get) {
      std::vector<double> out;
      for (const auto& r : reports) out.push_back(get(r["models"].at(i)));
      return out;
    };
    auto mode = [&](const char* m, const char* key) {
      return spread(collect([&](const json& x) { return x["modes"][m][key].get<double>(); }), 3);
    };
    auto field = [&](const char* key, int decimals) {
      return spread(collect([&](const json& x) { return x[key].get<double>(); }), decimals);
    };
    // The verdict is the median's; a split between runs is said.
    auto added = collect([](const json& x) { return x["added_p50_ms"].get<double>(); });
    int met = 0;
    for (double a : added) met += a < kTargetAddedP50Ms ? 1 : 0;
    std::sort(added.begin(), added.end());
    const size_t n = added.size();
    const double median = n % 2 ? added[n / 2] : (added[n / 2 - 1] + added[n / 2]) / 2;
    std::string verdict = median < kTargetAddedP50Ms ? "met" : "missed";
    if (met != 0 && met != static_cast<int>(n)) {
      verdict += " (met in " + std::to_string(met) + " of " + std::to_string(n) + " runs)";
    }
    const auto& m = first["models"].at(i);
    std::printf(
        "| %s | %lld | %lld | %s | %s | %s | %s | %s | %s | %s | **%s** | %s | %s | %s / %s "
        "| %s |\n",
        m["model"].get<std::string>().c_str(), m["request_bytes"].get<long long>(),
        m["response_bytes"].get<long long>(), mode("direct", "p50_ms").c_str(),
        mode("direct", "p99_ms").c_str(), mode("codec", "p50_ms").c_str(),
        mode("handle", "p50_ms").c_str(), mode("http", "p50_ms").c_str(),
        mode("http", "p99_ms").c_str(), mode("http-null", "p50_ms").c_str(),
        field("added_p50_ms", 3).c_str(), field("codec_added_p50_ms", 3).c_str(),
        field("transport_added_p50_ms", 3).c_str(),
        field("http_client_cpu_us_per_request", 1).c_str(),
        field("http_server_cpu_us_per_request", 1).c_str(), verdict.c_str());
  }
  std::printf(
      "\nThe codec's parts, the model server's own infer() time (parse, metrics, run; its latency "
      "histogram) and the HTTP wall time (median of the runs):\n\n");
  std::printf(
      "| model | parse p50 ms | run p50 ms (in the codec mode) | encode p50 ms | model server's "
      "infer() mean ms, called by handle() / over HTTP | HTTP wall µs/request |\n"
      "|---|---:|---:|---:|---:|---:|\n");
  for (size_t i = 0; i < first["models"].size(); ++i) {
    auto field = [&](const char* key, int decimals) {
      std::vector<double> v;
      for (const auto& r : reports) v.push_back(r["models"].at(i)[key].get<double>());
      return spread(v, decimals);
    };
    std::printf("| %s | %s | %s | %s | %s / %s | %s |\n",
                first["models"].at(i)["model"].get<std::string>().c_str(),
                field("codec_parse_p50_ms", 3).c_str(), field("codec_run_p50_ms", 3).c_str(),
                field("codec_encode_p50_ms", 3).c_str(),
                field("server_infer_mean_ms_handle", 3).c_str(),
                field("server_infer_mean_ms_http", 3).c_str(),
                field("http_wall_us_per_request", 1).c_str());
  }
  std::printf("\nVmRSS of the bench process (kB):");
  for (size_t i = 0; i < first["rss"].size(); ++i) {
    std::vector<double> v;
    for (const auto& r : reports) v.push_back(r["rss"].at(i)["vmrss_kb"].get<double>());
    std::printf(" %s: %s;", first["rss"][i]["when"].get<std::string>().c_str(),
                spread(v, 0).c_str());
  }
  std::printf("\n");
  return 0;
}

int run(const Options& opt) {
  if (opt.requests < 1 || opt.warmup < 0 || opt.block < 1 || opt.serve_threads < 1) {
    die("--requests, --block and --serve-threads must be positive, --warmup not negative");
  }
  // The model server's log lines (a failed warm-up, say) go to stderr; stdout is the report.
  spdlog::set_default_logger(spdlog::stderr_color_mt("serve-bench"));
  spdlog::set_level(spdlog::level::warn);
  // VmRSS at points in order; "start" is before ONNX Runtime is opened.
  json rss = json::array({{{"when", "start"}, {"vmrss_kb", status_kb("VmRSS")}}});
  if (!opt.onnxruntime.empty()) serve::set_onnxruntime_library(opt.onnxruntime);

  // Generated models in a temporary directory, removed at the end.
  const char* tmp_env = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp_env && *tmp_env ? tmp_env : "/tmp") + "/serve-bench.XXXXXX";
  if (!::mkdtemp(tmpl.data())) die("mkdtemp " + tmpl + ": " + std::strerror(errno));
  const fs::path dir = tmpl;
  auto classifier = [&](const std::string& label, int64_t inputs, int64_t hidden, int64_t classes) {
    onnx::ClassifierSpec spec;
    spec.inputs = inputs;
    spec.hidden = hidden;
    spec.classes = classes;
    spec.seed = 1;
    const std::string path = (dir / (label + ".onnx")).string();
    std::ofstream(path, std::ios::binary) << onnx::build_classifier_onnx(spec);
    ModelCase m;
    m.label = label;
    m.path = path;
    m.description = "generated classifier " + std::to_string(inputs) + "→" +
                    std::to_string(hidden) + "→" + std::to_string(classes) + ", batch 1";
    m.shapes["input"] = {1, inputs};
    m.value = [](const std::string&, size_t i) {
      return std::sin(static_cast<double>(i) * 0.7) * 0.9;
    };
    return m;
  };
  std::vector<ModelCase> cases;
  std::stringstream list(opt.models);
  for (std::string name; std::getline(list, name, ',');) {
    if (name == "small") {
      cases.push_back(classifier("small", 4, 8, 3));
    } else if (name == "large") {
      cases.push_back(classifier("large", 256, 512, 10));
    } else if (name == "silero") {
      if (!fs::exists(opt.silero)) die("--silero " + opt.silero + ": no such file");
      ModelCase m;
      m.label = "silero";
      m.path = opt.silero;
      m.description = "Silero VAD v5, 512 samples at 16 kHz, state [2,1,128]";
      m.shapes = {{"input", {1, 512}}, {"state", {2, 1, 128}}};
      m.value = [](const std::string& input, size_t i) -> double {
        if (input == "sr") return 16000;
        if (input == "state") return 0;
        return 0.3 * std::sin(static_cast<double>(i) * 2 * M_PI * 440 / 16000);  // 440 Hz
      };
      cases.push_back(std::move(m));
    } else {
      die("--models: unknown model \"" + name + "\" (small, large, silero)");
    }
  }

  // The agent's wiring (src/agent/agent.cpp): every GET/POST path goes to the model server,
  // inference bodies up to 64 MiB, `serve_threads` I/O threads that also run the inferences.
  std::map<std::string, std::shared_ptr<serve::InferenceSession>> sessions;
  serve::ModelServer server([&sessions](const std::string& path, const serve::SessionOptions&)
                                -> Result<std::shared_ptr<serve::InferenceSession>> {
    auto it = sessions.find(path);
    if (it == sessions.end()) return make_error(Errc::kNotFound, "not preloaded: " + path);
    return it->second;
  });
  http::Router router;
  auto serve_or_404 = [&server](http::Request&& request, http::Responder respond) {
    if (auto answer = server.handle(request)) {
      respond(std::move(*answer));
      return;
    }
    respond(http::Response::error(Error{Errc::kNotFound, "nothing at " + request.path, ""}));
  };
  http::RouteOptions infer_options;
  infer_options.body_limit = 64u << 20;
  router.add(
      "POST", "/bench/null",
      [](http::Request&&, http::Responder respond) { respond(http::Response::json(200, "{}")); },
      infer_options);
  router.add("GET", "/{path...}", serve_or_404);
  router.add("POST", "/{path...}", serve_or_404, infer_options);
  http::ServerOptions http_options;
  http_options.listen = "127.0.0.1:0";
  http_options.io_threads = opt.serve_threads;
  http::HttpServer http_server(http_options, router);
  if (auto started = http_server.start(); !started) die(started.error().message);

  Bench bench{opt, server, http_server.port(), sessions};
  json models = json::array();
  for (const auto& c : cases) {
    models.push_back(bench_model(bench, c, rss));
    std::fprintf(stderr, "outpost-serve-bench: %s done\n", c.label.c_str());
  }
  rss.push_back({{"when", "end"}, {"vmrss_kb", status_kb("VmRSS")}});
  rss.push_back({{"when", "peak (VmHWM)"}, {"vmrss_kb", status_kb("VmHWM")}});
  http_server.stop();
  std::error_code ec;
  fs::remove_all(dir, ec);

  auto version = serve::onnxruntime_version();
  json report = {{"bench", "outpost-serve-bench"},
                 {"requests", opt.requests},
                 {"warmup", opt.warmup},
                 {"block", opt.block},
                 {"serve_threads", opt.serve_threads},
                 {"intra_op_threads", opt.intra_op_threads},
                 {"onnxruntime", version ? *version : "unknown"},
                 {"nproc", static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN))},
                 {"target_added_p50_ms", kTargetAddedP50Ms},
                 {"models", models},
                 {"rss", rss}};
  if (opt.output == "json") {
    std::printf("%s\n", report.dump(2).c_str());
  } else {
    print_text(report);
  }
  return 0;
}

}  // namespace
}  // namespace outpost::bench

int main(int argc, char** argv) {
  outpost::bench::Options opt;
  CLI::App app{
      "Measures what the agent's inference endpoint adds over calling ONNX Runtime directly: "
      "per model, direct run(), run() with the JSON codec, ModelServer::handle(), and HTTP on "
      "127.0.0.1 from one keep-alive connection (see bench/README.md)."};
  app.add_option("--requests", opt.requests, "Measured requests per model and mode")
      ->capture_default_str();
  app.add_option("--warmup", opt.warmup, "Warm-up requests per model and mode")
      ->capture_default_str();
  app.add_option("--block", opt.block, "Requests of one mode before the next mode's turn")
      ->capture_default_str();
  app.add_option("--models", opt.models,
                 "Comma-separated: small (4→8→3), large (256→512→10), silero")
      ->capture_default_str();
  app.add_option("--silero", opt.silero, "Silero VAD v5 model file")->capture_default_str();
  app.add_option("--serve-threads", opt.serve_threads, "HTTP I/O threads (the agent's default: 2)")
      ->capture_default_str();
  app.add_option("--inference-threads", opt.intra_op_threads,
                 "Intra-op threads per inference (the agent's default: 1)")
      ->capture_default_str();
  app.add_option("--onnxruntime", opt.onnxruntime,
                 "ONNX Runtime library (default: $OUTPOST_ONNXRUNTIME or the build's)");
  app.add_option("-o,--output", opt.output, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  std::vector<std::string> summarize_files;
  app.add_option("--summarize", summarize_files,
                 "Measure nothing: print the median table of these -o json reports");
  CLI11_PARSE(app, argc, argv);
  if (!summarize_files.empty()) return outpost::bench::summarize(summarize_files);
  return outpost::bench::run(opt);
}
