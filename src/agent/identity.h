// Who this device is to the control plane: its Ed25519 key pair, its device id and credential,
// and where the server is. Made once at enrollment, then read from the data directory.
#pragma once

#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "agent/server_list.h"
#include "common/crypto.h"
#include "common/error.h"
#include "common/request_signature.h"

namespace outpost::agent {

struct Identity {
  // Control plane URL, e.g. "http://10.0.0.5:7400", or several ("URL1,URL2": replicas of one
  // control plane), as identity.json keeps it.
  std::string server;
  std::string device_id;
  std::string credential;         // "<device id>.<secret>", sent as a Bearer token
  std::string server_public_key;  // base64 Ed25519 key that signs desired states
  std::string site;
  std::map<std::string, std::string> labels;
  std::string ca_file;  // PEM bundle to trust for HTTPS (empty = system CAs)
  // Signs every request with the device key (DIR/device.key); shared by the agent's clients
  // so they share the learnt offset to the server's clock.
  std::shared_ptr<reqsig::Signer> signer;
  // `server` parsed, with the one in use now; shared by every copy of this identity, so all the
  // agent's clients fail over together. Null in identities made by hand (tests): then `server`.
  std::shared_ptr<ServerList> servers;

  // The URL to send the next request to.
  std::string url() const { return servers ? servers->current() : server; }
  // A request to `used` failed in a way another server might not (see worth_failover).
  void failed(const std::string& used, const std::string& why) const {
    if (servers) servers->failed(used, why);
  }
};

struct EnrollRequest {
  std::string server;
  std::string token;
  std::string site;  // empty: the token's site
  std::map<std::string, std::string> labels;
  nlohmann::json facts = nlohmann::json::object();
  std::string ca_file;
  // "sha256:<hex>" from `outpost token create`: the CA is fetched from the server, checked
  // against the pin, and kept as DIR/ca.pem (then used like ca_file).
  std::string ca_pin;
};

// DIR/identity.json (0600) and DIR/device.key (0600). kNotFound when not enrolled yet.
[[nodiscard]] Result<Identity> load_identity(const std::string& data_dir);

// A later start with --server: replaces the URLs identity.json keeps (replicas added or
// moved); the server's key stays pinned, so only the same control plane is trusted.
[[nodiscard]] Status update_servers(const std::string& data_dir, Identity& identity,
                                    const std::string& servers);

// First start: makes (or reuses, after a crash between the two steps) the key pair in DIR,
// enrolls with the server and persists the identity. A refused enrollment (bad, expired or
// used-up token) comes back with the server's reason; nothing is persisted then but the key.
[[nodiscard]] Result<Identity> enroll(const std::string& data_dir, const EnrollRequest& request);

// The device's Ed25519 key pair (DIR/device.key): opens the secrets sealed to it. kNotFound when
// it was never made.
[[nodiscard]] Result<crypto::Ed25519KeyPair> load_device_key(const std::string& data_dir);

// Parses "k=v" labels; kInvalidArgument naming the bad one.
[[nodiscard]] Result<std::map<std::string, std::string>> parse_labels(
    const std::vector<std::string>& pairs);

}  // namespace outpost::agent
