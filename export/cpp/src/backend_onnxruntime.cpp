// ONNX Runtime backend (CPU), through the ONNX Runtime C++ API.
#include <onnxruntime_cxx_api.h>

#include <array>

#include "internal.hpp"

namespace keyedge {
namespace {

class OrtModel final : public Model {
 public:
  OrtModel(Bytes model, Bytes external_data, const std::string& path, Manifest manifest) : Model(std::move(manifest)) {
    try {
      Ort::SessionOptions options;
      options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      if (external_data.data != nullptr) {  // a sealed bundle's tensors, where they were decrypted
        const std::vector<std::basic_string<ORTCHAR_T>> names{ORT_TSTR("model.onnx.data")};
        const std::vector<char*> buffers{reinterpret_cast<char*>(const_cast<uint8_t*>(external_data.data))};
        const std::vector<size_t> sizes{external_data.size};
        options.AddExternalInitializersFromFilesInMemory(names, buffers, sizes);
      }
      session_ = std::make_unique<Ort::Session>(env_, model.data, model.size, options);
      check_graph();
    } catch (const Ort::Exception& e) {
      throw Error(std::string("ONNX Runtime cannot load ") + path + ": " + e.what());
    }
  }

 protected:
  const char* backend_name() const override { return "onnxruntime-cpu"; }

  void run(const uint8_t* hwc, int batch, float* logits) override {
    const InputSpec& s = manifest_.input;
    std::array<int64_t, 4> shape = s.nhwc ? std::array<int64_t, 4>{batch, s.height, s.width, s.channels}
                                          : std::array<int64_t, 4>{batch, s.channels, s.height, s.width};
    const size_t count = size_t(batch) * s.height * s.width * s.channels;
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> inputs;
    std::vector<const char*> names{manifest_.input_name.c_str()};
    if (manifest_.kernel_preprocess) {  // the CPU twin of the CUDA kernel: gather + normalise
      std::array<int64_t, 4> pshape{batch, s.channels, s.height, s.width};
      f32_.resize(count);
      keyed_preprocess_cpu(hwc, batch, s, key_perm32_, manifest_.block_size, manifest_.mean, manifest_.std,
                           f32_.data());
      inputs.push_back(Ort::Value::CreateTensor<float>(mem, f32_.data(), count, pshape.data(), 4));
      names[0] = manifest_.pixels_name.c_str();
    } else if (s.uint8 && s.nhwc) {  // the app's layout already: no copy
      inputs.push_back(Ort::Value::CreateTensor<uint8_t>(mem, const_cast<uint8_t*>(hwc), count, shape.data(), 4));
    } else if (s.uint8) {
      u8_.resize(count);
      hwc_to_input(hwc, batch, s, u8_.data());
      inputs.push_back(Ort::Value::CreateTensor<uint8_t>(mem, u8_.data(), count, shape.data(), 4));
    } else {
      f32_.resize(count);
      hwc_to_input(hwc, batch, s, f32_.data());
      inputs.push_back(Ort::Value::CreateTensor<float>(mem, f32_.data(), count, shape.data(), 4));
    }
    if (!manifest_.key_input.empty()) {
      std::array<int64_t, 1> kshape{static_cast<int64_t>(key_perm_.size())};
      inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, key_perm_.data(), key_perm_.size(), kshape.data(), 1));
      names.push_back(manifest_.key_input.c_str());
    }
    if (!manifest_.member_input.empty()) {  // a random ensemble: each row's member
      if (row_members_.size() != size_t(batch)) throw Error("a random ensemble runs with one member per row");
      std::array<int64_t, 1> mshape{batch};
      inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, row_members_.data(), row_members_.size(), mshape.data(), 1));
      names.push_back(manifest_.member_input.c_str());
    }
    const char* out_name = manifest_.output_name.c_str();
    std::array<int64_t, 2> oshape{batch, manifest_.num_classes};
    Ort::Value output = Ort::Value::CreateTensor<float>(mem, logits, size_t(batch) * manifest_.num_classes,
                                                       oshape.data(), 2);
    try {
      session_->Run(Ort::RunOptions{nullptr}, names.data(), inputs.data(), inputs.size(), &out_name, &output, 1);
    } catch (const Ort::Exception& e) {
      throw Error(std::string("ONNX Runtime inference failed: ") + e.what());
    }
  }

 private:
  // the graph must be what the manifest says: input name/type/shape, output size
  void check_graph() {
    Ort::AllocatorWithDefaultOptions alloc;
    const InputSpec& s = manifest_.input;
    const bool pre = manifest_.kernel_preprocess;  // the graph then takes float NCHW pixels
    const std::string& expected = pre ? manifest_.pixels_name : manifest_.input_name;
    auto in_name = session_->GetInputNameAllocated(0, alloc);
    if (expected != in_name.get()) throw Error("the ONNX graph's first input is not " + expected);
    Ort::TypeInfo type_info = session_->GetInputTypeInfo(0);  // keep alive: the view below points into it
    auto info = type_info.GetTensorTypeAndShapeInfo();
    auto want = s.uint8 && !pre ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (info.GetElementType() != want) throw Error("the ONNX graph's input type does not match its manifest");
    auto shape = info.GetShape();
    std::array<int64_t, 3> hwc = s.nhwc && !pre ? std::array<int64_t, 3>{s.height, s.width, s.channels}
                                                : std::array<int64_t, 3>{s.channels, s.height, s.width};
    if (shape.size() != 4 || shape[1] != hwc[0] || shape[2] != hwc[1] || shape[3] != hwc[2])
      throw Error("the ONNX graph's input shape does not match its manifest");
    const size_t inputs = 1 + !manifest_.key_input.empty() + !manifest_.member_input.empty();
    if (session_->GetInputCount() != inputs)
      throw Error("the ONNX graph's inputs do not match its manifest (key or member input)");
  }

  Ort::Env env_{ORT_LOGGING_LEVEL_WARNING, "keyedge"};
  std::unique_ptr<Ort::Session> session_;
  std::vector<float> f32_;
  std::vector<uint8_t> u8_;
};

}  // namespace

std::unique_ptr<Model> make_onnxruntime_model(Bytes model, Bytes external_data, const std::string& where,
                                              Manifest manifest) {
  return std::make_unique<OrtModel>(model, external_data, where, std::move(manifest));
}

}  // namespace keyedge
