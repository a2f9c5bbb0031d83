// ONNX Runtime behind InferenceSession, through its C API. The runtime library is opened
// with dlopen the first time a model is loaded, so an agent that serves no model never maps
// it (ONNX Runtime is ~45 MB of code and allocates on start).
#pragma once

#include <memory>
#include <string>

#include "agent/serve/inference_session.h"
#include "common/error.h"

namespace outpost::agent::serve {

// Where the runtime comes from: `library` if set, else $OUTPOST_ONNXRUNTIME, else
// "libonnxruntime.so.1" found through the binary's RUNPATH (the build's third_party/
// folder) or the system's library path. Must be called before the first load to matter.
void set_onnxruntime_library(const std::string& library);

// True once the runtime was opened (for tests and the footprint bench).
bool onnxruntime_loaded();

// The runtime's version string ("1.30.0"); opens the runtime. Errors as for load.
[[nodiscard]] Result<std::string> onnxruntime_version();

// Loads `path`: opens the runtime if needed (kUnavailable naming every place looked at when
// it cannot be found or is too old for API version 29), creates the session (kInvalidArgument
// "model <path>: <runtime's message>" for a file the runtime refuses), reads the inputs and
// outputs. Sessions are created without spinning thread pools; `intra_op_threads` sets the
// pool size for one inference.
[[nodiscard]] Result<std::shared_ptr<InferenceSession>> load_onnx_session(
    const std::string& path, const SessionOptions& options);

}  // namespace outpost::agent::serve
