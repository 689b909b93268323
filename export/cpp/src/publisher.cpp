// keyedge C++ runtime: publishers' Ed25519 public keys (keyedge publisher keygen writes publisher.pub).
#include <cstring>

#include "internal.hpp"

namespace keyedge {

PublisherKey publisher_key_from_bytes(Bytes data, const std::string& where) {
  if (data.size != 8 + 3 + 32 || std::memcmp(data.data, "KEYEDGEP", 8) != 0)
    throw Error(where + " is not a keyedge publisher public key");
  if (le16(data.data + 8) != 1) throw Error(where + " is a publisher key of unknown version " +
                                            std::to_string(le16(data.data + 8)));
  if (data.data[10] == 1) throw Error(where + " is a publisher private key: trust its public key (.pub)");
  if (data.data[10] != 2) throw Error(where + " is not a keyedge publisher public key");
  PublisherKey key{};
  std::memcpy(key.data(), data.data + 11, key.size());
  return key;
}

PublisherKey load_publisher_key(const std::string& path) {
  const std::vector<uint8_t> data = read_bytes(path, "publisher key", 64);
  return publisher_key_from_bytes(Bytes{data.data(), data.size()}, "publisher key " + path);
}

PublisherKey publisher_key_from_hex(const std::string& digits, const std::string& where) {
  PublisherKey key{};
  if (digits.size() != 2 * key.size()) throw Error(where + " is not a publisher key (64 lowercase hex digits)");
  for (size_t i = 0; i < digits.size(); ++i) {
    static const char digits_of[] = "0123456789abcdef";
    const char* at = digits[i] == '\0' ? nullptr : std::strchr(digits_of, digits[i]);
    if (at == nullptr) throw Error(where + " is not a publisher key (64 lowercase hex digits)");
    const int v = static_cast<int>(at - digits_of);
    key[i / 2] = static_cast<uint8_t>(key[i / 2] << 4 | v);
  }
  return key;
}

std::string publisher_fingerprint(const PublisherKey& key) {
  static const char domain[] = "keyedge-publisher-fingerprint-v1";  // + its terminating NUL
  init_sodium();
  const auto f = sha256({{reinterpret_cast<const uint8_t*>(domain), sizeof(domain)}, {key.data(), key.size()}});
  return hex(f.data(), 16);
}

}  // namespace keyedge
