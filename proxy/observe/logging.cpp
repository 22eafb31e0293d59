#include "observe/logging.hpp"

#include "sync/thread_signals.hpp"

#include <spdlog/async_logger.h>
#include <spdlog/details/fmt_helper.h>
#include <spdlog/details/os.h>
#include <spdlog/details/thread_pool.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/rotating_file_sink.h>
#include <spdlog/sinks/sink.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
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
  // fork(): see hold_log_for_fork().
  void hold() noexcept ACQUIRE(lock_) {
    lock_.lock();
    try {
      inner_->flush();
    } catch (...) {  // a full disk must not stop fork()
    }
  }
  void release() noexcept RELEASE(lock_) { lock_.unlock(); }

  void set_pattern(const std::string& pattern) override {
    MutexGuard guard(lock_);
    inner_->set_pattern(pattern);
  }
  void set_formatter(std::unique_ptr<spdlog::formatter> formatter) override {
    MutexGuard guard(lock_);
    inner_->set_formatter(std::move(formatter));
  }

 private:
  std::shared_ptr<spdlog::sinks::sink> inner_ GUARDED_BY(lock_);
  Mutex lock_;  // a leaf of the lock order (lock.hpp)
};

// %k (ThreadIdFlag, for %t) is the calling thread's ID even with async
// logging: spdlog records it when the record is made.
constexpr const char* kPattern = "%Y-%m-%dT%H:%M:%S.%f p11mux[%P:%k] %l: %v";
constexpr std::size_t kAsyncQueue = 8192;  // records

// spdlog caches a thread's ID in a thread_local that nothing resets, so the
// thread that called fork() would go on logging its parent's thread ID in the
// child (`p11mux[child:parent]`), sync or async (the ID is taken when the
// record is made). The child's fork handler notes that stale ID and the
// thread's own (note_thread_id_after_fork), and %k writes the ID through
// them. Written only in a child's fork handler, when it has no other thread.
std::atomic<std::size_t> stale_thread_id{0};
std::atomic<std::size_t> forked_thread_id{0};

class ThreadIdFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    std::size_t id = msg.thread_id;
    if (id == stale_thread_id.load(std::memory_order_relaxed)) {
      id = forked_thread_id.load(std::memory_order_relaxed);
    }
    spdlog::details::fmt_helper::append_int(id, dest);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<ThreadIdFlag>();
  }
};

// Keeps the thread pool alive with the async logger. The returned logger
// pointer aliases this holder, so whoever drops the last reference destroys
// it (never the writer thread: queued records hold the async logger, not
// this holder). The pool goes first: its destructor drains the queue and
// joins the writer, so the logger and its sinks are destroyed after the
// thread that wrote through them is gone (a join ThreadSanitizer sees, too).
struct AsyncHolder {
  std::shared_ptr<spdlog::async_logger> logger;
  std::shared_ptr<spdlog::details::thread_pool> pool;
};

// The holder's deleter, found again through the logger's control block
// (std::get_deleter) for the count of dropped records.
struct HolderDeleter {
  AsyncHolder* holder = nullptr;
  void operator()(AsyncHolder* h) const noexcept { delete h; }
};

std::shared_ptr<spdlog::sinks::sink> make_sink(const Config::Log& config) {
  if (config.file.empty()) return std::make_shared<spdlog::sinks::stderr_sink_st>();
  if (config.rotate_size_kb != 0) {
    return std::make_shared<spdlog::sinks::rotating_file_sink_st>(
        config.file, config.rotate_size_kb * 1024, config.rotate_files);
  }
  return std::make_shared<spdlog::sinks::basic_file_sink_st>(config.file);
}

}  // namespace

std::shared_ptr<spdlog::logger> make_logger(const Config::Log& config, const LockSource& locks,
                                            bool may_create_threads) {
  auto sink = std::make_shared<LockedSink>(make_sink(config), locks);
  const bool async = config.async && may_create_threads && !locks.uses_app_callbacks();
  std::shared_ptr<spdlog::logger> logger;
  if (async) {
    auto* raw = new AsyncHolder;
    std::shared_ptr<AsyncHolder> holder(raw, HolderDeleter{raw});
    holder->pool = with_signals_blocked([] {
      return std::make_shared<spdlog::details::thread_pool>(
          kAsyncQueue, 1, [] { pthread_setname_np(pthread_self(), "p11mux-log"); });
    });
    holder->logger = std::make_shared<spdlog::async_logger>(
        "p11mux", std::move(sink), holder->pool, spdlog::async_overflow_policy::overrun_oldest);
    logger = std::shared_ptr<spdlog::logger>(holder, holder->logger.get());
  } else {
    // Not registered with spdlog's global registry: the logger belongs to the runtime.
    logger = std::make_shared<spdlog::logger>("p11mux", std::move(sink));
  }
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  formatter->add_flag<ThreadIdFlag>('k').set_pattern(kPattern);
  logger->set_formatter(std::move(formatter));
  logger->set_level(config.level);
  // Every record is flushed as it is written (by the writer thread with
  // async), so that a crash, abort() or SIGTERM loses none, and at exit or
  // fork() no record waits in a buffer. At info and above no record is made
  // per call, so this costs nothing there; at trace it is one write(2) per
  // call record, which the README's figures measure. Flushing every record
  // also makes a periodic flush (a thread, which
  // CKF_LIBRARY_CANT_CREATE_OS_THREADS forbids) and a flush at exit moot.
  logger->flush_on(spdlog::level::trace);
  // Asked for and not given: a warning, so that it shows at the default level.
  if (config.async && !async) {
    logger->warn("[log] async is off: {}", may_create_threads
                                               ? "the application's mutex callbacks are in use"
                                               : "CKF_LIBRARY_CANT_CREATE_OS_THREADS");
  }
  if (config.rotate_size_kb != 0 && config.file.empty()) {
    logger->warn("[log] rotate_size_kb needs [log] file: logging to stderr without rotation");
  }
  return logger;
}

std::size_t dropped_records(const std::shared_ptr<spdlog::logger>& log) noexcept {
  const auto* deleter = std::get_deleter<HolderDeleter>(log);
  return deleter != nullptr ? deleter->holder->pool->overrun_counter() : 0;
}

// NO_THREAD_SAFETY_ANALYSIS (both): the sinks' locks are held from the
// prepare handler of fork() to the parent's or child's handler.
void hold_log_for_fork(spdlog::logger& log) noexcept NO_THREAD_SAFETY_ANALYSIS {
  for (const auto& sink : log.sinks()) {
    if (auto* locked = dynamic_cast<LockedSink*>(sink.get())) locked->hold();
  }
}

void release_log_after_fork(spdlog::logger& log) noexcept NO_THREAD_SAFETY_ANALYSIS {
  for (const auto& sink : log.sinks()) {
    if (auto* locked = dynamic_cast<LockedSink*>(sink.get())) locked->release();
  }
}

void note_thread_id_after_fork() noexcept {
  stale_thread_id.store(spdlog::details::os::thread_id(), std::memory_order_relaxed);
  forked_thread_id.store(static_cast<std::size_t>(::syscall(SYS_gettid)),
                         std::memory_order_relaxed);
}

void log_startup_error(const std::string& message) noexcept {
  std::fprintf(stderr, "p11mux: error: %s\n", message.c_str());
}

}  // namespace p11mux
