#include "common/tls_certs.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>

#include "common/digest.h"

namespace outpost::tls {
namespace {

struct Free {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
  void operator()(X509* p) const { X509_free(p); }
  void operator()(BIO* p) const { BIO_free(p); }
  void operator()(X509_EXTENSION* p) const { X509_EXTENSION_free(p); }
};
using Key = std::unique_ptr<EVP_PKEY, Free>;
using Cert = std::unique_ptr<X509, Free>;
using Bio = std::unique_ptr<BIO, Free>;

Error openssl_error(const std::string& what) {
  std::string detail;
  if (unsigned long code = ERR_get_error(); code != 0) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof buf);
    detail = std::string(": ") + buf;
  }
  ERR_clear_error();
  return Error{Errc::kInternal, what + detail, {}};
}

bool is_ip_literal(const std::string& name) {
  ASN1_OCTET_STRING* ip = a2i_IPADDRESS(name.c_str());
  if (ip == nullptr) return false;
  ASN1_OCTET_STRING_free(ip);
  return true;
}

Result<Key> new_key() {
  Key key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (!key) return make_error(openssl_error("generating an EC P-256 key"));
  return key;
}

// The PEM text `write` puts into a memory BIO; `what` names it in errors.
template <class Write>
Result<std::string> pem_text(const char* what, Write write) {
  Bio bio(BIO_new(BIO_s_mem()));
  if (!bio || write(bio.get()) != 1) return make_error(openssl_error(what));
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

Result<std::string> key_pem(EVP_PKEY* key) {
  return pem_text("encoding a private key", [key](BIO* bio) {
    return PEM_write_bio_PrivateKey(bio, key, nullptr, nullptr, 0, nullptr, nullptr);
  });
}

Result<std::string> cert_pem(X509* cert) {
  return pem_text("encoding a certificate",
                  [cert](BIO* bio) { return PEM_write_bio_X509(bio, cert); });
}

Result<Cert> read_cert(const std::string& pem) {
  Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Cert cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!cert) {
    ERR_clear_error();
    return make_error(Errc::kInvalidArgument, "not a PEM certificate");
  }
  return cert;
}

Result<Key> read_key(const std::string& pem) {
  Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Key key(bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!key) {
    ERR_clear_error();
    return make_error(Errc::kInvalidArgument, "not a PEM private key");
  }
  return key;
}

Status add_extension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  std::unique_ptr<X509_EXTENSION, Free> ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1) {
    return make_error(openssl_error("adding the certificate extension " + value));
  }
  return ok();
}

// A certificate for `key` named `common_name`, valid from an hour ago (clock skew) for `days`.
Result<Cert> new_cert(EVP_PKEY* key, const std::string& common_name, int days) {
  Cert cert(X509_new());
  if (!cert) return make_error(openssl_error("allocating a certificate"));
  X509_set_version(cert.get(), 2);
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) return make_error(openssl_error("random serial"));
  serial[0] &= 0x7f;  // positive
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), static_cast<long>(days) * 24 * 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>("Outpost"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                             0);
  return cert;
}

}  // namespace

Result<KeyAndCert> make_ca(const std::string& common_name, int days) {
  auto key = new_key();
  if (!key) return make_error(key.error());
  auto cert = new_cert(key->get(), common_name, days);
  if (!cert) return make_error(cert.error());
  X509_set_issuer_name(cert->get(), X509_get_subject_name(cert->get()));
  OUTPOST_TRY(add_extension(cert->get(), cert->get(), NID_basic_constraints, "critical,CA:TRUE"));
  OUTPOST_TRY(
      add_extension(cert->get(), cert->get(), NID_key_usage, "critical,keyCertSign,cRLSign"));
  OUTPOST_TRY(add_extension(cert->get(), cert->get(), NID_subject_key_identifier, "hash"));
  if (X509_sign(cert->get(), key->get(), EVP_sha256()) == 0)
    return make_error(openssl_error("signing the CA certificate"));
  auto kp = key_pem(key->get());
  auto cp = cert_pem(cert->get());
  if (!kp) return make_error(kp.error());
  if (!cp) return make_error(cp.error());
  return KeyAndCert{*kp, *cp};
}

Result<KeyAndCert> issue_server_cert(const KeyAndCert& ca, const std::vector<std::string>& names,
                                     int days) {
  if (names.empty()) return make_error(Errc::kInvalidArgument, "a server certificate needs a name");
  auto ca_key = read_key(ca.key_pem);
  if (!ca_key) return make_error(ca_key.error().with_context("the CA key"));
  auto ca_cert = read_cert(ca.cert_pem);
  if (!ca_cert) return make_error(ca_cert.error().with_context("the CA certificate"));
  auto key = new_key();
  if (!key) return make_error(key.error());
  auto cert = new_cert(key->get(), names.front(), days);
  if (!cert) return make_error(cert.error());
  X509_set_issuer_name(cert->get(), X509_get_subject_name(ca_cert->get()));
  std::string san;
  for (const auto& n : names) {
    san += (san.empty() ? "" : ",") + std::string(is_ip_literal(n) ? "IP:" : "DNS:") + n;
  }
  OUTPOST_TRY(
      add_extension(cert->get(), ca_cert->get(), NID_basic_constraints, "critical,CA:FALSE"));
  OUTPOST_TRY(add_extension(cert->get(), ca_cert->get(), NID_key_usage,
                            "critical,digitalSignature,keyEncipherment"));
  OUTPOST_TRY(add_extension(cert->get(), ca_cert->get(), NID_ext_key_usage, "serverAuth"));
  OUTPOST_TRY(add_extension(cert->get(), ca_cert->get(), NID_subject_alt_name, san));
  OUTPOST_TRY(add_extension(cert->get(), ca_cert->get(), NID_authority_key_identifier, "keyid"));
  if (X509_sign(cert->get(), ca_key->get(), EVP_sha256()) == 0)
    return make_error(openssl_error("signing the server certificate"));
  auto kp = key_pem(key->get());
  auto cp = cert_pem(cert->get());
  if (!kp) return make_error(kp.error());
  if (!cp) return make_error(cp.error());
  return KeyAndCert{*kp, *cp};
}

Result<std::vector<std::string>> names_not_covered(const std::string& pem,
                                                   const std::vector<std::string>& names) {
  auto cert = read_cert(pem);
  if (!cert) return make_error(cert.error());
  std::vector<std::string> missing;
  for (const auto& n : names) {
    int covered = is_ip_literal(n) ? X509_check_ip_asc(cert->get(), n.c_str(), 0)
                                   : X509_check_host(cert->get(), n.c_str(), n.size(), 0, nullptr);
    if (covered != 1) missing.push_back(n);
  }
  return missing;
}

bool key_matches_cert(const std::string& cert_pem, const std::string& key_pem) {
  auto cert = read_cert(cert_pem);
  auto key = read_key(key_pem);
  if (!cert || !key) return false;
  const bool match = X509_check_private_key(cert->get(), key->get()) == 1;
  ERR_clear_error();
  return match;
}

Result<int64_t> seconds_to_expiry(const std::string& pem) {
  auto cert = read_cert(pem);
  if (!cert) return make_error(cert.error());
  int days = 0;
  int secs = 0;
  if (ASN1_TIME_diff(&days, &secs, nullptr, X509_get0_notAfter(cert->get())) != 1) {
    return make_error(openssl_error("reading the certificate's expiry"));
  }
  return static_cast<int64_t>(days) * 86400 + secs;
}

Result<std::string> cert_fingerprint(const std::string& pem) {
  auto cert = read_cert(pem);
  if (!cert) return make_error(cert.error());
  unsigned char* der = nullptr;
  int n = i2d_X509(cert->get(), &der);
  if (n <= 0) return make_error(openssl_error("encoding the certificate"));
  std::string bytes(reinterpret_cast<char*>(der), static_cast<size_t>(n));
  OPENSSL_free(der);
  return "sha256:" + sha256_hex(bytes);
}

}  // namespace outpost::tls
