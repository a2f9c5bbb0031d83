// Picks, per device, the best variant of a model version: the variant whose selector and
// needs the device meets, ranked accelerator match first, then precision, then specificity.
#pragma once

#include <cstddef>
#include <string>

#include "common/error.h"
#include "server/scheduler/selector.h"
#include "store/store.h"

namespace outpost::scheduler {

struct VariantChoice {
  size_t index = 0;             // position in ModelVersion::variants
  store::ModelVariant variant;  // a copy of the chosen variant
  std::string explanation;      // why this one, for `device show` and logs
};

// A variant is eligible when every selector key equals the device's attribute (a `precision`
// key only describes the variant unless the device has a precision attribute) and its needs
// are met: min_memory_mb <= the memory_mb attribute when known, accelerator equal to the
// device's, min_<attr> <= a numeric attribute when known, any other key equal to the
// device's attribute. Among eligible variants the best is the one that (1) names the device's
// accelerator when that is not cpu, then (2) has the higher precision (fp32 > fp16/bf16 > int8
// > unspecified), then (3) matches more selector keys, then (4) comes first.
//
// Errors: kFailedPrecondition when none fits, with a message listing every variant and why:
// "no variant of defect-net 1.4.0 fits device d-12: [0] accelerator=gpu: device has
// accelerator=cpu; [1] accelerator=cpu: needs 2048 MB memory, device has 1024 MB".
[[nodiscard]] Result<VariantChoice> choose_variant(const store::ModelVersion& version,
                                                   const store::Device& device);

// The same with the device's attributes already computed (device_attributes()).
[[nodiscard]] Result<VariantChoice> choose_variant(const store::ModelVersion& version,
                                                   const std::string& device_id,
                                                   const Attributes& attributes);

}  // namespace outpost::scheduler
