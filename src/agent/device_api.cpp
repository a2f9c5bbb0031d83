#include "agent/device_api.h"

#include <charconv>

namespace outpost::agent {

using json = nlohmann::json;

namespace {

HttpRequestOptions options_for(const ApiRequest& request, const std::atomic<bool>* cancel,
                               bool count_bytes) {
  HttpRequestOptions options;
  options.headers = request.headers;
  options.timeout_ms = request.timeout_ms;
  options.cancel = cancel;
  options.count_bytes = count_bytes;
  return options;
}

}  // namespace

Result<HttpResponse> send(HttpClient& client, const ApiRequest& request,
                          const std::atomic<bool>* cancel, bool count_bytes) {
  return client.request(request.method, request.path, request.body, request.content_type,
                        options_for(request, cancel, count_bytes));
}

Result<HttpResponse> send(UpstreamClient& client, const ApiRequest& request,
                          const std::atomic<bool>* cancel, bool count_bytes) {
  return client.request(request.method, request.path, request.body, request.content_type,
                        options_for(request, cancel, count_bytes));
}

UpstreamClient::UpstreamClient(Identity identity, bool with_credential)
    : identity_(std::move(identity)), with_credential_(with_credential) {}

Result<HttpResponse> UpstreamClient::request(const std::string& method, const std::string& path,
                                             const std::string& body,
                                             const std::string& content_type,
                                             const HttpRequestOptions& options) {
  const std::string url = identity_.url();
  if (!client_ || url != url_) {
    url_ = url;
    client_ = std::make_unique<HttpClient>(url_, with_credential_ ? identity_.credential : "",
                                           identity_.ca_file);
    if (with_credential_) client_->set_signer(identity_.signer);
  }
  auto resp = client_->request(method, path, body, content_type, options);
  const bool cancelled = options.cancel != nullptr && options.cancel->load();
  if (!cancelled && !resp && resp.error().code == Errc::kUnavailable) {
    identity_.failed(url_, resp.error().message);
  } else if (resp && worth_failover(static_cast<int>(resp->status))) {
    identity_.failed(url_, "HTTP " + std::to_string(resp->status));
  }
  return resp;
}

ApiRequest enroll_request(const EnrollRequest& request, const std::string& public_key_b64) {
  json body = {{"token", request.token},
               {"public_key", public_key_b64},
               {"labels", request.labels},
               {"facts", request.facts}};
  if (!request.site.empty()) body["site"] = request.site;
  ApiRequest out;
  out.method = "POST";
  out.path = "/api/v1/device/enroll";
  out.body = body.dump();
  return out;
}

Result<Identity> enroll_answer(const Result<HttpResponse>& response, const EnrollRequest& request,
                               const std::string& server_url) {
  if (!response) return make_error(response.error().with_context("enrolling"));
  if (response->status != 201 && response->status != 200) {
    Error error = error_from_response(*response);
    // A relay that cannot reach the control plane answers 503: not a refusal of the token.
    error.message = (error.code == Errc::kUnavailable
                         ? "enrollment through " + request.server + " could not complete: "
                         : "enrollment refused by " + request.server + ": ") +
                    error.message;
    return make_error(std::move(error));
  }
  auto doc = json::parse(response->body, nullptr, false);
  Identity id;
  id.server = server_url;
  id.ca_file = request.ca_file;
  try {
    id.device_id = doc.at("device_id").get<std::string>();
    id.credential = doc.at("credential").get<std::string>();
    id.server_public_key = doc.at("server_public_key").get<std::string>();
    id.site = doc.value("site", "");
    id.labels = doc.value("labels", std::map<std::string, std::string>{});
  } catch (const json::exception& e) {
    return make_error(Errc::kUnavailable,
                      "enrollment answer from " + request.server + " is malformed: " + e.what());
  }
  return id;
}

ApiRequest desired_request(int64_t known_generation, int64_t wait_s) {
  ApiRequest out;
  out.method = "GET";
  out.path = "/api/v1/device/desired?generation=" + std::to_string(known_generation) +
             "&wait=" + std::to_string(wait_s);
  out.content_type.clear();
  // The server may hold the poll for wait_s; give it room to answer before we give up.
  out.timeout_ms = (wait_s + 15) * 1000;
  return out;
}

SyncAnswer desired_answer(Result<HttpResponse> response, int64_t known_generation,
                          const Identity& identity) {
  SyncAnswer answer;
  if (!response) {
    answer.problem = response.error().message;
    return answer;
  }
  answer.link_up = true;
  if (response->status == 304) {
    answer.kind = SyncAnswer::Kind::kUnchanged;
    return answer;
  }
  if (response->status != 200) {
    answer.problem = error_from_response(*response).message;
    return answer;
  }
  int64_t announced = -1;
  const std::string& header = response->headers["x-outpost-generation"];
  if (auto [end, ec] = std::from_chars(header.data(), header.data() + header.size(), announced);
      ec != std::errc() || end != header.data() + header.size()) {
    announced = -1;
  }
  auto state = verify_desired(std::move(response->body), response->headers["x-outpost-signature"],
                              announced, identity);
  if (!state) {
    answer.problem = state.error().message;
    return answer;
  }
  if (state->generation <= known_generation) {
    answer.problem = "server sent generation " + std::to_string(state->generation) +
                     ", not newer than " + std::to_string(known_generation) + "; ignored";
    return answer;
  }
  answer.kind = SyncAnswer::Kind::kNew;
  answer.state = std::move(*state);
  return answer;
}

Delivery upload_delivery(const Result<HttpResponse>& response) {
  if (!response) return Delivery::kRetry;
  const long status = response->status;
  if (status >= 200 && status < 300) return Delivery::kDelivered;
  if (status >= 400 && status < 500 && status != 401 && status != 408 && status != 429) {
    return Delivery::kRefused;
  }
  return Delivery::kRetry;
}

json deployment_report_json(const DeploymentReport& r) {
  return {{"name", r.name},
          {"revision", r.revision},
          {"key", r.key},
          {"phase", r.phase},
          {"message", r.message},
          {"restarts", r.restarts},
          {"revision_restarts", r.revision_restarts},
          {"bytes_downloaded", r.bytes_downloaded},
          {"current_revision", r.current_revision ? json(*r.current_revision) : json(nullptr)},
          {"previous_revision", r.previous_revision ? json(*r.previous_revision) : json(nullptr)}};
}

StatusReportDraft draft_status_report(int64_t generation, int64_t at_ms,
                                      const std::string& agent_version,
                                      const std::vector<DeploymentReport>& deployments,
                                      const std::vector<std::string>& held) {
  json list = json::array();
  json changes = json::array();
  for (const auto& r : deployments) {
    list.push_back(deployment_report_json(r));
    changes.push_back({r.name, r.key, r.phase, r.restarts, r.revision_restarts,
                       r.current_revision ? json(*r.current_revision) : json(nullptr),
                       r.phase == "downloading" ? std::string() : r.message});
  }
  StatusReportDraft out;
  constexpr size_t kMaxHeld = 64;
  json artifacts = json::array();
  for (size_t i = 0; i < held.size() && i < kMaxHeld; ++i) artifacts.push_back(held[i]);
  out.signature = std::to_string(generation) + changes.dump();
  if (!artifacts.empty()) out.signature += artifacts.dump();
  out.report = {{"generation", generation},
                {"at", at_ms},
                {"agent_version", agent_version},
                {"deployments", std::move(list)}};
  if (!artifacts.empty()) out.report["artifacts"] = std::move(artifacts);
  return out;
}

bool report_due(const std::string& signature, const std::string& last_signature, bool periodic,
                bool queue_empty) {
  return signature != last_signature || (periodic && queue_empty);
}

ApiRequest status_request(std::string body) {
  ApiRequest out;
  out.method = "POST";
  out.path = "/api/v1/device/status";
  out.body = std::move(body);
  out.timeout_ms = 15'000;
  return out;
}

Result<TelemetryBody> telemetry_body(int64_t first_seq, int64_t last_seq,
                                     const outpost::telemetry::DropCounts& dropped,
                                     const std::vector<std::string>& record_texts) {
  TelemetryBody out;
  out.json = outpost::telemetry::batch_json(first_seq, last_seq, dropped, record_texts);
  // A minute's batch is small: the strongest level costs a few ms and saves ~8% on the link.
  // A backlog's big batches take a faster one.
  auto compressed = outpost::telemetry::compress(out.json, out.json.size() <= (64 << 10) ? 19 : 9);
  if (!compressed) return make_error(compressed.error());
  out.compressed = std::move(*compressed);
  return out;
}

ApiRequest telemetry_request(std::string compressed, int64_t timeout_ms) {
  ApiRequest out;
  out.method = "POST";
  out.path = "/api/v1/device/telemetry";
  out.body = std::move(compressed);
  out.headers.emplace_back("Content-Encoding", "zstd");
  out.timeout_ms = timeout_ms;
  return out;
}

Result<int64_t> telemetry_acked(const HttpResponse& response, int64_t first_seq, int64_t last_seq) {
  auto doc = json::parse(response.body, nullptr, false);
  int64_t acked = -1;
  if (doc.is_object() && doc.contains("acked") && doc["acked"].is_number_integer()) {
    acked = doc["acked"].get<int64_t>();
  }
  if (acked < first_seq) {
    return make_error(Errc::kUnavailable, "telemetry batch " + std::to_string(first_seq) + ".." +
                                              std::to_string(last_seq) +
                                              ": the server acknowledged only up to " +
                                              std::to_string(acked));
  }
  return acked;
}

}  // namespace outpost::agent
