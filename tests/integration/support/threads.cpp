#include "threads.h"

#include <exception>
#include <latch>
#include <mutex>
#include <thread>

namespace p11test {

std::vector<std::string> run_in_threads(std::size_t count,
                                        const std::function<void(std::size_t)>& body) {
  std::latch start(static_cast<std::ptrdiff_t>(count));
  std::mutex errors_mutex;
  std::vector<std::string> errors;  // guarded by errors_mutex
  std::vector<std::jthread> threads;
  threads.reserve(count);
  auto record = [&](std::size_t i, const std::string& what) {
    std::lock_guard lock(errors_mutex);
    errors.push_back("thread " + std::to_string(i) + ": " + what);
  };
  for (std::size_t i = 0; i < count; ++i) {
    try {
      threads.emplace_back([&, i] {
        start.arrive_and_wait();
        try {
          body(i);
        } catch (const std::exception& e) {
          record(i, e.what());
        } catch (...) {
          record(i, "unknown exception");
        }
      });
    } catch (...) {
      // Release the threads already waiting for the missing ones, join them, rethrow.
      start.count_down(static_cast<std::ptrdiff_t>(count - i));
      threads.clear();
      throw;
    }
  }
  threads.clear();  // joins
  return errors;
}

}  // namespace p11test
