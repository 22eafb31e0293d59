#include "observe/metrics.hpp"

#include <algorithm>
#include <map>
#include <new>
#include <utility>

namespace p11mux {
namespace {

constexpr std::size_t kShards = 16;
// Distinct (function, rv) pairs each shard can tell apart; errors are rare and
// an application sees a handful of codes, so this is plenty.
constexpr std::size_t kErrorSlots = 128;
constexpr unsigned kRvBits = 56;

std::size_t this_thread_shard() noexcept { return thread_shard<kShards>(); }

struct AtomicHistogram {
  std::array<std::atomic<std::uint64_t>, LatencyBuckets::kCount> buckets{};
  std::atomic<std::uint64_t> sum_ns{0};
  std::atomic<std::uint64_t> max_ns{0};

  void add(std::uint64_t ns) noexcept {
    buckets[LatencyBuckets::index(ns)].fetch_add(1, std::memory_order_relaxed);
    sum_ns.fetch_add(ns, std::memory_order_relaxed);
    std::uint64_t max = max_ns.load(std::memory_order_relaxed);
    while (ns > max && !max_ns.compare_exchange_weak(max, ns, std::memory_order_relaxed)) {
    }
  }

  void add_to(HistogramCounts& out) const noexcept {
    for (std::size_t i = 0; i < buckets.size(); ++i) {
      out.buckets[i] += buckets[i].load(std::memory_order_relaxed);
    }
    out.sum_ns += sum_ns.load(std::memory_order_relaxed);
    out.max_ns = std::max(out.max_ns, max_ns.load(std::memory_order_relaxed));
  }
};

// One function's counters on one shard: a cache line of their own, so that
// threads busy with different functions never share one.
struct alignas(64) FunctionCounters {
  AtomicHistogram latency;
  std::atomic<std::uint64_t> errors{0};
};

struct ErrorSlot {
  std::atomic<std::uint64_t> key{0};  // 0: free; else (function + 1) << kRvBits | rv
  std::atomic<std::uint64_t> count{0};
};

}  // namespace

struct alignas(64) Metrics::Shard {
  std::array<FunctionCounters, kFunctionCount> functions;
  alignas(64) AtomicHistogram lock_wait;
  alignas(64) std::array<ErrorSlot, kErrorSlots> errors;
  std::atomic<std::uint64_t> errors_unclassified{0};

  void record_error(std::size_t function, CK_RV rv) noexcept {
    functions[function].errors.fetch_add(1, std::memory_order_relaxed);
    // Open addressing: a free slot is claimed once and keeps its key for ever.
    const std::uint64_t key = (std::uint64_t{function} + 1) << kRvBits |
                              (std::uint64_t{rv} & ((std::uint64_t{1} << kRvBits) - 1));
    std::size_t start = static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> 57);
    for (std::size_t probe = 0; probe < kErrorSlots; ++probe) {
      ErrorSlot& slot = errors[(start + probe) % kErrorSlots];
      std::uint64_t seen = slot.key.load(std::memory_order_relaxed);
      if (seen == 0 && slot.key.compare_exchange_strong(seen, key, std::memory_order_relaxed)) {
        seen = key;
      }
      if (seen == key) {
        slot.count.fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
    errors_unclassified.fetch_add(1, std::memory_order_relaxed);
  }
};

std::uint64_t HistogramCounts::count() const noexcept {
  std::uint64_t n = 0;
  for (std::uint64_t b : buckets) n += b;
  return n;
}

double HistogramCounts::quantile_ns(double q) const noexcept {
  const std::uint64_t n = count();
  if (n == 0) return 0.0;
  if (n == 1) return static_cast<double>(max_ns);  // the one value there is
  const double rank = std::clamp(q, 0.0, 1.0) * static_cast<double>(n);
  std::uint64_t below = 0;
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    if (buckets[i] == 0) continue;
    if (static_cast<double>(below + buckets[i]) >= rank) {
      // Linear within the bucket, as Prometheus' histogram_quantile does; the
      // last bucket is bounded by the largest value seen.
      double lo = i == 0 ? 0.0 : static_cast<double>(LatencyBuckets::upper_ns(i - 1));
      double hi = i + 1 < buckets.size() ? static_cast<double>(LatencyBuckets::upper_ns(i))
                                         : static_cast<double>(max_ns);
      hi = std::min(hi, static_cast<double>(max_ns));
      lo = std::min(lo, hi);
      double within = (rank - static_cast<double>(below)) / static_cast<double>(buckets[i]);
      return lo + (hi - lo) * within;
    }
    below += buckets[i];
  }
  return static_cast<double>(max_ns);
}

HistogramCounts SlotPoolMetrics::wait_histogram() const noexcept {
  HistogramCounts h;
  for (std::size_t i = 0; i < h.buckets.size(); ++i) {
    h.buckets[i] = wait_buckets[i].load(std::memory_order_relaxed);
  }
  h.sum_ns = wait_ns.load(std::memory_order_relaxed);
  h.max_ns = wait_max_ns.load(std::memory_order_relaxed);
  return h;
}

Metrics::Metrics() : shards_(new Shard[kShards]) {}

Metrics::~Metrics() = default;

void Metrics::record_call(std::size_t function, CK_RV rv, std::uint64_t ns) noexcept {
  Shard& shard = shards_[this_thread_shard()];
  shard.functions[function].latency.add(ns);
  if (rv != CKR_OK) [[unlikely]]
    shard.record_error(function, rv);
}

void Metrics::record_lock_wait(std::uint64_t ns) noexcept {
  shards_[this_thread_shard()].lock_wait.add(ns);
}

MetricsSnapshot Metrics::snapshot() const {
  MetricsSnapshot out;
  std::map<std::pair<std::size_t, CK_RV>, std::uint64_t> by_rv;
  for (std::size_t s = 0; s < kShards; ++s) {
    const Shard& shard = shards_[s];
    for (std::size_t f = 0; f < kFunctionCount; ++f) {
      shard.functions[f].latency.add_to(out.latency[f]);
      out.errors[f] += shard.functions[f].errors.load(std::memory_order_relaxed);
    }
    shard.lock_wait.add_to(out.lock_wait);
    for (const ErrorSlot& slot : shard.errors) {
      std::uint64_t key = slot.key.load(std::memory_order_relaxed);
      if (key == 0) continue;
      std::size_t function = static_cast<std::size_t>(key >> kRvBits) - 1;
      CK_RV rv = key & ((std::uint64_t{1} << kRvBits) - 1);
      by_rv[{function, rv}] += slot.count.load(std::memory_order_relaxed);
    }
    out.errors_unclassified += shard.errors_unclassified.load(std::memory_order_relaxed);
  }
  out.errors_by_rv.reserve(by_rv.size());
  for (const auto& [k, count] : by_rv) {
    if (count != 0) out.errors_by_rv.push_back({k.first, k.second, count});
  }
  for (std::size_t r = 0; r < kPolicyRuleCount; ++r)
    out.policy_denied[r] = policy_denied_[r].load(std::memory_order_relaxed);
  return out;
}

PoolMetricsRegistry::PoolMetricsRegistry(const LockSource& locks, std::string backend)
    : lock_(locks), backend_(std::move(backend)) {}

PoolMetricsRegistry::~PoolMetricsRegistry() {
  for (Node* n = head_.load(std::memory_order_relaxed); n != nullptr;)
    delete std::exchange(n, n->next);
}

SlotPoolMetrics* PoolMetricsRegistry::slot(CK_SLOT_ID slot) noexcept {
  auto find = [&]() -> SlotPoolMetrics* {
    for (Node* n = head_.load(std::memory_order_acquire); n != nullptr; n = n->next) {
      if (n->slot == slot) return &n->metrics;
    }
    return nullptr;
  };
  if (SlotPoolMetrics* m = find()) return m;
  MutexGuard guard(lock_);
  if (SlotPoolMetrics* m = find()) return m;  // added while we waited for the lock
  Node* node = new (std::nothrow) Node{slot, {}, head_.load(std::memory_order_relaxed)};
  if (node == nullptr) return nullptr;
  head_.store(node, std::memory_order_release);
  return &node->metrics;
}

}  // namespace p11mux
