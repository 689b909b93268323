// keyedge C++ runtime: manifest and key-file handling, batching, top-k (backend independent).
#include "keyedge_model.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <numeric>
#include <sstream>

#include "keyedge_model_config.hpp"  // generated: what this package was made for

namespace keyedge {
namespace {

// ---- a small JSON reader (objects, arrays, strings, numbers, true/false/null) -------------
struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;

  const Json* get(const std::string& key) const {
    auto it = obj.find(key);
    return kind == Object && it != obj.end() ? &it->second : nullptr;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}
  Json parse() {
    Json v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const char* what) const {
    throw Error(std::string("manifest is not valid JSON: ") + what + " at offset " + std::to_string(i_));
  }
  void ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool eat(const char* lit) {
    size_t n = std::strlen(lit);
    if (s_.compare(i_, n, lit) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }
  Json value() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      v.kind = Json::Object;
      ++i_;
      ws();
      if (i_ < s_.size() && s_[i_] == '}') { ++i_; return v; }
      while (true) {
        ws();
        std::string key = string();
        ws();
        if (i_ >= s_.size() || s_[i_++] != ':') fail("expected ':'");
        v.obj[key] = value();
        ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == '}') { ++i_; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Json::Array;
      ++i_;
      ws();
      if (i_ < s_.size() && s_[i_] == ']') { ++i_; return v; }
      while (true) {
        v.arr.push_back(value());
        ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == ']') { ++i_; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Json::String;
      v.str = string();
      return v;
    }
    if (eat("true")) { v.kind = Json::Bool; v.b = true; return v; }
    if (eat("false")) { v.kind = Json::Bool; return v; }
    if (eat("null")) return v;
    size_t start = i_;
    while (i_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[i_])) || std::strchr("+-.eE", s_[i_]))) ++i_;
    if (start == i_) fail("unexpected character");
    v.kind = Json::Number;
    v.num = std::stod(s_.substr(start, i_ - start));
    return v;
  }
  std::string string() {
    if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string");
    ++i_;
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c == '\\' && i_ < s_.size()) {
        char e = s_[i_++];
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'u': out += '?'; i_ += 4; break;  // labels only: non-ASCII is not needed here
          default: out += e;
        }
      } else {
        out += c;
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }
  const std::string& s_;
  size_t i_ = 0;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ---- SHA-256 (FIPS 180-4), for the key file's integrity check and fingerprint --------------
class Sha256 {
 public:
  void update(const uint8_t* data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      block_[fill_++] = data[i];
      if (fill_ == 64) { compress(); fill_ = 0; }
    }
    bits_ += static_cast<uint64_t>(n) * 8;
  }
  std::array<uint8_t, 32> digest() {
    uint64_t bits = bits_;
    uint8_t pad = 0x80;
    update(&pad, 1);
    uint8_t zero = 0;
    while (fill_ != 56) update(&zero, 1);
    for (int i = 7; i >= 0; --i) {
      uint8_t b = static_cast<uint8_t>(bits >> (8 * i));
      update(&b, 1);
    }
    std::array<uint8_t, 32> out{};
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<uint8_t>(h_[i] >> (24 - 8 * j));
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void compress() {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t(block_[4 * i]) << 24) | (uint32_t(block_[4 * i + 1]) << 16) |
             (uint32_t(block_[4 * i + 2]) << 8) | uint32_t(block_[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h_[0] += a; h_[1] += b; h_[2] += c; h_[3] += d; h_[4] += e; h_[5] += f; h_[6] += g; h_[7] += h;
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t block_[64] = {};
  size_t fill_ = 0;
  uint64_t bits_ = 0;
};

uint32_t le32(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }
uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }

int as_int(const Json* v, const char* what) {
  if (v == nullptr || v->kind != Json::Number) throw Error(std::string("manifest: missing number ") + what);
  return static_cast<int>(v->num);
}

std::string as_string(const Json* v) { return v != nullptr && v->kind == Json::String ? v->str : std::string(); }

}  // namespace

KeyFile KeyFile::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("key file " + path + " does not exist or cannot be read");
  std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.size() < 20 + 32) throw Error("key file " + path + " is truncated");
  if (std::memcmp(data.data(), "KEYEDGE\0", 8) != 0) throw Error("key file " + path + " is not a keyedge key");
  if (le16(&data[8]) != 1) throw Error("key file " + path + " has an unknown format version");
  KeyFile key;
  key.block_size = le16(&data[12]);
  key.channels = le16(&data[14]);
  uint32_t n = le32(&data[16]);
  if (data.size() != 20 + 4 * size_t(n) + 32) throw Error("key file " + path + " is truncated");
  Sha256 body;
  body.update(data.data(), data.size() - 32);
  auto digest = body.digest();
  if (std::memcmp(digest.data(), data.data() + data.size() - 32, 32) != 0)
    throw Error("key file " + path + " failed its integrity check");
  if (n != uint32_t(key.block_size * key.block_size * key.channels))
    throw Error("key file " + path + ": length does not match its block size");
  std::vector<bool> seen(n, false);
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t v = le32(&data[20 + 4 * i]);
    if (v >= n || seen[v]) throw Error("key file " + path + " is not a permutation");
    seen[v] = true;
    key.perm.push_back(v);
  }
  static const char domain[] = "keyedge-key-fingerprint-v1";  // + its terminating NUL
  Sha256 fp;
  fp.update(reinterpret_cast<const uint8_t*>(domain), sizeof(domain));
  fp.update(&data[12], 4);  // block size, channels (uint16 LE each)
  fp.update(&data[20], 4 * size_t(n));
  auto f = fp.digest();
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 16; ++i) {
    key.fingerprint += hex[f[i] >> 4];
    key.fingerprint += hex[f[i] & 15];
  }
  return key;
}

Manifest Manifest::from_file(const std::string& path) {
  Json root = JsonParser(read_file(path)).parse();
  Manifest m;
  m.format = as_string(root.get("format"));
  if (m.format != "keyedge-artifact" && m.format != "keyedge-build-plan" && m.format != "keyedge-engine")
    throw Error("manifest " + path + " is not a keyedge artifact manifest (format '" + m.format + "')");
  const Json* version = root.get("version");
  if (version == nullptr || version->kind != Json::Number || version->num < 1)
    throw Error("manifest " + path + " has no valid format version");
  m.version = static_cast<int>(version->num);
  if (m.version > kManifestVersion)
    throw Error("manifest " + path + " is " + m.format + " version " + std::to_string(m.version) +
                ", newer than this runtime reads (" + std::to_string(kManifestVersion) + "): regenerate the package");
  const Json* input = root.get("input");
  const Json* output = root.get("output");
  if (input == nullptr || output == nullptr) throw Error("manifest " + path + " has no input/output spec");
  const Json* size = input->get("size");
  if (size == nullptr || size->kind != Json::Array || size->arr.size() != 2) throw Error("manifest: bad input size");
  m.input.height = static_cast<int>(size->arr[0].num);
  m.input.width = static_cast<int>(size->arr[1].num);
  m.input.channels = as_int(input->get("channels"), "input.channels");
  m.input.uint8 = as_string(input->get("dtype")) == "uint8";
  m.input.nhwc = as_string(input->get("layout")) == "NHWC";
  const Json* batch = input->get("batch");
  m.input.batch = batch != nullptr && batch->kind == Json::Number ? static_cast<int>(batch->num) : -1;
  m.input_name = as_string(input->get("name"));
  m.output_name = as_string(output->get("name"));
  m.num_classes = as_int(output->get("num_classes"), "output.num_classes");
  const Json* block = root.get("block_size");
  m.block_size = block != nullptr && block->kind == Json::Number ? static_cast<int>(block->num) : 0;
  m.key_fingerprint = as_string(root.get("key_fingerprint"));
  m.key_input = as_string(root.get("key_input"));
  m.fold_mode = as_string(root.get("fold_mode"));
  m.precision = as_string(root.get("precision"));
  if (const Json* pre = root.get("preprocess"); pre != nullptr && pre->kind == Json::Object) {
    m.kernel_preprocess = true;
    m.pixels_name = as_string(pre->get("graph_input") ? pre->get("graph_input")->get("name") : nullptr);
    for (const char* field : {"mean", "std"}) {
      const Json* v = pre->get(field);
      if (v == nullptr || v->kind != Json::Array || static_cast<int>(v->arr.size()) != m.input.channels)
        throw Error(std::string("manifest: preprocess.") + field + " needs one value per channel");
      for (const Json& x : v->arr) (field[0] == 'm' ? m.mean : m.std).push_back(static_cast<float>(x.num));
    }
  }
  if (const Json* classes = root.get("classes"); classes != nullptr && classes->kind == Json::Array)
    for (const Json& c : classes->arr) m.classes.push_back(c.str);
  return m;
}

// The key rule (as keyedge.artifacts.check_key with strict=True): an artifact that takes the key
// needs the right one; a key given for any artifact must be its own (a plain model takes none).
void attach_key(Model& model, const std::string& key_path) {
  const Manifest& m = model.manifest_;
  if (key_path.empty()) {
    if (m.needs_key()) throw Error("this artifact takes the key at run time: pass the key file");
    return;
  }
  KeyFile key = KeyFile::load(key_path);
  if (m.key_fingerprint.empty()) throw Error("this artifact is a plain (un-keyed) model: do not pass a key");
  if (key.fingerprint != m.key_fingerprint)
    throw Error("key fingerprint " + key.fingerprint + " does not match the artifact's (" + m.key_fingerprint + ")");
  if (m.needs_key()) model.key_perm_ = key.perm;
}

std::unique_ptr<Model> Model::load(const std::string& model_path, const std::string& key_path,
                                   const Options& options) {
  std::ifstream probe(model_path, std::ios::binary);
  if (!probe) throw Error("model file " + model_path + " does not exist");
  const bool engine = model_path.size() > 7 && model_path.compare(model_path.size() - 7, 7, ".engine") == 0;
  std::string manifest_path = engine ? model_path + ".json"
                                     : model_path.substr(0, model_path.find_last_of('/') + 1) + "manifest.json";
  Manifest manifest = Manifest::from_file(manifest_path);
  // the package was generated for one artifact: refuse another one dropped in its place
  if (std::string(KEYEDGE_EXPECTED_FINGERPRINT) != manifest.key_fingerprint ||
      manifest.input.height != KEYEDGE_EXPECTED_HEIGHT || manifest.input.width != KEYEDGE_EXPECTED_WIDTH ||
      manifest.num_classes != KEYEDGE_EXPECTED_CLASSES)
    throw Error("manifest " + manifest_path + " does not describe the artifact this package was generated for");
  std::unique_ptr<Model> model = engine ? make_tensorrt_model(model_path, std::move(manifest), options)
                                        : make_onnxruntime_model(model_path, std::move(manifest));
  attach_key(*model, key_path);
  model->key_attached();
  return model;
}

void Model::infer(const uint8_t* hwc, int batch, float* logits) {
  if (hwc == nullptr || logits == nullptr || batch < 1) throw Error("infer: null buffer or batch < 1");
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

void to_float_input(const uint8_t* hwc, int batch, const InputSpec& s, float* out) {
  const size_t plane = size_t(s.height) * s.width;
  for (int n = 0; n < batch; ++n)
    for (size_t px = 0; px < plane; ++px)
      for (int c = 0; c < s.channels; ++c) {
        const float v = static_cast<float>(hwc[(n * plane + px) * s.channels + c]) / 255.0f;
        if (s.nhwc) out[(n * plane + px) * s.channels + c] = v;
        else out[(size_t(n) * s.channels + c) * plane + px] = v;
      }
}

void keyed_preprocess_cpu(const uint8_t* hwc, int batch, const InputSpec& s, const std::vector<int64_t>& perm,
                          int block, const std::vector<float>& mean, const std::vector<float>& std, float* out) {
  const int area = block * block;
  const size_t plane = size_t(s.height) * s.width;
  for (int n = 0; n < batch; ++n)
    for (int c = 0; c < s.channels; ++c)
      for (int h = 0; h < s.height; ++h)
        for (int w = 0; w < s.width; ++w) {
          // same index map and float operations as kernels/preprocess.cu
          const int j = static_cast<int>(perm[c * area + (h % block) * block + (w % block)]);
          const int sc = j / area, sh = (h / block) * block + (j / block) % block, sw = (w / block) * block + j % block;
          const float v = static_cast<float>(hwc[((size_t(n) * s.height + sh) * s.width + sw) * s.channels + sc]);
          out[(size_t(n) * s.channels + c) * plane + size_t(h) * s.width + w] = (v / 255.0f - mean[c]) / std[c];
        }
}

#ifndef KEYEDGE_WITH_ONNXRUNTIME
std::unique_ptr<Model> make_onnxruntime_model(const std::string&, Manifest) {
  throw Error("this build has no ONNX Runtime backend (cmake -DKEYEDGE_WITH_ONNXRUNTIME=ON)");
}
#endif
#ifndef KEYEDGE_WITH_TENSORRT
std::unique_ptr<Model> make_tensorrt_model(const std::string&, Manifest, const Options&) {
  throw Error("this build has no TensorRT backend (cmake -DKEYEDGE_WITH_TENSORRT=ON)");
}
#endif

}  // namespace keyedge
