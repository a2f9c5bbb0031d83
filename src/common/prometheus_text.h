// Pieces of the Prometheus text exposition format, shared by the agent's and the control
// plane's GET /metrics: label escaping, numbers, and histogram lines.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace outpost::prometheus {

// A label value with backslash, double quote and newline escaped.
std::string label_value(std::string_view value);
// A sample value: "+Inf", "-Inf", "NaN", or the number with up to 9 significant digits.
std::string number(double value);
// NAME_bucket (cumulative counts, ending with le="+Inf"), NAME_sum and NAME_count lines.
// `buckets` holds (upper bound, count in that bucket), ascending; an infinite bound is the
// +Inf bucket, added when absent. `labels` is the label text without braces.
void append_histogram(std::string& out, const std::string& name, const std::string& labels,
                      const std::vector<std::pair<double, uint64_t>>& buckets, double sum,
                      uint64_t count);

}  // namespace outpost::prometheus
