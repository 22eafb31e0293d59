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
//      use (a hand-off between threads: thread pools, coroutines). A v3.0
//      message (C_EncryptMessage...) or C_Message*Final waits while it is in
//      use: many threads sending messages through one operation is its point.
//   2. Otherwise on this thread's own binding, if it has one free.
//   3. Otherwise on any free binding with no operation active.
//   4. Otherwise on a new binding from the pool.
#pragma once

#include "forward/operation_state.hpp"
#include "forward/session_effects.hpp"
#include "lifecycle/runtime.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace p11mux {

// Which thread owns a binding: a number no other thread ever gets again
// (std::thread::id is reused once a thread exits, and a new thread would
// inherit the exited one's bindings with their operations). Initial-exec
// TLS: one %fs-relative load on the hot path, no __tls_get_addr call.
inline std::atomic<std::uint64_t> thread_numbers{0};
[[gnu::tls_model("initial-exec")]] inline constinit thread_local std::uint64_t this_thread_number_ =
    0;

[[gnu::cold, gnu::noinline]] inline std::uint64_t assign_thread_number() noexcept {
  this_thread_number_ = thread_numbers.fetch_add(1, std::memory_order_relaxed) + 1;
  return this_thread_number_;
}

// Never 0 (a free binding's owner).
[[gnu::always_inline]] inline std::uint64_t this_thread_number() noexcept {
  std::uint64_t n = this_thread_number_;
  if (n == 0) [[unlikely]]
    n = assign_thread_number();
  return n;
}

template <class Pred>
Binding* find_binding(Session& s, Pred pred) noexcept REQUIRES(s.lock) {
  if (s.anchor.backend != CK_INVALID_HANDLE && pred(s.anchor)) return &s.anchor;
  for (auto& b : s.extra) {
    if (b->backend != CK_INVALID_HANDLE && pred(*b)) return b.get();
  }
  return nullptr;
}

// A call that continues an operation: it runs where that operation is.
constexpr bool continues(Effect e) noexcept {
  return (e.step == Step::update || e.step == Step::finish || e.step == Step::message) &&
         e.ops != 0;
}

// A message-based operation is made for many messages, from many threads at
// once: a call on it waits while the binding holding it is busy, where a
// call continuing another operation would run elsewhere (and get the
// backend's CKR_OPERATION_NOT_INITIALIZED).
constexpr bool waits_for_its_operation(Effect e) noexcept {
  constexpr OpMask message_ops =
      op::message_encrypt | op::message_decrypt | op::message_sign | op::message_verify;
  return continues(e) && (e.ops & message_ops) != 0;
}

// Session::in_flight: calls in its low bits, plus this for each call waiting
// for a busy binding (so leaving a binding wakes them).
inline constexpr std::uint32_t kWaiter = 1u << 16;

template <class F>
[[gnu::noinline]] Binding* search_binding(Session& s, std::uint64_t me) noexcept REQUIRES(s.lock) {
  constexpr Effect e = effect<F>;
  Binding* b = nullptr;
  if constexpr (continues(e)) {
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
  // Not one an error may have left an operation on: its owner may still end it.
  if (b == nullptr) {
    b = find_binding(s, [&](Binding& x) { return !x.busy && (x.ops | x.maybe) == 0; });
  }
  if (b != nullptr) {
    b->busy.store(true, std::memory_order_relaxed);
    b->owner = me;
  }
  return b;
}

// The binding holding the call's message-based operation, once it is free
// (waits_for_its_operation). Called and returns with s.lock held; the caller
// counts in in_flight, so the session stays open while we wait.
template <class F>
[[gnu::cold, gnu::noinline]] Binding* claim_when_free(Session& s, std::uint64_t me) noexcept
    REQUIRES(s.lock) {
  constexpr Effect e = effect<F>;
  for (;;) {
    int holders = 0;
    Binding* holder = nullptr;
    find_binding(s, [&](Binding& x) {
      if ((x.ops & e.ops) != 0) {
        ++holders;
        holder = &x;
      }
      return false;
    });
    if (s.closing || holders != 1 || !holder->busy) return search_binding<F>(s, me);
    // The call that frees the binding changes the count and wakes us. It may
    // free it without the lock (give_back): announce, then look again, each
    // seq_cst, as give_back frees, then reads the count.
    const std::uint32_t now = s.in_flight.fetch_add(kWaiter, std::memory_order_seq_cst) + kWaiter;
    if (holder->busy.load(std::memory_order_seq_cst)) {
      s.lock.unlock();
      timed_wait(s.in_flight, now, std::chrono::milliseconds(10));  // the bound is a backstop
      s.lock.lock();
    }
    s.in_flight.fetch_sub(kWaiter, std::memory_order_relaxed);
  }
}

// Inline, the common case: the anchor is this thread's, free, and holds the
// operation the call continues, if any. The search would pick it first.
template <class F>
[[gnu::always_inline]] inline Binding* claim_binding(Session& s, std::uint64_t me) noexcept
    REQUIRES(s.lock) {
  constexpr Effect e = effect<F>;
  Binding& a = s.anchor;  // valid while the session is open
  if (a.owner == me && !a.busy.load(std::memory_order_acquire) &&
      (!continues(e) || (a.ops & e.ops) != 0)) [[likely]] {
    a.busy.store(true, std::memory_order_relaxed);
    return &a;
  }
  if constexpr (waits_for_its_operation(e)) return claim_when_free<F>(s, me);
  return search_binding<F>(s, me);
}

// A new binding for a backend session from the pool; NULL without memory.
inline Binding* add_binding(Session& s, CK_SESSION_HANDLE backend) noexcept REQUIRES(s.lock) {
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

// A call counts in Session::in_flight from choosing its binding until giving
// it up, so that C_CloseSession can wait for it. Both ends run under the
// session's lock, as does the closer's "closing = true, then read in_flight":
// either the closer sees our decrement, or we see `closing` and wake it. So
// the futex wake (a syscall) happens only when a closer waits, not per call.
inline void enter_call(Session& s) noexcept REQUIRES(s.lock) {
  s.in_flight.fetch_add(1, std::memory_order_relaxed);
}

// Also wakes the calls waiting for a busy binding (claim_when_free): this
// one may have freed theirs.
inline void leave_call(Session& s) noexcept REQUIRES(s.lock) {
  // Release: the closer reads the count without the lock before taking it.
  const std::uint32_t before = s.in_flight.fetch_sub(1, std::memory_order_release);
  if (before >= kWaiter || (before == 1 && s.closing)) [[unlikely]]
    wake_all(s.in_flight);
}

// A call whose record_call would change nothing on its binding: one with no
// effect on operations or objects (session_effects.hpp), when it succeeded.
template <class F>
inline constexpr bool changes_nothing_on_success =
    effect<F>.step == Step::none && !std::is_same_v<F, fn::C_DestroyObject>;

// Gives the anchor back after such a call without taking the session lock
// (the hot path's second lock round trip). Sound because, for the anchor:
//  - nothing else is written: the anchor stays, with the same owner, ops and
//    objects; the lock would publish nothing more.
//  - `busy` is read under the lock by choosers; they either see it set (as
//    if this call were still running) or see it clear, and then, by this
//    release store, see this call's backend call finished before theirs.
//  - the closer (Runtime::close_session) proceeds only once it reads
//    in_flight at 0, which this release decrement publishes after `busy`.
//    Whether it is woken: it sets `closing`, then reads the count; we leave
//    the count, then read `closing` (both seq_cst here); a missed wake would
//    cost at most its 10 ms backstop, never correctness.
//  - a call waiting for this binding (claim_when_free, cancel_where_held)
//    adds kWaiter, then reads `busy` again; we clear `busy`, then leave the
//    count: all seq_cst, so it sees the binding free or we see it waiting.
// After the decrement the session may close and reopen: only atomics are
// touched after it (a spurious wake is harmless).
[[gnu::always_inline]] inline void give_back(Session& s, Binding& b) noexcept {
  b.busy.store(false, std::memory_order_seq_cst);
  const std::uint32_t before = s.in_flight.fetch_sub(1, std::memory_order_seq_cst);
  if (before >= kWaiter || (before == 1 && s.closing.load(std::memory_order_seq_cst)))
      [[unlikely]] {
    wake_all(s.in_flight);
  }
}

// No free binding: a new one from the pool (cold). Leaves the call count
// itself when it fails. Returned by value, not through an out-parameter:
// the caller's binding pointer then stays in a register on the hot path.
struct Bound {
  Binding* binding;
  CK_RV rv;
};
[[gnu::cold, gnu::noinline]] inline Bound bind_from_pool(Runtime& rt, Session& s,
                                                         std::uint64_t me) noexcept
    EXCLUDES(s.lock) {
  Binding* b = nullptr;
  // Fixed while the session is open, which it stays while we count in in_flight.
  const CK_SLOT_ID slot = s.slot_while_open();
  const bool rw = s.rw_while_open();
  CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
  CK_RV rv = rt.pool().borrow(slot, rw, fresh);
  MutexGuard guard(s.lock);
  if (rv == CKR_OK && s.closing) rv = CKR_SESSION_CLOSED;
  if (rv == CKR_OK) {
    b = add_binding(s, fresh);
    if (b == nullptr) rv = CKR_HOST_MEMORY;
  }
  if (rv != CKR_OK) {
    if (fresh != CK_INVALID_HANDLE) rt.pool().give(slot, rw, fresh, SessionPool::Fate::reuse);
    leave_call(s);
    return {nullptr, rv};
  }
  b->busy.store(true, std::memory_order_relaxed);
  b->owner = me;
  return {b, CKR_OK};
}

// A backend session to give back to the pool after the session lock is
// released: an extra binding with nothing left on it, detached under the lock.
struct Release {
  CK_SESSION_HANDLE backend = CK_INVALID_HANDLE;
  SessionPool::Fate fate = SessionPool::Fate::reuse;
  CK_SLOT_ID slot = 0;
  bool rw = false;
};

// With s.lock held, after a call on an extra binding.
[[gnu::noinline]] inline Release detach_if_idle(Session& s, Binding& b) noexcept REQUIRES(s.lock) {
  if (b.ops != 0 || b.maybe != 0 || !b.objects.empty()) return {};
  Release r{b.backend, SessionPool::unreset_fate(b.discard, b.dead, b.why), s.slot, s.rw};
  b.clear();
  return r;
}

// C_SessionCancel names operations, not a backend session: it runs on every
// binding that holds (or may hold) one of them, once none of those is busy.
// False, with nothing done, when no binding holds any: then it runs where
// any other call would.
template <class Observation, class CallBackend>
[[gnu::cold, gnu::noinline]] bool cancel_where_held(Runtime& rt, Observation& seen,
                                                    CallBackend call_backend,
                                                    CK_SESSION_HANDLE handle, CK_FLAGS flags,
                                                    CK_RV& rv) noexcept {
  using F = fn::C_SessionCancel;
  const OpMask named = ops_of_cancel_flags(flags);
  // Flags p11mux does not know go to every binding it cancels on.
  const CK_FLAGS unknown = flags & ~cancel_flags(kAllOps);
  struct Target {
    Binding* binding;
    CK_FLAGS flags;
    CK_RV rv;
  };
  std::vector<Target> targets;
  std::vector<Release> releases;
  Session* s = nullptr;
  try {
    targets.reserve(4);
    SessionLease lease = seen.lease(rt.sessions(), handle);
    if (!lease) {
      rv = CKR_SESSION_HANDLE_INVALID;
      return true;
    }
    s = &*lease;
    HeldLock leased(s->lock);
    enter_call(*s);
    for (;;) {
      bool busy = false;
      targets.clear();
      find_binding(*s, [&](Binding& x) {
        if (const OpMask held = (x.ops | x.maybe) & named; held != 0) {
          busy = busy || x.busy;
          targets.push_back({&x, (flags & cancel_flags(held)) | unknown, CKR_OK});
        }
        return false;
      });
      if (targets.empty() || s->closing) {
        leave_call(*s);
        if (targets.empty()) return false;
        rv = CKR_SESSION_CLOSED;
        return true;
      }
      if (!busy) break;
      // As in claim_when_free: announce, then look again.
      const std::uint32_t now =
          s->in_flight.fetch_add(kWaiter, std::memory_order_seq_cst) + kWaiter;
      const bool still_busy = std::any_of(targets.begin(), targets.end(), [](const Target& t) {
        return t.binding->busy.load(std::memory_order_seq_cst);
      });
      if (still_busy) {
        s->lock.unlock();
        timed_wait(s->in_flight, now, std::chrono::milliseconds(10));  // the bound is a backstop
        s->lock.lock();
      }
      s->in_flight.fetch_sub(kWaiter, std::memory_order_relaxed);
    }
    releases.reserve(targets.size());
    for (Target& t : targets) t.binding->busy.store(true, std::memory_order_relaxed);
  } catch (...) {
    if (s != nullptr) {
      MutexGuard guard(s->lock);
      leave_call(*s);
    }
    rv = CKR_HOST_MEMORY;
    return true;
  }
  seen.ran_on(targets.front().binding->backend);
  rv = CKR_OK;
  for (Target& t : targets) {
    t.rv = call_backend(t.binding->backend, t.flags);
    if (rv == CKR_OK) rv = t.rv;
  }
  {
    MutexGuard guard(s->lock);
    for (Target& t : targets) {
      Binding& b = *t.binding;
      record_call<F>(rt, b, s->slot, t.rv, NothingCreated{}, t.flags);
      b.busy.store(false, std::memory_order_relaxed);
      if (&b != &s->anchor) {
        if (Release r = detach_if_idle(*s, b); r.backend != CK_INVALID_HANDLE)
          releases.push_back(r);
      }
    }
    leave_call(*s);
  }
  for (const Release& r : releases) rt.pool().give(r.slot, r.rw, r.backend, r.fate);
  return true;
}

// After the backend call: records what it did on its binding and gives the
// binding up, under the session's lock (an extra binding left idle goes back
// to the pool, after the lock).
template <class F, class... Rest>
inline CK_RV finish_call(Runtime& rt, Session& s, Binding& b, CK_RV rv, Rest... rest) noexcept {
  // Backend calls for what the call created, before the lock (the binding is
  // ours while busy).
  const CreatedBy<F> created = find_created<F>(rt, b.backend, rv, rest...);
  Release release;
  {
    MutexGuard guard(s.lock);
    record_call<F>(rt, b, s.slot, rv, created, rest...);
    if constexpr (std::is_same_v<F, fn::C_DestroyObject>) {
      // The object may have been created through another binding.
      if (rv == CKR_OK) {
        find_binding(s, [&](Binding& x) { return forget_object(x, rest...), false; });
      }
    }
    b.busy.store(false, std::memory_order_relaxed);
    if (&b != &s.anchor) [[unlikely]]
      release = detach_if_idle(s, b);
    leave_call(s);
  }
  if (release.backend != CK_INVALID_HANDLE) [[unlikely]] {
    rt.pool().give(release.slot, release.rw, release.backend, release.fate);
  }
  return rv;
}

// For changes_nothing_on_success<F>, whose record_call needs none of the
// call's arguments: the hot path keeps none of them across the backend call.
template <class F>
[[gnu::noinline]] CK_RV finish_call_out_of_line(Runtime& rt, Session& s, Binding& b,
                                                CK_RV rv) noexcept {
  return finish_call<F>(rt, s, b, rv);
}

// Inlined into Entry<F>::call, which saves every callee-saved register
// already: a frame of its own cost ~20 instructions per call (callgrind).
template <class F, class Observation, class CallBackend, class... Rest>
[[gnu::always_inline]] inline CK_RV forward_multiplexed(Runtime& rt, Observation& seen,
                                                        CallBackend call_backend,
                                                        CK_SESSION_HANDLE handle,
                                                        Rest... rest) noexcept {
  if constexpr (std::is_same_v<F, fn::C_SessionCancel>) {
    if (CK_RV rv; cancel_where_held(rt, seen, call_backend, handle, rest..., rv)) return rv;
  }
  const std::uint64_t me = this_thread_number();
  Session* s = nullptr;
  Binding* b = nullptr;
  {
    SessionLease lease = seen.lease(rt.sessions(), handle);
    if (!lease) return CKR_SESSION_HANDLE_INVALID;
    s = &*lease;
    HeldLock leased(s->lock);
    enter_call(*s);  // first: claim_binding may wait, the lock released
    b = claim_binding<F>(*s, me);
  }
  if (b == nullptr) [[unlikely]] {
    const Bound bound = bind_from_pool(rt, *s, me);
    if (bound.rv != CKR_OK) return bound.rv;
    b = bound.binding;
  }
  seen.ran_on(b->backend);
  CK_RV rv = call_backend(b->backend, rest...);
  if (drained_for_retry<F>(rt, s->slot_while_open(), rv, rest...)) [[unlikely]]
    rv = call_backend(b->backend, rest...);
  if constexpr (changes_nothing_on_success<F>) {
    if (rv == CKR_OK && b == &s->anchor) [[likely]] {
      give_back(*s, *b);
      return rv;
    }
    return finish_call_out_of_line<F>(rt, *s, *b, rv);
  } else {
    return finish_call<F>(rt, *s, *b, rv, rest...);
  }
}

}  // namespace p11mux
