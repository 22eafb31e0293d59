// The session pool's maintenance calls on a group member's token
// (SessionPool::SlotCalls; docs/groups.md, "Members up and down"): none
// while the member is not up (down, or hung: a call would hang the
// maintenance thread with it, proxy/group/README.md, "A hung member"), and
// each counted as a call in flight on the member, so that a member that
// stops answering while the application leaves it idle is found hung by its
// keepalive ping, and its answers count as any call's.
#pragma once

#include "group/member_health.hpp"
#include "sessions/session_pool.hpp"

#include <algorithm>
#include <utility>
#include <vector>

namespace p11mux {

class MemberPoolCalls final : public SessionPool::SlotCalls {
 public:
  // The health of each member this token is (the same token may be a
  // member of several groups); they outlive it.
  explicit MemberPoolCalls(std::vector<MemberHealth*> members) : members_(std::move(members)) {}

  bool begin() noexcept override {
    // Counted first, the state read after (as the balancer does): a member
    // marked down before this look is never called.
    for (MemberHealth* m : members_) m->begin();
    if (std::all_of(members_.begin(), members_.end(),
                    [](const MemberHealth* m) { return m->up(); }))
      return true;
    for (MemberHealth* m : members_) m->cancel();
    return false;
  }
  void end(CK_RV rv) noexcept override {
    const HealthClock::time_point now = HealthClock::now();
    // No session named: a pooled session gone counts no streak.
    for (MemberHealth* m : members_) (void)m->end(rv, CK_INVALID_HANDLE, now);
  }

 private:
  const std::vector<MemberHealth*> members_;
};

}  // namespace p11mux
