#include "window.h"

#include <algorithm>

namespace p11mux::load {

MeasuredWindow::MeasuredWindow(std::optional<std::chrono::nanoseconds> length) noexcept
    : fixed_(length.has_value()), end_ns_(length ? std::max<std::int64_t>(length->count(), 0) : 0) {}

Part MeasuredWindow::part(Ticket::Phase ticket, std::chrono::nanoseconds end) const noexcept {
  if (!fixed_) return ticket == Ticket::Phase::warmup ? Part::warmup : Part::measured;
  if (end.count() < 0) return Part::warmup;
  return end.count() < end_ns_.load(std::memory_order_relaxed) ? Part::measured : Part::after_window;
}

void MeasuredWindow::cut(std::chrono::nanoseconds at) noexcept {
  if (!fixed_) return;
  const std::int64_t to = std::max<std::int64_t>(at.count(), 0);
  // Only the monitor thread cuts; a worker seeing the old end a moment longer
  // counts an op or two more, which is all a Ctrl-C can be precise to.
  if (to < end_ns_.load(std::memory_order_relaxed)) end_ns_.store(to, std::memory_order_relaxed);
}

double MeasuredWindow::seconds(std::chrono::nanoseconds last_end) const noexcept {
  const std::int64_t ns = fixed_ ? end_ns_.load(std::memory_order_relaxed) : last_end.count();
  return static_cast<double>(std::max<std::int64_t>(ns, 0)) / 1e9;
}

}  // namespace p11mux::load
