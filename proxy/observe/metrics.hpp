// Call metrics: per function calls, errors by return code and a latency
// histogram; the time calls wait for their session's lock; and the figures of
// each slot's session pool.
//
// The hot path takes no lock and shares no counter: a call counts itself in
// one of kShards shards, picked from the address of its stack like CallGate's
// (so no TLS), with relaxed atomic adds on cache lines that only the threads
// of that shard touch. A snapshot sums the shards; counters only grow, so a
// snapshot taken while calls run is a consistent lower bound.
#pragma once

#include "functions/function_traits.hpp"
#include "policy/policy_rule.hpp"
#include "sessions/close_reason.hpp"
#include "sync/lock.hpp"
#include "sync/thread_shard.hpp"

#include <p11mux/pkcs11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace p11mux {

// Every function of <p11mux/functions.h>, numbered in table order.
#define P11MUX_FUNCTION_NAME(name, since, dispatch, args) std::string_view(#name),
inline constexpr std::array kFunctionNames{P11MUX_FUNCTIONS(P11MUX_FUNCTION_NAME)};
#undef P11MUX_FUNCTION_NAME
inline constexpr std::size_t kFunctionCount = kFunctionNames.size();

constexpr std::optional<std::size_t> function_index_of(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kFunctionCount; ++i) {
    if (kFunctionNames[i] == name) return i;
  }
  return std::nullopt;
}

template <class F>
inline constexpr std::size_t function_index = *function_index_of(F::name);

// Log-scale buckets: bucket i < kCount-1 holds durations in (2^(i-1), 2^i] us
// (bucket 0: up to 1 us), the last one everything above 2^22 us (4.2 s).
struct LatencyBuckets {
  static constexpr std::size_t kCount = 24;

  static constexpr std::size_t index(std::uint64_t ns) noexcept {
    std::uint64_t us = (ns + 999) / 1000;  // rounded up: a bucket's bound is inclusive
    if (us <= 1) return 0;
    std::size_t i = 64 - static_cast<std::size_t>(__builtin_clzll(us - 1));  // ceil(log2(us))
    return i < kCount - 1 ? i : kCount - 1;
  }
  // The inclusive upper bound of bucket i in ns; the last bucket has none.
  static constexpr std::uint64_t upper_ns(std::size_t i) noexcept {
    return std::uint64_t{1000} << i;
  }
};

// Plain counts of one histogram, summed over shards.
struct HistogramCounts {
  std::array<std::uint64_t, LatencyBuckets::kCount> buckets{};
  std::uint64_t sum_ns = 0;
  std::uint64_t max_ns = 0;

  std::uint64_t count() const noexcept;
  // The q-quantile (0..1) in ns, interpolated within its bucket; 0 when empty.
  double quantile_ns(double q) const noexcept;
};

struct ErrorCount {
  std::size_t function;
  CK_RV rv;
  std::uint64_t count;
};

struct MetricsSnapshot {
  std::array<HistogramCounts, kFunctionCount> latency{};  // calls = latency[f].count()
  std::array<std::uint64_t, kFunctionCount> errors{};     // calls that returned other than CKR_OK
  std::vector<ErrorCount> errors_by_rv;                   // by function, then rv
  // Errors whose (function, rv) found no room in a shard's table (hundreds of
  // distinct pairs on one shard): counted in `errors`, not by rv.
  std::uint64_t errors_unclassified = 0;
  HistogramCounts lock_wait;  // one entry per session-lock acquisition
  std::array<std::uint64_t, kPolicyRuleCount> policy_denied{};  // calls the policy refused
};

class Metrics {
 public:
  Metrics();  // allocates every shard (a few hundred KiB): only when metrics are on
  ~Metrics();
  Metrics(const Metrics&) = delete;  // threads hold references to its shards
  Metrics& operator=(const Metrics&) = delete;

  void record_call(std::size_t function, CK_RV rv, std::uint64_t ns) noexcept;
  void record_lock_wait(std::uint64_t ns) noexcept;
  // A call the policy refused (policy/enforce.hpp): rare, so not sharded.
  void record_policy_denied(PolicyRule rule) noexcept {
    policy_denied_[static_cast<std::size_t>(rule)].fetch_add(1, std::memory_order_relaxed);
  }
  MetricsSnapshot snapshot() const;

  struct Shard;

 private:
  std::unique_ptr<Shard[]> shards_;
  std::array<std::atomic<std::uint64_t>, kPolicyRuleCount> policy_denied_{};
};

// A gauge that a thread moves on its own shard (picked like Metrics' from its
// stack address): multiplexed calls borrow and give back pooled sessions on
// every call, and must not all write one shared cache line for it. Reads sum
// the shards; a shard alone may go negative, the sum settles.
class ShardedGauge {
 public:
  void add(std::int64_t delta) noexcept {
    shards_[this_thread_shard()].value.fetch_add(delta, std::memory_order_relaxed);
  }
  std::int64_t load(std::memory_order order = std::memory_order_relaxed) const noexcept {
    std::int64_t sum = 0;
    for (const auto& s : shards_) sum += s.value.load(order);
    return sum;
  }
  // For tests and resets: not atomic with concurrent add().
  ShardedGauge& operator=(std::int64_t value) noexcept {
    for (auto& s : shards_) s.value.store(0, std::memory_order_relaxed);
    shards_[0].value.store(value, std::memory_order_relaxed);
    return *this;
  }

 private:
  static constexpr std::size_t kShards = 16;
  static std::size_t this_thread_shard() noexcept { return thread_shard<kShards>(); }
  struct alignas(64) Shard {
    std::atomic<std::int64_t> value{0};
  };
  std::array<Shard, kShards> shards_{};
};

// The figures of one slot's backend session pool. The pool updates them with
// relaxed atomics as sessions move; p11mux only reads them (for /metrics,
// /stats and the summary). Gauges are signed so that a transient order of
// updates cannot wrap them.
struct SlotPoolMetrics {
  std::atomic<std::int64_t> open{0};  // backend sessions open on the slot: idle + in use
  ShardedGauge idle;                  // open, in the pool or a thread cache, ready for reuse
  ShardedGauge in_use;                // open and held by a virtual session (or a multiplexed call)
  std::atomic<std::uint64_t> waits{0};    // calls that waited for a backend session at the limit
  std::atomic<std::uint64_t> wait_ns{0};  // the total time those calls waited
  // How long each of those calls waited, in LatencyBuckets.
  std::array<std::atomic<std::uint64_t>, LatencyBuckets::kCount> wait_buckets{};
  // The application's sessions open on the slot (virtual sessions).
  std::atomic<std::int64_t> virtual_sessions{0};

  std::atomic<std::uint64_t> wait_max_ns{0};

  void record_wait(std::chrono::nanoseconds waited) noexcept {
    const auto ns = static_cast<std::uint64_t>(std::max<std::int64_t>(waited.count(), 0));
    wait_buckets[LatencyBuckets::index(ns)].fetch_add(1, std::memory_order_relaxed);
    std::uint64_t max = wait_max_ns.load(std::memory_order_relaxed);
    while (ns > max && !wait_max_ns.compare_exchange_weak(max, ns, std::memory_order_relaxed)) {
    }
  }
  HistogramCounts wait_histogram() const noexcept;
  std::atomic<std::uint64_t> discarded_dead{0};  // sessions dropped because the backend said gone
  // Sessions closed instead of pooled: p11mux could not prove them clean.
  std::array<std::atomic<std::uint64_t>, kCloseReasonCount> unclean{};
};

// One SlotPoolMetrics per slot of one backend, created on first use and never
// moved or freed while the registry exists. Readers walk the list without a
// lock. Each backend's SessionPool has a registry of its own (Observer::pools):
// slot IDs are the backend's, and two backends may both have a slot 0.
class PoolMetricsRegistry {
 public:
  // `backend`: the [backend.NAME] name in a group configuration; empty in the
  // single-backend configuration, whose figures carry no backend name.
  explicit PoolMetricsRegistry(const LockSource& locks, std::string backend = {});
  ~PoolMetricsRegistry();
  PoolMetricsRegistry(const PoolMetricsRegistry&) = delete;  // hands out references
  PoolMetricsRegistry& operator=(const PoolMetricsRegistry&) = delete;

  // The slot's figures; NULL only when out of memory.
  SlotPoolMetrics* slot(CK_SLOT_ID slot) noexcept;
  const std::string& backend() const noexcept { return backend_; }

  // fn(CK_SLOT_ID, const SlotPoolMetrics&) for every slot, newest first.
  template <class Fn>
  void for_each(Fn&& fn) const {
    for (const Node* n = head_.load(std::memory_order_acquire); n != nullptr; n = n->next) {
      fn(n->slot, n->metrics);
    }
  }

 private:
  struct Node {
    CK_SLOT_ID slot;
    SlotPoolMetrics metrics;
    Node* next;
  };
  // Serializes additions; readers need none (head_ is an atomic, and a node
  // is immutable once published). A leaf of the lock order (lock.hpp).
  Mutex lock_;
  std::atomic<Node*> head_{nullptr};
  const std::string backend_;
};

}  // namespace p11mux
