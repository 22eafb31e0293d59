// One member of a group as the runtime's failover sees it (issue 15,
// docs/groups.md): its state, its calls in flight, and its counters; which
// call outcomes count against it; when a down member may be probed. The
// rules, and why, are in this folder's README.md, "Member health".
//
// No clock of its own: every function that needs the time takes it (`now`),
// so the runtime passes std::chrono::steady_clock::now() and the tests a
// time of their choosing (tests/unit/member_health_test.cpp).
//
// Thread-safe. The per-call path (begin/end_ok of a call that succeeds) is
// three atomic counts: no clock, no lock, no allocation. The session-gone
// streak, a cold path, is a Guarded (sync/guarded.hpp) taken only when a
// call reports a gone session; it is a leaf (sync/lock.hpp's order: no
// other lock under it).
#pragma once

#include "config/config.hpp"
#include "sync/guarded.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace p11mux {

using HealthClock = std::chrono::steady_clock;

// What a call's return value says about the member that answered it.
enum class CallOutcome : std::uint8_t {
  ok,            // CKR_OK
  application,   // any other code: the application's (a wrong PIN, a bad handle); proves the
                 // member and the session alive
  session_gone,  // CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED: the backend session is gone
  member_down,   // CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT
};
CallOutcome classify(CK_RV rv) noexcept;

// up: takes calls. down: takes none; a probe is due once recovery_interval
// has passed since it went down (or since its last failed probe). probing:
// one thread is probing it. joining: the probe succeeded; the runtime logs it
// in (if the application is logged in to the group) and then admits it.
enum class MemberState : std::uint8_t { up, down, probing, joining };
const char* to_string(MemberState state) noexcept;

// Why a member went down (the last time), for the log and /stats.
enum class DownReason : std::uint8_t {
  none,
  device,
  sessions_gone,
  hung,
  probe_failed,
  login_failed,
  out_of_sync  // it missed changes to token objects it could not be given (group_objects.hpp)
};
const char* to_string(DownReason reason) noexcept;

struct MemberHealthRules {
  // A down member's next probe is this long after it went down or its last
  // probe failed ([group.NAME] recovery_interval_s).
  std::chrono::nanoseconds recovery_interval = std::chrono::seconds(60);
  // Calls in flight and none answered for this long mark the member down
  // (hung; [group.NAME] hang_timeout_s).
  std::chrono::nanoseconds hang_timeout = std::chrono::seconds(60);
  // Session-gone codes from this many distinct backend sessions in a row,
  // with no other answer between, mark the member down ("on every session",
  // issue 15). Fewer when the member has fewer sessions open (end()'s
  // open_sessions): one session gone out of one is every session.
  std::uint32_t sessions_gone_quorum = 3;
};

// A group's rules: its recovery_interval_s and hang_timeout_s.
MemberHealthRules member_health_rules(const Group& group) noexcept;

// The counters /metrics and /stats read (relaxed loads: each is exact, the
// set is not one snapshot).
struct MemberCounters {
  MemberState state = MemberState::up;
  DownReason last_down = DownReason::none;
  std::uint32_t in_flight = 0;
  std::uint64_t calls = 0;      // calls ended (end()), whatever their outcome
  std::uint64_t errors = 0;     // calls that counted against it: member_down, session_gone
  std::uint64_t downs = 0;      // times it went down
  std::uint64_t hung = 0;       // of those, for a hung call
  std::uint64_t failovers = 0;  // sessions moved off it (count_failover)
  std::uint64_t replays = 0;    // operations replayed elsewhere after it failed (count_replay)
};

class MemberHealth {
 public:
  using Time = HealthClock::time_point;

  explicit MemberHealth(const MemberHealthRules& rules) noexcept : rules_(rules) {}
  MemberHealth(const MemberHealth&) = delete;  // the runtime and the balancer point at it
  MemberHealth& operator=(const MemberHealth&) = delete;

  MemberState state() const noexcept { return state_.load(std::memory_order_acquire); }
  bool up() const noexcept { return state() == MemberState::up; }
  // Down, for a hang (check_hung): its backend sessions are not to be
  // called (a call would hang the caller too) until it answers a probe.
  bool hung() const noexcept {
    return state() != MemberState::up &&
           last_down_.load(std::memory_order_relaxed) == DownReason::hung;
  }
  std::uint32_t in_flight() const noexcept { return in_flight_.load(std::memory_order_relaxed); }

  // Moves on whenever a session on the member must look again before its
  // next call: the member left `up` (mark_down), or its group admitted a
  // member (reopened: a session may move there). A session that saw the
  // member up, and every admission, at one value calls without looking
  // while it holds (member_calls.hpp, before_member_call): one compare
  // where two checks cost each call 4 more instructions (callgrind).
  std::uint32_t gate() const noexcept { return gate_.load(std::memory_order_acquire); }
  void reopened() noexcept { gate_.fetch_add(1, std::memory_order_acq_rel); }
  // Calls waiting for one of its backend sessions (at its pool's limit): not
  // in flight (a wait is not the member hanging), but work queued for it,
  // which the balancer weighs with the calls in flight (load()).
  void wait_begin() noexcept { waiting_.fetch_add(1, std::memory_order_relaxed); }
  void wait_end() noexcept { waiting_.fetch_sub(1, std::memory_order_relaxed); }
  std::uint32_t load() const noexcept {
    return in_flight() + waiting_.load(std::memory_order_relaxed);
  }

  // A call to the member starts: counted in flight. Each begin is matched
  // by one end, end_ok or cancel.
  [[gnu::always_inline]] void begin() noexcept {
    in_flight_.fetch_add(1, std::memory_order_acq_rel);
  }
  // Only if fewer than `limit` calls are in flight (the balancer's primary
  // rule: exact under concurrency). False: nothing was counted.
  bool begin_below(std::uint32_t limit) noexcept;
  // A call begun and not made (the balancer found the member down after
  // counting it): undone, not counted in `calls`.
  void cancel() noexcept { in_flight_.fetch_sub(1, std::memory_order_acq_rel); }

  // The call returned `rv` on backend session `session` (CK_INVALID_HANDLE:
  // a call without one). Classifies it and applies the rules: member_down
  // marks the member down; session_gone counts toward the streak, down at
  // min(sessions_gone_quorum, open_sessions) distinct sessions; anything
  // else ends the streak. `open_sessions`: the member's backend sessions
  // open before this call's was found gone, if the runtime knows them.
  // A call ending on a member that is no longer up changes nothing but the
  // counters: only a probe brings a member back.
  CallOutcome end(CK_RV rv, CK_SESSION_HANDLE session, Time now,
                  std::size_t open_sessions = ~std::size_t{0}) noexcept;
  // An answer without a call in flight (a backend session for a call could
  // not be had there): counted as a call's answer, as begin() then end().
  CallOutcome count(CK_RV rv, Time now) noexcept {
    begin();
    return end(rv, CK_INVALID_HANDLE, now);
  }
  // end() of a call that returned CKR_OK, which needs no time: inline, the
  // per-call path.
  [[gnu::always_inline]] void end_ok() noexcept {
    in_flight_.fetch_sub(1, std::memory_order_acq_rel);
    calls_.fetch_add(1, std::memory_order_relaxed);
    end_streak();
  }

  // Marks it down now, for `reason` (also the runtime's, e.g. a C_Login that
  // fails on a member joining). True if this call took it down.
  bool mark_down(DownReason reason, Time now) noexcept;

  // The watchdog, called periodically by one thread at a time (the
  // runtime's maintenance; README.md, "A hung member"): has the member had
  // calls in flight and answered none for longer than hang_timeout? Then it
  // is marked down (DownReason::hung) and true is returned. The quiet span
  // starts at the first look that finds calls in flight and no answer since
  // the look before, so it never starts before those calls did: a member is
  // never called hung early, and is found at most two looks late. Calls
  // keep no time (no clock on the call path); one slow call among calls
  // that are answered is the HSM working, not hanging. The hung calls still
  // return only when the backend returns them.
  bool check_hung(Time now) noexcept;

  // Recovery. True for exactly one caller once a probe is due: the member
  // is then `probing` until probe_done().
  bool claim_probe(Time now) noexcept;
  // The probe's result: true makes it `joining`, false `down` until the
  // next interval.
  void probe_done(bool ok, Time now) noexcept;
  // A joining member (logged in, when the group needs it) takes calls again.
  // False if it was not joining. The calls in flight now (hung calls of its
  // previous life, still in the backend) no longer count toward a hang.
  bool admit() noexcept;
  // When its next probe is due (meaningful while down).
  Time next_probe() const noexcept;

  void count_failover() noexcept { failovers_.fetch_add(1, std::memory_order_relaxed); }
  void count_replay() noexcept { replays_.fetch_add(1, std::memory_order_relaxed); }
  // An error of the runtime's own about it (a missed change it could not be given).
  void count_error() noexcept { errors_.fetch_add(1, std::memory_order_relaxed); }

  MemberCounters counters() const noexcept;
  const MemberHealthRules& rules() const noexcept { return rules_; }

 private:
  static std::int64_t ticks(Time t) noexcept { return t.time_since_epoch().count(); }
  void session_gone(CK_SESSION_HANDLE session, Time now, std::size_t open_sessions) noexcept;
  // The per-call path: a load that finds no streak, nearly always.
  void end_streak() noexcept {
    if (streak_open_.load(std::memory_order_relaxed)) [[unlikely]]
      close_streak();
  }
  void close_streak() noexcept;
  void went_down(DownReason reason, Time now) noexcept;

  const MemberHealthRules rules_;

  // One cache line for what every call touches.
  alignas(64) std::atomic<MemberState> state_{MemberState::up};
  std::atomic<std::uint32_t> in_flight_{0};
  std::atomic<std::uint64_t> calls_{0};
  std::atomic<bool> streak_open_{false};  // a session-gone streak has begun
  std::atomic<std::uint32_t> waiting_{0};
  std::atomic<std::uint32_t> gate_{0};

  alignas(64) std::atomic<std::uint64_t> errors_{0};
  std::atomic<std::uint64_t> downs_{0};
  std::atomic<std::uint64_t> hung_{0};
  std::atomic<std::uint64_t> failovers_{0};
  std::atomic<std::uint64_t> replays_{0};
  std::atomic<std::int64_t> next_probe_{0};
  std::atomic<DownReason> last_down_{DownReason::none};
  // Bumped by every answer that ends a streak; the streak belongs to one epoch.
  std::atomic<std::uint64_t> streak_epoch_{0};

  // The distinct backend sessions found gone since the last other answer.
  struct Streak {
    std::uint64_t epoch = 0;
    std::uint32_t count = 0;
    std::array<CK_SESSION_HANDLE, 16> sessions{};  // quorum is capped at this
  };
  Guarded<Streak> streak_;

  // The watchdog's (check_hung, admit), off the calls' cache line: calls_
  // at its last look; when its quiet span began (ticks + 1; 0: none); how
  // many calls in flight are a previous life's (those at the last
  // admission, fewer as they end).
  alignas(64) std::atomic<std::uint64_t> answered_seen_{0};
  std::atomic<std::int64_t> quiet_since_{0};
  std::atomic<std::uint32_t> stale_{0};
};

}  // namespace p11mux
