#include "group/group_objects.hpp"

#include "forward/key_mechanisms.hpp"
#include "group/attribute_snapshot.hpp"
#include "group/group_runtime.hpp"
#include "group/object_journal.hpp"
#include "group/object_map.hpp"
#include "lifecycle/runtime.hpp"
#include "sessions/gone_codes.hpp"

#include <p11mux/rv_names.hpp>

#include <spdlog/fmt/fmt.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <new>
#include <string>

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

void destroy_group_objects(GroupObjects* objects) noexcept { delete objects; }

std::vector<GroupObjectsPtr> make_group_objects(const Config& config, const LockSource& locks,
                                                spdlog::logger& log) {
  std::vector<GroupObjectsPtr> out;
  out.reserve(config.groups.size());
  for (const Group& g : config.groups) out.emplace_back(new GroupObjects(g, locks, log));
  return out;
}

namespace {

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
CK_RV destroy_on_member(GroupCall& call, std::size_t m, CK_OBJECT_HANDLE object) noexcept {
  return on_member(call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
    return port.call<fn::C_DestroyObject>(h, object);
  });
}
CK_RV destroy_on_member(GroupCall& call, CK_OBJECT_HANDLE object) noexcept {
  return destroy_on_member(call, call.member, object);
}

// Destroys an object the application will never hear of (its handle could
// not be made virtual). A session object whose session is gone is gone too.
void destroy_unnamed(GroupCall& call, CK_OBJECT_HANDLE object) noexcept {
  const CK_RV rv = destroy_on_member(call, object);
  call.rt.log().warn(
      "{} on group '{}': the object it made (member {}'s handle {}) could not be given a "
      "handle; destroyed again: {}",
      call.function, call.objects.name, call.member, object, rv_name(rv));
}

}  // namespace

CK_RV group_resolve(GroupCall& call, CK_OBJECT_HANDLE handle, CK_RV invalid,
                    CK_OBJECT_HANDLE& out) noexcept {
  try {
    MemberCalls members(call);
    const ObjectMap::Resolved r = call.objects.map.resolve(members, handle, call.member);
    switch (r.status) {
      case ObjectMap::Status::found:
        out = r.object;
        return CKR_OK;
      case ObjectMap::Status::ambiguous:
      case ObjectMap::Status::failed:
        return ObjectMap::to_ckr(r);
      case ObjectMap::Status::unknown:
      case ObjectMap::Status::missing:
      case ObjectMap::Status::elsewhere:
        break;
    }
    return invalid;
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
}

CK_RV group_issue_made(GroupCall& call, CK_SESSION_HANDLE made_on,
                       CK_OBJECT_HANDLE& handle) noexcept {
  ObjectMap::Issued issued{CKR_HOST_MEMORY, CK_INVALID_HANDLE};
  try {
    MemberCalls members(call);
    const ObjectRead read = read_object(members, call.member, handle, call.objects.map.rule());
    if (read.rv != CKR_OK) {
      issued.rv = read.rv;
    } else if (read.token) {
      issued = call.objects.map.issue_found(call.member, handle, read);
    } else {
      // It lives in the backend session that made it, and dies with it.
      issued = call.objects.map.issue_session_object(call.member, made_on, handle);
    }
  } catch (const std::bad_alloc&) {
    issued.rv = CKR_HOST_MEMORY;
  }
  if (issued.rv != CKR_OK) {
    destroy_unnamed(call, handle);
    return issued.rv;
  }
  handle = issued.handle;
  return CKR_OK;
}

CK_RV group_issue_found(GroupCall& call, CK_OBJECT_HANDLE* found, CK_ULONG& count) noexcept {
  try {
    MemberCalls members(call);
    CK_ULONG kept = 0;
    for (CK_ULONG i = 0; i < count; ++i) {
      const ObjectMap::Issued issued = call.objects.map.issue_found(members, call.member, found[i]);
      // Destroyed since the search found it (by another session): not found.
      if (issued.rv == CKR_OBJECT_HANDLE_INVALID) continue;
      if (issued.rv != CKR_OK) return issued.rv;
      // Two objects of one identity on a member (the map refuses to pick):
      // one handle, given once.
      if (std::find(found, found + kept, issued.handle) != found + kept) continue;
      found[kept++] = issued.handle;
    }
    count = kept;
    return CKR_OK;
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
}

void group_destroyed(GroupCall& call, CK_OBJECT_HANDLE handle) noexcept {
  call.objects.map.destroy(handle);
}

bool group_replicated(GroupCall& call, CK_OBJECT_HANDLE handle) noexcept {
  try {
    // Pinned objects (session objects, token objects without an identity)
    // are on one member; a replicated one is a token object with one.
    return !call.objects.map.pinned_member(handle).has_value();
  } catch (...) {
    return false;
  }
}

namespace {

// A member whose token is absent or whose device failed: the change is not
// made there, but kept for its return (docs/groups.md, "Objects").
bool member_absent(CK_RV rv) noexcept { return device_gone(rv); }

// Whether member `m` may take a change now: up, or joining (being brought back).
bool reachable(const GroupCall& call, std::size_t m) noexcept {
  const MemberState state = call.rt.groups()->health(call.group, m).state();
  return state == MemberState::up || state == MemberState::joining;
}

// The change a call makes, as it is kept for a member that misses it: built
// once, when a member first misses it (object_journal.hpp), and shared.
struct Missed {
  Missed(MissedChange::Kind kind_, ObjectIdentity object_, std::optional<ObjectIdentity> made_,
         const CK_ATTRIBUTE* templ_, CK_ULONG count_) noexcept
      : kind(kind_),
        object(std::move(object_)),
        made(std::move(made_)),
        templ(templ_),
        count(count_) {}
  MissedChange::Kind kind;
  ObjectIdentity object;
  std::optional<ObjectIdentity> made;
  const CK_ATTRIBUTE* templ;
  CK_ULONG count;
  MissedChangePtr change;
  // The members it was kept for by this call: withdrawn when the change is undone.
  std::array<std::size_t, 64> kept_for{};
  std::size_t kept = 0;

  // nullptr when it cannot be kept (the member is then lost to the journal).
  MissedChangePtr build() const {
    auto c = std::make_shared<MissedChange>();
    c->kind = kind;
    c->object = object;
    c->made = made;
    if (kind != MissedChange::Kind::destroy &&
        c->templ.copy(templ, count) != TemplateCopy::Result::ok) {
      return nullptr;
    }
    return c;
  }
};

// The journal's answer for member `m`, logged; `rv` the member's answer when
// it took the change and answered as absent.
void tell_kept(GroupCall& call, std::size_t m, ObjectJournal::Kept kept, CK_RV rv,
               Missed& missed) noexcept {
  switch (kept) {
    case ObjectJournal::Kept::take:
    case ObjectJournal::Kept::lost:
      return;
    case ObjectJournal::Kept::kept:
      if (missed.kept < missed.kept_for.size()) missed.kept_for[missed.kept++] = m;
      call.rt.log().warn(
          "{} on group '{}': member {} is {}{}; the change is kept for its return ({} kept)",
          call.function, call.objects.name, m, rv == CKR_OK ? "down" : "absent (",
          rv == CKR_OK ? std::string() : std::string(rv_name(rv)) + ")",
          call.objects.journal.pending(m));
      return;
    case ObjectJournal::Kept::lost_now:
      call.rt.groups()->health(call.group, m).count_error();
      call.rt.log().error(
          "{} on group '{}': member {} misses a change that cannot be kept for it (more than "
          "{} changes kept, or a template over {} bytes or with nested arrays, or no memory); "
          "it stays out of the group until p11mux is initialized again: bring its token up to "
          "date with the other members' (the vendor's backup or cloning), then restart the "
          "application (docs/groups.md, \"Objects\")",
          call.function, call.objects.name, m, ObjectJournal::kJournalLimit,
          TemplateCopy::kMaxBytes);
      return;
  }
}

// Whether the change is made on member `m` now; if not, it is kept for its
// return (down, or behind on earlier changes it missed), logged.
bool takes(GroupCall& call, std::size_t m, Missed& missed) noexcept {
  ObjectJournal::Kept kept = ObjectJournal::Kept::lost;
  try {
    kept = call.objects.journal.keep_unless_reachable(m, reachable(call, m), missed.change,
                                                      [&] { return missed.build(); });
  } catch (...) {
    call.objects.journal.lose(m, JournalLost::not_kept);
    kept = ObjectJournal::Kept::lost_now;
  }
  if (kept == ObjectJournal::Kept::take) return true;
  tell_kept(call, m, kept, CKR_OK, missed);
  return false;
}

// Member `m` took the change and answered `rv`: if that says it is absent,
// the member is down, the change kept for its return, `rv` cleared, and true.
bool absent(GroupCall& call, std::size_t m, CK_RV& rv, Missed& missed) noexcept {
  if (!member_absent(rv)) return false;
  // Taken out of service: it must not serve calls before it has the change.
  call.rt.groups()->health(call.group, m).mark_down(DownReason::device, HealthClock::now());
  ObjectJournal::Kept kept = ObjectJournal::Kept::lost;
  try {
    kept = call.objects.journal.missed(m, missed.change, [&] { return missed.build(); });
  } catch (...) {
    call.objects.journal.lose(m, JournalLost::not_kept);
    kept = ObjectJournal::Kept::lost_now;
  }
  tell_kept(call, m, kept, rv, missed);
  rv = CKR_OK;
  return true;
}

// The change was undone on the members that took it: not kept for the others either.
void withdraw(GroupCall& call, const Missed& missed) noexcept {
  for (std::size_t i = 0; i < missed.kept; ++i) {
    call.objects.journal.withdraw(missed.kept_for[i], missed.change);
  }
}

// The objects of `identity` on member `m`, searched now.
ObjectMap::Resolved find_on(GroupCall& call, std::size_t m,
                            const ObjectIdentity& identity) noexcept {
  try {
    MemberCalls calls(call);
    return call.objects.map.find(calls, m, identity);
  } catch (const std::bad_alloc&) {
    return {ObjectMap::Status::failed, CK_INVALID_HANDLE, CKR_HOST_MEMORY, 0};
  }
}

// A token object made on the session's member (`own`, the group's `handle`),
// then on each other member present by `make(m, object)`: CKR_OK with
// `object` still CK_INVALID_HANDLE when `make` passed the member over (and
// logged why). A member down or absent gets it at its return. A member that
// refuses: every copy made, `own` included, destroyed again, `handle` ended,
// that member's error answered, and a log line.
template <class Make>
CK_RV replicate_made(GroupCall& call, CK_OBJECT_HANDLE handle, CK_OBJECT_HANDLE own, Missed& missed,
                     Make&& make) noexcept {
  const std::size_t count = call.rt.groups()->members(call.group).size();
  struct Made {
    std::size_t member;
    CK_OBJECT_HANDLE object;
  };
  std::array<Made, 64> made{};  // members of a group: a handful
  std::size_t n = 0;
  CK_RV rv = CKR_OK;
  std::size_t failed = 0;
  for (std::size_t m = 0; m < count && rv == CKR_OK; ++m) {
    if (m == call.member || !takes(call, m, missed)) continue;
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    rv = make(m, object);
    if (absent(call, m, rv, missed)) continue;
    if (rv != CKR_OK) {
      failed = m;
      break;
    }
    if (object == CK_INVALID_HANDLE) continue;
    try {
      call.objects.map.record(handle, m, object);
    } catch (...) {
    }
    if (n < made.size()) made[n++] = {m, object};
  }
  if (rv == CKR_OK) return CKR_OK;
  // Undone: the copies made, then the session's member's own.
  withdraw(call, missed);
  std::size_t left = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (destroy_on_member(call, made[i].member, made[i].object) != CKR_OK) ++left;
  }
  if (destroy_on_member(call, own) != CKR_OK) ++left;
  call.objects.map.destroy(handle);
  call.rt.log().warn(
      "{} on group '{}': member {} answered {}; the object made on the other {} member(s) was "
      "destroyed again{}",
      call.function, call.objects.name, failed, rv_name(rv), n + 1,
      left == 0 ? std::string() : ", except on " + std::to_string(left) + " (left there)");
  return rv;
}

// `handle` on member `m` (not the call's: a search there runs on a
// borrowed session), as `resolve` finds it.
ObjectMap::Resolved resolve_on(GroupCall& call, CK_OBJECT_HANDLE handle, std::size_t m) noexcept {
  try {
    MemberCalls calls(call);
    return call.objects.map.resolve(calls, handle, m);
  } catch (const std::bad_alloc&) {
    return {ObjectMap::Status::failed, CK_INVALID_HANDLE, CKR_HOST_MEMORY, 0};
  }
}

// A replicated handle's identity (a default one for a handle that has none:
// such a handle is never replicated, so never kept).
ObjectIdentity identity_or_none(GroupCall& call, CK_OBJECT_HANDLE handle) noexcept {
  try {
    return call.objects.map.identity_of(handle).value_or(ObjectIdentity{});
  } catch (...) {
    return {};
  }
}

// Whether `templ` names an attribute an identity is made of.
bool names_identity(const CK_ATTRIBUTE* templ, CK_ULONG count) noexcept {
  for (CK_ULONG i = 0; templ != nullptr && i < count; ++i) {
    if (templ[i].type == CKA_ID || templ[i].type == CKA_LABEL || templ[i].type == CKA_CLASS)
      return true;
  }
  return false;
}

}  // namespace

CK_RV group_refuse_taken(GroupCall& call, CK_OBJECT_HANDLE own) noexcept {
  try {
    MemberCalls members(call);
    const ObjectRead read = read_object(members, call.member, own, call.objects.map.rule());
    // Unreadable, a session object, or one without identity: issued (or
    // refused) as any object made.
    if (read.rv != CKR_OK || !read.token || !read.identity) return CKR_OK;
    const ObjectMap::Resolved r = call.objects.map.find(members, call.member, *read.identity);
    if (r.status != ObjectMap::Status::ambiguous) return CKR_OK;
  } catch (const std::bad_alloc&) {
    return CKR_OK;  // the issue that follows meets the same shortage, and undoes
  }
  // Two objects of one identity on every member: the map could tell neither
  // apart (docs/groups.md, "Objects").
  const CK_RV undo = destroy_on_member(call, own);
  call.rt.log().warn(
      "{} on group '{}' refused (CKR_ATTRIBUTE_VALUE_INVALID): {}; the object made on member {} "
      "was destroyed again{} (docs/groups.md, \"Objects\")",
      call.function, call.objects.name,
      call.function == "C_CopyObject"
          ? "the copy would have the original's identity or another token object's (object_key); "
            "give it another CKA_ID or CKA_LABEL"
          : "another token object has its identity (object_key); give it another CKA_ID or "
            "CKA_LABEL",
      call.member, undo == CKR_OK ? std::string() : std::string(" except: ").append(rv_name(undo)));
  return CKR_ATTRIBUTE_VALUE_INVALID;
}

CK_RV group_replicate_create(GroupCall& call, CK_OBJECT_HANDLE handle, CK_ATTRIBUTE_PTR templ,
                             CK_ULONG count, CK_OBJECT_HANDLE own) noexcept {
  Missed missed(MissedChange::Kind::create, identity_or_none(call, handle), std::nullopt, templ,
                count);
  return replicate_made(
      call, handle, own, missed, [&](std::size_t m, CK_OBJECT_HANDLE& object) -> CK_RV {
        CK_RV rv = on_member(call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
          return port.call<fn::C_CreateObject>(h, templ, count, &object);
        });
        if (rv != CKR_OK) return rv;
        // An object of its identity there already (the session's member had
        // none): two there, which the map could not tell apart.
        if (find_on(call, m, missed.object).status != ObjectMap::Status::ambiguous) return CKR_OK;
        rv = destroy_on_member(call, m, object);
        object = CK_INVALID_HANDLE;
        call.rt.log().warn(
            "{} on group '{}': member {} holds another token object of its identity (object_key); "
            "not made there{}",
            call.function, call.objects.name, m,
            rv == CKR_OK ? std::string() : std::string(", and left: ").append(rv_name(rv)));
        return CKR_ATTRIBUTE_VALUE_INVALID;
      });
}

CK_RV group_replicate_copy(GroupCall& call, CK_OBJECT_HANDLE handle, CK_OBJECT_HANDLE source,
                           CK_ATTRIBUTE_PTR templ, CK_ULONG count, CK_OBJECT_HANDLE own) noexcept {
  const char* why = nullptr;
  if (handle == source) {
    // The copy has the original's identity: every member would then hold
    // two objects of it, which the map refuses to tell apart.
    why =
        "the copy would have the original's identity (object_key); give it another CKA_ID "
        "or CKA_LABEL";
  } else if (!group_replicated(call, source)) {
    // A session object (or one without identity) lives on one member: its
    // token copy could be made there only.
    why =
        "the original is on one member only (a session object, or a token object without "
        "identity), so its token copy could not be made on the others";
  }
  if (why != nullptr) {
    const CK_RV undo = destroy_on_member(call, own);
    if (handle != source) call.objects.map.destroy(handle);
    call.rt.log().warn(
        "{} on group '{}' refused (CKR_ATTRIBUTE_VALUE_INVALID): {}; the copy made on member {} "
        "was destroyed again{} (docs/groups.md, \"Objects\")",
        call.function, call.objects.name, why, call.member,
        undo == CKR_OK ? std::string() : std::string(" except: ").append(rv_name(undo)));
    return CKR_ATTRIBUTE_VALUE_INVALID;
  }
  Missed missed(MissedChange::Kind::copy, identity_or_none(call, source),
                identity_or_none(call, handle), templ, count);
  return replicate_made(
      call, handle, own, missed, [&](std::size_t m, CK_OBJECT_HANDLE& object) -> CK_RV {
        const ObjectMap::Resolved original = resolve_on(call, source, m);
        if (original.status == ObjectMap::Status::missing) {
          // The member lacks the original (provisioned without it): it lacks both.
          call.rt.log().warn(
              "{} on group '{}': member {} holds no copy of the original; the copy is not made "
              "there",
              call.function, call.objects.name, m);
          return CKR_OK;
        }
        if (original.status != ObjectMap::Status::found) return ObjectMap::to_ckr(original);
        return on_member(call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
          return port.call<fn::C_CopyObject>(h, original.object, templ, count, &object);
        });
      });
}

void group_set_snapshot(GroupCall& call, CK_OBJECT_HANDLE object, const CK_ATTRIBUTE* templ,
                        CK_ULONG count, AttributeSnapshot& old) noexcept {
  on_member(call, call.member, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
    old.read(port, h, object, templ, count);
    return CKR_OK;
  });
}

namespace {

// After a C_SetAttributeValue of `handle` (`own` on the session's member)
// made on every member: if it changed the object's identity, the map is
// re-keyed (the handle stays; the new identity names it). Refused, with why,
// when the new identity is taken or empty: the map could not tell the
// objects apart.
const char* rekey_after_set(GroupCall& call, CK_OBJECT_HANDLE handle, CK_OBJECT_HANDLE own,
                            const ObjectIdentity& before) noexcept {
  try {
    MemberCalls members(call);
    const ObjectRead read = read_object(members, call.member, own, call.objects.map.rule());
    if (read.rv != CKR_OK) {
      call.rt.log().warn(
          "{} on group '{}': the object's identity could not be read again ({}); the group "
          "keeps its old one",
          call.function, call.objects.name, rv_name(read.rv));
      return nullptr;
    }
    if (!read.identity) {
      return "the object would have no identity (object_key: an empty CKA_ID and CKA_LABEL), so "
             "its copies on the members could not be found";
    }
    if (*read.identity == before) return nullptr;
    if (call.objects.map.find(members, call.member, *read.identity).status ==
        ObjectMap::Status::ambiguous) {
      return "another token object has the new identity (object_key)";
    }
    call.objects.map.rekey(handle, *read.identity);
    return nullptr;
  } catch (const std::bad_alloc&) {
    return "no memory to re-key the object's handle";
  }
}

}  // namespace

CK_RV group_replicate_set(GroupCall& call, CK_OBJECT_HANDLE handle, CK_OBJECT_HANDLE own,
                          CK_ATTRIBUTE_PTR templ, CK_ULONG count,
                          const AttributeSnapshot& own_old) noexcept {
  const std::size_t members = call.rt.groups()->members(call.group).size();
  struct Changed {
    std::size_t member;
    CK_OBJECT_HANDLE object;
    AttributeSnapshot old;
  };
  std::vector<Changed> changed;
  CK_RV rv = CKR_OK;
  try {
    changed.resize(members);
  } catch (const std::bad_alloc&) {
    rv = CKR_HOST_MEMORY;  // undone on the session's member below
  }
  // Kept with the identity the object has before the change: what the
  // member that missed it still has.
  Missed missed(MissedChange::Kind::set, identity_or_none(call, handle), std::nullopt, templ,
                count);
  std::size_t n = 0;
  std::size_t failed = call.member;
  for (std::size_t m = 0; m < members && rv == CKR_OK; ++m) {
    if (m == call.member || !takes(call, m, missed)) continue;
    const ObjectMap::Resolved r = resolve_on(call, handle, m);
    if (r.status == ObjectMap::Status::missing) {
      call.rt.log().warn(
          "{} on group '{}': member {} holds no copy of the token object; not changed there",
          call.function, call.objects.name, m);
      continue;
    }
    rv = r.status == ObjectMap::Status::found ? CKR_OK : ObjectMap::to_ckr(r);
    Changed& c = changed[n];
    c = {m, r.object, {}};
    // The old values first, on the session that then changes them.
    if (rv == CKR_OK) {
      rv = on_member(call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
        c.old.read(port, h, c.object, templ, count);
        return port.call<fn::C_SetAttributeValue>(h, c.object, templ, count);
      });
    }
    if (absent(call, m, rv, missed)) continue;
    if (rv != CKR_OK) {
      failed = m;
      break;
    }
    ++n;
  }
  // A change of the identity: the handle follows it, or the change is undone.
  if (rv == CKR_OK && names_identity(templ, count)) {
    if (const char* why = rekey_after_set(call, handle, own, missed.object)) {
      rv = CKR_ATTRIBUTE_VALUE_INVALID;
      call.rt.log().warn("{} on group '{}' refused (CKR_ATTRIBUTE_VALUE_INVALID): {}",
                         call.function, call.objects.name, why);
    }
  }
  if (rv == CKR_OK) return CKR_OK;
  withdraw(call, missed);
  // Undone: the old values set back where the change was made, the
  // session's member's included. A value that could not be read is left.
  std::size_t left = 0;
  const auto restore = [&](std::size_t m, CK_OBJECT_HANDLE object, const AttributeSnapshot& old) {
    const CK_RV undo = on_member(call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
      return old.restore(port, h, object);
    });
    if (undo != CKR_OK || !old.complete()) ++left;
  };
  for (std::size_t i = 0; i < n; ++i) restore(changed[i].member, changed[i].object, changed[i].old);
  restore(call.member, own, own_old);
  call.rt.log().warn(
      "{} on group '{}': member {} answered {}; the change made on the other {} member(s) was "
      "undone{}",
      call.function, call.objects.name, failed, rv_name(rv), n + 1,
      left == 0 ? std::string()
                : ", except on " + std::to_string(left) + " (their new values left there)");
  return rv;
}

CK_RV group_replicate_destroy(GroupCall& call, CK_OBJECT_HANDLE handle) noexcept {
  const std::size_t members = call.rt.groups()->members(call.group).size();
  Missed missed(MissedChange::Kind::destroy, identity_or_none(call, handle), std::nullopt, nullptr,
                0);
  CK_RV first = CKR_OK;
  for (std::size_t m = 0; m < members; ++m) {
    if (m == call.member || !takes(call, m, missed)) continue;
    const ObjectMap::Resolved r = resolve_on(call, handle, m);
    if (r.status == ObjectMap::Status::missing) continue;  // nothing to destroy there
    CK_RV rv = r.status == ObjectMap::Status::found ? CKR_OK : ObjectMap::to_ckr(r);
    if (rv == CKR_OK) rv = destroy_on_member(call, m, r.object);
    if (absent(call, m, rv, missed)) continue;
    if (rv == CKR_OK || rv == CKR_OBJECT_HANDLE_INVALID) continue;
    // A destroyed object cannot be made again: the error, and the copy left.
    call.rt.log().warn(
        "{} on group '{}': member {} answered {}; its copy of the token object is left there",
        call.function, call.objects.name, m, rv_name(rv));
    if (first == CKR_OK) first = rv;
  }
  return first;
}

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
    ObjectJournal::Batch batch = objects.journal.take(member);
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
  return false;  // a log line that could not be made: its next probe tries again
}

void group_member_readmitted(Runtime& rt, std::size_t group, std::size_t member) noexcept {
  try {
    rt.group_objects(group).map.member_restarted(member);
  } catch (...) {
    rt.log().error("group '{}': member {}'s cached object handles were not dropped",
                   rt.group_objects(group).name, member);
  }
}

void group_session_ended(Runtime& rt, std::size_t group, std::size_t member,
                         CK_SESSION_HANDLE backend) noexcept {
  try {
    rt.group_objects(group).map.forget_session(member, backend);
  } catch (const std::bad_alloc&) {
    // Its handles stay in the map; each names a pinned object of a session
    // that is gone, which the member answers CKR_OBJECT_HANDLE_INVALID for
    // unless it reuses the number: logged, the only trace.
    rt.log().error("group '{}': the session objects of member {}'s session {} were not forgotten",
                   rt.group_objects(group).name, member, backend);
  }
}

CK_RV group_mechanism(GroupCall& call, CK_MECHANISM_PTR mechanism, CK_MECHANISM& copy,
                      MechanismCopyParam& param, CK_MECHANISM_PTR& out) noexcept {
  const CK_MECHANISM_TYPE type = mechanism->mechanism;
  const char* why = nullptr;
  switch (type) {
    case CKM_CONCATENATE_BASE_AND_KEY: {
      // The parameter is the other key's handle (docs/pkcs11-facts.md).
      if (mechanism->pParameter == nullptr ||
          mechanism->ulParameterLen != sizeof(CK_OBJECT_HANDLE)) {
        return CKR_MECHANISM_PARAM_INVALID;
      }
      CK_OBJECT_HANDLE other = CK_INVALID_HANDLE;
      if (CK_RV rv =
              group_resolve(call, *static_cast<const CK_OBJECT_HANDLE*>(mechanism->pParameter),
                            CKR_KEY_HANDLE_INVALID, other);
          rv != CKR_OK) {
        return rv;
      }
      param.handle = other;
      copy = *mechanism;
      copy.pParameter = &param.handle;
      out = &copy;
      return CKR_OK;
    }
    // Handles of keys inside the parameter, not translated yet.
    case CKM_ECMQV_DERIVE:
    case CKM_X9_42_DH_HYBRID_DERIVE:
    case CKM_X9_42_MQV_DERIVE:
    case CKM_KIP_DERIVE:
    case CKM_KIP_WRAP:
    case CKM_KIP_MAC:
    case CKM_CMS_SIG:
      why = "its parameter names an object, which p11mux does not translate yet";
      break;
    default:
      // Keys returned inside the parameter (key_mechanisms.hpp).
      if (std::optional<KeyOutputs> outputs = derive_outputs(type);
          outputs && *outputs != KeyOutputs::handle_args) {
        why = "it returns keys inside its parameter, which p11mux does not translate yet";
      } else if (type >= CKM_VENDOR_DEFINED) {
        why = "a vendor-defined mechanism's parameter may name an object p11mux cannot translate";
      }
      break;
  }
  if (why == nullptr) return CKR_OK;
  call.rt.log().warn(
      "{} on group '{}' refused (CKR_MECHANISM_PARAM_INVALID): mechanism {:#x}: {} "
      "(docs/groups.md, \"Objects\")",
      call.function, call.objects.name, type, why);
  return CKR_MECHANISM_PARAM_INVALID;
}

bool group_token_template(const CK_ATTRIBUTE* templ, CK_ULONG count) noexcept {
  if (templ == nullptr) return false;
  for (CK_ULONG i = 0; i < count; ++i) {
    const CK_ATTRIBUTE& a = templ[i];
    if (a.type != CKA_TOKEN || a.pValue == nullptr || a.ulValueLen != sizeof(CK_BBOOL)) continue;
    if (*static_cast<const CK_BBOOL*>(a.pValue) != CK_FALSE) return true;
  }
  return false;
}

CK_RV group_token_key_member(GroupCall& call, bool whole, std::size_t& member) noexcept {
  member = call.member;
  if (call.objects.generate_token_keys == GenerateTokenKeys::refuse) {
    call.rt.log().warn(
        "{} on group '{}' refused (CKR_ATTRIBUTE_VALUE_INVALID): a key generated with "
        "CKA_TOKEN=true would exist on one member only, and a key generated in an HSM cannot in "
        "general be copied to the others; generate_token_keys = refuse (docs/groups.md)",
        call.function, call.objects.name);
    return CKR_ATTRIBUTE_VALUE_INVALID;
  }
  // The primary member: the first up whose token is there, as balance =
  // primary places sessions (docs/groups.md, "Configuration").
  const GroupRuntime& groups = *call.rt.groups();
  const std::vector<GroupRuntime::Member>& members = groups.members(call.group);
  for (std::size_t m = 0; m < members.size(); ++m) {
    if (groups.health(call.group, m).up() && GroupRuntime::token_present(members[m])) {
      member = m;
      break;
    }
  }
  if (member != call.member && !whole) {
    call.rt.log().warn(
        "{} on group '{}' refused (CKR_ATTRIBUTE_VALUE_INVALID): generate_token_keys = primary "
        "makes token keys on member {}, and this session runs on member {}: the pair's session "
        "key would be out of its reach; make both halves token keys, or generate from a session "
        "on member {} (docs/groups.md)",
        call.function, call.objects.name, member, call.member, member);
    return CKR_ATTRIBUTE_VALUE_INVALID;
  }
  return CKR_OK;
}

CK_RV group_generate_on(GroupCall& call, std::size_t member, GroupRunOn run, void* ctx,
                        CK_OBJECT_HANDLE* const* made, std::size_t n) noexcept {
  const GroupRuntime::Member& m = call.rt.groups()->members(call.group).at(member);
  Borrowed s(call.rt, m, /*rw=*/true);
  if (s.rv() != CKR_OK) return s.rv();
  CK_RV rv = run(ctx, s.port(), s.handle());
  s.answered(rv);
  if (rv != CKR_OK) return rv;
  // Read and issued as that member's, on the session that made them.
  GroupCall there{call.rt, call.objects, call.group, member, s.handle(), call.function, false};
  for (std::size_t i = 0; i < n && rv == CKR_OK; ++i) {
    if (made[i] != nullptr && *made[i] != CK_INVALID_HANDLE)
      rv = group_issue_made(there, s.handle(), *made[i]);
  }
  if (rv == CKR_OK) {
    call.rt.log().info(
        "{} on group '{}': the token key was generated on the primary member {} "
        "(generate_token_keys = primary) and is usable on that member only, not from this "
        "session's member {}",
        call.function, call.objects.name, member, call.member);
  }
  return rv;
}

}  // namespace p11mux
