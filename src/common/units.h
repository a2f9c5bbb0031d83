// Parsing and printing of the human units used on the command line and in manifests:
// durations ("10m", "1h30m", "250ms") and sizes ("64M", "1.5G", "512k").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.h"

namespace outpost {

// Duration with units ms, s, m, h, d; compound forms allowed ("1h30m"). Returns ms.
// Errors name the text: `expected a duration like 10m or 1h30m, got "ten"`.
[[nodiscard]] Result<int64_t> parse_duration_ms(std::string_view text);

// "1h30m", "250ms", "0s".
std::string format_duration_ms(int64_t ms);

// Size in bytes: a number with an optional unit B, K/KB/KiB, M, G, T (binary multiples).
[[nodiscard]] Result<int64_t> parse_size_bytes(std::string_view text);

// "1.5 MiB", "532 B".
std::string format_size(int64_t bytes);

}  // namespace outpost
