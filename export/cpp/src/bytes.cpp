// keyedge C++ runtime: reading files, little-endian fields, and SHA-256 (libsodium).
#include <fstream>
#include <iterator>

#include <sodium.h>

#include "internal.hpp"

namespace keyedge {

std::vector<uint8_t> read_bytes(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(what + " " + path + " does not exist or cannot be read");
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }

uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

void init_sodium() {
  if (sodium_init() < 0) throw Error("libsodium failed to initialise");
}

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

}  // namespace keyedge
