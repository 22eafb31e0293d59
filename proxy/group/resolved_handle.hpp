// A session's last object handle resolved on its member (group_objects.hpp,
// group_resolve with a ResolvedHandle): a call naming the same handle, on
// the same member, while the group's object map has not changed
// (ObjectMap::version), takes it without the map's shard lock. A TLS
// server signs with one key: each C_SignInit then costs no map lookup.
#pragma once

#include <p11mux/pkcs11.h>

#include <cstdint>

namespace p11mux {

struct ResolvedHandle {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;  // the application's (virtual)
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;  // the member's
  std::uint64_t member = ~std::uint64_t{0};
  std::uint64_t version = 0;  // ObjectMap::version() read before the lookup
};

}  // namespace p11mux
