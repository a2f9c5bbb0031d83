#include "common/error.h"

#include <array>

namespace outpost {
namespace {

struct ErrcInfo {
  Errc code;
  std::string_view name;
  int http_status;
};

constexpr std::array kErrcTable = {
    ErrcInfo{Errc::kInvalidArgument, "invalid_argument", 400},
    ErrcInfo{Errc::kUnauthenticated, "unauthenticated", 401},
    ErrcInfo{Errc::kPermissionDenied, "permission_denied", 403},
    ErrcInfo{Errc::kNotFound, "not_found", 404},
    ErrcInfo{Errc::kAlreadyExists, "already_exists", 409},
    ErrcInfo{Errc::kConflict, "conflict", 409},
    ErrcInfo{Errc::kFailedPrecondition, "failed_precondition", 412},
    ErrcInfo{Errc::kPayloadTooLarge, "payload_too_large", 413},
    ErrcInfo{Errc::kRangeNotSatisfiable, "range_not_satisfiable", 416},
    ErrcInfo{Errc::kResourceExhausted, "resource_exhausted", 507},
    ErrcInfo{Errc::kUnavailable, "unavailable", 503},
    ErrcInfo{Errc::kDeadlineExceeded, "deadline_exceeded", 504},
    ErrcInfo{Errc::kIo, "io_error", 500},
    ErrcInfo{Errc::kInternal, "internal", 500},
};

const ErrcInfo& info(Errc code) {
  for (const auto& entry : kErrcTable) {
    if (entry.code == code) return entry;
  }
  return kErrcTable.back();
}

}  // namespace

std::string_view errc_name(Errc code) { return info(code).name; }

Errc errc_from_name(std::string_view name) {
  for (const auto& entry : kErrcTable) {
    if (entry.name == name) return entry.code;
  }
  return Errc::kInternal;
}

int errc_http_status(Errc code) { return info(code).http_status; }

Error Error::with_context(std::string_view context) const {
  Error copy = *this;
  copy.message = std::string(context) + ": " + message;
  return copy;
}

std::string Error::describe() const {
  // Context added on the way up may precede the field ("pushing model m 1.0.0: variants[0]:
  // ..."): name the field once.
  if (field.empty() || message.find(field + ":") != std::string::npos) return message;
  return field + ": " + message;
}

}  // namespace outpost
