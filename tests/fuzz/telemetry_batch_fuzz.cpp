// Fuzz target for the telemetry batch decoder the control plane runs on every device upload:
// any bytes, taken both as a zstd frame and as the JSON inside one, must give a batch that
// keeps decode_batch's promises or an error -- never a crash, a hang or an exception -- and an
// accepted batch must encode back to records that decode to the same JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "common/telemetry_batch.h"

namespace {

namespace telemetry = outpost::telemetry;

void check(bool condition) {
  if (!condition) std::abort();
}

void check_accepted(const telemetry::Batch& batch) {
  check(batch.first_seq >= 1 && batch.first_seq <= batch.last_seq);
  check(batch.records.size() <= telemetry::kMaxRecordsPerBatch);
  int64_t previous = 0;
  std::vector<std::string> texts;
  for (const auto& r : batch.records) {
    check(r.seq > previous && r.seq >= batch.first_seq && r.seq <= batch.last_seq);
    previous = r.seq;
    texts.push_back(telemetry::record_to_json(r).dump());
  }
  auto frame = telemetry::compress(
      telemetry::batch_json(batch.first_seq, batch.last_seq, batch.dropped, texts), 1);
  check(frame.has_value());
  auto again = telemetry::decode_batch(*frame);
  check(again.has_value());
  check(again->dropped == batch.dropped);
  check(again->records.size() == batch.records.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    check(telemetry::record_to_json(again->records[i]).dump() == texts[i]);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  if (auto batch = telemetry::decode_batch(bytes)) check_accepted(*batch);
  auto frame = telemetry::compress(bytes, 1);
  check(frame.has_value());
  auto batch = telemetry::decode_batch(*frame);
  if (batch) {
    check_accepted(*batch);
  } else {
    check(!batch.error().message.empty() && !batch.error().field.empty());
  }
  return 0;
}
