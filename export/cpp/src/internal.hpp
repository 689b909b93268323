// keyedge C++ runtime: what its source files share and the public header does not show.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
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

// ---- bytes.cpp: files, little-endian fields, libsodium's SHA-256, memory for secrets -------------
// A whole regular file of at most max_size bytes (else an Error naming `what`).
std::vector<uint8_t> read_bytes(const std::string& path, const std::string& what, size_t max_size = SIZE_MAX);
uint16_t le16(const uint8_t* p);
uint32_t le32(const uint8_t* p);
void init_sodium();
// SHA-256 (libsodium's crypto_hash_sha256) of the concatenated parts, and hex digits.
std::array<uint8_t, 32> sha256(std::initializer_list<std::pair<const uint8_t*, size_t>> parts);
std::string hex(const uint8_t* data, size_t n);

// Memory for secrets (a bundle's plaintext, private keys, a key file's bytes, a content key): anonymous
// private pages of a fixed size, never reallocated or copied, locked in RAM where the system allows it
// (best effort), left out of core dumps and forked children, and wiped, unlocked and unmapped when it
// goes, on every path (exceptions included).
class SecretBuffer {
 public:
  SecretBuffer() = default;
  explicit SecretBuffer(size_t size);
  ~SecretBuffer();
  SecretBuffer(SecretBuffer&& other) noexcept;
  SecretBuffer& operator=(SecretBuffer&& other) noexcept;
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  Bytes bytes() const { return Bytes{data_, size_}; }

 private:
  void release() noexcept;
  uint8_t* data_ = nullptr;
  size_t size_ = 0, mapped_ = 0;
  bool locked_ = false;
};
// A whole regular file of at most max_size bytes, read straight into a secret buffer of its size.
SecretBuffer read_secret(const std::string& path, const std::string& what, size_t max_size);

// ---- publisher.cpp: publishers' Ed25519 public keys (keyedge publisher keygen) ---------------------
using PublisherKey = std::array<uint8_t, 32>;
// "KEYEDGEP" || u16 version 1 || u8 kind (2: public) || 32-byte Ed25519 public key
PublisherKey publisher_key_from_bytes(Bytes data, const std::string& where);
PublisherKey load_publisher_key(const std::string& path);
// 64 hex digits (a key compiled into the package)
PublisherKey publisher_key_from_hex(const std::string& hex_digits, const std::string& where);
std::string publisher_fingerprint(const PublisherKey& key);

// ---- bundle.cpp: a sealed bundle (version 3), checked, then decrypted in memory ------------------
// Whom a bundle must be signed by: any of `publishers`; unsigned bundles only with allow_unsigned.
struct Trust {
  std::vector<PublisherKey> publishers;
  bool allow_unsigned = false;
};
// The files are spans of one secret buffer, wiped when it goes.
struct Plaintext {
  SecretBuffer buffer;
  std::map<std::string, Bytes> files;
};
// First the checks before anything is decrypted: the header (magic, version, flags, chunk size, length),
// then the publisher (trusted) and its signature, or the refusal of an unsigned bundle; then the recipient,
// the content key (sealed box; device_sk: the X25519 secret key, 32 bytes), every chunk (AES-256-GCM) and
// the index: any change, truncation or extension throws.
void open_bundle(Bytes data, const uint8_t* device_sk, const Trust& trust, const std::string& where,
                 Plaintext& out);
// The payload's index: u32 n || n bytes of JSON {"files": [{"name", "size"}]} || each file at the next
// 4096-byte boundary, filling the payload. Returns name -> span of `payload`.
std::map<std::string, Bytes> parse_index(Bytes payload, const std::string& where);
// open_bundle with the device's private key file (keyedge device keygen).
void unseal_bundle(const std::string& bundle_path, const std::string& device_key_path, const Trust& trust,
                   Plaintext& out);

// ---- model.cpp: the key rule, and what a bundle's files hold -------------------------------------
// keyedge.core.manifests.check_key with strict=True (the key file, or nullptr when none is given).
void check_key(const Manifest& manifest, const KeyFile* key);
struct SealedArtifact {
  bool engine = false;  // model.engine (else model.onnx, with model.onnx.data when it has large tensors)
  Bytes model, external_data;
  Manifest manifest;
  std::optional<KeyFile> key;
};
// The model, its manifest (checked against what this package was made for) and the key (checked against
// the manifest) among a bundle's files, before any backend sees them.
SealedArtifact read_sealed(const std::map<std::string, Bytes>& files, const std::string& where);

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
