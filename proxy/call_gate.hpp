// Counts the calls in flight so that C_Finalize can close the door and wait
// for them, without a shared lock or a shared counter on the hot path: each
// thread counts on its own shard (picked from its stack address, so no TLS),
// and C_Finalize sums the shards. The seq_cst pair (shard increment, then
// open-flag load; flag store, then shard loads) guarantees that either the
// caller sees the door closed or C_Finalize sees the caller.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace p11mux {

class CallGate {
 public:
  // True when the caller may proceed; it must then call leave(shard).
  bool enter(std::size_t& shard) noexcept {
    shard = this_thread_shard();
    shards_[shard].calls.fetch_add(1, std::memory_order_seq_cst);
    if (open_.load(std::memory_order_seq_cst)) [[likely]] return true;
    leave(shard);
    return false;
  }

  void leave(std::size_t shard) noexcept {
    shards_[shard].calls.fetch_sub(1, std::memory_order_seq_cst);
    if (!open_.load(std::memory_order_seq_cst)) [[unlikely]] {
      drained_epoch_.fetch_add(1, std::memory_order_seq_cst);
      drained_epoch_.notify_all();
    }
  }

  void open() noexcept { open_.store(true, std::memory_order_seq_cst); }

  // Refuses new calls, then waits until every call that got in has left.
  void close_and_drain() noexcept {
    open_.store(false, std::memory_order_seq_cst);
    for (;;) {
      std::uint32_t epoch = drained_epoch_.load(std::memory_order_seq_cst);
      if (in_flight() == 0) return;
      drained_epoch_.wait(epoch, std::memory_order_seq_cst);
    }
  }

  // In a forked child only the forking thread exists: the parent's calls in
  // flight will never leave. Called from the atfork child handler: no locks.
  void reset_after_fork() noexcept {
    open_.store(false, std::memory_order_relaxed);
    for (auto& s : shards_) s.calls.store(0, std::memory_order_relaxed);
  }

 private:
  static constexpr std::size_t kShards = 32;

  std::uint64_t in_flight() const noexcept {
    std::uint64_t total = 0;
    for (const auto& s : shards_) total += s.calls.load(std::memory_order_seq_cst);
    return total;
  }

  static std::size_t this_thread_shard() noexcept {
    // Thread stacks are megabytes apart: hash the 64 KiB region of a local.
    int local = 0;
    auto region = reinterpret_cast<std::uintptr_t>(&local) >> 16;
    return static_cast<std::size_t>((region * 0x9E3779B97F4A7C15ull) >> 59) % kShards;
  }

  struct alignas(64) Shard {
    std::atomic<std::uint64_t> calls{0};
  };
  std::array<Shard, kShards> shards_{};
  std::atomic<bool> open_{false};
  std::atomic<std::uint32_t> drained_epoch_{0};
};

}  // namespace p11mux
