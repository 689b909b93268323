// keyedge C++ runtime: loading a model (a plain artifact or a sealed bundle), the key rule, batching, top-k.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <optional>

#include <sodium.h>

#include "internal.hpp"
#include "keyedge_model_config.hpp"  // generated: what this package was made for

#ifndef KEYEDGE_TRUSTED_PUBLISHERS  // a brace list of publisher public keys, 64 hex digits each
#define KEYEDGE_TRUSTED_PUBLISHERS {}
#endif

namespace keyedge {

Model::~Model() {
  sodium_memzero(key_perm_.data(), key_perm_.size() * sizeof(key_perm_[0]));
  sodium_memzero(key_perm32_.data(), key_perm32_.size() * sizeof(key_perm32_[0]));
}

// The key rule (as keyedge.core.manifests.check_key with strict=True): an artifact that takes the key
// needs the right one; a key given for any artifact must be its own (a plain model takes none), and of
// the artifact's block size and channel count.
void check_key(const Manifest& m, const KeyFile* key) {
  if (key == nullptr) {
    if (m.needs_key()) throw Error("this artifact takes the key at run time: pass the key file");
    return;
  }
  if (m.key_fingerprint.empty()) throw Error("this artifact is a plain (un-keyed) model: do not pass a key");
  if (key->fingerprint != m.key_fingerprint)
    throw Error("key fingerprint " + key->fingerprint + " does not match the artifact's (" + m.key_fingerprint + ")");
  if (key->block_size != m.block_size || key->channels != m.input.channels)
    throw Error("the key's block size or channel count does not match the artifact's manifest");
}

void attach_key(Model& model, const KeyFile* key_file) {
  check_key(model.manifest_, key_file);
  if (key_file == nullptr) return;
  if (model.manifest_.needs_key()) {
    model.key_perm_ = key_file->perm;
    model.key_perm32_.assign(key_file->perm.begin(), key_file->perm.end());
  }
  model.key_attached();
}

// How many members answer an image (a random ensemble only), checked against the manifest at load.
void attach_draw(Model& model, const Options& options) {
  const int n = model.manifest_.members();
  if (n == 0 && options.ensemble_draw != 1)
    throw Error("ensemble_draw applies to a random ensemble only; this artifact is a single model");
  if (n > 0 && (options.ensemble_draw < 1 || options.ensemble_draw > n))
    throw Error("cannot draw " + std::to_string(options.ensemble_draw) + " of " + std::to_string(n) +
                " members: the draw is 1 to " + std::to_string(n));
  model.ensemble_draw_ = options.ensemble_draw;
}

namespace {

// The package was generated for one artifact: refuse another one dropped in its place.
void check_expected(const Manifest& manifest, const std::string& where) {
  if (std::string(KEYEDGE_EXPECTED_FINGERPRINT) != manifest.key_fingerprint ||
      manifest.input.height != KEYEDGE_EXPECTED_HEIGHT || manifest.input.width != KEYEDGE_EXPECTED_WIDTH ||
      manifest.num_classes != KEYEDGE_EXPECTED_CLASSES)
    throw Error("manifest " + where + " does not describe the artifact this package was generated for");
}

std::unique_ptr<Model> make_model(bool engine, Bytes model_bytes, Bytes data, const std::string& where,
                                  Manifest manifest, const KeyFile* key, const Options& options) {
  if (engine && manifest.members() > 0)
    throw Error(where + ": the TensorRT backend does not serve random ensembles; run the ensemble's ONNX graph");
  std::unique_ptr<Model> model = engine ? make_tensorrt_model(model_bytes, where, std::move(manifest), options)
                                        : make_onnxruntime_model(model_bytes, data, where, std::move(manifest));
  attach_key(*model, key);
  attach_draw(*model, options);
  return model;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The publishers compiled into this package and those the options name.
Trust trust_of(const Options& options) {
  Trust trust;
  const std::vector<std::string> compiled = KEYEDGE_TRUSTED_PUBLISHERS;
  for (const std::string& hex_key : compiled)
    trust.publishers.push_back(publisher_key_from_hex(hex_key, "a publisher key compiled into this package"));
  for (const std::string& path : options.trusted_publishers) trust.publishers.push_back(load_publisher_key(path));
  trust.allow_unsigned = options.allow_unsigned;
  return trust;
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& model_path, const std::string& key_path,
                                   const Options& options) {
  init_sodium();
  std::ifstream probe(model_path, std::ios::binary);
  if (!probe) throw Error("model file " + model_path + " does not exist");
  const bool engine = ends_with(model_path, ".engine");
  const std::string manifest_path = engine ? model_path + ".json"
                                           : model_path.substr(0, model_path.find_last_of('/') + 1) + "manifest.json";
  Manifest manifest = Manifest::from_file(manifest_path);
  check_expected(manifest, manifest_path);
  std::optional<KeyFile> key;
  if (!key_path.empty()) key = KeyFile::load(key_path);
  check_key(manifest, key ? &*key : nullptr);
  std::vector<uint8_t> blob = read_bytes(model_path, "model file");
  struct Wipe {  // a fused model is the key: overwritten once the backend has its own copy
    std::vector<uint8_t>& bytes;
    ~Wipe() { sodium_memzero(bytes.data(), bytes.size()); }
  } wipe{blob};
  return make_model(engine, Bytes{blob.data(), blob.size()}, Bytes{}, model_path, std::move(manifest),
                    key ? &*key : nullptr, options);
}

SealedArtifact read_sealed(const std::map<std::string, Bytes>& files, const std::string& where) {
  auto file = [&files](const char* name) {
    const auto it = files.find(name);
    return it == files.end() ? Bytes{} : it->second;
  };
  SealedArtifact a;
  a.engine = files.count("model.engine") != 0;
  a.model = file(a.engine ? "model.engine" : "model.onnx");
  a.external_data = file("model.onnx.data");
  const Bytes text = file(a.engine ? "model.engine.json" : "manifest.json");
  if (a.model.data == nullptr || text.data == nullptr) throw Error(where + " holds no model and manifest");
  a.manifest = Manifest::from_text(std::string(text.data, text.data + text.size), where + " (sealed manifest)");
  check_expected(a.manifest, where);
  if (const Bytes k = file("key.bin"); k.data != nullptr)
    a.key = KeyFile::from_bytes(k.data, k.size, where + " (sealed key)");  // read where it was decrypted
  check_key(a.manifest, a.key ? &*a.key : nullptr);
  return a;
}

std::unique_ptr<Model> Model::load_sealed(const std::string& bundle_path, const std::string& device_key_path,
                                          const Options& options) {
  Plaintext plain;
  unseal_bundle(bundle_path, device_key_path, trust_of(options), plain);
  SealedArtifact a = read_sealed(plain.files, bundle_path);
  return make_model(a.engine, a.model, a.external_data, bundle_path, std::move(a.manifest), a.key ? &*a.key : nullptr,
                    options);
}

namespace {

// draw distinct members of n, uniformly, from libsodium's CSPRNG (a partial Fisher-Yates shuffle)
void draw_members(int n, int draw, int64_t* out) {
  std::vector<int64_t> pool(n);
  std::iota(pool.begin(), pool.end(), 0);
  for (int k = 0; k < draw; ++k) {
    const int j = k + static_cast<int>(randombytes_uniform(static_cast<uint32_t>(n - k)));
    std::swap(pool[k], pool[j]);
    out[k] = pool[k];
  }
}

}  // namespace

void Model::answer(const uint8_t* hwc, int batch, const int64_t* draws, int draw, float* logits) {
  const int n = manifest_.members(), classes = manifest_.num_classes;
  const size_t image = size_t(manifest_.input.height) * manifest_.input.width * manifest_.input.channels;
  const size_t rows = size_t(batch) * draw;
  if (rows > (size_t(1) << 20)) throw Error("infer: batch x ensemble draw is too large");
  row_members_.assign(draws, draws + rows);
  for (const int64_t m : row_members_)
    if (m < 0 || m >= n) throw Error("a member index is 0 to " + std::to_string(n - 1));
  std::vector<uint8_t> copies(rows * image);  // image j's draw rows j*draw .. j*draw + draw - 1
  for (size_t r = 0; r < rows; ++r)
    std::copy(hwc + (r / draw) * image, hwc + (r / draw + 1) * image, copies.begin() + r * image);
  std::vector<float> out(rows * classes);
  run(copies.data(), static_cast<int>(rows), out.data());
  for (int j = 0; j < batch; ++j) {  // log of the mean softmax probability, computed stably
    const float* row = out.data() + size_t(j) * draw * classes;
    double top = -INFINITY;
    for (int i = 0; i < draw * classes; ++i) top = std::max(top, double(row[i]));
    std::vector<double> mean(classes, 0.0);
    for (int k = 0; k < draw; ++k) {
      const float* r = row + size_t(k) * classes;
      double mx = -INFINITY, sum = 0;
      for (int c = 0; c < classes; ++c) mx = std::max(mx, double(r[c]));
      for (int c = 0; c < classes; ++c) sum += std::exp(double(r[c]) - mx);
      for (int c = 0; c < classes; ++c) mean[c] += std::exp(double(r[c]) - mx) / sum / draw;
    }
    for (int c = 0; c < classes; ++c) logits[size_t(j) * classes + c] = static_cast<float>(std::log(mean[c]));
  }
  sodium_memzero(out.data(), out.size() * sizeof(float));  // the members' own outputs go no further
}

#ifdef KEYEDGE_ENSEMBLE_TEST_API
void Model::answer_for_draw(const uint8_t* hwc, int batch, const std::vector<int64_t>& draws, int draw,
                            float* logits) {
  if (manifest_.members() == 0) throw Error("answer_for_draw: not a random ensemble");
  if (hwc == nullptr || logits == nullptr || batch < 1 || draw < 1 || draws.size() != size_t(batch) * draw)
    throw Error("answer_for_draw: one row of draw members per image");
  answer(hwc, batch, draws.data(), draw, logits);
}
#endif

void Model::infer(const uint8_t* hwc, int batch, float* logits) {
  if (hwc == nullptr || logits == nullptr || batch < 1) throw Error("infer: null buffer or batch < 1");
  if (manifest_.members() > 0) {  // a fresh draw for every image
    std::vector<int64_t> draws(size_t(batch) * ensemble_draw_);
    for (int j = 0; j < batch; ++j) draw_members(manifest_.members(), ensemble_draw_, draws.data() + size_t(j) * ensemble_draw_);
    answer(hwc, batch, draws.data(), ensemble_draw_, logits);
    return;
  }
  const int fixed = manifest_.input.batch;
  if (fixed < 0) {
    run(hwc, batch, logits);
    return;
  }
  const size_t image = size_t(manifest_.input.height) * manifest_.input.width * manifest_.input.channels;
  std::vector<uint8_t> pad;
  std::vector<float> out(size_t(fixed) * manifest_.num_classes);
  for (int start = 0; start < batch; start += fixed) {
    const int n = std::min(fixed, batch - start);
    const uint8_t* src = hwc + size_t(start) * image;
    if (n < fixed) {  // pad the last chunk by repeating its last image
      pad.assign(src, src + size_t(n) * image);
      for (int i = n; i < fixed; ++i) pad.insert(pad.end(), src + size_t(n - 1) * image, src + size_t(n) * image);
      src = pad.data();
    }
    run(src, fixed, out.data());
    std::copy(out.begin(), out.begin() + size_t(n) * manifest_.num_classes,
              logits + size_t(start) * manifest_.num_classes);
  }
}

std::vector<std::pair<int, float>> Model::top_k(const float* logits, int k) const {
  const int n = manifest_.num_classes;
  const float mx = *std::max_element(logits, logits + n);
  std::vector<float> p(n);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += (p[i] = std::exp(logits[i] - mx));
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  k = std::max(0, std::min(k, n));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) { return p[a] > p[b]; });
  std::vector<std::pair<int, float>> out;
  for (int i = 0; i < k; ++i) out.emplace_back(idx[i], static_cast<float>(p[idx[i]] / sum));
  return out;
}

#ifndef KEYEDGE_WITH_ONNXRUNTIME
std::unique_ptr<Model> make_onnxruntime_model(Bytes, Bytes, const std::string&, Manifest) {
  throw Error("this build has no ONNX Runtime backend (cmake -DKEYEDGE_WITH_ONNXRUNTIME=ON)");
}
#endif
#ifndef KEYEDGE_WITH_TENSORRT
std::unique_ptr<Model> make_tensorrt_model(Bytes, const std::string&, Manifest, const Options&) {
  throw Error("this build has no TensorRT backend (cmake -DKEYEDGE_WITH_TENSORRT=ON)");
}
#endif

}  // namespace keyedge
