#include "agent/sync/desired_sync.h"

#include <algorithm>
#include <cctype>
#include <random>

#include <spdlog/spdlog.h>

#include "agent/device_api.h"
#include "common/crypto.h"
#include "common/durable_file.h"
#include "common/http_client.h"

namespace outpost::agent {
namespace {

using json = nlohmann::json;

std::string desired_path(const std::string& dir) { return dir + "/desired.json"; }

// Deployment names as the server allows them; never "..", never a path.
bool is_safe_name(const std::string& name) {
  if (name.empty() || name.size() > 128 || name.front() == '.') return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

}  // namespace

Result<DesiredState> verify_desired(std::string body, std::string signature, int64_t generation,
                                    const Identity& identity) {
  auto key = crypto::base64_decode(identity.server_public_key);
  auto sig = crypto::base64_decode(signature);
  if (!key || key->size() != 32) {
    return make_error(Errc::kInvalidArgument, "the server public key in identity.json is invalid");
  }
  if (!sig || !crypto::ed25519_verify(body, *sig, *key)) {
    return make_error(Errc::kPermissionDenied,
                      "desired state generation " + std::to_string(generation) +
                          ": signature does not verify with the server's key; ignored");
  }
  DesiredState state;
  state.doc = json::parse(body, nullptr, false);
  if (!state.doc.is_object() || !state.doc.contains("generation") ||
      !state.doc["generation"].is_number_integer() || !state.doc.contains("deployments") ||
      !state.doc["deployments"].is_array()) {
    return make_error(Errc::kInvalidArgument, "desired state: signed but not a valid document");
  }
  if (state.doc["generation"].get<int64_t>() != generation) {
    return make_error(Errc::kInvalidArgument,
                      "desired state: body generation " + state.doc["generation"].dump() +
                          " does not match the announced " + std::to_string(generation));
  }
  if (!state.doc.contains("device") || !state.doc["device"].is_string() ||
      state.doc["device"].get<std::string>() != identity.device_id) {
    return make_error(Errc::kPermissionDenied,
                      "desired state: made for device " +
                          (state.doc.contains("device") ? state.doc["device"].dump() : "(none)") +
                          ", this is " + identity.device_id);
  }
  // Signed by our server, but still checked: names become directory names, and a malformed
  // entry must be refused here rather than trip the agent on every restart.
  for (const auto& entry : state.doc["deployments"]) {
    const json* name = entry.is_object() && entry.contains("name") ? &entry["name"] : nullptr;
    if (name == nullptr || !name->is_string() || !is_safe_name(name->get<std::string>()) ||
        !entry.contains("revision") || !entry["revision"].is_number_integer()) {
      return make_error(Errc::kInvalidArgument,
                        "desired state: a deployment entry without a valid name and revision: " +
                            entry.dump().substr(0, 200));
    }
    for (const auto& section : {"model", "workload", "serve"}) {
      if (entry.contains(section) && !entry[section].is_object()) {
        return make_error(Errc::kInvalidArgument, "desired state: deployment " +
                                                      name->get<std::string>() + ": " + section +
                                                      " is not an object");
      }
    }
  }
  state.generation = generation;
  state.body = std::move(body);
  state.signature = std::move(signature);
  return state;
}

Status persist_desired(const std::string& data_dir, const DesiredState& state) {
  json doc = {
      {"generation", state.generation}, {"signature", state.signature}, {"body", state.body}};
  return write_file_durably(desired_path(data_dir), doc.dump());
}

Result<std::optional<DesiredState>> load_desired(const std::string& data_dir,
                                                 const Identity& identity) {
  auto text = read_file(desired_path(data_dir));
  if (!text) {
    if (text.error().code == Errc::kNotFound) return std::optional<DesiredState>();
    return make_error(text.error());
  }
  auto doc = json::parse(*text, nullptr, false);
  if (!doc.is_object() || !doc.contains("body") || !doc["body"].is_string() ||
      !doc.contains("signature") || !doc["signature"].is_string() || !doc.contains("generation") ||
      !doc["generation"].is_number_integer()) {
    return make_error(Errc::kIo, desired_path(data_dir) + ": not a saved desired state");
  }
  auto state = verify_desired(doc["body"].get<std::string>(), doc["signature"].get<std::string>(),
                              doc["generation"].get<int64_t>(), identity);
  if (!state) return make_error(state.error().with_context(desired_path(data_dir)));
  return std::optional<DesiredState>(std::move(*state));
}

int64_t Backoff::capped_ms(int attempt, int64_t initial_ms, int64_t max_ms) {
  int64_t delay = initial_ms;
  for (int i = 0; i < attempt && delay < max_ms; ++i) delay *= 2;
  return std::min(delay, max_ms);
}

int64_t Backoff::delay_for(int attempt) const {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::uniform_real_distribution<double> jitter(0.8, 1.2);
  return static_cast<int64_t>(static_cast<double>(capped_ms(attempt, initial_ms_, max_ms_)) *
                              jitter(rng));
}

int64_t Backoff::next_ms() { return delay_for(attempt_++); }

DesiredSync::DesiredSync(std::string data_dir, Identity identity, int64_t known_generation,
                         Options options, std::function<void(const DesiredState&)> on_desired,
                         std::function<void(bool, const std::string&)> on_link)
    : data_dir_(std::move(data_dir)),
      identity_(std::move(identity)),
      generation_(known_generation),
      options_(options),
      on_desired_(std::move(on_desired)),
      on_link_(std::move(on_link)) {}

DesiredSync::~DesiredSync() { stop(); }

void DesiredSync::start() {
  thread_ = std::thread([this] { run(); });
}

void DesiredSync::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool DesiredSync::sleep_for(int64_t ms) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, std::chrono::milliseconds(ms), [this] { return stopping_.load(); });
  return !stopping_;
}

void DesiredSync::run() {
  UpstreamClient client(identity_);
  Backoff backoff(options_.backoff_initial_ms, options_.backoff_max_ms);
  while (!stopping_) {
    SyncAnswer answer =
        desired_answer(send(client, desired_request(generation_, options_.wait_s), &stopping_),
                       generation_, identity_);
    if (stopping_) break;
    std::string problem = answer.problem;
    if (answer.kind == SyncAnswer::Kind::kUnchanged) {
      backoff.reset();
      on_link_(true, {});
      continue;
    }
    if (answer.kind == SyncAnswer::Kind::kNew) {
      if (auto saved = persist_desired(data_dir_, *answer.state); !saved) {
        problem = "cannot save the desired state: " + saved.error().message;
      } else {
        generation_ = answer.state->generation;
        backoff.reset();
        on_link_(true, {});
        on_desired_(*answer.state);
        continue;
      }
    }
    on_link_(false, problem);
    int64_t delay = backoff.next_ms();
    spdlog::warn("sync: {} (retrying in {} ms)", problem, delay);
    if (!sleep_for(delay)) break;
  }
}

}  // namespace outpost::agent
