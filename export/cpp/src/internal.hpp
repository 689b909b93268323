// keyedge C++ runtime: what its source files share and the public header does not show.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "keyedge_model.hpp"

namespace keyedge {

// A span of bytes the caller keeps alive for the call.
struct Bytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

// ---- bytes.cpp: files, little-endian fields, libsodium's SHA-256 --------------------------------
std::vector<uint8_t> read_bytes(const std::string& path, const std::string& what);
uint16_t le16(const uint8_t* p);
uint32_t le32(const uint8_t* p);
void init_sodium();
// SHA-256 (libsodium's crypto_hash_sha256) of the concatenated parts, and hex digits.
std::array<uint8_t, 32> sha256(std::initializer_list<std::pair<const uint8_t*, size_t>> parts);
std::string hex(const uint8_t* data, size_t n);

// ---- bundle.cpp: a sealed bundle's payload, decrypted in memory ----------------------------------
// The files are spans of one buffer, wiped when it goes.
struct Plaintext {
  std::vector<uint8_t> buffer;
  std::map<std::string, Bytes> files;
  ~Plaintext();
  Bytes file(const std::string& name) const;
};
// Open a bundle with the device's private key file: any change, truncation or extension throws.
void unseal_bundle(const std::string& bundle_path, const std::string& device_key_path, Plaintext& out);

// ---- preprocess_cpu.cpp: what the CPU backends (and the TensorRT one's host path) do to images ----
// uint8 HWC images -> the graph's input in its layout (NCHW or NHWC): as uint8, or as float v / 255.
template <typename T>
void hwc_to_input(const uint8_t* hwc, int batch, const InputSpec& spec, T* out);
// The CPU twin of the CUDA kernel (its own per-pixel code, kernels/include/keyedge_preprocess_math.h):
// uint8 HWC -> key gather -> (v/255 - mean)/std -> NCHW float.
void keyed_preprocess_cpu(const uint8_t* hwc, int batch, const InputSpec& spec, const std::vector<int32_t>& perm,
                          int block_size, const std::vector<float>& mean, const std::vector<float>& std, float* out);

// ---- backends, chosen at build time (CMake options KEYEDGE_WITH_ONNXRUNTIME / KEYEDGE_WITH_TENSORRT) ----
// ``model``: the ONNX file's or the engine's bytes (from disk, or from a sealed bundle);
// ``external_data``: the ONNX graph's external tensors (model.onnx.data), when a sealed bundle holds them.
std::unique_ptr<Model> make_onnxruntime_model(Bytes model, Bytes external_data, const std::string& where,
                                              Manifest manifest);
std::unique_ptr<Model> make_tensorrt_model(Bytes model, const std::string& where, Manifest manifest,
                                           const Options& options);

}  // namespace keyedge
