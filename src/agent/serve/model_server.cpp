#include "agent/serve/model_server.h"

#include <charconv>
#include <chrono>
#include <cstdio>

#include <spdlog/spdlog.h>

namespace outpost::agent::serve {
namespace {

using json = nlohmann::json;

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

http::Response protocol_error(int status, const Error& error) {
  return http::Response::json(status, protocol_error_body(error));
}

// A 200 answer; with binary outputs (binary tensor data extension) an octet stream whose
// Inference-Header-Content-Length says where its JSON ends.
http::Response answer(const ModelRef& ref, const InferRequest& request,
                      const std::vector<Tensor>& outputs, const json& parameters) {
  EncodedAnswer encoded = encode_infer_answer(ref.name, ref.version, request, outputs, parameters);
  if (!encoded.json_length) return http::Response::json(200, std::move(encoded.body));
  http::Response r = http::Response::text(200, std::move(encoded.body), "application/octet-stream");
  r.headers.emplace_back("Inference-Header-Content-Length", std::to_string(*encoded.json_length));
  return r;
}

// Inputs of zeros for a warm-up: dynamic dimensions 1, except the last one of each input
// when `wide` (models such as Silero VAD refuse a 1-sample frame). Empty when the model's
// inputs cannot be made up (unknown ranks, unsupported types).
std::vector<Tensor> warm_up_inputs(const InferenceSession& session, bool wide) {
  std::vector<Tensor> inputs;
  for (const auto& spec : session.inputs()) {
    if (!spec.rank_known || spec.type == DataType::kUnknown) return {};
    Tensor t;
    t.name = spec.name;
    t.type = spec.type;
    for (size_t i = 0; i < spec.shape.size(); ++i) {
      const bool last = i + 1 == spec.shape.size() && i > 0;
      t.shape.push_back(spec.shape[i] >= 0 ? spec.shape[i] : (wide && last ? 256 : 1));
    }
    auto count = element_count(t.shape, size_t{1} << 26);
    if (!count) return {};
    // Zeros, or for strings empty ones (each a zero length prefix).
    t.data.assign(*count * (t.type == DataType::kBytes ? 4 : datatype_size(t.type)), 0);
    inputs.push_back(std::move(t));
  }
  return inputs;
}

// One inference before the first request, so it does not pay for lazy initialisation.
void warm_up(InferenceSession& session, const std::string& what) {
  std::string why = "its inputs cannot be made up";
  std::vector<std::vector<int64_t>> tried;
  for (bool wide : {false, true}) {
    auto inputs = warm_up_inputs(session, wide);
    if (inputs.empty()) break;
    std::vector<std::vector<int64_t>> shapes;
    for (const auto& t : inputs) shapes.push_back(t.shape);
    if (shapes == tried) break;  // no dynamic last dimension: nothing else to try
    tried = shapes;
    auto ran = session.run(inputs, {});
    if (ran) return;
    why = ran.error().message;
  }
  spdlog::info("{}: no warm-up inference ({}); serving anyway", what, why);
}

// Top value per row of the first output when it looks like probabilities; the lowest row's.
std::optional<double> answer_confidence(const std::vector<Tensor>& outputs) {
  if (outputs.empty()) return std::nullopt;
  const Tensor& t = outputs.front();
  if (t.type != DataType::kFp32 && t.type != DataType::kFp64) return std::nullopt;
  const size_t count = t.element_count();
  if (count == 0) return std::nullopt;
  const size_t rows =
      t.shape.size() >= 2 ? static_cast<size_t>(std::max<int64_t>(t.shape[0], 1)) : 1;
  const size_t width = count / rows;
  if (width == 0) return std::nullopt;
  double lowest = 1.0;
  for (size_t r = 0; r < rows; ++r) {
    double top = 0.0;
    for (size_t i = 0; i < width; ++i) {
      double v = t.value_as_double(r * width + i);
      if (!(v >= 0.0 && v <= 1.0)) return std::nullopt;
      top = std::max(top, v);
    }
    lowest = std::min(lowest, top);
  }
  return lowest;
}

std::string confidence_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

json spec_list(const std::vector<TensorSpec>& specs) {
  json out = json::array();
  for (const auto& s : specs) {
    out.push_back({{"name", s.name},
                   {"datatype", std::string(datatype_name(s.type))},
                   {"shape", s.rank_known ? json(s.shape) : json::array({-1})}});
  }
  return out;
}

}  // namespace

ModelServer::ModelServer(SessionLoader loader, ProtocolLimits limits)
    : loader_(std::move(loader)), limits_(limits) {}

ModelServer::~ModelServer() = default;

std::shared_ptr<ModelMetrics> ModelServer::metrics_for(const std::string& deployment,
                                                       const ModelRef& ref,
                                                       const std::string& role) {
  const std::string key = deployment + "\n" + ref.name + "\n" + ref.version + "\n" + role;
  std::lock_guard lock(mu_);
  auto& slot = metrics_[key];
  if (!slot) slot = std::make_shared<ModelMetrics>(deployment, ref.name, ref.version, role);
  return slot;
}

ModelServer::Loaded ModelServer::load(const ServiceConfig& config, const ModelRef& ref,
                                      const std::string& role) {
  Loaded out;
  out.ref = ref;
  out.metrics = metrics_for(config.deployment, ref, role);
  out.metrics->set_revision(config.revision);
  const std::string what = config.deployment + " " + role + " " + ref.name + " " + ref.version;
  auto session = loader_(ref.path, config.session);
  if (!session) {
    out.error = session.error().message;
    spdlog::error("{}: cannot load: {}", what, out.error);
    return out;
  }
  warm_up(**session, what);
  out.session = std::move(*session);
  return out;
}

Result<std::string> ModelServer::activate(const ServiceConfig& config) {
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, svc] : services_) {
      if (name != config.deployment && svc->config.route == config.route) {
        return make_error(Errc::kConflict,
                          "route " + config.route + " is already served for deployment " + name);
      }
    }
  }
  auto service = std::make_shared<Service>();
  service->config = config;
  service->primary = load(config, config.primary, "primary");
  if (config.fallback) service->fallback = load(config, *config.fallback, "fallback");
  std::string note;
  if (!service->primary.session) {
    const bool fallback_ok = service->fallback && service->fallback->session;
    if (!fallback_ok) {
      return make_error(Errc::kInvalidArgument, "model " + config.primary.name + " " +
                                                    config.primary.version +
                                                    " cannot be loaded: " + service->primary.error);
    }
    note = "primary " + config.primary.name + " " + config.primary.version + " cannot be loaded (" +
           service->primary.error + "); the fallback " + config.fallback->name + " " +
           config.fallback->version + " answers";
  } else if (service->fallback && !service->fallback->session) {
    note = "fallback " + config.fallback->name + " " + config.fallback->version +
           " cannot be loaded: " + service->fallback->error;
  }
  ServicePtr old;
  {
    std::lock_guard lock(mu_);
    auto& slot = services_[config.deployment];
    old = std::move(slot);
    slot = std::move(service);
  }
  // `old` is released here; requests still running on it hold their own reference, and the
  // last of them frees the old sessions.
  spdlog::info("serving {} {} {} at {}{}", config.deployment, config.primary.name,
               config.primary.version, config.route, note.empty() ? "" : " (" + note + ")");
  return note;
}

void ModelServer::remove(const std::string& deployment) {
  ServicePtr old;
  std::lock_guard lock(mu_);
  auto it = services_.find(deployment);
  if (it == services_.end()) return;
  old = std::move(it->second);
  services_.erase(it);
}

std::optional<int64_t> ModelServer::serving_revision(const std::string& deployment) const {
  std::lock_guard lock(mu_);
  auto it = services_.find(deployment);
  if (it == services_.end()) return std::nullopt;
  return it->second->config.revision;
}

ModelServer::ServicePtr ModelServer::find_by_route(const std::string& route) const {
  std::lock_guard lock(mu_);
  for (const auto& [name, svc] : services_) {
    if (svc->config.route == route) return svc;
  }
  return nullptr;
}

ModelServer::ServicePtr ModelServer::find_by_name(const std::string& name) const {
  std::lock_guard lock(mu_);
  if (auto it = services_.find(name); it != services_.end()) return it->second;
  for (const auto& [dep, svc] : services_) {
    if (svc->config.primary.name == name) return svc;
  }
  return nullptr;
}

http::Response ModelServer::ready(const Service& service) {
  const bool ok = service.primary.session || (service.fallback && service.fallback->session);
  json body = {{"name", service.config.deployment}, {"ready", ok}};
  return http::Response::json(ok ? 200 : 503, body.dump());
}

http::Response ModelServer::metadata(const Service& service) const {
  const Loaded& answering =
      service.primary.session || !service.fallback ? service.primary : *service.fallback;
  if (!answering.session) {
    return protocol_error(503, Error{Errc::kUnavailable, "the model is not loaded", ""});
  }
  json meta = model_metadata(answering.ref.name, answering.ref.version, answering.session->inputs(),
                             answering.session->outputs());
  meta["deployment"] = service.config.deployment;
  meta["route"] = service.config.route;
  return http::Response::json(200, meta.dump());
}

http::Response ModelServer::infer(const Service& service, const http::Request& request) {
  const auto started = std::chrono::steady_clock::now();
  InferenceOutcome outcome;
  const Loaded* served_by = &service.primary;
  std::optional<size_t> json_length;
  if (std::string h = request.header("inference-header-content-length"); !h.empty()) {
    size_t n = 0;
    auto [end, ec] = std::from_chars(h.data(), h.data() + h.size(), n);
    if (ec != std::errc() || end != h.data() + h.size()) {
      served_by->metrics->count_served();
      return protocol_error(400, Error{Errc::kInvalidArgument,
                                       "Inference-Header-Content-Length: expected a byte count, "
                                       "got \"" +
                                           h.substr(0, 40) + "\"",
                                       "Inference-Header-Content-Length"});
    }
    json_length = n;
  }
  http::Response response = run_inference(service, request.body, json_length, outcome, served_by);
  served_by->metrics->count_served();
  if (observer_) {
    outcome.deployment = service.config.deployment;
    outcome.revision = service.config.revision;
    outcome.model = served_by->ref.name;
    outcome.version = served_by->ref.version;
    outcome.role = served_by == &service.primary ? "primary" : "fallback";
    outcome.latency_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    observer_(outcome);
  }
  return response;
}

http::Response ModelServer::run_inference(const Service& service, const std::string& body,
                                          std::optional<size_t> json_length,
                                          InferenceOutcome& outcome, const Loaded*& served_by) {
  const auto started = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  };
  const Loaded& primary = service.primary;
  std::string reason;
  std::optional<InferRequest> parsed;  // the primary's parse, reused when the fallback fits it
  std::vector<Tensor> primary_answer;  // kept when the fallback is asked only for confidence
  std::optional<double> primary_confidence;

  if (primary.session) {
    primary.metrics->count_request();
    auto request = parse_infer_request(body, primary.session->inputs(), primary.session->outputs(),
                                       limits_, json_length);
    if (!request) {
      primary.metrics->count_invalid();
      outcome.outcome = "invalid";
      return protocol_error(400, request.error());
    }
    primary.metrics->observe_inputs(request->inputs);
    auto outputs = primary.session->run(request->inputs, request->outputs);
    if (outputs) {
      primary_confidence = answer_confidence(*outputs);
      if (primary_confidence) primary.metrics->observe_confidence(*primary_confidence);
      const double min = service.config.min_confidence;
      if (!(min > 0 && service.fallback && service.fallback->session && primary_confidence &&
            *primary_confidence < min)) {
        primary.metrics->observe_latency(elapsed());
        json params = json::object();
        if (primary_confidence) params["confidence"] = *primary_confidence;
        outcome.confidence = primary_confidence;
        return answer(primary.ref, *request, *outputs, params);
      }
      reason = "confidence " + confidence_text(*primary_confidence) + " is under " +
               confidence_text(min);
      primary_answer = std::move(*outputs);
      parsed = std::move(*request);
    } else {
      primary.metrics->count_error();
      reason = "the primary failed: " + outputs.error().message;
      if (!service.fallback || !service.fallback->session) {
        primary.metrics->observe_latency(elapsed());
        outcome.outcome = "error";
        return protocol_error(500, outputs.error());
      }
      parsed = std::move(*request);
    }
    primary.metrics->count_fallback();
  } else {
    reason = "the primary is not loaded: " + primary.error;
  }

  if (!service.fallback || !service.fallback->session) {
    outcome.outcome = "error";
    return protocol_error(503, Error{Errc::kUnavailable, "no model can answer: " + reason, ""});
  }
  const Loaded& fb = *service.fallback;
  fb.metrics->count_request();
  const bool same_signature = parsed && fb.session->inputs() == primary.session->inputs() &&
                              fb.session->outputs() == primary.session->outputs();
  Result<InferRequest> request =
      same_signature ? Result<InferRequest>(std::move(*parsed))
                     : parse_infer_request(body, fb.session->inputs(), fb.session->outputs(),
                                           limits_, json_length);
  if (!request && !primary_answer.empty()) {
    // The primary answered, only under min_confidence, and the fallback takes other inputs:
    // the primary's answer stands.
    json params = {
        {"confidence", *primary_confidence},
        {"fallback_error", "the fallback cannot take this request: " + request.error().describe()}};
    outcome.confidence = primary_confidence;
    return answer(primary.ref, *parsed, primary_answer, params);
  }
  served_by = &fb;
  if (!request) {
    fb.metrics->count_invalid();
    outcome.outcome = "invalid";
    return protocol_error(400, request.error());
  }
  fb.metrics->observe_inputs(request->inputs);
  auto outputs = fb.session->run(request->inputs, request->outputs);
  if (!outputs) {
    fb.metrics->count_error();
    if (!primary_answer.empty()) {
      // The primary did answer, only with low confidence: better that than nothing.
      json params = {{"confidence", *primary_confidence},
                     {"fallback_error", outputs.error().message}};
      served_by = &primary;
      outcome.confidence = primary_confidence;
      return answer(primary.ref, *request, primary_answer, params);
    }
    outcome.outcome = "error";
    return protocol_error(500, outputs.error().with_context("the fallback failed"));
  }
  json params = {{"fallback", true}, {"fallback_reason", reason}};
  if (auto c = answer_confidence(*outputs)) {
    params["confidence"] = *c;
    fb.metrics->observe_confidence(*c);
    outcome.confidence = c;
  }
  outcome.outcome = "fallback";
  fb.metrics->observe_latency(elapsed());
  return answer(fb.ref, *request, *outputs, params);
}

std::optional<http::Response> ModelServer::handle(const http::Request& request) {
  std::string path = request.path;
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const bool get = request.method == "GET" || request.method == "HEAD";
  const bool post = request.method == "POST";
  auto wrong_method = [] {
    return protocol_error(405, Error{Errc::kInvalidArgument, "method not allowed here", ""});
  };

  if (path == "/v2") {
    if (!get) return wrong_method();
    json meta = {{"name", "outpost-agent"},
                 {"version", "0.1.0"},
                 {"extensions", json::array({"binary_tensor_data"})}};
    return http::Response::json(200, meta.dump());
  }
  if (path == "/v2/health/live") {
    if (!get) return wrong_method();
    return http::Response::json(200, R"({"live":true})");
  }
  if (path == "/v2/health/ready") {
    if (!get) return wrong_method();
    std::lock_guard lock(mu_);
    bool all = true;
    for (const auto& [name, svc] : services_) {
      all = all && (svc->primary.session || (svc->fallback && svc->fallback->session));
    }
    json body = {{"ready", all}, {"models", services_.size()}};
    return http::Response::json(all ? 200 : 503, body.dump());
  }

  // Split "<base>[/ready|/infer]".
  std::string base = path;
  std::string verb;
  if (ends_with(path, "/infer")) {
    base = path.substr(0, path.size() - 6);
    verb = "infer";
  } else if (ends_with(path, "/ready")) {
    base = path.substr(0, path.size() - 6);
    verb = "ready";
  }
  ServicePtr service;
  const std::string prefix = "/v2/models/";
  if (base.rfind(prefix, 0) == 0) {
    std::string rest = base.substr(prefix.size());
    std::string version;
    if (auto v = rest.find("/versions/"); v != std::string::npos) {
      version = rest.substr(v + 10);
      rest = rest.substr(0, v);
    }
    if (rest.empty() || rest.find('/') != std::string::npos) return std::nullopt;
    service = find_by_name(rest);
    if (!service) {
      return protocol_error(404,
                            Error{Errc::kNotFound, "no model '" + rest + "' is served here", ""});
    }
    if (!version.empty() && version != service->config.primary.version &&
        !(service->fallback && version == service->fallback->ref.version)) {
      return protocol_error(
          404, Error{Errc::kNotFound,
                     "model '" + rest + "' version " + version + " is not served here (serving " +
                         service->config.primary.version + ")",
                     ""});
    }
  } else {
    service = find_by_route(base);
    if (!service) return std::nullopt;
  }
  if (verb == "infer") {
    if (!post) return wrong_method();
    return infer(*service, request);
  }
  if (!get) return wrong_method();
  if (verb == "ready") return ready(*service);
  return metadata(*service);
}

json ModelServer::services(const std::string& base_url) const {
  std::vector<ServicePtr> list;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, svc] : services_) list.push_back(svc);
  }
  json out = json::array();
  for (const auto& svc : list) {
    auto model_json = [](const Loaded& l) {
      return json{{"model", l.ref.name},
                  {"version", l.ref.version},
                  {"loaded", l.session != nullptr},
                  {"error", l.error},
                  {"requests", l.metrics->requests()},
                  {"errors", l.metrics->errors()},
                  {"fallbacks", l.metrics->fallbacks()}};
    };
    const bool primary_ok = svc->primary.session != nullptr;
    const bool fallback_ok = svc->fallback && svc->fallback->session;
    json entry = {{"deployment", svc->config.deployment},
                  {"route", svc->config.route},
                  {"url", base_url + svc->config.route},
                  {"revision", svc->config.revision},
                  {"model", svc->config.primary.name},
                  {"version", svc->config.primary.version},
                  {"state", primary_ok    ? "ready"
                            : fallback_ok ? "degraded"
                                          : "unavailable"},
                  {"primary", model_json(svc->primary)},
                  {"fallback", svc->fallback ? model_json(*svc->fallback) : json(nullptr)},
                  {"min_confidence", svc->config.min_confidence}};
    const Loaded& answering = primary_ok || !svc->fallback ? svc->primary : *svc->fallback;
    if (answering.session) {
      entry["inputs"] = spec_list(answering.session->inputs());
      entry["outputs"] = spec_list(answering.session->outputs());
    }
    out.push_back(std::move(entry));
  }
  return out;
}

json ModelServer::metrics_json() const {
  std::lock_guard lock(mu_);
  json out = json::array();
  for (const auto& [key, m] : metrics_) out.push_back(m->to_json());
  return out;
}

std::vector<MetricsSnapshot> ModelServer::metrics_snapshots() const {
  std::vector<std::shared_ptr<ModelMetrics>> list;
  {
    std::lock_guard lock(mu_);
    for (const auto& [key, m] : metrics_) list.push_back(m);
  }
  std::vector<MetricsSnapshot> out;
  out.reserve(list.size());
  for (const auto& m : list) out.push_back(m->snapshot());
  return out;
}

std::string ModelServer::prometheus() const {
  std::vector<std::shared_ptr<ModelMetrics>> list;
  size_t served = 0;
  {
    std::lock_guard lock(mu_);
    for (const auto& [key, m] : metrics_) list.push_back(m);
    served = services_.size();
  }
  std::string out = prometheus_header();
  out +=
      "# HELP outpost_models_served Deployments with a model being served.\n"
      "# TYPE outpost_models_served gauge\n"
      "outpost_models_served " +
      std::to_string(served) + "\n";
  for (const auto& m : list) m->append_prometheus(out);
  return out;
}

}  // namespace outpost::agent::serve
