#include "group/session_lanes.hpp"

#include "group/group_runtime.hpp"

#include <memory>
#include <new>
#include <vector>

namespace p11mux {

void SessionLanesDeleter::operator()(SessionLanes* lanes) const noexcept { delete lanes; }

namespace {

// Whether this thread still runs, for the lanes it owns: made at its first
// lane, cleared by the thread's exit (a thread_local's destructor). Dynamic
// TLS, reached only when a lane is looked up through its lead.
struct ThreadAlive {
  std::shared_ptr<std::atomic<bool>> flag;
  ~ThreadAlive() {
    if (flag) flag->store(false, std::memory_order_release);
  }
};
thread_local ThreadAlive this_thread_alive;

// Takes the lanes whose thread has exited out of `lanes` into `gone`
// (nothing when there is no memory for the list: they stay, harmlessly).
void take_orphans(SessionLanes& lanes, std::vector<SessionLanes::Lane>& gone) noexcept {
  auto exited = [](const SessionLanes::Lane& l) {
    return !l.alive->load(std::memory_order_acquire);
  };
  try {
    for (const SessionLanes::Lane& l : lanes.lanes)
      if (exited(l)) gone.push_back(l);
  } catch (const std::bad_alloc&) {
    gone.clear();
    return;
  }
  std::erase_if(lanes.lanes, exited);
}

// Closes lanes taken out of lead `lead`'s list.
void close_taken(Runtime& rt, CK_SESSION_HANDLE lead,
                 const std::vector<SessionLanes::Lane>& lanes) noexcept {
  for (const SessionLanes::Lane& l : lanes) {
    // One C_CloseAllSessions may have closed it already.
    SessionLease lease = rt.sessions().lease(l.handle);
    if (!lease) continue;
    HeldLock leased(lease->lock);
    if (lease->lead == lead) (void)rt.close_session(std::move(lease));
  }
}

// Where a new lane goes: the member its session's objects pin it to while
// that member is up, else the group's balance over calls in flight.
std::size_t lane_member(const GroupRuntime& groups, const LaneOrigin& origin) noexcept {
  const std::uint32_t pinned = origin.lanes->pinned.load(std::memory_order_relaxed);
  if (pinned != SessionLanes::kNone && groups.health(origin.group, pinned).up()) return pinned;
  return groups.choose_member(origin.group);
}

}  // namespace

CK_RV lane_of(Runtime& rt, CK_SESSION_HANDLE lead, std::uint64_t me,
              CK_SESSION_HANDLE& lane) noexcept {
  ThreadAlive& alive = this_thread_alive;
  if (!alive.flag) {
    try {
      alive.flag = std::make_shared<std::atomic<bool>>(true);
    } catch (const std::bad_alloc&) {
      return CKR_HOST_MEMORY;
    }
  }
  LaneOrigin origin{};
  std::vector<SessionLanes::Lane> orphans;
  {
    SessionLease lease = rt.sessions().lease(lead);
    if (!lease) return CKR_SESSION_HANDLE_INVALID;
    HeldLock leased(lease->lock);
    if (!lease->leads) return CKR_SESSION_HANDLE_INVALID;
    lane = lease->lanes->of(me);
    if (lane != CK_INVALID_HANDLE) return CKR_OK;
    take_orphans(*lease->lanes, orphans);
    origin = {lead,
              lease->lanes.get(),
              lease->shown,
              lease->rw,
              lease->application.load(std::memory_order_relaxed),
              lease->notify.load(std::memory_order_relaxed)};
  }
  // Closed and opened without the lead's lock (they may wait for a call, for
  // the pool, or log a member in): the lead's other threads go on meanwhile.
  close_taken(rt, lead, orphans);
  const GroupRuntime& groups = *rt.groups();
  CK_SESSION_HANDLE opened = CK_INVALID_HANDLE;
  for (std::size_t tried = 0;; ++tried) {
    const std::size_t member = lane_member(groups, origin);
    // No member up: as a session moving would (docs/groups.md, "Members up
    // and down").
    if (member == GroupRuntime::kNoMember) return CKR_DEVICE_ERROR;
    const CK_RV rv = open_lane(rt, origin, member, opened);
    if (rv == CKR_OK) break;
    // A member that is up to p11mux but whose token went (its backend
    // session for the lane answered so): it counts against the member, as a
    // call's answer would, and the next member is tried, once each. Not one
    // that cannot be logged in (GroupLogin::opening): it has not failed.
    const CallOutcome outcome = classify(rv);
    if (outcome != CallOutcome::member_down || tried == groups.members(origin.group).size() ||
        !groups.login_ready(origin.group, member))
      return rv;
    MemberHealth& health = groups.health(origin.group, member);
    (void)health.count(rv, HealthClock::now());
  }
  SessionLease lease = rt.sessions().lease(lead);
  bool kept = false;
  if (lease) {
    HeldLock leased(lease->lock);
    if (lease->leads) {
      try {
        lease->lanes->lanes.push_back({me, opened, alive.flag});
        kept = true;
      } catch (const std::bad_alloc&) {
      }
    }
  }
  if (!kept) {
    // The lead closed meanwhile (or no memory to note the lane): it goes too.
    const CK_RV rv = lease ? CKR_HOST_MEMORY : CKR_SESSION_HANDLE_INVALID;
    lease = SessionLease{};
    if (SessionLease l = rt.sessions().lease(opened)) (void)rt.close_session(std::move(l));
    return rv;
  }
  lane = opened;
  return CKR_OK;
}

CK_RV lanes_of(Runtime& rt, CK_SESSION_HANDLE lead, std::vector<CK_SESSION_HANDLE>& out) noexcept {
  SessionLease lease = rt.sessions().lease(lead);
  if (!lease) return CKR_SESSION_HANDLE_INVALID;
  HeldLock leased(lease->lock);
  if (!lease->leads) return CKR_SESSION_HANDLE_INVALID;
  try {
    for (const SessionLanes::Lane& l : lease->lanes->lanes) out.push_back(l.handle);
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
  return CKR_OK;
}

void close_lanes(Runtime& rt, Session& lead) noexcept {
  std::vector<SessionLanes::Lane> lanes;
  lanes.swap(lead.lanes->lanes);
  close_taken(rt, lead.opening_handle, lanes);
}

}  // namespace p11mux
