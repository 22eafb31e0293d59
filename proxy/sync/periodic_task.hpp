// Work run every `period` on a p11mux thread of its own, by a Boost.Asio
// timer: the pool's maintenance (sessions/pool_maintenance.hpp) and the
// groups' member checks (group/group_runtime.hpp). Never started under
// CKF_LIBRARY_CANT_CREATE_OS_THREADS (the runtime's decision).
#pragma once

#include <chrono>
#include <functional>
#include <memory>

namespace p11mux {

class PeriodicTask {
 public:
  // Starts the thread, named `thread_name` (at most 15 characters), every
  // signal blocked (README, "Observability"). `work` must not throw: it runs
  // where an exception would end the process (one that does ends the task).
  PeriodicTask(const char* thread_name, std::chrono::milliseconds period,
               std::function<void()> work);
  // Stops the timer and joins the thread: a `work` in progress finishes first.
  ~PeriodicTask();
  PeriodicTask(const PeriodicTask&) = delete;  // owns a thread
  PeriodicTask& operator=(const PeriodicTask&) = delete;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace p11mux
