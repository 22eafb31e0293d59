// --stats-url: p11mux's own figures (its /metrics endpoint, see p11mux's
// README, "Observability") shown beside the load, once a second and at the
// end. Parsing and formatting are pure; fetch_metrics does one blocking HTTP
// GET with a timeout.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace p11mux::load {

// "http://127.0.0.1:9464[/metrics]" (an IP literal or localhost: no
// resolver) or "unix:/path/to/socket". Throws UsageError.
struct StatsUrl {
  std::string host;  // empty for a unix socket
  unsigned short port = 0;
  std::string socket_path;
};
StatsUrl parse_stats_url(std::string_view url);

// Totals over all series of the metrics p11mux-load shows.
struct P11muxFigures {
  double calls = 0;
  double errors = 0;
  double lock_wait_s = 0;  // session lock wait, summed
  double lock_acquisitions = 0;
  double sessions_open = 0;  // virtual sessions
  double pool_in_use = 0;
  double pool_idle = 0;
  double pool_waits = 0;
};

// nullopt when the text has no p11mux_calls_total family at all.
std::optional<P11muxFigures> parse_metrics(std::string_view prometheus_text);

// The body of GET /metrics, or nullopt with *error set.
std::optional<std::string> fetch_metrics(const StatsUrl& url, std::chrono::milliseconds timeout,
                                         std::string* error);

// "p11mux: 12034 calls/s, 0 errors/s, lock wait 0.12 us/call, 4 sessions, pool 4 busy 0 idle 0 waits"
std::string live_line(const P11muxFigures& before, const P11muxFigures& now, double seconds);
// "p11mux   123456 calls, 0 errors, session lock wait 1.20 ms in all, 4 sessions open"
std::string final_line(const P11muxFigures& now);

}  // namespace p11mux::load
