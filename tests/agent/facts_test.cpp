// Hardware facts from fake /proc, /sys, /dev and os-release trees (an ARM board, an NVIDIA box,
// a Coral TPU, nothing at all), plus a sanity check on the real machine.
#include "agent/facts.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <gtest/gtest.h>

namespace outpost::agent {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class FactsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "facts_test.XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    sources_.proc = (root_ / "proc").string();
    sources_.sys = (root_ / "sys").string();
    sources_.dev = (root_ / "dev").string();
    sources_.os_release = (root_ / "etc" / "os-release").string();
  }
  void TearDown() override { fs::remove_all(root_); }

  void put(const std::string& rel, const std::string& contents) {
    fs::path path = root_ / rel;
    fs::create_directories(path.parent_path());
    std::ofstream(path, std::ios::binary) << contents;
  }

  fs::path root_;
  FactsSources sources_;
};

const char* const kArmCpuinfo =
    "processor\t: 0\n"
    "model name\t: ARMv7 Processor rev 4 (v7l)\n"
    "BogoMIPS\t: 38.40\n"
    "Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae\n"
    "CPU implementer\t: 0x41\n"
    "\n"
    "processor\t: 1\n"
    "model name\t: ARMv7 Processor rev 4 (v7l)\n"
    "BogoMIPS\t: 38.40\n"
    "\n"
    "processor\t: 2\n"
    "model name\t: ARMv7 Processor rev 4 (v7l)\n"
    "\n"
    "processor\t: 3\n"
    "model name\t: ARMv7 Processor rev 4 (v7l)\n"
    "\n"
    "Hardware\t: BCM2835\n"
    "Revision\t: a02082\n"
    "Serial\t\t: 00000000abcdef01\n"
    "Model\t\t: Raspberry Pi 3 Model B Rev 1.2\n";

TEST_F(FactsTest, ArmBoardOnBattery) {
  put("proc/cpuinfo", kArmCpuinfo);
  put("proc/meminfo", "MemTotal:        1024000 kB\nMemFree:          512000 kB\n");
  put("sys/class/power_supply/BAT0/type", "Battery\n");
  put("sys/class/power_supply/BAT0/capacity", "80\n");
  put("sys/class/power_supply/BAT0/status", "Discharging\n");
  put("sys/class/power_supply/AC/type", "Mains\n");
  put("sys/class/power_supply/AC/online", "0\n");
  put("dev/ttyAMA0", "");
  put("etc/os-release",
      "PRETTY_NAME=\"Raspbian GNU/Linux 11 (bullseye)\"\nNAME=\"Raspbian GNU/Linux\"\n"
      "VERSION_ID=\"11\"\nID=raspbian\n");
  sources_.data_dir = root_.string();

  json facts = collect_facts(sources_, "0.1.0");
  SCOPED_TRACE(facts.dump());
  EXPECT_EQ(facts["cpu_model"], "ARMv7 Processor rev 4 (v7l)");
  EXPECT_EQ(facts["board"], "Raspberry Pi 3 Model B Rev 1.2");
  EXPECT_EQ(facts["cores"], 4);  // no <sys>/devices/system/cpu/online: cpuinfo's processors
  EXPECT_EQ(facts["memory_mb"], 1000);
  EXPECT_EQ(facts["accelerator"], "cpu");
  EXPECT_EQ(facts["accelerators"], json::array());
  EXPECT_EQ(facts["power"], "battery");
  EXPECT_EQ(facts["battery_percent"], 80);
  EXPECT_EQ(facts["os"], "Raspbian GNU/Linux 11 (bullseye)");
  EXPECT_EQ(facts["os_id"], "raspbian");
  EXPECT_EQ(facts["os_version"], "11");
  EXPECT_EQ(facts["agent_version"], "0.1.0");
  EXPECT_TRUE(facts["runtimes"].contains("onnxruntime"));
  EXPECT_GT(facts["disk_total_mb"].get<int64_t>(), 0);
  EXPECT_GE(facts["disk_free_mb"].get<int64_t>(), 0);
  EXPECT_TRUE(facts["arch"].is_string());  // uname: the real machine's
  EXPECT_TRUE(facts["kernel"].is_string());
}

TEST_F(FactsTest, ArmBoardWithOnlyAHardwareLine) {
  put("proc/cpuinfo",
      "processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\n\nHardware\t: sun50iw1p1\n");
  json facts = collect_facts(sources_, "0.1.0");
  EXPECT_EQ(facts["cpu_model"], "sun50iw1p1");
  EXPECT_EQ(facts["cores"], 2);
  EXPECT_FALSE(facts.contains("board"));
}

TEST_F(FactsTest, NvidiaBox) {
  put("proc/cpuinfo",
      "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n"
      "model name\t: Intel(R) Xeon(R) Silver 4210R CPU @ 2.40GHz\n");
  put("sys/devices/system/cpu/online", "0-7,9\n");
  put("proc/meminfo", "MemTotal:       65536000 kB\n");
  put("proc/driver/nvidia/version",
      "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
      "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n");
  put("proc/driver/nvidia/gpus/0000:01:00.0/information",
      "Model: \t\t NVIDIA A2\nIRQ:   \t\t 130\nGPU UUID: \t GPU-8d3c1a2b\nBus Type: \t PCIe\n");
  put("dev/nvidia0", "");
  put("dev/nvidia1", "");
  put("dev/nvidiactl", "");
  put("dev/nvidia-uvm", "");
  put("sys/class/power_supply/AC/type", "Mains\n");
  put("sys/class/power_supply/AC/online", "1\n");

  json facts = collect_facts(sources_, "0.1.0");
  SCOPED_TRACE(facts.dump());
  EXPECT_EQ(facts["cpu_model"], "Intel(R) Xeon(R) Silver 4210R CPU @ 2.40GHz");
  EXPECT_FALSE(facts.contains("board"));  // "model : 85" is not "Model"
  EXPECT_EQ(facts["cores"], 9);
  EXPECT_EQ(facts["memory_mb"], 64000);
  EXPECT_EQ(facts["accelerator"], "gpu");
  EXPECT_EQ(facts["accelerators"], json::parse(R"([{"kind":"gpu","vendor":"nvidia",
      "model":"NVIDIA A2","count":2,"driver":"535.104.05"}])"));
  EXPECT_EQ(facts["power"], "ac");
  EXPECT_FALSE(facts.contains("battery_percent"));
  EXPECT_FALSE(facts.contains("os"));
}

TEST_F(FactsTest, NvidiaOpenKernelModuleWithoutGpuList) {
  put("proc/driver/nvidia/version",
      "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build  "
      "(dvs-builder@U16-I3-B03-4-3)  Thu Feb 22 01:25:25 UTC 2024\n");
  json facts = collect_facts(sources_, "0.1.0");
  EXPECT_EQ(facts["accelerators"], json::parse(R"([{"kind":"gpu","vendor":"nvidia","count":1,
      "driver":"550.54.14"}])"));
}

TEST_F(FactsTest, CoralTpuBeatsAnNpu) {
  put("dev/apex_0", "");
  put("dev/hailo0", "");
  json facts = collect_facts(sources_, "0.1.0");
  SCOPED_TRACE(facts.dump());
  EXPECT_EQ(facts["accelerator"], "tpu");
  EXPECT_EQ(facts["accelerators"], json::parse(R"([
      {"kind":"tpu","vendor":"google","model":"coral-edge-tpu","count":1},
      {"kind":"npu","vendor":"hailo","count":1}])"));
}

TEST_F(FactsTest, NpusFromAccelAndAscendNodes) {
  put("dev/accel/accel0", "");
  put("sys/class/accel/accel0/device/vendor", "0x8086\n");
  put("dev/davinci0", "");
  put("dev/davinci1", "");
  put("dev/davinci_manager", "");
  json facts = collect_facts(sources_, "0.1.0");
  SCOPED_TRACE(facts.dump());
  EXPECT_EQ(facts["accelerator"], "npu");
  EXPECT_EQ(facts["accelerators"], json::parse(R"([
      {"kind":"npu","vendor":"intel","count":1},
      {"kind":"npu","vendor":"huawei","model":"ascend","count":2}])"));
}

TEST_F(FactsTest, EmptyTreeLeavesKeysOut) {
  json facts = collect_facts(sources_, "0.1.0");
  SCOPED_TRACE(facts.dump());
  for (const char* key : {"cores", "cpu_model", "memory_mb", "disk_free_mb", "disk_total_mb", "os",
                          "battery_percent", "board"}) {
    EXPECT_FALSE(facts.contains(key)) << key;
  }
  EXPECT_EQ(facts["accelerator"], "cpu");
  EXPECT_EQ(facts["power"], "unknown");
  EXPECT_TRUE(facts.contains("arch"));
  EXPECT_EQ(facts["agent_version"], "0.1.0");
}

TEST_F(FactsTest, GarbageStaysSerializable) {
  put("proc/cpuinfo", "model name\t: caf\xc3\xa9\x01\xff chip\n");
  put("proc/meminfo", "MemTotal: lots\n");
  put("sys/devices/system/cpu/online", "7-3\n");
  put("etc/os-release", "PRETTY_NAME='Weird \\\"OS\\\"'\n");
  json facts = collect_facts(sources_, "0.1.0");
  EXPECT_NO_THROW((void)facts.dump());
  EXPECT_EQ(facts["cpu_model"], "caf???? chip");
  EXPECT_FALSE(facts.contains("memory_mb"));
  EXPECT_FALSE(facts.contains("cores"));
  EXPECT_EQ(facts["os"], "Weird \"OS\"");
}

TEST_F(FactsTest, StableFactsDropWhatMovesAllTheTime) {
  put("proc/meminfo", "MemTotal:        1024000 kB\n");
  put("sys/class/power_supply/BAT0/type", "Battery\n");
  put("sys/class/power_supply/BAT0/capacity", "80\n");
  sources_.data_dir = root_.string();
  json before = collect_facts(sources_, "0.1.0");
  put("sys/class/power_supply/BAT0/capacity", "79\n");
  put("big-file", std::string(2 << 20, 'x'));
  json after = collect_facts(sources_, "0.1.0");
  EXPECT_NE(before["battery_percent"], after["battery_percent"]);
  EXPECT_EQ(stable_facts(before), stable_facts(after));

  json stable = stable_facts(before);
  for (const char* key : {"disk_free_mb", "battery_percent", "power"}) {
    EXPECT_FALSE(stable.contains(key)) << key;
  }
  for (const char* key : {"arch", "memory_mb", "accelerator", "disk_total_mb", "agent_version"}) {
    EXPECT_TRUE(stable.contains(key)) << key;
  }
  EXPECT_EQ(stable_facts(json::array()), json::object());
}

TEST(NormalizeArchTest, Names) {
  EXPECT_EQ(normalize_arch("aarch64"), "arm64");
  EXPECT_EQ(normalize_arch("x86_64"), "x86_64");
  EXPECT_EQ(normalize_arch("amd64"), "x86_64");
  EXPECT_EQ(normalize_arch("armv7l"), "armv7");
  EXPECT_EQ(normalize_arch("armv6l"), "armv6");
  EXPECT_EQ(normalize_arch("i686"), "x86");
  EXPECT_EQ(normalize_arch("riscv64"), "riscv64");
}

TEST(RealMachineFactsTest, HasTheSchedulingBasics) {
  FactsSources sources;
  sources.data_dir = fs::temp_directory_path().string();
  json facts = collect_facts(sources, "0.1.0");
  std::cout << facts.dump() << "\n";
  ASSERT_TRUE(facts["arch"].is_string());
  EXPECT_FALSE(facts["arch"].get<std::string>().empty());
  ASSERT_TRUE(facts["cores"].is_number_integer());
  EXPECT_GT(facts["cores"].get<int64_t>(), 0);
  ASSERT_TRUE(facts["memory_mb"].is_number_integer());
  EXPECT_GT(facts["memory_mb"].get<int64_t>(), 0);
  EXPECT_GT(facts["disk_total_mb"].get<int64_t>(), 0);
}

}  // namespace
}  // namespace outpost::agent
