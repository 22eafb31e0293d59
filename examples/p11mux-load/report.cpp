#include "report.h"

#include <array>
#include <cinttypes>
#include <cstdio>
#include <map>

#include "ckr_names.h"

namespace p11mux::load {
namespace {

struct Quantile {
  const char* name;  // JSON key and column title
  double percent;
};
constexpr std::array<Quantile, 4> kQuantiles = {
    {{"p50", 50.0}, {"p90", 90.0}, {"p99", 99.0}, {"p99.9", 99.9}}};

std::string fmt(const char* format, auto... args) {
  char buf[256];
  std::snprintf(buf, sizeof buf, format, args...);
  return buf;
}

std::string rate_text(double ops_per_sec) {
  return ops_per_sec >= 100 ? fmt("%.0f", ops_per_sec) : fmt("%.1f", ops_per_sec);
}

std::string run_description(const Plan& plan) {
  std::string d = plan.mix.to_string() + ", " + std::to_string(plan.threads) +
                  (plan.threads == 1 ? " thread" : " threads") + ", sessions " +
                  std::string(session_mode_name(plan.sessions)) + ", ";
  d += plan.rate ? "paced at " + rate_text(*plan.rate) + " ops/s" : "unpaced";
  d += plan.count ? ", " + std::to_string(*plan.count) + " ops" : fmt(", %g s", *plan.duration);
  if (plan.warmup > 0) d += fmt(" after %g s warmup", plan.warmup);
  return d;
}

std::string json_number(double v) {
  if (v != v) return "null";
  return fmt("%.3f", v);
}

std::string json_latency(const LatencyHistogram& h) {
  auto us = [](std::uint64_t ns) { return json_number(static_cast<double>(ns) / 1000.0); };
  std::string out = "{";
  for (const Quantile& q : kQuantiles) out += json_string(q.name) + ":" + us(h.percentile(q.percent)) + ",";
  out += "\"max\":" + us(h.max()) + ",\"min\":" + us(h.min()) +
         ",\"mean\":" + json_number(h.mean() / 1000.0) + ",\"count\":" + std::to_string(h.count()) + "}";
  return out;
}

std::string json_op(const OpStats& op, double elapsed) {
  return "{\"ops\":" + std::to_string(op.ops) +
         ",\"ops_per_sec\":" + json_number(elapsed > 0 ? static_cast<double>(op.ops) / elapsed : 0.0) +
         ",\"errors\":" + std::to_string(op.errors) + ",\"collisions\":" + std::to_string(op.collisions) +
         ",\"checks\":" + std::to_string(op.checks) +
         ",\"verification_failures\":" + std::to_string(op.check_failures) +
         ",\"latency_us\":" + json_latency(op.latency) + "}";
}

std::string json_by_rv(const std::map<CK_RV, std::uint64_t>& counts) {
  std::string out = "{";
  for (const auto& [rv, count] : counts)
    out += (out.size() > 1 ? "," : "") + json_string(ckr_name(rv)) + ":" + std::to_string(count);
  return out + "}";
}

void print_error_kinds(std::ostream& out, const std::map<ErrorKey, std::uint64_t>& kinds,
                       std::uint64_t overflow) {
  for (const auto& [key, count] : kinds) {
    out << fmt("  %-12s %-18s %-32s %" PRIu64 "\n", std::string(op_name(key.op)).c_str(),
               std::string(call_name(key.call)).c_str(), ckr_name(key.rv).c_str(), count);
  }
  if (overflow > 0) out << "  (" << overflow << " more of other kinds)\n";
}

}  // namespace

std::string format_ns(std::uint64_t ns) {
  const double v = static_cast<double>(ns);
  auto three = [](double x, const char* unit) {
    return x >= 100 ? fmt("%.0f %s", x, unit) : x >= 10 ? fmt("%.1f %s", x, unit) : fmt("%.2f %s", x, unit);
  };
  if (ns < 1000) return fmt("%" PRIu64 " ns", ns);
  if (ns < 1000000) return three(v / 1e3, "us");
  if (ns < 1000000000) return three(v / 1e6, "ms");
  return three(v / 1e9, "s");
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt("\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

void print_timeline(std::ostream& out, const TimelineReport& t) {
  const double seconds = static_cast<double>(t.interval.count()) / 1000.0;
  out << "timeline every " << t.interval.count() << " ms (from the measured start; by each op's end)\n";
  out << fmt("  %9s %10s %8s\n", "t (s)", "ops/s", "errors");
  for (std::size_t i = 0; i < t.ops.size(); ++i) {
    out << fmt("  %9.3f %10s %8" PRIu64 "\n", static_cast<double>(i) * seconds,
               rate_text(static_cast<double>(t.ops[i]) / seconds).c_str(), t.errors[i]);
  }
}

std::string json_timeline(const TimelineReport& t) {
  auto list = [](const std::vector<std::uint64_t>& v) {
    std::string out = "[";
    for (std::size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
    return out + "]";
  };
  return "{\"interval_ms\":" + std::to_string(t.interval.count()) +
         ",\"start_unix_ms\":" + std::to_string(t.start_unix_ms) + ",\"ops_per_interval\":" + list(t.ops) +
         ",\"errors_per_interval\":" + list(t.errors) + "}";
}

void print_human(std::ostream& out, const Plan& plan, const RunInfo& info, const Summary& s) {
  out << "module   " << info.module_path;
  if (!info.module_description.empty()) out << " (" << info.module_description << ")";
  out << "\ntoken    '" << info.token_label << "' in slot " << info.slot
      << (info.logged_in ? ", logged in" : ", not logged in") << "\n";
  out << "run      " << run_description(plan) << "\n";
  // What ops/s divides by: window.h.
  out << "measured " << s.total.ops
      << (plan.duration ? " ops ending in the " + fmt("%.3f", s.elapsed) + " s window"
                        : " ops in " + fmt("%.3f", s.elapsed) + " s, until the last ended")
      << " = " << rate_text(s.ops_per_sec()) << " ops/s" << (s.interrupted ? "  (interrupted)" : "")
      << "\n\n";

  out << fmt("%-12s %10s %10s", "op", "ops", "ops/s");
  for (const Quantile& q : kQuantiles) out << fmt(" %9s", q.name);
  out << fmt(" %9s %8s %10s %8s %8s\n", "max", "errors", "collisions", "checks", "failed");
  auto row = [&](std::string_view name, const OpStats& op) {
    const double rate = s.elapsed > 0 ? static_cast<double>(op.ops) / s.elapsed : 0.0;
    out << fmt("%-12.*s %10" PRIu64 " %10s", static_cast<int>(name.size()), name.data(), op.ops,
               rate_text(rate).c_str());
    for (const Quantile& q : kQuantiles)
      out << fmt(" %9s", format_ns(op.latency.percentile(q.percent)).c_str());
    out << fmt(" %9s %8" PRIu64 " %10" PRIu64 " %8" PRIu64 " %8" PRIu64 "\n",
               format_ns(op.latency.max()).c_str(), op.errors, op.collisions, op.checks, op.check_failures);
  };
  std::size_t rows = 0;
  for (const MixEntry& e : plan.mix.entries()) {
    row(op_name(e.op), *s.per_op[static_cast<std::size_t>(e.op)]);
    ++rows;
  }
  if (rows > 1) row("all", s.total);

  if (s.service) {
    out << "\nlatency is counted from each op's scheduled start (--rate); service time, from its\nactual "
           "start:";
    for (const Quantile& q : kQuantiles)
      out << " " << q.name << " " << format_ns(s.service->percentile(q.percent));
    out << ", max " << format_ns(s.service->max()) << "\n";
    if (s.ops_per_sec() < *plan.rate * 0.95 && !s.interrupted) {
      out << "behind schedule: " << rate_text(s.ops_per_sec()) << " of " << rate_text(*plan.rate)
          << " ops/s achieved; latency includes the backlog\n";
    }
  }

  out << "\n";
  if (s.errors.empty()) {
    out << "errors   none\n";
  } else {
    out << "errors   (op, call, return value, count)\n";
    print_error_kinds(out, s.errors, s.error_overflow);
  }
  if (s.warmup_errors > 0) out << "warmup   " << s.warmup_errors << " errors (not counted)\n";
  if (s.after_window.ops > 0) {
    const auto& a = s.after_window;
    out << "after    " << a.ops << " ops in flight at the window's end ended after it (not in ops/s or "
        << "latency), " << a.errors << " errors, " << a.check_failures << " failed checks\n";
    print_error_kinds(out, a.kinds, a.overflow);
  }
  if (s.total.collisions > 0) {
    out << "collisions " << s.total.collisions << " (CKR_OPERATION_ACTIVE or CKR_USER_ALREADY_LOGGED_IN "
        << "while another thread held the session or login; retried)\n";
  }
  out << "checks   " << s.total.checks << " results verified, " << s.total.check_failures << " failed\n";
  if (s.timeline) print_timeline(out, *s.timeline);
  if (!info.module_thread_safe)
    out << "warning  the module refused CKF_OS_LOCKING_OK: it may not be thread-safe\n";
  out << "result   " << (s.failed() ? "FAILED" : "OK") << "\n";
}

void print_json(std::ostream& out, const Plan& plan, const RunInfo& info, const Summary& s) {
  std::string j = "{";
  j += "\"module\":" + json_string(info.module_path);
  j += ",\"module_description\":" + json_string(info.module_description);
  j += ",\"module_thread_safe\":" + std::string(info.module_thread_safe ? "true" : "false");
  j += ",\"token\":" + json_string(info.token_label);
  j += ",\"slot\":" + std::to_string(info.slot);
  j += ",\"logged_in\":" + std::string(info.logged_in ? "true" : "false");
  j += ",\"mix\":{";
  bool first = true;
  for (const MixEntry& e : plan.mix.entries()) {
    j += (first ? "" : ",") + json_string(op_name(e.op)) + ":" + std::to_string(e.weight);
    first = false;
  }
  j += "},\"threads\":" + std::to_string(plan.threads);
  j += ",\"sessions\":" + json_string(session_mode_name(plan.sessions));
  j += ",\"rate\":" + (plan.rate ? json_number(*plan.rate) : std::string("null"));
  j += ",\"duration_s\":" + (plan.duration ? json_number(*plan.duration) : std::string("null"));
  j += ",\"count\":" + (plan.count ? std::to_string(*plan.count) : std::string("null"));
  j += ",\"warmup_s\":" + json_number(plan.warmup);
  j += ",\"verify_every\":" + std::to_string(plan.verify_every);
  j += ",\"total_ops\":" + std::to_string(s.total.ops);
  j += ",\"elapsed_s\":" + json_number(s.elapsed);
  j += ",\"ops_per_sec_of\":" + json_string(plan.duration ? "ops_ending_in_window" : "ops_until_last_end");
  j += ",\"ops_per_sec\":" + json_number(s.ops_per_sec());
  j += ",\"latency_from\":" + json_string(plan.rate ? "scheduled_start" : "start");
  j += ",\"latency_us\":" + json_latency(s.total.latency);
  j += ",\"service_time_us\":" + (s.service ? json_latency(*s.service) : std::string("null"));
  j += ",\"errors\":" + std::to_string(s.total.errors);
  j += ",\"errors_by_rv\":" + json_by_rv(s.errors_by_rv);
  j += ",\"error_details\":[";
  first = true;
  for (const auto& [key, count] : s.errors) {
    j += std::string(first ? "" : ",") + "{\"op\":" + json_string(op_name(key.op)) +
         ",\"call\":" + json_string(call_name(key.call)) + ",\"rv\":" + json_string(ckr_name(key.rv)) +
         ",\"count\":" + std::to_string(count) + "}";
    first = false;
  }
  j += "],\"collisions\":" + std::to_string(s.total.collisions);
  j += ",\"checks\":" + std::to_string(s.total.checks);
  j += ",\"verification_failures\":" + std::to_string(s.total.check_failures);
  j += ",\"warmup_ops\":" + std::to_string(s.warmup_ops);
  j += ",\"warmup_errors\":" + std::to_string(s.warmup_errors);
  j += ",\"after_window\":{\"ops\":" + std::to_string(s.after_window.ops) +
       ",\"errors\":" + std::to_string(s.after_window.errors) +
       ",\"verification_failures\":" + std::to_string(s.after_window.check_failures) + ",\"errors_by_rv\":";
  std::map<CK_RV, std::uint64_t> after_by_rv;
  for (const auto& [key, count] : s.after_window.kinds) after_by_rv[key.rv] += count;
  j += json_by_rv(after_by_rv) + "}";
  j += ",\"ops\":{";
  first = true;
  for (const MixEntry& e : plan.mix.entries()) {
    j += (first ? "" : ",") + json_string(op_name(e.op)) + ":" +
         json_op(*s.per_op[static_cast<std::size_t>(e.op)], s.elapsed);
    first = false;
  }
  j += "},\"interrupted\":" + std::string(s.interrupted ? "true" : "false");
  j += ",\"timeline\":" + (s.timeline ? json_timeline(*s.timeline) : std::string("null"));
  j += ",\"ok\":" + std::string(s.failed() ? "false" : "true");
  j += "}\n";
  out << j;
}

}  // namespace p11mux::load
