// TensorRT backend: enqueueV3 on a CUDA stream, pinned host memory on desktop GPUs and mapped
// zero-copy memory on Jetson (integrated GPU), an optional CUDA graph (re-captured whenever the
// batch or the buffers change), and keyedge's preprocessing kernel on the GPU. Every CUDA
// resource is owned by an RAII handle, so nothing leaks when a constructor or allocate() throws.
//
// What the engine's first input gets, by the artifact's input spec:
//   kernel mode (keyedge export --mode kernel)  the kernel's key gather + normalisation, NCHW float
//   float NCHW                                  the kernel's uint8 -> [0,1] conversion (no key)
//   uint8 NHWC                                  the application's bytes as they are
//   uint8 NCHW, float NHWC                      converted on the host, then copied
// The engine's bindings are checked against the manifest at load.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "internal.hpp"
#include "keyedge_preprocess.h"

namespace keyedge {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(err));
}

// ---- RAII handles for CUDA resources -------------------------------------------------------
struct DeviceFree { void operator()(void* p) const noexcept { cudaFree(p); } };
struct HostFree { void operator()(void* p) const noexcept { cudaFreeHost(p); } };
struct StreamDestroy { void operator()(CUstream_st* s) const noexcept { cudaStreamDestroy(s); } };
struct GraphExecDestroy { void operator()(CUgraphExec_st* g) const noexcept { cudaGraphExecDestroy(g); } };
struct GraphDestroy { void operator()(CUgraph_st* g) const noexcept { cudaGraphDestroy(g); } };
using DeviceBuffer = std::unique_ptr<void, DeviceFree>;
using HostBuffer = std::unique_ptr<void, HostFree>;
using Stream = std::unique_ptr<CUstream_st, StreamDestroy>;
using GraphExec = std::unique_ptr<CUgraphExec_st, GraphExecDestroy>;

// Device memory that holds the key: overwritten before it is freed.
struct SecretDeviceBuffer {
  DeviceBuffer buffer;
  size_t size = 0;
  SecretDeviceBuffer() = default;
  SecretDeviceBuffer(DeviceBuffer b, size_t n) : buffer(std::move(b)), size(n) {}
  SecretDeviceBuffer(SecretDeviceBuffer&&) = default;
  SecretDeviceBuffer& operator=(SecretDeviceBuffer&& other) noexcept {
    clear();
    buffer = std::move(other.buffer);
    size = other.size;
    return *this;
  }
  ~SecretDeviceBuffer() { clear(); }
  void clear() noexcept {
    if (buffer) cudaMemset(buffer.get(), 0, size);  // cudaFree then waits for it
  }
  void* get() const { return buffer.get(); }
};
using Graph = std::unique_ptr<CUgraph_st, GraphDestroy>;

DeviceBuffer device_alloc(size_t bytes) {
  void* p = nullptr;
  check(cudaMalloc(&p, bytes), "cudaMalloc");
  return DeviceBuffer(p);
}

HostBuffer host_alloc(size_t bytes, unsigned flags) {
  void* p = nullptr;
  check(cudaHostAlloc(&p, bytes, flags), "cudaHostAlloc");
  return HostBuffer(p);
}

class Logger final : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "tensorrt: " << msg << "\n";
  }
};

class TrtModel final : public Model {
 public:
  TrtModel(Bytes blob, const std::string& path, Manifest manifest, const Options& options)
      : Model(std::move(manifest)), options_(options) {
    int count = 0;
    check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (options_.device < 0 || options_.device >= count)
      throw Error("CUDA device " + std::to_string(options_.device) + " does not exist (" + std::to_string(count) +
                  " visible)");
    check(cudaSetDevice(options_.device), "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, options_.device), "cudaGetDeviceProperties");
    integrated_ = prop.integrated != 0;  // Jetson: host and GPU share memory
    check_engine_identity(manifest_, std::to_string(getInferLibVersion()),
                          std::to_string(prop.major) + "." + std::to_string(prop.minor), local_l4t_release(), path);
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error("TensorRT: createInferRuntime failed");
    engine_.reset(runtime_->deserializeCudaEngine(blob.data, blob.size));
    if (!engine_) throw Error("TensorRT cannot load " + path + " (built for another GPU or TensorRT version?)");
    check_bindings();
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error("TensorRT: createExecutionContext failed");
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    stream_.reset(s);
  }

 protected:
  const char* backend_name() const override { return integrated_ ? "tensorrt-jetson" : "tensorrt"; }

  void key_attached() override {
    if (!manifest_.key_input.empty()) {  // a gather engine's key input: int64, bound once
      const nvinfer1::Dims d = engine_->getTensorShape(manifest_.key_input.c_str());
      if (d.nbDims != 1 || d.d[0] != static_cast<int64_t>(key_perm_.size()))
        throw Error("the engine's key input '" + manifest_.key_input + "' does not take a key of " +
                    std::to_string(key_perm_.size()) + " values");
      dev_key_ = SecretDeviceBuffer(device_alloc(key_perm_.size() * sizeof(int64_t)), key_perm_.size() * sizeof(int64_t));
      check(cudaMemcpy(dev_key_.get(), key_perm_.data(), key_perm_.size() * sizeof(int64_t), cudaMemcpyHostToDevice),
            "copy key");
    }
    if (manifest_.kernel_preprocess) {  // the kernel reads int32 source indices
      dev_perm_ = SecretDeviceBuffer(device_alloc(key_perm32_.size() * sizeof(int32_t)),
                                     key_perm32_.size() * sizeof(int32_t));
      check(cudaMemcpy(dev_perm_.get(), key_perm32_.data(), key_perm32_.size() * sizeof(int32_t),
                       cudaMemcpyHostToDevice), "copy key");
    }
  }

  void run(const uint8_t* hwc, int batch, float* logits) override {
    check(cudaSetDevice(options_.device), "cudaSetDevice");
    allocate(batch);
    const InputSpec& s = manifest_.input;
    const size_t pixels = size_t(batch) * s.height * s.width * s.channels;
    cudaStream_t stream = stream_.get();
    void* engine_input = dev_in_.get();
    switch (route()) {
      case Route::kKernel:
      case Route::kFloatNchwOnGpu: {
        stage_u8(hwc, pixels);
        const bool keyed = route() == Route::kKernel;
        float mean[KEYEDGE_MAX_CHANNELS] = {0, 0, 0, 0};
        float std[KEYEDGE_MAX_CHANNELS] = {1, 1, 1, 1};
        for (int c = 0; keyed && c < s.channels && c < KEYEDGE_MAX_CHANNELS; ++c) {
          mean[c] = manifest_.mean[c];
          std[c] = manifest_.std[c];
        }
        if (keyedge_preprocess(static_cast<const uint8_t*>(dev_u8()), batch, s.height, s.width, s.channels,
                               size_t(s.width) * s.channels, size_t(s.height) * s.width * s.channels,
                               keyed ? static_cast<const int32_t*>(dev_perm_.get()) : nullptr,
                               keyed ? manifest_.block_size : 0, mean, std, dev_in_.get(), KEYEDGE_OUT_FP32,
                               stream) != KEYEDGE_OK)
          throw Error(std::string("preprocess kernel: ") + keyedge_last_error());
        break;
      }
      case Route::kUint8Nhwc:
        stage_u8(hwc, pixels);
        engine_input = dev_u8();
        break;
      case Route::kHostConverted: {
        // uint8 NCHW (a transpose) or float NHWC (a conversion), done on the host into pinned memory
        if (s.uint8) hwc_to_input(hwc, batch, s, static_cast<uint8_t*>(host_in_.get()));
        else hwc_to_input(hwc, batch, s, static_cast<float*>(host_in_.get()));
        const size_t bytes = pixels * (s.uint8 ? 1 : sizeof(float));
        if (integrated_) {
          engine_input = mapped_in_;
        } else {
          check(cudaMemcpyAsync(dev_in_.get(), host_in_.get(), bytes, cudaMemcpyHostToDevice, stream), "H2D");
        }
        break;
      }
    }
    if (options_.cuda_graph) {
      if (!graph_ || graph_batch_ != batch || graph_input_ != engine_input) capture(batch, engine_input);
      check(cudaGraphLaunch(graph_.get(), stream), "cudaGraphLaunch");
    } else {
      bind(batch, engine_input);
      if (!context_->enqueueV3(stream)) throw Error("TensorRT enqueueV3 failed");
    }
    const size_t out_bytes = size_t(batch) * manifest_.num_classes * sizeof(float);
    if (!integrated_) check(cudaMemcpyAsync(host_out_.get(), dev_out_, out_bytes, cudaMemcpyDeviceToHost, stream), "D2H");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    std::memcpy(logits, host_out_.get(), out_bytes);
  }

 private:
  enum class Route { kKernel, kFloatNchwOnGpu, kUint8Nhwc, kHostConverted };

  Route route() const {
    const InputSpec& s = manifest_.input;
    if (manifest_.kernel_preprocess) return Route::kKernel;
    if (!s.uint8 && !s.nhwc) return Route::kFloatNchwOnGpu;
    if (s.uint8 && s.nhwc) return Route::kUint8Nhwc;
    return Route::kHostConverted;
  }

  const char* input_name() const {
    return manifest_.kernel_preprocess ? manifest_.pixels_name.c_str() : manifest_.input_name.c_str();
  }
  bool graph_nhwc() const { return manifest_.input.nhwc && !manifest_.kernel_preprocess; }
  bool graph_uint8() const { return manifest_.input.uint8 && !manifest_.kernel_preprocess; }

  // The engine must be what the manifest says: input name, type and (C, H, W), output, key input.
  void check_bindings() const {
    const InputSpec& s = manifest_.input;
    const char* in = input_name();
    if (engine_->getTensorIOMode(in) != nvinfer1::TensorIOMode::kINPUT)
      throw Error(std::string("the engine has no input '") + in + "' (its manifest says so)");
    const auto want = graph_uint8() ? nvinfer1::DataType::kUINT8 : nvinfer1::DataType::kFLOAT;
    if (engine_->getTensorDataType(in) != want)
      throw Error(std::string("the engine's input '") + in + "' is not " + (graph_uint8() ? "uint8" : "float32") +
                  " as its manifest says");
    const nvinfer1::Dims d = engine_->getTensorShape(in);
    const int64_t c = s.channels, h = s.height, w = s.width;
    const bool shape_ok = d.nbDims == 4 && (graph_nhwc() ? (d.d[1] == h && d.d[2] == w && d.d[3] == c)
                                                          : (d.d[1] == c && d.d[2] == h && d.d[3] == w));
    if (!shape_ok) throw Error(std::string("the engine's input '") + in + "' does not have the manifest's shape");
    const char* out = manifest_.output_name.c_str();
    if (engine_->getTensorIOMode(out) != nvinfer1::TensorIOMode::kOUTPUT ||
        engine_->getTensorDataType(out) != nvinfer1::DataType::kFLOAT)
      throw Error("the engine has no float32 output '" + manifest_.output_name + "'");
    const nvinfer1::Dims o = engine_->getTensorShape(out);
    if (o.nbDims != 2 || o.d[1] != manifest_.num_classes)
      throw Error("the engine's output does not have the manifest's class count");
    const int expected_inputs = manifest_.key_input.empty() ? 1 : 2;
    int inputs = 0;
    for (int i = 0; i < engine_->getNbIOTensors(); ++i)
      if (engine_->getTensorIOMode(engine_->getIOTensorName(i)) == nvinfer1::TensorIOMode::kINPUT) ++inputs;
    if (inputs != expected_inputs) throw Error("the engine's inputs do not match its manifest (key input)");
    if (!manifest_.key_input.empty() &&
        (engine_->getTensorIOMode(manifest_.key_input.c_str()) != nvinfer1::TensorIOMode::kINPUT ||
         engine_->getTensorDataType(manifest_.key_input.c_str()) != nvinfer1::DataType::kINT64))
      throw Error("the engine has no int64 key input '" + manifest_.key_input + "'");
  }

  void* dev_u8() const { return integrated_ ? mapped_in_ : dev_u8_.get(); }

  void stage_u8(const uint8_t* hwc, size_t bytes) {
    std::memcpy(host_in_.get(), hwc, bytes);  // pinned (desktop) or mapped (Jetson) staging
    if (!integrated_) check(cudaMemcpyAsync(dev_u8_.get(), host_in_.get(), bytes, cudaMemcpyHostToDevice, stream_.get()), "H2D");
  }

  void bind(int batch, void* engine_input) {
    const InputSpec& s = manifest_.input;
    nvinfer1::Dims dims{};
    dims.nbDims = 4;
    const int64_t shape[4] = {batch, graph_nhwc() ? s.height : s.channels, graph_nhwc() ? s.width : s.height,
                              graph_nhwc() ? s.channels : s.width};
    for (int i = 0; i < 4; ++i) dims.d[i] = shape[i];
    if (!context_->setInputShape(input_name(), dims)) throw Error("TensorRT rejected the input shape");
    context_->setTensorAddress(input_name(), engine_input);
    context_->setTensorAddress(manifest_.output_name.c_str(), dev_out_);
    if (!manifest_.key_input.empty()) context_->setTensorAddress(manifest_.key_input.c_str(), dev_key_.get());
  }

  // Capture enqueueV3 for this batch and these buffers; any change captures again.
  void capture(int batch, void* engine_input) {
    graph_.reset();
    bind(batch, engine_input);
    if (!context_->enqueueV3(stream_.get())) throw Error("TensorRT enqueueV3 failed");  // allocations outside capture
    check(cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    const bool ok = context_->enqueueV3(stream_.get());
    cudaGraph_t raw = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream_.get(), &raw);
    Graph graph(raw);
    if (!ok) throw Error("TensorRT enqueueV3 failed during graph capture");
    check(end, "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    check(cudaGraphInstantiate(&exec, graph.get(), 0), "cudaGraphInstantiate");
    graph_.reset(exec);
    graph_batch_ = batch;
    graph_input_ = engine_input;
  }

  void allocate(int batch) {
    if (batch <= capacity_) return;
    graph_.reset();  // addresses change
    const InputSpec& s = manifest_.input;
    const size_t pixels = size_t(batch) * s.height * s.width * s.channels;
    const size_t out_bytes = size_t(batch) * manifest_.num_classes * sizeof(float);
    const size_t staging = pixels * sizeof(float);  // big enough for bytes or floats
    if (integrated_) {  // zero-copy: the GPU reads and writes the host buffers directly
      host_in_ = host_alloc(staging, cudaHostAllocMapped);
      host_out_ = host_alloc(out_bytes, cudaHostAllocMapped);
      check(cudaHostGetDevicePointer(&mapped_in_, host_in_.get(), 0), "mapped pointer");
      check(cudaHostGetDevicePointer(&dev_out_, host_out_.get(), 0), "mapped pointer");
    } else {  // pinned staging buffers + device buffers
      host_in_ = host_alloc(staging, cudaHostAllocDefault);
      host_out_ = host_alloc(out_bytes, cudaHostAllocDefault);
      dev_u8_ = device_alloc(pixels);
      dev_out_buffer_ = device_alloc(out_bytes);
      dev_out_ = dev_out_buffer_.get();
    }
    dev_in_ = device_alloc(pixels * sizeof(float));
    capacity_ = batch;
  }

  Options options_;
  Logger logger_;
  // declared before the buffers: destroyed after them
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  Stream stream_;
  bool integrated_ = false;
  int capacity_ = 0;
  HostBuffer host_in_, host_out_;
  void* mapped_in_ = nullptr;  // device view of host_in_ (Jetson)
  DeviceBuffer dev_u8_, dev_in_, dev_out_buffer_;
  SecretDeviceBuffer dev_key_, dev_perm_;  // the key on the GPU
  void* dev_out_ = nullptr;  // dev_out_buffer_, or the device view of host_out_ (Jetson)
  GraphExec graph_;
  int graph_batch_ = 0;
  void* graph_input_ = nullptr;
};

}  // namespace

std::unique_ptr<Model> make_tensorrt_model(Bytes blob, const std::string& where, Manifest manifest,
                                           const Options& options) {
  return std::make_unique<TrtModel>(blob, where, std::move(manifest), options);
}

}  // namespace keyedge
