// The pool's maintenance task: on a p11mux thread, a Boost.Asio timer closes
// sessions idle longer than pool.idle_timeout_s and pings those idle longer
// than pool.keepalive_s (for HSMs that expire idle sessions, like YubiHSM 2
// after 30 s). Never started under CKF_LIBRARY_CANT_CREATE_OS_THREADS.
#pragma once

#include "sessions/session_pool.hpp"

#include <chrono>
#include <memory>

namespace p11mux {

class PoolMaintenance {
 public:
  // Starts the thread; does nothing when both periods are zero.
  PoolMaintenance(SessionPool& pool, std::chrono::seconds idle_timeout,
                  std::chrono::seconds keepalive);
  // Stops the timer and joins the thread.
  ~PoolMaintenance();
  PoolMaintenance(const PoolMaintenance&) = delete;  // owns a thread
  PoolMaintenance& operator=(const PoolMaintenance&) = delete;

  // How often the pool is looked at: often enough for both periods.
  static std::chrono::milliseconds interval(std::chrono::seconds idle_timeout,
                                            std::chrono::seconds keepalive) noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace p11mux
