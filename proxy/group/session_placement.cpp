#include "group/session_placement.hpp"

#include <p11mux/pkcs11.h>

#include <limits>

namespace p11mux {

SessionPlacement::SessionPlacement(Balance rule, std::span<const std::uint32_t> capacity)
    : rule_(rule),
      capacity_(capacity.begin(), capacity.end()),
      counts_(std::make_unique<Count[]>(capacity.size())) {}

void SessionPlacement::release(std::size_t member) noexcept {
  counts_[member].value.fetch_sub(1, std::memory_order_relaxed);
}

bool SessionPlacement::take(std::size_t member, std::uint32_t limit) noexcept {
  std::atomic<std::uint32_t>& count = counts_[member].value;
  if (limit == kUnlimited) {
    count.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  std::uint32_t seen = count.load(std::memory_order_relaxed);
  while (seen < limit) {
    if (count.compare_exchange_weak(seen, seen + 1, std::memory_order_relaxed)) return true;
  }
  return false;
}

std::size_t SessionPlacement::least_busy(const std::vector<bool>& refused) noexcept {
  const std::size_t n = size();
  // Ties go to the members in turn: the scan starts at the rotor.
  const std::size_t start = rotor_.fetch_add(1, std::memory_order_relaxed) % n;
  std::size_t best = kNone;
  std::uint32_t fewest = std::numeric_limits<std::uint32_t>::max();
  for (std::size_t k = 0; k < n; ++k) {
    const std::size_t i = (start + k) % n;
    if (refused[i]) continue;
    if (const std::uint32_t c = sessions(i); c < fewest) {
      fewest = c;
      best = i;
    }
  }
  if (best != kNone) take(best, kUnlimited);
  return best;
}

std::size_t SessionPlacement::choose(const std::vector<bool>& refused) noexcept {
  const std::size_t n = size();
  if (n == 0) return kNone;
  switch (rule_) {
    case Balance::round_robin: {
      const std::size_t start = rotor_.fetch_add(1, std::memory_order_relaxed) % n;
      for (std::size_t k = 0; k < n; ++k) {
        const std::size_t i = (start + k) % n;
        if (!refused[i] && take(i, kUnlimited)) return i;
      }
      return kNone;
    }
    case Balance::primary:
      for (std::size_t i = 0; i < n; ++i) {
        if (!refused[i] && take(i, capacity_[i])) return i;
      }
      return least_busy(refused);  // every member full
    case Balance::least_busy:
      break;
  }
  return least_busy(refused);
}

std::uint32_t session_capacity(unsigned long max_session_count) noexcept {
  if (max_session_count == CK_EFFECTIVELY_INFINITE ||
      max_session_count == CK_UNAVAILABLE_INFORMATION)
    return SessionPlacement::kUnlimited;
  return max_session_count > std::numeric_limits<std::uint32_t>::max()
             ? std::numeric_limits<std::uint32_t>::max()
             : static_cast<std::uint32_t>(max_session_count);
}

}  // namespace p11mux
