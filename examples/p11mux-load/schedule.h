// When each op runs and whether it is measured. Shared by all worker threads;
// next() is one relaxed atomic add at most, and never blocks (the caller
// sleeps until Ticket::start if it is in the future).
//
// Unpaced: an op starting before `warmup` has passed is a warmup op; after
//   `duration` (or once `count` measured ops were handed out) next() says stop.
// Paced (--rate R): op k of the run is due at t0 + k/R whichever thread takes
//   it. Latency is measured from that due time, not from when a thread got
//   round to it: if the module falls behind, the queueing shows in the
//   latency, as it would for a client sending requests at that rate (this
//   avoids "coordinated omission"). Ops due before t0 + warmup are warmup ops.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>

namespace p11mux::load {

using Clock = std::chrono::steady_clock;

struct Ticket {
  enum class Phase { warmup, measure, stop };
  Phase phase;
  Clock::time_point start;  // paced: the due time; unpaced: `now` as passed
};

class Schedule {
 public:
  Schedule(double warmup, std::optional<double> duration, std::optional<std::uint64_t> count,
           std::optional<double> rate);
  // Sets the run's start; call before any next(), with a happens-before edge
  // to the threads that call it.
  void begin(Clock::time_point t0) noexcept { t0_ = t0; }
  Schedule(const Schedule&) = delete;
  Schedule& operator=(const Schedule&) = delete;

  Ticket next(Clock::time_point now) noexcept;
  void stop() noexcept { stopped_.store(true, std::memory_order_relaxed); }
  bool stopped() const noexcept { return stopped_.load(std::memory_order_relaxed); }

  bool paced() const noexcept { return interval_ns_ > 0; }
  Clock::time_point measure_start() const noexcept { return t0_ + warmup_; }
  // Paced: the due time of op k of the run.
  Clock::time_point due(std::uint64_t k) const noexcept { return t0_ + offset(k); }

 private:
  std::chrono::nanoseconds offset(std::uint64_t k) const noexcept;

  Clock::time_point t0_{};
  std::chrono::nanoseconds warmup_;
  std::optional<std::chrono::nanoseconds> duration_;
  std::optional<std::uint64_t> count_;
  double interval_ns_ = 0;            // 0: unpaced
  std::uint64_t warmup_tickets_ = 0;  // paced: ops due before measure_start()
  std::atomic<std::uint64_t> taken_{0};
  std::atomic<bool> stopped_{false};
};

}  // namespace p11mux::load
