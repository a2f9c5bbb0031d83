#include "common/request_signature.h"

#include <sodium.h>

#include <chrono>
#include <cstdio>
#include <ctime>

#include "common/crypto.h"
#include "common/digest.h"

namespace outpost::reqsig {
namespace {

constexpr size_t kMaxHeader = 512;

Error bad(const std::string& what) {
  return Error{Errc::kUnauthenticated, "X-Outpost-Signature: " + what, {}};
}

bool is_hex(std::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

int64_t system_now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

std::string signed_text(const Signature& sig, std::string_view method, std::string_view target,
                        std::string_view body) {
  std::string text = "outpost-request-v1\n";
  text += sig.device_id;
  text += '\n';
  text += std::to_string(sig.time_ms);
  text += '\n';
  text += sig.nonce;
  text += '\n';
  text += method;
  text += '\n';
  text += target;
  text += '\n';
  text += sha256_hex(body);
  return text;
}

Result<Signature> parse(std::string_view value) {
  if (value.size() > kMaxHeader) return make_error(bad("longer than 512 bytes"));
  if (value.substr(0, 3) != "v1 ")
    return make_error(bad("expected \"v1 id=... t=... n=... s=...\""));
  value.remove_prefix(3);
  Signature sig;
  bool have_id = false, have_t = false, have_n = false, have_s = false;
  while (!value.empty()) {
    while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    if (value.empty()) break;
    size_t end = value.find(' ');
    std::string_view field = value.substr(0, end);
    value.remove_prefix(end == std::string_view::npos ? value.size() : end);
    size_t eq = field.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      return make_error(bad("expected key=value, got \"" + std::string(field) + "\""));
    }
    std::string_view key = field.substr(0, eq);
    std::string_view v = field.substr(eq + 1);
    auto once = [&](bool& seen) -> Status {
      if (seen) return make_error(bad(std::string(key) + " given twice"));
      seen = true;
      return ok();
    };
    if (key == "id") {
      OUTPOST_TRY(once(have_id));
      if (v.empty() || v.size() > 64) return make_error(bad("id: expected a device id"));
      sig.device_id = std::string(v);
    } else if (key == "t") {
      OUTPOST_TRY(once(have_t));
      if (v.empty() || v.size() > 15) return make_error(bad("t: expected unix milliseconds"));
      int64_t t = 0;
      for (char c : v) {
        if (c < '0' || c > '9') return make_error(bad("t: expected unix milliseconds"));
        t = t * 10 + (c - '0');
      }
      sig.time_ms = t;
    } else if (key == "n") {
      OUTPOST_TRY(once(have_n));
      if (v.size() != 32 || !is_hex(v)) return make_error(bad("n: expected 32 lowercase hex"));
      sig.nonce = std::string(v);
    } else if (key == "s") {
      OUTPOST_TRY(once(have_s));
      auto raw = crypto::base64_decode(v);
      if (!raw || raw->size() != crypto_sign_BYTES) {
        return make_error(bad("s: expected a base64 Ed25519 signature"));
      }
      sig.signature = std::move(*raw);
    } else {
      return make_error(bad("unknown field \"" + std::string(key) + "\""));
    }
  }
  if (!have_id || !have_t || !have_n || !have_s) {
    return make_error(bad("needs id, t, n and s"));
  }
  return sig;
}

std::string sign(std::string_view device_id, std::string_view secret_key, int64_t time_ms,
                 std::string_view method, std::string_view target, std::string_view body) {
  Signature sig;
  sig.device_id = std::string(device_id);
  sig.time_ms = time_ms;
  sig.nonce = crypto::random_hex(16);
  const std::string s = crypto::ed25519_sign(signed_text(sig, method, target, body), secret_key);
  return "v1 id=" + sig.device_id + " t=" + std::to_string(time_ms) + " n=" + sig.nonce +
         " s=" + crypto::base64_encode(s);
}

bool verify(const Signature& sig, std::string_view public_key, std::string_view method,
            std::string_view target, std::string_view body) {
  return crypto::ed25519_verify(signed_text(sig, method, target, body), sig.signature, public_key);
}

std::pair<std::string, std::string> Signer::header(std::string_view method, std::string_view target,
                                                   std::string_view body) const {
  return {std::string(kHeader),
          sign(device_id_, secret_key_, system_now_ms() + offset_ms_.load(), method, target, body)};
}

void Signer::observe_date(const std::string& date_header) {
  auto server = parse_http_date(date_header);
  if (!server) return;
  // Date has whole seconds: the server's clock is in [server, server + 1 s).
  const int64_t measured = *server + 500 - system_now_ms();
  const int64_t current = offset_ms_.load();
  // Small differences are the Date header's rounding; only a real skew moves the offset.
  if (measured - current > 2'000 || current - measured > 2'000) offset_ms_.store(measured);
}

Result<int64_t> parse_http_date(const std::string& text) {
  std::tm tm{};
  char month[4] = {};
  char weekday[4] = {};
  if (text.size() != 29 ||
      std::sscanf(text.c_str(), "%3s, %2d %3s %4d %2d:%2d:%2d GMT", weekday, &tm.tm_mday, month,
                  &tm.tm_year, &tm.tm_hour, &tm.tm_min, &tm.tm_sec) != 7) {
    return make_error(Errc::kInvalidArgument, "not an HTTP date: \"" + text + "\"");
  }
  static constexpr const char* kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                            "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  tm.tm_mon = -1;
  for (int i = 0; i < 12; ++i) {
    if (std::string_view(month) == kMonths[i]) tm.tm_mon = i;
  }
  // Fields in range, and no year before 1970 (strftime would not give 4 digits back).
  if (tm.tm_mon < 0 || tm.tm_year < 1970 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour < 0 ||
      tm.tm_hour > 23 || tm.tm_min < 0 || tm.tm_min > 59 || tm.tm_sec < 0 || tm.tm_sec > 60) {
    return make_error(Errc::kInvalidArgument, "not an HTTP date: \"" + text + "\"");
  }
  tm.tm_year -= 1900;
  const time_t t = ::timegm(&tm);
  return static_cast<int64_t>(t) * 1000;
}

std::string format_http_date(int64_t unix_ms) {
  const time_t t = static_cast<time_t>(unix_ms / 1000);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
  return buf;
}

}  // namespace outpost::reqsig
