// The status report a device drafts (agent/device_api): the "artifacts" it holds, which the
// server offers deltas from, are capped at 64 and part of the signature that decides whether
// a report is sent.
#include "agent/device_api.h"

#include <algorithm>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/digest.h"

namespace outpost::agent {
namespace {

using json = nlohmann::json;

std::vector<std::string> digests(size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back("sha256:" + sha256_hex(std::to_string(i)));
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<DeploymentReport> one_running() {
  DeploymentReport r;
  r.name = "cam";
  r.revision = 3;
  r.key = "r3-0123456789";
  r.phase = "running";
  r.current_revision = 3;
  return {r};
}

TEST(StatusReportTest, ListsTheArtifactsItHolds) {
  const auto held = digests(3);
  auto draft = draft_status_report(7, 1000, "1.2.3", one_running(), held);
  ASSERT_TRUE(draft.report.contains("artifacts")) << draft.report.dump();
  EXPECT_EQ(draft.report["artifacts"], json(held));
  EXPECT_EQ(draft.report["generation"], 7);
  EXPECT_EQ(draft.report["deployments"].size(), 1u);
}

TEST(StatusReportTest, HoldingNothingSendsNoArtifactsAndKeepsTheOldSignature) {
  // A device with no blobs reports as an agent from before deltas did: same body and signature.
  auto without = draft_status_report(7, 1000, "1.2.3", one_running());
  auto empty = draft_status_report(7, 1000, "1.2.3", one_running(), {});
  EXPECT_FALSE(without.report.contains("artifacts"));
  EXPECT_EQ(empty.report, without.report);
  EXPECT_EQ(empty.signature, without.signature);
}

TEST(StatusReportTest, AtMostTheFirst64ArtifactsAreSent) {
  const auto held = digests(100);
  auto draft = draft_status_report(7, 1000, "1.2.3", one_running(), held);
  ASSERT_TRUE(draft.report["artifacts"].is_array());
  ASSERT_EQ(draft.report["artifacts"].size(), 64u);
  for (size_t i = 0; i < 64; ++i) EXPECT_EQ(draft.report["artifacts"][i], held[i]) << i;
  // Exactly 64 are all sent.
  auto full = draft_status_report(7, 1000, "1.2.3", one_running(), digests(64));
  EXPECT_EQ(full.report["artifacts"].size(), 64u);
}

TEST(StatusReportTest, WhatItHoldsIsPartOfTheSignature) {
  const auto held = digests(10);
  const auto base = draft_status_report(7, 1000, "1.2.3", one_running(), held);
  // The clock moving alone does not make a new report due...
  EXPECT_EQ(draft_status_report(7, 5000, "1.2.3", one_running(), held).signature, base.signature);
  // ...but a blob that arrived or went does: the server must learn of new bases.
  auto more = held;
  more.push_back("sha256:" + std::string(64, 'f'));
  EXPECT_NE(draft_status_report(7, 1000, "1.2.3", one_running(), more).signature, base.signature);
  auto fewer = held;
  fewer.pop_back();
  EXPECT_NE(draft_status_report(7, 1000, "1.2.3", one_running(), fewer).signature, base.signature);
  auto other = held;
  other[4] = "sha256:" + std::string(64, '0');
  EXPECT_NE(draft_status_report(7, 1000, "1.2.3", one_running(), other).signature, base.signature);
  EXPECT_NE(draft_status_report(7, 1000, "1.2.3", one_running()).signature, base.signature);
  EXPECT_TRUE(report_due(draft_status_report(7, 1000, "1.2.3", one_running(), more).signature,
                         base.signature, /*periodic=*/false, /*queue_empty=*/true));
}

TEST(StatusReportTest, BlobsPastThe64thDoNotChangeTheSignature) {
  // What is not sent cannot tell the server anything: no report is due for it.
  auto held = digests(80);
  const auto base = draft_status_report(7, 1000, "1.2.3", one_running(), held);
  held.back() = "sha256:" + std::string(64, 'f');  // sorts last, past the cap
  const auto later = draft_status_report(7, 1000, "1.2.3", one_running(), held);
  EXPECT_EQ(later.report, base.report);
  EXPECT_EQ(later.signature, base.signature);
}

}  // namespace
}  // namespace outpost::agent
