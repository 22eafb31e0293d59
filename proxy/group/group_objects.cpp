#include "group/group_objects.hpp"

#include "forward/key_mechanisms.hpp"
#include "group/attribute_snapshot.hpp"
#include "group/group_runtime.hpp"
#include "group/object_map.hpp"
#include "lifecycle/runtime.hpp"
#include "sessions/gone_codes.hpp"

#include <p11mux/rv_names.hpp>

#include <algorithm>
#include <array>
#include <new>
#include <string>

namespace p11mux {

class GroupObjects {
 public:
  GroupObjects(const Group& config, const LockSource& locks, spdlog::logger& log)
      : name(config.name),
        generate_token_keys(config.generate_token_keys),
        map(config.members.size(), config.object_key, locks, &log) {}
  const std::string name;
  const GenerateTokenKeys generate_token_keys;
  ObjectMap map;
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
// made there (docs/groups.md, "Objects": on every member whose token is present).
bool member_absent(CK_RV rv) noexcept { return device_gone(rv); }

// An answer of member `m` that says it is absent: logged, `rv` cleared, and
// true: the token object is not `changed` there.
bool passed_over(GroupCall& call, std::size_t m, CK_RV& rv, std::string_view changed) noexcept {
  if (!member_absent(rv)) return false;
  call.rt.log().warn("{} on group '{}': member {} is absent ({}); the token object is not {} there",
                     call.function, call.objects.name, m, rv_name(rv), changed);
  rv = CKR_OK;
  return true;
}

}  // namespace

namespace {

// A token object made on the session's member (`own`, the group's `handle`),
// then on each other member present by `make(m, object)`: CKR_OK with
// `object` still CK_INVALID_HANDLE when `make` passed the member over (and
// logged why). A member that refuses: every copy made, `own` included,
// destroyed again, `handle` ended, that member's error answered, and a log
// line.
template <class Make>
CK_RV replicate_made(GroupCall& call, CK_OBJECT_HANDLE handle, CK_OBJECT_HANDLE own,
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
    if (m == call.member) continue;
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    rv = make(m, object);
    if (passed_over(call, m, rv, "made")) continue;
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

}  // namespace

CK_RV group_replicate_create(GroupCall& call, CK_OBJECT_HANDLE handle, CK_ATTRIBUTE_PTR templ,
                             CK_ULONG count, CK_OBJECT_HANDLE own) noexcept {
  return replicate_made(call, handle, own, [&](std::size_t m, CK_OBJECT_HANDLE& object) {
    return on_member(call, m, [&](const BackendPort& port, CK_SESSION_HANDLE h) {
      return port.call<fn::C_CreateObject>(h, templ, count, &object);
    });
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
  return replicate_made(call, handle, own, [&](std::size_t m, CK_OBJECT_HANDLE& object) -> CK_RV {
    const ObjectMap::Resolved original = resolve_on(call, source, m);
    if (original.status == ObjectMap::Status::missing) {
      // The member was absent when the original was made: it lacks both.
      call.rt.log().warn(
          "{} on group '{}': member {} holds no copy of the original; the copy is not made there",
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
  std::size_t n = 0;
  std::size_t failed = call.member;
  for (std::size_t m = 0; m < members && rv == CKR_OK; ++m) {
    if (m == call.member) continue;
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
    if (passed_over(call, m, rv, "changed")) continue;
    if (rv != CKR_OK) {
      failed = m;
      break;
    }
    ++n;
  }
  if (rv == CKR_OK) return CKR_OK;
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
  CK_RV first = CKR_OK;
  for (std::size_t m = 0; m < members; ++m) {
    if (m == call.member) continue;
    const ObjectMap::Resolved r = resolve_on(call, handle, m);
    if (r.status == ObjectMap::Status::missing) continue;  // nothing to destroy there
    CK_RV rv = r.status == ObjectMap::Status::found ? CKR_OK : ObjectMap::to_ckr(r);
    if (rv == CKR_OK) rv = destroy_on_member(call, m, r.object);
    if (rv == CKR_OK || rv == CKR_OBJECT_HANDLE_INVALID) continue;
    if (member_absent(rv)) {
      call.rt.log().warn(
          "{} on group '{}': member {} is absent ({}); its copy of the token object is left there",
          call.function, call.objects.name, m, rv_name(rv));
      continue;
    }
    // A destroyed object cannot be made again: the error, and the copy left.
    call.rt.log().warn(
        "{} on group '{}': member {} answered {}; its copy of the token object is left there",
        call.function, call.objects.name, m, rv_name(rv));
    if (first == CKR_OK) first = rv;
  }
  return first;
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
