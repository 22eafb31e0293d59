#include "lifecycle/init_args.hpp"

namespace p11mux {

CK_RV parse_init_args(CK_VOID_PTR raw, InitArgs& out) noexcept {
  out = InitArgs{};
  if (raw == nullptr) return CKR_OK;
  const auto& args = *static_cast<const CK_C_INITIALIZE_ARGS*>(raw);
  if (args.pReserved != nullptr) return CKR_ARGUMENTS_BAD;
  int given = (args.CreateMutex != nullptr) + (args.DestroyMutex != nullptr) +
              (args.LockMutex != nullptr) + (args.UnlockMutex != nullptr);
  if (given != 0 && given != 4) return CKR_ARGUMENTS_BAD;
  out.may_create_threads = (args.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS) == 0;
  if (given == 4 && (args.flags & CKF_OS_LOCKING_OK) == 0) {
    out.locks = LockSource{args.CreateMutex, args.DestroyMutex, args.LockMutex, args.UnlockMutex};
  }
  return CKR_OK;
}

}  // namespace p11mux
