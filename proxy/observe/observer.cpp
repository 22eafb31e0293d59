#include "observe/observer.hpp"

#include "observe/logging.hpp"
#include "observe/stats_report.hpp"

#include <p11mux/ckr_error.hpp>

#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <iterator>

namespace p11mux {
namespace {

// SIGUSR1. The handler only counts the request and pokes the stats thread
// through an eventfd: both async-signal-safe. The eventfd lives as long as
// the process (so a handler on another thread never writes to a closed,
// reused fd); g_summary_fd is -1 while no stats thread reads it. These and
// g_previous are written only by C_Initialize and C_Finalize (which the
// Module serializes) and by the atfork child handler.
std::atomic<int> g_summary_fd{-1};
int g_eventfd = -1;
struct sigaction g_previous {};
bool g_installed = false;

extern "C" void on_summary_signal(int signo, siginfo_t* info, void* context) {
  int saved_errno = errno;
  Observer::count_summary_request();
  if (int fd = g_summary_fd.load(std::memory_order_acquire); fd >= 0) {
    std::uint64_t one = 1;
    ssize_t ignored = ::write(fd, &one, sizeof one);
    (void)ignored;
  }
  errno = saved_errno;
  // The application's own handler, if it had one, still runs.
  if ((g_previous.sa_flags & SA_SIGINFO) != 0) {
    if (g_previous.sa_sigaction != nullptr && g_previous.sa_sigaction != on_summary_signal) {
      g_previous.sa_sigaction(signo, info, context);
    }
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(signo);
  }
}

bool install_signal_handler(spdlog::logger& log) {
  if (g_installed) return true;  // still ours: a forked child's abandoned runtime installed it
  struct sigaction current {};
  if (::sigaction(SIGUSR1, nullptr, &current) != 0) return false;
  g_previous = current;  // before ours runs, so the handler never reads it half-written
  struct sigaction ours {};
  ours.sa_sigaction = on_summary_signal;
  ours.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&ours.sa_mask);
  if (::sigaction(SIGUSR1, &ours, nullptr) != 0) {
    log.warn("[metrics] signal: cannot install a SIGUSR1 handler (errno {})", errno);
    return false;
  }
  g_installed = true;
  return true;
}

void uninstall_signal_handler() {
  if (!g_installed) return;
  struct sigaction current {};
  // The application may have installed its own since: then it is not ours to undo.
  if (::sigaction(SIGUSR1, nullptr, &current) == 0 && (current.sa_flags & SA_SIGINFO) != 0 &&
      current.sa_sigaction == on_summary_signal) {
    ::sigaction(SIGUSR1, &g_previous, nullptr);
  }
  g_installed = false;
}

int summary_eventfd() {
  if (g_eventfd < 0) g_eventfd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  return g_eventfd;
}

std::array<bool, kFunctionCount> parse_functions(std::string_view list) {
  std::array<bool, kFunctionCount> traced{};
  bool any_included = false;
  std::array<bool, kFunctionCount> included{}, excluded{};
  while (!list.empty()) {
    std::size_t comma = list.find(',');
    std::string_view item = list.substr(0, comma);
    list.remove_prefix(comma == std::string_view::npos ? list.size() : comma + 1);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    if (item.empty()) continue;
    bool exclude = item.front() == '-';
    if (exclude) item.remove_prefix(1);
    std::optional<std::size_t> index = function_index_of(item);
    if (!index) {
      throw CkrError(CKR_GENERAL_ERROR,
                     "[log] functions: unknown PKCS#11 function '" + std::string(item) + "'");
    }
    (exclude ? excluded : included)[*index] = true;
    any_included = any_included || !exclude;
  }
  for (std::size_t f = 0; f < kFunctionCount; ++f)
    traced[f] = (!any_included || included[f]) && !excluded[f];
  return traced;
}

}  // namespace

std::atomic<std::uint32_t> Observer::summary_requests_{0};

Observer::Observer(const Config& config, const LockSource& locks, bool may_create_threads,
                   std::shared_ptr<spdlog::logger> log)
    : logger_(std::move(log)),
      log_(*logger_),
      may_create_threads_(may_create_threads),
      tracing_(log_.should_log(spdlog::level::trace)),
      signal_(config.metrics.signal),
      summary_at_finalize_(config.metrics.summary),
      traced_(parse_functions(config.log.functions)),
      min_trace_ns_(config.log.min_duration_us * 1000) {
  // A group configuration's backends are config.backends (Runtime::ports());
  // the single backend's figures carry no name (SlotFigures::backend).
  if (config.backends.empty()) pools_.push_back(std::make_unique<PoolMetricsRegistry>(locks));
  for (const NamedBackend& b : config.backends)
    pools_.push_back(std::make_unique<PoolMetricsRegistry>(locks, b.name));
  if (!config.metrics.listen.empty()) {
    listen_ = parse_listen(config.metrics.listen, config.metrics.allow_remote);
  }
  if (config.metrics.enabled || listen_ || signal_ || summary_at_finalize_) {
    metrics_ = std::make_unique<Metrics>();
  }
}

Observer::~Observer() { stop(); }

void Observer::start(const SessionTable& sessions,
                     std::function<std::vector<MemberFigures>()> members) noexcept {
  sessions_ = &sessions;
  members_ = std::move(members);
  summary_handled_.store(summary_requests_.load(std::memory_order_relaxed),
                         std::memory_order_relaxed);
  if (signal_) signal_installed_ = install_signal_handler(log_);
  if (!listen_ && !signal_installed_) return;
  if (!may_create_threads_) {
    // The application forbids threads (GnuTLS does): an endpoint asked for
    // does not start, and the user must be told at the default level.
    if (listen_) {
      log_.warn(
          "[metrics] listen: no endpoint: the application initialized p11mux with "
          "CKF_LIBRARY_CANT_CREATE_OS_THREADS");
    }
    polling_ = signal_installed_;
    return;
  }
  int fd = signal_installed_ ? summary_eventfd() : -1;
  // noexcept: whatever fails here (the handlers, the thread, the message
  // naming the endpoint) is logged at most, and the calls go on without it.
  try {
    StatsServer::Handlers handlers{[this] { return prometheus(); }, [this] { return json(); },
                                   [this] { log_summary(); }};
    server_ = std::make_unique<StatsServer>(listen_, fd, std::move(handlers));
  } catch (const std::exception& e) {
    try {
      log_.warn("[metrics] listen: endpoint '{}' not started: {}",
                listen_ ? (listen_->kind == ListenAddress::Kind::tcp
                               ? listen_->host + ":" + std::to_string(listen_->port)
                               : listen_->path)
                        : "",
                e.what());
    } catch (...) {
    }
    polling_ = signal_installed_;
    return;
  } catch (...) {
    polling_ = signal_installed_;
    return;
  }
  g_summary_fd.store(fd, std::memory_order_release);
  if (listen_) {
    log_.info("metrics endpoint: {} serves /metrics and /stats", server_->address());
    log_.flush();  // where to scrape is worth seeing at once
  }
}

void Observer::finalize() noexcept {
  if (summary_at_finalize_) log_summary();
  stop();
  log_.flush();
}

void Observer::stop() noexcept {
  if (server_) {
    g_summary_fd.store(-1, std::memory_order_release);
    server_->stop();
    server_.reset();
  }
  if (signal_installed_) {
    uninstall_signal_handler();
    signal_installed_ = false;
  }
  polling_ = false;
}

std::string Observer::endpoint() const { return server_ ? server_->address() : std::string(); }

LiveFigures Observer::live_figures() const {
  LiveFigures live;
  live.uptime_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  live.sessions_open = sessions_ != nullptr ? sessions_->live_count() : 0;
  live.log_records_dropped = dropped_records(logger_);
  for (const auto& pools : pools_) {
    std::vector<SlotFigures> slots = slot_figures(*pools);
    live.slots.insert(live.slots.end(), std::make_move_iterator(slots.begin()),
                      std::make_move_iterator(slots.end()));
  }
  if (members_) live.members = members_();
  return live;
}

std::string Observer::prometheus() const {
  return prometheus_text(metrics_ ? metrics_->snapshot() : MetricsSnapshot{}, live_figures());
}

std::string Observer::json() const {
  return stats_json(metrics_ ? metrics_->snapshot() : MetricsSnapshot{}, live_figures());
}

void Observer::log_summary() noexcept {
  // Written at info, or at the configured level when that is higher, so that
  // it appears whenever logging is not off.
  auto level = std::max(spdlog::level::info, log_.level());
  if (level == spdlog::level::off || !metrics_) return;
  try {
    for (const std::string& line : summary_lines(metrics_->snapshot(), live_figures())) {
      log_.log(level, "{}", line);
    }
    log_.flush();
  } catch (...) {
    // The summary is a courtesy; it must not take the process down.
  }
}

void Observer::take_summary_request() noexcept {
  std::uint32_t requested = summary_requests_.load(std::memory_order_relaxed);
  // One caller writes it, however many calls notice at once.
  if (summary_handled_.exchange(requested, std::memory_order_relaxed) != requested) log_summary();
}

void Observer::count_summary_request() noexcept {
  summary_requests_.fetch_add(1, std::memory_order_relaxed);
}

void Observer::after_fork() noexcept {
  StatsServer::after_fork();
  g_summary_fd.store(-1, std::memory_order_relaxed);
  // The parent's eventfd is shared with the child: the child gets its own.
  if (g_eventfd >= 0) {
    ::close(g_eventfd);
    g_eventfd = -1;
  }
}

}  // namespace p11mux
