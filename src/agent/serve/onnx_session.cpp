#include "agent/serve/onnx_session.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#include <onnxruntime_c_api.h>

namespace outpost::agent::serve {
namespace {

// The opened runtime. Process-wide by nature: ONNX Runtime wants one OrtEnv per process and
// cannot be unloaded safely, so it is opened once and kept until exit.
struct OrtRuntime {
  const OrtApi* api = nullptr;
  OrtEnv* env = nullptr;
  OrtMemoryInfo* cpu = nullptr;
  std::string version;
};

std::mutex g_mu;
std::string g_library;            // guarded by g_mu
OrtRuntime* g_runtime = nullptr;  // guarded by g_mu; never freed once set
std::string g_open_error;         // guarded by g_mu: why opening failed (tried again on next load)

std::string take_status(const OrtApi* api, OrtStatus* status) {
  std::string message = api->GetErrorMessage(status);
  api->ReleaseStatus(status);
  return message;
}

// For calls whose failure leaves a safe default in place (a missing shape reads as dynamic).
void release_status(const OrtApi* api, OrtStatus* status) {
  if (status) api->ReleaseStatus(status);
}

Result<OrtRuntime*> open_runtime() {
  std::lock_guard lock(g_mu);
  if (g_runtime) return g_runtime;
  std::vector<std::string> candidates;
  if (!g_library.empty()) {
    candidates.push_back(g_library);
  } else {
    if (const char* env = std::getenv("OUTPOST_ONNXRUNTIME"); env && *env) {
      candidates.emplace_back(env);
    }
    candidates.emplace_back("libonnxruntime.so.1");
#ifdef OUTPOST_ONNXRUNTIME_DIR
    candidates.emplace_back(std::string(OUTPOST_ONNXRUNTIME_DIR) + "/libonnxruntime.so.1");
#endif
  }
  void* handle = nullptr;
  std::string tried;
  for (const auto& path : candidates) {
    handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle) break;
    const char* why = ::dlerror();
    tried += (tried.empty() ? "" : "; ") + path + ": " + (why ? why : "not found");
  }
  if (!handle) {
    return make_error(Errc::kUnavailable,
                      "ONNX Runtime is not available (" + tried +
                          "); run scripts/install-deps or point OUTPOST_ONNXRUNTIME or "
                          "--onnxruntime at libonnxruntime.so.1");
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(::dlsym(handle, "OrtGetApiBase"));
  if (!get_base) {
    return make_error(Errc::kUnavailable, "the ONNX Runtime library has no OrtGetApiBase");
  }
  const OrtApiBase* base = get_base();
  auto runtime = std::make_unique<OrtRuntime>();
  runtime->version = base->GetVersionString();
  runtime->api = base->GetApi(ORT_API_VERSION);
  if (!runtime->api) {
    return make_error(Errc::kUnavailable, "ONNX Runtime " + runtime->version +
                                              " does not serve C API version " +
                                              std::to_string(ORT_API_VERSION) + " (1.30 or newer)");
  }
  const OrtApi* api = runtime->api;
  // The runtime's own log would repeat on stderr what every failing call returns to us (and
  // we report with context); only its fatal messages are let through.
  if (OrtStatus* s = api->CreateEnv(ORT_LOGGING_LEVEL_FATAL, "outpost", &runtime->env)) {
    return make_error(Errc::kUnavailable, "ONNX Runtime environment: " + take_status(api, s));
  }
  // No usage events to the runtime's vendor: a site network may not even resolve its name, and
  // the lookup otherwise holds up the agent's exit by seconds.
  if (OrtStatus* s = api->DisableTelemetryEvents(runtime->env)) api->ReleaseStatus(s);
  if (OrtStatus* s =
          api->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &runtime->cpu)) {
    return make_error(Errc::kUnavailable, "ONNX Runtime memory info: " + take_status(api, s));
  }
  g_runtime = runtime.release();
  return g_runtime;
}

// Our datatypes and ONNX Runtime's element types, both ways.
constexpr std::pair<DataType, ONNXTensorElementDataType> kOnnxTypes[] = {
    {DataType::kFp32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {DataType::kFp64, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
    {DataType::kFp16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16},
    {DataType::kBf16, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16},
    {DataType::kBool, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL},
    {DataType::kUint8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
    {DataType::kUint16, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16},
    {DataType::kUint32, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32},
    {DataType::kUint64, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64},
    {DataType::kInt8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8},
    {DataType::kInt16, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16},
    {DataType::kInt32, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32},
    {DataType::kInt64, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
    {DataType::kBytes, ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING},
};

std::optional<DataType> from_onnx(ONNXTensorElementDataType t) {
  for (const auto& [ours, theirs] : kOnnxTypes) {
    if (theirs == t) return ours;
  }
  return std::nullopt;
}

ONNXTensorElementDataType to_onnx(DataType t) {
  for (const auto& [ours, theirs] : kOnnxTypes) {
    if (ours == t) return theirs;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

class OnnxSession final : public InferenceSession {
 public:
  OnnxSession(OrtRuntime* rt, OrtSession* session) : rt_(rt), session_(session) {}
  ~OnnxSession() override {
    if (session_) rt_->api->ReleaseSession(session_);
  }
  OnnxSession(const OnnxSession&) = delete;
  OnnxSession& operator=(const OnnxSession&) = delete;

  Status describe(const std::string& path) {
    const OrtApi* api = rt_->api;
    OrtAllocator* alloc = nullptr;
    if (OrtStatus* s = api->GetAllocatorWithDefaultOptions(&alloc)) {
      return make_error(Errc::kInternal, take_status(api, s));
    }
    for (bool is_input : {true, false}) {
      size_t count = 0;
      OrtStatus* s = is_input ? api->SessionGetInputCount(session_, &count)
                              : api->SessionGetOutputCount(session_, &count);
      if (s) return make_error(Errc::kInternal, take_status(api, s));
      for (size_t i = 0; i < count; ++i) {
        TensorSpec spec;
        char* name = nullptr;
        s = is_input ? api->SessionGetInputName(session_, i, alloc, &name)
                     : api->SessionGetOutputName(session_, i, alloc, &name);
        if (s) return make_error(Errc::kInternal, take_status(api, s));
        spec.name = name;
        release_status(api, api->AllocatorFree(alloc, name));
        OrtTypeInfo* info = nullptr;
        s = is_input ? api->SessionGetInputTypeInfo(session_, i, &info)
                     : api->SessionGetOutputTypeInfo(session_, i, &info);
        if (s) return make_error(Errc::kInternal, take_status(api, s));
        ONNXType kind = ONNX_TYPE_UNKNOWN;
        release_status(api, api->GetOnnxTypeFromTypeInfo(info, &kind));
        const OrtTensorTypeAndShapeInfo* tinfo = nullptr;
        if (kind == ONNX_TYPE_TENSOR && !api->CastTypeInfoToTensorInfo(info, &tinfo) && tinfo) {
          ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
          release_status(api, api->GetTensorElementType(tinfo, &et));
          spec.type = from_onnx(et).value_or(DataType::kUnknown);
          size_t rank = 0;
          release_status(api, api->GetDimensionsCount(tinfo, &rank));
          spec.shape.assign(rank, -1);
          if (rank > 0) release_status(api, api->GetDimensions(tinfo, spec.shape.data(), rank));
          for (auto& d : spec.shape) d = d < 0 ? -1 : d;
        }
        api->ReleaseTypeInfo(info);
        if (kind != ONNX_TYPE_TENSOR) {
          return make_error(Errc::kInvalidArgument,
                            "model " + path + ": " + (is_input ? "input '" : "output '") +
                                spec.name +
                                "' is not a tensor (sequences and maps are not served)");
        }
        (is_input ? inputs_ : outputs_).push_back(std::move(spec));
        (is_input ? input_names_ : output_names_).push_back(nullptr);
      }
    }
    for (size_t i = 0; i < inputs_.size(); ++i) input_names_[i] = inputs_[i].name.c_str();
    for (size_t i = 0; i < outputs_.size(); ++i) output_names_[i] = outputs_[i].name.c_str();
    return ok();
  }

  const std::vector<TensorSpec>& inputs() const override { return inputs_; }
  const std::vector<TensorSpec>& outputs() const override { return outputs_; }

  Result<std::vector<Tensor>> run(const std::vector<Tensor>& inputs,
                                  const std::vector<std::string>& wanted) override {
    const OrtApi* api = rt_->api;
    if (inputs.size() != inputs_.size()) {
      return make_error(Errc::kInvalidArgument, "expected " + std::to_string(inputs_.size()) +
                                                    " inputs, got " +
                                                    std::to_string(inputs.size()));
    }
    std::vector<OrtValue*> in(inputs.size(), nullptr);
    std::vector<const char*> out_names;
    if (wanted.empty()) {
      out_names = output_names_;
    } else {
      for (const auto& w : wanted) {
        for (const auto& spec : outputs_) {
          if (spec.name == w) out_names.push_back(spec.name.c_str());
        }
      }
    }
    std::vector<OrtValue*> out(out_names.size(), nullptr);
    auto release = [&] {
      for (OrtValue* v : in) {
        if (v) api->ReleaseValue(v);
      }
      for (OrtValue* v : out) {
        if (v) api->ReleaseValue(v);
      }
    };
    for (size_t i = 0; i < inputs.size(); ++i) {
      const Tensor& t = inputs[i];
      if (t.type == DataType::kBytes) {
        if (auto made = string_tensor(t, in[i]); !made) {
          release();
          return make_error(made.error());
        }
        continue;
      }
      // The runtime reads inputs only; the cast is what its C signature asks for.
      void* data = const_cast<uint8_t*>(t.data.data());
      if (OrtStatus* s =
              api->CreateTensorWithDataAsOrtValue(rt_->cpu, data, t.data.size(), t.shape.data(),
                                                  t.shape.size(), to_onnx(t.type), &in[i])) {
        release();
        return make_error(Errc::kInvalidArgument, "input '" + t.name + "': " + take_status(api, s));
      }
    }
    if (OrtStatus* s = api->Run(session_, nullptr, input_names_.data(), in.data(), in.size(),
                                out_names.data(), out_names.size(), out.data())) {
      release();
      return make_error(Errc::kInternal, "the model failed: " + take_status(api, s));
    }
    std::vector<Tensor> result;
    result.reserve(out.size());
    for (size_t i = 0; i < out.size(); ++i) {
      Tensor t;
      t.name = out_names[i];
      OrtTensorTypeAndShapeInfo* info = nullptr;
      if (OrtStatus* s = api->GetTensorTypeAndShape(out[i], &info)) {
        release();
        return make_error(Errc::kInternal, "output '" + t.name + "': " + take_status(api, s));
      }
      ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      size_t rank = 0;
      size_t count = 0;
      release_status(api, api->GetTensorElementType(info, &et));
      release_status(api, api->GetDimensionsCount(info, &rank));
      t.shape.assign(rank, 0);
      if (rank > 0) release_status(api, api->GetDimensions(info, t.shape.data(), rank));
      release_status(api, api->GetTensorShapeElementCount(info, &count));
      api->ReleaseTensorTypeAndShapeInfo(info);
      auto type = from_onnx(et);
      if (!type) {
        release();
        return make_error(Errc::kInternal,
                          "output '" + t.name + "' has a datatype this server cannot send");
      }
      t.type = *type;
      if (t.type == DataType::kBytes) {
        if (auto read = read_strings(out[i], count, t); !read) {
          release();
          return make_error(read.error());
        }
        result.push_back(std::move(t));
        continue;
      }
      void* data = nullptr;
      if (OrtStatus* s = api->GetTensorMutableData(out[i], &data)) {
        release();
        return make_error(Errc::kInternal, "output '" + t.name + "': " + take_status(api, s));
      }
      const size_t bytes = count * datatype_size(t.type);
      t.data.resize(bytes);
      if (bytes > 0) std::memcpy(t.data.data(), data, bytes);
      result.push_back(std::move(t));
    }
    release();
    return result;
  }

 private:
  // A STRING tensor holding `t`'s elements (exact bytes: embedded NULs survive).
  Status string_tensor(const Tensor& t, OrtValue*& value) {
    const OrtApi* api = rt_->api;
    auto elements = bytes_elements(t.data);
    if (!elements) {
      return make_error(Errc::kInvalidArgument, "input '" + t.name + "': malformed BYTES data");
    }
    OrtAllocator* alloc = nullptr;
    if (OrtStatus* s = api->GetAllocatorWithDefaultOptions(&alloc)) {
      return make_error(Errc::kInternal, take_status(api, s));
    }
    if (OrtStatus* s = api->CreateTensorAsOrtValue(alloc, t.shape.data(), t.shape.size(),
                                                   ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING, &value)) {
      return make_error(Errc::kInvalidArgument, "input '" + t.name + "': " + take_status(api, s));
    }
    for (size_t k = 0; k < elements->size(); ++k) {
      const std::string_view e = (*elements)[k];
      char* buffer = nullptr;
      if (OrtStatus* s = api->GetResizedStringTensorElementBuffer(value, k, e.size(), &buffer)) {
        return make_error(Errc::kInternal, "input '" + t.name + "': " + take_status(api, s));
      }
      if (!e.empty()) std::memcpy(buffer, e.data(), e.size());
    }
    return ok();
  }

  // A STRING output's `count` elements into `t.data` (length-prefixed).
  Status read_strings(const OrtValue* value, size_t count, Tensor& t) {
    const OrtApi* api = rt_->api;
    size_t total = 0;
    if (OrtStatus* s = api->GetStringTensorDataLength(value, &total)) {
      return make_error(Errc::kInternal, "output '" + t.name + "': " + take_status(api, s));
    }
    std::string chars(total, '\0');
    std::vector<size_t> offsets(count, 0);
    if (count > 0) {
      if (OrtStatus* s =
              api->GetStringTensorContent(value, chars.data(), total, offsets.data(), count)) {
        return make_error(Errc::kInternal, "output '" + t.name + "': " + take_status(api, s));
      }
    }
    t.data.clear();
    t.data.reserve(total + 4 * count);
    for (size_t k = 0; k < count; ++k) {
      const size_t end = k + 1 < count ? offsets[k + 1] : total;
      append_bytes_element(t.data, std::string_view(chars).substr(offsets[k], end - offsets[k]));
    }
    return ok();
  }

  OrtRuntime* rt_;
  OrtSession* session_;
  std::vector<TensorSpec> inputs_;
  std::vector<TensorSpec> outputs_;
  std::vector<const char*> input_names_;   // point into inputs_
  std::vector<const char*> output_names_;  // point into outputs_
};

}  // namespace

void set_onnxruntime_library(const std::string& library) {
  std::lock_guard lock(g_mu);
  g_library = library;
}

bool onnxruntime_loaded() {
  std::lock_guard lock(g_mu);
  return g_runtime != nullptr;
}

Result<std::string> onnxruntime_version() {
  auto rt = open_runtime();
  if (!rt) return make_error(rt.error());
  return (*rt)->version;
}

Result<std::shared_ptr<InferenceSession>> load_onnx_session(const std::string& path,
                                                            const SessionOptions& options) {
  auto opened = open_runtime();
  if (!opened) return make_error(opened.error());
  OrtRuntime* rt = *opened;
  const OrtApi* api = rt->api;
  OrtSessionOptions* so = nullptr;
  if (OrtStatus* s = api->CreateSessionOptions(&so)) {
    return make_error(Errc::kInternal, "session options: " + take_status(api, s));
  }
  std::string failure;
  auto check = [&](OrtStatus* s) {
    if (!s) return;
    std::string message = take_status(api, s);
    if (failure.empty()) failure = std::move(message);
  };
  check(api->SetIntraOpNumThreads(so, options.intra_op_threads < 1 ? 1 : options.intra_op_threads));
  check(api->SetInterOpNumThreads(so, 1));
  check(api->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_ALL));
  // Idle pool threads must sleep, not spin: a device's CPU belongs to its workloads.
  check(api->AddSessionConfigEntry(so, "session.intra_op.allow_spinning", "0"));
  check(api->AddSessionConfigEntry(so, "session.inter_op.allow_spinning", "0"));
  if (!failure.empty()) {
    api->ReleaseSessionOptions(so);
    return make_error(Errc::kInternal, "session options: " + failure);
  }
  OrtSession* session = nullptr;
  OrtStatus* s = api->CreateSession(rt->env, path.c_str(), so, &session);
  api->ReleaseSessionOptions(so);
  if (s) {
    std::string why = take_status(api, s);
    // The runtime's words alone leave an operator guessing what to do about it.
    if (why.find("Could not find an implementation for") != std::string::npos) {
      why += " (ONNX Runtime " + rt->version +
             " has no CPU kernel for this operator at this opset with these input types; "
             "models exported at opset 6 or older often hit this: re-export at a newer opset)";
    }
    return make_error(Errc::kInvalidArgument, "model " + path + ": " + why);
  }
  auto out = std::make_shared<OnnxSession>(rt, session);
  OUTPOST_TRY(out->describe(path));
  return std::shared_ptr<InferenceSession>(std::move(out));
}

}  // namespace outpost::agent::serve
