// keyedge C++ runtime: the artifact / build-plan / engine manifest (nlohmann-json), and engine identity.
#include <fstream>
#include <iterator>
#include <sstream>

#include "internal.hpp"
#include "json_fields.hpp"

namespace keyedge {

namespace jf = json_fields;

constexpr size_t kMaxManifestBytes = 64u << 20;

Manifest Manifest::from_file(const std::string& path) {
  const std::vector<uint8_t> bytes = read_bytes(path, "manifest", kMaxManifestBytes);
  return from_text(std::string(bytes.begin(), bytes.end()), path);
}

namespace {

// input.{dtype,layout}: one of two values.
bool choice(const jf::json& object, const char* name, const char* first, const char* second, const std::string& where) {
  const std::string v = jf::text(object, name, where);
  if (v != first && v != second)
    throw Error(where + ": input." + name + " is " + jf::shown(v) + ", not " + first + " or " + second);
  return v == second;
}

void read_input(const jf::json& input, const std::string& where, Manifest& m) {
  const jf::json& size = jf::field(input, "size", where);
  if (!size.is_array() || size.size() != 2) throw Error(where + ": input.size is not [height, width]");
  m.input.height = static_cast<int>(jf::integer(size[0], where + ": input height", 1, 65535));
  m.input.width = static_cast<int>(jf::integer(size[1], where + ": input width", 1, 65535));
  m.input.channels =
      static_cast<int>(jf::integer(jf::field(input, "channels", where), where + ": input.channels", 1, 16));
  m.input.uint8 = choice(input, "dtype", "float32", "uint8", where);
  m.input.nhwc = choice(input, "layout", "NCHW", "NHWC", where);
  const jf::json& batch = jf::field(input, "batch", where);
  m.input.batch = batch.is_string() && batch.get_ref<const std::string&>() == "dynamic"
                      ? -1 : static_cast<int>(jf::integer(batch, where + ": input.batch", 1, 1 << 16));
  m.input_name = jf::text(input, "name", where);
  if (m.input_name.empty()) throw Error(where + ": input.name is missing");
}

// --mode kernel: the runtime gathers and normalises (at most 4 channels, as the kernel).
void read_preprocess(const jf::json& pre, const std::string& where, Manifest& m) {
  m.kernel_preprocess = true;
  m.pixels_name = jf::text(jf::field(pre, "graph_input", where), "name", where);
  if (m.pixels_name.empty()) throw Error(where + ": preprocess.graph_input.name is missing");
  if (m.input.channels > 4) throw Error(where + ": kernel preprocessing takes at most 4 channels");
  if (pre.contains("block_size") && jf::integer(pre.at("block_size"), where + ": preprocess.block_size", 1, 64) !=
                                         m.block_size)
    throw Error(where + ": preprocess.block_size is not the manifest's block_size");
  for (const char* name : {"mean", "std"}) {
    const jf::json& v = jf::field(pre, name, where);
    if (!v.is_array() || static_cast<int>(v.size()) != m.input.channels)
      throw Error(where + ": preprocess." + name + " needs one value per channel");
    for (const jf::json& x : v)
      (name[0] == 'm' ? m.mean : m.std).push_back(jf::finite_float(x, where + ": preprocess." + name));
  }
  for (const float s : m.std)
    if (!(s > 0.0f)) throw Error(where + ": preprocess.std holds a value that is not > 0");
}

bool is_fingerprint(const std::string& f) {
  return f.size() == 32 && f.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// A random ensemble: one gathered graph whose member input picks each row's member (the form this runtime serves).
void read_ensemble(const jf::json& e, const std::string& where, Manifest& m) {
  if (!e.is_object()) throw Error(where + ": ensemble is not an object");
  if (jf::text(e, "form", where) != "gathered")
    throw Error(where + ": this runtime serves a random ensemble as one gathered graph (keyedge export "
                        "--ensemble-form gathered), not " + jf::shown(jf::text(e, "form", where)));
  m.member_input = jf::text(e, "member_input", where);
  if (m.member_input.empty() || m.member_input == m.input_name || m.member_input == m.key_input)
    throw Error(where + ": ensemble.member_input is missing or names another input");
  const jf::json& prints = jf::field(e, "member_fingerprints", where);
  if (!prints.is_array() || prints.size() < 2 || prints.size() > 64)
    throw Error(where + ": ensemble.member_fingerprints is not a list of 2 to 64 fingerprints");
  for (const jf::json& f : prints) {
    if (!f.is_string() || !is_fingerprint(f.get<std::string>()))
      throw Error(where + ": ensemble.member_fingerprints holds a value that is not a key fingerprint");
    m.member_fingerprints.push_back(f.get<std::string>());
  }
  if (m.input.batch != -1 || m.needs_key() || m.fold_mode != "fused")
    throw Error(where + ": a random ensemble's graph takes any batch and has its members' keys folded in");
}

// What the key rule needs: a keyed artifact's block size divides its images, and its fingerprint is one.
void check_key_fields(const std::string& where, const Manifest& m) {
  if (!m.key_fingerprint.empty() && !is_fingerprint(m.key_fingerprint))
    throw Error(where + ": key_fingerprint is not a key fingerprint (32 hex digits)");
  if (m.needs_key() && (m.block_size == 0 || m.key_fingerprint.empty()))
    throw Error(where + ": an artifact that takes the key needs block_size and key_fingerprint");
  if (m.block_size != 0 && (m.input.height % m.block_size != 0 || m.input.width % m.block_size != 0))
    throw Error(where + ": block_size " + std::to_string(m.block_size) + " does not divide the input size " +
                std::to_string(m.input.height) + "x" + std::to_string(m.input.width));
}

Manifest read_manifest(const jf::json& root, const std::string& where) {
  if (!root.is_object()) throw Error(where + " is not a JSON object");
  Manifest m;
  m.format = jf::text(root, "format", where);
  if (m.format != "keyedge-artifact" && m.format != "keyedge-build-plan" && m.format != "keyedge-engine")
    throw Error(where + " is not a keyedge artifact manifest (format " + jf::shown(m.format) + ")");
  // an integer >= 1 (nlohmann: a non-negative one is unsigned; 1e300 or 1.0 is a float)
  const jf::json* version = root.contains("version") ? &root.at("version") : nullptr;
  if (version == nullptr || !version->is_number_unsigned() || version->get<unsigned long long>() < 1)
    throw Error(where + " has no valid format version");
  if (version->get<unsigned long long>() > static_cast<unsigned long long>(kManifestVersion))
    throw Error(where + " is " + m.format + " version " + version->dump() + ", newer than this runtime reads (" +
                std::to_string(kManifestVersion) + "): regenerate the package");
  m.version = static_cast<int>(version->get<unsigned long long>());
  read_input(jf::field(root, "input", where), where, m);
  const jf::json& output = jf::field(root, "output", where);
  m.output_name = jf::text(output, "name", where);
  if (m.output_name.empty()) throw Error(where + ": output.name is missing");
  m.num_classes = static_cast<int>(jf::integer(jf::field(output, "num_classes", where), where + ": output.num_classes",
                                               1, 1 << 24));
  if (m.input.batch > 0 && uint64_t(m.input.batch) * uint64_t(m.num_classes) > (uint64_t(1) << 28))
    throw Error(where + ": input.batch x output.num_classes is too large");
  const jf::json* block = root.contains("block_size") ? &root.at("block_size") : nullptr;
  m.block_size = block == nullptr || block->is_null() ? 0 : static_cast<int>(jf::integer(*block, where + ": block_size",
                                                                                         1, 64));
  m.key_fingerprint = jf::text(root, "key_fingerprint", where);
  m.key_input = jf::text(root, "key_input", where);
  m.fold_mode = jf::text(root, "fold_mode", where);
  m.precision = jf::text(root, "precision", where);
  m.tensorrt_version = jf::text(root, "tensorrt_version", where);
  m.compute_capability = jf::text(root, "compute_capability", where);
  m.l4t_release = jf::text(root, "l4t_release", where);
  if (root.contains("preprocess") && !root.at("preprocess").is_null()) {
    if (!root.at("preprocess").is_object()) throw Error(where + ": preprocess is not an object");
    read_preprocess(root.at("preprocess"), where, m);
  }
  check_key_fields(where, m);
  if (root.contains("ensemble") && !root.at("ensemble").is_null()) read_ensemble(root.at("ensemble"), where, m);
  if (root.contains("classes") && root.at("classes").is_array())
    for (const jf::json& c : root.at("classes")) m.classes.push_back(c.is_string() ? c.get<std::string>() : c.dump());
  return m;
}

}  // namespace

Manifest Manifest::from_text(const std::string& text, const std::string& path) {
  const std::string where = "manifest " + path;
  try {
    return read_manifest(jf::parse(text, where), where);
  } catch (const jf::json::exception& e) {
    throw Error(where + ": " + e.what());
  }
}

namespace {

// "10.3.0" or trtexec's "100300" -> "10.3.0"; "" when unknown.
std::string version_triplet(const std::string& v) {
  if (v.size() >= 5 && v.size() <= 9 && v.find_first_not_of("0123456789") == std::string::npos) {
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
  std::string line;
  if (!in || !std::getline(in, line)) return "";
  // "# R36 (release), REVISION: 3.0, GCID: ..."
  const size_t r = line.find("# R"), rev = line.find("REVISION: ");
  if (r != 0 || rev == std::string::npos) return "";
  const std::string major = line.substr(3, line.find(' ', 3) - 3);
  const std::string revision = line.substr(rev + 10, line.find(',', rev) - rev - 10);
  return "R" + major + "." + revision;
}

}  // namespace keyedge
