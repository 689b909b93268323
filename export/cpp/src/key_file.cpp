// keyedge C++ runtime: the key file (format v1), validated and fingerprinted as keyedge.core.keys does.
#include <cstring>

#include "internal.hpp"

namespace keyedge {

KeyFile KeyFile::load(const std::string& path) { return from_bytes(read_bytes(path, "key file"), "key file " + path); }

KeyFile KeyFile::from_bytes(const std::vector<uint8_t>& data, const std::string& where) {
  init_sodium();
  if (data.size() < 20 + 32) throw Error(where + " is truncated");
  if (std::memcmp(data.data(), "KEYEDGE\0", 8) != 0) throw Error(where + " is not a keyedge key");
  if (le16(&data[8]) != 1) throw Error(where + " has an unknown format version");
  KeyFile key;
  key.block_size = le16(&data[12]);
  key.channels = le16(&data[14]);
  const uint32_t n = le32(&data[16]);
  if (data.size() != 20 + 4 * size_t(n) + 32) throw Error(where + " is truncated");
  auto digest = sha256({{data.data(), data.size() - 32}});
  if (std::memcmp(digest.data(), data.data() + data.size() - 32, 32) != 0)
    throw Error(where + " failed its integrity check");
  if (key.block_size < 1 || key.channels < 1 ||
      uint64_t(n) != uint64_t(key.block_size) * uint64_t(key.block_size) * uint64_t(key.channels))
    throw Error(where + ": length does not match its block size");
  std::vector<bool> seen(n, false);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t v = le32(&data[20 + 4 * size_t(i)]);
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

}  // namespace keyedge
