#include "http/file_response.h"

#include <algorithm>

namespace outpost::http {

Result<std::optional<ByteRange>> parse_range(const std::string& header, uint64_t size) {
  constexpr std::string_view kPrefix = "bytes=";
  if (header.empty() || header.compare(0, kPrefix.size(), kPrefix) != 0) return std::nullopt;
  std::string spec = header.substr(kPrefix.size());
  if (spec.find(',') != std::string::npos) return std::nullopt;  // multi-range: send it all
  auto dash = spec.find('-');
  if (dash == std::string::npos) return std::nullopt;
  auto unsatisfiable = [&] {
    return make_error(Errc::kRangeNotSatisfiable, "range " + header + " is outside the artifact (" +
                                                      std::to_string(size) + " bytes)");
  };
  try {
    std::string a = spec.substr(0, dash), b = spec.substr(dash + 1);
    ByteRange range;
    if (a.empty()) {  // suffix: last n bytes
      uint64_t n = std::stoull(b);
      if (n == 0 || size == 0) return unsatisfiable();
      n = std::min(n, size);
      range.first = size - n;
      range.length = n;
    } else {
      uint64_t first = std::stoull(a);
      if (first >= size) return unsatisfiable();
      uint64_t last = b.empty() ? size - 1 : std::min<uint64_t>(std::stoull(b), size - 1);
      if (last < first) return std::nullopt;
      range.first = first;
      range.length = last - first + 1;
    }
    return std::optional<ByteRange>(range);
  } catch (...) {
    return std::nullopt;
  }
}

Response blob_response(const Request& request, const std::string& digest, const std::string& path,
                       uint64_t size) {
  Response resp;
  resp.content_type = "application/octet-stream";
  resp.headers.emplace_back("Accept-Ranges", "bytes");
  resp.headers.emplace_back("ETag", "\"" + digest + "\"");
  resp.headers.emplace_back("Cache-Control", "public, max-age=31536000, immutable");
  auto range = parse_range(request.header("range"), size);
  if (!range) {
    Response err = Response::error(range.error());
    err.headers.emplace_back("Content-Range", "bytes */" + std::to_string(size));
    return err;
  }
  if (*range && !request.header("if-range").empty() &&
      request.header("if-range") != "\"" + digest + "\"") {
    *range = std::nullopt;  // the client holds another version: send it all
  }
  FileRange file{path, 0, size};
  if (*range) {
    resp.status = 206;
    file.offset = (*range)->first;
    file.length = (*range)->length;
    resp.headers.emplace_back("Content-Range", "bytes " + std::to_string(file.offset) + "-" +
                                                   std::to_string(file.offset + file.length - 1) +
                                                   "/" + std::to_string(size));
  }
  resp.file = file;
  return resp;
}

}  // namespace outpost::http
