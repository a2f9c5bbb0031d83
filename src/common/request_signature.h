// Device request signatures: every call a device makes proves it holds its Ed25519 key, so a
// bearer credential copied off the wire or a disk is not enough to act as the device.
//
// Header:  X-Outpost-Signature: v1 id=<device id> t=<unix ms> n=<nonce, 32 hex> s=<base64 sig>
// Signed:  "outpost-request-v1\n" id "\n" t "\n" n "\n" METHOD "\n" target "\n" sha256hex(body)
// where target is the request target as sent (path and query). Relays forward the header and
// the target untouched, so the control plane checks the device's own signature end to end.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/error.h"

namespace outpost::reqsig {

inline constexpr std::string_view kHeader = "X-Outpost-Signature";
inline constexpr std::string_view kHeaderLower = "x-outpost-signature";

struct Signature {
  std::string device_id;
  int64_t time_ms = 0;
  std::string nonce;      // 32 lowercase hex characters
  std::string signature;  // 64 raw bytes
};

// The bytes a signature covers.
std::string signed_text(const Signature& sig, std::string_view method, std::string_view target,
                        std::string_view body);

// Parses a header value; kUnauthenticated naming what is wrong (bounded: values over 512
// bytes, unknown versions, missing or repeated fields, bad encodings are refused).
[[nodiscard]] Result<Signature> parse(std::string_view header_value);

// Signs a request with the device's key and returns the header value.
std::string sign(std::string_view device_id, std::string_view secret_key, int64_t time_ms,
                 std::string_view method, std::string_view target, std::string_view body);

// Checks `sig` over the request with the device's raw 32-byte public key.
bool verify(const Signature& sig, std::string_view public_key, std::string_view method,
            std::string_view target, std::string_view body);

// What a device's clients share to sign their calls: its id and key, and the offset between
// its clock and the control plane's (learnt from each answer's Date header), so a device
// whose clock is wrong (no RTC, no NTP on an isolated network) still signs inside the
// server's window. Thread-safe.
class Signer {
 public:
  Signer(std::string device_id, std::string secret_key)
      : device_id_(std::move(device_id)), secret_key_(std::move(secret_key)) {}

  // The header to add to a request.
  std::pair<std::string, std::string> header(std::string_view method, std::string_view target,
                                             std::string_view body) const;
  // Learns the server's clock from an HTTP Date header ("Mon, 07 Dec 2026 10:00:00 GMT").
  void observe_date(const std::string& date_header);
  int64_t offset_ms() const { return offset_ms_.load(); }
  const std::string& device_id() const { return device_id_; }

 private:
  std::string device_id_;
  std::string secret_key_;
  std::atomic<int64_t> offset_ms_{0};
};

// Parses an HTTP date (IMF-fixdate) into unix ms; kInvalidArgument otherwise.
[[nodiscard]] Result<int64_t> parse_http_date(const std::string& text);
// Formats unix ms as an IMF-fixdate.
std::string format_http_date(int64_t unix_ms);

}  // namespace outpost::reqsig
