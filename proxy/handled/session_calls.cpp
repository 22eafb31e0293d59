// C_OpenSession, C_CloseSession and C_CloseAllSessions: the virtual session
// lifecycle (dispatch `handled`).
#include "handled/handled.hpp"

#include "group/group_login.hpp"
#include "group/member_calls.hpp"
#include "group/operation_record.hpp"
#include "group/session_lanes.hpp"

#include <p11mux/ckr_error.hpp>

#include <new>

namespace p11mux {
// The backend hands its Notify our trampoline; the application gets its own
// callback with the virtual handle (docs/pkcs11-facts.md, "Sessions"). The
// callback is read once, atomically: a backend that notifies a session after
// it was closed (its entry free, or reused without a callback) reaches nobody.
// NO_THREAD_SAFETY_ANALYSIS: it reads opening_handle without the session's
// lock (held, in serialize mode, by the very call that notifies). It runs
// inside a backend call this session's open or call started, and the entry
// is not reused before that call returns: the handle does not change meanwhile.
CK_RV notify_trampoline(CK_SESSION_HANDLE, CK_NOTIFICATION event,
                        CK_VOID_PTR context) noexcept NO_THREAD_SAFETY_ANALYSIS {
  auto* session = static_cast<Session*>(context);
  CK_NOTIFY notify = session->notify.load(std::memory_order_acquire);
  if (notify == nullptr) return CKR_OK;
  // A lane's callback is its lead's, with the handle the application knows.
  const CK_SESSION_HANDLE shown = session->lead != 0 ? session->lead : session->opening_handle;
  return notify(shown, event, session->application.load(std::memory_order_relaxed));
}

namespace {

// Where a new session runs: its backend's pool and slot, and in a group
// configuration its group (Session::group) and member.
struct Placement {
  SessionPool* pool;
  CK_SLOT_ID backend_slot;
  std::uint32_t group = Session::kNoGroup;
  std::size_t member = 0;
};

// In a group configuration, whether sessions on `slot` are served: a
// group's slot, without a [policy]; else the refusal (docs/groups.md, "The
// runtime so far").
CK_RV group_serves(Runtime& rt, const GroupRuntime& groups, CK_SLOT_ID slot) noexcept {
  if (!groups.is_group(slot)) {
    return groups.refuse("C_OpenSession", slot, "sessions on a member shown are not built");
  }
  // The policy's own backend calls take the runtime's first port only.
  if (rt.policy() != nullptr) {
    return groups.refuse("C_OpenSession", slot, "a [policy] on group sessions is not built");
  }
  return CKR_OK;
}

// Member `member` of group `slot`, counted there already: its placement.
Placement on_member(Runtime& rt, const GroupRuntime& groups, CK_SLOT_ID slot, std::size_t member) {
  const GroupRuntime::Member& m = groups.members(slot).at(member);
  return {&rt.pool_of(*m.port), m.slot, static_cast<std::uint32_t>(slot), member};
}

// Opens a session placed at `at` (a group's member counted there, which
// this lets go if it does not open) and writes its handle to `out`;
// `lane`, if not NULL, makes it a lane of that lead (group/session_lanes.hpp).
CK_RV open_placed(Runtime& rt, CK_SLOT_ID shown, CK_FLAGS flags, CK_VOID_PTR application,
                  CK_NOTIFY notify, const Placement& at, const LaneOrigin* lane,
                  CK_SESSION_HANDLE& out) noexcept {
  const std::uint32_t group = at.group;
  if (group != Session::kNoGroup) {
    // The application logged in: so is the member, before the session is
    // there (group/group_login.hpp). Counted; closed() below undoes it.
    if (CK_RV rv = rt.group_login()->opening(group, at.member); rv != CKR_OK) {
      rt.groups()->release_session(group, at.member);  // placed, not opened
      return rv;
    }
  }
  // The member counted when the session was placed, and its login's count
  // (group_login.hpp), let go if it does not open.
  auto unplace = [&](CK_RV rv) {
    if (group != Session::kNoGroup) {
      rt.groups()->release_session(group, at.member);
      rt.group_login()->closed(group);
    }
    return rv;
  };
  SessionLease lease;
  try {
    lease = rt.sessions().reserve();
  } catch (const CkrError& e) {
    return unplace(e.rv());
  } catch (const std::bad_alloc&) {
    return unplace(CKR_HOST_MEMORY);
  }
  HeldLock leased(lease->lock);
  SessionPool& pool = *at.pool;
  lease->slot = at.backend_slot;
  lease->shown = shown;
  lease->pool = &pool;
  lease->group = group;
  lease->member = static_cast<std::uint32_t>(at.member);
  lease->rw = (flags & CKF_RW_SESSION) != 0;
  if (lane != nullptr) {
    lease->lead = lane->lead;
    lease->lanes_of_lead = lane->lanes;
  }
  // A group's session: what failover replays (group/operation_record.hpp).
  if (group != Session::kNoGroup) {
    if (!lease->operations) {
      lease->operations.reset(new (std::nothrow) SessionOperations);
      if (!lease->operations) {
        rt.sessions().discard(std::move(lease));
        return unplace(CKR_HOST_MEMORY);
      }
    }
    lease->operations->reset();
    lease->operations->admissions_seen = rt.groups()->admissions(group);
    on_member(*rt.groups(), *lease, at.member);
  }
  lease->application.store(application, std::memory_order_relaxed);
  lease->notify.store(notify, std::memory_order_release);
  // [pool] bind = state: no backend session until a call needs one (a
  // session with a Notify callback keeps its own from the start).
  CK_RV rv = notify != nullptr ? pool.open_notified(at.backend_slot, lease->rw, lease.operator->(),
                                                    &notify_trampoline, lease->anchor.backend)
             : rt.binds_on_state() ? pool.admit(at.backend_slot, lease->rw)
                                   : pool.open(at.backend_slot, lease->rw, lease->anchor.backend);
  if (rv != CKR_OK) {
    rt.sessions().discard(std::move(lease));
    return unplace(rv);
  }
  out = lease->opening_handle;
  rt.sessions().publish(*lease);
  return CKR_OK;
}

// Multiplex mode on a group's slot: the session the application sees leads
// lanes opened as its threads call (group/session_lanes.hpp); it holds no
// backend session itself. It opens only while a member has its token, as a
// session placed would.
CK_RV open_lead(Runtime& rt, const GroupRuntime& groups, CK_SLOT_ID slot, CK_FLAGS flags,
                CK_VOID_PTR application, CK_NOTIFY notify, CK_SESSION_HANDLE& out) noexcept {
  try {
    const std::size_t member = groups.place_session(slot);
    if (member == GroupRuntime::kNoMember) return CKR_TOKEN_NOT_PRESENT;
    groups.release_session(slot, member);
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
  SessionLease lease;
  try {
    lease = rt.sessions().reserve();
  } catch (const CkrError& e) {
    return e.rv();
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
  HeldLock leased(lease->lock);
  if (!lease->lanes) {
    lease->lanes.reset(new (std::nothrow) SessionLanes);
    if (!lease->lanes) {
      rt.sessions().discard(std::move(lease));
      return CKR_HOST_MEMORY;
    }
  }
  lease->lanes->reset();
  lease->leads = true;
  lease->slot = 0;
  lease->pool = nullptr;  // never used: a lead makes no backend call
  lease->shown = slot;
  lease->group = static_cast<std::uint32_t>(slot);
  lease->member = 0;
  lease->rw = (flags & CKF_RW_SESSION) != 0;
  lease->application.store(application, std::memory_order_relaxed);
  lease->notify.store(notify, std::memory_order_release);
  out = lease->opening_handle;
  rt.sessions().publish(*lease);
  return CKR_OK;
}

}  // namespace

// With a Notify callback the backend session is the application's alone:
// it is opened for it (with p11mux's trampoline) and closed with it, not
// pooled, because a pooled session cannot change its callback. It counts
// against the slot's session limit like any other.
CK_RV open_session(Runtime& rt, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                   CK_NOTIFY notify, CK_SESSION_HANDLE_PTR session) noexcept {
  // Checked here because a pooled session would hide the backend's refusal.
  if ((flags & CKF_SERIAL_SESSION) == 0) return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
  const GroupRuntime* groups = rt.groups();
  if (groups == nullptr) {
    return open_placed(rt, slot, flags, application, notify, Placement{&rt.pool(), slot}, nullptr,
                       *session);
  }
  if (CK_RV rv = group_serves(rt, *groups, slot); rv != CKR_OK) return rv;
  if (rt.multiplexed()) return open_lead(rt, *groups, slot, flags, application, notify, *session);
  // Passing over a member that cannot be logged in (docs/groups.md,
  // "Keeping the PIN").
  return groups->place_and_open(
      slot, CKR_TOKEN_NOT_PRESENT, [&] { return groups->place_session(slot); },
      [&](std::size_t member) {
        return open_placed(rt, slot, flags, application, notify,
                           on_member(rt, *groups, slot, member), nullptr, *session);
      });
}

CK_RV open_lane(Runtime& rt, const LaneOrigin& origin, std::size_t member,
                CK_SESSION_HANDLE& lane) noexcept {
  const GroupRuntime& groups = *rt.groups();
  std::size_t first = member;
  // `member` first; placed anew as lane_of places, unless the lane is pinned
  // to it (its session's objects are there).
  auto place = [&] {
    std::size_t m = first;
    first = GroupRuntime::kNoMember;
    if (m == GroupRuntime::kNoMember &&
        origin.lanes->pinned.load(std::memory_order_relaxed) == SessionLanes::kNone) {
      m = groups.choose_member(origin.group);
    }
    if (m != GroupRuntime::kNoMember) groups.count_session(origin.group, m);
    return m;
  };
  return groups.place_and_open(origin.group, CKR_DEVICE_ERROR, place, [&](std::size_t m) {
    return open_placed(rt, origin.group, CKF_SERIAL_SESSION | (origin.rw ? CKF_RW_SESSION : 0),
                       origin.application, origin.notify, on_member(rt, groups, origin.group, m),
                       &origin, lane);
  });
}

CK_RV close_session(Runtime& rt, CK_SESSION_HANDLE session) noexcept {
  SessionLease lease = rt.sessions().lease(session);
  if (!lease) return CKR_SESSION_HANDLE_INVALID;
  HeldLock leased(lease->lock);
  // A lane's handle is never the application's (group/session_lanes.hpp).
  if (lease->lead != 0) return CKR_SESSION_HANDLE_INVALID;
  return rt.close_session(std::move(lease));
}

CK_RV close_all_sessions(Runtime& rt, CK_SLOT_ID slot) noexcept {
  // Not the backend's C_CloseAllSessions: that would also close p11mux's
  // idle pooled sessions. Asking for the slot's info validates the slot ID
  // (unless the backend lacks C_GetSlotInfo: then the slot is not checked).
  // In a group configuration the slot IDs are p11mux's (group_runtime.hpp).
  CK_SLOT_INFO info{};
  if (const GroupRuntime* groups = rt.groups()) {
    if (!groups->known(slot)) return CKR_SLOT_ID_INVALID;
  } else if (CK_RV rv = rt.port().call<fn::C_GetSlotInfo>(slot, &info);
             rv != CKR_OK && rv != CKR_FUNCTION_NOT_SUPPORTED) {
    return rv;
  }
  rt.sessions().for_each_live([&](SessionLease lease) {
    HeldLock leased(lease->lock);
    if (lease->shown == slot) (void)rt.close_session(std::move(lease));
  });
  return CKR_OK;
}

}  // namespace p11mux
