// keyedge's fuzz targets: what they share with each other and with driver.cpp.
//
// Every target calls its parser through guarded(): a keyedge::Error is the expected outcome of a hostile
// input (recorded as the input's refusal, and it must be one non-empty line); anything else that escapes
// (another exception) and any sanitizer report is a failure.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include <sodium.h>

#include "internal.hpp"

namespace keyedge_fuzz {

// The last input's refusal (a keyedge::Error's message), or "" when it was accepted.
inline std::string& refusal() {
  static std::string message;
  return message;
}

template <typename F>
int guarded(F&& parse) {
  refusal().clear();
  try {
    parse();
  } catch (const keyedge::Error& e) {
    refusal() = e.what();
    if (refusal().empty() || refusal().find_first_of("\r\n") != std::string::npos)
      throw std::logic_error("a refusal that is not one line: [" + refusal() + "]");
  }
  return 0;
}

// The keys the bundle corpus is made with (make_corpus.py): the publisher's Ed25519 seed is 32 bytes of
// 0x11, the device's X25519 secret key 32 bytes of 0x22. Test keys, public by construction.
struct FixedKeys {
  keyedge::Trust trust;
  uint8_t device_sk[32];
  FixedKeys() {
    if (sodium_init() < 0) throw std::runtime_error("libsodium failed to initialise");
    uint8_t seed[32], sk[64];
    std::memset(seed, 0x11, sizeof(seed));
    keyedge::PublisherKey pk{};
    crypto_sign_seed_keypair(pk.data(), sk, seed);
    trust.publishers.push_back(pk);
    std::memset(device_sk, 0x22, sizeof(device_sk));
  }
};

}  // namespace keyedge_fuzz
