#include "logging.hpp"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/sink.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <cstdio>

namespace p11mux {
namespace {

// Wraps a single-threaded sink with a p11mux Mutex.
class LockedSink final : public spdlog::sinks::sink {
 public:
  LockedSink(std::shared_ptr<spdlog::sinks::sink> inner, const LockSource& locks)
      : inner_(std::move(inner)), lock_(locks) {}

  void log(const spdlog::details::log_msg& msg) override {
    MutexGuard guard(lock_);
    inner_->log(msg);
  }
  void flush() override {
    MutexGuard guard(lock_);
    inner_->flush();
  }
  void set_pattern(const std::string& pattern) override {
    MutexGuard guard(lock_);
    inner_->set_pattern(pattern);
  }
  void set_formatter(std::unique_ptr<spdlog::formatter> formatter) override {
    MutexGuard guard(lock_);
    inner_->set_formatter(std::move(formatter));
  }

 private:
  std::shared_ptr<spdlog::sinks::sink> inner_;
  Mutex lock_;
};

constexpr const char* kPattern = "%Y-%m-%dT%H:%M:%S.%f p11mux[%P:%t] %l: %v";

}  // namespace

std::shared_ptr<spdlog::logger> make_logger(spdlog::level::level_enum level,
                                            const std::string& file, const LockSource& locks) {
  std::shared_ptr<spdlog::sinks::sink> inner;
  if (file.empty()) {
    inner = std::make_shared<spdlog::sinks::stderr_sink_st>();
  } else {
    inner = std::make_shared<spdlog::sinks::basic_file_sink_st>(file);
  }
  auto sink = std::make_shared<LockedSink>(std::move(inner), locks);
  // Not registered with spdlog's global registry: the logger belongs to the runtime.
  auto logger = std::make_shared<spdlog::logger>("p11mux", std::move(sink));
  logger->set_pattern(kPattern);
  logger->set_level(level);
  logger->flush_on(spdlog::level::warn);
  return logger;
}

void log_startup_error(const std::string& message) noexcept {
  std::fprintf(stderr, "p11mux: error: %s\n", message.c_str());
}

}  // namespace p11mux
