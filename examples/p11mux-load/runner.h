// Runs the load: starts the worker threads, paces them, prints progress, and
// collects their statistics.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "operations.h"
#include "plan.h"
#include "stats.h"
#include "timeline.h"

namespace p11mux::load {

struct RunOutput {
  std::vector<std::unique_ptr<ThreadStats>> threads;
  double elapsed = 0.0;  // seconds ops/s divides by: MeasuredWindow::seconds (window.h)
  bool interrupted = false;
  std::unique_ptr<Timeline> timeline;  // with --timeline
};

// ctx.schedule is filled in here. Throws SetupError if a worker cannot set up
// (open its session, or be started at all); no op has run then. `each_second`
// (if set) runs on the main thread once a second while the load runs.
RunOutput run_load(const Plan& plan, RunContext ctx, bool show_progress,
                   const std::function<void()>& each_second = {});

}  // namespace p11mux::load
