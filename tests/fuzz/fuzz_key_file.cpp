// Fuzz target: a key file (KeyFile::from_bytes, versions 1 and 2), or, for inputs that start with its
// magic, a publisher public key.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return keyedge_fuzz::guarded([&] {
    if (size >= 8 && std::memcmp(data, "KEYEDGEP", 8) == 0)
      keyedge::publisher_key_from_bytes(keyedge::Bytes{data, size}, "fuzz.pub");
    else
      keyedge::KeyFile::from_bytes(data, size, "fuzz.bin");
  });
}
