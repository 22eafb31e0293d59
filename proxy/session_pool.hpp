// Backend sessions, pooled per slot and kind (R/O, R/W), with a small cache
// per thread in front of the shared pool so that open+close on one thread
// usually takes no shared lock.
//
// The pool owns every backend session that no virtual session holds. It
// knows the token's session limit (from the configuration, the token info, or
// learned from CKR_SESSION_COUNT) and makes C_OpenSession wait, up to
// pool.wait_ms, for a session to come back at that limit. Every path that
// gives a session back or gives up a reservation wakes the waiters, so none
// sleeps past its deadline.
//
// Its figures (open, idle, in use, waits, sessions discarded as dead) go to
// the observer's PoolMetricsRegistry as they change, with relaxed atomics.
//
// Lock order (see also session_table.hpp): Session::lock, then a SlotPool's
// lock, then the backend lock; a ThreadCache's lock is taken alone or under a
// SlotPool's lock, never the other way round.
#pragma once

#include "config.hpp"
#include "lock.hpp"
#include "metrics.hpp"

#include <p11mux/pkcs11.h>

#include <spdlog/logger.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

namespace p11mux {

class SessionPool {
 public:
  using Clock = std::chrono::steady_clock;

  struct Backend {
    const CK_FUNCTION_LIST_3_0& functions;
    Mutex* lock;  // NULL when the backend is thread-safe
  };

  SessionPool(Backend backend, const Config::Pool& config, const LockSource& locks,
              std::uint64_t epoch, spdlog::logger& log, PoolMetricsRegistry& figures);
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;  // owns backend sessions
  SessionPool& operator=(const SessionPool&) = delete;

  // What becomes of a backend session given back: pooled again, closed
  // (it could not be reset), or closed and counted as dead (a call marked it
  // discard: the backend said the session or device is gone).
  enum class Fate { reuse, close, dead };

  // A backend session for a multiplexed call, and its return: like open()
  // and close() but not the application's session (no login accounting).
  CK_RV borrow(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept;
  void give(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept;
  // A backend session given back without a reset: pooled again unless a
  // call marked it discard (Binding::discard, Binding::dead).
  static Fate unreset_fate(bool discard, bool dead) noexcept {
    return !discard ? Fate::reuse : dead ? Fate::dead : Fate::close;
  }

  // A backend session for a new virtual session: from this thread's cache,
  // the shared pool, another thread's cache, or newly opened. Counts the
  // application's session on the slot (for logout on the last close).
  CK_RV open(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept;
  // Counts a backend session the caller opened itself (with a Notify
  // callback) as the application's; it comes back through close(..., false).
  void adopt(CK_SLOT_ID slot, bool rw) noexcept;
  // Gives a virtual session's backend session back, to be reused or closed
  // as `fate` says. Logs the token out when it was the application's last
  // session on the slot (unless pool.keep_login).
  void close(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept;

  // A backend call said the session or device is gone: idle sessions of that
  // slot are not to be trusted either.
  void invalidate(CK_SLOT_ID slot) noexcept;
  // Closes idle sessions of a slot (R/O only, or all) when the application
  // itself has none of that kind open; true if it did (then retry the call).
  // For SO login (CKR_SESSION_READ_ONLY_EXISTS) and C_InitToken (CKR_SESSION_EXISTS).
  bool drain_idle(CK_SLOT_ID slot, bool read_only_only) noexcept;
  // Opens pool.prewarm read-only sessions on every slot with a token.
  void prewarm() noexcept;
  // C_Finalize, once the call gate is closed: calls waiting at the limit
  // (pool.wait_ms) return CKR_CRYPTOKI_NOT_INITIALIZED now, and no call
  // waits any more.
  void interrupt_waiters() noexcept;
  // Closes every idle session (C_Finalize, after all virtual sessions closed).
  void close_all() noexcept;
  // Closes sessions idle longer than `idle`, pings those idle longer than
  // `keepalive` (zero: don't); for the maintenance task.
  void maintain(std::chrono::seconds idle, std::chrono::seconds keepalive) noexcept;

  struct SlotFigures {
    unsigned long open = 0, idle = 0, limit = 0;
  };
  SlotFigures figures(CK_SLOT_ID slot) noexcept;  // for tests and metrics

  std::uint64_t epoch() const noexcept { return epoch_; }

  class SlotPool;
  class ThreadCache;

 private:
  SlotPool* slot_pool(CK_SLOT_ID slot) noexcept;  // NULL when out of memory
  ThreadCache* this_thread_cache(bool create) noexcept;
  CK_RV take(SlotPool& pool, bool rw, CK_SESSION_HANDLE& out) noexcept;
  bool steal(SlotPool& pool, bool rw, CK_SESSION_HANDLE& out) noexcept;
  void settle(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept;
  void give_back(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle) noexcept;
  void discard(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, bool dead) noexcept;
  void drop_idle(SlotPool& pool, CK_SESSION_HANDLE handle, bool dead) noexcept;
  CK_RV backend_open(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept;
  void backend_close(CK_SESSION_HANDLE handle) noexcept;
  void retire(ThreadCache* cache) noexcept;
  friend struct ThreadCacheOwner;

  Backend backend_;
  const Config::Pool config_;
  const LockSource& locks_;
  const std::uint64_t epoch_;
  spdlog::logger& log_;
  PoolMetricsRegistry& figures_;

  static constexpr std::size_t kMaxSlots = 256;
  std::array<std::atomic<SlotPool*>, kMaxSlots> slots_{};
  std::atomic<std::size_t> slot_count_{0};
  std::atomic<bool> interrupted_{false};  // interrupt_waiters() was called
  Mutex registry_lock_;  // guards slot creation and caches_
  std::vector<ThreadCache*> caches_;
};

}  // namespace p11mux
