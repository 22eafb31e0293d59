// A group's object handles on its sessions (docs/groups.md, "Objects"): the
// map of each group, arguments resolved for the session's member, handles a
// member returns made the group's, mechanism parameters that name objects,
// and where token keys are generated. Changes of token objects on every
// member: group_replication.cpp; changes a member missed: group_catch_up.cpp.
#include "group/group_objects.hpp"
#include "group/group_objects_shared.hpp"

#include "forward/key_mechanisms.hpp"

#include <p11mux/rv_names.hpp>

#include <algorithm>
#include <new>
#include <optional>
#include <string>
#include <vector>

namespace p11mux {

using namespace group_calls;

void destroy_group_objects(GroupObjects* objects) noexcept { delete objects; }

std::vector<GroupObjectsPtr> make_group_objects(const Config& config, const LockSource& locks,
                                                spdlog::logger& log) {
  std::vector<GroupObjectsPtr> out;
  out.reserve(config.groups.size());
  for (const Group& g : config.groups) out.emplace_back(new GroupObjects(g, locks, log));
  return out;
}

namespace {

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

CK_RV group_resolve(GroupCall& call, ResolvedHandle& last, CK_OBJECT_HANDLE handle, CK_RV invalid,
                    CK_OBJECT_HANDLE& out) noexcept {
  if (last.reuse(handle, out)) return CKR_OK;
  // Read before the lookup: a change after it bumps the version
  // (ObjectMap::version), and the resolution is not used again.
  const std::uint64_t version = call.objects.map.version();
  const CK_RV rv = group_resolve(call, handle, invalid, out);
  if (rv == CKR_OK) last = {handle, out, version, &call.objects.map.version_counter()};
  return rv;
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
  // Read and issued as that member's, on the session that made them; an
  // identity taken there or on another member refuses them.
  GroupCall there{call.rt, call.objects, call.group, member, s.handle(), call.function, false};
  rv = group_refuse_taken(there, made, n, &call);
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
