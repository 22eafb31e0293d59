// p11mux's own threads (the stats thread, the async log writer) block every
// signal: an application's signal handlers must never run on them, and a
// process-directed signal must go to a thread the application owns.
#pragma once

#include <signal.h>

namespace p11mux {

// Runs fn with every signal blocked in the calling thread, so that a thread
// fn starts inherits that mask; the caller's mask is restored afterwards.
template <class Fn>
decltype(auto) with_signals_blocked(Fn&& fn) {
  sigset_t all, saved;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &saved);
  struct Restore {
    sigset_t mask;
    ~Restore() { pthread_sigmask(SIG_SETMASK, &mask, nullptr); }
  } restore{saved};
  return fn();
}

}  // namespace p11mux
