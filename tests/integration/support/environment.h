// Process environment for the tests: reading the test configuration, and setting
// a variable for the lifetime of a scope.
#pragma once

#include <optional>
#include <string>

namespace p11test {

// The value of variable name; throws std::runtime_error naming it if it is unset or empty.
std::string required_env(const char* name);

// The value of variable name, or fallback if it is unset or empty.
std::string env_or(const char* name, const std::string& fallback);

// Sets an environment variable and restores its previous value (or absence) on
// destruction. Not thread-safe (setenv never is): use during single-threaded set-up.
class ScopedEnv {
 public:
  ScopedEnv(std::string name, const std::string& value);
  ~ScopedEnv();
  // Copying would restore the variable twice.
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> previous_;
};

}  // namespace p11test
