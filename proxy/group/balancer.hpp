// Which member of a group a new backend session (or a call that needs one)
// goes to ([group.NAME] balance, issue 15; this folder's README.md,
// "Balancer"): least-busy, round-robin, or primary. Only members that are up
// (member_health.hpp), and not passed over for their login, are chosen. least-busy weighs a
// member's calls in flight plus the calls waiting for one of its backend sessions
// (MemberHealth::load): calls queued at a full pool are work for it too.
//
// On the per-call path when a call needs a backend session: no lock, no
// allocation. The choice and the count of the call in flight are one step
// (pick() begins the call on the member it returns), so threads choosing at
// once see each other's choices; a member found down after it was counted is
// let go and the choice made again.
#pragma once

#include "config/config.hpp"
#include "group/member_health.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace p11mux {

class Balancer {
 public:
  static constexpr std::size_t kNone = ~std::size_t{0};
  static constexpr std::uint32_t kUnlimited = 0;

  // `members` in configuration order (the order `primary` fills them), each
  // outliving the balancer; `capacity[i]`: how many calls member i takes in
  // flight at once before `primary` moves on (its session limit, or a limit
  // the runtime sets; kUnlimited: never full). Missing entries are kUnlimited.
  // `passed_over[i]`, if given (outliving the balancer): true while member i
  // cannot be logged in as its group is (GroupRuntime::login_ready); no rule
  // chooses it then, as if it were not up.
  Balancer(Balance rule, std::span<MemberHealth* const> members,
           std::span<const std::uint32_t> capacity = {},
           std::span<const std::atomic<bool>> passed_over = {});
  Balancer(const Balancer&) = delete;  // its rotor is shared by the threads choosing
  Balancer& operator=(const Balancer&) = delete;

  // A member chosen, with its call begun (MemberHealth::begin): the caller
  // ends it with members[member]->end(...) or cancel(). `member` is kNone when no
  // member is up (and not passed over): the runtime answers CKR_DEVICE_ERROR
  // (README.md, "When no member is up").
  struct Pick {
    std::size_t member = kNone;
    explicit operator bool() const noexcept { return member != kNone; }
  };
  Pick pick() noexcept;

  Balance rule() const noexcept { return rule_; }
  std::size_t size() const noexcept { return members_.size(); }
  MemberHealth& member(std::size_t i) const noexcept { return *members_[i]; }

 private:
  // Up, and not passed over: a member any rule may choose.
  bool eligible(std::size_t i) const noexcept {
    return members_[i]->up() &&
           !(i < passed_over_.size() && passed_over_[i].load(std::memory_order_relaxed));
  }
  Pick least_busy() noexcept;
  Pick round_robin() noexcept;
  Pick primary() noexcept;
  // Member i's call, begun; kNone if it went down meanwhile (the call undone).
  Pick begin_on(std::size_t i) noexcept;
  // The same for a call begun already (MemberHealth::begin_below).
  Pick keep_if_up(std::size_t i) noexcept;

  const Balance rule_;
  const std::vector<MemberHealth*> members_;  // fixed at construction: nothing allocates after
  const std::vector<std::uint32_t> capacity_;
  const std::span<const std::atomic<bool>> passed_over_;
  // Turns for round-robin, and among least-busy's ties: a spread of choices
  // no thread's stack decides.
  alignas(64) std::atomic<std::uint64_t> rotor_{0};
};

}  // namespace p11mux
