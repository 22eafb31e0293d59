#include "group/member_calls.hpp"

#include "forward/end_digest.hpp"
#include "group/group_login.hpp"
#include "group/group_objects.hpp"
#include "group/replay_calls.hpp"
#include "group/session_lanes.hpp"
#include "handled/handled.hpp"

#include <p11mux/mechanism_names.hpp>
#include <p11mux/rv_names.hpp>

namespace p11mux {

namespace {

// Moves `s` to member `to`, which place_session counted for it: its place
// there first (if that fails, it stays where it was, and `to`'s count is
// let go), then its backend session on the old member let go, closed as
// gone when that member is down (`from_down`), else put back for reuse.
CK_RV move_session(Runtime& rt, const GroupRuntime& groups, Session& s, std::size_t to,
                   bool from_down) noexcept REQUIRES(s.lock) {
  const std::size_t from = s.member;
  // Logged in there as the group is (group_login.hpp); counted as one more
  // of the group's sessions until the old one is let go below.
  GroupLogin& login = *rt.group_login();
  if (CK_RV rv = login.opening(s.group, to); rv != CKR_OK) {
    groups.release_session(s.group, to);
    return rv;
  }
  const GroupRuntime::Member& member = groups.members(s.group)[to];
  SessionPool& pool = rt.pool_of(*member.port);
  CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
  const CK_NOTIFY notify = s.notify.load(std::memory_order_relaxed);
  const CK_RV rv = notify != nullptr
                       ? pool.open_notified(member.slot, s.rw, &s, &notify_trampoline, fresh)
                   : rt.binds_on_state() ? pool.admit(member.slot, s.rw)
                                         : pool.open(member.slot, s.rw, fresh);
  if (rv != CKR_OK) {
    groups.release_session(s.group, to);
    login.closed(s.group);
    return rv;
  }
  if (s.anchor.backend == CK_INVALID_HANDLE) {
    s.pool->leave(s.slot, s.rw);
  } else {
    // The old member's session: dead with a member that is down (forgotten,
    // never reused, and the session objects made there with it). Not
    // closed now: a hung member would hang the caller, and one failing
    // with a device code refuses the close but may keep the session (a
    // network outage); closed when the member answers again, before it is
    // admitted (SessionPool::close_abandoned).
    group_session_ended(rt, s.group, from, s.anchor.backend);
    if (from_down) {
      s.pool->close(s.slot, s.rw, s.anchor.backend, SessionPool::Fate::abandon);
    } else {
      s.pool->close(s.slot, s.rw, s.anchor.backend, SessionPool::Fate::reuse);
    }
  }
  s.anchor.clear();
  s.anchor.backend = fresh;
  groups.release_session(s.group, from);
  login.closed(s.group);  // the count opening() took: the session is still one
  s.pool = &pool;
  s.slot = member.slot;
  on_member(groups, s, to);
  return CKR_OK;
}

}  // namespace

CK_RV move_off_down_member(Runtime& rt, const GroupRuntime& groups, Session& s) noexcept {
  const std::size_t from = s.member;
  const std::uint32_t group = s.group;
  // No member up: CKR_DEVICE_ERROR at once (proxy/group/README.md, "When no
  // member is up"), not a wait for a recovery that may be minutes away. A
  // member that cannot be logged in is passed over (docs/groups.md,
  // "Keeping the PIN").
  const CK_RV rv = groups.place_and_open(
      group, CKR_DEVICE_ERROR, [&] { return groups.place_session(group); },
      // Run within this call, under s.lock (held by the caller).
      [&](std::size_t to) NO_THREAD_SAFETY_ANALYSIS {
        return move_session(rt, groups, s, to, /*from_down=*/true);
      });
  if (rv == CKR_OK) groups.health(group, from).count_failover();
  return rv;
}

void rebalance(Runtime& rt, const GroupRuntime& groups, Session& s) noexcept {
  SessionOperations& ops = *s.operations;
  ops.admissions_seen = groups.admissions(s.group);
  if (s.anchor.holds_state() || s.notify.load(std::memory_order_relaxed) != nullptr ||
      !ops.idle()) {
    return;  // it has something on its member
  }
  std::size_t to = GroupRuntime::kNoMember;
  try {
    to = groups.place_session(s.group);
  } catch (const std::bad_alloc&) {
    return;
  }
  if (to == GroupRuntime::kNoMember) return;
  // Counted on `to` already; this session still counts on its own member.
  const bool spreads = groups.ordered(s.group) ? to < s.member
                                               : groups.member_sessions(s.group, to) <
                                                     groups.member_sessions(s.group, s.member);
  // Not to a member that cannot be logged in (placed only when no member can).
  if (to == s.member || !spreads || !groups.login_ready(s.group, to)) {
    groups.release_session(s.group, to);
    return;
  }
  (void)move_session(rt, groups, s, to, /*from_down=*/false);  // else it stays: no harm
}

namespace {
// How much busier (calls in flight plus calls waiting for a backend session:
// MemberHealth::load) a lane's member must be than the least busy one for
// the lane to move there (least-busy). Moving costs the group's login lock
// and both pools' locks. 64 threads on one session over 3 members (slow
// backend, 4 sessions each; p11mux-load sign-ec) signed at 2,676/s with
// moves on any difference of calls in flight alone, 6,032/s never moving,
// and 5,757 to 7,929/s with this rule, beside 6,768 to 8,070/s for a
// session per thread in serialize mode.
constexpr std::uint32_t kLaneMoveMargin = 2;
}  // namespace

void place_lane(Runtime& rt, const GroupRuntime& groups, Session& s) noexcept {
  SessionOperations& ops = *s.operations;
  ops.admissions_seen = groups.admissions(s.group);  // it is placed anew here
  if (!rt.binds_on_state() || s.anchor.holds_state() ||
      s.notify.load(std::memory_order_relaxed) != nullptr || !ops.idle()) {
    return;
  }
  const std::size_t from = s.member;
  std::size_t to = GroupRuntime::kNoMember;
  const std::uint32_t pinned = s.lanes_of_lead->pinned.load(std::memory_order_relaxed);
  if (pinned != SessionLanes::kNone && groups.health(s.group, pinned).up()) {
    to = pinned;
  } else {
    to = groups.choose_member(s.group);
    // Not to a member that cannot be logged in (chosen only when no member can).
    if (to == GroupRuntime::kNoMember || to == from || !groups.login_ready(s.group, to)) return;
    bool moves = false;
    switch (groups.balance(s.group)) {
      case Balance::least_busy:
        moves = groups.health(s.group, to).load() + kLaneMoveMargin <=
                groups.health(s.group, from).load();
        break;
      case Balance::round_robin:
        break;  // its turns were taken when the lanes opened
      case Balance::primary:
        moves = to < from;
        break;
    }
    if (!moves) return;
  }
  if (to == from) return;
  groups.count_session(s.group, to);
  // Else it stays: no harm. A member whose token went counts it, as a call would.
  if (const CK_RV rv = move_session(rt, groups, s, to, /*from_down=*/false);
      classify(rv) == CallOutcome::member_down) {
    MemberHealth& health = groups.health(s.group, to);
    (void)health.count(rv, HealthClock::now());
  }
}

CK_RV renew_gone_session(Runtime& rt, Session& s) noexcept {
  const CK_SESSION_HANDLE gone = s.anchor.backend;
  SessionPool& pool = *s.pool;
  CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
  const CK_NOTIFY notify = s.notify.load(std::memory_order_relaxed);
  if (gone != CK_INVALID_HANDLE) {
    // The fresh one first (counted as the application's), then the gone one
    // let go: the count of the application's sessions never touches 0, so
    // the token is not logged out between.
    if (notify != nullptr) {
      if (CK_RV rv = pool.open_notified(s.slot, s.rw, &s, &notify_trampoline, fresh); rv != CKR_OK)
        return rv;
      pool.close(s.slot, s.rw, gone, SessionPool::Fate::dead);
    } else if (rt.binds_on_state()) {
      pool.give(s.slot, s.rw, gone, SessionPool::Fate::dead);  // the next call borrows one
    } else {
      if (CK_RV rv = pool.open(s.slot, s.rw, fresh); rv != CKR_OK) return rv;
      pool.close(s.slot, s.rw, gone, SessionPool::Fate::dead);
    }
    group_session_ended(rt, s.group, s.member, gone);
  }
  s.anchor.clear();
  s.anchor.backend = fresh;
  s.operations->moved(s.member);
  return CKR_OK;
}

namespace {

// Ends `kept`, operations the application's calls have ended but that `s`'s
// member may still hold: v3.0 C_SessionCancel; on a v2.40 member a fresh
// backend session in place of one that holds nothing else (its other
// operations and session objects would end with it). Whether they are ended.
bool end_on_member(Runtime& rt, Session& s, OpMask kept) noexcept REQUIRES(s.lock) {
  Binding& b = s.anchor;
  SessionPool& pool = *s.pool;
  if (pool.port().version().major >= 3) {
    MemberHealth& health = rt.groups()->health(s.group, s.member);
    health.begin();
    const CK_RV rv = pool.port().call<fn::C_SessionCancel>(b.backend, cancel_flags(kept));
    health.end(rv, b.backend, HealthClock::now());
    if (rv == CKR_OK) {
      b.ops &= static_cast<OpMask>(~kept);
      b.maybe &= static_cast<OpMask>(~kept);
      return true;
    }
  }
  if (((b.ops | b.maybe) & ~kept) != 0 || !b.objects.empty()) return false;
  CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
  const CK_NOTIFY notify = s.notify.load(std::memory_order_relaxed);
  const bool borrowed = rt.binds_on_state() && notify == nullptr;
  const CK_RV rv = notify != nullptr
                       ? pool.open_notified(s.slot, s.rw, &s, &notify_trampoline, fresh)
                   : borrowed ? pool.borrow(s.slot, s.rw, fresh)
                              : pool.open(s.slot, s.rw, fresh);
  if (rv != CKR_OK) return false;
  const auto fate = SessionPool::Fate::closed(CloseReason::operation_maybe_active);
  if (borrowed) {
    pool.give(s.slot, s.rw, b.backend, fate);
  } else {
    pool.close(s.slot, s.rw, b.backend, fate);
  }
  b.clear();
  b.backend = fresh;
  return true;
}

}  // namespace

void end_kept_replays(Runtime& rt, Session& s) noexcept {
  SessionOperations& ops = *s.operations;
  const OpMask ended = ops.replayed_ended();
  ops.settled(ended);
  Binding& b = s.anchor;
  // Those the binding still holds (an error may have left them: maybe).
  const auto kept = static_cast<OpMask>(ended & (b.ops | b.maybe));
  // Not ended: the member answers the next Init as it would have.
  if (kept != 0) (void)end_on_member(rt, s, kept);
}

bool end_kept_after_error(Runtime& rt, Session& s, OpMask kinds) noexcept {
  Binding& b = s.anchor;
  const auto kept = static_cast<OpMask>(kinds & b.maybe & ~b.ops);
  return kept != 0 && b.backend != CK_INVALID_HANDLE && end_on_member(rt, s, kept);
}

void end_digest_on_member(Runtime& rt, Session& s) noexcept {
  Binding& b = s.anchor;
  if (b.backend == CK_INVALID_HANDLE || ((b.ops | b.maybe) & op::digest) == 0) return;
  MemberHealth& health = rt.groups()->health(s.group, s.member);
  health.begin();
  const CK_RV rv = end_digest(s.pool->port(), b.backend);
  health.end(rv, b.backend, HealthClock::now());
  if (rv == CKR_OK) {
    b.ops &= static_cast<OpMask>(~op::digest);
    b.maybe &= static_cast<OpMask>(~op::digest);
  }
}

CK_RV replay_pending(Runtime& rt, Session& s) noexcept {
  SessionOperations& ops = *s.operations;
  const GroupRuntime& groups = *rt.groups();
  MemberHealth& health = groups.health(s.group, s.member);
  const BackendPort& port = s.pool->port();
  const CK_SESSION_HANDLE backend = s.anchor.backend;
  const std::size_t group = s.group;
  const std::size_t member = s.member;
  for (std::size_t i = 0; i < SessionOperations::kKinds; ++i) {
    const auto kind = static_cast<OpMask>(1u << i);
    if ((ops.pending() & kind) == 0) continue;
    OperationRecord& record = ops.of(kind);
    if (!record.replayable()) {
      ops.drop_pending(kind);
      continue;
    }
    // The key's handle on this member, as any call of the session resolves it.
    auto resolve = [&](CK_OBJECT_HANDLE key, CK_OBJECT_HANDLE& out) {
      GroupCall call{rt, rt.group_objects(group), group, member, backend, "replay"};
      return group_resolve(call, key, CKR_KEY_HANDLE_INVALID, out);
    };
    health.begin();
    const CK_RV rv = replay_init(record, port, backend, resolve);
    health.end(rv, backend, HealthClock::now());
    if (rv != CKR_OK && interrupted(rv)) ops.member_interrupted();
    if (rv == CKR_OK) {
      s.anchor.ops |= kind;  // as its Init would have been noted
      ops.replayed(kind, true);
      groups.health(s.group, ops.replayed_from()).count_replay();
      continue;
    }
    // This member failed too: the operation waits for the next one.
    if (interrupted(rv)) return rv;
    try {
      rt.log().warn(
          "group {}: an operation ({}) could not be replayed on member {} ({}): the call "
          "continuing it answers CKR_DEVICE_ERROR (docs/groups.md, \"Replay\")",
          s.group, mechanism_name(record.mechanism().get()->mechanism), s.member, rv_name(rv));
    } catch (...) {
    }
    ops.replayed(kind, false);
  }
  return CKR_OK;
}

}  // namespace p11mux
