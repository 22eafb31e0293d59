// Every lock p11mux takes is a Mutex. With the application's mutex callbacks
// (C_Initialize case 2) it locks through them, as the spec requires; otherwise
// it is a small futex lock: uncontended lock+unlock is two atomic instructions.
// Not fair, on purpose: a thread that unlocks and locks again at once keeps
// it, which keeps the calls of one operation on a session together. Handing
// the lock to the longest waiter per call split them (CKR_OPERATION_ACTIVE
// on a shared session, 25 signatures/s instead of 713); fairness per
// operation is what works (docs/design.md, "Capacity at the limit").
//
// Each Mutex is a capability for clang's thread-safety analysis
// (thread_safety.hpp): the fields a lock guards are marked GUARDED_BY it, and
// the clang CI build (-Wthread-safety -Werror) rejects code that touches them
// without it. The attributes generate no code.
//
// Lock order: a thread holding several locks took them in this order (the
// one statement of it; ACQUIRED_AFTER on the members says it to clang, which
// checks it with -Wthread-safety-beta):
//   0. Protect::change_lock()  ([policy] protect: a key read, then its change;
//                              each backend call under it takes 2. and 3.)
//   1. Runtime::poll_lock_     (a polling C_WaitForSlotEvent, then a backend call)
//   2. Session::lock           (one session at a time; never two at once)
//   2a. GroupLogin's group lock (group/group_login.hpp: a group's login, under
//                              the C_Login's session lock or none; held across
//                              the members' calls, which take 2b. and 3.)
//   2b. PinStore::mutex_       (a group's kept login, group/pin_store.hpp: held
//                              across a member's C_Login from it, which takes 3.)
//   3. the backend lock (a BackendPort's, only for a backend that is not
//      thread-safe), held around one backend call and nothing else; or
//      the session pool's locks, which are never held across a backend call
//      (each a Guarded, guarded.hpp: the part's state is reachable only under it):
//        3a. SessionPool::registry_
//        3b. SlotPool::state
//        3c. ThreadCache::state
//   4. leaves, under which no other lock is taken: PoolMetricsRegistry::lock_
//      (under the registry lock), SessionTable::free_lock_ (under none),
//      MemberHealth::streak_ (group/member_health.hpp: a member's run of
//      session-gone answers), ObjectMap's shards (group/object_map.hpp: one
//      at a time, never across a member's call), the log sink's lock (no
//      record is logged under the pool's locks).
// The backend lock and the pool's locks are never held together.
#pragma once

#include "sync/thread_safety.hpp"

#include <p11mux/pkcs11.h>

#include <atomic>
#include <cassert>
#include <chrono>
#include <cstdint>

namespace p11mux {

// The application's CreateMutex/DestroyMutex/LockMutex/UnlockMutex, or none.
struct LockSource {
  CK_CREATEMUTEX create = nullptr;
  CK_DESTROYMUTEX destroy = nullptr;
  CK_LOCKMUTEX lock = nullptr;
  CK_UNLOCKMUTEX unlock = nullptr;

  bool uses_app_callbacks() const noexcept { return create != nullptr; }
};

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() noexcept = default;
  // Throws CkrError when the application's CreateMutex fails.
  explicit Mutex(const LockSource& source);
  // It keeps a pointer to `source`: a temporary would be gone before the first lock.
  explicit Mutex(const LockSource&& source) = delete;
  ~Mutex();
  Mutex(const Mutex&) = delete;  // a mutex has an identity; copying one is a bug
  Mutex& operator=(const Mutex&) = delete;

  // NO_THREAD_SAFETY_ANALYSIS: these two are the primitive the analysis
  // trusts; their bodies are atomics it cannot follow.
  [[gnu::always_inline]] void lock() noexcept ACQUIRE() NO_THREAD_SAFETY_ANALYSIS {
    if (app_ != nullptr) [[unlikely]] {
      app_lock();
      return;
    }
    std::uint32_t expected = 0;
    if (!state_.compare_exchange_strong(expected, 1, std::memory_order_acquire,
                                        std::memory_order_relaxed)) [[unlikely]] {
      lock_contended();
    }
  }

  [[gnu::always_inline]] void unlock() noexcept RELEASE() NO_THREAD_SAFETY_ANALYSIS {
    if (app_ != nullptr) [[unlikely]] {
      app_unlock();
      return;
    }
    if (state_.exchange(0, std::memory_order_release) == 2) [[unlikely]] {
      state_.notify_one();
    }
  }

  // False only when no thread holds it; true while one does, and always
  // with the application's callbacks (they cannot tell). For HeldLock's
  // debug check.
  bool maybe_locked() const noexcept {
    return app_ != nullptr || state_.load(std::memory_order_relaxed) != 0;
  }

 private:
  [[gnu::cold]] void lock_contended() noexcept;
  [[gnu::cold]] void app_lock() noexcept;
  [[gnu::cold]] void app_unlock() noexcept;

  // 0 unlocked, 1 locked, 2 locked with waiters (Drepper, "Futexes Are Tricky").
  std::atomic<std::uint32_t> state_{0};
  void* app_ = nullptr;
  const LockSource* source_ = nullptr;
};

class SCOPED_CAPABILITY MutexGuard {
 public:
  explicit MutexGuard(Mutex& m) noexcept ACQUIRE(m) : m_(m) { m_.lock(); }
  ~MutexGuard() RELEASE() { m_.unlock(); }
  MutexGuard(const MutexGuard&) = delete;
  MutexGuard& operator=(const MutexGuard&) = delete;

 private:
  Mutex& m_;
};

// For the analysis only: `m`, which this thread locked through an owner the
// analysis cannot follow, is held until the end of this scope. That owner is
// a SessionLease (sessions/session_table.hpp): returned by value, which
// clang's analysis does not carry across a return. The lease unlocks; this
// generates no code (in a debug build, it checks that `m` is locked).
//
// Scoped rather than an assert_capability on Mutex: an asserted lock stays
// held for the analysis to the end of the function, past the lease's scope,
// and cannot be unlocked and retaken (a wait) without a false report.
class SCOPED_CAPABILITY HeldLock {
 public:
  [[gnu::always_inline]] explicit HeldLock(const Mutex& m) noexcept
      ACQUIRE(m) NO_THREAD_SAFETY_ANALYSIS {
    assert(m.maybe_locked());
    (void)m;
  }
  [[gnu::always_inline]] ~HeldLock() RELEASE() NO_THREAD_SAFETY_ANALYSIS {}
  HeldLock(const HeldLock&) = delete;
  HeldLock& operator=(const HeldLock&) = delete;
};

// Locks only when given a mutex: the backend lock exists only for a backend
// that is not thread-safe.
//
// For the analysis it holds `*m` in either case. That is sound because the
// backend lock guards no field of p11mux, only the backend's own state (the
// calls made under it): with a thread-safe backend there is nothing to guard.
// Its bodies lock conditionally, which the analysis cannot follow, hence
// NO_THREAD_SAFETY_ANALYSIS on them (and only them).
class SCOPED_CAPABILITY OptionalGuard {
 public:
  [[gnu::always_inline]] explicit OptionalGuard(Mutex* m) noexcept
      ACQUIRE(m) NO_THREAD_SAFETY_ANALYSIS : m_(m) {
    if (m_ != nullptr) m_->lock();
  }
  [[gnu::always_inline]] ~OptionalGuard() RELEASE() NO_THREAD_SAFETY_ANALYSIS {
    if (m_ != nullptr) m_->unlock();
  }
  OptionalGuard(const OptionalGuard&) = delete;
  OptionalGuard& operator=(const OptionalGuard&) = delete;

 private:
  Mutex* m_;
};

// Sleeps until `word` no longer holds `old`, a wake_all(), or the timeout.
// Needs no mutex, so it is usable in every locking mode and after fork.
void timed_wait(std::atomic<std::uint32_t>& word, std::uint32_t old,
                std::chrono::nanoseconds timeout) noexcept;
void wake_all(std::atomic<std::uint32_t>& word) noexcept;
// Wakes one thread sleeping on `word` (the one asleep longest, the kernel
// keeping a FIFO among threads of one priority).
void wake_one(std::atomic<std::uint32_t>& word) noexcept;

}  // namespace p11mux
