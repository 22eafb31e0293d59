// Everything p11mux does to be watched, for one initialization: the trace
// filters, the metrics, the stats thread (HTTP endpoint and SIGUSR1), and
// the summary table at C_Finalize when [metrics] summary asks for it. The runtime owns one; calls
// reach it only when tracing or metrics are on (Runtime::slow_path), so with both off the cost is
// one predictable branch per call.
//
// Threads: the stats thread is started only when [metrics] listen or signal
// asks for it, and never under CKF_LIBRARY_CANT_CREATE_OS_THREADS. Without
// it, a SIGUSR1 summary is written by the next call that is observed.
#pragma once

#include "config/config.hpp"
#include "observe/metrics.hpp"
#include "observe/stats_report.hpp"
#include "observe/stats_server.hpp"
#include "sessions/session_table.hpp"
#include "sync/lock.hpp"

#include <spdlog/logger.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace p11mux {

struct LiveFigures;

class Observer {
 public:
  // Parses [log] functions and [metrics] listen: throws CkrError naming a bad
  // value (an unknown function, a non-loopback address...).
  Observer(const Config& config, const LockSource& locks, bool may_create_threads,
           std::shared_ptr<spdlog::logger> log);
  ~Observer();                         // stop()
  Observer(const Observer&) = delete;  // threads and signal handlers point at it
  Observer& operator=(const Observer&) = delete;

  // True when calls must go through observed_call: tracing or metrics on.
  bool active() const noexcept { return tracing_ || metrics_ != nullptr; }
  // Traced: at `trace` level and passing [log] functions.
  bool traces(std::size_t function) const noexcept { return tracing_ && traced_[function]; }
  std::uint64_t min_trace_ns() const noexcept { return min_trace_ns_; }
  Metrics* metrics() noexcept { return metrics_.get(); }
  // The per-slot figures of backend `backend`'s pool (updated by the pool
  // whether metrics are on or not): in a group configuration, config.backends'
  // in that order, one registry each (slot IDs are each backend's own); in
  // the single-backend configuration, one for backend 0.
  PoolMetricsRegistry& pools(std::size_t backend) noexcept { return *pools_[backend]; }

  // Once the runtime is complete: installs the SIGUSR1 handler and starts the
  // stats thread as configured. An endpoint that cannot be bound (address in
  // use: a parent process may still serve it after fork) is logged, not fatal.
  // `members` (may be empty: no groups) gives the groups' member figures
  // for each report; it must stay valid until stop().
  void start(const SessionTable& sessions,
             std::function<std::vector<MemberFigures>()> members = {}) noexcept;
  // C_Finalize, after the last call: the summary table to the log if
  // [metrics] summary asks for it (a short-lived tool must not print a table
  // at every exit because an endpoint is configured), then stop().
  void finalize() noexcept;
  // Stops the stats thread and gives SIGUSR1 back. Idempotent.
  void stop() noexcept;

  // Without a stats thread, the observed path writes a requested summary.
  void poll_summary_request() noexcept {
    if (polling_ && summary_requests_.load(std::memory_order_relaxed) !=
                        summary_handled_.load(std::memory_order_relaxed)) [[unlikely]] {
      take_summary_request();
    }
  }

  std::string prometheus() const;
  std::string json() const;
  void log_summary() noexcept;
  // "127.0.0.1:9464" or a socket path while the endpoint runs; empty otherwise.
  std::string endpoint() const;

  // The pthread_atfork child handler's part: no locks, no allocation.
  static void after_fork() noexcept;
  // The SIGUSR1 handler's part: async-signal-safe.
  static void count_summary_request() noexcept;

 private:
  LiveFigures live_figures() const;
  void take_summary_request() noexcept;

  // No lock guards these (thread_safety.hpp): the constructor, start() and
  // stop() write them on the initializing or finalizing thread, before the
  // stats thread starts and before any call gets in, or after both are over;
  // in between they are only read. The figures they point at are atomics.
  const std::shared_ptr<spdlog::logger> logger_;  // for dropped_records()
  spdlog::logger& log_;
  const bool may_create_threads_;
  const bool tracing_;
  const bool signal_;
  const bool summary_at_finalize_;
  std::array<bool, kFunctionCount> traced_{};
  std::uint64_t min_trace_ns_ = 0;
  std::unique_ptr<Metrics> metrics_;
  std::vector<std::unique_ptr<PoolMetricsRegistry>> pools_;  // by backend; never empty
  std::optional<ListenAddress> listen_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  const SessionTable* sessions_ = nullptr;
  std::function<std::vector<MemberFigures>()> members_;
  std::unique_ptr<StatsServer> server_;
  bool polling_ = false;
  bool signal_installed_ = false;

  static std::atomic<std::uint32_t> summary_requests_;  // SIGUSR1s received, ever
  std::atomic<std::uint32_t> summary_handled_{0};
};

}  // namespace p11mux
