// Which member of a group a new virtual session runs on in serialize mode
// ([group.NAME] balance, issue 15; docs/groups.md, "Sessions on a group"):
// a session's calls all go to one member, so the unit of load is the
// session. The balancer (balancer.hpp) weighs calls in flight instead, for
// a call that picks its member itself.
//
//   least-busy   the member holding the fewest of the group's sessions
//                (ties taken in turn);
//   round-robin  each member in turn;
//   primary      the first member, in the order written, until it holds as
//                many sessions as its capacity (its token's
//                ulMaxSessionCount), then the next; all full, least-busy.
//
// A member the runtime finds unfit (its token absent; later: down) is
// passed over for that choice, and the choice made again.
//
// Thread-safe, lock-free: one atomic count per member and a rotor. Two
// threads choosing at once may both see the same member least busy; the
// counts stay exact, and a capacity is never exceeded (taken by
// compare-exchange).
#pragma once

#include "config/config.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace p11mux {

class SessionPlacement {
 public:
  static constexpr std::size_t kNone = ~std::size_t{0};
  static constexpr std::uint32_t kUnlimited = 0;

  // `capacity[i]`: the sessions member i takes before `primary` moves on
  // (kUnlimited: never full); one per member.
  SessionPlacement(Balance rule, std::span<const std::uint32_t> capacity);
  SessionPlacement(const SessionPlacement&) = delete;  // the counts are shared by the threads
  SessionPlacement& operator=(const SessionPlacement&) = delete;

  // A member for a new session, counted; kNone when `fit` refuses every
  // member. `fit(i)` is asked of the chosen member only, and again after a
  // refusal for the next choice, so each member at most once.
  template <class Fit>
  std::size_t place(Fit&& fit) {
    std::vector<bool> refused(size(), false);
    for (;;) {
      const std::size_t member = choose(refused);
      if (member == kNone || fit(member)) return member;
      release(member);
      refused[member] = true;
    }
  }
  // A session counted on `member` whatever its capacity (one moved there
  // by a choice of its own: a lane, group/session_lanes.hpp).
  void add(std::size_t member) noexcept { take(member, kUnlimited); }
  // The session on `member` closed.
  void release(std::size_t member) noexcept;

  std::uint32_t sessions(std::size_t member) const noexcept {
    return counts_[member].value.load(std::memory_order_relaxed);
  }
  std::size_t size() const noexcept { return capacity_.size(); }
  Balance rule() const noexcept { return rule_; }

 private:
  // One choice among the members not yet refused, counted: kNone when none.
  std::size_t choose(const std::vector<bool>& refused) noexcept;
  std::size_t least_busy(const std::vector<bool>& refused) noexcept;
  // Counts a session on `member` if it is below `limit` (kUnlimited: always).
  bool take(std::size_t member, std::uint32_t limit) noexcept;

  struct alignas(64) Count {
    std::atomic<std::uint32_t> value{0};
  };
  const Balance rule_;
  const std::vector<std::uint32_t> capacity_;
  std::unique_ptr<Count[]> counts_;
  std::atomic<std::uint64_t> rotor_{0};
};

// A token's ulMaxSessionCount as a capacity: no limit said (0,
// CK_EFFECTIVELY_INFINITE) or unknown (CK_UNAVAILABLE_INFORMATION) is
// kUnlimited; above 2^32 - 1, the most a count holds.
std::uint32_t session_capacity(unsigned long max_session_count) noexcept;

}  // namespace p11mux
