// One error type for the whole project, and the Result<T> every fallible call returns.
// Errors carry a code (mapped to HTTP status and CLI exit codes), a message naming the
// thing and what was expected, and, for input errors, the path of the offending field.
#pragma once

#include <string>
#include <string_view>
#include <utility>

#include <tl/expected.hpp>

namespace outpost {

enum class Errc {
  kInvalidArgument,      // bad input from the caller (400)
  kUnauthenticated,      // missing or wrong credential (401)
  kPermissionDenied,     // credential fine, action not allowed (403)
  kNotFound,             // (404)
  kAlreadyExists,        // (409)
  kConflict,             // state does not allow it, e.g. immutable version changed (409)
  kFailedPrecondition,   // e.g. token used up or expired (412 mapped to 403 for tokens)
  kPayloadTooLarge,      // (413)
  kRangeNotSatisfiable,  // (416)
  kResourceExhausted,    // disk full, quota (507)
  kUnavailable,          // network down, server stopping (503)
  kDeadlineExceeded,     // (504)
  kIo,                   // local file system error (500)
  kInternal,             // a bug or a broken invariant we could not assert (500)
};

// Stable snake_case name used on the wire ("invalid_argument").
std::string_view errc_name(Errc code);
// Parses a wire name back; unknown names map to kInternal.
Errc errc_from_name(std::string_view name);
// HTTP status code for an error code.
int errc_http_status(Errc code);

struct Error {
  Errc code = Errc::kInternal;
  std::string message;
  std::string field;  // dotted path of the offending input field, empty when not about input

  // Returns a copy whose message is prefixed with what the caller was doing:
  // Error{.., "disk full"}.with_context("pushing model defect-net") ->
  // "pushing model defect-net: disk full".
  [[nodiscard]] Error with_context(std::string_view context) const;
  // "message" or "field: message" when the message does not already start with the field.
  [[nodiscard]] std::string describe() const;
};

template <typename T>
using Result = tl::expected<T, Error>;
using Status = tl::expected<void, Error>;

[[nodiscard]] inline tl::unexpected<Error> make_error(Errc code, std::string message,
                                                      std::string field = {}) {
  return tl::unexpected<Error>(Error{code, std::move(message), std::move(field)});
}

[[nodiscard]] inline tl::unexpected<Error> make_error(Error error) {
  return tl::unexpected<Error>(std::move(error));
}

// Ok value for Status-returning functions: `return ok();`
[[nodiscard]] inline Status ok() { return {}; }

}  // namespace outpost

// Propagates an error from an expression returning Result/Status; evaluates to nothing.
#define OUTPOST_TRY(expr)                                                   \
  do {                                                                      \
    auto outpost_try_result_ = (expr);                                      \
    if (!outpost_try_result_)                                               \
      return ::outpost::make_error(std::move(outpost_try_result_).error()); \
  } while (0)
