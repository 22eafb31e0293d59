// Multiplex mode on a group's slot (issue 15; docs/groups.md, "Multiplex
// mode"). A virtual session that several threads call at once runs each
// thread's calls on a session of its own, the thread's lane: a group's
// session as in serialize mode (placed on a member, moved off it when that
// member fails, its operations replayed, its object handles translated:
// member_calls.hpp, replay_calls.hpp, group_object_calls.hpp), opened at the
// thread's first call and closed with the virtual session. The session the
// application sees, the lead, holds its lanes' handles and no backend
// session. A lane's lock serializes its own thread's calls only, so threads
// do not wait for each other; with [pool] bind = state (multiplex mode's
// default) a lane holds a backend session only while it has state there, and
// each time it needs one anew it may move to the member the group's
// `balance` chooses over calls in flight (member_calls.hpp, place_lane).
//
// Lock order: a lead's lock, then its lanes' (closing); never the other way.
#pragma once

#include "lifecycle/runtime.hpp"
#include "sessions/session_table.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace p11mux {

struct SessionLanes {
  struct Lane {
    std::uint64_t thread;  // this_thread_number() (forward/multiplex.hpp)
    CK_SESSION_HANDLE handle;
    // False once its thread has exited (session_lanes.cpp, ThreadAlive):
    // the lane is then closed when another thread comes for one, so that
    // threads coming and going do not pile lanes up on a long session.
    std::shared_ptr<const std::atomic<bool>> alive;
  };
  // Reached through its lead's `lanes`, GUARDED_BY the lead's lock.
  std::vector<Lane> lanes;
  // The member a lane made session objects on: they are usable there only
  // (docs/groups.md, "Objects"), so every lane goes there from then on,
  // until the virtual session closes or that member goes down. kNone: none.
  // Read by the lanes without the lead's lock.
  static constexpr std::uint32_t kNone = ~std::uint32_t{0};
  std::atomic<std::uint32_t> pinned{kNone};

  CK_SESSION_HANDLE of(std::uint64_t thread) const noexcept {
    for (const Lane& l : lanes)
      if (l.thread == thread) return l.handle;
    return CK_INVALID_HANDLE;
  }
  void reset() noexcept {
    lanes.clear();
    pinned.store(kNone, std::memory_order_relaxed);
  }
};

// What a lane takes from its lead when it opens.
struct LaneOrigin {
  CK_SESSION_HANDLE lead;
  SessionLanes* lanes;
  CK_SLOT_ID group;
  bool rw;
  CK_VOID_PTR application;
  CK_NOTIFY notify;
};

// Opens a lane of `origin` on `member` (handled/session_calls.cpp).
CK_RV open_lane(Runtime& rt, const LaneOrigin& origin, std::size_t member,
                CK_SESSION_HANDLE& lane) noexcept;

// This thread's lane of the session `lead`: found, or opened on the member
// the pin or the group's balance says. CKR_SESSION_HANDLE_INVALID when
// `lead` is not a lead open now (a lane's handle included: the application
// never sees those).
CK_RV lane_of(Runtime& rt, CK_SESSION_HANDLE lead, std::uint64_t me,
              CK_SESSION_HANDLE& lane) noexcept;

// The lanes of the session `lead`, appended to `out`;
// CKR_SESSION_HANDLE_INVALID when `lead` is not a lead open now.
CK_RV lanes_of(Runtime& rt, CK_SESSION_HANDLE lead, std::vector<CK_SESSION_HANDLE>& out) noexcept;

// The last leads this thread called and its lanes of them, so that a call
// finds its lane without the lead's lock. A stale entry is harmless: the
// lane's handle no longer leases, or its lead is another (lane_call checks).
// Initial-exec TLS: a %fs-relative load, no __tls_get_addr call.
struct LaneCache {
  struct Entry {
    CK_SESSION_HANDLE lead = 0;
    CK_SESSION_HANDLE lane = 0;
  };
  static constexpr std::size_t kEntries = 4;  // a power of two
  std::array<Entry, kEntries> entries{};
  Entry& at(CK_SESSION_HANDLE lead) noexcept { return entries[lead & (kEntries - 1)]; }
};
[[gnu::tls_model("initial-exec")]] inline constinit thread_local LaneCache lane_cache{};

// With the lead's lock: its lanes closed (each waits for its call to end),
// before the lead itself closes (Runtime::close_session).
void close_lanes(Runtime& rt, Session& lead) noexcept REQUIRES(lead.lock);

// After a call on lane `s`: session objects made on its member pin the
// virtual session's lanes there.
inline void note_lane_objects(Session& s) noexcept REQUIRES(s.lock) {
  if (s.anchor.objects.empty() || s.lanes_of_lead == nullptr) return;
  std::uint32_t none = SessionLanes::kNone;
  s.lanes_of_lead->pinned.compare_exchange_strong(none, s.member, std::memory_order_relaxed);
}

}  // namespace p11mux
