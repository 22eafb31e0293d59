#include "observe/stats_report.hpp"

#include <p11mux/rv_names.hpp>

#include <spdlog/fmt/fmt.h>

#include <algorithm>
#include <iterator>
#include <numeric>

namespace p11mux {
namespace {

constexpr double kNsPerSecond = 1e9;

class Text {
 public:
  template <class... Args>
  void put(fmt::format_string<Args...> format, Args&&... args) {
    fmt::format_to(std::back_inserter(out_), format, std::forward<Args>(args)...);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

double seconds(std::uint64_t ns) { return static_cast<double>(ns) / kNsPerSecond; }
double micros(double ns) { return ns / 1000.0; }

std::uint64_t total_calls(const MetricsSnapshot& m) {
  std::uint64_t n = 0;
  for (const auto& h : m.latency) n += h.count();
  return n;
}

std::uint64_t total_errors(const MetricsSnapshot& m) {
  return std::accumulate(m.errors.begin(), m.errors.end(), std::uint64_t{0});
}

// A label value as the exposition format wants it: backslash, double quote
// and newline escaped (a member's label may hold any of them).
std::string prometheus_label(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

// A pool sample's labels, without braces: `slot="N"`, with the backend's name
// before it in a group configuration (SlotFigures::backend).
std::string pool_labels(const SlotFigures& s) {
  if (s.backend.empty()) return fmt::format("slot=\"{}\"", s.slot);
  return fmt::format("backend=\"{}\",slot=\"{}\"", prometheus_label(s.backend), s.slot);
}

void family(Text& t, std::string_view name, std::string_view type, std::string_view help) {
  t.put("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

// A histogram's samples; `labels` is empty or `name="value",` (with the comma).
void histogram(Text& t, std::string_view name, std::string_view labels, const HistogramCounts& h) {
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i + 1 < h.buckets.size(); ++i) {
    cumulative += h.buckets[i];
    t.put("{}_bucket{{{}le=\"{}\"}} {}\n", name, labels, seconds(LatencyBuckets::upper_ns(i)),
          cumulative);
  }
  cumulative += h.buckets.back();
  t.put("{}_bucket{{{}le=\"+Inf\"}} {}\n", name, labels, cumulative);
  std::string braced =
      labels.empty() ? "" : fmt::format("{{{}}}", labels.substr(0, labels.size() - 1));
  t.put("{}_sum{} {}\n", name, braced, seconds(h.sum_ns));
  t.put("{}_count{} {}\n", name, braced, cumulative);
}

std::string_view error_name(CK_RV rv) { return rv_name(rv); }

// Every name written into JSON here is an identifier or a CKR_ name; this
// keeps the output valid whatever a future name holds.
void json_string(Text& t, std::string_view s) {
  t.put("\"");
  for (char c : s) {
    if (c == '"' || c == '\\') {
      t.put("\\{}", c);
    } else if (static_cast<unsigned char>(c) < 0x20) {
      t.put("\\u{:04x}", static_cast<unsigned>(c));
    } else {
      t.put("{}", c);
    }
  }
  t.put("\"");
}

void json_latency(Text& t, const HistogramCounts& h) {
  std::uint64_t n = h.count();
  double mean = n == 0 ? 0.0 : static_cast<double>(h.sum_ns) / static_cast<double>(n);
  t.put("{{\"mean\":{:.3f},\"p50\":{:.3f},\"p90\":{:.3f},\"p99\":{:.3f},\"max\":{:.3f}}}",
        micros(mean), micros(h.quantile_ns(0.5)), micros(h.quantile_ns(0.9)),
        micros(h.quantile_ns(0.99)), micros(static_cast<double>(h.max_ns)));
}

}  // namespace

std::vector<SlotFigures> slot_figures(const PoolMetricsRegistry& pools) {
  std::vector<SlotFigures> out;
  pools.for_each([&](CK_SLOT_ID slot, const SlotPoolMetrics& m) {
    SlotFigures& f = out.emplace_back();
    f.backend = pools.backend();
    f.slot = slot;
    f.open = m.open.load(std::memory_order_relaxed);
    f.idle = m.idle.load(std::memory_order_relaxed);
    f.in_use = m.in_use.load(std::memory_order_relaxed);
    f.waits = m.waits.load(std::memory_order_relaxed);
    f.wait_ns = m.wait_ns.load(std::memory_order_relaxed);
    f.discarded_dead = m.discarded_dead.load(std::memory_order_relaxed);
    for (std::size_t r = 0; r < kCloseReasonCount; ++r) {
      f.unclean[r] = m.unclean[r].load(std::memory_order_relaxed);
    }
    f.virtual_sessions = m.virtual_sessions.load(std::memory_order_relaxed);
    f.wait = m.wait_histogram();
  });
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.slot < b.slot; });
  return out;
}

std::string prometheus_text(const MetricsSnapshot& m, const LiveFigures& live) {
  Text t;
  family(t, "p11mux_uptime_seconds", "gauge", "Seconds since C_Initialize.");
  t.put("p11mux_uptime_seconds {}\n", live.uptime_s);

  family(t, "p11mux_calls_total", "counter", "PKCS#11 calls through p11mux, by function.");
  for (std::size_t f = 0; f < kFunctionCount; ++f) {
    if (std::uint64_t n = m.latency[f].count(); n != 0) {
      t.put("p11mux_calls_total{{function=\"{}\"}} {}\n", kFunctionNames[f], n);
    }
  }

  family(t, "p11mux_call_errors_total", "counter",
         "Calls that returned a code other than CKR_OK, by function and code.");
  for (const ErrorCount& e : m.errors_by_rv) {
    t.put("p11mux_call_errors_total{{function=\"{}\",rv=\"{}\"}} {}\n", kFunctionNames[e.function],
          error_name(e.rv), e.count);
  }
  if (m.errors_unclassified != 0) {
    t.put("p11mux_call_errors_total{{function=\"(any)\",rv=\"(unclassified)\"}} {}\n",
          m.errors_unclassified);
  }

  family(t, "p11mux_call_duration_seconds", "histogram",
         "Time from entry to return of each call, by function.");
  for (std::size_t f = 0; f < kFunctionCount; ++f) {
    if (m.latency[f].count() == 0) continue;
    histogram(t, "p11mux_call_duration_seconds", fmt::format("function=\"{}\",", kFunctionNames[f]),
              m.latency[f]);
  }

  family(t, "p11mux_session_lock_wait_seconds", "histogram",
         "Time calls waited for their session's lock (another call on the same session).");
  histogram(t, "p11mux_session_lock_wait_seconds", "", m.lock_wait);

  family(t, "p11mux_sessions_open", "gauge", "Virtual sessions the application has open.");
  t.put("p11mux_sessions_open {}\n", live.sessions_open);

  struct PoolFamily {
    std::string_view name, type, help;
    double (*value)(const SlotFigures&);
  };
  static constexpr PoolFamily kPool[] = {
      {"p11mux_pool_sessions_open", "gauge", "Backend sessions open, by slot.",
       [](const SlotFigures& s) { return static_cast<double>(s.open); }},
      {"p11mux_pool_sessions_idle", "gauge", "Backend sessions open and ready for reuse, by slot.",
       [](const SlotFigures& s) { return static_cast<double>(s.idle); }},
      {"p11mux_pool_sessions_in_use", "gauge",
       "Backend sessions bound to a virtual session (or a call), by slot.",
       [](const SlotFigures& s) { return static_cast<double>(s.in_use); }},
      {"p11mux_pool_virtual_sessions", "gauge",
       "The application's sessions open (virtual sessions), by slot.",
       [](const SlotFigures& s) { return static_cast<double>(s.virtual_sessions); }},
      {"p11mux_pool_virtual_per_backend", "gauge",
       "Virtual sessions per backend session open, by slot.",
       [](const SlotFigures& s) { return s.virtual_per_backend(); }},
      {"p11mux_pool_waits_total", "counter",
       "Calls that waited for a backend session at the limit, by slot.",
       [](const SlotFigures& s) { return static_cast<double>(s.waits); }},
      {"p11mux_pool_wait_seconds_total", "counter", "Time those calls waited, by slot.",
       [](const SlotFigures& s) { return seconds(s.wait_ns); }},
      {"p11mux_pool_sessions_discarded_total", "counter",
       "Backend sessions dropped because the backend said they were gone, by slot.",
       [](const SlotFigures& s) { return static_cast<double>(s.discarded_dead); }},
  };
  for (const PoolFamily& p : kPool) {
    family(t, p.name, p.type, p.help);
    for (const SlotFigures& s : live.slots)
      t.put("{}{{{}}} {}\n", p.name, pool_labels(s), p.value(s));
  }
  family(t, "p11mux_pool_wait_duration_seconds", "histogram",
         "How long each call that waited for a backend session at the limit waited, by slot.");
  for (const SlotFigures& s : live.slots) {
    histogram(t, "p11mux_pool_wait_duration_seconds", pool_labels(s) + ",", s.wait);
  }
  family(t, "p11mux_pool_sessions_unclean_total", "counter",
         "Backend sessions closed instead of pooled because p11mux could not prove them clean, "
         "by slot and reason.");
  for (const SlotFigures& s : live.slots) {
    for (std::size_t r = 0; r < kCloseReasonCount; ++r) {
      t.put("p11mux_pool_sessions_unclean_total{{{},reason=\"{}\"}} {}\n", pool_labels(s),
            kCloseReasonNames[r], s.unclean[r]);
    }
  }

  struct MemberFamily {
    std::string_view name, type, help;
    std::uint64_t MemberFigures::*value;
  };
  static constexpr MemberFamily kMember[] = {
      {"p11mux_member_calls_in_flight", "gauge", "Calls in a group member now.",
       &MemberFigures::in_flight},
      {"p11mux_member_calls_total", "counter", "Calls a group member answered.",
       &MemberFigures::calls},
      {"p11mux_member_errors_total", "counter",
       "Answers that counted against a group member (device and session-gone codes).",
       &MemberFigures::errors},
      {"p11mux_member_downs_total", "counter", "Times a group member went down.",
       &MemberFigures::downs},
      {"p11mux_member_hung_total", "counter",
       "Of those, for calls in flight and no answer for hang_timeout_s.", &MemberFigures::hung},
      {"p11mux_member_failovers_total", "counter", "Sessions moved off a group member.",
       &MemberFigures::failovers},
      {"p11mux_member_replays_total", "counter",
       "Operations replayed elsewhere after a group member failed.", &MemberFigures::replays},
      {"p11mux_member_sessions", "gauge", "The group's sessions placed on a member.",
       &MemberFigures::sessions},
  };
  family(t, "p11mux_member_up", "gauge", "1 if a group member takes calls, else 0.");
  for (const MemberFigures& f : live.members) {
    t.put("p11mux_member_up{{group=\"{}\",member=\"{}\"}} {}\n", f.group,
          prometheus_label(f.member), f.state == "up" ? 1 : 0);
  }
  family(t, "p11mux_member_login_ready", "gauge",
         "0 if a group member refused the group's kept login: new sessions pass it over.");
  for (const MemberFigures& f : live.members) {
    t.put("p11mux_member_login_ready{{group=\"{}\",member=\"{}\"}} {}\n", f.group,
          prometheus_label(f.member), f.login_ready ? 1 : 0);
  }
  for (const MemberFamily& p : kMember) {
    family(t, p.name, p.type, p.help);
    for (const MemberFigures& f : live.members) {
      t.put("{}{{group=\"{}\",member=\"{}\"}} {}\n", p.name, f.group, prometheus_label(f.member),
            f.*p.value);
    }
  }

  family(t, "p11mux_log_records_dropped_total", "counter",
         "Log records dropped because the asynchronous log queue was full.");
  t.put("p11mux_log_records_dropped_total {}\n", live.log_records_dropped);

  family(t, "p11mux_policy_denied_total", "counter",
         "Calls the [policy] refused before the backend, by rule.");
  for (std::size_t r = 0; r < kPolicyRuleCount; ++r)
    t.put("p11mux_policy_denied_total{{rule=\"{}\"}} {}\n", kPolicyRuleNames[r],
          m.policy_denied[r]);
  return t.take();
}

std::string stats_json(const MetricsSnapshot& m, const LiveFigures& live) {
  Text t;
  t.put(
      "{{\"uptime_seconds\":{:.3f},\"sessions_open\":{},\"calls\":{},\"errors\":{},"
      "\"log_records_dropped\":{},\"functions\":{{",
      live.uptime_s, live.sessions_open, total_calls(m), total_errors(m), live.log_records_dropped);
  bool first = true;
  for (std::size_t f = 0; f < kFunctionCount; ++f) {
    std::uint64_t calls = m.latency[f].count();
    if (calls == 0) continue;
    t.put("{}", first ? "" : ",");
    first = false;
    json_string(t, kFunctionNames[f]);
    t.put(":{{\"calls\":{},\"errors\":{},\"errors_by_rv\":{{", calls, m.errors[f]);
    bool first_rv = true;
    for (const ErrorCount& e : m.errors_by_rv) {
      if (e.function != f) continue;
      t.put("{}", first_rv ? "" : ",");
      first_rv = false;
      json_string(t, error_name(e.rv));
      t.put(":{}", e.count);
    }
    t.put("}},\"latency_us\":");
    json_latency(t, m.latency[f]);
    t.put("}}");
  }
  t.put("}},\"session_lock_wait\":{{\"acquisitions\":{},\"total_us\":{:.3f},\"latency_us\":",
        m.lock_wait.count(), micros(static_cast<double>(m.lock_wait.sum_ns)));
  json_latency(t, m.lock_wait);
  t.put("}},\"slots\":[");
  for (std::size_t i = 0; i < live.slots.size(); ++i) {
    const SlotFigures& s = live.slots[i];
    t.put("{}{{", i == 0 ? "" : ",");
    if (!s.backend.empty()) {  // a group configuration's (SlotFigures::backend)
      t.put("\"backend\":");
      json_string(t, s.backend);
      t.put(",");
    }
    t.put(
        "\"slot\":{},\"open\":{},\"idle\":{},\"in_use\":{},\"virtual_sessions\":{},"
        "\"virtual_per_backend\":{:.3f},\"waits\":{},\"wait_us\":{:.3f},\"wait_latency_us\":",
        s.slot, s.open, s.idle, s.in_use, s.virtual_sessions, s.virtual_per_backend(), s.waits,
        micros(static_cast<double>(s.wait_ns)));
    json_latency(t, s.wait);
    t.put(",\"discarded_dead\":{},\"closed_unclean\":{{", s.discarded_dead);
    for (std::size_t r = 0; r < kCloseReasonCount; ++r) {
      t.put("{}", r == 0 ? "" : ",");
      json_string(t, kCloseReasonNames[r]);
      t.put(":{}", s.unclean[r]);
    }
    t.put("}}}}");
  }
  t.put("],\"members\":[");
  for (std::size_t i = 0; i < live.members.size(); ++i) {
    const MemberFigures& f = live.members[i];
    t.put("{}{{\"group\":", i == 0 ? "" : ",");
    json_string(t, f.group);
    t.put(",\"member\":");
    json_string(t, f.member);
    t.put(",\"state\":");
    json_string(t, f.state);
    t.put(",\"last_down\":");
    json_string(t, f.last_down);
    t.put(
        ",\"in_flight\":{},\"calls\":{},\"errors\":{},\"downs\":{},\"hung\":{},"
        "\"failovers\":{},\"replays\":{},\"sessions\":{},\"login_ready\":{}}}",
        f.in_flight, f.calls, f.errors, f.downs, f.hung, f.failovers, f.replays, f.sessions,
        f.login_ready);
  }
  t.put("],\"policy_denied\":{{");
  for (std::size_t r = 0; r < kPolicyRuleCount; ++r) {
    t.put("{}", r == 0 ? "" : ",");
    json_string(t, kPolicyRuleNames[r]);
    t.put(":{}", m.policy_denied[r]);
  }
  t.put("}}}}\n");
  return t.take();
}

std::vector<std::string> summary_lines(const MetricsSnapshot& m, const LiveFigures& live) {
  std::vector<std::string> lines;
  lines.push_back(
      fmt::format("metrics summary: {:.1f} s since C_Initialize, {} sessions open, {} calls, "
                  "{} errors",
                  live.uptime_s, live.sessions_open, total_calls(m), total_errors(m)));
  std::vector<std::size_t> order;
  for (std::size_t f = 0; f < kFunctionCount; ++f) {
    if (m.latency[f].count() != 0) order.push_back(f);
  }
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return m.latency[a].count() > m.latency[b].count();
  });
  if (!order.empty()) {
    lines.push_back(fmt::format("  {:<24} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10}", "function",
                                "calls", "errors", "mean us", "p50 us", "p99 us", "max us"));
  }
  for (std::size_t f : order) {
    const HistogramCounts& h = m.latency[f];
    double mean = static_cast<double>(h.sum_ns) / static_cast<double>(h.count());
    lines.push_back(fmt::format("  {:<24} {:>10} {:>8} {:>10.1f} {:>10.1f} {:>10.1f} {:>10.1f}",
                                kFunctionNames[f], h.count(), m.errors[f], micros(mean),
                                micros(h.quantile_ns(0.5)), micros(h.quantile_ns(0.99)),
                                micros(static_cast<double>(h.max_ns))));
  }
  if (!m.errors_by_rv.empty()) {
    std::string text = "  errors:";
    for (std::size_t i = 0; i < m.errors_by_rv.size(); ++i) {
      const ErrorCount& e = m.errors_by_rv[i];
      text += fmt::format("{} {} {} x{}", i == 0 ? "" : ",", kFunctionNames[e.function],
                          error_name(e.rv), e.count);
    }
    lines.push_back(std::move(text));
  }
  if (std::uint64_t n = m.lock_wait.count(); n != 0) {
    lines.push_back(fmt::format(
        "  session lock: {} acquisitions, waited {:.1f} us in all, p99 {:.1f} us, "
        "max {:.1f} us",
        n, micros(static_cast<double>(m.lock_wait.sum_ns)), micros(m.lock_wait.quantile_ns(0.99)),
        micros(static_cast<double>(m.lock_wait.max_ns))));
  }
  for (const SlotFigures& s : live.slots) {
    std::string unclean;
    for (std::size_t r = 0; r < kCloseReasonCount; ++r) {
      if (s.unclean[r] == 0) continue;
      unclean +=
          fmt::format("{} {} {}", unclean.empty() ? "" : ",", kCloseReasonNames[r], s.unclean[r]);
    }
    // "backend NAME " only in a group configuration (SlotFigures::backend).
    lines.push_back(fmt::format(
        "  {}slot {} pool: {} virtual sessions on {} open ({} idle, {} in use), "
        "{} waits ({:.1f} ms, p99 {:.1f} ms), {} discarded dead, closed unclean:{}",
        s.backend.empty() ? std::string() : fmt::format("backend {} ", s.backend), s.slot,
        s.virtual_sessions, s.open, s.idle, s.in_use, s.waits, static_cast<double>(s.wait_ns) / 1e6,
        s.wait.quantile_ns(0.99) / 1e6, s.discarded_dead, unclean.empty() ? " none" : unclean));
  }
  for (const MemberFigures& f : live.members) {
    lines.push_back(fmt::format(
        "  group {} member {}: {}, {} sessions, {} calls ({} in flight), {} errors, {} downs "
        "({} hung; last: {}), {} failovers, {} replays{}",
        f.group, f.member, f.state, f.sessions, f.calls, f.in_flight, f.errors, f.downs, f.hung,
        f.last_down, f.failovers, f.replays,
        f.login_ready ? "" : "; refused the kept login: new sessions pass it over"));
  }
  if (live.log_records_dropped != 0) {
    lines.push_back(fmt::format("  log: {} records dropped (asynchronous queue full)",
                                live.log_records_dropped));
  }
  return lines;
}

}  // namespace p11mux
