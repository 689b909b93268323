// keyedge C++ runtime: typed fields of JSON documents (manifests, a bundle's index), over nlohmann-json.
// Every malformed or out-of-range value is a keyedge::Error naming the field.
#pragma once

#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "keyedge_model.hpp"

namespace keyedge::json_fields {

using nlohmann::json;

inline json parse(const std::string& text, const std::string& where) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error(where + " is not valid JSON: " + e.what());
  }
}

inline const json& field(const json& object, const char* name, const std::string& where) {
  if (!object.is_object() || !object.contains(name)) throw Error(where + ": missing field '" + name + "'");
  return object.at(name);
}

// An integer in [lo, hi]; a fraction, a string or an out-of-range number is refused.
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

// A string, or "" where the field is absent or null.
inline std::string text(const json& object, const char* name, const std::string& where) {
  if (!object.is_object() || !object.contains(name) || object.at(name).is_null()) return "";
  const json& v = object.at(name);
  if (!v.is_string()) throw Error(where + ": field '" + name + "' is not a string");
  return v.get<std::string>();
}

}  // namespace keyedge::json_fields
