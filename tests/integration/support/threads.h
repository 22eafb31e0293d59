// Running a test body on many threads at once, within a time and iteration budget.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace p11test {

// Whichever comes first: a number of iterations or a point in time.
class Budget {
 public:
  Budget(int iterations, std::chrono::milliseconds time)
      : iterations_(iterations), end_(std::chrono::steady_clock::now() + time) {}

  bool expired() const noexcept { return std::chrono::steady_clock::now() >= end_; }
  // True while iteration i (0-based) is still within the budget.
  bool allows(int i) const noexcept { return i < iterations_ && !expired(); }

 private:
  int iterations_;
  std::chrono::steady_clock::time_point end_;
};

// Starts count threads that call body(index) together (released at once once all
// exist) and joins them. An exception escaping a body is caught and returned as
// "thread N: what()"; an empty result means every body returned normally.
std::vector<std::string> run_in_threads(std::size_t count,
                                        const std::function<void(std::size_t)>& body);

}  // namespace p11test
