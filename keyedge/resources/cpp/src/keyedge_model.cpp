// keyedge C++ runtime: manifest and key-file handling, batching, top-k (backend independent).
#include "keyedge_model.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <sstream>

#include <openssl/evp.h>
#include <sodium.h>

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

std::vector<uint8_t> read_bytes(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(what + " " + path + " does not exist or cannot be read");
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// SHA-256 (libsodium's crypto_hash_sha256) of the concatenated parts.
std::array<uint8_t, 32> sha256(std::initializer_list<std::pair<const uint8_t*, size_t>> parts) {
  crypto_hash_sha256_state st;
  crypto_hash_sha256_init(&st);
  for (const auto& [data, n] : parts) crypto_hash_sha256_update(&st, data, n);
  std::array<uint8_t, 32> out{};
  crypto_hash_sha256_final(&st, out.data());
  return out;
}

std::string hex(const uint8_t* data, size_t n) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out += digits[data[i] >> 4];
    out += digits[data[i] & 15];
  }
  return out;
}

void init_sodium() {
  if (sodium_init() < 0) throw Error("libsodium failed to initialise");
}

uint32_t le32(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }
uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }

int as_int(const Json* v, const char* what) {
  if (v == nullptr || v->kind != Json::Number) throw Error(std::string("manifest: missing number ") + what);
  return static_cast<int>(v->num);
}

std::string as_string(const Json* v) { return v != nullptr && v->kind == Json::String ? v->str : std::string(); }

}  // namespace

KeyFile KeyFile::load(const std::string& path) { return from_bytes(read_bytes(path, "key file"), "key file " + path); }

KeyFile KeyFile::from_bytes(const std::vector<uint8_t>& data, const std::string& where) {
  init_sodium();
  if (data.size() < 20 + 32) throw Error(where + " is truncated");
  if (std::memcmp(data.data(), "KEYEDGE\0", 8) != 0) throw Error(where + " is not a keyedge key");
  if (le16(&data[8]) != 1) throw Error(where + " has an unknown format version");
  KeyFile key;
  key.block_size = le16(&data[12]);
  key.channels = le16(&data[14]);
  uint32_t n = le32(&data[16]);
  if (data.size() != 20 + 4 * size_t(n) + 32) throw Error(where + " is truncated");
  auto digest = sha256({{data.data(), data.size() - 32}});
  if (std::memcmp(digest.data(), data.data() + data.size() - 32, 32) != 0)
    throw Error(where + " failed its integrity check");
  if (n != uint32_t(key.block_size * key.block_size * key.channels))
    throw Error(where + ": length does not match its block size");
  std::vector<bool> seen(n, false);
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t v = le32(&data[20 + 4 * i]);
    if (v >= n || seen[v]) throw Error(where + " is not a permutation");
    seen[v] = true;
    key.perm.push_back(v);
  }
  static const char domain[] = "keyedge-key-fingerprint-v1";  // + its terminating NUL
  auto f = sha256({{reinterpret_cast<const uint8_t*>(domain), sizeof(domain)},
                   {&data[12], 4},  // block size, channels (uint16 LE each)
                   {&data[20], 4 * size_t(n)}});
  key.fingerprint = hex(f.data(), 16);
  return key;
}

Manifest Manifest::from_file(const std::string& path) { return from_text(read_file(path), path); }

Manifest Manifest::from_text(const std::string& text, const std::string& path) {
  Json root = JsonParser(text).parse();
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
  m.tensorrt_version = as_string(root.get("tensorrt_version"));
  m.compute_capability = as_string(root.get("compute_capability"));
  m.l4t_release = as_string(root.get("l4t_release"));
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

namespace {

// "10.3.0" or trtexec's "100300" -> "10.3.0"; "" when unknown.
std::string version_triplet(const std::string& v) {
  if (v.size() >= 5 && v.find_first_not_of("0123456789") == std::string::npos) {
    const long n = std::stol(v);
    return std::to_string(n / 10000) + "." + std::to_string(n / 100 % 100) + "." + std::to_string(n % 100);
  }
  std::string out;
  int parts = 0;
  std::istringstream in(v);
  for (std::string part; parts < 3 && std::getline(in, part, '.'); ++parts) {
    if (part.empty() || part.find_first_not_of("0123456789") != std::string::npos) return parts ? out : "";
    out += (parts ? "." : "") + part;
  }
  return out;
}

}  // namespace

void check_engine_identity(const Manifest& m, const std::string& tensorrt_version, const std::string& capability,
                           const std::string& l4t_release, const std::string& where) {
  const std::string built = version_triplet(m.tensorrt_version), here = version_triplet(tensorrt_version);
  if (!built.empty() && !here.empty() && built != here)
    throw Error(where + " was built with TensorRT " + built + ", this machine has TensorRT " + here +
                ": rebuild it here (build_engine.sh)");
  if (!m.compute_capability.empty() && !capability.empty() && m.compute_capability != capability)
    throw Error(where + " was built for a GPU of compute capability " + m.compute_capability + ", this GPU is " +
                capability + ": rebuild it on the target");
  if (!m.l4t_release.empty() && !l4t_release.empty() && m.l4t_release != l4t_release)
    throw Error(where + " was built on Jetson Linux " + m.l4t_release + ", this device runs " + l4t_release +
                ": rebuild it on the target");
}

std::string local_l4t_release(const std::string& path) {
  std::ifstream in(path);
  std::string line, major, revision;
  if (!in || !std::getline(in, line)) return "";
  // "# R36 (release), REVISION: 3.0, GCID: ..."
  const size_t r = line.find("# R"), rev = line.find("REVISION: ");
  if (r != 0 || rev == std::string::npos) return "";
  major = line.substr(3, line.find(' ', 3) - 3);
  revision = line.substr(rev + 10, line.find(',', rev) - rev - 10);
  return "R" + major + "." + revision;
}

// The key rule (as keyedge.artifacts.check_key with strict=True): an artifact that takes the key
// needs the right one; a key given for any artifact must be its own (a plain model takes none).
void attach_key(Model& model, const KeyFile* key_file) {
  const Manifest& m = model.manifest_;
  if (key_file == nullptr) {
    if (m.needs_key()) throw Error("this artifact takes the key at run time: pass the key file");
    return;
  }
  const KeyFile& key = *key_file;
  if (m.key_fingerprint.empty()) throw Error("this artifact is a plain (un-keyed) model: do not pass a key");
  if (key.fingerprint != m.key_fingerprint)
    throw Error("key fingerprint " + key.fingerprint + " does not match the artifact's (" + m.key_fingerprint + ")");
  if (m.needs_key()) model.key_perm_ = key.perm;
  model.key_attached();
}

namespace {

// The package was generated for one artifact: refuse another one dropped in its place.
void check_expected(const Manifest& manifest, const std::string& where) {
  if (std::string(KEYEDGE_EXPECTED_FINGERPRINT) != manifest.key_fingerprint ||
      manifest.input.height != KEYEDGE_EXPECTED_HEIGHT || manifest.input.width != KEYEDGE_EXPECTED_WIDTH ||
      manifest.num_classes != KEYEDGE_EXPECTED_CLASSES)
    throw Error("manifest " + where + " does not describe the artifact this package was generated for");
}

// ``data``: an ONNX model's external tensors (model.onnx.data), when a sealed bundle holds them apart.
std::unique_ptr<Model> make_model(bool engine, Bytes model_bytes, Bytes data, const std::string& where,
                                  Manifest manifest, const KeyFile* key, const Options& options) {
  std::unique_ptr<Model> model = engine ? make_tensorrt_model(model_bytes, where, std::move(manifest), options)
                                        : make_onnxruntime_model(model_bytes, data, where, std::move(manifest));
  attach_key(*model, key);
  return model;
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& model_path, const std::string& key_path,
                                   const Options& options) {
  init_sodium();
  std::ifstream probe(model_path, std::ios::binary);
  if (!probe) throw Error("model file " + model_path + " does not exist");
  const bool engine = model_path.size() > 7 && model_path.compare(model_path.size() - 7, 7, ".engine") == 0;
  std::string manifest_path = engine ? model_path + ".json"
                                     : model_path.substr(0, model_path.find_last_of('/') + 1) + "manifest.json";
  Manifest manifest = Manifest::from_file(manifest_path);
  check_expected(manifest, manifest_path);
  std::optional<KeyFile> key;
  if (!key_path.empty()) key = KeyFile::load(key_path);
  const std::vector<uint8_t> blob = read_bytes(model_path, "model file");
  return make_model(engine, Bytes{blob.data(), blob.size()}, Bytes{}, model_path, std::move(manifest),
                    key ? &*key : nullptr, options);
}

// ---- sealed bundles (keyedge seal), opened in memory ------------------------------------------
// The content key: libsodium's sealed box to the device's X25519 key. The payload: AES-256-GCM
// (OpenSSL) in the STREAM construction, 1 MiB chunks, nonce = chunk index (11 bytes, big-endian) ||
// 1 for the last chunk, 0 otherwise; the 112-byte header is every chunk's additional data.

namespace {

constexpr size_t kHeader = 112, kChunk = 1u << 20, kTag = 16, kAlign = 4096;

struct DeviceKey {
  unsigned char sk[crypto_box_SECRETKEYBYTES];
  unsigned char pk[crypto_box_PUBLICKEYBYTES];
  ~DeviceKey() { sodium_memzero(sk, sizeof(sk)); }
};

void load_device_key(const std::string& path, DeviceKey& key) {
  std::vector<uint8_t> data = read_bytes(path, "device key");
  const bool ok = data.size() == 43 && std::memcmp(data.data(), "KEYEDGED", 8) == 0;
  if (!ok || le16(&data[8]) != 1 || data[10] != 1) {
    sodium_memzero(data.data(), data.size());
    throw Error("device key " + path + " is not a keyedge device private key");
  }
  std::memcpy(key.sk, &data[11], 32);
  sodium_memzero(data.data(), data.size());
  crypto_scalarmult_base(key.pk, key.sk);
}

// A bundle's payload, decrypted: the files are spans of one buffer, wiped when it goes.
struct Plaintext {
  std::vector<uint8_t> buffer;
  std::map<std::string, Bytes> files;
  ~Plaintext() { sodium_memzero(buffer.data(), buffer.size()); }
  Bytes file(const std::string& name) const {
    auto it = files.find(name);
    return it == files.end() ? Bytes{} : it->second;
  }
};

struct CipherCtx {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  ~CipherCtx() { EVP_CIPHER_CTX_free(ctx); }
};

// Authenticate and decrypt every chunk; any change, reordering, truncation or extension throws.
void decrypt_payload(const std::vector<uint8_t>& data, const unsigned char* key, Plaintext& out, const std::string& where) {
  const size_t body = data.size() - kHeader, n = (body + kChunk + kTag - 1) / (kChunk + kTag);
  if (n == 0 || body - (n - 1) * (kChunk + kTag) <= kTag) throw Error(where + " is truncated");
  out.buffer.resize(body - n * kTag);
  CipherCtx c;
  if (c.ctx == nullptr || EVP_DecryptInit_ex(c.ctx, EVP_aes_256_gcm(), nullptr, key, nullptr) != 1)
    throw Error("OpenSSL cannot set up AES-256-GCM");
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* chunk = &data[kHeader + i * (kChunk + kTag)];
    const size_t len = std::min(kChunk, body - i * (kChunk + kTag) - kTag);
    unsigned char nonce[12] = {0};
    for (int b = 0; b < 8; ++b) nonce[10 - b] = static_cast<unsigned char>(uint64_t(i) >> (8 * b));
    nonce[11] = i + 1 == n ? 1 : 0;
    int got = 0;
    const bool ok = EVP_DecryptInit_ex(c.ctx, nullptr, nullptr, nullptr, nonce) == 1 &&
                    EVP_DecryptUpdate(c.ctx, nullptr, &got, data.data(), int(kHeader)) == 1 &&
                    EVP_DecryptUpdate(c.ctx, &out.buffer[i * kChunk], &got, chunk, int(len)) == 1 &&
                    EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_GCM_SET_TAG, int(kTag), const_cast<uint8_t*>(chunk + len)) == 1 &&
                    EVP_DecryptFinal_ex(c.ctx, &out.buffer[i * kChunk] + got, &got) == 1;
    if (!ok) throw Error(where + " was tampered with (authentication failed): changed, truncated or extended");
  }
}

void unseal(const std::vector<uint8_t>& data, const DeviceKey& device, Plaintext& out, const std::string& where) {
  if (data.size() < kHeader) throw Error(where + " is truncated (or not a keyedge bundle)");
  if (std::memcmp(data.data(), "KEYEDGEB", 8) != 0) throw Error(where + " is not a keyedge sealed bundle");
  if (le16(&data[8]) != 2) throw Error(where + " is bundle version " + std::to_string(le16(&data[8])) +
                                       "; this runtime reads version 2");
  if (le32(&data[12]) != kChunk) throw Error(where + " was tampered with (chunk size)");
  static const char domain[] = "keyedge-device-fingerprint-v1";
  auto fp = sha256({{reinterpret_cast<const uint8_t*>(domain), sizeof(domain)}, {device.pk, sizeof(device.pk)}});
  if (std::memcmp(fp.data(), &data[16], 16) != 0)
    throw Error(where + " is sealed to device " + hex(&data[16], 16) + ", not to this device (" + hex(fp.data(), 16) + ")");
  unsigned char content_key[32];
  if (crypto_box_seal_open(content_key, &data[32], 80, device.pk, device.sk) != 0)
    throw Error(where + " cannot be opened: it was tampered with, or this is not its device's private key");
  try {
    decrypt_payload(data, content_key, out, where);
  } catch (...) {
    sodium_memzero(content_key, sizeof(content_key));
    throw;
  }
  sodium_memzero(content_key, sizeof(content_key));
  // u32 n || index JSON || each file at the next 4096-byte boundary
  const std::vector<uint8_t>& p = out.buffer;
  const size_t n = p.size() >= 4 ? le32(p.data()) : p.size();
  if (4 + n > p.size()) throw Error(where + " has an unreadable index");
  Json index = JsonParser(std::string(p.begin() + 4, p.begin() + 4 + n)).parse();
  const Json* files = index.get("files");
  if (files == nullptr || files->kind != Json::Array) throw Error(where + " has an unreadable index");
  size_t end = 4 + n;
  for (const Json& f : files->arr) {
    const size_t offset = (end + kAlign - 1) / kAlign * kAlign;
    const size_t size = static_cast<size_t>(as_int(f.get("size"), "bundle index size"));
    if (offset > p.size() || size > p.size() - offset) throw Error(where + " has an unreadable index");
    out.files[as_string(f.get("name"))] = Bytes{&p[offset], size};
    end = offset + size;
  }
  if (end != p.size()) throw Error(where + " has an unreadable index");
}

}  // namespace

std::unique_ptr<Model> Model::load_sealed(const std::string& bundle_path, const std::string& device_key_path,
                                          const Options& options) {
  init_sodium();
  DeviceKey device;
  load_device_key(device_key_path, device);
  Plaintext plain;
  unseal(read_bytes(bundle_path, "bundle"), device, plain, bundle_path);
  const bool engine = plain.files.count("model.engine") != 0;
  const Bytes model = plain.file(engine ? "model.engine" : "model.onnx");
  const Bytes text = plain.file(engine ? "model.engine.json" : "manifest.json");
  if (model.data == nullptr || text.data == nullptr) throw Error(bundle_path + " holds no model and manifest");
  Manifest manifest = Manifest::from_text(std::string(text.data, text.data + text.size), bundle_path + " (sealed manifest)");
  check_expected(manifest, bundle_path);
  std::optional<KeyFile> key;
  if (const Bytes k = plain.file("key.bin"); k.data != nullptr) {
    std::vector<uint8_t> bytes(k.data, k.data + k.size);
    key = KeyFile::from_bytes(bytes, bundle_path + " (sealed key)");
    sodium_memzero(bytes.data(), bytes.size());
  }
  return make_model(engine, model, plain.file("model.onnx.data"), bundle_path, std::move(manifest),
                    key ? &*key : nullptr, options);
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
