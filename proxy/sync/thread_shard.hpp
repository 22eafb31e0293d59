// Which of N shards the calling thread counts on, for counters that must not
// share one cache line between threads (CallGate, Metrics, ShardedGauge).
// Picked from the address of a local: thread stacks are megabytes apart, so
// hashing its 64 KiB region spreads threads without a TLS lookup.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace p11mux {

template <std::size_t N>
[[gnu::always_inline]] inline std::size_t thread_shard() noexcept {
  static_assert(std::has_single_bit(N), "a power of two: the hash's top bits pick the shard");
  int local = 0;
  auto region = reinterpret_cast<std::uintptr_t>(&local) >> 16;
  return static_cast<std::size_t>((region * 0x9E3779B97F4A7C15ull) >> (64 - std::countr_zero(N)));
}

}  // namespace p11mux
