// An application's mutex callbacks (CK_C_INITIALIZE_ARGS CreateMutex ...
// UnlockMutex) over std::mutex, for tests that initialize a module with them.
#pragma once

#include <p11mux/pkcs11.h>

#include <mutex>

namespace p11mux::test_backends {

inline CK_RV create_mutex(CK_VOID_PTR_PTR out) {
  if (out == nullptr) return CKR_ARGUMENTS_BAD;
  *out = new std::mutex;
  return CKR_OK;
}
inline CK_RV destroy_mutex(CK_VOID_PTR m) {
  delete static_cast<std::mutex*>(m);
  return CKR_OK;
}
inline CK_RV lock_mutex(CK_VOID_PTR m) {
  static_cast<std::mutex*>(m)->lock();
  return CKR_OK;
}
inline CK_RV unlock_mutex(CK_VOID_PTR m) {
  static_cast<std::mutex*>(m)->unlock();
  return CKR_OK;
}

}  // namespace p11mux::test_backends
