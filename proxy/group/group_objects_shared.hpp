// The internals the files of a group's object calls share (issue 15,
// docs/groups.md "Objects"): the group's objects, and how its calls reach a
// member (the call's own backend session, or one borrowed from the member's
// pool). For group_objects.cpp (handles), group_replication.cpp (changes on
// every member) and group_catch_up.cpp (changes a member missed); nothing
// else includes it.
#pragma once

#include "group/group_objects.hpp"
#include "group/group_runtime.hpp"
#include "group/object_journal.hpp"
#include "group/object_map.hpp"
#include "lifecycle/runtime.hpp"
#include "sessions/gone_codes.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <new>
#include <string>
#include <vector>

namespace p11mux {

class GroupObjects {
 public:
  GroupObjects(const Group& config, const LockSource& locks, spdlog::logger& log)
      : name(config.name),
        generate_token_keys(config.generate_token_keys),
        map(config.members.size(), config.object_key, locks, &log),
        journal(config.members.size(), locks),
        lost_told(config.members.size()) {}
  const std::string name;
  const GenerateTokenKeys generate_token_keys;
  ObjectMap map;
  // The changes each member missed, for its return (object_journal.hpp).
  ObjectJournal journal;
  // Per member: its being lost to the journal has been logged at its return.
  std::vector<std::atomic<bool>> lost_told;
};

namespace group_calls {

// A backend session of one member for the map's own calls, borrowed from the
// member's pool and given back clean: a search it ran has been ended
// (C_FindObjectsFinal answered), else it is closed; one the backend says is
// gone is counted dead.
class Borrowed {
 public:
  Borrowed(Runtime& rt, const GroupRuntime::Member& member, bool rw = false) noexcept
      : pool_(rt.pool_of(*member.port)), slot_(member.slot), rw_(rw) {
    rv_ = pool_.borrow(slot_, rw_, handle_);
    // An SO logged in on the token refuses read-only sessions.
    if (rv_ == CKR_SESSION_READ_WRITE_SO_EXISTS) {
      rw_ = true;
      rv_ = pool_.borrow(slot_, rw_, handle_);
    }
  }
  ~Borrowed() {
    if (rv_ != CKR_OK) return;
    pool_.give(slot_, rw_, handle_, fate_);
  }
  Borrowed(const Borrowed&) = delete;  // gives its session back once
  Borrowed& operator=(const Borrowed&) = delete;

  CK_RV rv() const noexcept { return rv_; }
  CK_SESSION_HANDLE handle() const noexcept { return handle_; }
  const BackendPort& port() const noexcept { return pool_.port(); }
  // What a call on it answered: a session (or device) gone is not pooled again.
  void answered(CK_RV rv) noexcept {
    if (rv != CKR_OK && session_gone(rv)) {
      fate_ = SessionPool::Fate::dead;
      pool_.invalidate(slot_);
    }
  }
  // A search may still be active on it: closed, not pooled.
  void maybe_active() noexcept {
    if (fate_ == SessionPool::Fate::reuse)
      fate_ = SessionPool::Fate::closed(CloseReason::operation_maybe_active);
  }

 private:
  SessionPool& pool_;
  CK_SLOT_ID slot_;
  bool rw_;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
  CK_RV rv_ = CKR_OK;
  SessionPool::Fate fate_ = SessionPool::Fate::reuse;
};

// The map's calls on the group's members: attribute reads, and searches
// when no search of the application's is active there, on the
// application's own backend session when the call runs on that member (a
// read is no operation, and a search ended before the call goes on leaves
// none), on a borrowed one otherwise.
class MemberCalls final : public MemberObjects {
 public:
  explicit MemberCalls(GroupCall& call) noexcept
      : call_(call), members_(call.rt.groups()->members(call.group)) {}

  CK_RV get_attribute_value(MemberIndex member, CK_OBJECT_HANDLE object, CK_ATTRIBUTE* templ,
                            CK_ULONG count) override {
    const GroupRuntime::Member& m = members_.at(member);
    if (member == call_.member && call_.backend != CK_INVALID_HANDLE) {
      return m.port->call<fn::C_GetAttributeValue>(call_.backend, object, templ, count);
    }
    Borrowed s(call_.rt, m);
    if (s.rv() != CKR_OK) return s.rv();
    const CK_RV rv = s.port().call<fn::C_GetAttributeValue>(s.handle(), object, templ, count);
    s.answered(rv);
    return rv;
  }

  CK_RV find_objects(MemberIndex member, const CK_ATTRIBUTE* templ, CK_ULONG count,
                     std::size_t limit, std::vector<CK_OBJECT_HANDLE>& found) override {
    const GroupRuntime::Member& m = members_.at(member);
    // On the application's own backend session when the call runs on that
    // member and no search of the application's is active there: a
    // borrowed one would be a second session of this thread's on the
    // member, which at the member's session limit waits for sessions that
    // threads doing the same hold (docs/groups.md, "Objects").
    if (member == call_.member && call_.backend != CK_INVALID_HANDLE && !call_.searching) {
      bool maybe_active = false;
      const CK_RV rv = search(
          *m.port, call_.backend, templ, count, limit, found, [&](CK_RV) {},
          [&] { maybe_active = true; });
      if (maybe_active) {
        call_.rt.log().warn(
            "group '{}': a search of member {} for {} may still be active on the "
            "application's session",
            call_.objects.name, member, call_.function);
      }
      return rv;
    }
    Borrowed s(call_.rt, m);
    if (s.rv() != CKR_OK) return s.rv();
    return search(
        s.port(), s.handle(), templ, count, limit, found, [&](CK_RV rv) { s.answered(rv); },
        [&] { s.maybe_active(); });
  }

 private:
  // C_FindObjectsInit, C_FindObjects until 0 or `limit`, C_FindObjectsFinal
  // on backend session `h`; `answered` sees each answer, `maybe_active` is
  // told when a search may be left active.
  template <class Answered, class MaybeActive>
  static CK_RV search(const BackendPort& port, CK_SESSION_HANDLE h, const CK_ATTRIBUTE* templ,
                      CK_ULONG count, std::size_t limit, std::vector<CK_OBJECT_HANDLE>& found,
                      Answered&& answered, MaybeActive&& maybe_active) {
    CK_RV rv = port.call<fn::C_FindObjectsInit>(h, const_cast<CK_ATTRIBUTE*>(templ), count);
    answered(rv);
    if (rv != CKR_OK) {
      maybe_active();  // some modules keep an operation after a failed Init
      return rv;
    }
    std::array<CK_OBJECT_HANDLE, 16> batch{};
    while (found.size() < limit) {
      CK_ULONG n = 0;
      const CK_ULONG want =
          static_cast<CK_ULONG>(std::min<std::size_t>(batch.size(), limit - found.size()));
      rv = port.call<fn::C_FindObjects>(h, batch.data(), want, &n);
      answered(rv);
      if (rv != CKR_OK || n == 0) break;
      found.insert(found.end(), batch.begin(), batch.begin() + std::min<CK_ULONG>(n, want));
    }
    const CK_RV final_rv = port.call<fn::C_FindObjectsFinal>(h);
    answered(final_rv);
    if (final_rv != CKR_OK && final_rv != CKR_OPERATION_NOT_INITIALIZED) maybe_active();
    return rv != CKR_OK ? rv : final_rv == CKR_OPERATION_NOT_INITIALIZED ? CKR_OK : final_rv;
  }

 private:
  GroupCall& call_;
  const std::vector<GroupRuntime::Member>& members_;
};

// `f(port, session)` on member `m`: on the application's backend session when
// `m` is the call's member and the call still holds it, else on a borrowed
// R/W one (never on one given back to the pool, which another thread may
// hold by now).
template <class Call>
CK_RV on_member(GroupCall& call, std::size_t m, Call&& f) noexcept {
  const GroupRuntime::Member& member = call.rt.groups()->members(call.group).at(m);
  if (m == call.member && call.backend != CK_INVALID_HANDLE) return f(*member.port, call.backend);
  Borrowed s(call.rt, member, /*rw=*/true);
  const CK_RV rv = s.rv() == CKR_OK ? f(s.port(), s.handle()) : s.rv();
  s.answered(rv);
  return rv;
}

// C_DestroyObject of `object` on member `m`.
inline CK_RV destroy_on_member(GroupCall& call, std::size_t m, CK_OBJECT_HANDLE object) noexcept {
  return on_member(call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
    return port.call<fn::C_DestroyObject>(h, object);
  });
}
inline CK_RV destroy_on_member(GroupCall& call, CK_OBJECT_HANDLE object) noexcept {
  return destroy_on_member(call, call.member, object);
}

// The objects of `identity` on member `m`, searched now.
inline ObjectMap::Resolved find_on(GroupCall& call, std::size_t m,
                                   const ObjectIdentity& identity) noexcept {
  try {
    MemberCalls calls(call);
    return call.objects.map.find(calls, m, identity);
  } catch (const std::bad_alloc&) {
    return {ObjectMap::Status::failed, CK_INVALID_HANDLE, CKR_HOST_MEMORY, 0};
  }
}

// `handle` on member `m` (not the call's: a search there runs on a
// borrowed session), as `resolve` finds it.
inline ObjectMap::Resolved resolve_on(GroupCall& call, CK_OBJECT_HANDLE handle,
                                      std::size_t m) noexcept {
  try {
    MemberCalls calls(call);
    return call.objects.map.resolve(calls, handle, m);
  } catch (const std::bad_alloc&) {
    return {ObjectMap::Status::failed, CK_INVALID_HANDLE, CKR_HOST_MEMORY, 0};
  }
}

}  // namespace group_calls
}  // namespace p11mux
