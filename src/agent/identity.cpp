#include "agent/identity.h"

#include <sys/stat.h>

#include "agent/device_api.h"
#include "common/crypto.h"
#include "common/durable_file.h"
#include "common/http_client.h"
#include "common/tls_certs.h"

namespace outpost::agent {
namespace {

using json = nlohmann::json;

std::string identity_path(const std::string& dir) { return dir + "/identity.json"; }
std::string key_path(const std::string& dir) { return dir + "/device.key"; }

// The key pair as {"public_key","secret_key"} in base64; made once, kept forever.
Result<crypto::Ed25519KeyPair> load_or_make_key(const std::string& dir) {
  auto text = read_file(key_path(dir));
  if (text) {
    auto doc = json::parse(*text, nullptr, false);
    if (doc.is_object() && doc.value("public_key", "") != "" && doc.value("secret_key", "") != "") {
      auto pub = crypto::base64_decode(doc["public_key"].get<std::string>());
      auto sec = crypto::base64_decode(doc["secret_key"].get<std::string>());
      if (pub && sec && pub->size() == 32 && sec->size() == 64) {
        return crypto::Ed25519KeyPair{*pub, *sec};
      }
    }
    return make_error(Errc::kIo, key_path(dir) + ": not a valid device key file");
  }
  if (text.error().code != Errc::kNotFound) return make_error(text.error());
  crypto::Ed25519KeyPair pair = crypto::ed25519_generate();
  json doc = {{"public_key", crypto::base64_encode(pair.public_key)},
              {"secret_key", crypto::base64_encode(pair.secret_key)}};
  OUTPOST_TRY(write_file_durably(key_path(dir), doc.dump(), 0600));
  return pair;
}

Status save_identity(const std::string& dir, const Identity& id) {
  json doc = {{"server", id.server},
              {"device_id", id.device_id},
              {"credential", id.credential},
              {"server_public_key", id.server_public_key},
              {"site", id.site},
              {"labels", id.labels},
              {"ca_file", id.ca_file}};
  return write_file_durably(identity_path(dir), doc.dump(2) + "\n", 0600);
}

}  // namespace

Result<crypto::Ed25519KeyPair> load_device_key(const std::string& data_dir) {
  if (auto text = read_file(key_path(data_dir)); !text) return make_error(text.error());
  return load_or_make_key(data_dir);
}

Result<Identity> load_identity(const std::string& data_dir) {
  auto text = read_file(identity_path(data_dir));
  if (!text) return make_error(text.error());
  auto doc = json::parse(*text, nullptr, false);
  auto bad = [&](const std::string& what) {
    return make_error(Errc::kIo, identity_path(data_dir) + ": " + what);
  };
  if (!doc.is_object()) return bad("not a JSON object");
  Identity id;
  try {
    id.server = doc.at("server").get<std::string>();
    id.device_id = doc.at("device_id").get<std::string>();
    id.credential = doc.at("credential").get<std::string>();
    id.server_public_key = doc.at("server_public_key").get<std::string>();
    id.site = doc.value("site", "");
    id.labels = doc.value("labels", std::map<std::string, std::string>{});
    id.ca_file = doc.value("ca_file", "");
  } catch (const json::exception& e) {
    return bad(std::string("missing or wrong field: ") + e.what());
  }
  if (id.server.empty() || id.device_id.empty() || id.credential.empty()) {
    return bad("server, device_id and credential must not be empty");
  }
  auto urls = ServerList::parse(id.server);
  if (!urls) return bad(urls.error().message);
  id.servers = std::make_shared<ServerList>(std::move(*urls));
  auto key = load_or_make_key(data_dir);
  if (!key) return make_error(key.error());
  id.signer = std::make_shared<reqsig::Signer>(id.device_id, key->secret_key);
  return id;
}

Status update_servers(const std::string& data_dir, Identity& identity, const std::string& servers) {
  auto urls = ServerList::parse(servers);
  if (!urls) return make_error(urls.error());
  auto list = std::make_shared<ServerList>(std::move(*urls));
  if (list->joined() == identity.server) return ok();
  Identity updated = identity;
  updated.server = list->joined();
  OUTPOST_TRY(save_identity(data_dir, updated));
  identity.server = updated.server;
  identity.servers = std::move(list);
  return ok();
}

namespace {

// Fetches the server's CA without trusting the connection, keeps it only when it matches the
// pin the operator handed out with the token, and returns where it was written.
Result<std::string> fetch_pinned_ca(const std::string& data_dir, const EnrollRequest& request) {
  if (request.ca_pin.rfind("sha256:", 0) != 0 || request.ca_pin.size() != 7 + 64) {
    return make_error(Errc::kInvalidArgument,
                      "--ca-pin: expected sha256:<64 hex> as `outpost token create` prints it, "
                      "got \"" +
                          request.ca_pin + "\"",
                      "ca-pin");
  }
  HttpClient client(request.server, "");
  HttpRequestOptions options;
  options.insecure_skip_verify = true;  // what it answers is checked against the pin below
  auto answer = client.request("GET", "/api/v1/device/ca", {}, {}, options);
  if (!answer) return make_error(answer.error().with_context("fetching the server's CA"));
  if (answer->status != 200) {
    return make_error(error_from_response(*answer).with_context("fetching the server's CA"));
  }
  auto fingerprint = tls::cert_fingerprint(answer->body);
  if (!fingerprint) {
    return make_error(
        fingerprint.error().with_context("the CA the server at " + request.server + " handed out"));
  }
  if (*fingerprint != request.ca_pin) {
    return make_error(Errc::kPermissionDenied,
                      "the CA the server at " + request.server + " handed out is " + *fingerprint +
                          ", not the pinned " + request.ca_pin +
                          ": refusing to enroll (wrong server, or someone in between)",
                      "ca-pin");
  }
  const std::string path = data_dir + "/ca.pem";
  OUTPOST_TRY(write_file_durably(path, answer->body, 0644));
  return path;
}

}  // namespace

Result<Identity> enroll(const std::string& data_dir, const EnrollRequest& request) {
  OUTPOST_TRY(make_dirs(data_dir, 0700));
  auto key = load_or_make_key(data_dir);
  if (!key) return make_error(key.error());
  auto urls = ServerList::parse(request.server);
  if (!urls) return make_error(urls.error());
  EnrollRequest pinned = request;
  if (!request.ca_pin.empty()) {
    if (!request.ca_file.empty()) {
      return make_error(Errc::kInvalidArgument, "give --ca-file or --ca-pin, not both", "ca-pin");
    }
    Result<std::string> ca = make_error(Errc::kUnavailable, "no server to fetch the CA from");
    for (const auto& url : *urls) {
      EnrollRequest one = request;
      one.server = url;
      ca = fetch_pinned_ca(data_dir, one);
      if (ca || ca.error().code != Errc::kUnavailable) break;
    }
    if (!ca) return make_error(ca.error());
    pinned.ca_file = *ca;
  }
  // Each URL in turn until one answers: the others are replicas of the same control plane.
  Result<Identity> id = make_error(Errc::kUnavailable, "no server to enroll with");
  for (const auto& url : *urls) {
    EnrollRequest one = pinned;
    one.server = url;
    HttpClient client(url, "", pinned.ca_file);
    id = enroll_answer(send(client, enroll_request(one, crypto::base64_encode(key->public_key))),
                       one, url);
    if (id || id.error().code != Errc::kUnavailable) break;
  }
  if (!id) return make_error(id.error());
  auto list = std::make_shared<ServerList>(std::move(*urls));
  id->server = list->joined();
  id->servers = std::move(list);
  OUTPOST_TRY(save_identity(data_dir, *id));
  id->signer = std::make_shared<reqsig::Signer>(id->device_id, key->secret_key);
  return id;
}

Result<std::map<std::string, std::string>> parse_labels(const std::vector<std::string>& pairs) {
  std::map<std::string, std::string> out;
  for (const auto& pair : pairs) {
    auto eq = pair.find('=');
    if (eq == std::string::npos || eq == 0) {
      return make_error(Errc::kInvalidArgument,
                        "--label: expected k=v like accelerator=gpu, got \"" + pair + "\"",
                        "label");
    }
    out[pair.substr(0, eq)] = pair.substr(eq + 1);
  }
  return out;
}

}  // namespace outpost::agent
