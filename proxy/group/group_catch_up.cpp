// The changes to token objects a member missed while down, made on it when
// it returns, before it is admitted (docs/groups.md, "Objects", "A member
// that missed changes"; object_journal.hpp).
#include "group/group_objects.hpp"
#include "group/group_objects_shared.hpp"

#include <p11mux/rv_names.hpp>

#include <spdlog/fmt/fmt.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace p11mux {

using namespace group_calls;

namespace {

// One missed change made on the member of `call` (its session `call.backend`).
// `rv` the member's answer; `why` set when p11mux refuses to make it (the
// member's objects are not what the change expects: refused rather than guessed).
struct Replayed {
  CK_RV rv = CKR_OK;
  const char* why = nullptr;
};

Replayed replay(GroupCall& call, MissedChange& change) noexcept {
  const std::size_t m = call.member;
  // Nothing of the new object's identity there yet.
  const auto untaken = [&](const ObjectIdentity& identity) -> Replayed {
    const ObjectMap::Resolved r = find_on(call, m, identity);
    if (r.status == ObjectMap::Status::failed) return {r.rv, nullptr};
    if (r.status != ObjectMap::Status::missing) {
      return {CKR_OK,
              "the member holds an object of the new object's identity already (made before it "
              "went down, or by other means): which one is the group's cannot be told"};
    }
    return {};
  };
  // The object the change is about, found by its identity then.
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
  const auto found = [&](bool absent_is_fine) -> Replayed {
    const ObjectMap::Resolved r = find_on(call, m, change.object);
    switch (r.status) {
      case ObjectMap::Status::found:
        object = r.object;
        return {};
      case ObjectMap::Status::failed:
        return {r.rv, nullptr};
      case ObjectMap::Status::missing:
        if (absent_is_fine) return {};
        return {CKR_OK, "the member holds no object of the identity the change is about"};
      default:
        return {CKR_OK, "the member holds several objects of the identity the change is about"};
    }
  };
  Replayed out;
  const auto run = [&](auto&& f) {
    return on_member(
        call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) noexcept { return f(port, h); });
  };
  CK_OBJECT_HANDLE made = CK_INVALID_HANDLE;
  switch (change.kind) {
    case MissedChange::Kind::create:
      if (out = untaken(change.object); out.rv != CKR_OK || out.why != nullptr) return out;
      out.rv = run([&](const BackendPort& port, CK_SESSION_HANDLE h) {
        return port.call<fn::C_CreateObject>(h, change.templ.data(), change.templ.size(), &made);
      });
      return out;
    case MissedChange::Kind::copy:
      if (change.made) {
        if (out = untaken(*change.made); out.rv != CKR_OK || out.why != nullptr) return out;
      }
      if (out = found(false); out.rv != CKR_OK || out.why != nullptr) return out;
      out.rv = run([&](const BackendPort& port, CK_SESSION_HANDLE h) {
        return port.call<fn::C_CopyObject>(h, object, change.templ.data(), change.templ.size(),
                                           &made);
      });
      return out;
    case MissedChange::Kind::set:
      if (out = found(false); out.rv != CKR_OK || out.why != nullptr) return out;
      out.rv = run([&](const BackendPort& port, CK_SESSION_HANDLE h) {
        return port.call<fn::C_SetAttributeValue>(h, object, change.templ.data(),
                                                  change.templ.size());
      });
      return out;
    case MissedChange::Kind::destroy:
      // Absent already is what the change asks.
      if (out = found(true); out.rv != CKR_OK || out.why != nullptr) return out;
      if (object == CK_INVALID_HANDLE) return out;
      out.rv = run([&](const BackendPort& port, CK_SESSION_HANDLE h) {
        return port.call<fn::C_DestroyObject>(h, object);
      });
      if (out.rv == CKR_OBJECT_HANDLE_INVALID) out.rv = CKR_OK;
      return out;
  }
  return out;
}

std::string describe(const ObjectIdentity& identity) {
  const auto text = [](const std::vector<CK_BYTE>& bytes) {
    std::string out;
    for (CK_BYTE b : bytes) out += (b >= 0x20 && b < 0x7f) ? static_cast<char>(b) : '.';
    return out;
  };
  std::string out = fmt::format("class {:#x}", identity.cls);
  if (identity.by_id) out += ", CKA_ID '" + text(identity.id) + "'";
  if (identity.by_label) out += ", CKA_LABEL '" + text(identity.label) + "'";
  return out;
}

}  // namespace

bool group_catch_up(Runtime& rt, std::size_t group, std::size_t member) noexcept try {
  GroupObjects& objects = rt.group_objects(group);
  MemberHealth& health = rt.groups()->health(group, member);
  const GroupRuntime::Member& m = rt.groups()->members(group).at(member);
  const auto stay_down = [&] {
    health.count_error();
    (void)health.mark_down(DownReason::out_of_sync, HealthClock::now());
    return false;
  };
  const auto lost = [&](JournalLost why, std::string_view detail) {
    if (objects.lost_told[member].exchange(true)) return stay_down();  // said once
    rt.log().error(
        "group '{}': member {} stays out of the group: {}{}. The group will not guess what its "
        "token holds: bring the token up to date with the other members' (the vendor's backup "
        "or cloning), then restart the application (C_Finalize, C_Initialize) "
        "(docs/groups.md, \"Objects\")",
        objects.name, member,
        why == JournalLost::replay_failed ? "a change it missed while down failed there"
                                          : "it missed changes to token objects that were not kept",
        detail);
    return stay_down();
  };
  // Changes kept meanwhile (a change made while it is brought back) are
  // taken in the next round; bounded, as the time a probe may take.
  for (int round = 0; round < 16; ++round) {
    ObjectJournal::Batch batch = objects.journal.take(member, health.counters().downs);
    if (batch.lost != JournalLost::none) {
      return lost(batch.lost, batch.lost == JournalLost::overflow
                                  ? fmt::format(" (more than {} changes, the journal's limit)",
                                                ObjectJournal::kJournalLimit)
                                  : std::string());
    }
    if (batch.changes.empty()) return true;
    CK_RV rv = CKR_OK;
    std::size_t done = 0;
    {
      Borrowed s(rt, m, /*rw=*/true);
      rv = s.rv();
      GroupCall call{rt, objects, group, member, s.handle(), "catch-up", false};
      for (; rv == CKR_OK && done < batch.changes.size(); ++done) {
        MissedChange& change = *batch.changes[done];
        const Replayed r = replay(call, change);
        s.answered(r.rv);
        rv = r.rv;
        if (r.why != nullptr || (rv != CKR_OK && !device_gone(rv) && !session_gone(rv))) {
          objects.journal.lose(member, JournalLost::replay_failed);
          return lost(JournalLost::replay_failed,
                      fmt::format(" ({} of the object of {}: {})", change.function(),
                                  describe(change.object), r.why != nullptr ? r.why : rv_name(rv)));
        }
        if (rv != CKR_OK) break;
        batch.changes[done].reset();  // made: its template zeroed unless another member waits
      }
    }
    if (rv != CKR_OK) {
      // Absent again: the rest waits for its next probe, in order.
      batch.changes.erase(batch.changes.begin(),
                          batch.changes.begin() + static_cast<std::ptrdiff_t>(done));
      const std::size_t left = batch.changes.size();
      objects.journal.put_back(member, std::move(batch.changes));
      rt.log().warn(
          "group '{}': member {} stays down until its next probe: {} while it was given the "
          "changes to token objects it missed ({} left)",
          objects.name, member, rv_name(rv), left);
      return stay_down();
    }
    rt.log().info("group '{}': member {} was given {} change(s) to token objects it missed",
                  objects.name, member, done);
  }
  rt.log().warn(
      "group '{}': member {} stays down until its next probe: changes to token objects keep "
      "coming faster than it is given them",
      objects.name, member);
  return stay_down();
} catch (...) {
  // No memory for a log line, say, perhaps with changes taken and not made:
  // not guessed back into step (docs/groups.md, "Objects").
  rt.group_objects(group).journal.lose(member, JournalLost::not_kept);
  (void)rt.groups()->health(group, member).mark_down(DownReason::out_of_sync, HealthClock::now());
  return false;
}

void group_objects_finalize(Runtime& rt) noexcept {
  const GroupRuntime& groups = *rt.groups();
  for (std::size_t g = 0; g < groups.group_count(); ++g) {
    GroupObjects& objects = rt.group_objects(g);
    for (std::size_t m = 0; m < groups.members(g).size(); ++m) {
      const ObjectJournal::Dropped d = objects.journal.drop(m);
      if (d.changes == 0 && d.lost == JournalLost::none) continue;
      try {
        rt.log().warn(
            "group '{}': member {} {}; it is behind the other members: bring its token up to "
            "date (the vendor's backup or cloning) before the next start (docs/groups.md, "
            "\"Objects\")",
            objects.name, m,
            d.lost == JournalLost::none
                ? fmt::format("did not get {} change(s) to token objects", d.changes)
                : std::string("was out of step already"));
      } catch (...) {
      }
    }
  }
}

}  // namespace p11mux
