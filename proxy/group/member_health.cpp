#include "group/member_health.hpp"

#include "sessions/gone_codes.hpp"

#include <algorithm>

namespace p11mux {

CallOutcome classify(CK_RV rv) noexcept {
  if (rv == CKR_OK) return CallOutcome::ok;
  // The device, not the call: nothing on this member can be trusted to work.
  if (device_gone(rv)) return CallOutcome::member_down;
  // One session gone is a session; the member is down only when every
  // session is.
  if (session_handle_gone(rv)) return CallOutcome::session_gone;
  return CallOutcome::application;
}

const char* to_string(MemberState state) noexcept {
  switch (state) {
    case MemberState::up:
      return "up";
    case MemberState::down:
      return "down";
    case MemberState::probing:
      return "probing";
    case MemberState::joining:
      return "joining";
  }
  return "?";
}

const char* to_string(DownReason reason) noexcept {
  switch (reason) {
    case DownReason::none:
      return "none";
    case DownReason::device:
      return "device";
    case DownReason::sessions_gone:
      return "sessions-gone";
    case DownReason::hung:
      return "hung";
    case DownReason::probe_failed:
      return "probe-failed";
    case DownReason::login_failed:
      return "login-failed";
    case DownReason::out_of_sync:
      return "out-of-sync";
  }
  return "?";
}

MemberHealthRules member_health_rules(const Group& group) noexcept {
  MemberHealthRules r;
  r.recovery_interval = std::chrono::seconds(group.recovery_interval_s);
  r.hang_timeout = std::chrono::seconds(group.hang_timeout_s);
  return r;
}

bool MemberHealth::begin_below(std::uint32_t limit) noexcept {
  std::uint32_t n = in_flight_.load(std::memory_order_relaxed);
  do {
    if (n >= limit) return false;
  } while (!in_flight_.compare_exchange_weak(n, n + 1, std::memory_order_acq_rel,
                                             std::memory_order_relaxed));
  return true;
}

CallOutcome MemberHealth::end(CK_RV rv, CK_SESSION_HANDLE session, Time now,
                              std::size_t open_sessions) noexcept {
  in_flight_.fetch_sub(1, std::memory_order_acq_rel);
  calls_.fetch_add(1, std::memory_order_relaxed);
  const CallOutcome outcome = classify(rv);
  switch (outcome) {
    case CallOutcome::ok:
    case CallOutcome::application:
      end_streak();
      break;
    case CallOutcome::member_down:
      errors_.fetch_add(1, std::memory_order_relaxed);
      mark_down(DownReason::device, now);
      break;
    case CallOutcome::session_gone:
      errors_.fetch_add(1, std::memory_order_relaxed);
      if (session != CK_INVALID_HANDLE) session_gone(session, now, open_sessions);
      break;
  }
  return outcome;
}

void MemberHealth::close_streak() noexcept {
  streak_epoch_.fetch_add(1, std::memory_order_acq_rel);
  streak_open_.store(false, std::memory_order_relaxed);
}

void MemberHealth::session_gone(CK_SESSION_HANDLE session, Time now,
                                std::size_t open_sessions) noexcept {
  bool down = false;
  {
    Locked<Streak> s(streak_);
    const std::uint64_t epoch = streak_epoch_.load(std::memory_order_acquire);
    if (s->epoch != epoch) {  // another answer came since: a new streak
      s->epoch = epoch;
      s->count = 0;
    }
    streak_open_.store(true, std::memory_order_relaxed);
    const auto seen = s->sessions.begin() + s->count;
    if (std::find(s->sessions.begin(), seen, session) == seen && s->count < s->sessions.size()) {
      s->sessions[s->count++] = session;
    }
    const std::size_t quorum = std::clamp<std::size_t>(
        std::min<std::size_t>(rules_.sessions_gone_quorum, open_sessions), 1, s->sessions.size());
    down = s->count >= quorum;
    if (down) s->count = 0;
  }
  if (down) mark_down(DownReason::sessions_gone, now);
}

void MemberHealth::went_down(DownReason reason, Time now) noexcept {
  next_probe_.store(ticks(now + rules_.recovery_interval), std::memory_order_relaxed);
  last_down_.store(reason, std::memory_order_relaxed);
  downs_.fetch_add(1, std::memory_order_relaxed);
  if (reason == DownReason::hung) hung_.fetch_add(1, std::memory_order_relaxed);
}

bool MemberHealth::mark_down(DownReason reason, Time now) noexcept {
  // From up or joining (a login that failed); a probing member's fate is its
  // prober's (probe_done), and a down one is down already.
  MemberState s = state_.load(std::memory_order_acquire);
  while (s == MemberState::up || s == MemberState::joining) {
    if (state_.compare_exchange_weak(s, MemberState::down, std::memory_order_acq_rel,
                                     std::memory_order_acquire)) {
      // After the state: a session that sees the gate moved sees it down.
      reopened();
      went_down(reason, now);
      return true;
    }
  }
  return false;
}

bool MemberHealth::check_hung(Time now) noexcept {
  const std::uint64_t answered = calls_.load(std::memory_order_relaxed);
  const std::uint32_t flying = in_flight();
  const bool progressed = answered != answered_seen_.exchange(answered, std::memory_order_relaxed);
  const std::uint32_t stale = std::min(stale_.load(std::memory_order_relaxed), flying);
  stale_.store(stale, std::memory_order_relaxed);
  if (state() != MemberState::up || flying <= stale || progressed) {
    quiet_since_.store(0, std::memory_order_relaxed);
    return false;
  }
  const std::int64_t since = quiet_since_.load(std::memory_order_relaxed);
  if (since == 0) {
    quiet_since_.store(std::max<std::int64_t>(ticks(now), 1), std::memory_order_relaxed);
    return false;
  }
  if (now - Time(HealthClock::duration(since)) <= rules_.hang_timeout) return false;
  quiet_since_.store(0, std::memory_order_relaxed);
  return mark_down(DownReason::hung, now);
}

bool MemberHealth::claim_probe(Time now) noexcept {
  if (ticks(now) < next_probe_.load(std::memory_order_relaxed)) return false;
  MemberState expected = MemberState::down;
  return state_.compare_exchange_strong(expected, MemberState::probing, std::memory_order_acq_rel);
}

void MemberHealth::probe_done(bool ok, Time now) noexcept {
  if (ok) {
    state_.store(MemberState::joining, std::memory_order_release);
    return;
  }
  next_probe_.store(ticks(now + rules_.recovery_interval), std::memory_order_relaxed);
  last_down_.store(DownReason::probe_failed, std::memory_order_relaxed);
  state_.store(MemberState::down, std::memory_order_release);
}

bool MemberHealth::admit() noexcept {
  // A streak from before it went down says nothing about its new sessions.
  streak_epoch_.fetch_add(1, std::memory_order_acq_rel);
  streak_open_.store(false, std::memory_order_relaxed);
  MemberState expected = MemberState::joining;
  if (state_.load(std::memory_order_acquire) != expected) return false;
  stale_.store(in_flight(), std::memory_order_relaxed);
  quiet_since_.store(0, std::memory_order_relaxed);
  return state_.compare_exchange_strong(expected, MemberState::up, std::memory_order_acq_rel);
}

MemberHealth::Time MemberHealth::next_probe() const noexcept {
  return Time(HealthClock::duration(next_probe_.load(std::memory_order_relaxed)));
}

MemberCounters MemberHealth::counters() const noexcept {
  MemberCounters c;
  c.state = state();
  c.last_down = last_down_.load(std::memory_order_relaxed);
  c.in_flight = in_flight();
  c.calls = calls_.load(std::memory_order_relaxed);
  c.errors = errors_.load(std::memory_order_relaxed);
  c.downs = downs_.load(std::memory_order_relaxed);
  c.hung = hung_.load(std::memory_order_relaxed);
  c.failovers = failovers_.load(std::memory_order_relaxed);
  c.replays = replays_.load(std::memory_order_relaxed);
  return c;
}

}  // namespace p11mux
