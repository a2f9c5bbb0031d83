// X.509 certificates for HTTPS: the control plane's self-signed development CA and the
// server certificate it issues (OpenSSL; EC P-256 keys), and the CA fingerprint that an
// enrollment token carries as its pin.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"

namespace outpost::tls {

struct KeyAndCert {
  std::string key_pem;   // PKCS#8 private key
  std::string cert_pem;  // one certificate
};

// A self-signed CA certificate (CA:TRUE, keyCertSign) valid for `days`.
[[nodiscard]] Result<KeyAndCert> make_ca(const std::string& common_name, int days);

// A server certificate signed by `ca` for `names` (DNS names and IP literals, all in the
// subjectAltName; the first is also the common name), valid for `days`.
[[nodiscard]] Result<KeyAndCert> issue_server_cert(const KeyAndCert& ca,
                                                   const std::vector<std::string>& names, int days);

// The names among `names` that the certificate does not cover (IP literals are matched as
// addresses, the rest as host names).
[[nodiscard]] Result<std::vector<std::string>> names_not_covered(
    const std::string& cert_pem, const std::vector<std::string>& names);

// Whether `key_pem` is the private key of the certificate in `cert_pem`.
[[nodiscard]] bool key_matches_cert(const std::string& cert_pem, const std::string& key_pem);

// Seconds until the certificate expires (negative once it has).
[[nodiscard]] Result<int64_t> seconds_to_expiry(const std::string& cert_pem);

// "sha256:<hex>" of the DER encoding of the first certificate in `pem` (what
// `openssl x509 -outform der | sha256sum` prints), used as a CA pin.
[[nodiscard]] Result<std::string> cert_fingerprint(const std::string& pem);

}  // namespace outpost::tls
