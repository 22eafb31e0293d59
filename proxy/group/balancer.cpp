#include "group/balancer.hpp"

namespace p11mux {

namespace {

std::vector<std::uint32_t> capacities(std::size_t n, std::span<const std::uint32_t> given) {
  std::vector<std::uint32_t> out(n, Balancer::kUnlimited);
  for (std::size_t i = 0; i < n && i < given.size(); ++i) out[i] = given[i];
  return out;
}

}  // namespace

Balancer::Balancer(Balance rule, std::span<MemberHealth* const> members,
                   std::span<const std::uint32_t> capacity,
                   std::span<const std::atomic<bool>> passed_over)
    : rule_(rule),
      members_(members.begin(), members.end()),
      capacity_(capacities(members.size(), capacity)),
      passed_over_(passed_over) {}

Balancer::Pick Balancer::begin_on(std::size_t i) noexcept {
  members_[i]->begin();
  return keep_if_up(i);
}

Balancer::Pick Balancer::keep_if_up(std::size_t i) noexcept {
  // Counted first, checked after: a member marked down before this load is
  // never kept, and one marked down after it sees this call in flight.
  if (members_[i]->up()) return Pick{i};
  members_[i]->cancel();
  return Pick{};
}

Balancer::Pick Balancer::pick() noexcept {
  // A member can go down between the choice and the count: choose again, at
  // most once per member (each retry found one more member down, or lost a
  // race to a thread that then holds a call on it).
  for (std::size_t attempt = 0; attempt <= members_.size(); ++attempt) {
    Pick p;
    switch (rule_) {
      case Balance::least_busy:
        p = least_busy();
        break;
      case Balance::round_robin:
        p = round_robin();
        break;
      case Balance::primary:
        p = primary();
        break;
    }
    if (p) return p;
    bool any_up = false;
    for (std::size_t i = 0; i < members_.size(); ++i) any_up = any_up || eligible(i);
    if (!any_up) return Pick{};
  }
  return Pick{};
}

Balancer::Pick Balancer::least_busy() noexcept {
  const std::size_t n = members_.size();
  std::uint32_t least = ~std::uint32_t{0};
  std::size_t ties = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (!eligible(i)) continue;
    const std::uint32_t busy = members_[i]->load();
    if (busy < least) {
      least = busy;
      ties = 1;
    } else if (busy == least) {
      ++ties;
    }
  }
  if (ties == 0) return Pick{};
  // Among equals, take turns: with one call at a time (all idle), a
  // sequential application still spreads its sessions over the members.
  std::size_t k = ties == 1 ? 0 : rotor_.fetch_add(1, std::memory_order_relaxed) % ties;
  for (std::size_t i = 0; i < n; ++i) {
    if (!eligible(i) || members_[i]->load() != least) continue;
    if (k-- == 0) return begin_on(i);
  }
  // The counts moved under the second pass: take the least busy of now.
  std::size_t best = kNone;
  for (std::size_t i = 0; i < n; ++i) {
    if (eligible(i) && (best == kNone || members_[i]->load() < members_[best]->load())) {
      best = i;
    }
  }
  return best == kNone ? Pick{} : begin_on(best);
}

Balancer::Pick Balancer::round_robin() noexcept {
  // The turn is among the members up, so each takes an equal share: passing
  // a down member's turn to its neighbour would give that one twice as many.
  std::size_t up = 0;
  for (std::size_t i = 0; i < members_.size(); ++i) up += eligible(i) ? 1 : 0;
  if (up == 0) return Pick{};
  std::size_t k = rotor_.fetch_add(1, std::memory_order_relaxed) % up;
  for (std::size_t i = 0; i < members_.size(); ++i) {
    if (eligible(i) && k-- == 0) return begin_on(i);
  }
  return Pick{};  // one went down between the passes: pick() chooses again
}

Balancer::Pick Balancer::primary() noexcept {
  for (std::size_t i = 0; i < members_.size(); ++i) {
    if (!eligible(i)) continue;
    if (capacity_[i] == kUnlimited) return begin_on(i);
    if (members_[i]->begin_below(capacity_[i])) return keep_if_up(i);
  }
  // Every member up is full: the call goes where the fewest wait (the
  // runtime's session limit then decides whether it waits).
  return least_busy();
}

}  // namespace p11mux
