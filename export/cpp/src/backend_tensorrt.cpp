// TensorRT backend: enqueueV3 on a CUDA stream, pinned host memory on desktop GPUs and
// mapped zero-copy memory on Jetson (integrated GPU), optional CUDA graph, and keyedge's
// preprocessing kernel (uint8 HWC -> normalised NCHW) on the GPU. With a kernel-mode engine
// (keyedge export --mode kernel) the kernel does the key gather, with the key read from key.bin
// at run time; a gather-mode engine gets the key bound to its key input instead.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <vector>

#include "keyedge_model.hpp"
#include "keyedge_preprocess.h"

namespace keyedge {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(err));
}

class Logger final : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "tensorrt: " << msg << "\n";
  }
};

class TrtModel final : public Model {
 public:
  TrtModel(const std::string& path, Manifest manifest) : Model(std::move(manifest)) {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) throw Error("TensorRT cannot load " + path + " (built for another GPU or TensorRT version?)");
    context_.reset(engine_->createExecutionContext());
    check(cudaStreamCreate(&stream_), "cudaStreamCreate");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    integrated_ = prop.integrated != 0;  // Jetson: host and GPU share memory
    use_graph_ = std::getenv("KEYEDGE_CUDA_GRAPH") != nullptr;
  }
  ~TrtModel() override {
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    release();
    if (dev_perm_) cudaFree(dev_perm_);
    if (stream_) cudaStreamDestroy(stream_);
  }

 protected:
  const char* backend_name() const override { return integrated_ ? "tensorrt-jetson" : "tensorrt"; }

  void run(const uint8_t* hwc, int batch, float* logits) override {
    const InputSpec& s = manifest_.input;
    allocate(batch);
    const size_t image_bytes = size_t(s.height) * s.width * s.channels;
    std::memcpy(host_in_, hwc, image_bytes * batch);  // pinned (desktop) or mapped (Jetson) staging
    if (!integrated_) check(cudaMemcpyAsync(dev_u8_, host_in_, image_bytes * batch, cudaMemcpyHostToDevice, stream_), "H2D");
    const bool pre = manifest_.kernel_preprocess;
    if (pre || !s.uint8) {
      // kernel mode: key gather + normalisation; otherwise the engine takes float [0,1] (its key,
      // if any, is folded in or a Gather), so the kernel only converts (mean 0, std 1, no perm)
      float mean[KEYEDGE_MAX_CHANNELS] = {0, 0, 0, 0};
      float std[KEYEDGE_MAX_CHANNELS] = {1, 1, 1, 1};
      for (int c = 0; pre && c < s.channels; ++c) { mean[c] = manifest_.mean[c]; std[c] = manifest_.std[c]; }
      if (keyedge_preprocess(dev_u8_, batch, s.height, s.width, s.channels, size_t(s.width) * s.channels,
                             image_bytes, pre ? dev_perm_ : nullptr, pre ? manifest_.block_size : 0, mean, std,
                             dev_in_, KEYEDGE_OUT_FP32, stream_) != KEYEDGE_OK)
        throw Error(std::string("preprocess kernel: ") + keyedge_last_error());
    }
    const bool nhwc = s.nhwc && !pre;
    nvinfer1::Dims dims{};
    dims.nbDims = 4;
    int64_t shape[4] = {batch, nhwc ? s.height : s.channels, nhwc ? s.width : s.height, nhwc ? s.channels : s.width};
    for (int i = 0; i < 4; ++i) dims.d[i] = shape[i];
    const char* input = pre ? manifest_.pixels_name.c_str() : manifest_.input_name.c_str();
    context_->setInputShape(input, dims);
    context_->setTensorAddress(input, s.uint8 && !pre ? static_cast<void*>(dev_u8_) : dev_in_);
    context_->setTensorAddress(manifest_.output_name.c_str(), dev_out_);
    if (!manifest_.key_input.empty()) context_->setTensorAddress(manifest_.key_input.c_str(), dev_key_);
    if (use_graph_) {
      if (!graph_exec_) {  // capture enqueueV3 once per buffer set, then replay
        if (!context_->enqueueV3(stream_)) throw Error("TensorRT enqueueV3 failed");
        cudaGraph_t graph;
        check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "capture");
        context_->enqueueV3(stream_);
        check(cudaStreamEndCapture(stream_, &graph), "capture");
        check(cudaGraphInstantiate(&graph_exec_, graph, 0), "cudaGraphInstantiate");
        cudaGraphDestroy(graph);
      }
      check(cudaGraphLaunch(graph_exec_, stream_), "cudaGraphLaunch");
    } else if (!context_->enqueueV3(stream_)) {
      throw Error("TensorRT enqueueV3 failed");
    }
    const size_t out_bytes = size_t(batch) * manifest_.num_classes * sizeof(float);
    if (!integrated_) check(cudaMemcpyAsync(host_out_, dev_out_, out_bytes, cudaMemcpyDeviceToHost, stream_), "D2H");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    std::memcpy(logits, host_out_, out_bytes);
  }

 private:
  void allocate(int batch) {
    if (batch <= capacity_) return;
    release();
    if (graph_exec_) { cudaGraphExecDestroy(graph_exec_); graph_exec_ = nullptr; }
    const InputSpec& s = manifest_.input;
    const size_t image_bytes = size_t(s.height) * s.width * s.channels;
    const size_t out_bytes = size_t(batch) * manifest_.num_classes * sizeof(float);
    if (integrated_) {  // zero-copy: the GPU reads and writes the host buffers directly
      check(cudaHostAlloc(&host_in_, image_bytes * batch, cudaHostAllocMapped), "cudaHostAlloc");
      check(cudaHostAlloc(reinterpret_cast<void**>(&host_out_), out_bytes, cudaHostAllocMapped), "cudaHostAlloc");
      check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_u8_), host_in_, 0), "mapped pointer");
      check(cudaHostGetDevicePointer(&dev_out_, host_out_, 0), "mapped pointer");
    } else {  // pinned staging buffers + device buffers
      check(cudaMallocHost(&host_in_, image_bytes * batch), "cudaMallocHost");
      check(cudaMallocHost(reinterpret_cast<void**>(&host_out_), out_bytes), "cudaMallocHost");
      check(cudaMalloc(reinterpret_cast<void**>(&dev_u8_), image_bytes * batch), "cudaMalloc");
      check(cudaMalloc(&dev_out_, out_bytes), "cudaMalloc");
    }
    check(cudaMalloc(&dev_in_, image_bytes * batch * sizeof(float)), "cudaMalloc");
    if (!manifest_.key_input.empty()) {
      check(cudaMalloc(&dev_key_, key_perm_.size() * sizeof(int64_t)), "cudaMalloc");
      check(cudaMemcpy(dev_key_, key_perm_.data(), key_perm_.size() * sizeof(int64_t), cudaMemcpyHostToDevice), "key");
    }
    if (manifest_.kernel_preprocess && dev_perm_ == nullptr) {  // the kernel reads int32 source indices
      std::vector<int32_t> perm32(key_perm_.begin(), key_perm_.end());
      check(cudaMalloc(reinterpret_cast<void**>(&dev_perm_), perm32.size() * sizeof(int32_t)), "cudaMalloc");
      check(cudaMemcpy(dev_perm_, perm32.data(), perm32.size() * sizeof(int32_t), cudaMemcpyHostToDevice), "key");
    }
    capacity_ = batch;
  }
  void release() {
    if (capacity_ == 0) return;
    cudaFreeHost(host_in_);
    cudaFreeHost(host_out_);
    if (!integrated_) { cudaFree(dev_u8_); cudaFree(dev_out_); }
    cudaFree(dev_in_);
    if (dev_key_) cudaFree(dev_key_);
    dev_key_ = nullptr;
    capacity_ = 0;
  }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  cudaGraphExec_t graph_exec_ = nullptr;
  bool integrated_ = false;
  bool use_graph_ = false;
  int capacity_ = 0;
  void* host_in_ = nullptr;
  float* host_out_ = nullptr;
  uint8_t* dev_u8_ = nullptr;
  void* dev_in_ = nullptr;
  void* dev_out_ = nullptr;
  void* dev_key_ = nullptr;
  int32_t* dev_perm_ = nullptr;
};

}  // namespace

std::unique_ptr<Model> make_tensorrt_model(const std::string& path, Manifest manifest) {
  return std::make_unique<TrtModel>(path, std::move(manifest));
}

}  // namespace keyedge
