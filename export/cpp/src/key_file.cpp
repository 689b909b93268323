// keyedge C++ runtime: the key file (format v1 and v2), validated and fingerprinted as keyedge.core.keys does.
//
//   0   8   magic "KEYEDGE\0"        12  2  block size M       20  16  key id (v2 only)
//   8   2   version (1 or 2)         14  2  channels C         ..  4n  permutation (u32 each)
//   10  2   flags                    16  4  n = M*M*C          ..  32  SHA-256 over every byte before it
// Fingerprint v1: SHA-256("keyedge-key-fingerprint-v1\0" || M, C || permutation)[:16];
// v2: SHA-256("keyedge-key-fingerprint-v2\0" || key id || M, C || permutation)[:16].
#include <cstring>

#include <sodium.h>

#include "internal.hpp"

namespace keyedge {

namespace {

constexpr size_t kMaxKeyFile = 64u << 20;  // 16 Mi values (keyedge's keys: at most 64 x 64 x 16)

std::string fingerprint_of(std::initializer_list<std::pair<const uint8_t*, size_t>> parts) {
  const auto f = sha256(parts);
  return hex(f.data(), 16);
}

}  // namespace

KeyFile::~KeyFile() { sodium_memzero(perm.data(), perm.size() * sizeof(perm[0])); }

KeyFile& KeyFile::operator=(const KeyFile& other) {
  if (this != &other) {
    KeyFile copy(other);
    *this = std::move(copy);
  }
  return *this;
}

KeyFile& KeyFile::operator=(KeyFile&& other) noexcept {
  if (this != &other) {
    sodium_memzero(perm.data(), perm.size() * sizeof(perm[0]));
    version = other.version;
    block_size = other.block_size;
    channels = other.channels;
    insecure = other.insecure;
    insecure_small = other.insecure_small;
    perm = std::move(other.perm);
    fingerprint = std::move(other.fingerprint);
  }
  return *this;
}

KeyFile KeyFile::load(const std::string& path) {
  const SecretBuffer data = read_secret(path, "key file", kMaxKeyFile);
  return from_bytes(data.data(), data.size(), "key file " + path);
}

KeyFile KeyFile::from_bytes(const std::vector<uint8_t>& data, const std::string& where) {
  return from_bytes(data.data(), data.size(), where);
}

KeyFile KeyFile::from_bytes(const uint8_t* data, size_t size, const std::string& where) {
  init_sodium();
  if (size < 20 + 32) throw Error(where + " is truncated");
  if (std::memcmp(data, "KEYEDGE\0", 8) != 0) throw Error(where + " is not a keyedge key");
  KeyFile key;
  key.version = le16(data + 8);
  if (key.version != 1 && key.version != 2)
    throw Error(where + " has unknown key format version " + std::to_string(key.version) +
                " (this runtime reads 1 and 2)");
  const size_t header = key.version == 1 ? 20 : 36;
  const uint16_t flags = le16(data + 10);
  if (flags & ~3u) throw Error(where + " has unknown flags");
  key.insecure = (flags & 1) != 0;
  key.insecure_small = (flags & 2) != 0;
  key.block_size = le16(data + 12);
  key.channels = le16(data + 14);
  const uint32_t n = le32(data + 16);
  if (uint64_t(size) != uint64_t(header) + 4 * uint64_t(n) + 32)
    throw Error(where + " is truncated or has trailing bytes");
  const auto digest = sha256({{data, size - 32}});
  if (sodium_memcmp(digest.data(), data + size - 32, 32) != 0) throw Error(where + " failed its integrity check");
  if (key.block_size < 1 || key.channels < 1 ||
      uint64_t(n) != uint64_t(key.block_size) * uint64_t(key.block_size) * uint64_t(key.channels))
    throw Error(where + ": length does not match its block size");
  std::vector<bool> seen(n, false);
  key.perm.reserve(n);  // never grows: no copies of the permutation left behind
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t v = le32(data + header + 4 * size_t(i));
    if (v >= n || seen[v]) throw Error(where + " is not a permutation");
    seen[v] = true;
    key.perm.push_back(v);
  }
  static const char v1[] = "keyedge-key-fingerprint-v1", v2[] = "keyedge-key-fingerprint-v2";  // + their NUL
  const auto* d1 = reinterpret_cast<const uint8_t*>(v1);
  const auto* d2 = reinterpret_cast<const uint8_t*>(v2);
  key.fingerprint = key.version == 1
                        ? fingerprint_of({{d1, sizeof(v1)}, {data + 12, 4}, {data + 20, 4 * size_t(n)}})  // M, C, perm
                        : fingerprint_of({{d2, sizeof(v2)}, {data + 20, 16}, {data + 12, 4},  // key id, M, C, perm
                                          {data + 36, 4 * size_t(n)}});
  return key;
}

}  // namespace keyedge
