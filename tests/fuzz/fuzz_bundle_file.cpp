// Fuzz target: a whole sealed bundle file, as load_sealed opens it: the header, the publisher (one fixed
// trusted key) and its signature, then with the fixed device key the recipient, the content key, every
// chunk, the index and what load_sealed reads from the files.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const keyedge_fuzz::FixedKeys keys;
  return keyedge_fuzz::guarded([&] {
    keyedge::Plaintext plain;
    keyedge::open_bundle(keyedge::Bytes{data, size}, keys.device_sk, keys.trust, "fuzz.kes", plain);
    keyedge::read_sealed(plain.files, "fuzz.kes");
  });
}
