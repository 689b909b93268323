// keyedge C++ runtime: sealed bundles (keyedge seal), checked, then opened in memory with the device's private key.
//
// Version 3 (keyedge/runtime/bundle.py): a 208-byte header -- magic, version, flags (bit 0: signed), chunk size,
// the recipient's fingerprint, the content key sealed to the device's X25519 key (libsodium's sealed box), the
// publisher's Ed25519 public key and its detached signature -- then the payload in AES-256-GCM (OpenSSL) STREAM
// chunks of 1 MiB: nonce = chunk index (11 bytes, big-endian) || 1 for the last chunk, 0 otherwise; additional
// data = the header's first 144 bytes (all but the signature). The signature (libsodium crypto_sign) covers
// "keyedge-bundle-signature-v3\0" || header[0, 144) || SHA-256(h_0 || h_1 || ...), h_i = SHA-256 of chunk i's
// ciphertext and tag as stored. The header, the publisher and its signature are checked before anything is
// decrypted. The payload: u32 n || index JSON (n bytes) || each file at the next 4096-byte boundary.
#include <algorithm>
#include <cstring>
#include <set>

#include <openssl/evp.h>
#include <sodium.h>

#include "internal.hpp"
#include "json_fields.hpp"

namespace keyedge {
namespace {

namespace jf = json_fields;

constexpr size_t kHeader = 208, kAad = 144, kChunk = 1u << 20, kTag = 16, kRecord = kChunk + kTag, kAlign = 4096;
constexpr size_t kRecipientAt = 16, kSealedKeyAt = 32, kPublisherAt = 112, kSignatureAt = 144;
constexpr uint16_t kVersion = 3, kSignedFlag = 1;

// The header's own checks; returns the number of chunk records (every one full but the last, which holds
// at least one byte).
size_t check_header(Bytes d, const std::string& where) {
  if (d.size < kHeader) throw Error(where + " is truncated (or not a keyedge bundle)");
  if (std::memcmp(d.data, "KEYEDGEB", 8) != 0) throw Error(where + " is not a keyedge sealed bundle");
  if (const uint16_t version = le16(d.data + 8); version != kVersion)
    throw Error(where + " is bundle version " + std::to_string(version) + "; this runtime reads version 3" +
                (version < kVersion ? " (seal it again)" : ""));
  if (const uint16_t flags = le16(d.data + 10); flags & ~kSignedFlag)
    throw Error(where + " has unknown flags (" + std::to_string(flags) + "): tampered with, or from a newer keyedge");
  if (le32(d.data + 12) != kChunk) throw Error(where + " was tampered with (chunk size)");
  const size_t body = d.size - kHeader, n = body / kRecord + (body % kRecord != 0);
  if (n == 0 || body - (n - 1) * kRecord <= kTag) throw Error(where + " is truncated");
  return n;
}

// SHA-256 over the SHA-256 of every chunk record as stored.
std::array<uint8_t, 32> records_digest(Bytes d, size_t n) {
  crypto_hash_sha256_state st;
  crypto_hash_sha256_init(&st);
  for (size_t i = 0; i < n; ++i) {
    const size_t at = kHeader + i * kRecord;
    const auto h = sha256({{d.data + at, std::min(kRecord, d.size - at)}});
    crypto_hash_sha256_update(&st, h.data(), h.size());
  }
  std::array<uint8_t, 32> out{};
  crypto_hash_sha256_final(&st, out.data());
  return out;
}

void check_publisher(Bytes d, size_t n, const Trust& trust, const std::string& where) {
  const uint8_t* signature = d.data + kSignatureAt;
  if (!(le16(d.data + 10) & kSignedFlag)) {
    if (!trust.allow_unsigned)
      throw Error(where + " is not signed by a publisher: seal it with --sign-with PUBLISHER.key "
                          "(unsigned bundles open only with allow_unsigned, for development)");
    if (!sodium_is_zero(d.data + kPublisherAt, kHeader - kPublisherAt))
      throw Error(where + " was tampered with (an unsigned bundle that holds a signature)");
    return;
  }
  PublisherKey publisher{};
  std::memcpy(publisher.data(), d.data + kPublisherAt, publisher.size());
  if (std::find(trust.publishers.begin(), trust.publishers.end(), publisher) == trust.publishers.end())
    throw Error(where + " is signed by publisher " + publisher_fingerprint(publisher) + ", which is not trusted" +
                (trust.publishers.empty() ? " (no publisher is: pass --trust PUBLISHER.pub)" : ""));
  static const char domain[] = "keyedge-bundle-signature-v3";  // + its terminating NUL: 28 bytes
  std::array<uint8_t, sizeof(domain) + kAad + 32> message{};
  const auto digest = records_digest(d, n);
  std::memcpy(message.data(), domain, sizeof(domain));
  std::memcpy(message.data() + sizeof(domain), d.data, kAad);
  std::memcpy(message.data() + sizeof(domain) + kAad, digest.data(), digest.size());
  if (crypto_sign_verify_detached(signature, message.data(), message.size(), publisher.data()) != 0)
    throw Error(where + " was tampered with: the publisher's signature does not verify");
}

struct CipherCtx {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  ~CipherCtx() { EVP_CIPHER_CTX_free(ctx); }
};

// Authenticate and decrypt every chunk into one secret buffer; any change, reordering, truncation or
// extension throws.
void decrypt_payload(Bytes d, size_t n, const uint8_t* key, Plaintext& out, const std::string& where) {
  const size_t body = d.size - kHeader;
  out.buffer = SecretBuffer(body - n * kTag);
  CipherCtx c;
  if (c.ctx == nullptr || EVP_DecryptInit_ex(c.ctx, EVP_aes_256_gcm(), nullptr, key, nullptr) != 1)
    throw Error("OpenSSL cannot set up AES-256-GCM");
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* chunk = d.data + kHeader + i * kRecord;
    const size_t len = std::min(kRecord, body - i * kRecord) - kTag;
    uint8_t* plain = out.buffer.data() + i * kChunk;
    unsigned char nonce[12] = {0};
    for (int b = 0; b < 8; ++b) nonce[10 - b] = static_cast<unsigned char>(uint64_t(i) >> (8 * b));
    nonce[11] = i + 1 == n ? 1 : 0;
    int got = 0;
    const bool ok = EVP_DecryptInit_ex(c.ctx, nullptr, nullptr, nullptr, nonce) == 1 &&
                    EVP_DecryptUpdate(c.ctx, nullptr, &got, d.data, int(kAad)) == 1 &&
                    EVP_DecryptUpdate(c.ctx, plain, &got, chunk, int(len)) == 1 &&
                    EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_GCM_SET_TAG, int(kTag),
                                        const_cast<uint8_t*>(chunk + len)) == 1 &&
                    EVP_DecryptFinal_ex(c.ctx, plain + got, &got) == 1;
    if (!ok) throw Error(where + " was tampered with (authentication failed): changed, truncated or extended");
  }
}

// A file name in the index: a plain relative name of at most 255 bytes (no folders, nothing that could leave one).
bool plain_name(const std::string& name) {
  static const std::string separators("/\\\0", 3);
  return !name.empty() && name.size() <= 255 && name != "." && name != ".." &&
         name.find_first_of(separators) == std::string::npos;
}

}  // namespace

std::map<std::string, Bytes> parse_index(Bytes p, const std::string& where) {
  const std::string bad = where + " has an unreadable index";
  if (p.size < 4 || le32(p.data) > p.size - 4) throw Error(bad + " (its length)");
  const size_t n = le32(p.data);
  std::map<std::string, Bytes> out;
  try {
    const jf::json index = jf::parse(p.data + 4, p.data + 4 + n, where + "'s index");
    if (!index.is_object()) throw Error(bad + " (not a JSON object)");
    if (jf::text(index, "format", bad) != "keyedge-bundle") throw Error(bad + ": it is not a keyedge bundle index");
    jf::integer(jf::field(index, "version", bad), bad + ": version", kVersion, kVersion);
    const jf::json& files = jf::field(index, "files", bad);
    if (!files.is_array()) throw Error(bad + ": 'files' is not a list");
    size_t end = 4 + n;
    for (const jf::json& f : files) {
      const std::string name = jf::text(f, "name", bad);
      if (!plain_name(name)) throw Error(bad + ": " + jf::shown(name) + " is not a plain file name");
      const auto size = static_cast<size_t>(jf::integer(jf::field(f, "size", bad), bad + ": the size of " +
                                                        jf::shown(name), 0, static_cast<long long>(p.size)));
      const size_t offset = (end + kAlign - 1) / kAlign * kAlign;
      if (offset > p.size || size > p.size - offset) throw Error(bad + ": " + jf::shown(name) + " lies outside it");
      if (!out.emplace(name, Bytes{p.data + offset, size}).second)
        throw Error(bad + ": " + jf::shown(name) + " is in it twice");
      end = offset + size;
    }
    if (end != p.size) throw Error(bad + ": the files do not fill the payload");
  } catch (const jf::json::exception& e) {
    throw Error(bad + ": " + e.what());
  }
  return out;
}

void open_bundle(Bytes d, const uint8_t* device_sk, const Trust& trust, const std::string& where, Plaintext& out) {
  init_sodium();
  const size_t n = check_header(d, where);
  check_publisher(d, n, trust, where);
  unsigned char pk[crypto_box_PUBLICKEYBYTES];
  if (crypto_scalarmult_base(pk, device_sk) != 0) throw Error("this is not a device private key");
  static const char domain[] = "keyedge-device-fingerprint-v1";  // + its terminating NUL
  const auto fp = sha256({{reinterpret_cast<const uint8_t*>(domain), sizeof(domain)}, {pk, sizeof(pk)}});
  if (std::memcmp(fp.data(), d.data + kRecipientAt, 16) != 0)
    throw Error(where + " is sealed to device " + hex(d.data + kRecipientAt, 16) + ", not to this device (" +
                hex(fp.data(), 16) + ")");
  SecretBuffer content_key(32);
  if (crypto_box_seal_open(content_key.data(), d.data + kSealedKeyAt, 32 + crypto_box_SEALBYTES, pk, device_sk) != 0)
    throw Error(where + " cannot be opened: it was tampered with, or this is not its device's private key");
  decrypt_payload(d, n, content_key.data(), out, where);
  out.files = parse_index(out.buffer.bytes(), where);
}

void unseal_bundle(const std::string& bundle_path, const std::string& device_key_path, const Trust& trust,
                   Plaintext& out) {
  init_sodium();
  const SecretBuffer key = read_secret(device_key_path, "device key", 4096);
  // "KEYEDGED" || u16 version 1 || u8 kind 1 (private) || 32-byte X25519 secret key
  if (key.size() != 43 || std::memcmp(key.data(), "KEYEDGED", 8) != 0 || le16(key.data() + 8) != 1 ||
      key.data()[10] != 1)
    throw Error("device key " + device_key_path + " is not a keyedge device private key");
  const std::vector<uint8_t> data = read_bytes(bundle_path, "bundle");
  open_bundle(Bytes{data.data(), data.size()}, key.data() + 11, trust, bundle_path, out);
}

}  // namespace keyedge
