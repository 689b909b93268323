// keyedge C++ runtime: load a keyed ViT artifact (ONNX Runtime or TensorRT) and classify images.
//
//   auto model = keyedge::Model::load("model/model.onnx", "key.bin");
//   std::vector<float> logits(batch * model->num_classes());
//   model->infer(hwc_uint8_images, batch, logits.data());
//   for (auto [cls, prob] : model->top_k(logits.data(), 5)) ...
//
// The artifact's manifest (manifest.json, or <engine>.json) is read and checked at load:
// format name and version, input spec, output size and the key fingerprint (against the key
// file, and against the fingerprint baked into this package), and the backend checks the
// graph's or engine's inputs and outputs against it. A sealed bundle must be signed by a trusted
// publisher. Every failure is a keyedge::Error with a one-line message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace keyedge {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct InputSpec {
  int height = 0;
  int width = 0;
  int channels = 3;
  bool uint8 = false;  // the graph takes uint8 [0,255] (else float [0,1])
  bool nhwc = false;   // graph layout (infer() always takes uint8 HWC images)
  int batch = 1;       // fixed batch, or -1 for a dynamic batch
};

// Manifest formats this runtime reads (keyedge artifact / build plan / engine), version <= 1.
constexpr int kManifestVersion = 1;

struct Manifest {
  std::string format;  // keyedge-artifact, keyedge-build-plan or keyedge-engine
  int version = 0;
  InputSpec input;
  std::string input_name = "images";
  std::string output_name = "logits";
  int num_classes = 0;
  int block_size = 0;
  std::string key_fingerprint;  // empty for a plain model
  std::string key_input;        // graph input that takes the permutation at run time, or empty
  // --mode kernel: the graph takes keyed, normalised NCHW float pixels (graph input pixels_name);
  // the runtime does uint8 HWC -> key gather -> normalise (CUDA kernel, or its CPU twin)
  bool kernel_preprocess = false;
  std::string pixels_name;
  std::vector<float> mean, std;
  std::string fold_mode;
  std::string precision;
  std::vector<std::string> classes;
  // a random ensemble (one gathered graph of N keyed members): the graph input that takes each row's member
  // index, and the members' key fingerprints; empty for a single model
  std::string member_input;
  std::vector<std::string> member_fingerprints;
  // keyedge-engine: what the engine was built with and for ("" when not recorded)
  std::string tensorrt_version, compute_capability, l4t_release;
  static Manifest from_file(const std::string& path);
  static Manifest from_text(const std::string& text, const std::string& where);
  // Does running this artifact take the key (gather with a key input, or kernel mode)?
  bool needs_key() const { return !key_input.empty() || kernel_preprocess; }
  int members() const { return static_cast<int>(member_fingerprints.size()); }
};

// Run-time options (instead of environment variables).
struct Options {
  int device = 0;           // CUDA device index (TensorRT backend)
  bool cuda_graph = false;  // capture enqueueV3 into a CUDA graph, re-captured when the batch changes
  // load_sealed: publisher public keys (publisher.pub files, from keyedge publisher keygen) trusted besides
  // those compiled into this package; a bundle must be signed by one of them.
  std::vector<std::string> trusted_publishers;
  // load_sealed: open bundles no publisher signed. For development only: anyone who can write the bundle
  // file (and knows the device's public key) can then replace the model.
  bool allow_unsigned = false;
  // A random ensemble: how many of its N members answer each image (1 to N), drawn afresh for every image
  // from libsodium's CSPRNG; the answer is their mean probability. Must stay 1 for a single model.
  int ensemble_draw = 1;
};

// A key file (keyedge key format v1 or v2): validated, fingerprinted. The permutation never leaves it
// and is wiped when it goes.
struct KeyFile {
  int version = 0;
  int block_size = 0;
  int channels = 0;
  bool insecure = false;        // drawn from a seeded generator (tests only)
  bool insecure_small = false;  // a key space too small to resist a search
  std::vector<int64_t> perm;
  std::string fingerprint;
  KeyFile() = default;
  KeyFile(const KeyFile&) = default;
  KeyFile(KeyFile&&) = default;
  KeyFile& operator=(const KeyFile& other);  // both overwrite the permutation they replace
  KeyFile& operator=(KeyFile&& other) noexcept;
  ~KeyFile();
  static KeyFile load(const std::string& path);
  static KeyFile from_bytes(const std::vector<uint8_t>& data, const std::string& where);
  static KeyFile from_bytes(const uint8_t* data, size_t size, const std::string& where);
};

class Model {
 public:
  // model_path: model.onnx (ONNX Runtime backend) or model.engine (TensorRT backend); the
  // manifest is read from beside it. key_path: the key file, needed when the artifact takes
  // the key at run time (gather and kernel modes); when given, its fingerprint must match the
  // manifest's (a plain model refuses a key).
  static std::unique_ptr<Model> load(const std::string& model_path, const std::string& key_path = "",
                                     const Options& options = Options{});
  // A sealed bundle (keyedge seal ... --sign-with publisher.key -o model.kes), decrypted in memory with the
  // device's private key file (keyedge device keygen): libsodium sealed box + AES-256-GCM STREAM (OpenSSL).
  // Before anything is decrypted, its publisher must be trusted (a key compiled into this package or one of
  // options.trusted_publishers) and its Ed25519 signature must verify; an unsigned bundle is refused unless
  // options.allow_unsigned. The model (ONNX Runtime session from memory, or TensorRT deserializeCudaEngine
  // from memory), its manifest and, for gather / kernel artifacts, the key come from the bundle; nothing is
  // written to disk; the decrypted buffer is locked in RAM where allowed and wiped after loading.
  static std::unique_ptr<Model> load_sealed(const std::string& bundle_path, const std::string& device_key_path,
                                            const Options& options = Options{});
  virtual ~Model();

  // hwc: batch images, each height x width x channels uint8, rows packed.
  // logits: batch x num_classes floats. A random ensemble answers each image with options.ensemble_draw of its
  // members, drawn afresh per image from libsodium's CSPRNG (randombytes_uniform) and run as rows of one
  // batch: logits = log of their mean softmax probability (so top_k gives the mean probabilities). The
  // members' own outputs are never returned.
  void infer(const uint8_t* hwc, int batch, float* logits);
#ifdef KEYEDGE_ENSEMBLE_TEST_API
  // Test builds only (cmake -DKEYEDGE_ENSEMBLE_TEST_API=ON): the answer for a given draw, batch x draw member
  // indices, image-major. A deployed build never has it: a draw of one member would expose that member.
  void answer_for_draw(const uint8_t* hwc, int batch, const std::vector<int64_t>& draws, int draw, float* logits);
#endif
  // The k most probable classes of one logits row: (class index, softmax probability).
  std::vector<std::pair<int, float>> top_k(const float* logits, int k) const;

  const Manifest& manifest() const { return manifest_; }
  int num_classes() const { return manifest_.num_classes; }
  const InputSpec& input() const { return manifest_.input; }
  const char* backend() const { return backend_name(); }

 protected:
  explicit Model(Manifest manifest) : manifest_(std::move(manifest)) {}
  // Run exactly `batch` images (a supported batch size) through the backend.
  virtual void run(const uint8_t* hwc, int batch, float* logits) = 0;
  virtual const char* backend_name() const = 0;
  // Called once, after the key (if the artifact takes one) is in key_perm_.
  virtual void key_attached() {}
  Manifest manifest_;
  // only for artifacts that take the key at run time: as a gather's int64 key input, and as the
  // preprocessing kernel's (and its CPU twin's) int32 source indices
  std::vector<int64_t> key_perm_;
  std::vector<int32_t> key_perm32_;
  // a random ensemble: the member of each row of the batch in flight, and how many answer an image
  std::vector<int64_t> row_members_;
  int ensemble_draw_ = 1;
  friend void attach_key(Model&, const KeyFile*);
  friend void attach_draw(Model&, const Options&);

 private:
  void answer(const uint8_t* hwc, int batch, const int64_t* draws, int draw, float* logits);
};

// Refuse, in one line, an engine built for another TensorRT (major.minor.patch), GPU compute
// capability or Jetson Linux release, before TensorRT would fail to deserialize it. A device-side
// value of "" (not known here) is not compared.
void check_engine_identity(const Manifest& manifest, const std::string& tensorrt_version,
                           const std::string& capability, const std::string& l4t_release, const std::string& where);
// The Jetson Linux release ("R36.3.0") from /etc/nv_tegra_release, or "" off Jetson.
std::string local_l4t_release(const std::string& path = "/etc/nv_tegra_release");

}  // namespace keyedge
