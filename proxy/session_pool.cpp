#include "session_pool.hpp"

#include "module.hpp"

#include <p11mux/rv_names.hpp>

#include <algorithm>
#include <limits>
#include <utility>

namespace p11mux {

namespace {

constexpr unsigned long kUnlimited = std::numeric_limits<unsigned long>::max();
constexpr std::size_t kThreadCacheSize = 8;

// CK_UNAVAILABLE_INFORMATION and CK_EFFECTIVELY_INFINITE both mean "no known limit".
unsigned long token_limit(CK_ULONG reported) noexcept {
  return reported == CK_UNAVAILABLE_INFORMATION || reported == CK_EFFECTIVELY_INFINITE
             ? kUnlimited
             : reported;
}

struct Idle {
  CK_SESSION_HANDLE handle;
  std::uint64_t generation;  // the slot's generation when it was given back
  SessionPool::Clock::time_point since;
};

}  // namespace

class SessionPool::SlotPool {
 public:
  SlotPool(CK_SLOT_ID slot_id, const LockSource& locks, SlotPoolMetrics* reported)
      : id(slot_id), lock(locks), figures(reported != nullptr ? reported : &unreported) {}

  const CK_SLOT_ID id;
  Mutex lock;
  // Guarded by lock.
  std::vector<Idle> idle[2];        // [rw]
  unsigned long open[2] = {0, 0};   // backend sessions open or being opened, [rw]
  unsigned long app_sessions = 0;   // the application's virtual sessions on this slot
  unsigned long app_read_only = 0;  // ... of which read-only
  unsigned long limit = kUnlimited, rw_limit = kUnlimited;

  std::atomic<std::uint64_t> generation{0};  // bumped when the device may have restarted
  std::atomic<std::uint32_t> returns{0};     // futex word: bumped whenever room appears
  std::atomic<std::uint32_t> waiters{0};

  // For /metrics: the registry's figures, or `unreported` if it had no memory.
  SlotPoolMetrics unreported;
  SlotPoolMetrics* const figures;
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

  unsigned long open_total() const noexcept { return open[0] + open[1]; }
  bool has_room(bool rw) const noexcept {
    return open_total() < limit && (!rw || open[1] < rw_limit);
  }
  void signal() noexcept {
    returns.fetch_add(1, std::memory_order_release);
    if (waiters.load(std::memory_order_acquire) != 0) wake_all(returns);
  }
  // Pops an idle session of this kind and generation; stale ones go to `stale`.
  bool pop(bool rw, CK_SESSION_HANDLE& out, std::vector<CK_SESSION_HANDLE>& stale) {
    std::uint64_t gen = generation.load(std::memory_order_acquire);
    auto& list = idle[rw];
    while (!list.empty()) {
      Idle entry = list.back();
      list.pop_back();
      if (entry.generation == gen) {
        out = entry.handle;
        return true;
      }
      --open[rw];
      stale.push_back(entry.handle);
    }
    return false;
  }
};

// A thread's few idle sessions; its lock is uncontended except when another
// thread steals from it or the pool drains it.
class SessionPool::ThreadCache {
 public:
  explicit ThreadCache(const LockSource& locks) : lock(locks) {}
  struct Entry {
    SlotPool* slot;
    bool rw;
    Idle idle;
  };
  Mutex lock;
  std::array<Entry, kThreadCacheSize> entries{};
  std::size_t count = 0;

  bool pop(SlotPool& slot, bool rw, CK_SESSION_HANDLE& out) noexcept {
    std::uint64_t gen = slot.generation.load(std::memory_order_acquire);
    for (std::size_t i = count; i-- > 0;) {
      if (entries[i].slot == &slot && entries[i].rw == rw && entries[i].idle.generation == gen) {
        out = entries[i].idle.handle;
        entries[i] = entries[--count];
        return true;
      }
    }
    return false;
  }
};

// This thread's cache, tagged with the pool's epoch: a cache of an earlier
// initialization (or of the parent process) is never touched. At thread exit
// the cached sessions go back to the shared pool.
struct ThreadCacheOwner {
  SessionPool::ThreadCache* cache = nullptr;
  std::uint64_t epoch = 0;

  ~ThreadCacheOwner() {
    if (cache == nullptr) return;
    Module::Call call(the_module);
    if (Runtime* rt = call.runtime(); rt != nullptr && rt->pool().epoch() == epoch) {
      rt->pool().retire(cache);
    }
    // Otherwise the pool that owned the cache has already freed it.
  }
};

namespace {
thread_local ThreadCacheOwner this_thread_owner;
}  // namespace

SessionPool::SessionPool(Backend backend, const Config::Pool& config, const LockSource& locks,
                         std::uint64_t epoch, spdlog::logger& log, PoolMetricsRegistry& figures)
    : backend_(backend), config_(config), locks_(locks), epoch_(epoch), log_(log),
      figures_(figures), registry_lock_(locks) {}

SessionPool::~SessionPool() {
  close_all();
  for (ThreadCache* c : caches_) delete c;
  for (auto& s : slots_) delete s.load(std::memory_order_relaxed);
}

SessionPool::SlotPool* SessionPool::slot_pool(CK_SLOT_ID slot) noexcept {
  std::size_t n = slot_count_.load(std::memory_order_acquire);
  for (std::size_t i = 0; i < n; ++i) {
    SlotPool* p = slots_[i].load(std::memory_order_acquire);
    if (p->id == slot) return p;
  }
  // First use of this slot: learn its limits from the token (outside the registry lock).
  CK_TOKEN_INFO info{};
  CK_RV info_rv = CKR_FUNCTION_NOT_SUPPORTED;
  if (backend_.functions.C_GetTokenInfo != nullptr) {
    OptionalGuard serial(backend_.lock);
    info_rv = backend_.functions.C_GetTokenInfo(slot, &info);
  }
  MutexGuard guard(registry_lock_);
  n = slot_count_.load(std::memory_order_relaxed);
  for (std::size_t i = 0; i < n; ++i) {
    SlotPool* p = slots_[i].load(std::memory_order_relaxed);
    if (p->id == slot) return p;
  }
  if (n == kMaxSlots) return nullptr;
  SlotPool* p = nullptr;
  try {
    p = new SlotPool(slot, locks_, figures_.slot(slot));
    p->idle[0].reserve(16);
    p->idle[1].reserve(16);
  } catch (...) {
    delete p;
    return nullptr;
  }
  if (info_rv == CKR_OK) {
    p->limit = token_limit(info.ulMaxSessionCount);
    p->rw_limit = token_limit(info.ulMaxRwSessionCount);
  }
  if (config_.max_sessions) p->limit = std::max<unsigned long>(*config_.max_sessions, 1);
  p->rw_limit = std::min(p->rw_limit, p->limit);
  slots_[n].store(p, std::memory_order_release);
  slot_count_.store(n + 1, std::memory_order_release);
  return p;
}

SessionPool::ThreadCache* SessionPool::this_thread_cache(bool create) noexcept {
  ThreadCacheOwner& owner = this_thread_owner;
  if (owner.cache != nullptr && owner.epoch == epoch_) return owner.cache;
  if (!create) return nullptr;
  try {
    auto cache = std::make_unique<ThreadCache>(locks_);
    MutexGuard guard(registry_lock_);
    caches_.push_back(cache.get());
    owner.cache = cache.release();
    owner.epoch = epoch_;
    return owner.cache;
  } catch (...) {
    return nullptr;  // no cache: the shared pool serves this thread
  }
}

void SessionPool::retire(ThreadCache* cache) noexcept {
  std::array<ThreadCache::Entry, kThreadCacheSize> entries;
  std::size_t count = 0;
  {
    MutexGuard registry(registry_lock_);
    caches_.erase(std::remove(caches_.begin(), caches_.end(), cache), caches_.end());
    MutexGuard guard(cache->lock);
    entries = cache->entries;
    count = std::exchange(cache->count, 0);
  }
  this_thread_owner.cache = nullptr;
  delete cache;
  // Slot locks only after the cache lock is released (lock order).
  for (std::size_t i = 0; i < count; ++i) {
    auto& e = entries[i];
    MutexGuard guard(e.slot->lock);
    try {
      e.slot->idle[e.rw].push_back(e.idle);
    } catch (...) {
      --e.slot->open[e.rw];  // cannot keep it: close it
      e.slot->closed(1, true);
      OptionalGuard serial(backend_.lock);
      (void)backend_.functions.C_CloseSession(e.idle.handle);
    }
    e.slot->signal();
  }
}

CK_RV SessionPool::backend_open(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept {
  OptionalGuard serial(backend_.lock);
  CK_FLAGS flags = CKF_SERIAL_SESSION | (rw ? CKF_RW_SESSION : 0);
  return backend_.functions.C_OpenSession(slot, flags, nullptr, nullptr, &out);
}

void SessionPool::backend_close(CK_SESSION_HANDLE handle) noexcept {
  OptionalGuard serial(backend_.lock);
  (void)backend_.functions.C_CloseSession(handle);
}

CK_RV SessionPool::open(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept {
  SlotPool* pool = slot_pool(slot);
  if (pool == nullptr) return CKR_HOST_MEMORY;
  CK_RV rv = take(*pool, rw, out);
  if (rv == CKR_OK) {
    MutexGuard guard(pool->lock);
    ++pool->app_sessions;
    pool->app_read_only += rw ? 0 : 1;
  }
  return rv;
}

CK_RV SessionPool::borrow(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE& out) noexcept {
  SlotPool* pool = slot_pool(slot);
  return pool == nullptr ? CKR_HOST_MEMORY : take(*pool, rw, out);
}

void SessionPool::give(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept {
  SlotPool* pool = slot_pool(slot);
  if (pool == nullptr) {  // cannot happen for a slot that lent this session
    backend_close(handle);
    return;
  }
  settle(*pool, rw, handle, fate);
}

void SessionPool::settle(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept {
  pool.figures->in_use.add(-1);
  if (fate == Fate::reuse) {
    give_back(pool, rw, handle);
  } else {
    discard(pool, rw, handle, fate == Fate::dead);
  }
}

void SessionPool::adopt(CK_SLOT_ID slot, bool rw) noexcept {
  if (SlotPool* pool = slot_pool(slot)) {
    MutexGuard guard(pool->lock);
    ++pool->open[rw];
    ++pool->app_sessions;
    pool->app_read_only += rw ? 0 : 1;
    pool->lent_new();
  }
}

CK_RV SessionPool::take(SlotPool& pool, bool rw, CK_SESSION_HANDLE& out) noexcept {
  if (ThreadCache* cache = this_thread_cache(false)) {
    MutexGuard guard(cache->lock);
    if (cache->pop(pool, rw, out)) {
      pool.lent_idle();
      return CKR_OK;
    }
  }
  auto deadline = Clock::now() + std::chrono::milliseconds(config_.wait_ms);
  bool waited = false;
  std::vector<CK_SESSION_HANDLE> stale;
  for (;;) {
    enum { reused, reserved, replace_other, full } outcome = full;
    CK_SESSION_HANDLE victim = CK_INVALID_HANDLE;
    std::uint32_t ticket = 0;
    {
      MutexGuard guard(pool.lock);
      ticket = pool.returns.load(std::memory_order_acquire);
      try {
        if (pool.pop(rw, out, stale)) {
          outcome = reused;
        } else if (pool.has_room(rw)) {
          ++pool.open[rw];
          outcome = reserved;
        } else if (!pool.idle[!rw].empty() && (!rw || pool.open[1] < pool.rw_limit)) {
          // At the limit with idle sessions of the other kind: trade one in.
          victim = pool.idle[!rw].back().handle;
          pool.idle[!rw].pop_back();
          --pool.open[!rw];
          ++pool.open[rw];
          outcome = replace_other;
        }
      } catch (...) {
        return CKR_HOST_MEMORY;
      }
      if (!stale.empty()) pool.signal();
    }
    // Stale: given back before the device said a session was gone.
    for (CK_SESSION_HANDLE h : stale) drop_idle(pool, h, /*dead=*/true);
    stale.clear();
    if (victim != CK_INVALID_HANDLE) drop_idle(pool, victim, /*dead=*/false);
    if (outcome == reused) {
      pool.lent_idle();
      return CKR_OK;
    }
    if (outcome == reserved || outcome == replace_other) {
      CK_RV rv = backend_open(pool.id, rw, out);
      if (rv == CKR_OK) {
        pool.lent_new();
        return CKR_OK;
      }
      bool retry = false;
      {
        MutexGuard guard(pool.lock);
        --pool.open[rw];
        if (rv == CKR_SESSION_COUNT) {
          // The token's real limit is what is open now (never 0): wait for one.
          pool.limit = std::max<unsigned long>(pool.open_total(), 1);
          retry = pool.open_total() > 0;
          log_.info("slot {}: backend refused a session at {} open; limit learned", pool.id,
                    pool.open_total());
        }
        pool.signal();  // the reservation is free again
      }
      if (!retry) return rv;
      continue;  // the limit is now known: wait below on the next round
    }
    if (steal(pool, rw, out)) {
      pool.lent_idle();
      return CKR_OK;
    }
    // At the limit with an idle session of the other kind in some thread's
    // cache: close it and open one of this kind in its place.
    if (CK_SESSION_HANDLE other; steal(pool, !rw, other)) {
      drop_idle(pool, other, /*dead=*/false);
      {
        MutexGuard guard(pool.lock);
        --pool.open[!rw];
        ++pool.open[rw];
      }
      if (CK_RV rv = backend_open(pool.id, rw, out); rv == CKR_OK) {
        pool.lent_new();
        return CKR_OK;
      }
      MutexGuard guard(pool.lock);
      --pool.open[rw];
      pool.signal();
      continue;
    }
    auto now = Clock::now();
    if (now >= deadline) return CKR_SESSION_COUNT;
    if (!std::exchange(waited, true)) pool.figures->waits.fetch_add(1, std::memory_order_relaxed);
    pool.waiters.fetch_add(1, std::memory_order_acq_rel);
    // Parked while asleep: fork() does not wait for us, and we wait for
    // fork() before going on. Read after the ticket: interrupt_waiters()
    // sets interrupted_, then bumps the ticket.
    the_module.park();
    bool interrupted = interrupted_.load(std::memory_order_seq_cst);
    if (!interrupted) timed_wait(pool.returns, ticket, deadline - now);
    the_module.unpark();
    pool.waiters.fetch_sub(1, std::memory_order_acq_rel);
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
  MutexGuard registry(registry_lock_);
  for (std::size_t i = 0; i < slot_count_.load(std::memory_order_acquire); ++i) {
    SlotPool* pool = slots_[i].load(std::memory_order_acquire);
    pool->returns.fetch_add(1, std::memory_order_seq_cst);
    wake_all(pool->returns);
  }
}

// At the limit, idle sessions in other threads' caches are as good as the
// pool's own: never wait while one sits unused.
bool SessionPool::steal(SlotPool& pool, bool rw, CK_SESSION_HANDLE& out) noexcept {
  MutexGuard guard(registry_lock_);
  for (ThreadCache* cache : caches_) {
    MutexGuard cache_guard(cache->lock);
    if (cache->pop(pool, rw, out)) return true;
  }
  return false;
}

void SessionPool::close(CK_SLOT_ID slot, bool rw, CK_SESSION_HANDLE handle, Fate fate) noexcept {
  SlotPool* pool = slot_pool(slot);
  if (pool == nullptr) {  // cannot happen for a slot that opened this session
    backend_close(handle);
    return;
  }
  {
    // The application's last session on the token: the spec logs it out.
    MutexGuard guard(pool->lock);
    --pool->app_sessions;
    pool->app_read_only -= rw ? 0 : 1;
    if (pool->app_sessions == 0 && !config_.keep_login && backend_.functions.C_Logout) {
      OptionalGuard serial(backend_.lock);
      (void)backend_.functions.C_Logout(handle);
    }
  }
  settle(*pool, rw, handle, fate);
}

void SessionPool::give_back(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle) noexcept {
  Idle idle{handle, pool.generation.load(std::memory_order_acquire), Clock::now()};
  // With waiters, the shared pool is where they look.
  if (pool.waiters.load(std::memory_order_acquire) == 0) {
    if (ThreadCache* cache = this_thread_cache(true)) {
      MutexGuard guard(cache->lock);
      if (cache->count < cache->entries.size()) {
        cache->entries[cache->count++] = ThreadCache::Entry{&pool, rw, idle};
        pool.figures->idle.add(1);
        return;
      }
    }
  }
  MutexGuard guard(pool.lock);
  try {
    pool.idle[rw].push_back(idle);
  } catch (...) {
    --pool.open[rw];
    pool.closed(1, false);
    pool.signal();
    OptionalGuard serial(backend_.lock);
    (void)backend_.functions.C_CloseSession(handle);
    return;
  }
  pool.figures->idle.add(1);
  pool.signal();
}

void SessionPool::discard(SlotPool& pool, bool rw, CK_SESSION_HANDLE handle, bool dead) noexcept {
  backend_close(handle);
  pool.closed(1, false);
  if (dead) pool.figures->discarded_dead.fetch_add(1, std::memory_order_relaxed);
  MutexGuard guard(pool.lock);
  --pool.open[rw];
  pool.signal();
}

// Closes a session taken off the idle lists (pool.open already adjusted).
void SessionPool::drop_idle(SlotPool& pool, CK_SESSION_HANDLE handle, bool dead) noexcept {
  backend_close(handle);
  pool.closed(1, true);
  if (dead) pool.figures->discarded_dead.fetch_add(1, std::memory_order_relaxed);
}

void SessionPool::invalidate(CK_SLOT_ID slot) noexcept {
  if (SlotPool* pool = slot_pool(slot)) {
    pool->generation.fetch_add(1, std::memory_order_acq_rel);
  }
}

bool SessionPool::drain_idle(CK_SLOT_ID slot, bool read_only_only) noexcept {
  SlotPool* pool = slot_pool(slot);
  if (pool == nullptr) return false;
  std::vector<CK_SESSION_HANDLE> doomed;
  bool drained = false;
  try {
    MutexGuard registry(registry_lock_);
    MutexGuard guard(pool->lock);
    bool app_has = read_only_only ? pool->app_read_only > 0 : pool->app_sessions > 0;
    if (app_has) return false;
    for (bool rw : {false, true}) {
      if (rw && read_only_only) continue;
      for (const Idle& i : pool->idle[rw]) doomed.push_back(i.handle);
      pool->open[rw] -= pool->idle[rw].size();
      pool->idle[rw].clear();
      for (ThreadCache* cache : caches_) {
        MutexGuard cache_guard(cache->lock);
        for (std::size_t i = cache->count; i-- > 0;) {
          auto& e = cache->entries[i];
          if (e.slot == pool && e.rw == rw) {
            doomed.push_back(e.idle.handle);
            --pool->open[rw];
            e = cache->entries[--cache->count];
          }
        }
      }
    }
    drained = !doomed.empty();
    pool->signal();
  } catch (...) {
    // Out of memory listing them: leave the pool as it is.
  }
  for (CK_SESSION_HANDLE h : doomed) drop_idle(*pool, h, /*dead=*/false);
  return drained;
}

void SessionPool::prewarm() noexcept {
  if (config_.prewarm == 0 || backend_.functions.C_GetSlotList == nullptr) return;
  std::vector<CK_SLOT_ID> slots(64);
  CK_ULONG count = slots.size();
  {
    OptionalGuard serial(backend_.lock);
    if (backend_.functions.C_GetSlotList(CK_TRUE, slots.data(), &count) != CKR_OK) return;
  }
  slots.resize(count);
  for (CK_SLOT_ID slot : slots) {
    SlotPool* pool = slot_pool(slot);
    if (pool == nullptr) return;
    for (unsigned long i = 0; i < config_.prewarm; ++i) {
      {
        MutexGuard guard(pool->lock);
        if (!pool->has_room(false)) break;
        ++pool->open[0];
      }
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (CK_RV rv = backend_open(slot, false, h); rv != CKR_OK) {
        MutexGuard guard(pool->lock);
        --pool->open[0];
        log_.warn("slot {}: prewarm stopped at {} sessions: {}", slot, i, rv_name(rv));
        break;
      }
      MutexGuard guard(pool->lock);
      pool->idle[0].push_back(Idle{h, pool->generation.load(), Clock::now()});
      pool->figures->open.fetch_add(1, std::memory_order_relaxed);
      pool->figures->idle.add(1);
    }
  }
}

void SessionPool::close_all() noexcept {
  std::vector<std::pair<SlotPool*, CK_SESSION_HANDLE>> doomed;
  try {
    MutexGuard registry(registry_lock_);
    for (std::size_t i = 0; i < slot_count_.load(); ++i) {
      SlotPool* pool = slots_[i].load();
      MutexGuard guard(pool->lock);
      for (bool rw : {false, true}) {
        for (const Idle& idle : pool->idle[rw]) doomed.emplace_back(pool, idle.handle);
        pool->open[rw] -= pool->idle[rw].size();
        pool->idle[rw].clear();
      }
      for (ThreadCache* cache : caches_) {
        MutexGuard cache_guard(cache->lock);
        for (std::size_t j = cache->count; j-- > 0;) {
          auto& e = cache->entries[j];
          if (e.slot != pool) continue;
          doomed.emplace_back(pool, e.idle.handle);
          --pool->open[e.rw];
          e = cache->entries[--cache->count];
        }
      }
      pool->signal();
    }
  } catch (...) {
    // Out of memory: what was not listed is finalized with the backend.
  }
  for (auto [pool, h] : doomed) drop_idle(*pool, h, /*dead=*/false);
}

void SessionPool::maintain(std::chrono::seconds idle_limit, std::chrono::seconds keepalive) noexcept {
  struct Aged {
    SlotPool* pool;
    bool rw;
    Idle idle;
    bool expired;
  };
  // The maintenance thread's backend calls are calls like any other: fork()
  // and C_Finalize wait for them.
  Module::Call call(the_module);
  if (call.runtime() == nullptr || &call.runtime()->pool() != this) return;
  std::vector<Aged> aged;
  auto now = Clock::now();
  try {
    for (std::size_t i = 0; i < slot_count_.load(); ++i) {
      SlotPool* pool = slots_[i].load();
      MutexGuard guard(pool->lock);
      for (bool rw : {false, true}) {
        auto& list = pool->idle[rw];
        auto keep = std::partition(list.begin(), list.end(), [&](const Idle& idle) {
          auto age = now - idle.since;
          return !(idle_limit.count() > 0 && age > idle_limit) &&
                 !(keepalive.count() > 0 && age > keepalive);
        });
        for (auto it = keep; it != list.end(); ++it) {
          bool expired = idle_limit.count() > 0 && now - it->since > idle_limit;
          aged.push_back(Aged{pool, rw, *it, expired});
          if (expired) --pool->open[rw];
        }
        list.erase(keep, list.end());
      }
    }
  } catch (...) {
    return;
  }
  // Sessions in threads' caches are in use often enough not to need either.
  for (Aged& a : aged) {
    CK_RV rv = CKR_SESSION_CLOSED;
    if (!a.expired) {
      CK_SESSION_INFO info{};
      OptionalGuard serial(backend_.lock);
      rv = backend_.functions.C_GetSessionInfo(a.idle.handle, &info);
    } else {
      drop_idle(*a.pool, a.idle.handle, /*dead=*/false);
    }
    MutexGuard guard(a.pool->lock);
    if (!a.expired) {
      if (rv == CKR_OK) {
        a.idle.since = Clock::now();
        a.pool->idle[a.rw].push_back(a.idle);  // capacity is there: it was just removed
      } else {
        --a.pool->open[a.rw];  // expired inside the HSM: forget it
        a.pool->closed(1, true);
        a.pool->figures->discarded_dead.fetch_add(1, std::memory_order_relaxed);
      }
    }
    a.pool->signal();
  }
}

SessionPool::SlotFigures SessionPool::figures(CK_SLOT_ID slot) noexcept {
  SlotFigures f;
  SlotPool* pool = slot_pool(slot);
  if (pool == nullptr) return f;
  {
    MutexGuard guard(pool->lock);
    f.open = pool->open_total();
    f.idle = pool->idle[0].size() + pool->idle[1].size();
    f.limit = pool->limit;
  }
  MutexGuard registry(registry_lock_);
  for (ThreadCache* cache : caches_) {
    MutexGuard guard(cache->lock);
    for (std::size_t i = 0; i < cache->count; ++i) f.idle += cache->entries[i].slot == pool;
  }
  return f;
}

}  // namespace p11mux
