// The end-of-run summary: a table for people, or one JSON object for scripts.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>

#include "plan.h"
#include "stats.h"

namespace p11mux::load {

// What was run against what, for the summary's header.
struct RunInfo {
  std::string module_path;
  std::string module_description;
  std::string token_label;
  CK_SLOT_ID slot = 0;
  bool logged_in = false;
  bool module_thread_safe = true;
};

void print_human(std::ostream& out, const Plan& plan, const RunInfo& info, const Summary& s);
void print_json(std::ostream& out, const Plan& plan, const RunInfo& info, const Summary& s);
// --timeline: one line per interval (print_human calls it).
void print_timeline(std::ostream& out, const TimelineReport& t);
// {"interval_ms":..,"start_unix_ms":..,"ops_per_interval":[..],"errors_per_interval":[..]}
std::string json_timeline(const TimelineReport& t);

// "812 ns", "12.3 us", "1.23 ms", "1.05 s": three significant digits.
std::string format_ns(std::uint64_t ns);
// A JSON string literal, quotes included.
std::string json_string(std::string_view s);

}  // namespace p11mux::load
