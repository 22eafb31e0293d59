// The metrics as text: Prometheus exposition format (/metrics), a JSON
// snapshot (/stats), and the summary table written to the log at C_Finalize
// ([metrics] summary) and on SIGUSR1 ([metrics] signal). Pure functions of a snapshot, so tests can
// check them.
#pragma once

#include "observe/metrics.hpp"

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace p11mux {

// One backend's pool on one of its slots. In a group configuration several
// backends may share a slot ID, and `backend` tells their figures apart: each
// rendering names it (a `backend` label, a "backend" key, "backend NAME" in
// the summary). In the single-backend configuration it is empty and named
// nowhere, so the output stays as it was before groups (dashboards and
// scrapers keep working).
struct SlotFigures {
  std::string backend;  // the [backend.NAME] name; empty: the single backend
  CK_SLOT_ID slot = 0;
  std::int64_t open = 0, idle = 0, in_use = 0;
  std::uint64_t waits = 0, wait_ns = 0, discarded_dead = 0;
  std::array<std::uint64_t, kCloseReasonCount> unclean{};  // closed instead of pooled, by reason
  std::int64_t virtual_sessions = 0;                       // the application's sessions on the slot
  HistogramCounts wait;                                    // how long each call that waited did

  // Virtual sessions per backend session open ([pool] bind = state shares
  // few backend sessions among many); with none open, the virtual ones.
  double virtual_per_backend() const noexcept {
    return static_cast<double>(virtual_sessions) / static_cast<double>(open > 0 ? open : 1);
  }
};

// One member of a group (docs/groups.md, "Members up and down"): its
// health's counters and the group's sessions placed on it.
struct MemberFigures {
  std::string group;      // the group's name
  std::string member;     // as configured: BACKEND/label:LABEL or BACKEND/serial:SERIAL
  std::string state;      // up, down, probing, joining
  std::string last_down;  // why it last went down: none, device, sessions_gone, hung, ...
  std::uint64_t in_flight = 0, calls = 0, errors = 0, downs = 0, hung = 0, failovers = 0,
                replays = 0, sessions = 0;
  // False: it refused the group's kept login (or none was kept to log it
  // in), and new sessions pass it over until the application logs in
  // again (docs/groups.md, "Keeping the PIN").
  bool login_ready = true;
};

// Figures read at the moment of the report, beside the counters.
struct LiveFigures {
  double uptime_s = 0;
  std::uint64_t sessions_open = 0;  // virtual sessions
  std::uint64_t log_records_dropped = 0;
  std::vector<SlotFigures> slots;      // by backend (in configuration order), then slot ID
  std::vector<MemberFigures> members;  // of every group, in configuration order
};

// One backend's slots (its registry's), by slot ID.
std::vector<SlotFigures> slot_figures(const PoolMetricsRegistry& pools);

// Only functions that were called appear; every metric family has its HELP
// and TYPE lines even without samples.
std::string prometheus_text(const MetricsSnapshot& metrics, const LiveFigures& live);
std::string stats_json(const MetricsSnapshot& metrics, const LiveFigures& live);
// One log line each; functions by number of calls, most first.
std::vector<std::string> summary_lines(const MetricsSnapshot& metrics, const LiveFigures& live);

}  // namespace p11mux
