// Hardware facts: what this device is (arch, cores, memory, accelerators, OS), reported at
// enrollment and whenever the stable part changes, so the scheduler can pick model variants.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace outpost::agent {

// Where facts are read from; tests point these into a temp dir.
struct FactsSources {
  std::string proc = "/proc";
  std::string sys = "/sys";
  std::string dev = "/dev";
  std::string os_release = "/etc/os-release";  // /usr/lib/os-release is tried when this is absent
  std::string data_dir;                        // free disk is measured here; empty: not measured
};

// A flat JSON object:
//   "arch"            uname machine, normalized (normalize_arch)
//   "kernel"          uname release
//   "cores"           online CPUs: <sys>/devices/system/cpu/online, else <proc>/cpuinfo
//   "cpu_model"       <proc>/cpuinfo "model name", else "Hardware", "Model", "cpu model"
//   "board"           <proc>/cpuinfo "Model" (ARM boards: "Raspberry Pi 4 Model B Rev 1.4")
//   "memory_mb"       <proc>/meminfo MemTotal
//   "disk_free_mb"    statvfs of data_dir, space available to non-root
//   "disk_total_mb"   statvfs of data_dir
//   "accelerator"     the best kind present: "gpu" > "tpu" > "npu" > "cpu"
//   "accelerators"    [{"kind", "vendor", "model"?, "count", "driver"?}], one per kind and model:
//       NVIDIA GPUs: <proc>/driver/nvidia (version, gpus/*/information), <dev>/nvidia<N>
//       (their count wins when all GPUs are one model); Coral Edge TPUs: <dev>/apex_<N>;
//       NPUs: <dev>/accel/accel<N>, <dev>/hailo<N>, <dev>/davinci<N> (Ascend)
//   "os", "os_id", "os_version"  os-release PRETTY_NAME (else NAME), ID, VERSION_ID
//   "agent_version"
//   "runtimes"        {"onnxruntime": null}: no model runtime is linked yet
//   "power"           "ac" | "battery" | "unknown", from <sys>/class/power_supply/*
//   "battery_percent" only when a system battery (not a mouse's) exists
// Never throws and never fails: a missing or unreadable source leaves its key out. Strings are
// printable ASCII (at most 200 characters) so the object always serializes.
nlohmann::json collect_facts(const FactsSources& sources, const std::string& agent_version);

// The facts that decide scheduling and identity, without the ones that move all the time
// (disk_free_mb, battery_percent, power): the agent re-sends facts only when this changes.
nlohmann::json stable_facts(const nlohmann::json& facts);

// uname machine -> the arch name the scheduler matches: aarch64/arm64 -> "arm64",
// armv7* -> "armv7", armv6* -> "armv6", i386..i686 -> "x86", amd64 -> "x86_64"; others as they are.
std::string normalize_arch(std::string_view machine);

}  // namespace outpost::agent
