// p11mux's logger: spdlog, to stderr, a file or a rotating file, level from
// the configuration. Its sink is guarded by a p11mux Mutex, so in
// C_Initialize case 2 even the log lock goes through the application's
// callbacks.
//
// With [log] async the caller formats its record and queues it; a p11mux
// thread writes it, so no caller waits on I/O. When the queue is full the
// oldest record is dropped rather than the caller blocked (counted: see
// dropped_records). Async needs a thread and a queue lock of its own, so it
// stays off under CKF_LIBRARY_CANT_CREATE_OS_THREADS and with the
// application's mutex callbacks; the logger then says so at warn level.
#pragma once

#include "config/config.hpp"
#include "sync/lock.hpp"

#include <spdlog/logger.h>

#include <cstddef>
#include <memory>
#include <string>

namespace p11mux {

// Throws spdlog_ex naming the file when it cannot be opened. An async
// logger's thread lives as long as the last reference to the logger, and is
// joined by whoever drops it, after the queue is drained.
std::shared_ptr<spdlog::logger> make_logger(const Config::Log& config, const LockSource& locks,
                                            bool may_create_threads);

// Records an async logger dropped because its queue was full; 0 otherwise.
std::size_t dropped_records(const std::shared_ptr<spdlog::logger>& log) noexcept;

// fork(): the atfork prepare handler flushes the log and holds its sink
// until the fork is over, so that the child's copy of the file's buffer is
// empty (at its exit, the child would write the parent's records again) and
// no record is half-written into it. Parent and child release it.
void hold_log_for_fork(spdlog::logger& log) noexcept;
void release_log_after_fork(spdlog::logger& log) noexcept;

// In the child, in the thread that called fork(): its records carry its own
// thread ID again, not its parent's.
void note_thread_id_after_fork() noexcept;

// For errors before there is a configuration to say where logs go
// (an unreadable config file): straight to stderr.
void log_startup_error(const std::string& message) noexcept;

}  // namespace p11mux
