#include "sessions/pool_maintenance.hpp"

#include "sync/thread_signals.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <pthread.h>

#include <algorithm>
#include <thread>

namespace p11mux {

struct PoolMaintenance::State {
  State(SessionPool& p, std::chrono::seconds idle, std::chrono::seconds alive)
      : pool(p), idle_timeout(idle), keepalive(alive), period(interval(idle, alive)) {}
  SessionPool& pool;
  std::chrono::seconds idle_timeout, keepalive;
  std::chrono::milliseconds period;
  boost::asio::io_context io;
  boost::asio::steady_timer timer{io};
  std::thread thread;

  // Runs on the thread (as the timer's handler) where an exception would end
  // the process: a timer that cannot be armed (no memory) ends maintenance;
  // the pool's sessions are still closed at C_Finalize.
  void arm() noexcept {
    try {
      timer.expires_after(period);
      timer.async_wait([this](const boost::system::error_code& error) {
        if (error) return;  // cancelled: stopping
        pool.maintain(idle_timeout, keepalive);
        arm();
      });
    } catch (...) {
    }
  }
};

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
  state_ = std::make_unique<State>(pool, idle_timeout, keepalive);
  state_->arm();
  // A p11mux thread: every signal blocked (README, "Observability"), named.
  state_->thread = with_signals_blocked([s = state_.get()] {
    return std::thread([s]() noexcept {
      try {
        s->io.run();
      } catch (...) {
        // A handler's exception (none is expected) ends maintenance, not the process.
      }
    });
  });
  pthread_setname_np(state_->thread.native_handle(), "p11mux-pool");
}

PoolMaintenance::~PoolMaintenance() {
  if (!state_) return;
  // stop() neither allocates nor throws (a posted cancel could): run()
  // returns once a maintain() in progress has finished.
  state_->io.stop();
  state_->thread.join();
}

}  // namespace p11mux
