// Counts the calls in flight so that C_Finalize can close the door and wait
// for them, and fork() can hold the door and wait for them, without a shared
// lock or a shared counter on the hot path: each thread counts on its own
// shard (picked from its stack address, so no TLS), and the closer sums the
// shards. The seq_cst pair (shard increment, then state load; state store,
// then shard loads) guarantees that either the caller sees the door not open
// or the closer sees the caller. A caller first looks at the door without
// counting: once it is closed, knocking callers never count, so a drain ends
// however many threads keep knocking (refused callers that counted for a
// moment kept the sum from ever reaching zero).
//
// A call that sleeps outside the backend (waiting for a pooled session)
// parks: fork() does not wait for parked calls, and a parked call that wakes
// while the door is held waits until it opens before it goes on.
//
// States: closed (not initialized, or C_Finalize draining: callers are
// refused), open, and held (a fork() in progress: callers wait outside until
// the parent's atfork handler opens the door again, and get no error).
#pragma once

#include "sync/lock.hpp"
#include "sync/thread_shard.hpp"

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace p11mux {

class CallGate {
 public:
  // True when the caller may proceed; it must then call leave(shard).
  [[gnu::always_inline]] bool enter(std::size_t& shard) noexcept {
    shard = this_thread_shard();
    if (state_.load(std::memory_order_relaxed) != kOpen) [[unlikely]]
      return enter_uncounted(shard);
    shards_[shard].calls.fetch_add(1, std::memory_order_seq_cst);
    if (state_.load(std::memory_order_seq_cst) == kOpen) [[likely]]
      return true;
    return enter_slow(shard);
  }

  [[gnu::always_inline]] void leave(std::size_t shard) noexcept {
    shards_[shard].calls.fetch_sub(1, std::memory_order_seq_cst);
    if (state_.load(std::memory_order_seq_cst) != kOpen) [[unlikely]]
      drained();
  }

  void open() noexcept {
    state_.store(kOpen, std::memory_order_seq_cst);
    wake_all(state_);
  }

  // Refuses new calls (held ones too), then waits until every call that got
  // in has left.
  void close_and_drain() noexcept {
    close();
    drain();
  }
  // The two halves, for a closer that wakes sleeping calls in between.
  void close() noexcept {
    state_.store(kClosed, std::memory_order_seq_cst);
    wake_all(state_);  // callers held for a fork: refused now
  }
  void drain() noexcept {
    for (;;) {
      std::uint32_t epoch = drained_epoch_.load(std::memory_order_seq_cst);
      if (in_flight() == 0) return;
      timed_wait(drained_epoch_, epoch, std::chrono::seconds(1));
    }
  }

  // atfork prepare, from a thread that has entered the gate itself (so that
  // a C_Finalize racing the fork waits for resume()): holds new callers
  // outside, then waits up to `limit` for the other calls in flight to
  // leave. At the limit (a call stuck in the backend, or the forking thread
  // inside a call) the gate stays held and the fork goes ahead.
  enum class Hold { not_open, drained, timed_out };
  Hold hold(std::chrono::nanoseconds limit) noexcept {
    std::uint32_t expected = kOpen;
    if (!state_.compare_exchange_strong(expected, kHeld, std::memory_order_seq_cst)) {
      return Hold::not_open;
    }
    auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      std::uint32_t epoch = drained_epoch_.load(std::memory_order_seq_cst);
      // Only the forking thread's own entry left, besides parked calls.
      if (in_flight_unparked() <= 1) return Hold::drained;
      auto left = deadline - std::chrono::steady_clock::now();
      if (left <= decltype(left)::zero()) return Hold::timed_out;
      timed_wait(drained_epoch_, epoch, left);
    }
  }

  // atfork parent: lets the held callers in, unless C_Finalize closed the
  // gate meanwhile.
  void resume() noexcept {
    std::uint32_t expected = kHeld;
    if (state_.compare_exchange_strong(expected, kOpen, std::memory_order_seq_cst)) {
      wake_all(state_);
    }
  }

  // A call that got in is about to sleep outside the backend: hold() no
  // longer waits for it. It must unpark() before it touches the backend.
  void park() noexcept {
    parked_.fetch_add(1, std::memory_order_seq_cst);
    // A hold() may be counting us as inside: make it count again.
    if (state_.load(std::memory_order_seq_cst) != kOpen) drained();
  }
  // Waits while the door is held for a fork (a parked call must not enter
  // the backend then); returns with the call counted as inside again.
  void unpark() noexcept {
    for (;;) {
      std::uint32_t state;
      while ((state = state_.load(std::memory_order_seq_cst)) == kHeld) {
        timed_wait(state_, kHeld, std::chrono::seconds(1));
      }
      parked_.fetch_sub(1, std::memory_order_seq_cst);
      // Pairs with hold(): either it sees us unparked and waits for us, or
      // we see it held and park again.
      if (state_.load(std::memory_order_seq_cst) != kHeld) return;
      park();
    }
  }

  // In a forked child only the forking thread exists: the parent's calls in
  // flight will never leave. Called from the atfork child handler: no locks.
  void reset_after_fork() noexcept {
    state_.store(kClosed, std::memory_order_relaxed);
    for (auto& s : shards_) s.calls.store(0, std::memory_order_relaxed);
    parked_.store(0, std::memory_order_relaxed);
  }

 private:
  static constexpr std::uint32_t kClosed = 0, kOpen = 1, kHeld = 2;
  static constexpr std::size_t kShards = 32;

  // The door is not open: step back out (so that a drain or a fork is not
  // held up by us), then wait outside while it is held for a fork.
  [[gnu::cold, gnu::noinline]] bool enter_slow(std::size_t shard) noexcept {
    leave(shard);
    return enter_uncounted(shard);
  }
  // Not counted: wait outside while the door is held, count only once it
  // looks open.
  [[gnu::cold, gnu::noinline]] bool enter_uncounted(std::size_t shard) noexcept {
    for (;;) {
      std::uint32_t state;
      while ((state = state_.load(std::memory_order_seq_cst)) == kHeld) {
        timed_wait(state_, kHeld, std::chrono::seconds(1));
      }
      if (state == kClosed) return false;
      shards_[shard].calls.fetch_add(1, std::memory_order_seq_cst);
      if (state_.load(std::memory_order_seq_cst) == kOpen) return true;
      leave(shard);
    }
  }

  // A call left while a drain or a fork may be waiting: wake it to re-count.
  [[gnu::cold, gnu::noinline]] void drained() noexcept {
    drained_epoch_.fetch_add(1, std::memory_order_seq_cst);
    wake_all(drained_epoch_);
  }

  std::uint64_t in_flight() const noexcept {
    std::uint64_t total = 0;
    for (const auto& s : shards_) total += s.calls.load(std::memory_order_seq_cst);
    return total;
  }
  // Shards first, then parked: a call counted parked was counted in its
  // shard already (it parks after entering, and cannot leave while parked).
  std::int64_t in_flight_unparked() const noexcept {
    auto total = static_cast<std::int64_t>(in_flight());
    return total - static_cast<std::int64_t>(parked_.load(std::memory_order_seq_cst));
  }

  [[gnu::always_inline]] static std::size_t this_thread_shard() noexcept {
    return thread_shard<kShards>();
  }

  struct alignas(64) Shard {
    std::atomic<std::uint64_t> calls{0};
  };
  std::array<Shard, kShards> shards_{};
  // Futex words (timed_wait/wake_all: no mutex, usable in atfork handlers).
  std::atomic<std::uint32_t> state_{kClosed};
  std::atomic<std::uint32_t> drained_epoch_{0};
  std::atomic<std::uint64_t> parked_{0};  // cold: changed only by calls about to sleep
};

}  // namespace p11mux
