#include "timeline.h"

#include <algorithm>

namespace p11mux::load {

Timeline::Timeline(std::chrono::milliseconds interval, std::chrono::nanoseconds span)
    : interval_(std::max(interval, std::chrono::milliseconds(1))),
      size_(static_cast<std::size_t>(std::max<std::int64_t>(span / interval_, 0)) + 1),
      ops_(new std::atomic<std::uint64_t>[size_]),
      errors_(new std::atomic<std::uint64_t>[size_]) {
  for (std::size_t i = 0; i < size_; ++i) {
    ops_[i].store(0, std::memory_order_relaxed);
    errors_[i].store(0, std::memory_order_relaxed);
  }
}

void Timeline::record(std::chrono::nanoseconds since_start, bool ok) noexcept {
  if (since_start.count() < 0) return;  // warmup
  const auto i = std::min(static_cast<std::size_t>(since_start / interval_), size_ - 1);
  (ok ? ops_ : errors_)[i].fetch_add(1, std::memory_order_relaxed);
}

TimelineReport Timeline::report(std::chrono::nanoseconds elapsed) const {
  TimelineReport r;
  r.interval = interval_;
  r.start_unix_ms = start_unix_ms_;
  // The intervals that cover [0, elapsed), the last whole or not; at least one.
  const std::int64_t covered =
      (std::max(elapsed, std::chrono::nanoseconds(0)) + interval_ - std::chrono::nanoseconds(1)) / interval_;
  const std::size_t n = std::min(static_cast<std::size_t>(std::max<std::int64_t>(covered, 1)), size_);
  for (std::size_t i = 0; i < n; ++i) {
    r.ops.push_back(ops_[i].load(std::memory_order_relaxed));
    r.errors.push_back(errors_[i].load(std::memory_order_relaxed));
  }
  return r;
}

}  // namespace p11mux::load
