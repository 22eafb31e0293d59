// Multiplex mode: one virtual session, one backend session per calling
// thread. Each call picks a binding (a backend session of the virtual
// session) under the session's lock, runs the backend call without it, and
// gives the binding up afterwards: a binding with nothing left on it goes
// back to the pool (the thread's cache), one with an operation active or
// session objects stays with the virtual session.
//
// Which binding a call runs on:
//   1. A call that continues an operation (Update, Final, single-part,
//      FindObjects...) runs where that operation is: on this thread's own
//      binding if the operation is active there; otherwise on the one other
//      binding that has it active, when there is exactly one and it is not in
//      use (a hand-off between threads: thread pools, coroutines).
//   2. Otherwise on this thread's own binding, if it has one free.
//   3. Otherwise on any free binding with no operation active.
//   4. Otherwise on a new binding from the pool.
#pragma once

#include "operation_state.hpp"
#include "runtime.hpp"
#include "session_effects.hpp"

#include <thread>

namespace p11mux {

template <class Pred>
Binding* find_binding(Session& s, Pred pred) noexcept {
  if (s.anchor.backend != CK_INVALID_HANDLE && pred(s.anchor)) return &s.anchor;
  for (auto& b : s.extra) {
    if (b->backend != CK_INVALID_HANDLE && pred(*b)) return b.get();
  }
  return nullptr;
}

template <class F>
Binding* claim_binding(Session& s, std::thread::id me) noexcept {
  constexpr Effect e = effect<F>;
  Binding* b = nullptr;
  if constexpr ((e.step == Step::update || e.step == Step::finish) && e.ops != 0) {
    b = find_binding(s, [&](Binding& x) { return !x.busy && x.owner == me && (x.ops & e.ops); });
    if (b == nullptr) {
      int active = 0;
      Binding* free_one = nullptr;
      find_binding(s, [&](Binding& x) {
        if ((x.ops & e.ops) != 0) {
          ++active;
          if (!x.busy) free_one = &x;
        }
        return false;
      });
      if (active == 1) b = free_one;
    }
  }
  if (b == nullptr) b = find_binding(s, [&](Binding& x) { return !x.busy && x.owner == me; });
  if (b == nullptr) b = find_binding(s, [&](Binding& x) { return !x.busy && x.ops == 0; });
  if (b != nullptr) {
    b->busy = true;
    b->owner = me;
  }
  return b;
}

// A new binding for a backend session from the pool; NULL without memory.
inline Binding* add_binding(Session& s, CK_SESSION_HANDLE backend) noexcept {
  Binding* b = nullptr;
  for (auto& x : s.extra) {
    if (x->backend == CK_INVALID_HANDLE) {
      b = x.get();
      break;
    }
  }
  if (b == nullptr) {
    try {
      b = s.extra.emplace_back(std::make_unique<Binding>()).get();
    } catch (...) {
      return nullptr;
    }
  }
  b->backend = backend;
  return b;
}

// Counts a call between choosing a binding and giving it up, so that
// C_CloseSession can wait for it.
class InFlight {
 public:
  explicit InFlight(Session& s) noexcept : s_(s) { s_.in_flight.fetch_add(1, std::memory_order_acq_rel); }
  ~InFlight() {
    if (s_.in_flight.fetch_sub(1, std::memory_order_acq_rel) == 1) wake_all(s_.in_flight);
  }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

 private:
  Session& s_;
};

template <class F, class Observation, class CallBackend, class... Rest>
[[gnu::noinline]] CK_RV forward_multiplexed(Runtime& rt, Observation& seen, CallBackend call_backend,
                          CK_SESSION_HANDLE handle, Rest... rest) noexcept {
  const auto me = std::this_thread::get_id();
  Session* s = nullptr;
  Binding* b = nullptr;
  CK_SLOT_ID slot = 0;
  bool rw = false;
  std::optional<InFlight> in_flight;
  {
    SessionLease lease = seen.lease(rt.sessions(), handle);
    if (!lease) return CKR_SESSION_HANDLE_INVALID;
    s = &*lease;
    slot = s->slot;
    rw = s->rw;
    b = claim_binding<F>(*s, me);
    in_flight.emplace(*s);  // while the lock is held: a closer will wait for us
  }
  if (b == nullptr) {
    CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
    if (CK_RV rv = rt.pool().borrow(slot, rw, fresh); rv != CKR_OK) return rv;
    MutexGuard guard(s->lock);
    if (s->closing) {
      rt.pool().give(slot, rw, fresh, true);
      return CKR_SESSION_CLOSED;
    }
    b = add_binding(*s, fresh);
    if (b == nullptr) {
      rt.pool().give(slot, rw, fresh, true);
      return CKR_HOST_MEMORY;
    }
    b->busy = true;
    b->owner = me;
  }
  seen.ran_on(b->backend);
  CK_RV rv = call_backend(b->backend, rest...);
  if (drained_for_retry<F>(rt, slot, rv, rest...)) [[unlikely]] rv = call_backend(b->backend, rest...);
  CK_SESSION_HANDLE release = CK_INVALID_HANDLE;
  bool clean = true;
  {
    MutexGuard guard(s->lock);
    note_call<F>(rt, *b, slot, rv, rest...);
    b->busy = false;
    if (b != &s->anchor && b->ops == 0 && b->objects.empty()) {
      release = b->backend;
      clean = !b->discard;
      b->clear();
    }
  }
  if (release != CK_INVALID_HANDLE) rt.pool().give(slot, rw, release, clean);
  return rv;
}

}  // namespace p11mux
