// Unit tests for proxy/group/member_health (proxy/group/README.md, "Member
// health"): which call outcomes count against a member, the session-gone
// streak, a hung member found with a given time (no sleeping), recovery by
// probe, and the counters.
#include "group/member_health.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

using namespace std::chrono_literals;
using Time = MemberHealth::Time;

const Time t0 = Time(1000s);  // the fake clock: times are given, never read

MemberHealthRules rules(std::uint32_t quorum = 3) {
  MemberHealthRules r;
  r.recovery_interval = 60s;
  r.hang_timeout = 10s;
  r.sessions_gone_quorum = quorum;
  return r;
}

CallOutcome call(MemberHealth& m, CK_RV rv, CK_SESSION_HANDLE session = 1, Time now = t0,
                 std::size_t open_sessions = ~std::size_t{0}) {
  m.begin();
  return m.end(rv, session, now, open_sessions);
}

TEST_CASE("member_health: classify sorts return codes into member's and application's") {
  CHECK(classify(CKR_OK) == CallOutcome::ok);
  CHECK(classify(CKR_DEVICE_ERROR) == CallOutcome::member_down);
  CHECK(classify(CKR_DEVICE_REMOVED) == CallOutcome::member_down);
  CHECK(classify(CKR_TOKEN_NOT_PRESENT) == CallOutcome::member_down);
  CHECK(classify(CKR_SESSION_HANDLE_INVALID) == CallOutcome::session_gone);
  CHECK(classify(CKR_SESSION_CLOSED) == CallOutcome::session_gone);
  for (CK_RV rv :
       {CKR_PIN_INCORRECT, CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID, CKR_SIGNATURE_INVALID,
        CKR_GENERAL_ERROR, CKR_DEVICE_MEMORY, CKR_USER_NOT_LOGGED_IN, CKR_BUFFER_TOO_SMALL}) {
    CHECK(classify(rv) == CallOutcome::application);
  }
}

TEST_CASE("member_health: a device code marks the member down at once") {
  for (CK_RV rv : {CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT}) {
    MemberHealth m(rules());
    REQUIRE(m.up());
    CHECK(call(m, rv) == CallOutcome::member_down);
    CHECK(m.state() == MemberState::down);
    const MemberCounters c = m.counters();
    CHECK(c.last_down == DownReason::device);
    CHECK(c.downs == 1);
    CHECK(c.errors == 1);
    CHECK(c.calls == 1);
    CHECK(c.in_flight == 0);
  }
}

TEST_CASE(
    "member_health: the gate moves when the member leaves up, or is reopened; not with calls") {
  // A session calls without looking while the gate stays where it saw the
  // member up (member_calls.hpp, before_member_call).
  MemberHealth m(rules(2));
  const std::uint32_t open = m.gate();
  m.begin();
  m.end_ok();
  CHECK(call(m, CKR_PIN_INCORRECT) == CallOutcome::application);
  CHECK(call(m, CKR_SESSION_HANDLE_INVALID, 7) == CallOutcome::session_gone);  // 1 of 2
  CHECK(m.gate() == open);
  // Down by a session-gone quorum: moved, once.
  CHECK(call(m, CKR_SESSION_CLOSED, 8) == CallOutcome::session_gone);
  REQUIRE(m.state() == MemberState::down);
  const std::uint32_t down = m.gate();
  CHECK(down != open);
  CHECK_FALSE(m.mark_down(DownReason::device, t0));  // down already: stays
  CHECK(m.gate() == down);
  // Back up: the group reopens every member's gate (GroupRuntime::recover).
  REQUIRE(m.claim_probe(t0 + 61s));
  m.probe_done(true, t0 + 61s);
  REQUIRE(m.admit());
  m.reopened();
  CHECK(m.gate() != down);
  // A joining member whose login fails goes down again: moved.
  MemberHealth j(rules());
  REQUIRE(j.mark_down(DownReason::device, t0));
  REQUIRE(j.claim_probe(t0 + 61s));
  j.probe_done(true, t0 + 61s);
  const std::uint32_t joining = j.gate();
  REQUIRE(j.mark_down(DownReason::login_failed, t0 + 61s));
  CHECK(j.gate() != joining);
}

TEST_CASE("member_health: the application's codes never count against the member") {
  MemberHealth m(rules());
  for (int i = 0; i < 100; ++i) {
    for (CK_RV rv : {CKR_PIN_INCORRECT, CKR_KEY_HANDLE_INVALID, CKR_GENERAL_ERROR}) {
      CHECK(call(m, rv, static_cast<CK_SESSION_HANDLE>(i + 1)) == CallOutcome::application);
    }
  }
  CHECK(m.up());
  CHECK(m.counters().errors == 0);
  CHECK(m.counters().calls == 300);
}

TEST_CASE("member_health: session-gone codes mark it down only from quorum distinct sessions") {
  MemberHealth m(rules(3));
  call(m, CKR_SESSION_HANDLE_INVALID, 11);
  call(m, CKR_SESSION_CLOSED, 12);
  CHECK(m.up());
  CHECK(m.counters().errors == 2);
  call(m, CKR_SESSION_HANDLE_INVALID, 13);
  CHECK(m.state() == MemberState::down);
  CHECK(m.counters().last_down == DownReason::sessions_gone);
}

TEST_CASE("member_health: the same session gone twice counts once") {
  MemberHealth m(rules(3));
  for (int i = 0; i < 10; ++i) call(m, CKR_SESSION_HANDLE_INVALID, 11);
  call(m, CKR_SESSION_HANDLE_INVALID, 12);
  CHECK(m.up());
  call(m, CKR_SESSION_HANDLE_INVALID, 11);  // A, B, A: still two sessions
  CHECK(m.up());
  call(m, CKR_SESSION_HANDLE_INVALID, 13);
  CHECK_FALSE(m.up());
}

TEST_CASE("member_health: any other answer between ends the session-gone streak") {
  for (CK_RV between : {CKR_OK, CKR_PIN_INCORRECT}) {
    MemberHealth m(rules(3));
    call(m, CKR_SESSION_HANDLE_INVALID, 11);
    call(m, CKR_SESSION_HANDLE_INVALID, 12);
    call(m, between, 14);
    call(m, CKR_SESSION_HANDLE_INVALID, 13);
    call(m, CKR_SESSION_HANDLE_INVALID, 15);
    CHECK(m.up());
    call(m, CKR_SESSION_HANDLE_INVALID, 16);  // 13, 15, 16: three since the answer
    CHECK_FALSE(m.up());
  }
}

TEST_CASE("member_health: a member with fewer sessions than the quorum is down when all are gone") {
  MemberHealth m(rules(3));
  call(m, CKR_SESSION_HANDLE_INVALID, 11, t0, 2);
  CHECK(m.up());
  call(m, CKR_SESSION_HANDLE_INVALID, 12, t0, 2);
  CHECK_FALSE(m.up());

  MemberHealth one(rules(3));
  call(one, CKR_SESSION_CLOSED, 11, t0, 1);
  CHECK_FALSE(one.up());
}

TEST_CASE("member_health: a session-gone code without a session does not count toward the streak") {
  MemberHealth m(rules(1));
  call(m, CKR_SESSION_HANDLE_INVALID, CK_INVALID_HANDLE);
  CHECK(m.up());
  CHECK(m.counters().errors == 1);
}

TEST_CASE("member_health: calls in flight and no answer for hang_timeout mark the member down") {
  MemberHealth m(rules());
  m.begin();
  CHECK_FALSE(m.check_hung(t0));        // the first look that finds it: the quiet span starts
  CHECK_FALSE(m.check_hung(t0 + 10s));  // exactly the timeout: not yet
  CHECK(m.up());
  CHECK(m.check_hung(t0 + 10s + 1ns));
  CHECK(m.state() == MemberState::down);
  CHECK(m.counters().last_down == DownReason::hung);
  CHECK(m.counters().hung == 1);
  CHECK(m.counters().in_flight == 1);   // the hung call is still in the backend
  CHECK_FALSE(m.check_hung(t0 + 20s));  // down already: counted once
  CHECK(m.counters().downs == 1);
  CHECK(m.next_probe() == t0 + 10s + 1ns + 60s);

  // It returns at last, successfully: its answer stands, the member stays down.
  CHECK(m.end(CKR_OK, 1, t0 + 30s) == CallOutcome::ok);
  CHECK(m.state() == MemberState::down);
  CHECK(m.counters().in_flight == 0);
}

TEST_CASE("member_health: the quiet span starts at the look that finds calls, not before") {
  MemberHealth m(rules());
  CHECK_FALSE(m.check_hung(t0));  // nothing in flight
  m.begin();                      // begun some time after that look
  CHECK_FALSE(m.check_hung(t0 + 9s));
  // 10 s after the first look, but perhaps not after the call began.
  CHECK_FALSE(m.check_hung(t0 + 11s));
  CHECK(m.up());
  CHECK(m.check_hung(t0 + 19s + 1ns));
  m.end(CKR_OK, 1, t0 + 30s);
}

TEST_CASE("member_health: a slow call among calls answered is not a hang") {
  MemberHealth m(rules());
  m.begin();  // slow: a key generation, say
  CHECK_FALSE(m.check_hung(t0));
  for (int i = 1; i <= 5; ++i) {
    m.begin();
    m.end_ok();  // another session's call, answered
    CHECK_FALSE(m.check_hung(t0 + std::chrono::seconds(8 * i)));
  }
  CHECK(m.up());
  // The answers stop with the slow call still in flight: from the look
  // after the last answer, a hang_timeout of quiet.
  CHECK_FALSE(m.check_hung(t0 + 41s));
  CHECK_FALSE(m.check_hung(t0 + 51s));
  CHECK(m.check_hung(t0 + 51s + 1ns));
  m.end(CKR_OK, 1, t0 + 60s);
}

TEST_CASE("member_health: a hung call from before a recovery does not take the member down again") {
  MemberHealth m(rules());
  m.begin();  // hangs
  CHECK_FALSE(m.check_hung(t0));
  REQUIRE(m.check_hung(t0 + 11s));
  REQUIRE(m.claim_probe(t0 + 71s));
  m.probe_done(true, t0 + 72s);
  REQUIRE(m.admit());
  CHECK_FALSE(m.check_hung(t0 + 100s));
  CHECK_FALSE(m.check_hung(t0 + 200s));
  CHECK(m.up());
  // A call begun since, unanswered, does.
  m.begin();
  CHECK_FALSE(m.check_hung(t0 + 201s));
  CHECK(m.check_hung(t0 + 212s));
  // The old call ends; a new one hangs alone: still found.
  m.end(CKR_OK, 1, t0 + 220s);
  m.end(CKR_OK, 2, t0 + 220s);
  REQUIRE(m.claim_probe(t0 + 300s));
  m.probe_done(true, t0 + 300s);
  REQUIRE(m.admit());
  m.begin();
  CHECK_FALSE(m.check_hung(t0 + 301s));  // the two answers above: progress
  CHECK_FALSE(m.check_hung(t0 + 302s));
  CHECK(m.check_hung(t0 + 313s));
  m.end(CKR_OK, 3, t0 + 320s);
}

TEST_CASE("member_health: probes are due every recovery interval; one succeeding re-admits it") {
  MemberHealth m(rules());
  call(m, CKR_DEVICE_REMOVED, 1, t0);
  REQUIRE(m.state() == MemberState::down);
  CHECK_FALSE(m.claim_probe(t0 + 59s));
  CHECK(m.claim_probe(t0 + 60s));
  CHECK(m.state() == MemberState::probing);
  CHECK_FALSE(m.claim_probe(t0 + 61s));  // one prober
  CHECK_FALSE(m.admit());                // not before the probe succeeded

  m.probe_done(false, t0 + 61s);  // still gone: the next probe an interval later
  CHECK(m.state() == MemberState::down);
  CHECK(m.counters().last_down == DownReason::probe_failed);
  CHECK_FALSE(m.claim_probe(t0 + 120s));
  CHECK(m.claim_probe(t0 + 121s));

  m.probe_done(true, t0 + 122s);
  CHECK(m.state() == MemberState::joining);  // the runtime logs it in before it takes calls
  CHECK_FALSE(m.up());
  CHECK(m.admit());
  CHECK(m.up());
  CHECK(m.counters().downs == 1);
}

TEST_CASE("member_health: a login that fails on a joining member takes it down again") {
  MemberHealth m(rules());
  m.mark_down(DownReason::device, t0);
  REQUIRE(m.claim_probe(t0 + 60s));
  m.probe_done(true, t0 + 60s);
  CHECK(m.mark_down(DownReason::login_failed, t0 + 61s));
  CHECK(m.state() == MemberState::down);
  CHECK(m.counters().last_down == DownReason::login_failed);
  CHECK(m.next_probe() == t0 + 121s);
  CHECK_FALSE(m.admit());
}

TEST_CASE("member_health: a success on a down member does not bring it back") {
  MemberHealth m(rules());
  m.begin();  // a call late to answer
  call(m, CKR_DEVICE_ERROR);
  m.end(CKR_OK, 1, t0 + 1s);
  CHECK(m.state() == MemberState::down);
  CHECK_FALSE(m.mark_down(DownReason::device, t0 + 2s));  // already down
}

TEST_CASE("member_health: a session streak from before a recovery does not carry over") {
  MemberHealth m(rules(3));
  call(m, CKR_SESSION_HANDLE_INVALID, 11);
  call(m, CKR_SESSION_HANDLE_INVALID, 12);
  m.mark_down(DownReason::device, t0);
  REQUIRE(m.claim_probe(t0 + 60s));
  m.probe_done(true, t0 + 60s);
  REQUIRE(m.admit());
  call(m, CKR_SESSION_HANDLE_INVALID, 13);
  CHECK(m.up());
}

TEST_CASE("member_health: begin_below never goes past its limit; cancel undoes a begin") {
  MemberHealth m(rules());
  CHECK(m.begin_below(2));
  CHECK(m.begin_below(2));
  CHECK_FALSE(m.begin_below(2));
  CHECK(m.in_flight() == 2);
  m.cancel();
  CHECK(m.in_flight() == 1);
  CHECK(m.counters().calls == 0);  // a cancelled call was never made
  m.end(CKR_OK, 1, t0);
  CHECK(m.counters().calls == 1);
}

TEST_CASE("member_health: failover and replay counters") {
  MemberHealth m(rules());
  m.count_failover();
  m.count_failover();
  m.count_replay();
  CHECK(m.counters().failovers == 2);
  CHECK(m.counters().replays == 1);
  CHECK(std::string(to_string(MemberState::joining)) == "joining");
  CHECK(std::string(to_string(DownReason::sessions_gone)) == "sessions-gone");
}

TEST_CASE("member_health: a group's rules come from its configuration") {
  Group g;
  g.recovery_interval_s = 5;
  g.hang_timeout_s = 7;
  const MemberHealthRules r = member_health_rules(g);
  CHECK(r.recovery_interval == 5s);
  CHECK(r.hang_timeout == 7s);
  MemberHealth m(r);
  m.mark_down(DownReason::device, t0);
  CHECK(m.next_probe() == t0 + 5s);
}

TEST_CASE("member_health: many threads begin and end calls; the counts balance") {
  MemberHealth m(rules(3));
  constexpr int kThreads = 8;
  constexpr int kCalls = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&m, t] {
      for (int i = 0; i < kCalls; ++i) {
        const CK_RV rv = i % 7 == 0 ? CKR_PIN_INCORRECT : CKR_OK;
        m.begin();
        if (rv == CKR_OK) {
          m.end_ok();
        } else {
          m.end(rv, static_cast<CK_SESSION_HANDLE>(t + 1), t0);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  const MemberCounters c = m.counters();
  CHECK(c.in_flight == 0);
  CHECK(c.calls == std::uint64_t{kThreads} * kCalls);
  CHECK(c.errors == 0);
  CHECK(m.up());
}

TEST_CASE("member_health: session-gone reports from many threads take it down once") {
  MemberHealth m(rules(3));
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&m, t] {
      for (int i = 0; i < 100; ++i) {
        call(m, CKR_SESSION_HANDLE_INVALID, static_cast<CK_SESSION_HANDLE>(t * 1000 + i + 1));
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(m.state() == MemberState::down);
  CHECK(m.counters().downs == 1);
  CHECK(m.counters().errors == 800);
}

}  // namespace
}  // namespace p11mux
