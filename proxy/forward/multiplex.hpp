// Multiplex mode: one virtual session, one backend session per calling
// thread. Each call counts itself in the session's in_flight, claims a
// binding (a backend session of the virtual session), runs the backend call
// on it, and gives the binding up afterwards: a binding with nothing left on
// it goes back to the pool (the thread's cache), one with an operation
// active or session objects stays with the virtual session. The common case,
// this thread's own anchor, is claimed and given back without the session's
// lock (claim_anchor, give_back); every other choice is made under it.
// Why that is safe: docs/design.md, "Multiplex mode".
//
// Which binding a call runs on:
//   1. A call that continues an operation (Update, Final, single-part,
//      FindObjects...) runs where that operation is: on the binding where
//      this thread started it (own_ops), if any; otherwise on the one other
//      binding that has it active, when there is exactly one and it is not in
//      use (a hand-off between threads: thread pools, coroutines). A v3.0
//      message (C_EncryptMessage...) or C_Message*Final waits while it is in
//      use: many threads sending messages through one operation is its point.
//   2. Otherwise on this thread's own binding, if it has one free (and
//      its guest has no operation of the call's kind there).
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

// The operations on a binding that thread `me` started: its guest's are in
// guest_ops, the rest are its owner's. Kinds alone are not enough: an owner
// whose anchor held its guest's verification would continue that one, not
// its own on another binding, and leave its own active for good
// (docs/design.md, "Binding on state").
inline OpMask own_ops(const Binding& x, std::uint64_t me) noexcept {
  if (x.owner() == me) return static_cast<OpMask>(x.ops & ~x.guest_ops);
  return x.guest == me ? x.guest_ops : OpMask{0};
}
inline OpMask others_ops(const Binding& x, std::uint64_t me) noexcept {
  return static_cast<OpMask>(x.ops & ~own_ops(x, me));
}

// Claims a free binding for `me`: as its owner from now on, unless `me` is
// its guest, which stays one (try_claim(0) keeps the owner, and with it the
// owner's claim to its operations).
inline bool claim_for(Binding& x, std::uint64_t me) noexcept {
  return x.try_claim(x.guest == me && x.owner() != me ? 0 : me);
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

// Session::in_flight: calls in its low bits, plus this for each thread
// waiting for it to change (so leaving a call wakes them).
inline constexpr std::uint32_t kWaiter = Session::kWaiter;

// Two kinds of waiters (docs/design.md, "Multiplex mode"). A call waiting
// for one binding in particular (claim_when_free, claim_own_operation,
// cancel_where_held: wait_for_a_call) and a closer waiting for the calls
// (Runtime::close_session) sleep on in_flight, and every change may be
// theirs: all are woken (few, at most one per binding, and one closer).
// Calls waiting for any binding (bind_from_pool at the pool's limit:
// wait_in_line) may be many, and one binding freed serves one of them: a
// leaving call wakes one, the one asleep longest. Waking all of them cost
// a storm of context switches per call with 64 threads on one session
// (issue 13).

// One of the calls waiting in line looks again: whoever looked before this
// bump (each reads `line` before it looks: line_ticket) does not sleep.
[[gnu::cold, gnu::noinline]] inline void wake_line(Session& s) noexcept {
  s.line.fetch_add(1, std::memory_order_seq_cst);
  wake_one(s.line);
}

// Once a call has left (or freed a binding: unclaim), seeing waiters counted
// in in_flight. `last`: it was the session's last call (a closer waits for
// that). The loads are seq_cst, after the count's read-modify-write: a
// waiter counts itself in watchers or in_line before in in_flight, so the
// one seen in in_flight is seen here too.
template <bool kLine = true>
[[gnu::cold, gnu::noinline]] void wake_waiters(Session& s, bool last) noexcept {
  if (last || s.watchers.load(std::memory_order_seq_cst) != 0) wake_all(s.in_flight);
  if constexpr (kLine) {
    if (s.in_line.load(std::memory_order_seq_cst) != 0) wake_line(s);
  }
}

template <class F>
[[gnu::noinline]] Binding* search_binding(Session& s, std::uint64_t me) noexcept REQUIRES(s.lock) {
  constexpr Effect e = effect<F>;
  Binding* b = nullptr;
  if constexpr (continues(e)) {
    b = find_binding(s, [&](Binding& x) { return !x.busy() && (own_ops(x, me) & e.ops) != 0; });
    if (b == nullptr) {
      int active = 0;
      Binding* free_one = nullptr;
      find_binding(s, [&](Binding& x) {
        if ((x.ops & e.ops) != 0) {
          ++active;
          if (!x.busy()) free_one = &x;
        }
        return false;
      });
      if (active == 1) b = free_one;
    }
  }
  // Not its own where its guest has the call's kind of operation active: the
  // call would start, or continue, the guest's.
  if (b == nullptr) {
    b = find_binding(s, [&](Binding& x) {
      return !x.busy() && x.owner() == me && (others_ops(x, me) & e.ops) == 0;
    });
  }
  // Not one an error may have left an operation on: its owner may still end it.
  if (b == nullptr) {
    b = find_binding(s, [&](Binding& x) { return !x.busy() && (x.ops | x.maybe) == 0; });
  }
  if (b == nullptr) return nullptr;
  // The anchor may have been claimed without the lock since we read it free
  // (claim_anchor): then choose again, with it busy.
  if (!claim_for(*b, me)) [[unlikely]]
    return search_binding<F>(s, me);
  return b;
}

// Waits, with s.lock released, until a call on the session ends (or 10 ms,
// a backstop), unless blocked() says that what the caller waits for has
// changed already: announce (in watchers, then in in_flight), then look
// again, each seq_cst. For a caller waiting for one binding in particular:
// it is woken with every other such caller (wake_waiters).
template <class Blocked>
[[gnu::cold]] void wait_for_a_call(Session& s, Blocked blocked) noexcept REQUIRES(s.lock) {
  s.watchers.fetch_add(1, std::memory_order_seq_cst);
  const std::uint32_t now = s.in_flight.fetch_add(kWaiter, std::memory_order_seq_cst) + kWaiter;
  if (blocked()) {
    s.lock.unlock();
    timed_wait(s.in_flight, now, std::chrono::milliseconds(10));
    s.lock.lock();
  }
  s.in_flight.fetch_sub(kWaiter, std::memory_order_relaxed);
  s.watchers.fetch_sub(1, std::memory_order_relaxed);
}

// A call waiting for any binding (bind_from_pool): in line from before it
// looks (join_line, then line_ticket) until it has one or gives up
// (leave_line). A binding freed in the session, or a backend session given
// back to the pool by one of its calls, bumps `line` and wakes one caller in
// line (wake_waiters, wake_line_after_give); one that looked after the bump
// sees what it brought, one that looked before does not sleep on its ticket.
// Counted in in_line before it looks: a call giving a backend session back
// to the pool (under the pool's lock) that reads in_line without it has
// given it back before our look, which then finds it.
inline void join_line(Session& s) noexcept { s.in_line.fetch_add(1, std::memory_order_seq_cst); }
inline void leave_line(Session& s) noexcept { s.in_line.fetch_sub(1, std::memory_order_relaxed); }
inline std::uint32_t line_ticket(Session& s) noexcept {
  return s.line.load(std::memory_order_seq_cst);
}

// In line (join_line), having looked since `ticket` and found nothing:
// sleeps with s.lock released until a wake_line (or 10 ms, a backstop),
// unless blocked() says a binding is free now. Counted in in_flight while
// it waits, so that a leaving call takes the slow path and wakes it: a
// call that freed a binding before the count reads it here (seq_cst).
// `backstop`: longer only in tests, which count the wake-ups.
template <class Blocked>
[[gnu::cold]] void wait_in_line(
    Session& s, std::uint32_t ticket, Blocked blocked,
    std::chrono::nanoseconds backstop = std::chrono::milliseconds(10)) noexcept REQUIRES(s.lock) {
  s.in_flight.fetch_add(kWaiter, std::memory_order_seq_cst);
  if (blocked()) {
    s.lock.unlock();
    timed_wait(s.line, ticket, backstop);
    s.lock.lock();
  }
  s.in_flight.fetch_sub(kWaiter, std::memory_order_relaxed);
}

// The binding holding the call's operation, once it is free (a message-based
// one: waits_for_its_operation; any, with bind = state: choose_binding).
// Called and returns with s.lock held; the caller counts in in_flight, so
// the session stays open while we wait.
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
    if (s.closing || holders != 1) return search_binding<F>(s, me);
    // Claimed here, not by search_binding (which would choose the same one):
    // the anchor's owner may claim it without the lock at any moment, and
    // then search_binding would run this call elsewhere, where it does not
    // wait (tests/integration/nss/shared_session_test.cpp saw that).
    if (holder->try_claim(me)) return holder;
    // The call that frees the binding changes the count and wakes us. It may
    // free it without the lock (give_back, unclaim): announce, then look
    // again, each seq_cst (why that suffices: give_back, unclaim).
    wait_for_a_call(s, [holder] { return holder->busy(std::memory_order_seq_cst); });
  }
}

// A binding the session holds that is free now, claimed; NULL when none
// is. This thread's own first, then one with no operation, then any. Another
// thread's is claimed without taking it over (try_claim(0) keeps its owner),
// so that its owner's calls continuing an operation there still find it
// theirs (claim_own_operation); one its owner waits for is not taken, nor
// one that has a guest already (Binding::guest). `kinds`: the operations the
// call starts or continues; a binding where another thread has one of them
// active is not taken (the call would continue or collide with it).
inline Binding* claim_held_now(Session& s, std::uint64_t me, OpMask kinds = 0) noexcept
    REQUIRES(s.lock) {
  const auto clear_of_others = [&](Binding& x) {
    return !x.wanted && (others_ops(x, me) & kinds) == 0;
  };
  Binding* b = find_binding(
      s, [&](Binding& x) { return x.owner() == me && clear_of_others(x) && x.try_claim(me); });
  if (b == nullptr) {
    b = find_binding(
        s, [&](Binding& x) { return x.guest == me && clear_of_others(x) && x.try_claim(0); });
  }
  if (b == nullptr) {
    b = find_binding(s, [&](Binding& x) { return (x.ops | x.maybe) == 0 && x.try_claim(me); });
  }
  if (b == nullptr) {
    // Another thread's, with its operations: as its one guest.
    b = find_binding(
        s, [&](Binding& x) { return x.guest == 0 && clear_of_others(x) && x.try_claim(0); });
    if (b != nullptr && b->owner() != me) b->guest = me;
  }
  return b;
}

// No binding clear of others' operations of the call's kinds is free: a call
// starting one runs on its own (or its guest) binding anyway, and the backend
// answers (CKR_OPERATION_ACTIVE, as on one session), rather than wait for an
// operation its application may never end.
inline Binding* claim_own_held_now(Session& s, std::uint64_t me) noexcept REQUIRES(s.lock) {
  Binding* b =
      find_binding(s, [&](Binding& x) { return x.owner() == me && !x.wanted && x.try_claim(me); });
  if (b == nullptr) {
    b = find_binding(s, [&](Binding& x) { return x.guest == me && !x.wanted && x.try_claim(0); });
  }
  return b;
}

// Whether claim_held_now, or claim_own_held_now for a call that does not
// continue an operation, could take `x` once it is free: what a call waiting
// for a held binding waits for (bind_from_pool).
inline bool could_take_held(const Binding& x, std::uint64_t me, OpMask kinds,
                            bool continuing) noexcept {
  const bool clear = !x.wanted && (others_ops(x, me) & kinds) == 0;
  if (x.owner() == me || x.guest == me) return clear || (!continuing && !x.wanted);
  return (x.ops | x.maybe) == 0 || (x.guest == 0 && clear);
}

// With bind = state, a call continuing an operation this thread started
// waits for the binding holding it while another thread's call runs there
// (claim_held_now, at the pool's limit); an operation it did not start
// follows the rules of claim_when_free. Called and returns with s.lock held.
template <class F>
[[gnu::cold, gnu::noinline]] Binding* claim_own_operation(Session& s, std::uint64_t me) noexcept
    REQUIRES(s.lock) {
  constexpr Effect e = effect<F>;
  for (;;) {
    Binding* mine = find_binding(s, [&](Binding& x) { return (own_ops(x, me) & e.ops) != 0; });
    if (mine == nullptr || s.closing) return claim_when_free<F>(s, me);
    if (claim_for(*mine, me)) {
      mine->wanted = false;
      return mine;
    }
    mine->wanted = true;  // claim_held_now leaves it to us now
    wait_for_a_call(s, [mine] { return mine->busy(std::memory_order_seq_cst); });
  }
}

// With s.lock held, the call counted: the binding the rules choose, claimed;
// NULL when a new one from the pool is needed. With [pool] bind = state
// (`on_state`), a call that continues an operation also waits while the one
// binding holding it is in use: at the pool's limit another thread's call
// may run there (claim_held_now), and running elsewhere would only get
// CKR_OPERATION_NOT_INITIALIZED and leave the operation active.
template <class F>
inline Binding* choose_binding(Session& s, std::uint64_t me, bool on_state = false) noexcept
    REQUIRES(s.lock) {
  if constexpr (waits_for_its_operation(effect<F>)) {
    return claim_when_free<F>(s, me);
  } else if constexpr (continues(effect<F>)) {
    return on_state ? claim_own_operation<F>(s, me) : search_binding<F>(s, me);
  } else {
    return search_binding<F>(s, me);
  }
}

// Frees a binding this call claimed but will not use (claim_anchor), waking
// whoever saw it busy meanwhile: a waiter adds kWaiter, then reads `busy`;
// we clear `busy`, then read the count; all seq_cst, so one sees the other.
[[gnu::cold, gnu::noinline]] inline void unclaim(Session& s, Binding& b) noexcept {
  b.release(std::memory_order_seq_cst);
  if (s.in_flight.load(std::memory_order_seq_cst) >= kWaiter) wake_waiters(s, /*last=*/false);
}

// Inline, the common case, without the session lock (the call is counted and
// its handle checked since): the anchor is this thread's, free, and holds the
// operation the call continues, if any; the rules would choose it first.
// NULL otherwise, the anchor as it was. One compare-exchange claims it only
// if it is free and this thread's (Binding::claim): another thread's anchor
// is never held, not even for a moment. Its operations are read only once it
// is claimed: only its holder writes them, and publishes them by releasing
// it. When they lack the call's operation it is freed again at once; that
// moment is one in which this thread, its owner, could have been running a
// call on it anyway.
template <class F>
[[gnu::always_inline]] inline Binding* claim_anchor(Session& s, std::uint64_t me) noexcept {
  constexpr Effect e = effect<F>;
  Binding& a = s.anchor_while_counted();
  if (!a.try_claim_own(me)) [[unlikely]]
    return nullptr;  // busy, or another thread's: left as it was
  if constexpr (e.ops != 0) {
    // Continuing: its own operation must be here. Otherwise: its guest's
    // operation of this kind must not (own_ops).
    const bool elsewhere =
        continues(e) ? (a.ops & ~a.guest_ops & e.ops) == 0 : (a.guest_ops & e.ops) != 0;
    if (elsewhere) [[unlikely]] {
      unclaim(s, a);
      return nullptr;
    }
  }
  return &a;
}

// An unused extra binding, or a new one; NULL without memory.
[[gnu::cold, gnu::noinline]] inline Binding* free_extra_binding(Session& s) noexcept
    REQUIRES(s.lock) {
  for (auto& extra : s.extra) {
    if (extra->backend == CK_INVALID_HANDLE) return extra.get();
  }
  try {
    return s.extra.emplace_back(std::make_unique<Binding>()).get();
  } catch (...) {
    return nullptr;
  }
}

// A new binding for a backend session from the pool; NULL without memory.
// `anchor_first` ([pool] bind = state): an empty anchor first, so that a
// call that leaves state on it finds it again without the lock (claim_anchor).
inline Binding* add_binding(Session& s, CK_SESSION_HANDLE backend,
                            bool anchor_first = false) noexcept REQUIRES(s.lock) {
  Binding* b =
      anchor_first && s.anchor.backend == CK_INVALID_HANDLE ? &s.anchor : free_extra_binding(s);
  if (b != nullptr) b->backend = backend;
  return b;
}

// A backend session just lent by the pool, as a binding claimed by this call
// (not visible to other threads before the session's lock is released).
// NULL when there is no memory for another binding.
inline Binding* bind_new(Session& s, CK_SESSION_HANDLE backend, std::uint64_t me,
                         bool anchor_first) noexcept REQUIRES(s.lock) {
  Binding* b = add_binding(s, backend, anchor_first);
  if (b != nullptr) b->claim.store((me << 1) | Binding::kBusy, std::memory_order_relaxed);
  return b;
}

// A call counts in Session::in_flight from before choosing its binding until
// giving it up, so that C_CloseSession can wait for it. Without the session
// lock: seq_cst, then the handle is checked (seq_cst too), as the closer
// stores handle 0, then reads the count: either the call sees the session
// closing, or the closer sees the call counted and waits for it.
[[gnu::always_inline]] inline void enter_call(Session& s) noexcept {
  s.in_flight.fetch_add(1, std::memory_order_seq_cst);
}

// Leaves the count, with or without the lock; wakes the threads waiting for
// it to change: calls waiting for a busy binding (claim_when_free,
// cancel_where_held), which this one may have freed, one call waiting for
// any binding (wait_in_line), and a closer waiting for the calls
// (Runtime::close_session), once this was the last (wake_waiters). Each
// counts itself as a kWaiter first, so this one decrement decides whether to
// wake (a futex syscall), rarely. Release: the closer's acquire load of the
// count then sees this call's backend call done. `kLine` false: the call
// freed no binding in the session but gives a backend session back to the
// pool, and wakes one in line once it is there (wake_line_after_give).
template <bool kLine = true>
[[gnu::always_inline]] inline void leave_call(Session& s) noexcept {
  const std::uint32_t old = s.in_flight.fetch_sub(1, std::memory_order_seq_cst);
  if (old >= kWaiter) [[unlikely]]
    wake_waiters<kLine>(s, (old & (kWaiter - 1)) == 1);
}

// After a call gave a backend session back to the pool, one call waiting in
// line may borrow it (wait_in_line). A load, not a read-modify-write, when
// nobody waits: this is every call's path with [pool] bind = state. The
// session may have closed since (the entry stays): a spurious wake only.
inline void wake_line_after_give(Session& s) noexcept {
  if (s.in_line.load(std::memory_order_seq_cst) != 0) [[unlikely]]
    wake_line(s);
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
//  - the next claimer (a compare-exchange, acquire) finds `busy` set (as if
//    this call were still running) or clear, and then, by this release,
//    sees this call's backend call finished before its own.
//  - the closer (Runtime::close_session) proceeds only once it reads
//    in_flight without calls, which the decrement publishes after `busy`;
//    it counts itself as a waiter first, so the decrement wakes it.
//  - a call waiting for this binding (claim_when_free, cancel_where_held)
//    adds kWaiter, then reads `busy` again; we clear `busy`, then leave the
//    count. Both read-modify-write the count: if ours comes first, theirs
//    reads it and, acquiring, sees `busy` clear; otherwise ours sees theirs
//    and wakes them.
// After the decrement the session may close and reopen: only the count is
// touched after it (a spurious wake is harmless).
[[gnu::always_inline]] inline void give_back(Session& s, Binding& b) noexcept {
  b.release();
  leave_call(s);
}

// Whether the session holds a backend session now.
inline bool holds_any(Session& s) noexcept REQUIRES(s.lock) {
  return find_binding(s, [](Binding&) { return true; }) != nullptr;
}

// No free binding: a new one from the pool (cold). Leaves the call count
// itself when it fails. Returned by value, not through an out-parameter:
// the caller's binding pointer then stays in a register on the hot path.
//
// A session that holds a backend session (`holds`, read under its lock)
// never waits for the pool: at the limit the call runs on one it holds, once
// that one is free. Only a session holding none waits, so the backend
// sessions waited for are held by sessions that wait for nothing but their
// own calls: N sessions each holding one and wanting another cannot wait
// for each other (docs/design.md, "Binding on state").
struct Bound {
  Binding* binding;
  CK_RV rv;
};
// `e`: the call's effect (which operations it starts or continues).
[[gnu::cold, gnu::noinline]] inline Bound bind_from_pool(Runtime& rt, Session& s, std::uint64_t me,
                                                         bool holds, Effect e) noexcept
    EXCLUDES(s.lock) {
  // Fixed while the session is open, which it stays while we count in in_flight.
  const CK_SLOT_ID slot = s.slot_while_open();
  const bool rw = s.rw_while_open();
  for (;;) {
    CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
    using Wait = SessionPool::Wait;
    // Holding one, it looks without waiting, in the session's line.
    struct InLine {
      Session* s;
      ~InLine() {
        if (s != nullptr) leave_line(*s);
      }
    } in_line{holds ? &s : nullptr};
    if (holds) join_line(s);
    const std::uint32_t ticket = line_ticket(s);
    CK_RV rv = rt.pool().borrow(slot, rw, fresh, holds ? Wait::never : Wait::at_limit);
    MutexGuard guard(s.lock);
    if (rv == CKR_SESSION_COUNT && holds && !s.closing) {
      // It gave back what it held meanwhile: wait for the pool like any other.
      holds = holds_any(s);
      if (!holds) continue;
      if (Binding* b = claim_held_now(s, me, e.ops)) return {b, CKR_OK};
      if (continues(e)) {
        // p11mux knows each thread's operations (own_ops): with none of this
        // kind, the thread has nothing to continue, and another thread's is
        // not its to take.
        if (find_binding(s, [&](Binding& x) { return (own_ops(x, me) & e.ops) != 0; }) == nullptr) {
          leave_call(s);
          return {nullptr, CKR_OPERATION_NOT_INITIALIZED};
        }
      } else if (e.ops != 0) {
        if (Binding* b = claim_own_held_now(s, me)) return {b, CKR_OK};
      }
      // Every one it could take in use: once a call ends, the pool first
      // again (a binding left idle goes back there).
      wait_in_line(s, ticket, [&]() NO_THREAD_SAFETY_ANALYSIS {  // under the caller's s.lock
        return find_binding(s, [&](Binding& x) {
                 return !x.busy(std::memory_order_seq_cst) &&
                        could_take_held(x, me, e.ops, continues(e));
               }) == nullptr;
      });
      continue;
    }
    if (rv == CKR_OK && s.closing) rv = CKR_SESSION_CLOSED;
    Binding* b = nullptr;
    if (rv == CKR_OK) {
      b = bind_new(s, fresh, me, rt.binds_on_state());
      if (b == nullptr) rv = CKR_HOST_MEMORY;
    }
    if (rv != CKR_OK) {
      if (fresh != CK_INVALID_HANDLE) rt.pool().give(slot, rw, fresh, SessionPool::Fate::reuse);
      leave_call(s);
      return {nullptr, rv};
    }
    return {b, CKR_OK};
  }
}

// The uncommon case (claim_anchor found the anchor in use, another
// thread's, or without the call's operation): the rules, under the session
// lock, or a new binding from the pool. The call is counted; this leaves the
// count itself when it fails.
//
// With [pool] bind = state, a call on a session that holds no backend
// session (its anchor free and owned by nobody: Binding::clear) takes one
// from this thread's cache before the lock, without waiting, so that the
// binding is chosen and added in one lock round trip instead of two
// (README, "What bind = state costs"). Taken from the cache only, it waits
// for nothing, so the session may hold one meanwhile; if the rules choose
// another binding, it goes back to the pool after the lock.
template <class F, class Observation>
inline Bound claim_locked(Runtime& rt, Observation& seen, Session& s, CK_SESSION_HANDLE handle,
                          std::uint64_t me) noexcept {
  Binding* b = nullptr;
  bool holds = false;
  CK_SESSION_HANDLE cached = CK_INVALID_HANDLE;
  if (rt.binds_on_state() && s.anchor_while_counted().claim.load(std::memory_order_relaxed) == 0)
    rt.pool().borrow_cached(s.slot_while_open(), s.rw_while_open(), cached);
  bool open = false;
  {
    // The same entry (the handle named it); empty if it began closing since
    // the caller checked the handle: the closer waits for our count.
    SessionLease lease = seen.lease(rt.sessions(), handle);
    if (lease) {
      HeldLock leased(s.lock);
      open = true;
      b = choose_binding<F>(s, me, rt.binds_on_state());
      if (b == nullptr && cached != CK_INVALID_HANDLE && !s.closing) {
        // As bind_from_pool would, had the pool lent it at once.
        b = bind_new(s, cached, me, /*anchor_first=*/true);
        if (b != nullptr) cached = CK_INVALID_HANDLE;
      }
      holds = b == nullptr && holds_any(s);
    }
  }
  // Not used: back to the pool, without the session's lock.
  if (cached != CK_INVALID_HANDLE) [[unlikely]]
    rt.pool().give(s.slot_while_open(), s.rw_while_open(), cached, SessionPool::Fate::reuse);
  if (!open) {
    leave_call(s);
    return {nullptr, CKR_SESSION_HANDLE_INVALID};
  }
  if (b == nullptr) return bind_from_pool(rt, s, me, holds, effect<F>);
  return {b, CKR_OK};
}

// With s.lock held, after a call on `b` that found `before` active there:
// the operations it started are its guest's when the caller is not the
// owner (claimed with try_claim(0): claim_held_now, claim_own_operation);
// ended ones are nobody's.
inline void note_guest_ops(Binding& b, OpMask before) noexcept {
  if (b.ops == before) return;  // most calls: nothing started or ended
  if (b.owner() != this_thread_number()) b.guest_ops |= static_cast<OpMask>(b.ops & ~before);
  b.guest_ops &= b.ops;
}

// A backend session to give back to the pool after the session lock is
// released: an extra binding with nothing left on it, detached under the lock.
struct Release {
  CK_SESSION_HANDLE backend = CK_INVALID_HANDLE;
  SessionPool::Fate fate = SessionPool::Fate::reuse;
  CK_SLOT_ID slot = 0;
  bool rw = false;
};

// With s.lock held, after a call: whether the binding goes back to the pool
// when idle. An extra one does; the anchor too with [pool] bind = state,
// unless the session has a Notify callback (its backend session carries it).
inline bool detaches_when_idle(Runtime& rt, Session& s, Binding& b) noexcept REQUIRES(s.lock) {
  return &b != &s.anchor ||
         (rt.binds_on_state() && s.notify.load(std::memory_order_relaxed) == nullptr);
}

// With s.lock held, after a call on a binding that detaches_when_idle.
inline Release detach_if_idle(Session& s, Binding& b) noexcept REQUIRES(s.lock) {
  if (b.holds_state()) return {};
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
          busy = busy || x.busy();
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
      if (!busy) {
        // Claimed one by one: the anchor may be claimed without the lock
        // meanwhile (claim_anchor). If one is taken, free the others and wait.
        std::size_t claimed = 0;
        while (claimed < targets.size() && targets[claimed].binding->try_claim(0)) ++claimed;
        if (claimed == targets.size()) break;
        while (claimed > 0) unclaim(*s, *targets[--claimed].binding);
      }
      // As in claim_when_free: announce, then look again.
      wait_for_a_call(*s, [&targets] {
        return std::any_of(targets.begin(), targets.end(), [](const Target& t) {
          return t.binding->busy(std::memory_order_seq_cst);
        });
      });
    }
    releases.reserve(targets.size());
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
      const OpMask before = b.ops;
      record_call<F>(rt.pool(), b, s->slot, t.rv, NothingCreated{}, t.flags);
      note_guest_ops(b, before);
      b.release();  // publishes ops to a lock-free claimer
      if (detaches_when_idle(rt, *s, b)) {
        if (Release r = detach_if_idle(*s, b); r.backend != CK_INVALID_HANDLE)
          releases.push_back(r);
      }
    }
    leave_call(*s);
  }
  for (const Release& r : releases) rt.pool().give(r.slot, r.rw, r.backend, r.fate);
  if (!releases.empty()) wake_line_after_give(*s);
  return true;
}

// After the backend call: records what it did on its binding and gives the
// binding up, under the session's lock (an extra binding left idle goes back
// to the pool, after the lock).
template <class F, class... Rest>
inline CK_RV finish_call(Runtime& rt, Session& s, Binding& b, CK_RV rv, Rest... rest) noexcept {
  // Backend calls for what the call created, before the lock (the binding is
  // ours while busy).
  const CreatedBy<F> created = find_created<F>(rt.port(), b.backend, rv, rest...);
  Release release;
  {
    MutexGuard guard(s.lock);
    const OpMask before = b.ops;
    record_call<F>(rt.pool(), b, s.slot, rv, created, rest...);
    note_guest_ops(b, before);
    if ((b.ops | b.maybe) == 0) b.guest = 0;
    if constexpr (std::is_same_v<F, fn::C_DestroyObject>) {
      // The object may have been created through another binding.
      if (rv == CKR_OK) {
        find_binding(s, [&](Binding& x) { return forget_object(x, rest...), false; });
      }
    }
    b.release();  // publishes ops to a lock-free claimer
    if (detaches_when_idle(rt, s, b)) release = detach_if_idle(s, b);
    if (release.backend == CK_INVALID_HANDLE) {
      leave_call(s);
    } else {
      leave_call</*kLine=*/false>(s);  // it freed none here: the pool gets one
    }
  }
  if (release.backend != CK_INVALID_HANDLE) [[unlikely]] {
    rt.pool().give(release.slot, release.rw, release.backend, release.fate);
    wake_line_after_give(s);
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

// The backend call on a claimed binding, and the binding given up: without
// the lock (give_back) when `claimed_unlocked` (claim_anchor found it, so
// it stays bound whatever this call does), else under it.
template <class F, class Observation, class CallBackend, class... Rest>
[[gnu::always_inline]] inline CK_RV run_on(Runtime& rt, Observation& seen, CallBackend call_backend,
                                           Session& s, Binding& b, bool claimed_unlocked,
                                           Rest... rest) noexcept {
  if (CK_RV rv = refused_for_sessions<F>(rt.pool(), s.slot_while_open(), rest...); rv != CKR_OK)
    return finish_call<F>(rt, s, b, rv, rest...);
  seen.ran_on(b.backend);
  CK_RV rv = call_backend(b.backend, rest...);
  if (drained_for_retry<F>(rt.pool(), s.slot_while_open(), rv, rest...)) [[unlikely]]
    rv = call_backend(b.backend, rest...);
  note_login<F>(rt.pool(), s.slot_while_open(), rv, rest...);
  if constexpr (changes_nothing_on_success<F>) {
    if (rv == CKR_OK && claimed_unlocked) [[likely]] {
      give_back(s, b);
      return rv;
    }
    return finish_call_out_of_line<F>(rt, s, b, rv);
  } else {
    return finish_call<F>(rt, s, b, rv, rest...);
  }
}

// A call claim_anchor found no binding for (cold): the rest of the call,
// out of line, so that the inline path knows its binding is the anchor.
template <class F, class Observation, class CallBackend, class... Rest>
[[gnu::cold, gnu::noinline]] CK_RV forward_elsewhere(Runtime& rt, Observation& seen,
                                                     CallBackend call_backend, Session& s,
                                                     CK_SESSION_HANDLE handle, std::uint64_t me,
                                                     Rest... rest) noexcept {
  const Bound bound = claim_locked<F>(rt, seen, s, handle, me);
  if (bound.rv != CKR_OK) return bound.rv;
  // The anchor stays bound after this call in bind = open (only an extra
  // binding may go back); in bind = state it may go back too, under the lock.
  const bool stays = bound.binding == &s.anchor_while_counted() && !rt.binds_on_state();
  return run_on<F>(rt, seen, call_backend, s, *bound.binding, stays, rest...);
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
  // No lock: count, then check the handle (enter_call); the entry is never
  // freed, so a stale handle costs only a count taken and left.
  Session* s = nullptr;
  if (!rt.sessions().find_entry(handle, s)) [[unlikely]]
    return CKR_SESSION_HANDLE_INVALID;
  enter_call(*s);
  if (s->handle.load(std::memory_order_seq_cst) != handle) [[unlikely]] {
    leave_call(*s);
    return CKR_SESSION_HANDLE_INVALID;
  }
  Binding* b = claim_anchor<F>(*s, me);
  if (b == nullptr) [[unlikely]]
    return forward_elsewhere<F>(rt, seen, call_backend, *s, handle, me, rest...);
  return run_on<F>(rt, seen, call_backend, *s, *b, true, rest...);
}

}  // namespace p11mux
