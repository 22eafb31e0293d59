// Token objects changed on every member (docs/groups.md, "Objects"):
// C_CreateObject, C_CopyObject, C_SetAttributeValue and C_DestroyObject made
// on each member present, undone when one refuses; a member down or absent
// gets the change at its return (object_journal.hpp, group_catch_up.cpp).
#include "group/attribute_snapshot.hpp"
#include "group/group_objects.hpp"
#include "group/group_objects_shared.hpp"
#include "group/template_copy.hpp"

#include <p11mux/rv_names.hpp>

#include <array>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace p11mux {

using namespace group_calls;

namespace {

// A member whose token is absent or whose device failed: the change is not
// made there, but kept for its return (docs/groups.md, "Objects").
bool member_absent(CK_RV rv) noexcept { return device_gone(rv); }

// Member `m` as its health tells it now, for the journal's choice.
ObjectJournal::MemberNow member_now(const GroupCall& call, std::size_t m) noexcept {
  const MemberCounters c = call.rt.groups()->health(call.group, m).counters();
  return {c.state, c.downs};
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
    kept = call.objects.journal.keep_unless_reachable(m, member_now(call, m), missed.change,
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

// No member holds another object of the identity (taken_on).
constexpr std::size_t kFree = static_cast<std::size_t>(-1);

// The member where `own` (made on `call`'s member) finds its identity taken:
// its own member when another object there has it, else (with `others`)
// the first other member up holding one; kFree when none. Unreadable, a
// session object, or one without identity: kFree (issued, or refused, as
// any object made).
std::size_t taken_on(GroupCall& call, CK_OBJECT_HANDLE own, GroupCall* others) {
  MemberCalls members(call);
  const ObjectRead read = read_object(members, call.member, own, call.objects.map.rule());
  if (read.rv != CKR_OK || !read.token || !read.identity) return kFree;
  if (call.objects.map.find(members, call.member, *read.identity).status ==
      ObjectMap::Status::ambiguous) {
    return call.member;
  }
  if (others == nullptr) return kFree;
  // A member down or absent is not asked (as group_token_key_member passes
  // it over): an object of the identity it holds is found at its return.
  const GroupRuntime& groups = *call.rt.groups();
  const std::vector<GroupRuntime::Member>& list = groups.members(call.group);
  for (std::size_t m = 0; m < list.size(); ++m) {
    if (m == call.member || !groups.health(call.group, m).up() ||
        !GroupRuntime::token_present(list[m])) {
      continue;
    }
    const ObjectMap::Status status = find_on(*others, m, *read.identity).status;
    if (status == ObjectMap::Status::found || status == ObjectMap::Status::ambiguous) return m;
  }
  return kFree;
}

}  // namespace

CK_RV group_refuse_taken(GroupCall& call, CK_OBJECT_HANDLE* const* made, std::size_t n,
                         GroupCall* others) noexcept {
  const auto names = [&](std::size_t i) {
    return made[i] != nullptr && *made[i] != CK_INVALID_HANDLE;
  };
  std::size_t where = kFree;
  std::size_t objects = 0;
  try {
    for (std::size_t i = 0; i < n && where == kFree; ++i) {
      if (names(i)) where = taken_on(call, *made[i], others);
    }
  } catch (const std::bad_alloc&) {
    return CKR_OK;  // the issue that follows meets the same shortage, and undoes
  }
  if (where == kFree) return CKR_OK;
  // Two objects of one identity on a member: the map could tell neither
  // apart; on two members: one handle would name both (docs/groups.md,
  // "Objects").
  CK_RV undo = CKR_OK;
  for (std::size_t i = 0; i < n; ++i) {
    if (!names(i)) continue;
    ++objects;
    const CK_RV rv = destroy_on_member(call, *made[i]);
    if (undo == CKR_OK) undo = rv;
  }
  std::string why;
  if (call.function == "C_CopyObject") {
    why =
        "the copy would have the original's identity or another token object's (object_key); "
        "give it another CKA_ID or CKA_LABEL";
  } else if (where == call.member) {
    why = "another token object has its identity (object_key); give it another CKA_ID or CKA_LABEL";
  } else {
    why = "member " + std::to_string(where) +
          " holds a token object of its identity (object_key), and the group's handle would "
          "name both; give it another CKA_ID or CKA_LABEL";
  }
  call.rt.log().warn(
      "{} on group '{}' refused (CKR_ATTRIBUTE_VALUE_INVALID): {}; the {} made on member {} "
      "{} destroyed again{} (docs/groups.md, \"Objects\")",
      call.function, call.objects.name, why, objects == 1 ? "object" : "objects", call.member,
      objects == 1 ? "was" : "were",
      undo == CKR_OK ? std::string() : std::string(" except: ").append(rv_name(undo)));
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

}  // namespace p11mux
