// Which ops a run's figures count, and what ops/s divides them by (README.md,
// "What ops/s means").
//
// --duration: the measured window is [measured start, + duration), and an op
//   counts by where it ENDED. Ops ending in the window are measured, whenever
//   they started (those issued during the warmup too); ops still in flight at
//   its end are "after the window" and leave ops/s and latency out; ops ending
//   before it are warmup. ops/s is the measured ops divided by the window's
//   length, so it is the rate the module completed ops at during the window.
//   Counting the ops ISSUED in the window over the time until the last of them
//   ended instead adds one queue wait to the time: with 256 threads waiting
//   for 4 backend sessions, 85 ms on 1.5 s, 5.5% too low.
// --count: the run has no fixed end; the ops handed out as measured count,
//   over the time until the last of them ended.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>

#include "schedule.h"

namespace p11mux::load {

enum class Part { warmup, measured, after_window };

class MeasuredWindow {
 public:
  // `length`: the --duration; nullopt for a --count run.
  explicit MeasuredWindow(std::optional<std::chrono::nanoseconds> length) noexcept;
  MeasuredWindow(const MeasuredWindow&) = delete;
  MeasuredWindow& operator=(const MeasuredWindow&) = delete;

  // Where an op with this ticket, ending `end` after the measured start
  // (negative: before it), counts. One relaxed atomic load: any thread.
  Part part(Ticket::Phase ticket, std::chrono::nanoseconds end) const noexcept;
  // Ctrl-C at `at` after the measured start: the window ends there, so the
  // ops in flight then count as after it (--duration only).
  void cut(std::chrono::nanoseconds at) noexcept;
  // The seconds ops/s divides by: the window's length (--duration), or the
  // end of the last measured op, `last_end` (--count).
  double seconds(std::chrono::nanoseconds last_end) const noexcept;

 private:
  bool fixed_;                        // --duration
  std::atomic<std::int64_t> end_ns_;  // --duration: the window's end, after cut()
};

}  // namespace p11mux::load
