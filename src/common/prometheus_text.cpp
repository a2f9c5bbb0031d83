#include "common/prometheus_text.h"

#include <cmath>
#include <cstdio>

namespace outpost::prometheus {

std::string label_value(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string number(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (std::isnan(value)) return "NaN";
  char text[32];
  std::snprintf(text, sizeof(text), "%.9g", value);
  return text;
}

void append_histogram(std::string& out, const std::string& name, const std::string& labels,
                      const std::vector<std::pair<double, uint64_t>>& buckets, double sum,
                      uint64_t count) {
  uint64_t cumulative = 0;
  bool has_inf = false;
  for (const auto& [le, n] : buckets) {
    cumulative += n;
    has_inf = has_inf || std::isinf(le);
    out += name + "_bucket{" + labels + ",le=\"" + number(le) + "\"} " +
           std::to_string(cumulative) + "\n";
  }
  if (!has_inf) out += name + "_bucket{" + labels + ",le=\"+Inf\"} " + std::to_string(count) + "\n";
  out += name + "_sum{" + labels + "} " + number(sum) + "\n";
  out += name + "_count{" + labels + "} " + std::to_string(count) + "\n";
}

}  // namespace outpost::prometheus
