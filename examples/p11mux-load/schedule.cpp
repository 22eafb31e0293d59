#include "schedule.h"

#include <cmath>

namespace p11mux::load {
namespace {
std::chrono::nanoseconds to_ns(double seconds) {
  return std::chrono::nanoseconds(std::llround(seconds * 1e9));
}
}  // namespace

Schedule::Schedule(double warmup, std::optional<double> duration, std::optional<std::uint64_t> count,
                   std::optional<double> rate)
    : warmup_(to_ns(warmup)), count_(count) {
  if (duration) duration_ = to_ns(*duration);
  if (rate) {
    interval_ns_ = 1e9 / *rate;
    // First k whose due time is in the measured phase, computed with offset()
    // itself so that the two can never disagree by rounding.
    auto k = static_cast<std::uint64_t>(std::ceil(static_cast<double>(warmup_.count()) / interval_ns_));
    while (k > 0 && offset(k - 1) >= warmup_) --k;
    while (offset(k) < warmup_) ++k;
    warmup_tickets_ = k;
  }
}

std::chrono::nanoseconds Schedule::offset(std::uint64_t k) const noexcept {
  return std::chrono::nanoseconds(std::llround(static_cast<double>(k) * interval_ns_));
}

Ticket Schedule::next(Clock::time_point now) noexcept {
  if (stopped()) return {Ticket::Phase::stop, now};
  const Clock::time_point measure_from = measure_start();
  if (!paced()) {
    if (now < measure_from) return {Ticket::Phase::warmup, now};
    if (duration_ && now >= measure_from + *duration_) return {Ticket::Phase::stop, now};
    if (count_ && taken_.fetch_add(1, std::memory_order_relaxed) >= *count_) {
      return {Ticket::Phase::stop, now};
    }
    return {Ticket::Phase::measure, now};
  }
  const std::uint64_t k = taken_.fetch_add(1, std::memory_order_relaxed);
  const Clock::time_point at = due(k);
  if (k < warmup_tickets_) return {Ticket::Phase::warmup, at};
  if (duration_ && at >= measure_from + *duration_) return {Ticket::Phase::stop, at};
  if (count_ && k - warmup_tickets_ >= *count_) return {Ticket::Phase::stop, at};
  return {Ticket::Phase::measure, at};
}

}  // namespace p11mux::load
