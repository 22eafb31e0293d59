// --timeline MS: successful ops and errors per interval of the measured phase,
// so that a script can see throughput fall and recover (scripts/bench.sh,
// failover: the time until throughput is back after a member dies).
// The counters are sized before the run; recording an op is two relaxed
// atomic adds at most, from any thread, and never allocates.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

namespace p11mux::load {

// What the reports print: interval i covers [i * interval, (i + 1) * interval)
// of the measured phase, by each op's end.
struct TimelineReport {
  std::chrono::milliseconds interval{0};
  std::int64_t start_unix_ms = 0;  // the wall clock when the measured phase began
  std::vector<std::uint64_t> ops;  // successful ops ending in each interval
  std::vector<std::uint64_t> errors;
};

class Timeline {
 public:
  // Intervals for `span` (the measured window); an op ending later counts in
  // the last interval.
  Timeline(std::chrono::milliseconds interval, std::chrono::nanoseconds span);
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  // An op that ended `since_start` into the measured phase.
  void record(std::chrono::nanoseconds since_start, bool ok) noexcept;
  void set_start_unix_ms(std::int64_t ms) noexcept { start_unix_ms_ = ms; }
  std::size_t size() const noexcept { return size_; }
  // The intervals covering [0, elapsed) (the measured window), at least one.
  TimelineReport report(std::chrono::nanoseconds elapsed) const;

 private:
  std::chrono::milliseconds interval_;
  std::size_t size_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> ops_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> errors_;
  std::int64_t start_unix_ms_ = 0;  // set before the threads start measuring
};

}  // namespace p11mux::load
