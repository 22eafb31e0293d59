#include "sessions/pool_maintenance.hpp"

#include <algorithm>

namespace p11mux {

std::chrono::milliseconds PoolMaintenance::interval(std::chrono::seconds idle_timeout,
                                                    std::chrono::seconds keepalive) noexcept {
  auto shortest = std::chrono::seconds::max();
  if (idle_timeout.count() > 0) shortest = std::min(shortest, idle_timeout);
  if (keepalive.count() > 0) shortest = std::min(shortest, keepalive);
  // A quarter of the shortest period: a session is handled at most 25% late.
  auto quarter = std::chrono::duration_cast<std::chrono::milliseconds>(shortest) / 4;
  return std::max(quarter, std::chrono::milliseconds(100));
}

PoolMaintenance::PoolMaintenance(SessionPool& pool, std::chrono::seconds idle_timeout,
                                 std::chrono::seconds keepalive) {
  if (idle_timeout.count() == 0 && keepalive.count() == 0) return;
  task_ = std::make_unique<PeriodicTask>(
      "p11mux-pool", interval(idle_timeout, keepalive),
      [&pool, idle_timeout, keepalive] { pool.maintain(idle_timeout, keepalive); });
}

PoolMaintenance::PoolMaintenance(SessionPool& pool, CK_SLOT_ID slot, SessionPool::SlotCalls& calls,
                                 std::chrono::seconds idle_timeout,
                                 std::chrono::seconds keepalive) {
  if (idle_timeout.count() == 0 && keepalive.count() == 0) return;
  task_ = std::make_unique<PeriodicTask>("p11mux-pool", interval(idle_timeout, keepalive),
                                         [&pool, slot, &calls, idle_timeout, keepalive] {
                                           pool.maintain(slot, idle_timeout, keepalive, calls);
                                         });
}

}  // namespace p11mux
