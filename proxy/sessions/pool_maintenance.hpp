// The pool's maintenance task: on a p11mux thread (sync/periodic_task.hpp),
// closes sessions idle longer than pool.idle_timeout_s and pings those idle
// longer than pool.keepalive_s (for HSMs that expire idle sessions, like
// YubiHSM 2 after 30 s). Never started under CKF_LIBRARY_CANT_CREATE_OS_THREADS.
#pragma once

#include "sessions/session_pool.hpp"
#include "sync/periodic_task.hpp"

#include <chrono>
#include <memory>

namespace p11mux {

class PoolMaintenance {
 public:
  // Starts the thread; does nothing when both periods are zero.
  PoolMaintenance(SessionPool& pool, std::chrono::seconds idle_timeout,
                  std::chrono::seconds keepalive);
  // The same for one slot of the pool, on a thread of its own, its calls
  // through `calls` (which outlives it): a group's member, so that one that
  // stops answering holds up only its own maintenance (docs/groups.md).
  PoolMaintenance(SessionPool& pool, CK_SLOT_ID slot, SessionPool::SlotCalls& calls,
                  std::chrono::seconds idle_timeout, std::chrono::seconds keepalive);

  // How often the pool is looked at: often enough for both periods.
  static std::chrono::milliseconds interval(std::chrono::seconds idle_timeout,
                                            std::chrono::seconds keepalive) noexcept;

 private:
  std::unique_ptr<PeriodicTask> task_;  // none when both periods are zero
};

}  // namespace p11mux
