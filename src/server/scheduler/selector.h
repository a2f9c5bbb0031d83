// Which devices a deployment targets, and the device attributes that selectors (deployment
// and model-variant ones) are matched against.
#pragma once

#include <map>
#include <string>
#include <string_view>

#include "common/error.h"
#include "server/deployments/manifest.h"
#include "store/store.h"

namespace outpost::scheduler {

// Attribute name -> value, e.g. {"accelerator":"gpu","arch":"x86_64","site":"plant-7"}.
using Attributes = std::map<std::string, std::string>;

// A device's attributes: the scalar top-level fields of its facts (strings as they are,
// numbers and booleans as text; nested values and nulls skipped), then its labels on top
// (labels win, so an operator can correct a fact), then "site". A device that reports no
// accelerator has accelerator=cpu. Unreadable facts count as none.
Attributes device_attributes(const store::Device& device);

// True when the deployment's selector targets the device: any site glob (fnmatch) matches
// device.site (no globs: any site), every selector label equals the device's label (labels
// only, not facts), and the device id is listed (no ids: any device).
bool selector_matches(const deployments::Manifest::Selector& selector, const store::Device& device);

// Parses "accelerator=gpu,arch=arm64" into {"accelerator":"gpu","arch":"arm64"}. The empty
// string is the empty selector (matches anything). Keys and values are 1-128 characters from
// letters, digits, '-', '.', '_', '/'; empty pairs, empty keys or values, other characters
// and repeated keys are refused (kInvalidArgument naming the pair).
[[nodiscard]] Result<std::map<std::string, std::string>> parse_selector(std::string_view text);

// "accelerator=gpu,arch=arm64" (keys sorted); "" for the empty selector.
std::string format_selector(const std::map<std::string, std::string>& selector);

// True when every selector key has the same value in `attributes`.
bool attributes_match(const std::map<std::string, std::string>& selector,
                      const Attributes& attributes);

}  // namespace outpost::scheduler
