// Fuzz target for the device request signature header (common/request_signature), which the
// control plane parses on every device call before anything else, and the HTTP Date parser
// the agent runs on every answer: any bytes give a signature that keeps parse()'s promises,
// or an error -- never a crash, a hang or an exception -- and a parsed header verifies only
// with the key that made it.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/crypto.h"
#include "common/request_signature.h"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool ready = [] {
    outpost::crypto::init();
    return true;
  }();
  (void)ready;
  namespace reqsig = outpost::reqsig;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto sig = reqsig::parse(text);
  if (sig) {
    check(size <= 512);
    check(!sig->device_id.empty() && sig->device_id.size() <= 64);
    check(sig->nonce.size() == 32);
    check(sig->signature.size() == 64);
    check(sig->time_ms >= 0);
    // Whatever was parsed, a fresh key never verifies it (no accidental acceptance).
    static const auto key = outpost::crypto::ed25519_generate();
    check(!reqsig::verify(*sig, key.public_key, "GET", "/api/v1/device/desired", ""));
  } else {
    check(sig.error().code == outpost::Errc::kUnauthenticated);
  }
  auto date = reqsig::parse_http_date(std::string(text));
  if (date) {
    // What parses formats back to a date that parses to the same instant.
    auto again = reqsig::parse_http_date(reqsig::format_http_date(*date));
    check(again && *again == *date);
  }
  return 0;
}
