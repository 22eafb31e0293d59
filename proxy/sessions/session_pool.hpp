// Backend sessions, pooled per slot and kind (R/O, R/W), with a small cache
// per thread in front of the shared pool so that open+close on one thread
// usually takes no shared lock.
//
// The pool owns every backend session that no virtual session holds, and
// counts every backend session p11mux has open on a slot, so that it never
// opens more than the token's limit (from the configuration, the token info,
// or learned from two CKR_SESSION_COUNT in a row; a learned limit is probed
// again after kLimitProbeInterval, so a transient refusal does not stick). It makes
// C_OpenSession wait, up to pool.wait_ms, for a session to come back at that
// limit, in line (first come, first served). Every path that gives a session
// back or gives up a reservation wakes the head of the line, the one waiter
// that may take it, so none sleeps while a session is free. At a learned
// limit one waiter, the prober, also wakes for the next probe of it.
//
// A slot gets a pool only once the backend has confirmed the slot exists: a
// bogus slot ID leaves no trace.
//
// Its figures (open, idle, in use, waits, sessions discarded as dead) go to
// the observer's PoolMetricsRegistry as they change, with relaxed atomics.
//
// Its parts each keep their state in a Guarded (sync/guarded.hpp), reachable
// only under the part's lock: the registry (the thread caches), each
// SlotPool, each ThreadCache. Lock order: proxy/sync/lock.hpp (the registry,
// then a SlotPool's state, then a ThreadCache's state, all after
// Session::lock). No backend call and no log record is made under them.
// Why this is safe: docs/design.md, "Why the pool is safe".
#pragma once

#include "config/config.hpp"
#include "lifecycle/gate_access.hpp"
#include "observe/metrics.hpp"
#include "port/backend_port.hpp"
#include "sync/guarded.hpp"
#include "sync/lock.hpp"

#include <p11mux/pkcs11.h>

#include <spdlog/logger.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <vector>

namespace p11mux {

class SessionPool {
 public:
  using Clock = std::chrono::steady_clock;

  // Every backend call goes through `port`; `gate` is the module's call
  // gate (gate_access.hpp). Both outlive the pool.
  SessionPool(const BackendPort& port, GateAccess& gate, const Config::Pool& config,
              const LockSource& locks, std::uint64_t epoch, spdlog::logger& log,
              PoolMetricsRegistry& figures);
  // The pool's locks keep a pointer to `locks`: a temporary would be gone
  // before the first lock.
  SessionPool(const BackendPort& port, GateAccess& gate, const Config::Pool& config,
              const LockSource&& locks, std::uint64_t epoch, spdlog::logger& log,
              PoolMetricsRegistry& figures) = delete;
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;  // owns backend sessions
  SessionPool& operator=(const SessionPool&) = delete;

  // What becomes of a backend session given back: pooled again, closed
  // because p11mux cannot prove it clean (counted by reason), closed and
  // counted as dead (a call marked it discard: the backend said the session
  // or device is gone), or abandoned: its token does not answer (a group's
  // hung member), so a C_CloseSession would hang the caller too; it stays
  // counted open until close_abandoned() closes it, once the token answers.
  struct Fate {
    enum Kind : std::uint8_t { reuse, close, dead, abandon };
    Kind kind = reuse;
    CloseReason why{};  // with close
    // Fate::reuse or Fate::dead; a close needs its reason: Fate::closed(why).
    // Refused at compile time: the call below is not constexpr. (Not a
    // throw, which clang-tidy 14 takes for one escaping at run time.)
    consteval Fate(Kind k = reuse) : kind(k) {  // NOLINT: implicit on purpose
      if (k == close) a_close_needs_a_reason_use_Fate_closed();
    }
    static void a_close_needs_a_reason_use_Fate_closed() noexcept {}
    static constexpr Fate closed(CloseReason why) noexcept {
      Fate f;
      f.kind = close;
      f.why = why;
      return f;
    }
    constexpr bool operator==(Kind k) const noexcept { return kind == k; }
  };

  // A backend session for a call, and its return: like open() and close()
  // but not the application's session (no login accounting). At the limit
  // it waits up to pool.wait_ms (Wait::at_limit) or not at all (Wait::never:
  // CKR_SESSION_COUNT at once), fairly: first come, first served.
  enum class Wait : bool { never, at_limit };
  CK_RV borrow(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out,
               Wait wait = Wait::at_limit) noexcept;
  void give(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept;
  // Closes the sessions of `slot` given back as Fate::abandon (its token
  // answers again), as dead ones. Not under any of the pool's locks.
  void close_abandoned(CK_SLOT_ID slot) noexcept;
  // Only from this thread's cache, never waiting nor opening one: false when
  // it holds none of this slot and kind.
  bool borrow_cached(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept;
  // A backend session given back without a reset: pooled again unless a
  // call marked it discard (Binding::discard, Binding::dead, Binding::why).
  static Fate unreset_fate(bool discard, bool dead, CloseReason why) noexcept {
    return !discard ? Fate::reuse : dead ? Fate::dead : Fate::closed(why);
  }

  // A backend session for a new virtual session: from this thread's cache,
  // the shared pool, another thread's cache, or newly opened. Counts the
  // application's session on the slot (for logout on the last close).
  CK_RV open(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept;
  // A new backend session opened with the application's Notify callback
  // (`notify`, `context`): never a pooled one, but within the slot's limit
  // like any other (an idle session is closed to make room). It comes back
  // through close(), closed with CloseReason::notify_callback.
  CK_RV open_notified(CK_SLOT_ID slot, bool rw, CK_VOID_PTR context, CK_NOTIFY notify,
                      CK_SESSION_HANDLE& out) noexcept;
  // Gives a virtual session's backend session back, to be reused or closed
  // as `fate` says. Logs the token out when it was the application's last
  // session on the slot (unless pool.keep_login).
  void close(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept;

  // [pool] bind = state: a virtual session that holds no backend session.
  // admit() is its C_OpenSession: the slot and the kind of session checked
  // (by the backend itself when a backend session is at hand, else from
  // the token's info and the application's sessions: docs/design.md,
  // "Binding on state"), and the application's session counted, without
  // keeping a backend session. leave() is its C_CloseSession, when it holds
  // none any more (the token logged out as close() would).
  CK_RV admit(CK_SLOT_ID slot, bool rw) noexcept;
  void leave(CK_SLOT_ID slot, bool rw) noexcept;

  // What the application's calls did to the login state, for the checks
  // the backend cannot make when p11mux holds no backend session for an
  // application's session: CKR_SESSION_READ_WRITE_SO_EXISTS for a read-only
  // C_OpenSession while the SO is logged in, CKR_SESSION_READ_ONLY_EXISTS
  // for an SO C_Login while the application has a read-only session.
  void logged_in(CK_SLOT_ID slot, CK_USER_TYPE user, CK_RV rv) noexcept;
  void logged_out(CK_SLOT_ID slot, CK_RV rv) noexcept;
  // CKR_SESSION_READ_ONLY_EXISTS when the application has a read-only
  // session on the slot (an SO C_Login must then fail), else CKR_OK.
  CK_RV may_log_in_so(CK_SLOT_ID slot) noexcept;

  // The application's sessions on a slot, for C_GetTokenInfo.
  struct AppSessions {
    unsigned long all = 0, read_write = 0;
  };
  AppSessions app_sessions(CK_SLOT_ID slot) noexcept;

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
  void interrupt_waiters() noexcept EXCLUDES(registry_);
  // Closes every idle session (C_Finalize, after all virtual sessions closed).
  void close_all() noexcept;
  // The same, except that the sessions of a slot for which `may_call(slot)`
  // is false (a group's hung member: a C_CloseSession would hang
  // C_Finalize with it) are forgotten rather than closed: the backend's
  // C_Finalize, which follows, ends them.
  void close_all(const std::function<bool(CK_SLOT_ID)>& may_call) noexcept;
  // Closes sessions idle longer than `idle`, pings those idle longer than
  // `keepalive` (zero: don't); for the maintenance task.
  void maintain(std::chrono::seconds idle, std::chrono::seconds keepalive) noexcept;
  // The calls maintain() makes on one slot whose token may stop answering (a
  // group's member: group/member_pool_calls.hpp). begin() before each; false
  // when the token is not to be called now (a member down or hung: a call
  // would hang the maintenance with it), and its sessions then stay as they
  // are until a later round. end() with each answer, so that a call that
  // hangs is seen as one in flight.
  class SlotCalls {
   public:
    virtual bool begin() noexcept = 0;
    virtual void end(CK_RV rv) noexcept = 0;

   protected:
    SlotCalls() = default;
    ~SlotCalls() = default;  // not owned through this interface
    SlotCalls(const SlotCalls&) = default;
    SlotCalls& operator=(const SlotCalls&) = default;
  };
  // The same for `slot`'s sessions only, each call through `calls`.
  void maintain(CK_SLOT_ID slot, std::chrono::seconds idle, std::chrono::seconds keepalive,
                SlotCalls& calls) noexcept;

  struct SlotFigures {
    unsigned long open = 0, idle = 0, limit = 0;
  };
  // How long a limit learned from CKR_SESSION_COUNT holds before the pool
  // tries one session above it again.
  static constexpr std::chrono::seconds kLimitProbeInterval{1};
  // Slots with a pool at most (each one the backend confirmed).
  static constexpr std::size_t kMaxSlots = 1024;
  SlotFigures figures(CK_SLOT_ID slot) noexcept EXCLUDES(registry_);  // for tests and metrics

  // No known limit.
  static constexpr unsigned long kNoLimit = std::numeric_limits<unsigned long>::max();
  // A token's ulMaxSessionCount or ulMaxRwSessionCount as a limit no larger
  // than `most`: CK_UNAVAILABLE_INFORMATION and CK_EFFECTIVELY_INFINITE mean
  // none known. The pool's limits and C_GetTokenInfo's answer both.
  static constexpr unsigned long session_limit(CK_ULONG reported,
                                               unsigned long most = kNoLimit) noexcept {
    if (reported == CK_UNAVAILABLE_INFORMATION || reported == CK_EFFECTIVELY_INFINITE) return most;
    return reported < most ? reported : most;
  }

  std::uint64_t epoch() const noexcept { return epoch_; }
  // The backend whose sessions it keeps: a session's calls go through its
  // pool's port (Session::pool).
  const BackendPort& port() const noexcept { return port_; }

  class SlotPool;
  class ThreadCache;

 private:
  struct Idle;
  struct Taken;
  struct Notify {
    CK_VOID_PTR context = nullptr;
    CK_NOTIFY callback = nullptr;
  };
  // The slot's pool, made on first use once the backend confirms the slot
  // (else its CKR code: CKR_SLOT_ID_INVALID...); find_slot never makes one.
  CK_RV slot_pool(CK_SLOT_ID slot, SlotPool*& out) noexcept EXCLUDES(registry_);
  SlotPool* find_slot(CK_SLOT_ID slot) noexcept { return slots_.find(slot); }
  ThreadCache* this_thread_cache(bool create) noexcept EXCLUDES(registry_);
  [[gnu::cold, gnu::noinline]] ThreadCache* make_thread_cache() noexcept EXCLUDES(registry_);
  // The common case of borrow() and give(), a call on an idle virtual
  // session with [pool] bind = state: an idle session of this kind from this
  // thread's cache (false: none there), and one put back there (false: not
  // kept there, because a thread waits or the cache is full).
  // Inlined where used (session_pool.cpp only): a call frame each costs ~15
  // instructions of the ~100 they take (callgrind).
  [[gnu::always_inline]] inline bool take_cached(SlotPool& pool, bool rw,
                                                 CK_SESSION_HANDLE& out) noexcept;
  [[gnu::always_inline]] inline bool give_cached(SlotPool& pool, bool rw,
                                                 CK_SESSION_HANDLE handle) noexcept;
  // Whether, at the limit, an idle session of the other kind may be closed
  // to open one of this kind (never just to check that one could be opened).
  enum class Trade : bool { never, idle };
  CK_RV take(SlotPool& pool, bool rw, Notify notify, CK_SESSION_HANDLE& out,
             Wait wait = Wait::at_limit, Trade trade = Trade::idle) noexcept;
  class Place;
  bool steal(SlotPool& pool, bool rw, CK_SESSION_HANDLE& out) noexcept EXCLUDES(registry_);
  struct Stale;
  class Waiter;
  // Closes stale sessions taken out of a thread's cache; then they no longer count as open.
  void drop_stale(SlotPool& pool, const Stale& stale) noexcept;
  // False at pool.max_virtual_sessions: then it is not counted.
  bool count_app_session(SlotPool& pool, bool rw) noexcept;
  // Stops counting one; true when it was the last and the token is to be
  // logged out (logging_out is then set: the caller logs out, then
  // logged_out_done()).
  bool uncount_app_session(SlotPool& pool, bool rw) noexcept;
  void logged_out_done(SlotPool& pool) noexcept;
  void settle(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept;
  void give_back(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle) noexcept;
  void discard(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept;
  void drop_idle(SlotPool& pool, CK_SESSION_HANDLE handle, bool dead) noexcept;
  // The one walk over the pool's parts, in the lock order: under the
  // registry, each slot pool (only `only`, unless NULL) with its state
  // locked, and under that each thread cache with its state locked.
  // on_slot(SlotPool&, SlotPool::State&) for each slot pool;
  // on_cache(SlotPool&, SlotPool::State&, ThreadCache::State&) for each
  // cache, returning false to end the walk (none: caches are not visited).
  // Every loop over the pool's parts is one of these.
  template <class OnSlot, class OnCache>
  void walk(SlotPool* only, OnSlot on_slot, OnCache on_cache) EXCLUDES(registry_);
  // Takes out of the shared idle lists and every thread's cache the idle
  // sessions of `only` (every slot when NULL) for which pick(rw, idle) is
  // true, appending them to `out`. They still count as open: the caller puts
  // them back, or closes them (close_taken).
  template <class Pick>
  void sweep(SlotPool* only, Pick pick, std::vector<Taken>& out) noexcept EXCLUDES(registry_);
  // Closes sessions sweep() took; each stops counting as open once its
  // C_CloseSession has returned, so the count is never below what the
  // backend has open.
  void close_taken(const std::vector<Taken>& doomed) noexcept;
  // Takes out of `doomed` one session of each slot that would otherwise be
  // left with none while the application has sessions on it.
  void spare_last(std::vector<Taken>& doomed) noexcept;
  // maintain() over `only` (every slot when NULL), its calls through `calls`
  // when not NULL.
  void tend(SlotPool* only, std::chrono::seconds idle, std::chrono::seconds keepalive,
            SlotCalls* calls) noexcept;
  // Sessions maintain() took and did not handle (their token is not to be
  // called now): idle again, as they were.
  void put_back(std::span<const Taken> left) noexcept;
  CK_RV backend_open(CK_SLOT_ID slot, bool rw, Notify notify, CK_SESSION_HANDLE& out) noexcept;
  void backend_close(CK_SESSION_HANDLE handle) noexcept;
  void retire(ThreadCache* cache) noexcept EXCLUDES(registry_);
  friend struct ThreadCacheOwner;

  const BackendPort& port_;
  GateAccess& gate_;
  const Config::Pool config_;
  const LockSource& locks_;
  const std::uint64_t epoch_;
  spdlog::logger& log_;
  PoolMetricsRegistry& figures_;

  // What the registry's lock guards: every live thread's cache (made at the
  // thread's first give-back, retired at its exit), and the right to add a
  // slot pool to slots_.
  struct Registry {
    std::vector<ThreadCache*> caches;
  };
  // The slot pools, for lookup without a lock: a pool, once published, stays
  // until the SessionPool is destroyed. Added to only under the registry's
  // lock, which add() asks for as proof.
  class Slots {
   public:
    std::size_t size() const noexcept { return count_.load(std::memory_order_acquire); }
    SlotPool* operator[](std::size_t i) const noexcept {
      return pools_[i].load(std::memory_order_acquire);
    }
    SlotPool* find(CK_SLOT_ID slot) const noexcept;
    // False when there is no place left.
    bool add(const Locked<Registry>& registry, SlotPool* pool) noexcept;

   private:
    std::array<std::atomic<SlotPool*>, kMaxSlots> pools_{};
    std::atomic<std::size_t> count_{0};
  };

  Slots slots_;
  std::atomic<bool> interrupted_{false};  // interrupt_waiters() was called
  Guarded<Registry> registry_;
};

}  // namespace p11mux
