#include "sessions/session_pool.hpp"

#include <p11mux/rv_names.hpp>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>

namespace p11mux {

namespace {

constexpr unsigned long kUnlimited = SessionPool::kNoLimit;
constexpr std::size_t kThreadCacheSize = 8;

}  // namespace

struct SessionPool::Idle {
  CK_SESSION_HANDLE handle;
  std::uint64_t generation;  // the slot's generation when it was given back
  SessionPool::Clock::time_point since;
};

struct SessionPool::Taken {
  SlotPool* pool;
  bool rw;
  Idle idle;
};

// Sessions taken out of one thread's cache because they are stale (at most all of them).
struct SessionPool::Stale {
  struct Entry {
    bool rw;
    CK_SESSION_HANDLE handle;
  };
  std::array<Entry, kThreadCacheSize> entries;
  std::size_t count = 0;
};

// The waiters to wake once the lock under which they were chosen is
// released: declared before that lock's Locked, so that it runs after it.
// The waiter woken then does not find the lock still held by the thread
// that woke it. Its word was bumped under the lock, while its place was in
// the line; the place may be gone by the time of the system call, which
// then wakes nobody (a futex wake-up only wakes threads sleeping on that
// address, and every sleeper in p11mux looks again after waking).
class Wakeup {
 public:
  Wakeup() noexcept = default;
  ~Wakeup() {
    for (auto* word : words_) {
      if (word != nullptr) wake_all(*word);
    }
  }
  Wakeup(const Wakeup&) = delete;
  Wakeup& operator=(const Wakeup&) = delete;
  // A word to wake (NULL: none). One lock chooses at most two: the next in
  // line and the prober (Place). A third would be woken at once, under the
  // lock: slower, never lost.
  void add(std::atomic<std::uint32_t>* word) noexcept {
    if (word == nullptr) return;
    for (auto*& w : words_) {
      if (w == nullptr || w == word) {
        w = word;
        return;
      }
    }
    wake_all(*word);
  }

 private:
  std::array<std::atomic<std::uint32_t>*, 2> words_{};
};

class SessionPool::SlotPool {
 public:
  // What the slot's lock guards: its idle sessions and its counts.
  struct State {
    std::vector<Idle> idle[2];  // [rw]
    // Fate::abandon's sessions, each with its kind (rw), still counted in `open`.
    std::vector<std::pair<CK_SESSION_HANDLE, bool>> abandoned;
    unsigned long open[2] = {0, 0};   // backend sessions open or being opened, [rw]
    unsigned long opening = 0;        // ... of which being opened (C_OpenSession under way)
    unsigned long app_sessions = 0;   // the application's virtual sessions on this slot
    unsigned long app_read_only = 0;  // ... of which read-only
    // The limit in force; `ceiling` is the configured or reported one. Below
    // the ceiling, the limit was learned from CKR_SESSION_COUNT: from
    // probe_after on, one session above it may be tried (probing).
    unsigned long limit = kUnlimited;
    unsigned long ceiling = kUnlimited;
    unsigned long rw_limit = kUnlimited;
    Clock::time_point probe_after{};
    bool probing = false;
    unsigned refusals = 0;      // CKR_SESSION_COUNT answers in a row, below the limit
    bool logging_out = false;   // the last application session's C_Logout is under way
    bool so_logged_in = false;  // the application's C_Login as SO succeeded, no logout since
    // The calls waiting at the limit, first come first served: a list of
    // their places (Place), linked through the places themselves, so that
    // joining and leaving it allocate nothing. Only the first may take a
    // session, and only the first is woken when one comes back.
    Place* queue_first = nullptr;
    Place* queue_last = nullptr;
    // The one place in the queue whose sleep ends when a learned limit may
    // be probed (may_probe); it wakes the head, which probes. The others
    // sleep until their deadline: were every waiter to wake for the probe,
    // each probe would wake the whole line at once (256 threads every
    // kLimitProbeInterval, and a convoy on this lock; issue 13).
    Place* prober = nullptr;

    // Room appeared, or the head of the queue changed: the head is to look
    // again. Bumps its word (under the lock: the place is still there) and
    // returns it, for a Wakeup; NULL when nobody waits.
    std::atomic<std::uint32_t>* wake_head() noexcept;
    // C_Finalize: every place in the queue looks again (and sees interrupted_).
    void wake_queue() noexcept;
    // When `p` is to look again for a probe of a learned limit: the prober
    // at the next probe (or a probe interval from now, when one is due and
    // the head is to make it); never for the others, nor without a learned limit.
    Clock::time_point probe_time(const Place* p, Clock::time_point now) const noexcept {
      if (limit >= ceiling || prober != p) return Clock::time_point::max();
      return probe_after > now ? probe_after : now + kLimitProbeInterval;
    }
    // A probe may be made now by the head (its kind aside: the head checks).
    bool probe_due(Clock::time_point now) const noexcept {
      return limit < ceiling && !probing && now >= probe_after && open_total() < ceiling;
    }

    unsigned long open_total() const noexcept { return open[0] + open[1]; }
    // Whether an idle session may be closed to make room: not the token's
    // last established one while the application has sessions there (that
    // would log the token out, and SoftHSM2 would renumber its objects:
    // docs/pkcs11-facts.md, "Object handles"), even with others being opened.
    bool may_close_idle() const noexcept { return app_sessions == 0 || open_total() - opening > 1; }
    bool kind_has_room(bool rw) const noexcept { return !rw || open[1] < rw_limit; }
    bool has_room(bool rw) const noexcept { return open_total() < limit && kind_has_room(rw); }
    // Whether the next in line may find something once the head took its
    // session from the shared lists or opened one: an idle session (of
    // either kind: it may trade it), or room. Sessions in threads' caches
    // are not seen here; a head that stole one wakes the next regardless,
    // and one given to a cache while a call waits wakes the head (give_back).
    bool more_for_next() const noexcept {
      return !idle[0].empty() || !idle[1].empty() || has_room(false) || has_room(true);
    }
    // At a learned limit, time to try one more (kLimitProbeInterval after the refusal).
    bool may_probe(bool rw, Clock::time_point now) const noexcept {
      return limit < ceiling && !probing && now >= probe_after && open_total() < ceiling &&
             kind_has_room(rw);
    }
    // The backend refused a session with `open_now` open (the refused one not
    // counted). A single refusal may be transient (another process's sessions,
    // an HSM busy for a moment): true means try again at once. Refused twice
    // in a row, or refused a probe, that is the limit for now (never 0),
    // probed again later.
    bool refused(unsigned long open_now, bool was_probe, Clock::time_point now) noexcept {
      if (!was_probe && ++refusals < 2) return true;
      refusals = 0;
      limit = std::max<unsigned long>(open_now, 1);
      probe_after = now + kLimitProbeInterval;
      return false;
    }
    // A session opened above the learned limit: the limit rises with it, and
    // the next probe may follow at once.
    void probe_succeeded() noexcept {
      limit = std::min(std::max(limit, open_total()), ceiling);
      probe_after = {};
    }
    // Pops an idle session of this kind and generation `gen`; stale ones go
    // to `stale`, still counted as open: the caller closes them, then stops
    // counting them.
    bool pop(std::uint64_t gen, bool rw, CK_SESSION_HANDLE& out,
             std::vector<CK_SESSION_HANDLE>& stale) {
      auto& list = idle[rw];
      while (!list.empty()) {
        Idle entry = list.back();
        list.pop_back();
        if (entry.generation == gen) {
          out = entry.handle;
          return true;
        }
        stale.push_back(entry.handle);
      }
      return false;
    }
    // Keeps an idle session in the shared list; false when there is no
    // memory for it: then it no longer counts as open (the caller closes it).
    bool keep(bool rw, const Idle& session) noexcept {
      try {
        idle[rw].push_back(session);
        return true;
      } catch (...) {
        --open[rw];
        return false;
      }
    }
    // Stale sessions taken out of a thread's cache, closed: they no longer count as open.
    void forget(const Stale& stale) noexcept {
      for (std::size_t i = 0; i < stale.count; ++i) --open[stale.entries[i].rw];
    }
  };

  SlotPool(CK_SLOT_ID slot_id, const LockSource& locks, State initial, SlotPoolMetrics* reported)
      : id(slot_id),
        state(locks, std::move(initial)),
        figures(reported != nullptr ? reported : &unreported) {}

  const CK_SLOT_ID id;
  Guarded<State> state ACQUIRED_AFTER(SessionPool::registry_);

  // Atomics, read and written without the lock.
  std::atomic<std::uint64_t> generation{0};  // bumped when the device may have restarted
  // Bumped whenever room appears (signal); also the futex word of the calls
  // waiting for a C_Logout to end (count_app_session).
  std::atomic<std::uint32_t> returns{0};
  std::atomic<std::uint32_t> waiters{0};  // calls at the limit: give_back skips the thread caches
  std::atomic<std::uint32_t> queued{0};   // places in the queue (State::queue_first...)

  // For /metrics: the registry's figures, or `unreported` if it had no memory.
  SlotPoolMetrics unreported;
  SlotPoolMetrics* const figures;  // the pointer is constant; the figures are atomics
  void lent_idle() noexcept {
    figures->idle.add(-1);
    figures->in_use.add(1);
  }
  void lent_new() noexcept {
    figures->open.fetch_add(1, std::memory_order_relaxed);
    figures->in_use.add(1);
  }
  void closed(std::int64_t n, bool were_idle) noexcept {
    figures->open.fetch_sub(n, std::memory_order_relaxed);
    if (were_idle) figures->idle.add(-n);
  }
  // Room appeared (or the state changed in a way a waiter must see): after
  // the change, not under the lock. Wakes the head of the queue only: it
  // alone may take what came back (the others would look and sleep again,
  // a storm of context switches per return with hundreds waiting); the next
  // is woken when the head leaves the queue (Place). The load of `queued`
  // pairs with the one in Place::join (both seq_cst): a place that joins
  // after it was read sees the bump of `returns` and looks again.
  void signal() noexcept EXCLUDES(state) {
    returns.fetch_add(1, std::memory_order_seq_cst);
    if (queued.load(std::memory_order_seq_cst) == 0) return;
    Wakeup wake;
    wake.add(Locked(state)->wake_head());
  }
  // The same, with the slot's state locked: `wake` wakes the head once it
  // is released.
  void signal(State& s, Wakeup& wake) noexcept {
    returns.fetch_add(1, std::memory_order_seq_cst);
    wake.add(s.wake_head());
  }
};

// Counts a thread waiting for room in a slot pool, for as long as it lives.
class SessionPool::Waiter {
 public:
  explicit Waiter(SlotPool& pool) noexcept : pool_(pool) {
    pool_.waiters.fetch_add(1, std::memory_order_seq_cst);
  }
  ~Waiter() { pool_.waiters.fetch_sub(1, std::memory_order_acq_rel); }
  Waiter(const Waiter&) = delete;
  Waiter& operator=(const Waiter&) = delete;

 private:
  SlotPool& pool_;
};

// A call's place in the slot's queue at the limit (State::queue_first),
// from its first sleep until it is served or gives up. Joined and left under
// the slot's lock. A place has its own futex word: the call sleeps on it, and
// it is bumped only when this place is the head and should look again
// (State::wake_head), when it becomes the prober (State::prober), or at
// C_Finalize (State::wake_queue).
class SessionPool::Place {
 public:
  explicit Place(SlotPool& pool) noexcept : pool_(pool) {}
  ~Place() {
    if (!queued_) return;
    Wakeup wake;
    leave(*Locked(pool_.state), /*wake_next=*/true, wake);
  }
  Place(const Place&) = delete;
  Place& operator=(const Place&) = delete;

  // Whether this call may take a session now: nobody is queued, or it is
  // the head of the queue.
  bool turn(const SlotPool::State& s) const noexcept {
    return queued_ ? s.queue_first == this : s.queue_first == nullptr;
  }
  // In line from now on, and the prober if there is none. The caller then
  // reads `returns` again: room that appeared before `queued` counted this
  // place woke nobody (signal).
  void join(SlotPool::State& s) noexcept {
    if (queued_) return;
    prev_ = s.queue_last;
    next_ = nullptr;
    (prev_ != nullptr ? prev_->next_ : s.queue_first) = this;
    s.queue_last = this;
    if (s.prober == nullptr) s.prober = this;
    queued_ = true;
    pool_.queued.fetch_add(1, std::memory_order_seq_cst);
  }
  // Took a session: out of the line, and the next one is the head now. It
  // is woken only if there may be more for it (`more`: else the next return
  // wakes it), so that a return costs one wake-up, not two. `wake` gets the
  // places to wake once the lock is released.
  void served(SlotPool::State& s, bool more, Wakeup& wake) noexcept {
    if (queued_) leave(s, more, wake);
  }
  bool queued() const noexcept { return queued_; }

  // What the word holds now: read under the slot's lock, before this call
  // looks at the pool, so that a wake-up after the look ends the sleep.
  std::uint32_t ticket() const noexcept { return word_.load(std::memory_order_acquire); }
  void sleep(std::uint32_t ticket, Clock::duration d) noexcept { timed_wait(word_, ticket, d); }
  // Under the slot's lock (the place is in the queue, so it still exists):
  // the word to wake once the lock is released (one thread sleeps on it:
  // this place's).
  std::atomic<std::uint32_t>* wake() noexcept {
    word_.fetch_add(1, std::memory_order_release);
    return &word_;
  }
  Place* next() const noexcept { return next_; }

 private:
  void leave(SlotPool::State& s, bool wake_next, Wakeup& wake) noexcept {
    const bool was_head = s.queue_first == this;
    (prev_ != nullptr ? prev_->next_ : s.queue_first) = next_;
    (next_ != nullptr ? next_->prev_ : s.queue_last) = prev_;
    prev_ = next_ = nullptr;
    queued_ = false;
    pool_.queued.fetch_sub(1, std::memory_order_seq_cst);
    // The next one is the head now: it may take what is there.
    if (was_head && wake_next && s.queue_first != nullptr) wake.add(s.queue_first->wake());
    // The prober's part goes to the last in line, the one likely to wait
    // longest (the head leaves next: with it, the part would move, at a
    // wake-up each, at every session served). It sleeps until its deadline,
    // so it is woken to sleep again until the probe; only while a limit
    // learned from the backend is in force (else there is nothing to probe).
    if (s.prober == this) {
      s.prober = s.queue_last;
      if (s.prober != nullptr && s.limit < s.ceiling) wake.add(s.prober->wake());
    }
  }

  SlotPool& pool_;
  // The links and queued_ are read and written under the slot's lock only.
  Place* prev_ = nullptr;
  Place* next_ = nullptr;
  bool queued_ = false;
  std::atomic<std::uint32_t> word_{0};
};

std::atomic<std::uint32_t>* SessionPool::SlotPool::State::wake_head() noexcept {
  return queue_first != nullptr ? queue_first->wake() : nullptr;
}

// Rare (C_Finalize): woken under the lock.
void SessionPool::SlotPool::State::wake_queue() noexcept {
  for (Place* p = queue_first; p != nullptr; p = p->next()) wake_all(*p->wake());
}

// A thread's few idle sessions; its lock is uncontended except when another
// thread steals from it or the pool walks over it.
class SessionPool::ThreadCache {
 public:
  struct Entry {
    SlotPool* slot;
    bool rw;
    Idle idle;
  };
  // What the cache's lock guards.
  struct State {
    std::array<Entry, kThreadCacheSize> entries{};
    std::size_t count = 0;

    bool push(const Entry& e) noexcept {
      if (count == entries.size()) return false;
      entries[count++] = e;
      return true;
    }
    // An idle session of this slot, kind and generation `gen`. Entries of
    // the slot from an older generation (given back before the device said
    // a session was gone) are stale: they are taken out too, into `stale`,
    // and the caller closes them and stops counting them as open.
    bool pop(const SlotPool& slot, std::uint64_t gen, bool rw, CK_SESSION_HANDLE& out,
             SessionPool::Stale& stale) noexcept {
      bool found = false;
      for (std::size_t i = count; i-- > 0;) {
        Entry& e = entries[i];
        if (e.slot != &slot) continue;
        if (e.idle.generation != gen) {
          stale.entries[stale.count++] = {e.rw, e.idle.handle};
          e = entries[--count];
        } else if (!found && e.rw == rw) {
          out = e.idle.handle;
          e = entries[--count];
          found = true;
        }
      }
      return found;
    }
    // Takes out the entries of `slot` for which pick(rw, idle) is true,
    // handing each to take(rw, idle).
    template <class Pick, class Take>
    void take_if(const SlotPool& slot, Pick& pick, Take take) {
      for (std::size_t i = count; i-- > 0;) {
        Entry& e = entries[i];
        if (e.slot != &slot || !pick(e.rw, e.idle)) continue;
        take(e.rw, e.idle);
        e = entries[--count];
      }
    }
  };

  explicit ThreadCache(const LockSource& locks) : state(locks) {}
  Guarded<State> state ACQUIRED_AFTER(SessionPool::SlotPool::state);
};

SessionPool::SlotPool* SessionPool::Slots::find(CK_SLOT_ID slot) const noexcept {
  std::size_t n = size();
  for (std::size_t i = 0; i < n; ++i) {
    SlotPool* p = (*this)[i];
    if (p->id == slot) return p;
  }
  return nullptr;
}

bool SessionPool::Slots::add(const Locked<Registry>&, SlotPool* pool) noexcept {
  // Only one thread adds (the registry's lock is held): a relaxed read suffices.
  std::size_t n = count_.load(std::memory_order_relaxed);
  if (n == kMaxSlots) return false;
  pools_[n].store(pool, std::memory_order_release);
  count_.store(n + 1, std::memory_order_release);
  return true;
}

// This thread's cache, tagged with the pool's epoch: a cache of an earlier
// initialization (or of the parent process) is never touched. At thread exit
// the cached sessions go back to the shared pool.
struct ThreadCacheOwner {
  SessionPool::ThreadCache* cache = nullptr;
  SessionPool* pool = nullptr;  // valid only while its epoch is the gate's
  GateAccess* gate = nullptr;   // the module's: outlives every pool
  std::uint64_t epoch = 0;

  ~ThreadCacheOwner();
};

namespace {
// The same cache, pool and epoch, read on every borrow and give: a plain
// struct in initial-exec TLS is a few %fs-relative loads, where the owner
// (a thread_local with a destructor, in a shared library) costs a
// __tls_get_addr call and a guard per access (callgrind: ~55 instructions,
// twice per call with [pool] bind = state). The owner is touched only when a
// cache is made, and at thread exit.
struct ThreadCacheFast {
  SessionPool::ThreadCache* cache;
  const SessionPool* pool;
  std::uint64_t epoch;
};
[[gnu::tls_model("initial-exec")]] constinit thread_local ThreadCacheFast this_thread_fast{};
thread_local ThreadCacheOwner this_thread_owner;
}  // namespace

ThreadCacheOwner::~ThreadCacheOwner() {
  if (cache == nullptr) return;
  this_thread_fast = {};
  GateAccess::Background call(*gate);
  if (call.epoch() == epoch) pool->retire(cache);
  // Otherwise the pool that owned the cache has already freed it.
}

SessionPool::SessionPool(const BackendPort& port, GateAccess& gate, const Config::Pool& config,
                         const LockSource& locks, std::uint64_t epoch, spdlog::logger& log,
                         PoolMetricsRegistry& figures)
    : port_(port),
      gate_(gate),
      config_(config),
      locks_(locks),
      epoch_(epoch),
      log_(log),
      figures_(figures),
      registry_(locks) {}

SessionPool::~SessionPool() {
  close_all();
  {
    Locked registry(registry_);
    for (ThreadCache* c : registry->caches) delete c;
  }
  for (std::size_t i = 0; i < slots_.size(); ++i) delete slots_[i];
}

CK_RV SessionPool::slot_pool(CK_SLOT_ID slot, SlotPool*& out) noexcept {
  if ((out = find_slot(slot)) != nullptr) return CKR_OK;
  // First use of this slot: the backend must know it (a bogus slot ID must
  // not take a place in the table), and its token tells the session limits.
  // Asked outside every pool lock.
  CK_TOKEN_INFO info{};
  CK_RV info_rv = port_.call<fn::C_GetTokenInfo>(slot, &info);
  if (info_rv == CKR_FUNCTION_NOT_SUPPORTED) {
    CK_SLOT_INFO slot_info{};
    if (CK_RV rv = port_.call<fn::C_GetSlotInfo>(slot, &slot_info);
        rv != CKR_OK && rv != CKR_FUNCTION_NOT_SUPPORTED) {
      return rv;
    }
  } else if (info_rv != CKR_OK) {
    return info_rv;
  }
  // The new pool's state, complete before it is guarded and published.
  SlotPool::State initial;
  if (info_rv == CKR_OK) {
    initial.ceiling = session_limit(info.ulMaxSessionCount);
    initial.rw_limit = session_limit(info.ulMaxRwSessionCount);
  }
  if (config_.max_sessions) initial.ceiling = std::max<unsigned long>(*config_.max_sessions, 1);
  initial.limit = initial.ceiling;
  initial.rw_limit = std::min(initial.rw_limit, initial.ceiling);
  bool full = false;
  {
    Locked registry(registry_);
    if ((out = find_slot(slot)) != nullptr) return CKR_OK;  // made by another thread meanwhile
    std::unique_ptr<SlotPool> p;
    try {
      initial.idle[0].reserve(16);
      initial.idle[1].reserve(16);
      p = std::make_unique<SlotPool>(slot, locks_, std::move(initial), figures_.slot(slot));
    } catch (...) {
      return CKR_HOST_MEMORY;
    }
    full = !slots_.add(registry, p.get());
    if (!full) out = p.release();
  }
  if (full) {
    log_.error("slot {}: more than {} slots in use; no session pool for it", slot, kMaxSlots);
    return CKR_HOST_MEMORY;
  }
  return CKR_OK;
}

SessionPool::ThreadCache* SessionPool::this_thread_cache(bool create) noexcept {
  // One cache per thread, for one pool: with several pools (one per backend
  // port) a thread's cache belongs to the pool that made it last.
  const ThreadCacheFast& fast = this_thread_fast;
  if (fast.cache != nullptr && fast.pool == this && fast.epoch == epoch_) [[likely]]
    return fast.cache;
  if (!create) return nullptr;
  return make_thread_cache();
}

SessionPool::ThreadCache* SessionPool::make_thread_cache() noexcept {
  ThreadCacheOwner& owner = this_thread_owner;
  try {
    auto cache = std::make_unique<ThreadCache>(locks_);
    Locked registry(registry_);
    registry->caches.push_back(cache.get());
    owner.cache = cache.release();
    owner.pool = this;
    owner.gate = &gate_;
    owner.epoch = epoch_;
    this_thread_fast = {owner.cache, this, epoch_};
    return owner.cache;
  } catch (...) {
    return nullptr;  // no cache: the shared pool serves this thread
  }
}

void SessionPool::retire(ThreadCache* cache) noexcept {
  ThreadCache::State left;
  {
    Locked registry(registry_);
    auto& caches = registry->caches;
    caches.erase(std::remove(caches.begin(), caches.end(), cache), caches.end());
    Locked c(cache->state);
    left = std::exchange(*c, ThreadCache::State{});
  }
  this_thread_owner.cache = nullptr;
  this_thread_fast = {};
  delete cache;
  // Slot locks only after the cache lock is released (lock order).
  for (std::size_t i = 0; i < left.count; ++i) {
    auto& e = left.entries[i];
    bool kept = Locked(e.slot->state)->keep(e.rw, e.idle);
    e.slot->signal();
    if (!kept) drop_idle(*e.slot, e.idle.handle, /*dead=*/false);
  }
}

CK_RV SessionPool::backend_open(CK_SLOT_ID slot, bool rw, Notify notify,
                                CK_SESSION_HANDLE& out) noexcept {
  CK_FLAGS flags = CKF_SERIAL_SESSION | (rw ? CKF_RW_SESSION : 0);
  return port_.call<fn::C_OpenSession>(slot, flags, notify.context, notify.callback, &out);
}

void SessionPool::backend_close(CK_SESSION_HANDLE handle) noexcept {
  (void)port_.call<fn::C_CloseSession>(handle);
}

// A C_Logout for the slot's last application session may be under way: a new
// application session is counted only after it (it must not log out a login
// made on the new session).
bool SessionPool::count_app_session(SlotPool& pool, bool rw) noexcept {
  for (;;) {
    std::uint32_t ticket = 0;
    std::optional<Waiter> waiter;
    {
      Locked s(pool.state);
      if (!s->logging_out) {
        if (s->app_sessions >= config_.max_virtual_sessions) return false;
        ++s->app_sessions;
        s->app_read_only += rw ? 0 : 1;
        pool.figures->virtual_sessions.fetch_add(1, std::memory_order_relaxed);
        return true;
      }
      ticket = pool.returns.load(std::memory_order_acquire);
      waiter.emplace(pool);
    }
    timed_wait(pool.returns, ticket, std::chrono::milliseconds(10));
  }
}

bool SessionPool::uncount_app_session(SlotPool& pool, bool rw) noexcept {
  pool.figures->virtual_sessions.fetch_sub(1, std::memory_order_relaxed);
  // The application's last session on the token: the spec logs it out.
  Locked s(pool.state);
  --s->app_sessions;
  s->app_read_only -= rw ? 0 : 1;
  const bool logout = s->app_sessions == 0 && !config_.keep_login;
  if (logout) s->logging_out = true;
  return logout;
}

void SessionPool::logged_out_done(SlotPool& pool) noexcept {
  {
    Locked s(pool.state);
    s->logging_out = false;
    s->so_logged_in = false;
  }
  pool.signal();
  // The calls waiting for this C_Logout (count_app_session: they count as
  // waiters under the lock before they sleep on `returns`).
  if (pool.waiters.load(std::memory_order_seq_cst) != 0) wake_all(pool.returns);
}

CK_RV SessionPool::open(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept {
  return open_notified(slot, rw, nullptr, nullptr, out);
}

CK_RV SessionPool::open_notified(CK_SLOT_ID slot, bool rw, CK_VOID_PTR context, CK_NOTIFY notify,
                                 CK_SESSION_HANDLE& out) noexcept {
  SlotPool* pool = nullptr;
  if (CK_RV rv = slot_pool(slot, pool); rv != CKR_OK) return rv;
  CK_RV rv = take(*pool, rw, Notify{context, notify}, out);
  if (rv == CKR_OK && !count_app_session(*pool, rw)) {
    settle(*pool, rw, out,
           notify != nullptr ? Fate::closed(CloseReason::notify_callback) : Fate::reuse);
    out = CK_INVALID_HANDLE;
    rv = CKR_SESSION_COUNT;  // pool.max_virtual_sessions
  }
  return rv;
}

CK_RV SessionPool::admit(CK_SLOT_ID slot, bool rw) noexcept {
  SlotPool* pool = nullptr;
  if (CK_RV rv = slot_pool(slot, pool); rv != CKR_OK) return rv;
  {
    Locked s(pool->state);
    if (!rw && s->so_logged_in) return CKR_SESSION_READ_WRITE_SO_EXISTS;
  }
  // The backend's own answer when a backend session of this kind is at hand
  // (or may be opened) without waiting: token present, writable...
  CK_SESSION_HANDLE probe = CK_INVALID_HANDLE;
  CK_RV rv = take(*pool, rw, Notify{}, probe, Wait::never, Trade::never);
  if (rv == CKR_OK) {
    settle(*pool, rw, probe, Fate::reuse);
  } else if (rv == CKR_SESSION_COUNT) {
    // Every backend session is in use: then the token's info tells.
    CK_TOKEN_INFO info{};
    rv = port_.call<fn::C_GetTokenInfo>(slot, &info);
    if (rv == CKR_OK && rw && (info.flags & CKF_WRITE_PROTECTED) != 0) {
      rv = CKR_TOKEN_WRITE_PROTECTED;
    }
  }
  if (rv != CKR_OK) return rv;
  if (!count_app_session(*pool, rw)) return CKR_SESSION_COUNT;  // pool.max_virtual_sessions
  return CKR_OK;
}

void SessionPool::leave(CK_SLOT_ID slot, bool rw) noexcept {
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) return;  // cannot happen for a slot that admitted this session
  if (!uncount_app_session(*pool, rw)) return;
  // The token's login ends with the application's last session: on a
  // backend session of the pool, which is idle now (no application session
  // is left to hold one), unless C_Finalize is under way.
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  if (take(*pool, rw, Notify{}, h) == CKR_OK) {
    (void)port_.call<fn::C_Logout>(h);
    settle(*pool, rw, h, Fate::reuse);
  }
  logged_out_done(*pool);
}

void SessionPool::logged_in(CK_SLOT_ID slot, CK_USER_TYPE user, CK_RV rv) noexcept {
  if (rv != CKR_OK || user != CKU_SO) return;
  if (SlotPool* pool = find_slot(slot)) Locked(pool->state)->so_logged_in = true;
}

void SessionPool::logged_out(CK_SLOT_ID slot, CK_RV rv) noexcept {
  if (rv != CKR_OK && rv != CKR_USER_NOT_LOGGED_IN) return;
  if (SlotPool* pool = find_slot(slot)) Locked(pool->state)->so_logged_in = false;
}

CK_RV SessionPool::may_log_in_so(CK_SLOT_ID slot) noexcept {
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) return CKR_OK;
  return Locked(pool->state)->app_read_only > 0 ? CKR_SESSION_READ_ONLY_EXISTS : CKR_OK;
}

SessionPool::AppSessions SessionPool::app_sessions(CK_SLOT_ID slot) noexcept {
  AppSessions n;
  if (SlotPool* pool = find_slot(slot)) {
    Locked s(pool->state);
    n.all = s->app_sessions;
    n.read_write = s->app_sessions - s->app_read_only;
  }
  return n;
}

inline bool SessionPool::take_cached(SlotPool& pool, bool rw, CK_SESSION_HANDLE& out) noexcept {
  ThreadCache* cache = this_thread_cache(false);
  if (cache == nullptr) return false;
  Stale stale;
  bool found;
  {
    Locked c(cache->state);
    found = c->pop(pool, pool.generation.load(std::memory_order_acquire), rw, out, stale);
  }
  if (stale.count != 0) [[unlikely]]
    drop_stale(pool, stale);
  if (found) pool.lent_idle();
  return found;
}

inline bool SessionPool::give_cached(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle) noexcept {
  // With waiters, the shared pool is where they look.
  if (pool.waiters.load(std::memory_order_seq_cst) != 0) return false;
  ThreadCache* cache = this_thread_cache(true);
  if (cache == nullptr) return false;
  Idle idle{handle, pool.generation.load(std::memory_order_acquire), Clock::now()};
  if (!Locked(cache->state)->push(ThreadCache::Entry{&pool, rw, idle})) return false;
  pool.figures->idle.add(1);
  // A thread that began to wait after the look above may have searched
  // this cache before the session was in it: it counted itself as a
  // waiter before searching (take), so it is seen here, and woken to
  // search again.
  if (pool.waiters.load(std::memory_order_seq_cst) != 0) [[unlikely]]
    pool.signal();
  return true;
}

// borrow() and give() are the per-call cost of [pool] bind = state: this
// thread's cache first, without take()'s and give_back()'s set-up for the
// shared pool and its queue (README, "What bind = state costs").
CK_RV SessionPool::borrow(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out, Wait wait) noexcept {
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) [[unlikely]] {
    if (CK_RV rv = slot_pool(slot, pool); rv != CKR_OK) return rv;
  }
  if (take_cached(*pool, rw, out)) [[likely]]
    return CKR_OK;
  return take(*pool, rw, Notify{}, out, wait);
}

void SessionPool::give(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept {
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) [[unlikely]] {  // cannot happen for a slot that lent this session
    backend_close(handle);
    return;
  }
  if (fate == Fate::reuse && give_cached(*pool, rw, handle)) [[likely]] {
    pool->figures->in_use.add(-1);
    return;
  }
  settle(*pool, rw, handle, fate);
}

bool SessionPool::borrow_cached(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept {
  SlotPool* pool = find_slot(slot);
  return pool != nullptr && take_cached(*pool, rw, out);
}

void SessionPool::settle(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept {
  pool.figures->in_use.add(-1);
  if (fate == Fate::reuse) {
    give_back(pool, rw, handle);
  } else {
    discard(pool, rw, handle, fate);
  }
}

// Pooled sessions are reused unless the session must be the caller's own
// (`notify`: opened with the application's callback). At the limit, idle
// sessions of the other kind, or any idle one for an own session, are closed
// to make room; failing that the caller waits for a session to come back,
// in turn (Place): first come, first served.
CK_RV SessionPool::take(SlotPool& pool, bool rw, Notify notify, CK_SESSION_HANDLE& out, Wait wait,
                        Trade trade) noexcept {
  const bool reuse = notify.callback == nullptr;
  if (reuse && take_cached(pool, rw, out)) return CKR_OK;
  const auto started = Clock::now();
  const auto deadline =
      started + std::chrono::milliseconds(wait == Wait::never ? 0 : config_.wait_ms);
  bool waited = false, looked_again = false;
  std::vector<CK_SESSION_HANDLE> stale_shared;
  // Outside every lock (its destructor takes the slot's lock).
  Place place(pool);
  // The time this call waited, in the histogram, however it ends.
  struct WaitRecord {
    SlotPool& pool;
    const bool& waited;
    Clock::time_point started;
    ~WaitRecord() {
      if (waited) pool.figures->record_wait(Clock::now() - started);
    }
  } record{pool, waited, started};
  for (;;) {
    enum { reused, reserved, full } outcome = full;
    bool probe = false;
    CK_SESSION_HANDLE victim = CK_INVALID_HANDLE;
    std::uint32_t ticket = 0, word = 0;
    auto now = Clock::now();
    // When to look again for a probe of a learned limit: the prober only.
    Clock::time_point next_probe = Clock::time_point::max();
    bool my_turn = false;
    {
      Wakeup wake;  // after the lock: the next in line, once this call is served
      Locked s(pool.state);
      ticket = pool.returns.load(std::memory_order_acquire);
      my_turn = place.turn(*s);
      // Others wait before us: no barging in. In line at once (one lock
      // round trip less); woken when it is our turn.
      if (!my_turn && now < deadline) place.join(*s);
      word = place.ticket();
      try {
        if (!my_turn) {
          // Nothing to take before those before us.
        } else if (reuse &&
                   s->pop(pool.generation.load(std::memory_order_acquire), rw, out, stale_shared)) {
          outcome = reused;
        } else if (s->has_room(rw) || (probe = s->may_probe(rw, now))) {
          ++s->open[rw];
          ++s->opening;
          s->probing = probe;
          outcome = reserved;
        } else if (trade == Trade::idle && s->kind_has_room(rw) && s->may_close_idle()) {
          // At the limit with an idle session in the way (of the other kind,
          // or any for an own session): trade it in.
          for (bool kind : {!rw, rw}) {
            if ((kind == rw && reuse) || s->idle[kind].empty()) continue;
            victim = s->idle[kind].back().handle;
            s->idle[kind].pop_back();
            --s->open[kind];
            ++s->open[rw];
            ++s->opening;
            outcome = reserved;
            break;
          }
        }
      } catch (...) {
        return CKR_HOST_MEMORY;
      }
      // Served once it has a session (the next in line is woken): a
      // reservation may still be refused.
      if (outcome == reused) place.served(*s, s->more_for_next(), wake);
      // The prober woke for a probe: the head makes it (only the head may
      // take a session, and a probe that succeeds gives one).
      if (!my_turn && s->prober == &place && s->probe_due(now)) wake.add(s->wake_head());
      next_probe = s->probe_time(&place, now);
    }
    // Stale: given back before the device said a session was gone. Counted
    // as open until closed.
    if (!stale_shared.empty()) [[unlikely]] {
      for (CK_SESSION_HANDLE h : stale_shared) drop_idle(pool, h, /*dead=*/true);
      Locked(pool.state)->open[rw] -= stale_shared.size();
      pool.signal();
      stale_shared.clear();
    }
    if (victim != CK_INVALID_HANDLE) drop_idle(pool, victim, /*dead=*/false);
    if (outcome == reused) {
      pool.lent_idle();
      return CKR_OK;
    }
    if (outcome == reserved) {
      CK_RV rv = backend_open(pool.id, rw, notify, out);
      bool learned = false, retry = false;
      unsigned long open_now = 0;
      {
        Wakeup wake;  // after the lock
        Locked s(pool.state);
        --s->opening;
        if (rv == CKR_OK) {
          s->refusals = 0;
          if (probe) s->probe_succeeded();
          place.served(*s, s->more_for_next(), wake);
        } else {
          --s->open[rw];
          if (rv == CKR_SESSION_COUNT) {
            open_now = s->open_total();
            if (s->refused(open_now, probe, Clock::now())) {
              retry = true;  // once more at once: it may have been transient
            } else {
              // The token's limit, for now, is what is open: wait for one.
              learned = true;
              retry = open_now > 0;
              // A prober asleep since before the limit was learned sleeps
              // until its deadline: it is to sleep until the probe now.
              if (!probe && s->prober != &place && s->prober != nullptr) {
                wake.add(s->prober->wake());
              }
            }
          }
        }
        if (probe) s->probing = false;
      }
      if (rv == CKR_OK) {
        pool.lent_new();
        return CKR_OK;
      }
      pool.signal();  // the reservation is free again
      if (learned) {
        log_.info("slot {}: backend refused a session at {} open; limit {} for now", pool.id,
                  open_now, std::max<unsigned long>(open_now, 1));
      }
      if (!retry) return rv;
      continue;  // the limit is now known: wait below on the next round
    }
    // At the limit. A waiter from here on, before the threads' caches are
    // searched: a session given back to a cache after the search sees the
    // count and signals (give_back), so the sleep below ends at once.
    Waiter waiter(pool);
    if (my_turn) {
      if (reuse && steal(pool, rw, out)) {
        // Other threads' caches may hold more: the next in line looks too.
        if (place.queued()) {
          Wakeup wake;
          place.served(*Locked(pool.state), /*more=*/true, wake);
        }
        pool.lent_idle();
        return CKR_OK;
      }
      // At the limit with an idle session in some thread's cache that is in
      // the way: close it and open one of this kind (or our own) in its place.
      CK_SESSION_HANDLE other = CK_INVALID_HANDLE;
      bool other_rw = !rw;
      if (trade == Trade::idle &&
          (steal(pool, !rw, other) || (!reuse && steal(pool, other_rw = rw, other)))) {
        bool traded = false, close_it = false;
        {
          Locked s(pool.state);
          if (s->may_close_idle()) {
            traded = true;
            --s->open[other_rw];
            ++s->open[rw];
            ++s->opening;
          } else {
            // The token's last established session: back to the shared
            // pool (no memory for that: closed after all, not counted).
            Idle back{other, pool.generation.load(std::memory_order_acquire), Clock::now()};
            close_it = !s->keep(other_rw, back);
          }
        }
        if (!traded) {
          if (close_it) drop_idle(pool, other, /*dead=*/false);
          pool.signal();
        } else {
          drop_idle(pool, other, /*dead=*/false);
          CK_RV rv = backend_open(pool.id, rw, notify, out);
          {
            Wakeup wake;  // after the lock
            Locked s(pool.state);
            --s->opening;
            if (rv == CKR_OK) {
              place.served(*s, /*more=*/true, wake);  // as after a steal
            } else {
              --s->open[rw];
            }
          }
          pool.signal();
          if (rv == CKR_OK) {
            pool.lent_new();
            return CKR_OK;
          }
          continue;
        }
      }
    }
    now = Clock::now();
    if (now >= deadline) {
      // Room made since this round looked (stale sessions closed on the way,
      // a session given back): one more round, however short wait_ms is.
      if (pool.returns.load(std::memory_order_acquire) == ticket ||
          std::exchange(looked_again, true)) {
        return CKR_SESSION_COUNT;
      }
      continue;
    }
    // In line from now on. Room made since this round looked, before the
    // place counted in `queued`, woke nobody: look again (in line now).
    if (!place.queued()) {
      Locked s(pool.state);
      place.join(*s);
      if (pool.returns.load(std::memory_order_seq_cst) != ticket) continue;
      word = place.ticket();
      next_probe = s->probe_time(&place, now);
    }
    if (!std::exchange(waited, true)) pool.figures->waits.fetch_add(1, std::memory_order_relaxed);
    // The prober wakes for the probe of a learned limit too (State::prober).
    auto until = std::min(deadline, next_probe);
    // Parked while asleep: fork() does not wait for us, and we wait for
    // fork() before going on. Read after the ticket: interrupt_waiters()
    // sets interrupted_, then bumps the ticket.
    gate_.park();
    bool interrupted = interrupted_.load(std::memory_order_seq_cst);
    if (!interrupted) {
      place.sleep(word, std::max<Clock::duration>(until - now, std::chrono::milliseconds(1)));
    }
    gate_.unpark();
    // C_Finalize: give up at once, whatever the deadline.
    if (interrupted || interrupted_.load(std::memory_order_seq_cst)) {
      return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    auto slept = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - now);
    pool.figures->wait_ns.fetch_add(static_cast<std::uint64_t>(slept.count()),
                                    std::memory_order_relaxed);
  }
}

void SessionPool::interrupt_waiters() noexcept {
  interrupted_.store(true, std::memory_order_seq_cst);
  // Under the registry lock: a slot pool created meanwhile is either seen
  // here or its waiters see interrupted_.
  walk(
      nullptr,
      [](SlotPool& pool, SlotPool::State& s) {
        pool.returns.fetch_add(1, std::memory_order_seq_cst);
        wake_all(pool.returns);  // calls waiting for a C_Logout (count_app_session)
        s.wake_queue();
      },
      nullptr);
}

// At the limit, idle sessions in other threads' caches are as good as the
// pool's own: never wait while one sits unused. Stale ones met on the way
// are closed.
bool SessionPool::steal(SlotPool& pool, bool rw, CK_SESSION_HANDLE& out) noexcept {
  for (;;) {
    Stale stale;
    bool found = false;
    const std::uint64_t gen = pool.generation.load(std::memory_order_acquire);
    walk(
        &pool, [](SlotPool&, SlotPool::State&) {},
        [&](SlotPool&, SlotPool::State&, ThreadCache::State& cache) {
          found = cache.pop(pool, gen, rw, out, stale);
          return !found && stale.count == 0;
        });
    if (stale.count == 0) return found;
    drop_stale(pool, stale);  // outside the locks; then look again
    if (found) return true;
  }
}

void SessionPool::drop_stale(SlotPool& pool, const Stale& stale) noexcept {
  for (std::size_t i = 0; i < stale.count; ++i) {
    drop_idle(pool, stale.entries[i].handle, /*dead=*/true);
  }
  Locked(pool.state)->forget(stale);
  pool.signal();
}

void SessionPool::close(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept {
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) {  // cannot happen for a slot that opened this session
    backend_close(handle);
    return;
  }
  if (uncount_app_session(*pool, rw)) {
    // An abandoned session's token does not answer: no logout there.
    if (fate != Fate::abandon) (void)port_.call<fn::C_Logout>(handle);
    logged_out_done(*pool);
  }
  settle(*pool, rw, handle, fate);
}

void SessionPool::give_back(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle) noexcept {
  if (give_cached(pool, rw, handle)) return;
  Idle idle{handle, pool.generation.load(std::memory_order_acquire), Clock::now()};
  bool kept = false;
  {
    Wakeup wake;  // after the lock
    Locked s(pool.state);
    kept = s->keep(rw, idle);
    pool.signal(*s, wake);  // the head of the queue, if any, takes it
  }
  if (kept) {
    pool.figures->idle.add(1);
    return;
  }
  pool.closed(1, false);
  backend_close(handle);
}

void SessionPool::discard(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept {
  if (fate == Fate::abandon) {
    try {
      Locked(pool.state)->abandoned.emplace_back(handle, rw);
      return;
    } catch (const std::bad_alloc&) {
      // Not kept: forgotten (counted closed), never closed on the backend.
      pool.closed(1, false);
      Locked(pool.state)->open[rw] -= 1;
      pool.signal();
      return;
    }
  }
  backend_close(handle);
  pool.closed(1, false);
  if (fate == Fate::dead) {
    pool.figures->discarded_dead.fetch_add(1, std::memory_order_relaxed);
  } else {
    auto& counter = pool.figures->unclean[static_cast<std::size_t>(fate.why)];
    counter.fetch_add(1, std::memory_order_relaxed);
  }
  Locked(pool.state)->open[rw] -= 1;
  pool.signal();
}

void SessionPool::close_abandoned(CK_SLOT_ID slot) noexcept {
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) return;
  std::vector<std::pair<CK_SESSION_HANDLE, bool>> abandoned;
  std::swap(abandoned, Locked(pool->state)->abandoned);
  for (const auto& [handle, rw] : abandoned) {
    backend_close(handle);
    pool->closed(1, false);
    pool->figures->discarded_dead.fetch_add(1, std::memory_order_relaxed);
    Locked(pool->state)->open[rw] -= 1;
    pool->signal();
  }
}

// Closes a session taken off the idle lists (the caller adjusts the count).
void SessionPool::drop_idle(SlotPool& pool, CK_SESSION_HANDLE handle, bool dead) noexcept {
  backend_close(handle);
  pool.closed(1, true);
  if (dead) pool.figures->discarded_dead.fetch_add(1, std::memory_order_relaxed);
}

template <class OnSlot, class OnCache>
void SessionPool::walk(SlotPool* only, OnSlot on_slot, OnCache on_cache) {
  Locked registry(registry_);
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    SlotPool* pool = slots_[i];
    if (only != nullptr && pool != only) continue;
    Locked slot(pool->state);
    on_slot(*pool, *slot);
    if constexpr (!std::is_null_pointer_v<OnCache>) {
      for (ThreadCache* cache : registry->caches) {
        Locked c(cache->state);
        if (!on_cache(*pool, *slot, *c)) return;
      }
    }
  }
}

template <class Pick>
void SessionPool::sweep(SlotPool* only, Pick pick, std::vector<Taken>& out) noexcept {
  try {
    walk(
        only,
        [&](SlotPool& pool, SlotPool::State& s) {
          for (bool rw : {false, true}) {
            auto& list = s.idle[rw];
            out.reserve(out.size() + list.size());
            auto keep = std::partition(list.begin(), list.end(),
                                       [&](const Idle& idle) { return !pick(rw, idle); });
            for (auto it = keep; it != list.end(); ++it) out.push_back(Taken{&pool, rw, *it});
            list.erase(keep, list.end());
          }
        },
        [&](SlotPool& pool, SlotPool::State&, ThreadCache::State& cache) {
          out.reserve(out.size() + cache.count);
          cache.take_if(pool, pick, [&](bool rw, const Idle& idle) {
            out.push_back(Taken{&pool, rw, idle});
          });
          return true;
        });
  } catch (...) {
    // Out of memory listing them: what was not taken stays where it was.
  }
}

void SessionPool::close_taken(const std::vector<Taken>& doomed) noexcept {
  for (const Taken& t : doomed) {
    drop_idle(*t.pool, t.idle.handle, /*dead=*/false);
    Locked(t.pool->state)->open[t.rw] -= 1;
    t.pool->signal();
  }
}

// A token on which the application still has sessions keeps one backend
// session open: closing the last would log the token out and (SoftHSM2)
// renumber its objects (docs/pkcs11-facts.md, "Object handles"). With
// [pool] bind = state the application's sessions may hold none.
void SessionPool::spare_last(std::vector<Taken>& doomed) noexcept {
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    SlotPool* pool = slots_[i];
    auto mine = [pool](const Taken& t) { return t.pool == pool; };
    const auto taken =
        static_cast<unsigned long>(std::count_if(doomed.begin(), doomed.end(), mine));
    if (taken == 0) continue;
    bool kept_one = false;
    {
      Locked s(pool->state);
      if (s->app_sessions == 0 || s->open_total() - s->opening > taken) continue;
      auto kept = std::find_if(doomed.begin(), doomed.end(), mine);
      kept_one = s->keep(kept->rw, kept->idle);
      if (kept_one) {
        doomed.erase(kept);
      } else {
        ++s->open[kept->rw];  // keep() stopped counting it; close_taken() does that
      }
    }
    // Idle again: a call that came to the limit after the sweep took it
    // (and found nothing to take) waits in line; nothing else would wake it
    // (when this was the only one taken, none is closed, so close_taken
    // signals nothing), and it would wait out pool.wait_ms.
    if (kept_one) pool->signal();
  }
}

void SessionPool::invalidate(CK_SLOT_ID slot) noexcept {
  if (SlotPool* pool = find_slot(slot)) {
    pool->generation.fetch_add(1, std::memory_order_acq_rel);
  }
}

bool SessionPool::drain_idle(CK_SLOT_ID slot, bool read_only_only) noexcept {
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) return false;
  {
    Locked s(pool->state);
    bool app_has = read_only_only ? s->app_read_only > 0 : s->app_sessions > 0;
    if (app_has) return false;
  }
  std::vector<Taken> doomed;
  sweep(
      pool, [&](bool rw, const Idle&) { return !(rw && read_only_only); }, doomed);
  close_taken(doomed);
  return !doomed.empty();
}

// Walks the backend's slot list, not the pool's parts: prewarm makes them.
void SessionPool::prewarm() noexcept {
  if (config_.prewarm == 0) return;
  std::vector<CK_SLOT_ID> slots;
  CK_ULONG count = 64;
  try {
    slots.resize(count);
  } catch (...) {
    return;
  }
  if (port_.call<fn::C_GetSlotList>(CK_BBOOL{CK_TRUE}, slots.data(), &count) != CKR_OK) return;
  slots.resize(std::min<CK_ULONG>(count, slots.size()));
  for (CK_SLOT_ID slot : slots) {
    // A token that is not initialized yet cannot open sessions: not a
    // problem worth a warning at every C_Initialize.
    CK_TOKEN_INFO info{};
    if (port_.call<fn::C_GetTokenInfo>(slot, &info) == CKR_OK &&
        (info.flags & CKF_TOKEN_INITIALIZED) == 0) {
      log_.debug("slot {}: token not initialized; not prewarmed", slot);
      continue;
    }
    SlotPool* pool = nullptr;
    if (slot_pool(slot, pool) != CKR_OK) continue;
    for (unsigned long i = 0; i < config_.prewarm; ++i) {
      {
        Locked s(pool->state);
        if (!s->has_room(false)) break;
        ++s->open[0];
      }
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (CK_RV rv = backend_open(slot, false, Notify{}, h); rv != CKR_OK) {
        Locked(pool->state)->open[0] -= 1;
        pool->signal();
        log_.warn("slot {}: prewarm stopped at {} sessions: {}", slot, i, rv_name(rv));
        break;
      }
      pool->figures->open.fetch_add(1, std::memory_order_relaxed);
      Idle idle{h, pool->generation.load(std::memory_order_acquire), Clock::now()};
      bool kept = Locked(pool->state)->keep(false, idle);
      pool->signal();
      if (!kept) {
        pool->closed(1, false);
        backend_close(h);
        break;
      }
      pool->figures->idle.add(1);
    }
  }
}

void SessionPool::close_all() noexcept {
  std::vector<Taken> doomed;
  sweep(
      nullptr, [](bool, const Idle&) { return true; }, doomed);
  close_taken(doomed);
}

void SessionPool::close_all(const std::function<bool(CK_SLOT_ID)>& may_call) noexcept {
  std::vector<Taken> doomed;
  sweep(
      nullptr, [](bool, const Idle&) { return true; }, doomed);
  for (const Taken& t : doomed) {
    if (may_call(t.pool->id)) {
      drop_idle(*t.pool, t.idle.handle, /*dead=*/false);
    } else {
      t.pool->closed(1, true);
    }
    Locked(t.pool->state)->open[t.rw] -= 1;
    t.pool->signal();
  }
}

// Idle sessions in the pools and in threads' caches alike: those idle longer
// than `idle_limit` are closed, those idle longer than `keepalive` are asked
// for their info (a round trip that keeps them alive in the HSM); one that
// fails is closed and counted dead.
void SessionPool::maintain(std::chrono::seconds idle_limit,
                           std::chrono::seconds keepalive) noexcept {
  tend(nullptr, idle_limit, keepalive, nullptr);
}

void SessionPool::maintain(CK_SLOT_ID slot, std::chrono::seconds idle_limit,
                           std::chrono::seconds keepalive, SlotCalls& calls) noexcept {
  if (SlotPool* pool = find_slot(slot)) tend(pool, idle_limit, keepalive, &calls);
}

void SessionPool::put_back(std::span<const Taken> left) noexcept {
  for (const Taken& t : left) {
    const bool kept = Locked(t.pool->state)->keep(t.rw, t.idle);
    t.pool->signal();
    // No memory to keep it, nor to close it (its token is not to be called):
    // forgotten, counted closed.
    if (!kept) t.pool->closed(1, true);
  }
}

void SessionPool::tend(SlotPool* only, std::chrono::seconds idle_limit,
                       std::chrono::seconds keepalive, SlotCalls* calls) noexcept {
  // The maintenance thread's backend calls are calls like any other: fork()
  // and C_Finalize wait for them.
  GateAccess::Background call(gate_);
  if (call.epoch() != epoch_) return;
  const auto now = Clock::now();
  auto older_than = [&](std::chrono::seconds limit, const Idle& idle) {
    return limit.count() > 0 && now - idle.since > limit;
  };
  // One call on a taken session, through `calls`; nullopt when its token is
  // not to be called now.
  auto ask = [calls](auto&& backend_call) noexcept -> std::optional<CK_RV> {
    if (calls != nullptr && !calls->begin()) return std::nullopt;
    const CK_RV rv = backend_call();
    if (calls != nullptr) calls->end(rv);
    return rv;
  };
  std::vector<Taken> expired, aged;
  sweep(
      only, [&](bool, const Idle& idle) { return older_than(idle_limit, idle); }, expired);
  spare_last(expired);
  for (std::size_t i = 0; i < expired.size(); ++i) {
    const Taken& t = expired[i];
    if (!ask([&] { return port_.call<fn::C_CloseSession>(t.idle.handle); })) {
      put_back(std::span(expired).subspan(i));
      return;
    }
    t.pool->closed(1, true);
    Locked(t.pool->state)->open[t.rw] -= 1;
    t.pool->signal();
  }
  // Still counted as open while pinged: the limit holds throughout.
  sweep(
      only, [&](bool, const Idle& idle) { return older_than(keepalive, idle); }, aged);
  for (std::size_t i = 0; i < aged.size(); ++i) {
    Taken& t = aged[i];
    CK_SESSION_INFO info{};
    const std::optional<CK_RV> rv =
        ask([&] { return port_.call<fn::C_GetSessionInfo>(t.idle.handle, &info); });
    if (!rv) {
      put_back(std::span(aged).subspan(i));
      return;
    }
    if (*rv != CKR_OK) {
      // Gone inside the HSM: closed all the same, then no longer counted; or,
      // its token not to be called any more (the answer took the member
      // down), left to close_abandoned().
      if (ask([&] { return port_.call<fn::C_CloseSession>(t.idle.handle); })) {
        t.pool->closed(1, true);
        t.pool->figures->discarded_dead.fetch_add(1, std::memory_order_relaxed);
        Locked(t.pool->state)->open[t.rw] -= 1;
        t.pool->signal();
      } else {
        t.pool->figures->idle.add(-1);
        discard(*t.pool, t.rw, t.idle.handle, Fate::abandon);
      }
      continue;
    }
    t.idle.since = Clock::now();
    bool kept = Locked(t.pool->state)->keep(t.rw, t.idle);
    t.pool->signal();
    if (!kept) drop_idle(*t.pool, t.idle.handle, /*dead=*/false);  // no memory to keep it
  }
}

SessionPool::SlotFigures SessionPool::figures(CK_SLOT_ID slot) noexcept {
  SlotFigures f;
  SlotPool* pool = find_slot(slot);
  if (pool == nullptr) return f;
  walk(
      pool,
      [&](SlotPool&, SlotPool::State& s) {
        f.open = s.open_total();
        f.idle = s.idle[0].size() + s.idle[1].size();
        f.limit = s.limit;
      },
      [&](SlotPool&, SlotPool::State&, ThreadCache::State& cache) {
        for (std::size_t i = 0; i < cache.count; ++i) f.idle += cache.entries[i].slot == pool;
        return true;
      });
  return f;
}

}  // namespace p11mux
