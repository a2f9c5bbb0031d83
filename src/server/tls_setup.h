// HTTPS for the control plane: the operator's certificate and key, or on first start a
// self-signed development CA and a server certificate for this machine's names under
// DATA/tls/, so a plant can try Outpost over TLS without a PKI. Plain HTTP only when asked.
#pragma once

#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::server {

struct TlsOptions {
  std::string cert_file;           // --tls-cert: PEM chain (with --tls-key)
  std::string key_file;            // --tls-key
  std::string ca_file;             // --tls-ca: the CA devices should pin (optional)
  std::vector<std::string> names;  // --tls-san: more names for the development certificate
  bool insecure_http = false;      // --insecure-http
};

struct TlsSetup {
  bool enabled = false;
  std::string cert_file;
  std::string key_file;
  std::string ca_pem;      // handed to devices (GET /api/v1/device/ca); "" when not known
  std::string ca_pin;      // "sha256:<hex>" of ca_pem's DER; "" when not known
  bool generated = false;  // the development CA under DATA/tls/ is in use
};

// Resolves the options above. With neither a certificate nor --insecure-http, makes (or
// reuses) DATA/tls/ca.{key,pem} and DATA/tls/server.{key,pem}; the server certificate is
// issued again when it does not cover this machine's names and `extra_names` or has under
// 30 days left. Keys are written 0600, durably.
[[nodiscard]] Result<TlsSetup> prepare_tls(const TlsOptions& options, const std::string& data_dir,
                                           const std::string& listen_host);

// The names a development certificate covers: localhost, 127.0.0.1, ::1, the host name,
// every address of this machine's interfaces, and the listen host when it is specific.
std::vector<std::string> local_names(const std::string& listen_host);

}  // namespace outpost::server
