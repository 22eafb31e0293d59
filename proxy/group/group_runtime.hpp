// The groups of one initialization (issue 15, docs/groups.md): which slot of
// which backend each member is, the slot IDs the application sees, and the
// answers of the slot functions on them.
//
// Built at C_Initialize over the named backends' ports, which the runtime
// owns (lifecycle/runtime.hpp); immutable afterwards, so it is read without a
// lock (the session counts of placement are atomics of their own). A session
// on a group's slot runs on one member, chosen when it opens by the group's
// `balance` (place_session); the runtime opens it (handled/session_calls.cpp).
//
// Slot IDs: in a group configuration no top-level module is loaded
// (config.cpp refuses both), so every slot the application sees is one of
// p11mux's, numbered by p11mux: the groups first, 0 to G-1 in file order,
// then the members shown (hide_members = false), G onwards, in the order
// their groups and members are written. The members' own slot IDs are never
// shown: two modules may both number a slot 0.
#pragma once

#include "config/config.hpp"
#include "group/balancer.hpp"
#include "group/group_slot.hpp"
#include "group/member_health.hpp"
#include "group/session_placement.hpp"
#include "observe/stats_report.hpp"
#include "port/backend_port.hpp"

#include <p11mux/pkcs11.h>

#include <spdlog/logger.h>

#include <atomic>
#include <functional>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

namespace p11mux {

class GroupRuntime {
 public:
  // `ports[i]` serves config.backends[i]. Finds each member's slot by its
  // token, and reads each member's mechanisms. Throws CkrError
  // (CKR_GENERAL_ERROR) naming the group and the member when a member's
  // token is not found, is found twice, or a member will not say what it
  // holds; ConfigError for a group without members.
  GroupRuntime(const Config& config, std::span<const BackendPort* const> ports,
               spdlog::logger& log);
  GroupRuntime(const GroupRuntime&) = delete;  // the members point into it
  GroupRuntime& operator=(const GroupRuntime&) = delete;

  // A member as found: its backend's port and its slot on that backend.
  struct Member {
    const BackendPort* port;
    CK_SLOT_ID slot;     // the backend's own slot ID
    GroupMember config;  // its backend and token, as configured
  };

  std::size_t group_count() const noexcept { return groups_.size(); }
  const std::vector<Member>& members(std::size_t group) const { return groups_.at(group).members; }
  // The slot ID the application sees for group `group` (0-based, file order).
  static CK_SLOT_ID group_slot_id(std::size_t group) noexcept { return group; }

  // The slot functions, on the slot IDs above: the group's slot synthesized
  // from its members (group_slot.hpp), a member shown answered by its
  // backend, any other ID CKR_SLOT_ID_INVALID.
  CK_RV get_slot_list(CK_BBOOL token_present, CK_SLOT_ID_PTR list,
                      CK_ULONG_PTR count) const noexcept;
  CK_RV get_slot_info(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info) const noexcept;
  CK_RV get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) const noexcept;
  CK_RV get_mechanism_list(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list,
                           CK_ULONG_PTR count) const noexcept;
  CK_RV get_mechanism_info(CK_SLOT_ID slot, CK_MECHANISM_TYPE type,
                           CK_MECHANISM_INFO_PTR info) const noexcept;
  // The member a new session on group slot `slot` runs on, by the group's
  // `balance` (session_placement.hpp) among the members up whose token is
  // present and that can be logged in as the group is (login_ready),
  // counted there until release_session: its index in members(slot). When
  // only members that cannot be logged in are left, the first of them (its
  // open then fails, GroupLogin::opening); kNoMember when no member up has
  // its token. `slot` must be a group's (is_group).
  static constexpr std::size_t kNoMember = ~std::size_t{0};
  std::size_t place_session(CK_SLOT_ID slot) const;
  void release_session(CK_SLOT_ID slot, std::size_t member) const noexcept;
  // Multiplex mode (session_lanes.hpp): the member a lane's next backend
  // session comes from, by the group's `balance` over calls in flight
  // (balancer.hpp) among the members up that can be logged in; when none
  // can, the first member up (as place_session); kNoMember when none is up.
  // Chosen without a lock and without asking the member anything; not counted.
  std::size_t choose_member(CK_SLOT_ID slot) const noexcept;
  // Whether `member` can be logged in as the group is, as far as p11mux
  // knows: false while the application is logged in to the group and the
  // member refused the kept PIN, or missed the login with none kept, until
  // the application logs in again or out (GroupLogin; docs/groups.md,
  // "Keeping the PIN"). Placement passes over such a member while another
  // can take the session. An atomic per member: set by GroupLogin under its
  // group's lock or its kept login's (a refusal noted as the member answers),
  // read by placement without either (no lock taken here).
  bool login_ready(CK_SLOT_ID slot, std::size_t member) const noexcept {
    return !groups_[slot].login_refused[member].load(std::memory_order_acquire);
  }
  void set_login_ready(CK_SLOT_ID slot, std::size_t member, bool ready) const noexcept {
    groups_[slot].login_refused[member].store(!ready, std::memory_order_release);
  }
  // Whether `member` takes a new session now: up, and login_ready.
  bool takes_sessions(CK_SLOT_ID slot, std::size_t member) const noexcept {
    return health(slot, member).up() && login_ready(slot, member);
  }
  // A session of group `slot` placed by `place()` (a member, counted there;
  // kNoMember: none) and opened there by `open(member)` (which lets the
  // count go if it fails). When the member is found unable to take it while
  // it opens (it refused the kept PIN, or went down: GroupLogin::opening),
  // the session is placed anew, at most once per member; a member that
  // could not take it when placed (no other could either) keeps its answer.
  // `none`: the answer when nothing is placed at first.
  template <class Place, class Open>
  CK_RV place_and_open(CK_SLOT_ID slot, CK_RV none, Place&& place, Open&& open) const noexcept {
    CK_RV rv = none;
    for (std::size_t tries = 0; tries < members(slot).size(); ++tries) {
      std::size_t member = kNoMember;
      try {
        member = place();
      } catch (const std::bad_alloc&) {
        return CKR_HOST_MEMORY;
      }
      if (member == kNoMember) return rv;
      const bool could = takes_sessions(slot, member);
      rv = open(member);
      if (rv == CKR_OK || !could || takes_sessions(slot, member)) return rv;
    }
    return rv;
  }
  // A session placed on `member` without place_session (a lane), counted
  // there until release_session.
  void count_session(CK_SLOT_ID slot, std::size_t member) const noexcept;
  // A member's health: its calls counted, down and up again
  // (member_health.hpp). Thread-safe on its own.
  MemberHealth& health(CK_SLOT_ID slot, std::size_t member) const noexcept {
    return *groups_[slot].health[member];
  }
  // Every member's watch: calls in flight and none answered for
  // hang_timeout_s mark its member down (hung); each member that went down
  // is logged once. It calls no member, so that a member that stops
  // answering cannot stop it: run every maintenance_period() on a p11mux
  // thread of its own.
  void watch(HealthClock::time_point now) const noexcept;
  // Member `member` of group `group`'s recovery: a down member whose probe
  // is due is probed (its token present, a session opened and closed on it)
  // and, if it answers, joins: `join(group, member)` logs it in as the group
  // is (GroupLogin::join) before it takes calls; true admits it again, false
  // keeps it down (DownReason::login_failed) until its next probe.
  // `admitted(group, member)` is told of it, then it is admitted. Run every
  // maintenance_period() on a p11mux thread per member: a probe that hangs
  // holds up that member's recovery only (proxy/group/README.md, "A hung
  // member").
  void recover(std::size_t group, std::size_t member, HealthClock::time_point now,
               const std::function<bool(std::size_t, std::size_t)>& join,
               const std::function<void(std::size_t, std::size_t)>& admitted) const noexcept;
  // An eighth of the shortest recovery_interval_s or hang_timeout_s, at
  // least 100 ms: a probe is due at most 12.5% late, and a hung member
  // (found at most two looks late: MemberHealth::check_hung) 25%.
  std::chrono::milliseconds maintenance_period() const noexcept;
  // Every member's figures, for /metrics, /stats and the summary.
  std::vector<MemberFigures> member_figures() const;
  // How many times a member of group `slot` was admitted again: a session
  // that has not seen the latest count may move to it (member_calls.hpp,
  // rebalance), so that load spreads to a member that returns.
  std::uint32_t admissions(CK_SLOT_ID slot) const noexcept {
    return admission_count(slot).load(std::memory_order_acquire);
  }
  const std::atomic<std::uint32_t>& admission_count(CK_SLOT_ID slot) const noexcept {
    return *groups_[slot].admissions;
  }
  // Whether the group's balance is `primary`: its members' order counts.
  bool ordered(CK_SLOT_ID slot) const noexcept { return balance(slot) == Balance::primary; }
  Balance balance(CK_SLOT_ID slot) const noexcept { return groups_[slot].balancer->rule(); }
  // The group's sessions on each member (tests, /stats).
  std::uint32_t member_sessions(CK_SLOT_ID slot, std::size_t member) const noexcept;
  // Whether member `m`'s token is in its slot now (its slot says
  // CKF_TOKEN_PRESENT and the token there is the member's).
  static bool token_present(const Member& m) noexcept;
  bool is_group(CK_SLOT_ID slot) const noexcept { return group_at(slot) != nullptr; }
  // Any slot ID the application may see: a group's or a member shown.
  bool known(CK_SLOT_ID slot) const noexcept;

  // Not served yet: C_InitToken, C_WaitForSlotEvent, and C_OpenSession on
  // a member shown answer CKR_FUNCTION_NOT_SUPPORTED (docs/pkcs11-facts.md,
  // "Policy": every function may answer it) with a log line saying why
  // (`why`: what is not built yet).
  CK_RV refuse(std::string_view function, CK_SLOT_ID slot,
               std::string_view why = "the next step") const noexcept;
  CK_RV refuse_slot_events() const noexcept;

 private:
  struct GroupSlot {
    std::string name;
    std::vector<Member> members;
    MechanismList mechanisms;  // the intersection, read at C_Initialize
    // Thread-safe on its own: placing a session changes only its counts.
    std::unique_ptr<SessionPlacement> placement;
    // Thread-safe on its own; over `health` (multiplex mode's choices).
    std::unique_ptr<Balancer> balancer;
    std::vector<std::unique_ptr<MemberHealth>> health;  // one per member
    std::chrono::nanoseconds shortest_period{};
    // Per member: the times it went down that watch() has logged.
    std::unique_ptr<std::atomic<std::uint64_t>[]> downs_told;
    // Per member: it cannot be logged in as the group is (login_ready).
    std::unique_ptr<std::atomic<bool>[]> login_refused;
    std::unique_ptr<std::atomic<std::uint32_t>> admissions =
        std::make_unique<std::atomic<std::uint32_t>>(0);
  };
  // Placement's look at a member: up, and its token present (token_present),
  // the look in flight on the member while it runs, so that one that stops
  // answering under it is found hung; false if it is not up after.
  bool present_and_up(const GroupSlot& group, std::size_t member) const noexcept;
  // A down member's probe: its token present, and a session opened and
  // closed on it (straight on its port, not through the pool).
  bool probe(const GroupSlot& group, const Member& m) const noexcept;
  // A member's slot shown as its own (hide_members = false).
  struct Shown {
    const BackendPort* port;
    CK_SLOT_ID slot;
  };
  const GroupSlot* group_at(CK_SLOT_ID slot) const noexcept;
  const Shown* shown_at(CK_SLOT_ID slot) const noexcept;
  // The members' slot infos and tokens, those that answer.
  std::vector<MemberSlot> member_slots(const GroupSlot& group) const;

  std::vector<GroupSlot> groups_;
  std::vector<Shown> shown_;
  spdlog::logger& log_;
};

}  // namespace p11mux
