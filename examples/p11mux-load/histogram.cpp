#include "histogram.h"

#include <bit>
#include <cmath>

namespace p11mux::load {
namespace {
constexpr std::uint64_t kSub = std::uint64_t{1} << LatencyHistogram::kSubBits;
}

LatencyHistogram::LatencyHistogram() : counts_(new std::uint64_t[kBuckets]()) {}

std::size_t LatencyHistogram::bucket_of(std::uint64_t ns) noexcept {
  if (ns < kSub) return static_cast<std::size_t>(ns);
  // shift = how many low bits are dropped; the kSubBits bits below the leading
  // one select the bucket within the power of two.
  unsigned shift = static_cast<unsigned>(std::bit_width(ns)) - 1 - kSubBits;
  std::uint64_t mantissa = (ns >> shift) & (kSub - 1);
  return static_cast<std::size_t>(kSub + shift * kSub + mantissa);
}

std::uint64_t LatencyHistogram::bucket_low(std::size_t bucket) noexcept {
  if (bucket < kSub) return bucket;
  std::uint64_t k = bucket - kSub;
  std::uint64_t shift = k >> kSubBits;
  std::uint64_t mantissa = k & (kSub - 1);
  return (kSub + mantissa) << shift;
}

std::uint64_t LatencyHistogram::bucket_high(std::size_t bucket) noexcept {
  if (bucket < kSub) return bucket;
  std::uint64_t shift = (bucket - kSub) >> kSubBits;
  return bucket_low(bucket) + (std::uint64_t{1} << shift) - 1;
}

void LatencyHistogram::merge(const LatencyHistogram& other) noexcept {
  if (other.total_ == 0) return;
  for (std::size_t i = 0; i < kBuckets; ++i) counts_[i] += other.counts_[i];
  total_ += other.total_;
  sum_ += other.sum_;
  if (other.min_ < min_) min_ = other.min_;
  if (other.max_ > max_) max_ = other.max_;
}

std::uint64_t LatencyHistogram::percentile(double percent) const noexcept {
  if (total_ == 0) return 0;
  if (percent >= 100.0) return max_;
  if (percent < 0.0) percent = 0.0;
  auto rank = static_cast<std::uint64_t>(std::ceil(percent / 100.0 * static_cast<double>(total_)));
  if (rank <= 1) return min_;  // the smallest and largest values are known exactly
  if (rank >= total_) return max_;
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < kBuckets; ++i) {
    seen += counts_[i];
    if (seen >= rank) {
      std::uint64_t v = bucket_high(i);
      if (v > max_) v = max_;
      if (v < min_) v = min_;
      return v;
    }
  }
  return max_;
}

}  // namespace p11mux::load
