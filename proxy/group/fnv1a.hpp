// FNV-1a, 64 bits: a hash that is the same on every build and platform
// (unlike std::hash), for the group's token serial number (group_slot.cpp),
// and cheap for the object map's tables (object_map.cpp), whose keys no
// adversary chooses.
#pragma once

#include <cstddef>
#include <cstdint>

namespace p11mux {

struct Fnv1a {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  void add(const void* data, std::size_t size) noexcept {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < size; ++i) {
      h ^= p[i];
      h *= 0x100000001b3ULL;
    }
  }
  template <class T>
  void add(const T& value) noexcept {
    add(&value, sizeof value);
  }
};

}  // namespace p11mux
