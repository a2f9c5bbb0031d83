#include "server/tls_setup.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "common/durable_file.h"
#include "common/tls_certs.h"

namespace outpost::server {
namespace {

constexpr int kCaDays = 3650;
constexpr int kServerDays = 397;
constexpr int64_t kRenewBeforeS = 30LL * 86400;

void add_name(std::vector<std::string>& names, const std::string& name) {
  if (name.empty() || std::find(names.begin(), names.end(), name) != names.end()) return;
  names.push_back(name);
}

Result<std::string> read_optional(const std::string& path) {
  auto text = read_file(path);
  if (text) return *text;
  if (text.error().code == Errc::kNotFound) return std::string();
  return make_error(text.error());
}

}  // namespace

std::vector<std::string> local_names(const std::string& listen_host) {
  std::vector<std::string> names = {"localhost", "127.0.0.1", "::1"};
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) == 0) add_name(names, host);
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) == 0) {
    for (ifaddrs* it = list; it != nullptr; it = it->ifa_next) {
      if (it->ifa_addr == nullptr || (it->ifa_flags & IFF_UP) == 0) continue;
      char text[INET6_ADDRSTRLEN] = {};
      if (it->ifa_addr->sa_family == AF_INET) {
        auto* a = reinterpret_cast<sockaddr_in*>(it->ifa_addr);
        ::inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
      } else if (it->ifa_addr->sa_family == AF_INET6) {
        auto* a = reinterpret_cast<sockaddr_in6*>(it->ifa_addr);
        if (IN6_IS_ADDR_LINKLOCAL(&a->sin6_addr)) continue;  // needs a zone; not dialled
        ::inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text);
      }
      add_name(names, text);
    }
    ::freeifaddrs(list);
  }
  if (listen_host != "0.0.0.0" && listen_host != "::" && listen_host != "[::]") {
    add_name(names, listen_host);
  }
  return names;
}

Result<TlsSetup> prepare_tls(const TlsOptions& options, const std::string& data_dir,
                             const std::string& listen_host) {
  TlsSetup setup;
  const bool given = !options.cert_file.empty() || !options.key_file.empty();
  if (options.insecure_http) {
    if (given) {
      return make_error(
          Errc::kInvalidArgument,
          "--insecure-http and --tls-cert/--tls-key contradict each other: choose one",
          "insecure-http");
    }
    return setup;
  }
  setup.enabled = true;
  if (given) {
    if (options.cert_file.empty() || options.key_file.empty()) {
      return make_error(Errc::kInvalidArgument, "HTTPS needs both --tls-cert and --tls-key",
                        options.cert_file.empty() ? "tls-cert" : "tls-key");
    }
    setup.cert_file = options.cert_file;
    setup.key_file = options.key_file;
    if (!options.ca_file.empty()) {
      auto pem = read_file(options.ca_file);
      if (!pem) return make_error(pem.error().with_context("--tls-ca"));
      auto pin = tls::cert_fingerprint(*pem);
      if (!pin) return make_error(pin.error().with_context("--tls-ca " + options.ca_file));
      setup.ca_pem = *pem;
      setup.ca_pin = *pin;
    }
    return setup;
  }

  // The development CA.
  const std::string dir = data_dir + "/tls";
  OUTPOST_TRY(make_dirs(dir, 0700));
  tls::KeyAndCert ca;
  auto ca_key = read_optional(dir + "/ca.key");
  auto ca_cert = read_optional(dir + "/ca.pem");
  if (!ca_key) return make_error(ca_key.error());
  if (!ca_cert) return make_error(ca_cert.error());
  if (ca_key->empty() || ca_cert->empty()) {
    auto made = tls::make_ca("Outpost development CA", kCaDays);
    if (!made) return make_error(made.error());
    // Key first: a crash between the two leaves a key without a certificate, which the next
    // start replaces, never a certificate whose key is lost.
    OUTPOST_TRY(write_file_durably(dir + "/ca.key", made->key_pem, 0600));
    OUTPOST_TRY(write_file_durably(dir + "/ca.pem", made->cert_pem, 0644));
    ca = *made;
    spdlog::info("made a development CA in {}/ca.pem", dir);
  } else {
    ca = tls::KeyAndCert{*ca_key, *ca_cert};
  }

  std::vector<std::string> names = local_names(listen_host);
  for (const auto& n : options.names) add_name(names, n);
  auto cert = read_optional(dir + "/server.pem");
  auto key = read_optional(dir + "/server.key");
  if (!cert) return make_error(cert.error());
  if (!key) return make_error(key.error());
  bool issue = cert->empty() || key->empty();
  if (!issue) {
    auto missing = tls::names_not_covered(*cert, names);
    auto left = tls::seconds_to_expiry(*cert);
    issue = !missing || !missing->empty() || !left || *left < kRenewBeforeS ||
            !tls::key_matches_cert(*cert, *key);  // a crash between the two renames below
    if (issue && missing && !missing->empty()) {
      spdlog::info("server certificate does not cover {}; issuing a new one", missing->front());
    }
  }
  if (issue) {
    auto made = tls::issue_server_cert(ca, names, kServerDays);
    if (!made) return make_error(made.error());
    OUTPOST_TRY(write_file_durably(dir + "/server.key.new", made->key_pem, 0600));
    OUTPOST_TRY(write_file_durably(dir + "/server.pem.new", made->cert_pem, 0644));
    OUTPOST_TRY(rename_durably(dir + "/server.key.new", dir + "/server.key"));
    OUTPOST_TRY(rename_durably(dir + "/server.pem.new", dir + "/server.pem"));
  }
  auto pin = tls::cert_fingerprint(ca.cert_pem);
  if (!pin) return make_error(pin.error().with_context(dir + "/ca.pem"));
  setup.cert_file = dir + "/server.pem";
  setup.key_file = dir + "/server.key";
  setup.ca_pem = ca.cert_pem;
  setup.ca_pin = *pin;
  setup.generated = true;
  return setup;
}

}  // namespace outpost::server
