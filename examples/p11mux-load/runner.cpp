#include "runner.h"

#include <sys/prctl.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <latch>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include "signals.h"
#include "window.h"

namespace p11mux::load {
namespace {

using std::chrono::duration_cast;
using std::chrono::nanoseconds;

std::uint64_t to_ns(Clock::duration d) {
  auto n = duration_cast<nanoseconds>(d).count();
  return n > 0 ? static_cast<std::uint64_t>(n) : 0;
}

// splitmix64: a fast, well-mixed generator for choosing ops from the mix.
std::uint64_t next_random(std::uint64_t& state) noexcept {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Sleeps until `when`, waking at least every 100 ms to notice a stop.
void sleep_until(Clock::time_point when, const Schedule& schedule) {
  while (!schedule.stopped()) {
    Clock::time_point now = Clock::now();
    if (now >= when) return;
    std::this_thread::sleep_until(std::min(when, now + std::chrono::milliseconds(100)));
  }
}

class Run {
 public:
  Run(const Plan& plan, RunContext ctx)
      : plan_(plan),
        ctx_(ctx),
        schedule_(plan.warmup, plan.duration, plan.count, plan.rate),
        window_(window_length(plan)),
        ready_(plan.threads),
        go_(1) {
    ctx_.schedule = &schedule_;
    out_.threads.reserve(plan.threads);
    for (unsigned i = 0; i < plan.threads; ++i) {
      out_.threads.push_back(std::make_unique<ThreadStats>(plan.mix, plan.rate.has_value()));
    }
    if (plan.timeline_ms && plan.duration) {
      // Only ops ending in the window are recorded (window.h).
      out_.timeline =
          std::make_unique<Timeline>(std::chrono::milliseconds(*plan.timeline_ms), *window_length(plan));
    }
  }

  RunOutput run(bool show_progress, const std::function<void()>& each_second) {
    start_threads();
    ready_.wait();
    if (setup_error_) {
      schedule_.stop();
      go_.count_down();
      join();
      throw SetupError(*setup_error_);
    }
    InterruptCatcher interrupts;
    const Clock::time_point t0 = Clock::now();
    schedule_.begin(t0);
    if (out_.timeline) {
      const auto to_start = schedule_.measure_start() - Clock::now();
      const auto unix_start = std::chrono::system_clock::now().time_since_epoch() +
                              duration_cast<std::chrono::system_clock::duration>(to_start);
      out_.timeline->set_start_unix_ms(duration_cast<std::chrono::milliseconds>(unix_start).count());
    }
    go_.count_down();
    monitor(t0, show_progress, each_second);
    join();

    std::uint64_t last_end = 0;
    for (const auto& t : out_.threads) last_end = std::max(last_end, t->last_end_ns);
    out_.elapsed = window_.seconds(nanoseconds(last_end));
    return std::move(out_);
  }

 private:
  static std::optional<nanoseconds> window_length(const Plan& plan) {
    if (!plan.duration) return std::nullopt;
    return duration_cast<nanoseconds>(std::chrono::duration<double>(*plan.duration));
  }

  void start_threads() {
    for (unsigned i = 0; i < plan_.threads; ++i) {
      try {
        threads_.emplace_back([this, i] { thread_main(i); });
      } catch (const std::system_error& e) {
        note_setup_error("cannot start thread " + std::to_string(i + 1) + " of " +
                         std::to_string(plan_.threads) + ": " + e.what());
        ready_.count_down(plan_.threads - i);  // for the threads that will never exist
        return;
      }
    }
  }

  void join() {
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }

  void note_setup_error(const std::string& message) {
    std::lock_guard lock(error_mutex_);
    if (!setup_error_) setup_error_ = message;
  }

  void thread_main(unsigned index) {
    std::optional<Worker> worker;
    try {
      worker.emplace(ctx_, index);
    } catch (const std::exception& e) {
      note_setup_error(e.what());
    }
    ready_.count_down();
    go_.wait();
    if (worker && !schedule_.stopped()) work(*worker, *out_.threads[index], index);
    finished_.fetch_add(1, std::memory_order_release);
  }

  // The hot loop: no locks, no allocations.
  void work(Worker& worker, ThreadStats& st, unsigned index) {
    const std::vector<MixEntry>& mix = plan_.mix.entries();
    const Clock::time_point measure_start = schedule_.measure_start();
    const bool paced = schedule_.paced();
    Timeline* const timeline = out_.timeline.get();
    // Paced threads sleep until each op is due; the default 50 us timer slack
    // would show up as latency of every op.
    if (paced) ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    std::uint64_t rng = ctx_.iv_seed ^ (0x632be59bd9b4e019ULL * (index + 1));

    for (;;) {
      Clock::time_point now = Clock::now();
      const Ticket ticket = schedule_.next(now);
      if (ticket.phase == Ticket::Phase::stop) break;
      if (paced) {
        if (ticket.start > now) sleep_until(ticket.start, schedule_);
        if (schedule_.stopped()) break;
        now = Clock::now();
      }
      const OpKind op = mix[plan_.mix.pick(next_random(rng))].op;
      worker.reset_untimed();
      const Outcome o = worker.execute(op);
      const Clock::time_point end = Clock::now() - worker.untimed();
      if (o.abandoned) continue;

      st.bump(st.live_ops);
      if (!o.ok()) st.bump(st.live_errors);
      const nanoseconds since = duration_cast<nanoseconds>(end - measure_start);
      const Part part = window_.part(ticket.phase, since);
      if (part == Part::warmup) {
        ++st.warmup_ops;
        if (!o.ok()) ++st.warmup_errors;
        continue;
      }
      if (part == Part::after_window) {
        AfterWindow& a = st.after_window;
        ++a.ops;
        a.check_failures += o.check_failures;
        if (!o.ok()) {
          ++a.errors;
          a.kinds.add(op, o.call, o.rv);
        }
        continue;
      }
      if (timeline != nullptr) timeline->record(since, o.ok());
      OpStats& os = *st.per_op[static_cast<std::size_t>(op)];
      ++os.ops;
      os.collisions += o.collisions;
      os.checks += o.checks;
      os.check_failures += o.check_failures;
      if (o.ok()) {
        os.latency.record(to_ns(end - ticket.start));  // paced: from the due time
        if (st.service) st.service->record(to_ns(end - now));
      } else {
        ++os.errors;
        st.errors.add(op, o.call, o.rv);
      }
      st.last_end_ns = std::max(st.last_end_ns, to_ns(end - measure_start));  // for --count
    }
  }

  // The main thread: progress once a second, Ctrl-C, waiting for the end.
  void monitor(Clock::time_point t0, bool show_progress, const std::function<void()>& each_second) {
    const Clock::time_point measure_start = schedule_.measure_start();
    Clock::time_point next_line = t0 + std::chrono::seconds(1);
    Clock::time_point next_tick = next_line;
    Clock::time_point last_time = t0;
    std::uint64_t last_ops = 0;
    while (finished_.load(std::memory_order_acquire) < threads_.size()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (InterruptCatcher::requested() && !out_.interrupted) {
        out_.interrupted = true;
        window_.cut(duration_cast<nanoseconds>(Clock::now() - measure_start));
        schedule_.stop();
        if (show_progress) std::fputs("p11mux-load: interrupted, finishing the ops in flight\n", stderr);
      }
      const Clock::time_point now = Clock::now();
      if (each_second && now >= next_tick) {
        next_tick += std::chrono::seconds(1);
        each_second();
      }
      if (!show_progress || now < next_line) continue;
      next_line += std::chrono::seconds(1);
      std::uint64_t ops = 0, errors = 0;
      for (const auto& t : out_.threads) {
        ops += t->live_ops.load(std::memory_order_relaxed);
        errors += t->live_errors.load(std::memory_order_relaxed);
      }
      const double dt = std::chrono::duration<double>(now - last_time).count();
      const double rate = dt > 0 ? static_cast<double>(ops - last_ops) / dt : 0.0;
      last_time = now;
      last_ops = ops;
      const double since = std::chrono::duration<double>(now - measure_start).count();
      char phase[64];
      if (since < 0) {
        std::snprintf(phase, sizeof phase, "warmup %4.0fs", std::chrono::duration<double>(now - t0).count());
      } else if (plan_.duration) {
        std::snprintf(phase, sizeof phase, "%4.0fs/%gs", since, *plan_.duration);
      } else {
        std::snprintf(phase, sizeof phase, "%6.0fs", since);
      }
      std::fprintf(stderr, "p11mux-load: [%s] %10.0f ops/s  %12" PRIu64 " ops  %" PRIu64 " errors\n", phase,
                   rate, ops, errors);
    }
  }

  const Plan& plan_;
  RunContext ctx_;
  Schedule schedule_;
  MeasuredWindow window_;
  std::latch ready_;
  std::latch go_;
  std::vector<std::thread> threads_;
  std::atomic<std::size_t> finished_{0};
  std::mutex error_mutex_;
  std::optional<std::string> setup_error_;
  RunOutput out_;
};

}  // namespace

RunOutput run_load(const Plan& plan, RunContext ctx, bool show_progress,
                   const std::function<void()>& each_second) {
  Run run(plan, ctx);
  return run.run(show_progress, each_second);
}

}  // namespace p11mux::load
