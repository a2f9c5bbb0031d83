#include "common/telemetry_batch.h"

#include "common/json_fields.h"

#include <zstd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>

namespace outpost::telemetry {

using json = nlohmann::json;

namespace {

// ---- writing ----

// Values go on the wire at the precision that means something (a latency to the microsecond,
// a probability to 1e-4): the digits past it are noise that no compressor can shrink, and they
// were 40% of a compressed batch of samples.
double to_step(double x, double step) { return std::round(x / step) * step; }

double to_digits(double x) {
  if (x == 0 || !std::isfinite(x)) return x;
  char text[32];
  std::snprintf(text, sizeof(text), "%.7g", x);
  return std::strtod(text, nullptr);
}

json histogram_to_json(const Histogram& h, double sum_step) {
  json buckets = json::array();
  for (const auto& [le, count] : h.buckets) {
    if (count == 0) continue;
    buckets.push_back(json::array({std::isinf(le) ? json(nullptr) : json(le), count}));
  }
  return {{"count", h.count}, {"sum", to_step(h.sum, sum_step)}, {"buckets", std::move(buckets)}};
}

void put_model_fields(json& out, const std::string& deployment, int64_t revision,
                      const std::string& model, const std::string& version,
                      const std::string& role) {
  out["deployment"] = deployment;
  out["revision"] = revision;
  out["model"] = model;
  out["version"] = version;
  out["role"] = role;
}

// ---- reading: each reader names the field it refuses ----

class Fields {
 public:
  Fields(const json& obj, std::string path) : obj_(obj), path_(std::move(path)) {}

  std::string path(const std::string& key) const { return path_ + "." + key; }

  Result<const json*> get(const std::string& key, bool required) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) {
      if (required) return make_error(Errc::kInvalidArgument, "is required", path(key));
      return nullptr;
    }
    return &*it;
  }

  Result<std::optional<double>> number(const std::string& key, bool required, double min,
                                       double max) const {
    auto v = get(key, required);
    if (!v) return make_error(v.error());
    if (!*v) return std::optional<double>();
    if (!(*v)->is_number()) {
      return make_error(Errc::kInvalidArgument, "expected a number, got " + type_of(**v),
                        path(key));
    }
    double d = (*v)->get<double>();
    if (!std::isfinite(d) || d < min || d > max) {
      return make_error(Errc::kInvalidArgument,
                        "value " + (*v)->dump() + " is out of range [" + short_number(min) + ", " +
                            short_number(max) + "]",
                        path(key));
    }
    return std::optional<double>(d);
  }

  Result<int64_t> integer(const std::string& key, int64_t min, int64_t max) const {
    auto v = get(key, true);
    if (!v) return make_error(v.error());
    if (!(*v)->is_number_integer()) {
      return make_error(Errc::kInvalidArgument, "expected an integer, got " + type_of(**v),
                        path(key));
    }
    if ((*v)->is_number_unsigned() && (*v)->get<uint64_t>() > static_cast<uint64_t>(max)) {
      return make_error(Errc::kInvalidArgument, "value " + (*v)->dump() + " is too large",
                        path(key));
    }
    int64_t i = (*v)->get<int64_t>();
    if (i < min || i > max) {
      return make_error(Errc::kInvalidArgument,
                        "value " + std::to_string(i) + " is out of range [" + std::to_string(min) +
                            ", " + std::to_string(max) + "]",
                        path(key));
    }
    return i;
  }

  Result<uint64_t> count(const std::string& key) const {
    auto i = integer(key, 0, std::numeric_limits<int64_t>::max());
    if (!i) return make_error(i.error());
    return static_cast<uint64_t>(*i);
  }

  Result<std::string> text(const std::string& key, bool required, size_t max_length) const {
    auto v = get(key, required);
    if (!v) return make_error(v.error());
    if (!*v) return std::string();
    if (!(*v)->is_string()) {
      return make_error(Errc::kInvalidArgument, "expected a string, got " + type_of(**v),
                        path(key));
    }
    std::string s = (*v)->get<std::string>();
    if (s.size() > max_length) {
      return make_error(Errc::kInvalidArgument,
                        "is " + std::to_string(s.size()) + " bytes long, over the limit of " +
                            std::to_string(max_length),
                        path(key));
    }
    return s;
  }

  Result<std::string> name(const std::string& key) const {
    auto s = text(key, true, kMaxNameLength);
    if (s && s->empty()) return make_error(Errc::kInvalidArgument, "must not be empty", path(key));
    return s;
  }

  Result<bool> boolean(const std::string& key) const {
    auto v = get(key, false);
    if (!v) return make_error(v.error());
    if (!*v) return false;
    if (!(*v)->is_boolean()) {
      return make_error(Errc::kInvalidArgument, "expected true or false, got " + type_of(**v),
                        path(key));
    }
    return (*v)->get<bool>();
  }

  // Keys must all be known: a typo in an agent is caught in tests, not silently dropped.
  Status only(std::initializer_list<const char*> keys) const {
    for (auto it = obj_.begin(); it != obj_.end(); ++it) {
      bool known = false;
      for (const char* k : keys) known = known || it.key() == k;
      if (!known) return make_error(Errc::kInvalidArgument, "unknown field", path(it.key()));
    }
    return ok();
  }

  static std::string type_of(const json& v) {
    switch (v.type()) {
      case json::value_t::string:
        return "a string";
      case json::value_t::boolean:
        return "a boolean";
      case json::value_t::array:
        return "an array";
      case json::value_t::object:
        return "an object";
      case json::value_t::null:
        return "null";
      default:
        return "a number";
    }
  }

  static std::string short_number(double d) {
    if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
    return json(d).dump();
  }

 private:
  const json& obj_;
  std::string path_;
};

Result<const json*> object_at(const json& v, const std::string& path) {
  if (!v.is_object()) {
    return make_error(Errc::kInvalidArgument, "expected an object, got " + Fields::type_of(v),
                      path);
  }
  return &v;
}

Result<Histogram> histogram_from_json(const json& v, const std::string& path) {
  OUTPOST_TRY(object_at(v, path));
  Fields f(v, path);
  OUTPOST_TRY(f.only({"count", "sum", "buckets"}));
  Histogram h;
  auto count = f.count("count");
  if (!count) return make_error(count.error());
  h.count = *count;
  auto sum = f.number("sum", true, -1e300, 1e300);
  if (!sum) return make_error(sum.error());
  h.sum = **sum;
  auto buckets = f.get("buckets", true);
  if (!buckets) return make_error(buckets.error());
  const json& b = **buckets;
  const std::string bpath = path + ".buckets";
  if (!b.is_array()) {
    return make_error(Errc::kInvalidArgument, "expected an array, got " + Fields::type_of(b),
                      bpath);
  }
  if (b.size() > kMaxBuckets) {
    return make_error(
        Errc::kInvalidArgument,
        std::to_string(b.size()) + " buckets, over the limit of " + std::to_string(kMaxBuckets),
        bpath);
  }
  uint64_t total = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const std::string p = bpath + "[" + std::to_string(i) + "]";
    const json& e = b[i];
    if (!e.is_array() || e.size() != 2 || !(e[0].is_null() || e[0].is_number()) ||
        !e[1].is_number_integer() || e[1].is_number_float()) {
      return make_error(Errc::kInvalidArgument,
                        "expected [upper_bound or null, count], got " + e.dump(), p);
    }
    double le = e[0].is_null() ? std::numeric_limits<double>::infinity() : e[0].get<double>();
    if (!e[0].is_null() && !std::isfinite(le)) {
      return make_error(Errc::kInvalidArgument, "upper bound must be finite (null is +Inf)", p);
    }
    if (!h.buckets.empty() && !(le > h.buckets.back().first)) {
      return make_error(Errc::kInvalidArgument, "upper bounds must be ascending (null, +Inf, last)",
                        p);
    }
    if (e[1].is_number_integer() && !e[1].is_number_unsigned() && e[1].get<int64_t>() < 0) {
      return make_error(Errc::kInvalidArgument, "count must not be negative", p);
    }
    uint64_t c = e[1].get<uint64_t>();
    if (c > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) - total) {
      return make_error(Errc::kInvalidArgument, "count is too large", p);
    }
    total += c;
    h.buckets.emplace_back(le, c);
  }
  if (total != h.count) {
    return make_error(Errc::kInvalidArgument,
                      "bucket counts add up to " + std::to_string(total) + ", not count " +
                          std::to_string(h.count),
                      bpath);
  }
  return h;
}

Result<std::map<std::string, std::map<std::string, FeatureStats>>> inputs_from_json(
    const json& v, const std::string& path) {
  OUTPOST_TRY(object_at(v, path));
  if (v.size() > kMaxInputs) {
    return make_error(
        Errc::kInvalidArgument,
        std::to_string(v.size()) + " inputs, over the limit of " + std::to_string(kMaxInputs),
        path);
  }
  std::map<std::string, std::map<std::string, FeatureStats>> out;
  for (auto it = v.begin(); it != v.end(); ++it) {
    const std::string ipath = path + "." + it.key();
    if (it.key().empty() || it.key().size() > kMaxNameLength) {
      return make_error(Errc::kInvalidArgument, "input name must be 1 to 253 bytes", ipath);
    }
    OUTPOST_TRY(object_at(*it, ipath));
    if (it->size() > kMaxFeaturesPerInput) {
      return make_error(Errc::kInvalidArgument,
                        std::to_string(it->size()) + " features, over the limit of " +
                            std::to_string(kMaxFeaturesPerInput),
                        ipath);
    }
    auto& features = out[it.key()];
    for (auto ft = it->begin(); ft != it->end(); ++ft) {
      const std::string fpath = ipath + "." + ft.key();
      const std::string& k = ft.key();
      bool valid_name = k == "*" || (!k.empty() && k.size() <= 3 &&
                                     k.find_first_not_of("0123456789") == std::string::npos);
      if (!valid_name) {
        return make_error(Errc::kInvalidArgument, "feature must be a position (0..64) or \"*\"",
                          fpath);
      }
      const json& s = *ft;
      if (!s.is_array() || s.size() != 3 || !s[0].is_number_unsigned() || !s[1].is_number() ||
          !s[2].is_number()) {
        return make_error(Errc::kInvalidArgument, "expected [n, mean, m2], got " + s.dump(), fpath);
      }
      FeatureStats st{s[0].get<uint64_t>(), s[1].get<double>(), s[2].get<double>()};
      if (!std::isfinite(st.mean) || !std::isfinite(st.m2) || st.m2 < 0) {
        return make_error(Errc::kInvalidArgument, "mean and m2 must be finite, m2 >= 0", fpath);
      }
      features[k] = st;
    }
  }
  return out;
}

constexpr double kMaxTime = 4102444800000.0;  // 2100-01-01: later timestamps are garbage
constexpr int64_t kMaxRevision = std::numeric_limits<int32_t>::max();

bool valid_event_name(const std::string& s) {
  if (s.empty() || s.size() > 32) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || c == '_')) return false;
  }
  return true;
}

template <typename T>
Status read_model_fields(const Fields& f, T& r) {
  auto deployment = f.name("deployment");
  if (!deployment) return make_error(deployment.error());
  r.deployment = *deployment;
  auto revision = f.integer("revision", 0, kMaxRevision);
  if (!revision) return make_error(revision.error());
  r.revision = *revision;
  auto model = f.name("model");
  if (!model) return make_error(model.error());
  r.model = *model;
  auto version = f.name("version");
  if (!version) return make_error(version.error());
  r.version = *version;
  auto role = f.text("role", true, 16);
  if (!role) return make_error(role.error());
  if (*role != "primary" && *role != "fallback") {
    return make_error(Errc::kInvalidArgument, "expected \"primary\" or \"fallback\"",
                      f.path("role"));
  }
  r.role = *role;
  return ok();
}

}  // namespace

std::string_view record_kind(const RecordBody& body) {
  switch (body.index()) {
    case 0:
      return "health";
    case 1:
      return "event";
    case 2:
      return "inference";
    default:
      return "sample";
  }
}

json record_to_json(const Record& record) {
  json out = {{"seq", record.seq}, {"t", record.time}, {"kind", record_kind(record.body)}};
  if (const auto* h = std::get_if<HealthRecord>(&record.body)) {
    out["cpu_percent"] = to_step(h->cpu_percent, 0.01);
    out["mem_used"] = h->mem_used;
    out["mem_total"] = h->mem_total;
    out["disk_free"] = h->disk_free;
    out["disk_total"] = h->disk_total;
    out["uptime_s"] = to_step(h->uptime_s, 0.001);
    out["agent_rss"] = h->agent_rss;
    out["buffer_bytes"] = h->buffer_bytes;
    if (h->temp_c) out["temp_c"] = to_step(*h->temp_c, 0.01);
    if (h->sync_lag_s) out["sync_lag_s"] = to_step(*h->sync_lag_s, 0.001);
  } else if (const auto* e = std::get_if<EventRecord>(&record.body)) {
    out["deployment"] = e->deployment;
    out["revision"] = e->revision;
    out["event"] = e->event;
    if (!e->message.empty()) out["message"] = e->message;
  } else if (const auto* a = std::get_if<InferenceRecord>(&record.body)) {
    put_model_fields(out, a->deployment, a->revision, a->model, a->version, a->role);
    out["interval_ms"] = a->interval_ms;
    out["requests"] = a->requests;
    out["served"] = a->served;
    out["errors"] = a->errors;
    out["invalid"] = a->invalid;
    out["fallbacks"] = a->fallbacks;
    out["latency"] = histogram_to_json(a->latency, 1e-6);
    out["confidence"] = histogram_to_json(a->confidence, 1e-4);
    if (!a->inputs.empty()) {
      json inputs = json::object();
      for (const auto& [name, features] : a->inputs) {
        json per = json::object();
        for (const auto& [feature, s] : features) {
          per[feature] = json::array({s.n, to_digits(s.mean), to_digits(s.m2)});
        }
        inputs[name] = std::move(per);
      }
      out["inputs"] = std::move(inputs);
    }
  } else if (const auto* s = std::get_if<SampleRecord>(&record.body)) {
    put_model_fields(out, s->deployment, s->revision, s->model, s->version, s->role);
    out["latency_s"] = to_step(s->latency_s, 1e-6);
    out["outcome"] = s->outcome;
    if (s->confidence) out["confidence"] = to_step(*s->confidence, 1e-4);
    if (s->anomaly) out["anomaly"] = true;
  }
  return out;
}

Result<Record> record_from_json(const json& value, const std::string& path) {
  OUTPOST_TRY(object_at(value, path));
  Fields f(value, path);
  Record r;
  auto seq = f.integer("seq", 1, std::numeric_limits<int64_t>::max());
  if (!seq) return make_error(seq.error());
  r.seq = *seq;
  auto time = f.integer("t", 0, static_cast<int64_t>(kMaxTime));
  if (!time) return make_error(time.error());
  r.time = *time;
  auto kind = f.text("kind", true, 16);
  if (!kind) return make_error(kind.error());

  if (*kind == "health") {
    OUTPOST_TRY(
        f.only({"seq", "t", "kind", "cpu_percent", "mem_used", "mem_total", "disk_free",
                "disk_total", "uptime_s", "agent_rss", "buffer_bytes", "temp_c", "sync_lag_s"}));
    HealthRecord h;
    constexpr int64_t kMaxBytes = std::numeric_limits<int64_t>::max();
    auto cpu = f.number("cpu_percent", true, 0, 100);
    if (!cpu) return make_error(cpu.error());
    h.cpu_percent = **cpu;
    for (auto [key, slot] : {std::pair{"mem_used", &h.mem_used},
                             {"mem_total", &h.mem_total},
                             {"disk_free", &h.disk_free},
                             {"disk_total", &h.disk_total},
                             {"agent_rss", &h.agent_rss},
                             {"buffer_bytes", &h.buffer_bytes}}) {
      auto v = f.integer(key, 0, kMaxBytes);
      if (!v) return make_error(v.error());
      *slot = *v;
    }
    auto uptime = f.number("uptime_s", true, 0, 1e12);
    if (!uptime) return make_error(uptime.error());
    h.uptime_s = **uptime;
    auto temp = f.number("temp_c", false, -273.15, 1000);
    if (!temp) return make_error(temp.error());
    h.temp_c = *temp;
    auto lag = f.number("sync_lag_s", false, 0, 1e12);
    if (!lag) return make_error(lag.error());
    h.sync_lag_s = *lag;
    r.body = h;
  } else if (*kind == "event") {
    OUTPOST_TRY(f.only({"seq", "t", "kind", "deployment", "revision", "event", "message"}));
    EventRecord e;
    auto deployment = f.text("deployment", false, kMaxNameLength);  // "" = the agent itself
    if (!deployment) return make_error(deployment.error());
    e.deployment = *deployment;
    if (auto v = f.get("revision", false); v && *v) {
      auto revision = f.integer("revision", 0, kMaxRevision);
      if (!revision) return make_error(revision.error());
      e.revision = *revision;
    } else if (!v) {
      return make_error(v.error());
    }
    auto event = f.text("event", true, 32);
    if (!event) return make_error(event.error());
    if (!valid_event_name(*event)) {
      return make_error(Errc::kInvalidArgument,
                        "expected 1 to 32 of [a-z_], got \"" + *event + "\"", f.path("event"));
    }
    e.event = *event;
    auto message = f.text("message", false, kMaxMessageLength);
    if (!message) return make_error(message.error());
    e.message = *message;
    r.body = e;
  } else if (*kind == "inference") {
    OUTPOST_TRY(f.only({"seq", "t", "kind", "deployment", "revision", "model", "version", "role",
                        "interval_ms", "requests", "served", "errors", "invalid", "fallbacks",
                        "latency", "confidence", "inputs"}));
    InferenceRecord a;
    OUTPOST_TRY(read_model_fields(f, a));
    auto interval = f.integer("interval_ms", 1, 31LL * 24 * 3600 * 1000);
    if (!interval) return make_error(interval.error());
    a.interval_ms = *interval;
    for (auto [key, slot] : {std::pair{"requests", &a.requests},
                             {"served", &a.served},
                             {"errors", &a.errors},
                             {"invalid", &a.invalid},
                             {"fallbacks", &a.fallbacks}}) {
      auto v = f.count(key);
      if (!v) return make_error(v.error());
      *slot = *v;
    }
    for (auto [key, slot] :
         {std::pair{"latency", &a.latency}, std::pair{"confidence", &a.confidence}}) {
      auto v = f.get(key, true);
      if (!v) return make_error(v.error());
      auto h = histogram_from_json(**v, f.path(key));
      if (!h) return make_error(h.error());
      *slot = std::move(*h);
    }
    if (auto v = f.get("inputs", false); !v) {
      return make_error(v.error());
    } else if (*v) {
      auto inputs = inputs_from_json(**v, f.path("inputs"));
      if (!inputs) return make_error(inputs.error());
      a.inputs = std::move(*inputs);
    }
    r.body = std::move(a);
  } else if (*kind == "sample") {
    OUTPOST_TRY(f.only({"seq", "t", "kind", "deployment", "revision", "model", "version", "role",
                        "latency_s", "outcome", "confidence", "anomaly"}));
    SampleRecord s;
    OUTPOST_TRY(read_model_fields(f, s));
    auto latency = f.number("latency_s", true, 0, 86400);
    if (!latency) return make_error(latency.error());
    s.latency_s = **latency;
    auto outcome = f.text("outcome", true, 16);
    if (!outcome) return make_error(outcome.error());
    if (*outcome != "ok" && *outcome != "error" && *outcome != "invalid" &&
        *outcome != "fallback") {
      return make_error(Errc::kInvalidArgument, "expected ok, error, invalid or fallback",
                        f.path("outcome"));
    }
    s.outcome = *outcome;
    auto confidence = f.number("confidence", false, 0, 1);
    if (!confidence) return make_error(confidence.error());
    s.confidence = *confidence;
    auto anomaly = f.boolean("anomaly");
    if (!anomaly) return make_error(anomaly.error());
    s.anomaly = *anomaly;
    r.body = std::move(s);
  } else {
    return make_error(Errc::kInvalidArgument,
                      "unknown kind \"" + *kind + "\" (expected health, event, inference, sample)",
                      f.path("kind"));
  }
  return r;
}

std::string batch_json(int64_t first_seq, int64_t last_seq, const DropCounts& dropped,
                       const std::vector<std::string>& record_texts) {
  json head = {{"v", kBatchVersion},
               {"first_seq", first_seq},
               {"last_seq", last_seq},
               {"dropped",
                {{"samples", dropped.samples},
                 {"health", dropped.health},
                 {"aggregates", dropped.aggregates},
                 {"events", dropped.events}}}};
  std::string out = head.dump();
  out.pop_back();  // the closing brace: the records array goes in before it
  size_t size = out.size() + 16;
  for (const auto& t : record_texts) size += t.size() + 1;
  out.reserve(size);
  out += ",\"records\":[";
  for (size_t i = 0; i < record_texts.size(); ++i) {
    if (i) out += ',';
    out += record_texts[i];
  }
  out += "]}";
  return out;
}

Result<std::string> compress(std::string_view data, int level) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  size_t n = ZSTD_compress(out.data(), out.size(), data.data(), data.size(), level);
  if (ZSTD_isError(n)) {
    return make_error(Errc::kInternal,
                      std::string("zstd compression failed: ") + ZSTD_getErrorName(n));
  }
  out.resize(n);
  return out;
}

Result<std::string> decompress(std::string_view frame, size_t max_size) {
  // One context per thread, reused: creating and freeing one per batch (about 160 KiB, so
  // mmap and munmap) cost more than decompressing a one-minute batch.
  thread_local std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> ctx(nullptr, ZSTD_freeDCtx);
  if (!ctx) ctx.reset(ZSTD_createDCtx());
  if (!ctx) return make_error(Errc::kInternal, "zstd: cannot create a decompression context");
  ZSTD_DCtx_reset(ctx.get(), ZSTD_reset_session_and_parameters);
  // A frame may claim any size; never trust it for an allocation, only the bytes produced.
  ZSTD_DCtx_setParameter(ctx.get(), ZSTD_d_windowLogMax, 23);
  std::string out;
  // The usual case, a frame that states its size (within the limit) and nothing after it:
  // decoded in one call straight into its final buffer.
  const unsigned long long stated = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (stated != ZSTD_CONTENTSIZE_UNKNOWN && stated != ZSTD_CONTENTSIZE_ERROR &&
      stated <= max_size &&
      ZSTD_findFrameCompressedSize(frame.data(), frame.size()) == frame.size()) {
    out.resize(static_cast<size_t>(stated));
    const size_t got =
        ZSTD_decompressDCtx(ctx.get(), out.data(), out.size(), frame.data(), frame.size());
    if (ZSTD_isError(got)) {
      return make_error(Errc::kInvalidArgument,
                        std::string("body is not a valid zstd frame: ") + ZSTD_getErrorName(got),
                        "body");
    }
    if (got != out.size()) {
      return make_error(Errc::kInvalidArgument, "body is a zstd frame shorter than it states",
                        "body");
    }
    return out;
  }
  ZSTD_DCtx_reset(ctx.get(), ZSTD_reset_session_only);
  std::string chunk(64 * 1024, '\0');
  ZSTD_inBuffer in{frame.data(), frame.size(), 0};
  size_t last = 1;
  while (true) {
    ZSTD_outBuffer o{chunk.data(), chunk.size(), 0};
    last = ZSTD_decompressStream(ctx.get(), &o, &in);
    if (ZSTD_isError(last)) {
      return make_error(Errc::kInvalidArgument,
                        std::string("body is not a valid zstd frame: ") + ZSTD_getErrorName(last),
                        "body");
    }
    if (out.size() + o.pos > max_size) {
      return make_error(
          Errc::kPayloadTooLarge,
          "decompressed body is over the limit of " + std::to_string(max_size) + " bytes", "body");
    }
    out.append(chunk.data(), o.pos);
    if (last == 0) break;  // frame complete
    if (in.pos == in.size && o.pos < o.size) {
      return make_error(Errc::kInvalidArgument, "body is a truncated zstd frame", "body");
    }
  }
  if (in.pos != in.size) {
    return make_error(Errc::kInvalidArgument, "body has bytes after its zstd frame", "body");
  }
  return out;
}

Result<Batch> decode_batch(std::string_view compressed) {
  if (compressed.size() > kMaxCompressedBatch) {
    return make_error(Errc::kPayloadTooLarge,
                      "batch of " + std::to_string(compressed.size()) +
                          " bytes is over the limit of " + std::to_string(kMaxCompressedBatch),
                      "body");
  }
  auto text = decompress(compressed, kMaxBatchJson);
  if (!text) return make_error(text.error());
  if (auto nesting = json_fields::check_nesting(*text, "batch"); !nesting) {
    return make_error(Error{nesting.error().code, nesting.error().message, "body"});
  }
  json doc = json::parse(*text, nullptr, false);
  if (doc.is_discarded()) {
    return make_error(Errc::kInvalidArgument, "batch is not valid JSON", "body");
  }
  OUTPOST_TRY(object_at(doc, "batch"));
  Fields f(doc, "batch");
  OUTPOST_TRY(f.only({"v", "first_seq", "last_seq", "dropped", "records"}));
  auto version = f.integer("v", kBatchVersion, kBatchVersion);
  if (!version) {
    return make_error(Errc::kInvalidArgument,
                      "unsupported batch version (this server reads version " +
                          std::to_string(kBatchVersion) + ")",
                      "batch.v");
  }
  Batch batch;
  auto first = f.integer("first_seq", 1, std::numeric_limits<int64_t>::max());
  if (!first) return make_error(first.error());
  auto last = f.integer("last_seq", *first, std::numeric_limits<int64_t>::max());
  if (!last) return make_error(last.error());
  batch.first_seq = *first;
  batch.last_seq = *last;

  auto dropped = f.get("dropped", false);
  if (!dropped) return make_error(dropped.error());
  if (*dropped) {
    OUTPOST_TRY(object_at(**dropped, "batch.dropped"));
    Fields d(**dropped, "batch.dropped");
    OUTPOST_TRY(d.only({"samples", "health", "aggregates", "events"}));
    for (auto [key, slot] : {std::pair{"samples", &batch.dropped.samples},
                             {"health", &batch.dropped.health},
                             {"aggregates", &batch.dropped.aggregates},
                             {"events", &batch.dropped.events}}) {
      if (auto v = d.get(key, false); !v) {
        return make_error(v.error());
      } else if (*v) {
        auto n = d.integer(key, 0, std::numeric_limits<int64_t>::max());
        if (!n) return make_error(n.error());
        *slot = *n;
      }
    }
  }

  auto records = f.get("records", true);
  if (!records) return make_error(records.error());
  const json& list = **records;
  if (!list.is_array()) {
    return make_error(Errc::kInvalidArgument, "expected an array, got " + Fields::type_of(list),
                      "batch.records");
  }
  if (list.size() > kMaxRecordsPerBatch) {
    return make_error(Errc::kPayloadTooLarge,
                      std::to_string(list.size()) + " records, over the limit of " +
                          std::to_string(kMaxRecordsPerBatch),
                      "batch.records");
  }
  batch.records.reserve(list.size());
  int64_t previous = 0;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string path = "records[" + std::to_string(i) + "]";
    auto record = record_from_json(list[i], path);
    if (!record) return make_error(record.error());
    if (record->seq < batch.first_seq || record->seq > batch.last_seq) {
      return make_error(Errc::kInvalidArgument,
                        "seq " + std::to_string(record->seq) + " is outside the batch's [" +
                            std::to_string(batch.first_seq) + ", " +
                            std::to_string(batch.last_seq) + "]",
                        path + ".seq");
    }
    if (record->seq <= previous) {
      return make_error(Errc::kInvalidArgument,
                        "seq " + std::to_string(record->seq) + " does not follow " +
                            std::to_string(previous) + " (records must be in increasing seq)",
                        path + ".seq");
    }
    previous = record->seq;
    batch.records.push_back(std::move(*record));
  }
  return batch;
}

}  // namespace outpost::telemetry
