// What both store backends write into and read from their JSON-valued columns (labels, a user's
// sites, a secret's key names), and how they name times in messages. Internal to the store
// module.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "store/store.h"

namespace outpost::store::internal {

// "2024-05-01T12:00:00Z" (with ".123" when the milliseconds are not zero).
std::string iso_time(int64_t ms);
int64_t wall_clock_ms();

// kInvalidArgument (field "labels") when a label is not valid UTF-8.
[[nodiscard]] Result<std::string> labels_to_json(const Labels& labels);
// kInternal naming `owner` when the stored text is not a JSON object of strings.
[[nodiscard]] Result<Labels> labels_from_json(const std::string& text, const std::string& owner);
// Every label of `want` is in `have` with the same value.
bool labels_match(const Labels& have, const Labels& want);

// A JSON array of strings (a user's site patterns, a secret's key names); kInvalidArgument
// naming `field` when a string is not valid UTF-8.
[[nodiscard]] Result<std::string> strings_to_json(const std::vector<std::string>& strings,
                                                  const std::string& field);
// kInternal naming `owner` and `what` when the stored text is not a JSON array of strings.
[[nodiscard]] Result<std::vector<std::string>> strings_from_json(const std::string& text,
                                                                 const std::string& owner,
                                                                 const std::string& what);

}  // namespace outpost::store::internal
