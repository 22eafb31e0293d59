// Ending a digest p11mux's own answer ended. By the spec any error of
// C_DigestKey ends the digest (docs/pkcs11-facts.md, "Operations"); when
// p11mux answers one itself, without reaching the backend (the key hidden by
// the policy, or none of a group's), the backend still has the digest, and
// would refuse the session's next C_DigestInit with CKR_OPERATION_ACTIVE.
#pragma once

#include "port/backend_port.hpp"

#include <p11mux/pkcs11.h>

#include <string.h>

#include <array>

namespace p11mux {

// Ends the digest on backend session `s`: v3.0 C_SessionCancel; else a
// C_DigestFinal into a buffer larger than any digest, zeroed afterwards.
// CKR_OK once the backend has none.
[[gnu::cold]] inline CK_RV end_digest(const BackendPort& port, CK_SESSION_HANDLE s) noexcept {
  if (port.version().major >= 3) {
    if (port.call<fn::C_SessionCancel>(s, CKF_DIGEST) == CKR_OK) return CKR_OK;
  }
  std::array<CK_BYTE, 1024> out{};
  CK_ULONG len = out.size();
  const CK_RV rv = port.call<fn::C_DigestFinal>(s, out.data(), &len);
  explicit_bzero(out.data(), out.size());
  return rv == CKR_OPERATION_NOT_INITIALIZED ? CKR_OK : rv;  // it had ended after all
}

}  // namespace p11mux
