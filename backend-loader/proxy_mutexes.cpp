#include "proxy_mutexes.hpp"

#include <mutex>
#include <new>

namespace p11mux::proxy_mutexes {

CK_RV create(CK_VOID_PTR_PTR mutex) {
  if (mutex == nullptr) return CKR_ARGUMENTS_BAD;
  *mutex = new (std::nothrow) std::mutex;
  return *mutex != nullptr ? CKR_OK : CKR_HOST_MEMORY;
}

CK_RV destroy(CK_VOID_PTR mutex) {
  if (mutex == nullptr) return CKR_MUTEX_BAD;
  delete static_cast<std::mutex*>(mutex);
  return CKR_OK;
}

CK_RV lock(CK_VOID_PTR mutex) {
  if (mutex == nullptr) return CKR_MUTEX_BAD;
  static_cast<std::mutex*>(mutex)->lock();
  return CKR_OK;
}

CK_RV unlock(CK_VOID_PTR mutex) {
  if (mutex == nullptr) return CKR_MUTEX_BAD;
  static_cast<std::mutex*>(mutex)->unlock();
  return CKR_OK;
}

}  // namespace p11mux::proxy_mutexes
