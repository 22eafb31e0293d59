// Every lock p11mux takes is a Mutex. With the application's mutex callbacks
// (C_Initialize case 2) it locks through them, as the spec requires; otherwise
// it is a small futex lock: uncontended lock+unlock is two atomic instructions.
#pragma once

#include <p11mux/pkcs11.h>

#include <atomic>
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

class Mutex {
 public:
  Mutex() noexcept = default;
  // Throws CkrError when the application's CreateMutex fails.
  explicit Mutex(const LockSource& source);
  ~Mutex();
  Mutex(const Mutex&) = delete;  // a mutex has an identity; copying one is a bug
  Mutex& operator=(const Mutex&) = delete;

  [[gnu::always_inline]] void lock() noexcept {
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

  [[gnu::always_inline]] void unlock() noexcept {
    if (app_ != nullptr) [[unlikely]] {
      app_unlock();
      return;
    }
    if (state_.exchange(0, std::memory_order_release) == 2) [[unlikely]] {
      state_.notify_one();
    }
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

class MutexGuard {
 public:
  explicit MutexGuard(Mutex& m) noexcept : m_(m) { m_.lock(); }
  ~MutexGuard() { m_.unlock(); }
  MutexGuard(const MutexGuard&) = delete;
  MutexGuard& operator=(const MutexGuard&) = delete;

 private:
  Mutex& m_;
};

// Locks only when given a mutex: the backend lock exists only for a backend
// that is not thread-safe.
class OptionalGuard {
 public:
  [[gnu::always_inline]] explicit OptionalGuard(Mutex* m) noexcept : m_(m) {
    if (m_ != nullptr) m_->lock();
  }
  [[gnu::always_inline]] ~OptionalGuard() {
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

}  // namespace p11mux
