#include "sync/periodic_task.hpp"

#include "sync/thread_signals.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <pthread.h>

#include <thread>
#include <utility>

namespace p11mux {

struct PeriodicTask::State {
  State(std::chrono::milliseconds p, std::function<void()> w) : period(p), work(std::move(w)) {}
  std::chrono::milliseconds period;
  std::function<void()> work;
  boost::asio::io_context io;
  boost::asio::steady_timer timer{io};
  std::thread thread;

  // Runs on the thread (as the timer's handler) where an exception would end
  // the process: a timer that cannot be armed (no memory) ends the task.
  void arm() noexcept {
    try {
      timer.expires_after(period);
      timer.async_wait([this](const boost::system::error_code& error) {
        if (error) return;  // cancelled: stopping
        work();
        arm();
      });
    } catch (...) {
    }
  }
};

PeriodicTask::PeriodicTask(const char* thread_name, std::chrono::milliseconds period,
                           std::function<void()> work)
    : state_(std::make_unique<State>(period, std::move(work))) {
  state_->arm();
  state_->thread = with_signals_blocked([s = state_.get()] {
    return std::thread([s]() noexcept {
      try {
        s->io.run();
      } catch (...) {
        // A handler's exception (none is expected) ends the task, not the process.
      }
    });
  });
  pthread_setname_np(state_->thread.native_handle(), thread_name);
}

PeriodicTask::~PeriodicTask() {
  // stop() neither allocates nor throws (a posted cancel could): run()
  // returns once a `work` in progress has finished.
  state_->io.stop();
  state_->thread.join();
}

}  // namespace p11mux
