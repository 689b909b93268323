// Fuzz target: a sealed bundle's decrypted payload, without the cryptography: its index (parse_index), then
// what load_sealed reads from the files (read_sealed: the manifest, the key, the key rule).
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return keyedge_fuzz::guarded([&] {
    const auto files = keyedge::parse_index(keyedge::Bytes{data, size}, "fuzz payload");
    keyedge::read_sealed(files, "fuzz payload");
  });
}
