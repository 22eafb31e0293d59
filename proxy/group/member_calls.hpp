// A call on a group's session as its member's health sees it (issue 15;
// docs/groups.md, "Members up and down"): counted in flight on the member
// while it runs, its answer classified (member_health.hpp: a device code
// marks the member down), and a session whose member is down moved to one
// that is up before its next call.
//
// Serialize mode, under the session's lock. forward.hpp calls these only for
// a session with a group (Session::group): the single backend's calls pay
// one predictable branch (call_on_session<F, false>).
#pragma once

#include "forward/multiplex.hpp"
#include "group/group_runtime.hpp"
#include "group/operation_record.hpp"
#include "lifecycle/runtime.hpp"
#include "sessions/session_table.hpp"

#include <p11mux/pkcs11.h>

namespace p11mux {

// Moves `s` off its member, which is down, to a member placed anew: its
// backend session there (bind = open) or its admission (bind = state). What
// the old member held for it (its backend session, an operation, session
// objects) is dropped: the member is gone. CKR_OK, or why no member can
// take it (CKR_DEVICE_ERROR when none is up: docs/groups.md).
CK_RV move_off_down_member(Runtime& rt, const GroupRuntime& groups, Session& s) noexcept
    REQUIRES(s.lock);

// A member of `s`'s group was admitted again since `s` last looked: `s`,
// if it holds nothing on its member (no operation, no session object, no
// Notify callback), is placed anew by the group's balance and moves when
// that spreads the load (least-busy, round-robin: the new member holds fewer
// of the group's sessions; primary: it comes earlier in the order). Once per
// session per admission.
void rebalance(Runtime& rt, const GroupRuntime& groups, Session& s) noexcept REQUIRES(s.lock);

// Multiplex mode, [pool] bind = state: lane `s` (session_lanes.hpp) is
// about to take a backend session, holding nothing on its member: it moves to
// the member its session's objects pin it to, or to the one the group's
// `balance` chooses over calls in flight: least-busy when that member has
// fewer calls in flight than its own (among equals it stays, and keeps its
// thread's cached backend sessions), round-robin whenever the turn is
// another's, primary when that one comes earlier in the order.
void place_lane(Runtime& rt, const GroupRuntime& groups, Session& s) noexcept REQUIRES(s.lock);

// `s` runs on `member` of its group from now on: Session::member, the
// health its calls check there (SessionOperations::member_health), and no
// resolution made on another member (ResolvedHandle).
inline void on_member(const GroupRuntime& groups, Session& s, std::size_t member) noexcept
    REQUIRES(s.lock) {
  s.member = static_cast<std::uint32_t>(member);
  MemberHealth& health = groups.health(s.group, member);
  s.operations->member_health = &health;
  s.operations->last_resolved = {};
  // Not seen yet: its next call looks (before_member_call_slow).
  s.operations->gate_seen = health.gate() - 1;
}

// before_member_call's work when there is some: out of line.
template <class F>
[[gnu::noinline]] CK_RV before_member_call_slow(Runtime& rt, Session& s) noexcept REQUIRES(s.lock);

// Before a call of F on group session `s`. CKR_OK to go on. Inline, the
// common case: its member's gate where the session last saw the member up
// and every admission (MemberHealth::gate), and nothing to place.
template <class F>
[[gnu::always_inline]] inline CK_RV before_member_call(Runtime& rt, Session& s) noexcept
    REQUIRES(s.lock) {
  const SessionOperations& ops = *s.operations;
  if (ops.member_health->gate() == ops.gate_seen &&
      (s.lead == 0 || s.anchor.backend != CK_INVALID_HANDLE)) [[likely]] {
    return CKR_OK;
  }
  return before_member_call_slow<F>(rt, s);
}

// The session's member up, and every admission seen: its calls need not
// look again while the member's gate stays (read first: a gate moved
// after it was read is a member that went down, or an admission, since).
inline void seen_open(const GroupRuntime& groups, Session& s) noexcept REQUIRES(s.lock) {
  SessionOperations& ops = *s.operations;
  const std::uint32_t gate = ops.member_health->gate();
  if (ops.member_health->up() && ops.admissions_seen == groups.admissions(s.group))
    ops.gate_seen = gate;
}

template <class F>
CK_RV before_member_call_slow(Runtime& rt, Session& s) noexcept REQUIRES(s.lock) {
  const GroupRuntime& groups = *rt.groups();
  if (groups.health(s.group, s.member).up()) {
    if (s.lead != 0 && s.anchor.backend == CK_INVALID_HANDLE) {
      place_lane(rt, groups, s);
    } else if (s.operations->admissions_seen != groups.admissions(s.group)) [[unlikely]] {
      rebalance(rt, groups, s);
    }
    seen_open(groups, s);
    return CKR_OK;
  }
  const std::uint32_t from = s.member;
  const bool had_operation = s.anchor.ops != 0 || s.anchor.maybe != 0;
  if (CK_RV rv = move_off_down_member(rt, groups, s); rv != CKR_OK) return rv;
  // The session lives on. Its operations of the kinds replay knows are
  // replayed on the new member, or told lost, once the call has its backend
  // session there (replay_calls.hpp); the others (a search, a message-based
  // operation) are lost with the member, told to a call continuing them now.
  s.operations->moved(from);
  seen_open(groups, s);
  if (had_operation && continues(effect<F>) && (effect<F>.ops & ~kReplayableOps) != 0)
    return kOperationLostRv;
  return CKR_OK;
}

// Whether `rv`, a member's answer, says the call did not reach the end of
// it: the member failed (a device code) or the backend session is gone (the
// member restarted, or dropped it).
inline bool interrupted(CK_RV rv) noexcept {
  const CallOutcome outcome = classify(rv);
  return outcome == CallOutcome::member_down || outcome == CallOutcome::session_gone;
}

// No backend session could be had on `s`'s member for a call (`rv`: the
// pool's answer, e.g. the member's C_OpenSession): a device code counts
// against the member as a call's would (its token was removed, say), and
// the call, which did not reach it, may be made again.
[[gnu::cold]] inline void member_unreached(Runtime& rt, Session& s, CK_RV rv) noexcept
    REQUIRES(s.lock) {
  if (!interrupted(rv)) return;
  MemberHealth& health = rt.groups()->health(s.group, s.member);
  (void)health.count(rv, HealthClock::now());
  s.operations->member_unreached();
}

// `s`'s backend session on its member is gone while the member is up (it
// restarted, or dropped the session): the session gets a fresh one there
// (bind = open; with bind = state, at its next call), and its operations are
// sorted as at a move (SessionOperations::moved): the gone session took them.
// CKR_OK, or why no fresh one could be had.
CK_RV renew_gone_session(Runtime& rt, Session& s) noexcept REQUIRES(s.lock);

// The call's span on its member: begun before the backend call, ended with
// its answer, which the session's operations hear of when it says the call
// was interrupted (replay_calls.hpp makes such a call again; an answer
// p11mux made itself is never taken for one).
class MemberCall {
 public:
  MemberCall(Runtime&, const Session& s) noexcept REQUIRES(s.lock)
      : health_(*s.operations->member_health) {
    health_.begin();
  }
  // `s`: the session the call ran on, whose backend session answered and
  // whose operations hear of an interruption; read only for an error (2
  // instructions a call when read before the test, callgrind).
  [[gnu::always_inline]] void end(CK_RV rv, Session& s) noexcept REQUIRES(s.lock) {
    if (rv == CKR_OK) [[likely]] {
      health_.end_ok();
      return;
    }
    end_failed(rv, s);
  }

 private:
  [[gnu::cold, gnu::noinline]] void end_failed(CK_RV rv, Session& s) noexcept REQUIRES(s.lock) {
    health_.end(rv, s.anchor.backend, HealthClock::now());
    if (interrupted(rv)) s.operations->member_interrupted();
  }

  MemberHealth& health_;
};

// A group's session waiting for a backend session on its member, counted
// there while it waits (MemberHealth::wait_begin).
class MemberWait {
 public:
  MemberWait(Runtime& rt, const Session& s) noexcept REQUIRES(s.lock)
      : health_(rt.groups()->health(s.group, s.member)) {
    health_.wait_begin();
  }
  ~MemberWait() { health_.wait_end(); }
  MemberWait(const MemberWait&) = delete;
  MemberWait& operator=(const MemberWait&) = delete;

 private:
  MemberHealth& health_;
};
struct NoMemberWait {
  NoMemberWait(Runtime&, const Session&) noexcept {}
};

// The digest active on `s`'s backend session ended there, for an error of
// C_DigestKey that p11mux answered without reaching the member (its key not
// on that member): forward/end_digest.hpp, counted on the member.
void end_digest_on_member(Runtime& rt, Session& s) noexcept REQUIRES(s.lock);

// MemberCall's place in a call on a session without a group: nothing.
struct NoMemberCall {
  NoMemberCall(Runtime&, const Session&) noexcept {}
};

}  // namespace p11mux
