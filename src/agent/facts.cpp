#include "agent/facts.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <map>
#include <optional>
#include <vector>

#include "common/durable_file.h"

namespace outpost::agent {
namespace {

using nlohmann::json;

// Reads at most `max` bytes; procfs and sysfs report size 0, so this reads to EOF.
std::optional<std::string> read_small(const std::string& path, size_t max = 4096) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return std::nullopt;
  std::string out;
  char buf[4096];
  while (out.size() < max) {
    ssize_t n = ::read(fd, buf, std::min(sizeof buf, max - out.size()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      return std::nullopt;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\n' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

// Printable ASCII only, so the facts always serialize as JSON (no stray bytes from a driver).
std::string clean(std::string_view s) {
  std::string out;
  for (char c : trim(s).substr(0, 200)) out += (c >= 0x20 && c <= 0x7e) ? c : '?';
  return out;
}

// The value of the first "key<sep>value" line whose key (trimmed) is `key`.
std::optional<std::string_view> field(std::string_view text, std::string_view key, char sep) {
  while (!text.empty()) {
    size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    size_t at = line.find(sep);
    if (at != std::string_view::npos && trim(line.substr(0, at)) == key) {
      return trim(line.substr(at + 1));
    }
    if (eol == std::string_view::npos) break;
    text.remove_prefix(eol + 1);
  }
  return std::nullopt;
}

// The leading decimal number of `s` ("1024000 kB" -> 1024000).
std::optional<int64_t> leading_int(std::string_view s) {
  int64_t value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end == s.data()) return std::nullopt;
  return value;
}

// Sorted names in a directory; empty when it cannot be read.
std::vector<std::string> list_names(const std::string& dir) {
  std::vector<std::string> names = list_directory(dir);
  std::sort(names.begin(), names.end());
  return names;
}

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// "nvidia0" is numbered with prefix "nvidia"; "nvidiactl" is not.
bool is_numbered(std::string_view name, std::string_view prefix) {
  return name.starts_with(prefix) && all_digits(name.substr(prefix.size()));
}

int64_t count_numbered(const std::vector<std::string>& names, std::string_view prefix) {
  return std::count_if(names.begin(), names.end(),
                       [&](const std::string& n) { return is_numbered(n, prefix); });
}

// "0-3,6,8-9" -> 7.
std::optional<int64_t> count_cpu_list(std::string_view list) {
  list = trim(list);
  int64_t count = 0;
  while (!list.empty()) {
    size_t comma = list.find(',');
    std::string_view range = list.substr(0, comma);
    size_t dash = range.find('-');
    auto first = leading_int(range.substr(0, dash));
    auto last = dash == std::string_view::npos ? first : leading_int(range.substr(dash + 1));
    if (!first || !last || *last < *first) return std::nullopt;
    count += *last - *first + 1;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  if (count == 0) return std::nullopt;
  return count;
}

void add_cpu(const FactsSources& sources, json& facts) {
  auto online = read_small(sources.sys + "/devices/system/cpu/online", 1024);
  std::optional<int64_t> cores = online ? count_cpu_list(*online) : std::nullopt;
  // cpuinfo is ~1.5 KiB per CPU; 1 MiB covers the fallback count on big machines too.
  auto cpuinfo = read_small(sources.proc + "/cpuinfo", 1 << 20);
  if (cpuinfo) {
    if (!cores) {
      int64_t processors = 0;
      for (std::string_view text = *cpuinfo; !text.empty();) {
        size_t eol = text.find('\n');
        std::string_view line = text.substr(0, eol);
        if (line.find(':') != std::string_view::npos &&
            trim(line.substr(0, line.find(':'))) == "processor") {
          ++processors;
        }
        text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
      }
      if (processors > 0) cores = processors;
    }
    for (std::string_view key : {"model name", "Hardware", "Model", "cpu model"}) {
      if (auto value = field(*cpuinfo, key, ':'); value && !value->empty()) {
        facts["cpu_model"] = clean(*value);
        break;
      }
    }
    if (auto board = field(*cpuinfo, "Model", ':'); board && !board->empty()) {
      facts["board"] = clean(*board);
    }
  }
  if (cores) facts["cores"] = *cores;
}

void add_memory_and_disk(const FactsSources& sources, json& facts) {
  if (auto meminfo = read_small(sources.proc + "/meminfo")) {
    if (auto total = field(*meminfo, "MemTotal", ':')) {
      if (auto kb = leading_int(*total)) facts["memory_mb"] = *kb / 1024;
    }
  }
  struct statvfs fs {};
  if (!sources.data_dir.empty() && ::statvfs(sources.data_dir.c_str(), &fs) == 0) {
    auto mb = [&](uint64_t blocks) { return static_cast<int64_t>(blocks * fs.f_frsize >> 20); };
    facts["disk_free_mb"] = mb(fs.f_bavail);
    facts["disk_total_mb"] = mb(fs.f_blocks);
  }
}

// "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 ..." -> "535.104.05":
// the first word made of digits and dots (the open kernel module words its line differently).
std::optional<std::string> nvidia_driver_version(std::string_view text) {
  text = text.substr(0, text.find('\n'));
  while (!text.empty()) {
    size_t space = text.find_first_of(" \t");
    std::string_view word = text.substr(0, space);
    if (!word.empty() && word.front() >= '0' && word.front() <= '9' &&
        word.find('.') != std::string_view::npos &&
        std::all_of(word.begin(), word.end(),
                    [](char c) { return c == '.' || (c >= '0' && c <= '9'); })) {
      return std::string(word);
    }
    if (space == std::string_view::npos) break;
    text.remove_prefix(space + 1);
  }
  return std::nullopt;
}

void add_nvidia(const FactsSources& sources, const std::vector<std::string>& dev, json& accels) {
  const std::string base = sources.proc + "/driver/nvidia";
  auto version = read_small(base + "/version");
  std::map<std::string, int64_t> models;  // model ("" when unknown) -> count
  for (const std::string& gpu : list_names(base + "/gpus")) {
    auto info = read_small(base + "/gpus/" + gpu + "/information");
    auto model = info ? field(*info, "Model", ':') : std::nullopt;
    ++models[model ? clean(*model) : ""];
  }
  // The device nodes are what this host (or container) can use; trust their count when the
  // GPUs are all one model.
  int64_t nodes = count_numbered(dev, "nvidia");
  if (models.size() == 1 && nodes > 0) models.begin()->second = nodes;
  if (models.empty() && (nodes > 0 || version)) models[""] = std::max<int64_t>(nodes, 1);
  std::optional<std::string> driver = version ? nvidia_driver_version(*version) : std::nullopt;
  for (const auto& [model, count] : models) {
    json gpu = {{"kind", "gpu"}, {"vendor", "nvidia"}};
    if (!model.empty()) gpu["model"] = model;
    gpu["count"] = count;
    if (driver) gpu["driver"] = *driver;
    accels.push_back(std::move(gpu));
  }
}

// The vendor of a /dev/accel/accelN device, from its PCI vendor id.
std::optional<std::string> accel_vendor(const FactsSources& sources, const std::string& node) {
  auto id = read_small(sources.sys + "/class/accel/" + node + "/device/vendor", 64);
  if (!id) return std::nullopt;
  static constexpr std::pair<std::string_view, std::string_view> kVendors[] = {
      {"0x8086", "intel"},
      {"0x1022", "amd"},
      {"0x1002", "amd"},
      {"0x1da3", "habana"},
      {"0x17cb", "qualcomm"}};
  for (const auto& [pci, vendor] : kVendors) {
    if (trim(*id) == pci) return std::string(vendor);
  }
  return std::nullopt;
}

void add_accelerators(const FactsSources& sources, json& facts) {
  json accels = json::array();
  const std::vector<std::string> dev = list_names(sources.dev);
  add_nvidia(sources, dev, accels);
  auto add = [&](const char* kind, const char* vendor, const char* model, int64_t count) {
    if (count == 0) return;
    json a = {{"kind", kind}};
    if (vendor != nullptr) a["vendor"] = vendor;
    if (model != nullptr) a["model"] = model;
    a["count"] = count;
    accels.push_back(std::move(a));
  };
  add("tpu", "google", "coral-edge-tpu", count_numbered(dev, "apex_"));
  std::vector<std::string> accel_nodes = list_names(sources.dev + "/accel");
  std::erase_if(accel_nodes, [](const std::string& n) { return !is_numbered(n, "accel"); });
  if (!accel_nodes.empty()) {
    auto vendor = accel_vendor(sources, accel_nodes.front());
    add("npu", vendor ? vendor->c_str() : nullptr, nullptr,
        static_cast<int64_t>(accel_nodes.size()));
  }
  add("npu", "hailo", nullptr, count_numbered(dev, "hailo"));
  add("npu", "huawei", "ascend", count_numbered(dev, "davinci"));

  std::string best = "cpu";
  for (const char* kind : {"npu", "tpu", "gpu"}) {  // ascending, the last one present wins
    for (const json& a : accels) {
      if (a["kind"] == kind) best = kind;
    }
  }
  facts["accelerator"] = best;
  facts["accelerators"] = std::move(accels);
}

// os-release values may be quoted, with backslash escapes inside double quotes.
std::optional<std::string> os_release_value(std::string_view text, std::string_view key) {
  auto raw = field(text, key, '=');
  if (!raw) return std::nullopt;
  std::string_view v = *raw;
  if (v.size() >= 2 && (v.front() == '"' || v.front() == '\'') && v.back() == v.front()) {
    v = v.substr(1, v.size() - 2);
  }
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] == '\\' && i + 1 < v.size()) ++i;
    out += v[i];
  }
  return clean(out);
}

void add_os(const FactsSources& sources, json& facts) {
  auto text = read_small(sources.os_release, 16 * 1024);
  if (!text && sources.os_release == "/etc/os-release") {
    text = read_small("/usr/lib/os-release", 16 * 1024);
  }
  if (text) {
    auto name = os_release_value(*text, "PRETTY_NAME");
    if (!name || name->empty()) name = os_release_value(*text, "NAME");
    if (name && !name->empty()) facts["os"] = *name;
    if (auto id = os_release_value(*text, "ID"); id && !id->empty()) facts["os_id"] = *id;
    if (auto v = os_release_value(*text, "VERSION_ID"); v && !v->empty()) facts["os_version"] = *v;
  }
  struct utsname u {};
  if (::uname(&u) == 0) {
    facts["arch"] = normalize_arch(clean(u.machine));
    facts["kernel"] = clean(u.release);
  }
}

void add_power(const FactsSources& sources, json& facts) {
  const std::string base = sources.sys + "/class/power_supply/";
  auto read_word = [](const std::string& path) {
    auto text = read_small(path, 64);
    return text ? std::string(trim(*text)) : std::string();
  };
  bool on_mains = false;
  bool battery = false;
  std::optional<int64_t> percent;
  for (const std::string& supply : list_names(base)) {
    const std::string dir = base + supply + "/";
    const std::string type = read_word(dir + "type");
    if (type == "Mains" || type == "USB") {
      on_mains = on_mains || read_word(dir + "online") == "1";
    } else if (type == "Battery" && read_word(dir + "scope") != "Device") {  // not a mouse's
      battery = true;
      const std::string status = read_word(dir + "status");
      on_mains = on_mains || status == "Charging" || status == "Full" || status == "Not charging";
      if (!percent) percent = leading_int(read_word(dir + "capacity"));
    }
  }
  facts["power"] = on_mains ? "ac" : battery ? "battery" : "unknown";
  if (battery && percent) facts["battery_percent"] = std::clamp<int64_t>(*percent, 0, 100);
}

}  // namespace

std::string normalize_arch(std::string_view machine) {
  if (machine == "aarch64" || machine == "arm64") return "arm64";
  if (machine.starts_with("armv7")) return "armv7";
  if (machine.starts_with("armv6")) return "armv6";
  if (machine == "amd64" || machine == "x86_64") return "x86_64";
  if (machine.size() == 4 && machine[0] == 'i' && machine.substr(2) == "86") return "x86";
  return std::string(machine);
}

json collect_facts(const FactsSources& sources, const std::string& agent_version) {
  json facts = json::object();
  try {
    add_os(sources, facts);
    add_cpu(sources, facts);
    add_memory_and_disk(sources, facts);
    add_accelerators(sources, facts);
    add_power(sources, facts);
    facts["agent_version"] = clean(agent_version);
    facts["runtimes"] = {{"onnxruntime", nullptr}};
  } catch (const std::exception&) {
    // Only allocation can throw here; partial facts beat none.
  }
  return facts;
}

json stable_facts(const json& facts) {
  if (!facts.is_object()) return json::object();
  json stable = facts;
  for (const char* key : {"disk_free_mb", "battery_percent", "power"}) stable.erase(key);
  return stable;
}

}  // namespace outpost::agent
