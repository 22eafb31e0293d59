// The changes to a group's token objects that a member missed (issue 15;
// docs/groups.md "Objects", "A member that missed changes"). A member that is
// down, or answers as absent, during a C_CreateObject, C_CopyObject,
// C_SetAttributeValue or C_DestroyObject of a token object does not get it;
// the change is kept here, in order, and made on the member when it returns,
// before it is admitted (group_catch_up.hpp). Until then every later change
// is kept for it too, never made on it directly, so that the member sees the
// group's changes in the group's order.
//
// Bounded: at most `limit` changes per member (kJournalLimit). One more, or
// one that cannot be kept (a template over TemplateCopy::kMaxBytes, a nested
// array attribute, no memory), and the member is `lost`: its changes are
// dropped (their templates zeroed), and it stays out of the group until
// p11mux is initialized again, after the operator brought its token up to
// date. Never trusted blindly: a member is not guessed back into step.
//
// A change missed by several members is one MissedChange, shared: its
// template (which may hold a secret key's CKA_VALUE) is zeroed when the last
// member has replayed it or dropped it.
//
// One lock per group, a leaf of the lock order (sync/lock.hpp): no backend
// call and no other lock under it.
#pragma once

#include "group/member_health.hpp"
#include "group/object_map.hpp"
#include "group/template_copy.hpp"
#include "sync/guarded.hpp"
#include "sync/lock.hpp"

#include <p11mux/pkcs11.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

namespace p11mux {

struct MissedChange {
  enum class Kind : std::uint8_t { create, copy, set, destroy };
  Kind kind = Kind::create;
  // create: the new object's identity; copy: the original's; set and
  // destroy: the object's before the change.
  ObjectIdentity object;
  // copy: the copy's identity (it must not be taken on the member).
  std::optional<ObjectIdentity> made;
  TemplateCopy templ;  // create, copy, set

  std::string_view function() const noexcept;
};
using MissedChangePtr = std::shared_ptr<MissedChange>;

// Why a member cannot be brought up to date from the journal.
enum class JournalLost : std::uint8_t {
  none,
  overflow,       // it missed more than the limit
  not_kept,       // a change could not be kept (template too large, nested too deep, memory)
  replay_failed,  // a change made on it failed (the member's answer was no absence)
};
const char* to_string(JournalLost lost) noexcept;

class ObjectJournal {
 public:
  // At most this many changes kept per member.
  static constexpr std::size_t kJournalLimit = 1024;

  ObjectJournal(std::size_t members, const LockSource& locks, std::size_t limit = kJournalLimit);
  ObjectJournal(const ObjectJournal&) = delete;
  ObjectJournal& operator=(const ObjectJournal&) = delete;

  enum class Kept : std::uint8_t {
    take,      // the member takes the change now: make it there
    kept,      // kept for the member's return
    lost_now,  // not kept: the member is lost from now on (log it once)
    lost,      // the member was lost already
  };
  // A member as its health tells it now (member_health.hpp): its state,
  // and how many times it went down.
  struct MemberNow {
    MemberState state = MemberState::up;
    std::uint64_t downs = 0;
  };
  // A change for `member`: `take` when it missed nothing and is up, or is
  // joining and was brought up to date since it last went down (take()
  // found nothing left: it is logged in and in step, and about to be
  // admitted). Else the change (`change`, built by `build()` once, shared by
  // every member that misses it) is kept for it: a member down, probing, or
  // joining before its login and catch-up are done. One lock: the choice and
  // the keeping are one step, so a member being brought up to date never
  // misses a change between the two.
  template <class Build>
  Kept keep_unless_reachable(std::size_t member, MemberNow now, MissedChangePtr& change,
                             Build&& build);
  // The member took the change and answered as absent: kept for it.
  template <class Build>
  Kept missed(std::size_t member, MissedChangePtr& change, Build&& build);

  // What the member missed, for its return (group_catch_up), `downs` its
  // count of downs now. `lost`: it cannot be brought up to date. No change
  // and not lost: it is in step from now on (changes are made on it directly
  // again, joining already).
  struct Batch {
    JournalLost lost = JournalLost::none;
    std::vector<MissedChangePtr> changes;
  };
  Batch take(std::size_t member, std::uint64_t downs);
  // Changes not made after all (a member absent again): first in line again,
  // in their order, before any kept meanwhile.
  void put_back(std::size_t member, std::vector<MissedChangePtr> changes);
  // A change kept for the member, then undone on the members that took it
  // (another refused it): no longer kept. One a return is making now is
  // made (the undo and the return overlapped; the group logs the undo).
  void withdraw(std::size_t member, const MissedChangePtr& change);
  // The member cannot be brought up to date: its changes dropped, and kept
  // no more, until the journal goes (p11mux initialized again).
  void lose(std::size_t member, JournalLost why);

  // C_Finalize: the member's changes dropped (their templates zeroed, the
  // last holder's); how many there were, and whether it was lost already.
  struct Dropped {
    std::size_t changes = 0;
    JournalLost lost = JournalLost::none;
  };
  Dropped drop(std::size_t member);

  // Whether the member has changes kept, and how many (tests, logs).
  bool behind(std::size_t member);
  std::size_t pending(std::size_t member);
  JournalLost lost(std::size_t member);

 private:
  struct Member {
    std::deque<MissedChangePtr> changes;
    bool behind = false;  // changes go to `changes`, not to the member
    // Its count of downs when take() last found it in step: while joining
    // with the same count, it takes changes (its catch-up is done).
    std::uint64_t in_step_at = ~std::uint64_t{0};
    JournalLost lost = JournalLost::none;
  };
  struct State {
    std::vector<Member> members;
  };
  // Keeps the change for `m` (built when still null); the lock held.
  static Kept keep(Member& m, std::size_t limit, MissedChangePtr& change,
                   MissedChangePtr (*build)(void*), void* ctx) noexcept;

  const std::size_t limit_;
  Guarded<State> state_;
};

template <class Build>
ObjectJournal::Kept ObjectJournal::keep_unless_reachable(std::size_t member, MemberNow now,
                                                         MissedChangePtr& change, Build&& build) {
  Locked s(state_);
  Member& m = s->members.at(member);
  if (m.lost != JournalLost::none) return Kept::lost;
  const bool reachable = now.state == MemberState::up ||
                         (now.state == MemberState::joining && m.in_step_at == now.downs);
  if (reachable && !m.behind) return Kept::take;
  return keep(
      m, limit_, change,
      [](void* b) { return (*static_cast<std::remove_reference_t<Build>*>(b))(); }, &build);
}

template <class Build>
ObjectJournal::Kept ObjectJournal::missed(std::size_t member, MissedChangePtr& change,
                                          Build&& build) {
  Locked s(state_);
  Member& m = s->members.at(member);
  if (m.lost != JournalLost::none) return Kept::lost;
  return keep(
      m, limit_, change,
      [](void* b) { return (*static_cast<std::remove_reference_t<Build>*>(b))(); }, &build);
}

}  // namespace p11mux
