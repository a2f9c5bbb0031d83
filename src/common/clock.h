// Time behind an interface so tests and the simulator can move it by hand.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.h"

namespace outpost {

// Contract: now_ms() is thread-safe and returns Unix milliseconds (UTC).
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t now_ms() const = 0;
};

class SystemClock final : public Clock {
 public:
  int64_t now_ms() const override;
};

// A clock that only moves when told. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t start_ms = 1'700'000'000'000) : now_(start_ms) {}
  int64_t now_ms() const override { return now_.load(); }
  void advance_ms(int64_t delta) { now_ += delta; }
  void set_ms(int64_t value) { now_ = value; }

 private:
  std::atomic<int64_t> now_;
};

// "2026-11-23T09:12:21Z" (UTC, second precision).
std::string format_iso8601(int64_t unix_ms);
// RFC 3339: "2026-12-07T18:00:00Z", with optional fraction ("...:00.250Z") and a numeric offset
// instead of Z ("+01:00"). kInvalidArgument quoting the text otherwise.
[[nodiscard]] Result<int64_t> parse_rfc3339_ms(std::string_view text);

}  // namespace outpost
