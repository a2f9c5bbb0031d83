// The seam between the model server and a model runtime: a loaded model that declares its
// inputs and outputs and runs tensors through. ONNX Runtime implements it (onnx_session.h);
// tests use an in-memory fake.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "agent/serve/tensor.h"
#include "common/error.h"

namespace outpost::agent::serve {

class InferenceSession {
 public:
  virtual ~InferenceSession() = default;
  // Fixed after load; safe to read from any thread.
  virtual const std::vector<TensorSpec>& inputs() const = 0;
  virtual const std::vector<TensorSpec>& outputs() const = 0;
  // Runs one request. `inputs` are in inputs() order and already match its datatypes and
  // shapes; `output_names` selects outputs (empty = all, in outputs() order). Thread-safe:
  // the server calls it from several threads at once. Errors: kInternal with the runtime's
  // message (a model that fails on valid input).
  [[nodiscard]] virtual Result<std::vector<Tensor>> run(
      const std::vector<Tensor>& inputs, const std::vector<std::string>& output_names) = 0;
};

struct SessionOptions {
  int intra_op_threads = 1;  // threads one inference may use; 1 keeps a small device calm
};

// Loads a model file into a session. Errors name the file and what the runtime said.
using SessionLoader = std::function<Result<std::shared_ptr<InferenceSession>>(
    const std::string& path, const SessionOptions& options)>;

}  // namespace outpost::agent::serve
