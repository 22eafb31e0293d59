#include "proxy_mutexes.hpp"

#include <mutex>
#include <new>

namespace p11mux::proxy_mutexes {

// C callbacks: no exception may leave them. std::mutex::lock throws
// std::system_error when pthread_mutex_lock fails (unlock is not declared
// noexcept either): that is CKR_GENERAL_ERROR.

CK_RV create(CK_VOID_PTR_PTR mutex) noexcept {
  if (mutex == nullptr) return CKR_ARGUMENTS_BAD;
  *mutex = new (std::nothrow) std::mutex;
  return *mutex != nullptr ? CKR_OK : CKR_HOST_MEMORY;
}

CK_RV destroy(CK_VOID_PTR mutex) noexcept {
  if (mutex == nullptr) return CKR_MUTEX_BAD;
  delete static_cast<std::mutex*>(mutex);
  return CKR_OK;
}

CK_RV lock(CK_VOID_PTR mutex) noexcept {
  if (mutex == nullptr) return CKR_MUTEX_BAD;
  try {
    static_cast<std::mutex*>(mutex)->lock();
  } catch (...) {
    return CKR_GENERAL_ERROR;
  }
  return CKR_OK;
}

CK_RV unlock(CK_VOID_PTR mutex) noexcept {
  if (mutex == nullptr) return CKR_MUTEX_BAD;
  try {
    static_cast<std::mutex*>(mutex)->unlock();
  } catch (...) {
    return CKR_GENERAL_ERROR;
  }
  return CKR_OK;
}

}  // namespace p11mux::proxy_mutexes
