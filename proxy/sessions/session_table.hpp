// Virtual sessions: the handles the application sees, each mapped to a backend
// session and guarded by its own lock.
//
// A handle is (generation << 24) | (index + 1): never 0, and a stale copy of a
// closed session's handle never matches the entry's next occupant. Entries live
// in chunks that are never freed while the table exists, so a lookup racing a
// close finds either the live session or a mismatched handle, never freed
// memory. Looking up a handle takes no table lock; only open and close do.
//
// Lock order: proxy/sync/lock.hpp. The free-list lock is a leaf, never held
// across a backend call or together with a Session::lock.
#pragma once

#include "sessions/close_reason.hpp"
#include "sync/lock.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>
#include <vector>

namespace p11mux {

class SessionPool;

// One backend session serving a virtual session, with what the virtual
// session left on it (so that it can be reset before anyone else uses it).
// Guarded by its Session's lock: the analysis checks it where it is reached
// through Session::anchor or Session::extra (both GUARDED_BY the lock); a
// Binding& or Binding* taken there is trusted beyond that, as a multiplexed
// call's own binding is used without the lock while `busy` says it is
// the call's.
struct Binding {
  CK_SESSION_HANDLE backend = CK_INVALID_HANDLE;
  std::uint16_t ops = 0;    // operations active on it (OpMask, operation_state.hpp)
  std::uint16_t maybe = 0;  // operations an error may have left active (OpMask)
  bool discard = false;     // close it at the end, never reuse it
  CloseReason why{};        // with discard, unless dead: why (counted by the pool)
  bool dead = false;        // the backend said it (or its device) is gone: discard, counted
  // Multiplex, bind = state: its owner waits to continue an operation on it
  // while another thread's call runs there; no other call may take it then
  // (claim_held_now), or the owner could wait for ever (multiplex.hpp).
  bool wanted = false;
  // Multiplex, bind = state: the one other thread whose call ran here at the
  // pool's limit (claim_held_now), so that an operation it started here is
  // found again as its own (claim_own_operation); 0 for none. Cleared when
  // no operation is left.
  std::uint64_t guest = 0;
  // Of `ops`, those its guest started; the rest are its owner's. A call
  // continuing an operation runs only where its own thread started one, and
  // one starting an operation never where another thread has that kind active
  // (multiplex.hpp, own_ops): kinds alone would let the owner continue its
  // guest's operation and orphan its own (docs/design.md, "Binding on state").
  std::uint16_t guest_ops = 0;
  // Multiplex: the thread that used it last (this_thread_number(), 0 for
  // none) and whether a call is running on it (busy), in one word:
  // (owner << 1) | kBusy. One word so that one compare-exchange claims the
  // anchor only if it is both free and this thread's (try_claim_own, without
  // the session lock): a call never holds another thread's binding, even for
  // a moment. Claimed only by a compare-exchange that finds it free
  // (acquire), so two claimers never both get it; freed only by its holder,
  // with release order, so the next claimer reads what the last one wrote
  // (ops, maybe) even without the lock. docs/design.md, "Multiplex mode".
  std::atomic<std::uint64_t> claim{0};
  static constexpr std::uint64_t kBusy = 1;

  bool busy(std::memory_order order = std::memory_order_acquire) const noexcept {
    return (claim.load(order) & kBusy) != 0;
  }
  std::uint64_t owner() const noexcept { return claim.load(std::memory_order_relaxed) >> 1; }
  // Free and me's: now busy. Nothing changes otherwise.
  [[gnu::always_inline]] bool try_claim_own(std::uint64_t me) noexcept {
    std::uint64_t free_mine = me << 1;
    return claim.compare_exchange_strong(free_mine, free_mine | kBusy, std::memory_order_acquire,
                                         std::memory_order_relaxed);
  }
  // Free, whoever's: now busy and me's (me == 0: the owner kept).
  bool try_claim(std::uint64_t me) noexcept {
    std::uint64_t now = claim.load(std::memory_order_relaxed);
    do {
      if ((now & kBusy) != 0) return false;
    } while (!claim.compare_exchange_weak(now, (me != 0 ? me << 1 : now) | kBusy,
                                          std::memory_order_acquire, std::memory_order_relaxed));
    return true;
  }
  // By the holder: free again, the owner kept.
  [[gnu::always_inline]] void release(
      std::memory_order order = std::memory_order_release) noexcept {
    claim.fetch_and(~kBusy, order);
  }
  std::vector<CK_OBJECT_HANDLE> objects;  // session objects created through it

  // What keeps it with its virtual session ([pool] bind = state): an
  // operation active or maybe active, or session objects made through it.
  bool holds_state() const noexcept { return ops != 0 || maybe != 0 || !objects.empty(); }

  void clear() noexcept {
    backend = CK_INVALID_HANDLE;
    ops = maybe = guest_ops = 0;
    discard = dead = wanted = false;
    guest = 0;
    why = {};
    objects.clear();
    claim.store(0, std::memory_order_relaxed);
  }
};

// What a group's failover keeps of a session's operations, to replay them on
// another member (group/operation_record.hpp): only its name here.
class SessionOperations;
struct SessionOperationsDeleter {
  void operator()(SessionOperations* operations) const noexcept;  // operation_record.cpp
};

// A multiplexed session on a group's slot: the backend sessions its threads
// run on, each a session of its own (group/session_lanes.hpp): only its
// name here.
struct SessionLanes;
struct SessionLanesDeleter {
  void operator()(SessionLanes* lanes) const noexcept;  // session_lanes.cpp
};

struct Session {
  explicit Session(const LockSource& locks) : lock(locks) {}
  Session(const Session&) = delete;  // lives at a fixed address: handles point at it
  Session& operator=(const Session&) = delete;

  // Serialize mode: held across every call on the session. Multiplex mode:
  // held only while bindings are chosen and updated, never across a call.
  Mutex lock;
  // The virtual handle while open; 0 while free or closing. Written under
  // `lock`; the closer's store of 0 is seq_cst, as is the multiplex call's
  // load of it after counting itself in in_flight (forward_multiplexed): either the
  // call sees 0, or the closer sees the call counted.
  std::atomic<CK_SESSION_HANDLE> handle{0};
  std::uint64_t generation = 0;  // owned by the table's free list

  // The fields GUARDED_BY(lock) are checked by clang's analysis (the
  // thread-safety CI build). A SessionLease holds the lock where the
  // analysis cannot see it (returned by value), so the code holding a lease
  // says so once with a HeldLock (sync/lock.hpp), and functions given a
  // locked Session& say REQUIRES(s.lock). Read without the lock, on
  // purpose: the atomics below; opening_handle by the notify trampoline
  // (handled/session_calls.cpp says why); slot and rw through
  // slot_while_open() and rw_while_open().
  // `slot` is the backend's own slot ID, on the backend whose sessions
  // `pool` keeps (and whose port every call takes: pool->port()); `shown` is
  // the slot the application opened it on (C_GetSessionInfo,
  // C_CloseAllSessions): `slot` for the single backend, a group's slot ID
  // in a group configuration (docs/groups.md).
  CK_SLOT_ID slot GUARDED_BY(lock) = 0;
  CK_SLOT_ID shown GUARDED_BY(lock) = 0;
  SessionPool* pool GUARDED_BY(lock) = nullptr;
  // In a group configuration, the group (GroupRuntime's index, which is
  // also its slot ID) and the member (its index in the group's `members`)
  // the session runs on; kNoGroup for the single backend.
  static constexpr std::uint32_t kNoGroup = ~std::uint32_t{0};
  std::uint32_t group GUARDED_BY(lock) = kNoGroup;
  std::uint32_t member GUARDED_BY(lock) = 0;
  bool rw GUARDED_BY(lock) = false;  // R/W or R/O: the pool kind of its backend sessions
  // A group's session: its operations as failover replays them (made at its
  // first C_OpenSession on a group, kept while the table reuses the slot,
  // reset at each open); NULL for the single backend's.
  std::unique_ptr<SessionOperations, SessionOperationsDeleter> operations GUARDED_BY(lock);
  // Multiplex mode on a group's slot (group/session_lanes.hpp): the
  // session the application sees `leads` its lanes, one per thread calling
  // it, in `lanes` (made at its first open as a lead, kept while the table
  // reuses the entry); a lane's `lead` is its lead's handle (0 otherwise)
  // and `lanes_of_lead` its lead's lanes, for what they share without a lock.
  bool leads GUARDED_BY(lock) = false;
  std::unique_ptr<SessionLanes, SessionLanesDeleter> lanes GUARDED_BY(lock);
  CK_SESSION_HANDLE lead GUARDED_BY(lock) = 0;
  SessionLanes* lanes_of_lead GUARDED_BY(lock) = nullptr;
  CK_SESSION_HANDLE opening_handle GUARDED_BY(lock) = 0;  // the handle being opened, for Notify
  // Read by the notify trampoline from inside backend calls, without the lock.
  std::atomic<CK_NOTIFY> notify{nullptr};
  std::atomic<CK_VOID_PTR> application{nullptr};
  // The backend session opened with the virtual session, kept until it closes.
  Binding anchor GUARDED_BY(lock);
  // Multiplex mode: more backend sessions, for threads calling at the same time.
  std::vector<std::unique_ptr<Binding>> extra GUARDED_BY(lock);
  // Multiplex mode: in the low 16 bits, calls between counting themselves
  // (before choosing a binding) and giving their binding up; a closing
  // session waits for them. Plus kWaiter for each thread waiting for it to
  // change (a call waiting for a busy binding, a closer waiting for the
  // calls): a call that leaves it wakes them only then.
  static constexpr std::uint32_t kWaiter = 1u << 16;
  std::atomic<std::uint32_t> in_flight{0};
  // Multiplex mode, of those waiters: `watchers` wait for one binding in
  // particular and sleep on in_flight; `in_line` wait for any binding and
  // sleep on `line`, which a leaving call bumps, waking one of them
  // (forward/multiplex.hpp, wake_waiters).
  std::atomic<std::uint32_t> watchers{0};
  std::atomic<std::uint32_t> in_line{0};
  std::atomic<std::uint32_t> line{0};
  bool closing GUARDED_BY(lock) = false;  // multiplex: set by the closer

  // slot and rw without the lock: written once, under it, before the
  // session is published, and not again until it has closed. A multiplexed
  // call counted in in_flight keeps it open (Runtime::close_session waits
  // for the count), so it may read them after releasing the lock.
  // NO_THREAD_SAFETY_ANALYSIS: that argument is this comment, not a lock.
  CK_SLOT_ID slot_while_open() const noexcept NO_THREAD_SAFETY_ANALYSIS { return slot; }
  bool rw_while_open() const noexcept NO_THREAD_SAFETY_ANALYSIS { return rw; }
  // The anchor for a multiplexed call counted in in_flight, without the
  // lock: it stays while the session is open, and a call uses it only once
  // it has claimed it (Binding::claim; docs/design.md, "Multiplex mode").
  // NO_THREAD_SAFETY_ANALYSIS: that argument is this comment, not a lock.
  Binding& anchor_while_counted() noexcept NO_THREAD_SAFETY_ANALYSIS { return anchor; }
};

// A locked, live session; unlocks when it goes out of scope.
//
// Not a SCOPED_CAPABILITY: a lease is returned by value (lease(), reserve())
// and moved, and clang's analysis forgets a scoped capability across a
// return, so it would report every lease's unlock as "not held". The
// functions that hand a session's lock to a lease opt out of the analysis
// (NO_THREAD_SAFETY_ANALYSIS), each saying so; the code that receives a
// lease says, for the analysis, that the lock is held:
//   SessionLease lease = table.lease(handle);
//   if (!lease) return CKR_SESSION_HANDLE_INVALID;
//   HeldLock leased(lease->lock);  // no code; lease->slot etc. are now checked
class SessionLease {
 public:
  SessionLease() noexcept = default;
  explicit SessionLease(Session* s) noexcept : s_(s) {}
  SessionLease(SessionLease&& other) noexcept : s_(other.s_) { other.s_ = nullptr; }
  SessionLease& operator=(SessionLease&& other) noexcept {
    std::swap(s_, other.s_);
    return *this;
  }
  SessionLease(const SessionLease&) = delete;                         // exactly one unlock per lock
  [[gnu::always_inline]] ~SessionLease() NO_THREAD_SAFETY_ANALYSIS {  // the lease's lock
    if (s_ != nullptr) s_->lock.unlock();
  }
  explicit operator bool() const noexcept { return s_ != nullptr; }
  Session* operator->() const noexcept { return s_; }
  Session& operator*() const noexcept { return *s_; }

 private:
  Session* s_ = nullptr;
};

// kSize sessions constructed in place: they hold locks and are pointed
// at by handles, so they never move.
class SessionChunk {
 public:
  static constexpr std::size_t kSize = 256;

  explicit SessionChunk(const LockSource& locks) {
    std::size_t built = 0;
    try {
      for (; built < kSize; ++built) new (&storage_[built]) Session(locks);
    } catch (...) {
      while (built > 0) at(--built).~Session();
      throw;
    }
  }
  ~SessionChunk() {
    for (std::size_t i = 0; i < kSize; ++i) at(i).~Session();
  }
  SessionChunk(const SessionChunk&) = delete;
  SessionChunk& operator=(const SessionChunk&) = delete;

  Session& at(std::size_t i) noexcept {
    return *std::launder(reinterpret_cast<Session*>(&storage_[i]));
  }

 private:
  struct alignas(Session) Storage {
    std::byte bytes[sizeof(Session)];
  };
  std::array<Storage, kSize> storage_;
};

class SessionTable {
 public:
  static constexpr unsigned kIndexBits = 24;
  static constexpr unsigned kChunkBits = 8;
  static constexpr std::size_t kChunkSize = SessionChunk::kSize;
  static_assert(kChunkSize == std::size_t{1} << kChunkBits);
  static constexpr std::size_t kMaxChunks = (std::size_t{1} << kIndexBits) / kChunkSize;
  static constexpr CK_SESSION_HANDLE kIndexMask = (CK_SESSION_HANDLE{1} << kIndexBits) - 1;
  static constexpr std::uint64_t kGenerationMask = (std::uint64_t{1} << (64 - kIndexBits)) - 1;

  explicit SessionTable(const LockSource& locks);
  ~SessionTable();
  SessionTable(const SessionTable&) = delete;
  SessionTable& operator=(const SessionTable&) = delete;

  // The live session with this handle, locked; empty for a stale or bogus one.
  // NO_THREAD_SAFETY_ANALYSIS (here and below): the lock goes to the lease.
  [[gnu::always_inline]] SessionLease lease(CK_SESSION_HANDLE handle) noexcept {
    return lease(
        handle,
        [](Mutex & lock) __attribute__((always_inline)) NO_THREAD_SAFETY_ANALYSIS { lock.lock(); });
  }
  // The same, taking the session's lock with lock_session(Mutex&): the hook
  // where metrics time the wait for it (lock contention).
  template <class LockSession>
  [[gnu::always_inline]] SessionLease lease(
      CK_SESSION_HANDLE handle, LockSession&& lock_session) noexcept NO_THREAD_SAFETY_ANALYSIS {
    Session* entry = nullptr;
    if (!find_entry(handle, entry)) return {};
    Session& s = *entry;
    if (s.handle.load(std::memory_order_acquire) != handle) return {};
    lock_session(s.lock);
    if (s.handle.load(std::memory_order_relaxed) != handle) {
      s.lock.unlock();
      return {};
    }
    return SessionLease(&s);
  }

  // The entry a handle points at, whatever it holds now (live, closing, free
  // or another session); false for an index never allocated. Entries are
  // never freed while the table exists, so it may be read without a lock;
  // the caller compares its `handle` with the one it was given. (A bool,
  // not a pointer that may be NULL: the compiler cannot tell that an
  // entry's address is never NULL, and would test it again.)
  [[gnu::always_inline]] bool find_entry(CK_SESSION_HANDLE handle, Session*& entry) noexcept {
    CK_SESSION_HANDLE slot_number = handle & kIndexMask;
    if (slot_number == 0) return false;
    std::size_t index = slot_number - 1;
    Chunk* chunk = chunks_[index >> kChunkBits].load(std::memory_order_acquire);
    if (chunk == nullptr) return false;
    entry = &chunk->at(index & (kChunkSize - 1));
    return true;
  }

  // A free entry, locked, with its next handle in opening_handle; the caller
  // fills it and calls publish(), or gives it back with discard().
  // Throws CkrError(CKR_SESSION_COUNT) when all 16M entries are in use.
  SessionLease reserve();
  void publish(Session& s) noexcept REQUIRES(s.lock);
  void discard(SessionLease lease) noexcept;
  // Marks a leased session closed and returns its entry to the free list.
  void close(SessionLease lease) noexcept;

  // Calls fn(SessionLease) for every live session, locking each in turn.
  template <class Fn>
  void for_each_live(Fn&& fn) {
    std::size_t chunks = chunk_count_.load(std::memory_order_acquire);
    for (std::size_t c = 0; c < chunks; ++c) {
      Chunk* chunk = chunks_[c].load(std::memory_order_acquire);
      for (std::size_t i = 0; i < kChunkSize; ++i) {
        CK_SESSION_HANDLE h = chunk->at(i).handle.load(std::memory_order_acquire);
        if (h == 0) continue;
        if (SessionLease lease = this->lease(h)) fn(std::move(lease));
      }
    }
  }

  // Sessions open now (for tests and metrics).
  std::size_t live_count() const noexcept;

  // Handles across initializations: a new table starts its generations
  // above the previous table's highest, so that a handle kept from before
  // C_Finalize (or from the parent before fork()) never matches a session of
  // this one. start_above() before the first reserve(); highest_generation()
  // once no session is being opened (C_Finalize after the drain, or a
  // forked child, where no other thread exists).
  void start_above(std::uint64_t floor) noexcept { floor_ = floor & kGenerationMask; }
  std::uint64_t highest_generation() noexcept;

 private:
  using Chunk = SessionChunk;
  void release_index(std::uint32_t index) noexcept;

  const LockSource& locks_;
  std::uint64_t floor_ = 0;  // generations of this table are above it; set before any session opens
  std::array<std::atomic<Chunk*>, kMaxChunks> chunks_{};
  std::atomic<std::size_t> chunk_count_{0};
  // Guards free_ and chunk growth (chunks_ and chunk_count_ are atomics,
  // written under it and read without it).
  Mutex free_lock_;
  std::vector<std::uint32_t> free_ GUARDED_BY(free_lock_);  // entry indexes ready for reuse
  std::atomic<std::size_t> live_{0};
};

}  // namespace p11mux
