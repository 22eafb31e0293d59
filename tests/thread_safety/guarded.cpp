// Compiled, not run, by the thread-safety tests (CMakeLists.txt here): with
// clang's -Wthread-safety -Werror it must compile as it is, and must fail
// with P11MUX_UNGUARDED defined, which touches a guarded field without its
// lock. Empty annotations (thread_safety.hpp under GCC, or a lost attribute
// on Mutex or MutexGuard) would make the second compile pass, and the test fail.
#include "sync/lock.hpp"

namespace p11mux {

struct Counter {
  Mutex lock;
  unsigned long value GUARDED_BY(lock) = 0;

  void add() REQUIRES(lock) { ++value; }
};

void count(Counter& c) {
  MutexGuard guard(c.lock);
  c.add();
  ++c.value;
}

// The backend lock: held, for the analysis, whether or not it exists.
void serialized(Mutex* backend_lock, void (*call)()) REQUIRES(*backend_lock) { call(); }
void call_backend(Mutex* backend_lock, void (*call)()) {
  OptionalGuard serial(backend_lock);
  serialized(backend_lock, call);
}

#ifdef P11MUX_UNGUARDED
unsigned long peek(Counter& c) { return c.value; }
#endif

}  // namespace p11mux
