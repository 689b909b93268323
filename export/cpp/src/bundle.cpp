// keyedge C++ runtime: sealed bundles (keyedge seal), opened in memory with the device's private key.
//
// The content key: libsodium's sealed box to the device's X25519 key. The payload: AES-256-GCM (OpenSSL)
// in the STREAM construction, 1 MiB chunks, nonce = chunk index (11 bytes, big-endian) || 1 for the last
// chunk, 0 otherwise; the 112-byte header is every chunk's additional data. The payload is
// u32 n || index JSON (n bytes) || each file at the next 4096-byte boundary. See keyedge/runtime/bundle.py.
#include <algorithm>
#include <cstring>
#include <set>

#include <openssl/evp.h>
#include <sodium.h>

#include "internal.hpp"
#include "json_fields.hpp"

namespace keyedge {
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

struct CipherCtx {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  ~CipherCtx() { EVP_CIPHER_CTX_free(ctx); }
};

// Authenticate and decrypt every chunk; any change, reordering, truncation or extension throws.
void decrypt_payload(const std::vector<uint8_t>& data, const unsigned char* key, Plaintext& out,
                     const std::string& where) {
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

// The index: {"files": [{"name", "size"}, ...]}, each file at the next aligned offset, filling the payload.
void read_index(Plaintext& out, const std::string& where) {
  const std::vector<uint8_t>& p = out.buffer;
  const std::string bad = where + " has an unreadable index";
  try {
    if (p.size() < 4 || le32(p.data()) > p.size() - 4) throw Error(bad);
    const size_t n = le32(p.data());
    const json_fields::json index = json_fields::parse(std::string(p.begin() + 4, p.begin() + 4 + long(n)), bad);
    const json_fields::json& files = json_fields::field(index, "files", bad);
    if (!files.is_array()) throw Error(bad);
    size_t end = 4 + n;
    std::set<std::string> names;
    for (const json_fields::json& f : files) {
      const std::string name = json_fields::text(f, "name", bad);
      const auto size = static_cast<size_t>(json_fields::integer(json_fields::field(f, "size", bad), bad, 0,
                                                                 static_cast<long long>(p.size())));
      const size_t offset = (end + kAlign - 1) / kAlign * kAlign;
      if (name.empty() || !names.insert(name).second || offset > p.size() || size > p.size() - offset)
        throw Error(bad);  // a name twice, or a file outside the payload
      out.files[name] = Bytes{&p[offset], size};
      end = offset + size;
    }
    if (end != p.size()) throw Error(bad);
  } catch (const Error&) {
    throw Error(bad);
  }
}

}  // namespace

Plaintext::~Plaintext() { sodium_memzero(buffer.data(), buffer.size()); }

Bytes Plaintext::file(const std::string& name) const {
  auto it = files.find(name);
  return it == files.end() ? Bytes{} : it->second;
}

void unseal_bundle(const std::string& bundle_path, const std::string& device_key_path, Plaintext& out) {
  init_sodium();
  DeviceKey device;
  load_device_key(device_key_path, device);
  const std::vector<uint8_t> data = read_bytes(bundle_path, "bundle");
  const std::string& where = bundle_path;
  if (data.size() < kHeader) throw Error(where + " is truncated (or not a keyedge bundle)");
  if (std::memcmp(data.data(), "KEYEDGEB", 8) != 0) throw Error(where + " is not a keyedge sealed bundle");
  if (le16(&data[8]) != 2)
    throw Error(where + " is bundle version " + std::to_string(le16(&data[8])) + "; this runtime reads version 2");
  if (le32(&data[12]) != kChunk) throw Error(where + " was tampered with (chunk size)");
  static const char domain[] = "keyedge-device-fingerprint-v1";
  auto fp = sha256({{reinterpret_cast<const uint8_t*>(domain), sizeof(domain)}, {device.pk, sizeof(device.pk)}});
  if (std::memcmp(fp.data(), &data[16], 16) != 0)
    throw Error(where + " is sealed to device " + hex(&data[16], 16) + ", not to this device (" + hex(fp.data(), 16) +
                ")");
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
  read_index(out, where);
}

}  // namespace keyedge
