// The mutex callbacks p11mux hands the backend when it accepts callbacks but
// not CKF_OS_LOCKING_OK. They are p11mux's own: the application's callbacks
// are never passed on (docs/pkcs11-facts.md, "Initializing the backend").
#pragma once

#include <p11mux/pkcs11.h>

namespace p11mux::proxy_mutexes {

// Never throw: they are called from C (CKR_HOST_MEMORY, CKR_GENERAL_ERROR instead).
CK_RV create(CK_VOID_PTR_PTR mutex) noexcept;
CK_RV destroy(CK_VOID_PTR mutex) noexcept;
CK_RV lock(CK_VOID_PTR mutex) noexcept;
CK_RV unlock(CK_VOID_PTR mutex) noexcept;

}  // namespace p11mux::proxy_mutexes
