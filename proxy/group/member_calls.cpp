#include "group/member_calls.hpp"

#include "group/group_login.hpp"
#include "group/group_objects.hpp"
#include "handled/handled.hpp"

namespace p11mux {

CK_RV move_off_down_member(Runtime& rt, const GroupRuntime& groups, Session& s) noexcept {
  const std::size_t from = s.member;
  std::size_t to = GroupRuntime::kNoMember;
  try {
    to = groups.place_session(s.group);
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
  // No member up: CKR_DEVICE_ERROR at once (proxy/group/README.md, "When no
  // member is up"), not a wait for a recovery that may be minutes away.
  if (to == GroupRuntime::kNoMember) return CKR_DEVICE_ERROR;
  // Logged in there as the group is (group_login.hpp); counted as one more
  // of the group's sessions until the old one is let go below.
  GroupLogin& login = *rt.group_login();
  if (CK_RV rv = login.opening(s.group, to); rv != CKR_OK) {
    groups.release_session(s.group, to);
    return rv;
  }
  const GroupRuntime::Member& member = groups.members(s.group)[to];
  SessionPool& pool = rt.pool_of(*member.port);
  // Its place on the new member first: if that fails, it stays where it was.
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
  // The old member's session is dead with it: forgotten, never reused, and
  // the session objects made there with it.
  if (s.anchor.backend != CK_INVALID_HANDLE)
    group_session_ended(rt, s.group, from, s.anchor.backend);
  if (s.anchor.backend == CK_INVALID_HANDLE) {
    s.pool->leave(s.slot, s.rw);
  } else {
    s.pool->close(s.slot, s.rw, s.anchor.backend, SessionPool::Fate::dead);
  }
  s.anchor.clear();
  s.anchor.backend = fresh;
  groups.release_session(s.group, from);
  login.closed(s.group);  // the count opening() took: the session is still one
  groups.health(s.group, from).count_failover();
  s.pool = &pool;
  s.slot = member.slot;
  s.member = static_cast<std::uint32_t>(to);
  return CKR_OK;
}

}  // namespace p11mux
