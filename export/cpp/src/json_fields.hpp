// keyedge C++ runtime: typed fields of JSON documents (manifests, a bundle's index), over nlohmann-json.
// Every malformed, too deeply nested or out-of-range value is a keyedge::Error (one line) naming the field.
#pragma once

#include <cfloat>
#include <cmath>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "keyedge_model.hpp"

namespace keyedge::json_fields {

using nlohmann::json;

// Deeper documents are refused while they are parsed (keyedge's own are 4 levels deep).
constexpr int kMaxDepth = 64;

template <typename It>
json parse(It first, It last, const std::string& where) {
  const json::parser_callback_t depth_limit = [&where](int depth, json::parse_event_t, json&) {
    if (depth > kMaxDepth) throw Error(where + " is nested deeper than " + std::to_string(kMaxDepth) + " levels");
    return true;
  };
  try {
    return json::parse(first, last, depth_limit);
  } catch (const json::exception& e) {
    throw Error(where + " is not valid JSON: " + e.what());
  }
}

inline json parse(const std::string& text, const std::string& where) { return parse(text.begin(), text.end(), where); }

inline const json& field(const json& object, const char* name, const std::string& where) {
  if (!object.is_object() || !object.contains(name)) throw Error(where + ": missing field '" + name + "'");
  return object.at(name);
}

// An integer in [lo, hi]; a fraction, an exponent (1e3), a string or an out-of-range number is refused.
inline long long integer(const json& value, const std::string& what, long long lo = 0,
                         long long hi = std::numeric_limits<int>::max()) {
  long long v = 0;
  if (value.is_number_unsigned()) {
    const auto u = value.get<unsigned long long>();
    if (u > static_cast<unsigned long long>(hi)) throw Error(what + " is out of range");
    v = static_cast<long long>(u);
  } else if (value.is_number_integer()) {
    v = value.get<long long>();
  } else {
    throw Error(what + " is not an integer");
  }
  if (v < lo || v > hi) throw Error(what + " is out of range");
  return v;
}

// A finite number that a float holds.
inline float finite_float(const json& value, const std::string& what) {
  if (!value.is_number()) throw Error(what + " is not a number");
  const double v = value.get<double>();
  if (!std::isfinite(v) || std::fabs(v) > FLT_MAX) throw Error(what + " is out of range");
  return static_cast<float>(v);
}

// A string, or "" where the field is absent or null. Control characters are refused (every value read
// this way may appear in a one-line message), and so are strings of over 4096 bytes.
inline std::string text(const json& object, const char* name, const std::string& where) {
  if (!object.is_object() || !object.contains(name) || object.at(name).is_null()) return "";
  const json& v = object.at(name);
  if (!v.is_string()) throw Error(where + ": field '" + name + "' is not a string");
  const std::string& s = v.get_ref<const std::string&>();
  if (s.size() > 4096) throw Error(where + ": field '" + name + "' is too long");
  for (const char c : s)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      throw Error(where + ": field '" + name + "' holds a control character");
  return s;
}

// A value read by text(), quoted for a message (long ones shortened).
inline std::string shown(const std::string& s) { return "'" + (s.size() > 64 ? s.substr(0, 61) + "..." : s) + "'"; }

}  // namespace keyedge::json_fields
