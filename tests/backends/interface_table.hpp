// C_GetInterfaceList and C_GetInterface over a fixed table of interfaces, for
// the test backends whose functions are generated from <p11mux/functions.h>
// (recorder, null).
#pragma once

#include <p11mux/pkcs11.h>

#include <cstddef>
#include <cstring>

namespace p11mux::test_backends {

template <std::size_t N>
CK_RV list_interfaces(const CK_INTERFACE (&table)[N], CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  if (count == nullptr) return CKR_ARGUMENTS_BAD;
  if (list != nullptr) {
    if (*count < N) {
      *count = N;
      return CKR_BUFFER_TOO_SMALL;
    }
    std::memcpy(list, table, sizeof table);
  }
  *count = N;
  return CKR_OK;
}

// The first entry that matches name, version and flags (each when given).
template <std::size_t N>
CK_RV find_interface(CK_INTERFACE (&table)[N], CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                     CK_INTERFACE_PTR_PTR out, CK_FLAGS flags) {
  if (out == nullptr) return CKR_ARGUMENTS_BAD;
  for (CK_INTERFACE& i : table) {
    if (name != nullptr && std::strcmp(reinterpret_cast<const char*>(name),
                                       reinterpret_cast<const char*>(i.pInterfaceName)) != 0) {
      continue;
    }
    const auto* v = static_cast<const CK_VERSION*>(i.pFunctionList);
    if (version != nullptr && (version->major != v->major || version->minor != v->minor)) continue;
    if ((i.flags & flags) != flags) continue;
    *out = &i;
    return CKR_OK;
  }
  return CKR_ARGUMENTS_BAD;
}

}  // namespace p11mux::test_backends
