#include "sync/lock.hpp"

#include <p11mux/ckr_error.hpp>
#include <p11mux/rv_names.hpp>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <ctime>

namespace p11mux {

Mutex::Mutex(const LockSource& source) {
  if (!source.uses_app_callbacks()) return;
  void* handle = nullptr;
  if (CK_RV rv = source.create(&handle); rv != CKR_OK) {
    throw CkrError(
        rv, std::string("the application's CreateMutex failed: ") + std::string(rv_name(rv)));
  }
  app_ = handle;
  source_ = &source;
}

Mutex::~Mutex() {
  if (app_ != nullptr) source_->destroy(app_);
}

void Mutex::lock_contended() noexcept {
  // Mark the lock contended, then sleep until it is handed to us.
  while (state_.exchange(2, std::memory_order_acquire) != 0) {
    state_.wait(2, std::memory_order_relaxed);
  }
}

// The application's callbacks return a CKR code we cannot report from here;
// a failing LockMutex is a broken application, and proceeding is all we can do.
void Mutex::app_lock() noexcept { (void)source_->lock(app_); }
void Mutex::app_unlock() noexcept { (void)source_->unlock(app_); }

void timed_wait(std::atomic<std::uint32_t>& word, std::uint32_t old,
                std::chrono::nanoseconds timeout) noexcept {
  using namespace std::chrono;
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(duration_cast<seconds>(timeout).count());
  ts.tv_nsec = static_cast<long>((timeout - seconds(ts.tv_sec)).count());
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, old, &ts, nullptr,
          0);
}

namespace {
void futex_wake(std::atomic<std::uint32_t>& word, int count) noexcept {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, count, nullptr,
          nullptr, 0);
}
}  // namespace

void wake_all(std::atomic<std::uint32_t>& word) noexcept { futex_wake(word, INT_MAX); }

void wake_one(std::atomic<std::uint32_t>& word) noexcept { futex_wake(word, 1); }

}  // namespace p11mux
