// Backend selection by URL, and the audit hash every backend and verifier shares.
#include "store/store.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <string_view>

#include "common/digest.h"
#include "store/postgres/postgres_store.h"
#include "store/sqlite/sqlite_store.h"

namespace outpost::store {
namespace {

constexpr std::string_view kSqliteScheme = "sqlite:";

constexpr std::string_view kPostgresSchemes[] = {"postgres://", "postgresql://"};

}  // namespace

// URLs may carry credentials (postgres://user:secret@host/db?password=...); errors and logs
// must not echo them.
std::string redact_store_url(std::string_view url) {
  std::string out(url);
  const auto scheme_end = out.find("://");
  if (scheme_end != std::string::npos) {
    const auto authority = scheme_end + 3;
    const auto end = out.find_first_of("/?", authority);
    const auto at = out.rfind('@', end == std::string::npos ? std::string::npos : end);
    if (at != std::string::npos && at >= authority) {
      const auto colon = out.find(':', authority);
      if (colon != std::string::npos && colon < at) {
        out.replace(colon + 1, at - colon - 1, "***");
      }
    }
  }
  // A password in the query string: ...?sslmode=require&password=secret
  for (size_t pos = out.find('?'); pos != std::string::npos; pos = out.find('&', pos + 1)) {
    const std::string_view rest = std::string_view(out).substr(pos + 1);
    if (rest.starts_with("password=")) {
      const auto value = pos + 1 + std::string_view("password=").size();
      const auto value_end = out.find('&', value);
      out.replace(value, (value_end == std::string::npos ? out.size() : value_end) - value, "***");
    }
  }
  return out;
}

std::string audit_entry_hash(const AuditEntry& entry) {
  // Each field is length-prefixed, so no text can move from one field into the next
  // without changing the hash.
  std::string text;
  auto add = [&text](const std::string& field) {
    text += std::to_string(field.size());
    text += ':';
    text += field;
    text += '\n';
  };
  add(std::to_string(entry.seq));
  add(std::to_string(entry.time));
  add(entry.actor);
  add(entry.action);
  add(entry.target);
  add(entry.details_json);
  add(entry.prev_hash);
  return sha256_hex(text);
}

void TelemetryStats::add_value(int64_t time, double value) {
  if (points == 0) {
    min = max = value;
  } else {
    min = std::min(min, value);
    max = std::max(max, value);
  }
  ++points;
  sum += value;
  if (time >= last_time) {
    last_time = time;
    last = value;
  }
}

void TelemetryStats::add_histogram(int64_t time, uint64_t n, double s,
                                   const std::vector<std::pair<double, uint64_t>>& b) {
  add_value(time, static_cast<double>(n));
  count += n;
  hist_sum += s;
  for (const auto& [le, c] : b) buckets[le] += c;
}

void TelemetryStats::merge(const TelemetryStats& other) {
  if (other.points == 0) return;
  if (points == 0) {
    min = other.min;
    max = other.max;
  } else {
    min = std::min(min, other.min);
    max = std::max(max, other.max);
  }
  points += other.points;
  sum += other.sum;
  if (other.last_time >= last_time) {
    last_time = other.last_time;
    last = other.last;
  }
  count += other.count;
  hist_sum += other.hist_sum;
  for (const auto& [le, c] : other.buckets) buckets[le] += c;
}

double TelemetryStats::mean() const {
  if (count > 0) return hist_sum / static_cast<double>(count);
  return points > 0 ? sum / static_cast<double>(points) : 0;
}

double TelemetryStats::quantile(double q) const {
  uint64_t total = 0;
  for (const auto& [le, c] : buckets) total += c;
  if (total == 0) return 0;
  const double rank = q * static_cast<double>(total);
  uint64_t seen = 0;
  double lower = 0;
  double last_finite = 0;
  for (const auto& [le, c] : buckets) {
    if (c == 0) continue;
    if (static_cast<double>(seen + c) >= rank) {
      if (std::isinf(le)) return lower;  // open bucket: the last finite bound is all we know
      const double within = (rank - static_cast<double>(seen)) / static_cast<double>(c);
      return lower + (le - lower) * std::clamp(within, 0.0, 1.0);
    }
    seen += c;
    if (!std::isinf(le)) last_finite = le;
    lower = le;
  }
  return last_finite;
}

Result<std::unique_ptr<Store>> open_store(const std::string& url) {
  try {
    const std::string_view view(url);
    if (view.starts_with(kSqliteScheme)) {
      std::string_view path = view.substr(kSqliteScheme.size());
      // Accept the URL form "sqlite:///abs/path" (empty authority) as well as "sqlite:/abs".
      if (path.starts_with("//")) {
        path.remove_prefix(2);
      }
      if (path.empty()) {
        return make_error(Errc::kInvalidArgument,
                          "store URL " + url + " has no path; expected sqlite:/path/to/outpost.db",
                          "url");
      }
      return sqlite::open_sqlite_store(std::string(path));
    }
    for (std::string_view scheme : kPostgresSchemes) {
      if (view.starts_with(scheme)) return postgres::open_postgres_store(url);
    }
    return make_error(Errc::kInvalidArgument,
                      "store URL " + redact_store_url(view) +
                          " has an unsupported scheme; expected sqlite:/path/to/outpost.db or "
                          "postgres://user:password@host:port/dbname",
                      "url");
  } catch (const std::exception& e) {
    return make_error(Errc::kInternal, "opening store " + redact_store_url(url) + ": " + e.what());
  }
}

Result<std::unique_ptr<Store>> open_memory_store() { return sqlite::open_sqlite_store(":memory:"); }

}  // namespace outpost::store
