// p11mux's logger: spdlog, to stderr or a file, level from the configuration.
// Its sink is guarded by a p11mux Mutex, so in C_Initialize case 2 even the
// log lock goes through the application's callbacks.
#pragma once

#include "lock.hpp"

#include <spdlog/logger.h>

#include <memory>
#include <string>

namespace p11mux {

// Throws spdlog_ex naming the file when it cannot be opened.
std::shared_ptr<spdlog::logger> make_logger(spdlog::level::level_enum level,
                                            const std::string& file, const LockSource& locks);

// For errors before there is a configuration to say where logs go
// (an unreadable config file): straight to stderr.
void log_startup_error(const std::string& message) noexcept;

}  // namespace p11mux
