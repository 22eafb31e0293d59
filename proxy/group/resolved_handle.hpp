// A session's last object handle resolved on its member (group_objects.hpp,
// group_resolve with a ResolvedHandle): a call naming the same handle, on
// the same member, while the group's object map has not changed
// (ObjectMap::version), takes it without the map's shard lock. A TLS
// server signs with one key: each C_SignInit then costs no map lookup.
#pragma once

#include <p11mux/pkcs11.h>

#include <atomic>
#include <cstdint>

namespace p11mux {

// What an empty ResolvedHandle points at: a counter at 0, which its
// version (kNoVersion) never equals; so reuse() needs no test for it.
inline constexpr std::uint64_t kNoVersion = ~std::uint64_t{0};
inline const std::atomic<std::uint64_t> kNoMapVersion{0};

// On the session's member only: the session forgets it when it moves
// (member_calls.hpp, on_member), so that reuse() compares no member.
struct ResolvedHandle {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;  // the application's (virtual)
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;  // the session's member's
  std::uint64_t version = kNoVersion;           // the map's version, read before the lookup
  // The map's version counter (ObjectMap::version_counter): kept here, so
  // that the check is inline on a group's call path (group_object_calls.hpp).
  const std::atomic<std::uint64_t>* map_version = &kNoMapVersion;

  // The member's handle for `virtual_handle`, if this resolution still
  // holds: the map has not changed since it was made.
  // Relaxed: nothing of the map is read after it, only this copy; and a
  // change that happened before this call (the application's own ordering)
  // is seen all the same, by the coherence of the one counter. An acquire
  // made the compiler load the session's state again after it (callgrind:
  // 1 instruction a C_SignInit).
  bool reuse(CK_OBJECT_HANDLE virtual_handle, CK_OBJECT_HANDLE& out) const noexcept {
    if (virtual_handle != handle || map_version->load(std::memory_order_relaxed) != version)
      return false;
    out = object;
    return true;
  }
};

}  // namespace p11mux
