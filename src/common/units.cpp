#include "common/units.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>

namespace outpost {

namespace {

struct DurationUnit {
  std::string_view name;
  int64_t ms;
};
// Ten years: longer is a typo, and keeps now + duration far from overflowing.
constexpr int64_t kMaxDurationMs = 3650LL * 86'400'000;
constexpr DurationUnit kDurationUnits[] = {
    {"d", 86'400'000}, {"h", 3'600'000}, {"m", 60'000}, {"s", 1'000}, {"ms", 1}};

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

}  // namespace

Result<int64_t> parse_duration_ms(std::string_view text) {
  auto fail = [&](std::string_view why = {}) {
    std::string message =
        "expected a duration like 10m or 1h30m, got \"" + std::string(text) + "\"";
    if (!why.empty()) message += " (" + std::string(why) + ")";
    return make_error(Errc::kInvalidArgument, std::move(message));
  };
  if (text.empty()) return fail();
  int64_t total = 0;
  size_t next_unit = 0;  // units must come in descending order, each at most once
  size_t i = 0;
  while (i < text.size()) {
    size_t start = i;
    while (i < text.size() && is_digit(text[i])) ++i;
    if (i == start) return fail();
    int64_t value = 0;
    auto [ptr, ec] = std::from_chars(text.data() + start, text.data() + i, value);
    if (ec != std::errc()) return fail("longer than 3650d");
    start = i;
    while (i < text.size() && is_alpha(text[i])) ++i;
    std::string_view unit = text.substr(start, i - start);
    size_t index = next_unit;
    while (index < std::size(kDurationUnits) && kDurationUnits[index].name != unit) ++index;
    if (index == std::size(kDurationUnits)) {
      bool known = std::any_of(std::begin(kDurationUnits), std::end(kDurationUnits),
                               [&](const DurationUnit& u) { return u.name == unit; });
      return fail(known ? "units must go from largest to smallest, each once"
                        : "units are ms, s, m, h, d");
    }
    next_unit = index + 1;
    int64_t part = 0;
    if (__builtin_mul_overflow(value, kDurationUnits[index].ms, &part) ||
        __builtin_add_overflow(total, part, &total) || total > kMaxDurationMs) {
      return fail("longer than 3650d");
    }
  }
  return total;
}

std::string format_duration_ms(int64_t ms) {
  if (ms == 0) return "0s";
  std::string out;
  if (ms < 0) {
    out = "-";
    ms = -ms;
  }
  for (const auto& unit : kDurationUnits) {
    if (ms >= unit.ms) {
      out += std::to_string(ms / unit.ms);
      out += unit.name;
      ms %= unit.ms;
    }
  }
  return out;
}

Result<int64_t> parse_size_bytes(std::string_view text) {
  auto fail = [&] {
    return make_error(Errc::kInvalidArgument,
                      "expected a size like 64M or 1.5G, got \"" + std::string(text) + "\"");
  };
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    ++i;
  }
  if (i == 0 || std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(i), '.') > 1) {
    return fail();
  }
  double number = 0;
  try {
    number = std::stod(std::string(text.substr(0, i)));
  } catch (...) {
    return fail();
  }
  std::string unit(text.substr(i));
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double scale = 0;
  if (unit.empty() || unit == "B") {
    scale = 1;
  } else if (unit == "K" || unit == "KB" || unit == "KIB") {
    scale = 1024.0;
  } else if (unit == "M" || unit == "MB" || unit == "MIB") {
    scale = 1024.0 * 1024;
  } else if (unit == "G" || unit == "GB" || unit == "GIB") {
    scale = 1024.0 * 1024 * 1024;
  } else if (unit == "T" || unit == "TB" || unit == "TIB") {
    scale = 1024.0 * 1024 * 1024 * 1024;
  } else {
    return fail();
  }
  double bytes = number * scale;
  if (!std::isfinite(bytes) || bytes > 9.0e18) return fail();
  return static_cast<int64_t>(bytes);
}

std::string format_size(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int u = 0;
  while (value >= 1024 && u < 4) {
    value /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) {
    std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f %s", value, units[u]);
  }
  return buf;
}

}  // namespace outpost
