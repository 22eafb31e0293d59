// The application's mutex callbacks (C_Initialize case 2) over std::mutex,
// counting each call and how many locks are held as the callbacks see it:
// what the tests of Mutex and Guarded lock through. A test resets the counts
// (reset_mutex_calls) before it starts.
#pragma once

#include "sync/lock.hpp"

#include <atomic>
#include <mutex>

namespace p11mux::test {

struct MutexCalls {
  std::atomic<int> created{0}, destroyed{0}, locked{0}, unlocked{0};
  std::atomic<int> held{0};  // locked - unlocked
};
inline MutexCalls mutex_calls;

inline void reset_mutex_calls() {
  mutex_calls.created = mutex_calls.destroyed = mutex_calls.locked = mutex_calls.unlocked =
      mutex_calls.held = 0;
}

inline CK_RV create_counted_mutex(CK_VOID_PTR_PTR m) {
  mutex_calls.created++;
  *m = new std::mutex;
  return CKR_OK;
}
inline CK_RV destroy_counted_mutex(CK_VOID_PTR m) {
  mutex_calls.destroyed++;
  delete static_cast<std::mutex*>(m);
  return CKR_OK;
}
inline CK_RV lock_counted_mutex(CK_VOID_PTR m) {
  static_cast<std::mutex*>(m)->lock();
  mutex_calls.locked++;
  mutex_calls.held++;
  return CKR_OK;
}
inline CK_RV unlock_counted_mutex(CK_VOID_PTR m) {
  mutex_calls.unlocked++;
  mutex_calls.held--;
  static_cast<std::mutex*>(m)->unlock();
  return CKR_OK;
}

}  // namespace p11mux::test
