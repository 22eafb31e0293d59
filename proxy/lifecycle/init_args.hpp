// The application's CK_C_INITIALIZE_ARGS, checked as the spec says.
#pragma once

#include "sync/lock.hpp"

#include <p11mux/pkcs11.h>

namespace p11mux {

struct InitArgs {
  LockSource locks;                // set only in case 2: flag clear, callbacks given
  bool may_create_threads = true;  // false under CKF_LIBRARY_CANT_CREATE_OS_THREADS
};

// Returns CKR_OK and fills `out`, or CKR_ARGUMENTS_BAD for some-but-not-all
// callbacks or a non-NULL pReserved. The four cases (docs/pkcs11-facts.md):
//   1. flag clear, no callbacks: no concurrent calls promised; OS locks are harmless.
//   2. flag clear, callbacks: p11mux's own locks use the application's callbacks.
//   3. flag set, no callbacks: OS locks.
//   4. flag set, callbacks: either is allowed; p11mux uses OS locks (cheaper).
CK_RV parse_init_args(CK_VOID_PTR raw, InitArgs& out) noexcept;

}  // namespace p11mux
