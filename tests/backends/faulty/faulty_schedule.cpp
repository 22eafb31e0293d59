// P11MUX_FAULTY_SCHEDULE: parsing it, and the thread that applies it.
#include "faulty_schedule.hpp"

#include "faulty_state.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace p11mux::faulty {

namespace {

template <class T>
std::optional<T> parse_number(std::string_view text) {
  T value{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// One "T:slot=ID:ACTION"; false with a message in `error`.
bool parse_entry(std::string_view entry, ScheduledFault& out, std::string& error) {
  const std::string quoted = "'" + std::string(entry) + "'";
  std::size_t a = entry.find(':');
  std::size_t b = a == std::string_view::npos ? a : entry.find(':', a + 1);
  if (b == std::string_view::npos) {
    error = quoted + " is not SECONDS:slot=ID:ACTION";
    return false;
  }
  auto seconds = parse_number<double>(entry.substr(0, a));
  if (!seconds || !std::isfinite(*seconds) || *seconds < 0 || *seconds > 86400) {
    error = quoted + ": '" + std::string(entry.substr(0, a)) +
            "' is not a time in seconds (0 to 86400)";
    return false;
  }
  out.at = std::chrono::nanoseconds(static_cast<long long>(*seconds * 1e9));
  std::string_view slot = entry.substr(a + 1, b - a - 1);
  auto id = slot.starts_with("slot=") ? parse_number<CK_SLOT_ID>(slot.substr(5)) : std::nullopt;
  if (!id) {
    error = quoted + ": '" + std::string(slot) + "' is not slot=ID (the target's slot ID)";
    return false;
  }
  out.slot = *id;
  std::string_view action = entry.substr(b + 1);
  using Action = ScheduledFault::Action;
  std::optional<unsigned long> arg = 0;
  if (action == "removed") {
    out.action = Action::removed;
  } else if (action == "back") {
    out.action = Action::back;
  } else if (action == "restart") {
    out.action = Action::restart;
  } else if (action == "hang") {
    out.action = Action::hang;
    arg = FAULTY_HANG_UNTIL_RELEASED;
  } else if (action.starts_with("hang=")) {
    out.action = Action::hang;
    arg = parse_number<unsigned long>(action.substr(5));
  } else if (action == "release") {
    out.action = Action::release;
  } else if (action.starts_with("fail=")) {
    out.action = Action::fail;
    arg = parse_rv(action.substr(5));
  } else if (action == "clear") {
    out.action = Action::clear;
  } else {
    arg = std::nullopt;
  }
  if (!arg) {
    error = quoted + ": '" + std::string(action) +
            "' is not removed, back, restart, hang, hang=MS, release, fail=CKR_... or clear";
    return false;
  }
  out.arg = *arg;
  out.text = std::string(entry);
  return true;
}

void apply(const ScheduledFault& f) {
  Module& m = module();
  using Action = ScheduledFault::Action;
  switch (f.action) {
    case Action::removed:
      m.set_slot_removed(f.slot, true);
      break;
    case Action::back:
      m.set_slot_removed(f.slot, false);
      break;
    case Action::restart:
      (void)m.restart_slot(f.slot);
      break;
    case Action::hang:
      m.slot_faults.hang(f.slot, f.arg);
      break;
    case Action::release:
      (void)m.slot_faults.release(f.slot);
      break;
    case Action::fail:
      m.slot_faults.fail(f.slot, f.arg);
      break;
    case Action::clear:
      m.slot_faults.clear(f.slot);
      break;
  }
}

}  // namespace

std::optional<std::vector<ScheduledFault>> parse_schedule(std::string_view text,
                                                          std::string& error) {
  std::vector<ScheduledFault> faults;
  while (!text.empty()) {
    std::size_t end = text.find(',');
    std::string_view entry = text.substr(0, end);
    if (!entry.empty()) {
      ScheduledFault f;
      if (!parse_entry(entry, f, error)) return std::nullopt;
      faults.push_back(std::move(f));
    }
    if (end == std::string_view::npos) break;
    text.remove_prefix(end + 1);
  }
  std::stable_sort(faults.begin(), faults.end(),
                   [](const ScheduledFault& x, const ScheduledFault& y) { return x.at < y.at; });
  return faults;
}

void Scheduler::start(std::vector<ScheduledFault> faults) {
  stop();
  if (faults.empty()) return;
  {
    std::lock_guard lock(mu_);
    stopping_ = false;
  }
  thread_ = std::thread(&Scheduler::run, this, std::move(faults), std::chrono::steady_clock::now());
}

void Scheduler::stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Scheduler::run(std::vector<ScheduledFault> faults, std::chrono::steady_clock::time_point t0) {
  for (const ScheduledFault& f : faults) {
    {
      std::unique_lock lock(mu_);
      if (wake_.wait_until(lock, t0 + f.at, [this] { return stopping_; })) return;
    }
    apply(f);
    // The wall clock, so that a program measuring the run can place the fault
    // on its own timeline (scripts/bench.sh, failover).
    const auto unix_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
    std::fprintf(stderr, "libp11mux-faulty: schedule: %s at unix_ms %lld\n", f.text.c_str(),
                 static_cast<long long>(unix_ms));
  }
}

}  // namespace p11mux::faulty
