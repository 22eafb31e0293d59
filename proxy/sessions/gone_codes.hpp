// The return values that say a backend session is gone, or the device behind
// it: the pool discards such a session instead of pooling it
// (forward/session_effects.hpp), and a group's member health tells the two
// apart (group/member_health.cpp: the device is down at once; one session
// gone is one session). One list, so that both follow the same codes.
#pragma once

#include <p11mux/pkcs11.h>

namespace p11mux {

// The device, not the call: nothing on it can be trusted to work.
constexpr bool device_gone(CK_RV rv) noexcept {
  return rv == CKR_DEVICE_ERROR || rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT;
}

// This session only (closed by the backend, or a module restarted under us).
constexpr bool session_handle_gone(CK_RV rv) noexcept {
  return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED;
}

// Errors that mean the backend session, or the whole device, is gone.
constexpr bool session_gone(CK_RV rv) noexcept {
  return device_gone(rv) || session_handle_gone(rv);
}

}  // namespace p11mux
