#include "sessions/session_table.hpp"

#include <p11mux/ckr_error.hpp>

#include <algorithm>
#include <new>

namespace p11mux {

SessionTable::SessionTable(const LockSource& locks) : locks_(locks), free_lock_(locks) {}

SessionTable::~SessionTable() {
  for (auto& c : chunks_) delete c.load(std::memory_order_relaxed);
}

namespace {
// Locks `s` into a lease. NO_THREAD_SAFETY_ANALYSIS: the lock goes to the
// lease, which the analysis cannot follow (session_table.hpp).
SessionLease lock_into_lease(Session& s) noexcept NO_THREAD_SAFETY_ANALYSIS {
  s.lock.lock();
  return SessionLease(&s);
}
}  // namespace

SessionLease SessionTable::reserve() {
  std::uint32_t index = 0;
  {
    MutexGuard guard(free_lock_);
    if (free_.empty()) {
      std::size_t c = chunk_count_.load(std::memory_order_relaxed);
      if (c == kMaxChunks) throw CkrError(CKR_SESSION_COUNT, "p11mux session table is full");
      free_.reserve(free_.size() + kChunkSize);
      auto chunk = std::make_unique<Chunk>(locks_);
      chunks_[c].store(chunk.release(), std::memory_order_release);
      chunk_count_.store(c + 1, std::memory_order_release);
      // Highest index first so that the chunk fills from its start.
      for (std::size_t i = kChunkSize; i-- > 0;) {
        free_.push_back(static_cast<std::uint32_t>(c * kChunkSize + i));
      }
    }
    index = free_.back();
    free_.pop_back();
  }
  Session& s =
      chunks_[index >> kChunkBits].load(std::memory_order_acquire)->at(index & (kChunkSize - 1));
  SessionLease lease = lock_into_lease(s);
  HeldLock leased(s.lock);
  s.generation = (std::max(s.generation, floor_) + 1) & kGenerationMask;
  if (s.generation == 0) s.generation = 1;
  s.opening_handle = (s.generation << kIndexBits) | (index + 1);
  s.notify = nullptr;
  s.application = nullptr;
  s.rw = false;
  s.anchor.clear();
  for (auto& b : s.extra) b->clear();
  s.closing = false;
  s.leads = false;
  s.lead = 0;
  s.lanes_of_lead = nullptr;
  return lease;
}

void SessionTable::publish(Session& s) noexcept {
  live_.fetch_add(1, std::memory_order_relaxed);
  s.handle.store(s.opening_handle, std::memory_order_release);
}

void SessionTable::discard(SessionLease lease) noexcept {
  std::uint32_t index = 0;
  {
    HeldLock leased(lease->lock);
    index = static_cast<std::uint32_t>((lease->opening_handle & kIndexMask) - 1);
    lease->notify.store(nullptr, std::memory_order_release);  // a late notification reaches nobody
    SessionLease unlock = std::move(lease);
  }
  release_index(index);
}

void SessionTable::close(SessionLease lease) noexcept {
  CK_SESSION_HANDLE h = 0;
  {
    HeldLock leased(lease->lock);
    // opening_handle, not handle: a closing multiplexed session is already at 0.
    h = lease->opening_handle;
    lease->handle.store(0, std::memory_order_release);
    lease->anchor.backend = CK_INVALID_HANDLE;
    lease->notify.store(nullptr, std::memory_order_release);  // a late notification reaches nobody
    live_.fetch_sub(1, std::memory_order_relaxed);
    SessionLease unlock = std::move(lease);
  }
  release_index(static_cast<std::uint32_t>((h & kIndexMask) - 1));
}

void SessionTable::release_index(std::uint32_t index) noexcept {
  MutexGuard guard(free_lock_);
  // Capacity for every index was reserved when its chunk was added.
  free_.push_back(index);
}

std::uint64_t SessionTable::highest_generation() noexcept {
  std::uint64_t highest = floor_;
  std::size_t chunks = chunk_count_.load(std::memory_order_acquire);
  for (std::size_t c = 0; c < chunks; ++c) {
    Chunk* chunk = chunks_[c].load(std::memory_order_acquire);
    for (std::size_t i = 0; i < kChunkSize; ++i)
      highest = std::max(highest, chunk->at(i).generation);
  }
  return highest;
}

std::size_t SessionTable::live_count() const noexcept {
  return live_.load(std::memory_order_relaxed);
}

}  // namespace p11mux
