// Fuzz target: an artifact / build-plan / engine manifest (Manifest::from_text), and the engine identity
// fields it carries.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return keyedge_fuzz::guarded([&] {
    const keyedge::Manifest m =
        keyedge::Manifest::from_text(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json");
    keyedge::check_engine_identity(m, "", "", "", "fuzz.engine");  // parses the recorded versions
  });
}
