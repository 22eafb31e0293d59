// Guarded<T>: a T and the Mutex that guards it, the T reachable only under
// that lock ("associate mutexes with data, not code", as folly's
// Synchronized; docs/design.md, "Why the pool is safe"):
//
//   Guarded<Counts> counts{locks};
//   {
//     Locked c(counts);  // locks; unlocks at the end of the scope
//     ++c->opened;
//   }
//   counts.with_lock([](Counts& c) { ++c.opened; });
//
// The T is private: Locked<T> is the one way to it, and it holds the lock
// for as long as it lives. A Guarded is itself a clang capability
// (thread_safety.hpp), so the analysis checks the lock order between
// Guarded members (ACQUIRED_AFTER on them), a lock taken twice, and
// EXCLUDES/REQUIRES naming a Guarded member. Holding the T's reference
// beyond the Locked's scope is the one misuse left; pass the Locked, or
// keep the work inside it.
//
// It costs nothing: the same Mutex as everywhere (lock.hpp: a futex, or the
// application's callbacks from its LockSource), and a Locked is one pointer
// whose lock and unlock inline like a MutexGuard's.
#pragma once

#include "sync/lock.hpp"
#include "sync/thread_safety.hpp"

#include <utility>

namespace p11mux {

template <class T>
class Locked;

template <class T>
class CAPABILITY("mutex") Guarded {
 public:
  // p11mux's own futex lock.
  Guarded() = default;
  // Locks through `source` (the application's callbacks, when it gave them),
  // which must outlive the Guarded: the Mutex keeps a pointer to it. Throws
  // CkrError when the application's CreateMutex fails. The T starts as
  // `value`, built complete before it is guarded.
  explicit Guarded(const LockSource& source, T value = T{})
      : mutex_(source), value_(std::move(value)) {}
  // A temporary LockSource would be gone before the first lock.
  explicit Guarded(const LockSource&& source, T value = T{}) = delete;
  Guarded(const Guarded&) = delete;  // the lock has an identity; so does what it guards
  Guarded& operator=(const Guarded&) = delete;

  // Runs fn(T&) under the lock and returns what it returns.
  template <class F>
  decltype(auto) with_lock(F&& fn) EXCLUDES(this);

 private:
  friend class Locked<T>;
  // The primitive the analysis trusts, as Mutex::lock: it holds `this`
  // while the Mutex inside is what is locked.
  [[gnu::always_inline]] void acquire() noexcept ACQUIRE() NO_THREAD_SAFETY_ANALYSIS {
    mutex_.lock();
  }
  [[gnu::always_inline]] void release() noexcept RELEASE() NO_THREAD_SAFETY_ANALYSIS {
    mutex_.unlock();
  }

  Mutex mutex_;
  T value_ GUARDED_BY(this){};
};

// The T of a Guarded, locked for as long as this lives.
template <class T>
class SCOPED_CAPABILITY Locked {
 public:
  [[gnu::always_inline]] explicit Locked(Guarded<T>& guarded) noexcept ACQUIRE(guarded)
      : guarded_(guarded) {
    guarded_.acquire();
  }
  [[gnu::always_inline]] ~Locked() RELEASE() { guarded_.release(); }
  Locked(const Locked&) = delete;  // one lock, one owner
  Locked& operator=(const Locked&) = delete;

  // NO_THREAD_SAFETY_ANALYSIS: the analysis cannot tie `guarded_` to the
  // capability this object holds; that it is held is what a Locked is.
  T* operator->() const noexcept NO_THREAD_SAFETY_ANALYSIS { return &guarded_.value_; }
  T& operator*() const noexcept NO_THREAD_SAFETY_ANALYSIS { return guarded_.value_; }

 private:
  Guarded<T>& guarded_;
};

template <class T>
template <class F>
decltype(auto) Guarded<T>::with_lock(F&& fn) {
  Locked<T> locked(*this);
  return std::forward<F>(fn)(*locked);
}

}  // namespace p11mux
