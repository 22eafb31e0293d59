// A log-bucketed latency histogram in the manner of HdrHistogram: exact below
// 128 ns, then 128 buckets per power of two, so any recorded value is known to
// within 1/128 (0.8%). One per thread and op; record() neither locks nor
// allocates. Histograms are merged after the threads have stopped.
#pragma once

#include <cstdint>
#include <memory>

namespace p11mux::load {

class LatencyHistogram {
 public:
  static constexpr unsigned kSubBits = 7;
  static constexpr unsigned kMaxBits = 36;  // values from 2^36 ns (68.7 s) up count as 2^36-1
  static constexpr std::uint64_t kMaxValue = (std::uint64_t{1} << kMaxBits) - 1;
  static constexpr std::size_t kBuckets = (std::size_t{1} << kSubBits) * (kMaxBits - kSubBits + 1);

  LatencyHistogram();
  LatencyHistogram(const LatencyHistogram&) = delete;  // 30 KiB: copies are never what is meant
  LatencyHistogram& operator=(const LatencyHistogram&) = delete;
  LatencyHistogram(LatencyHistogram&&) noexcept = default;  // leaves the source unusable
  LatencyHistogram& operator=(LatencyHistogram&&) noexcept = default;

  void record(std::uint64_t ns) noexcept {
    if (ns > kMaxValue) ns = kMaxValue;
    ++counts_[bucket_of(ns)];
    ++total_;
    sum_ += ns;
    if (ns < min_) min_ = ns;
    if (ns > max_) max_ = ns;
  }
  void merge(const LatencyHistogram& other) noexcept;

  std::uint64_t count() const noexcept { return total_; }
  std::uint64_t min() const noexcept { return total_ ? min_ : 0; }
  std::uint64_t max() const noexcept { return max_; }
  double mean() const noexcept {
    return total_ ? static_cast<double>(sum_) / static_cast<double>(total_) : 0.0;
  }
  // The smallest recorded value v such that at least `percent`% of the values
  // are <= v, to bucket precision (the bucket's highest value, within min..max).
  // 0 when empty; percentile(100) == max().
  std::uint64_t percentile(double percent) const noexcept;

  static std::size_t bucket_of(std::uint64_t ns) noexcept;
  static std::uint64_t bucket_low(std::size_t bucket) noexcept;
  static std::uint64_t bucket_high(std::size_t bucket) noexcept;

 private:
  std::unique_ptr<std::uint64_t[]> counts_;
  std::uint64_t total_ = 0;
  std::uint64_t sum_ = 0;
  std::uint64_t min_ = UINT64_MAX;
  std::uint64_t max_ = 0;
};

}  // namespace p11mux::load
