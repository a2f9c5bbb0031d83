// A content-addressed blob as an HTTP answer: whole, or the one byte range the client asked
// for (Range resume), with the validators a cache needs. The control plane's artifact route and
// a relay's artifact cache answer exactly alike through it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/error.h"
#include "http/http_server.h"

namespace outpost::http {

struct ByteRange {
  uint64_t first = 0;
  uint64_t length = 0;
};

// Parses a single "bytes=a-b" / "bytes=a-" / "bytes=-n" range. nullopt: ignore the header
// (serve the whole body); error (kRangeNotSatisfiable): outside the blob.
[[nodiscard]] Result<std::optional<ByteRange>> parse_range(const std::string& header,
                                                           uint64_t size);

// 200 with the whole file, 206 with the requested range (honouring If-Range against the
// digest's ETag), or 416; `path` holds `size` bytes of the blob named `digest`.
Response blob_response(const Request& request, const std::string& digest, const std::string& path,
                       uint64_t size);

}  // namespace outpost::http
