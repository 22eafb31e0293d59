// A group's object handles on its sessions (issue 15, docs/groups.md
// "Objects"): every object handle a call on a group's session passes is a
// virtual one, resolved for the session's member; every handle a member
// returns is turned into a virtual one. The group's ObjectMap
// (object_map.hpp) keeps them; its backend calls are made on sessions
// borrowed from the member's pool, never on the application's session (a
// search of the application's in progress there would make the map's
// C_FindObjectsInit fail with CKR_OPERATION_ACTIVE).
//
// This header is what the forwarding code sees (group_object_calls.hpp): the
// map stays behind these functions, out of line, so that the group path adds
// one call per handle and nothing to the forwarding of the single backend.
#pragma once

#include "config/config.hpp"
#include "group/resolved_handle.hpp"
#include "sync/lock.hpp"

#include <p11mux/pkcs11.h>

#include <spdlog/logger.h>

#include <cstddef>
#include <memory>
#include <string_view>
#include <vector>

namespace p11mux {

class AttributeSnapshot;
class BackendPort;
class Runtime;

// One group's map of virtual object handles, and how it makes token keys.
// Defined in group_objects_shared.hpp (it holds an ObjectMap and an ObjectJournal).
class GroupObjects;

void destroy_group_objects(GroupObjects* objects) noexcept;
struct GroupObjectsDeleter {
  void operator()(GroupObjects* objects) const noexcept { destroy_group_objects(objects); }
};
using GroupObjectsPtr = std::unique_ptr<GroupObjects, GroupObjectsDeleter>;

// The map of each group of `config` (as GroupRuntime numbers them), for
// `locks` and `log`, which must outlive them (Runtime owns both).
std::vector<GroupObjectsPtr> make_group_objects(const Config& config, const LockSource& locks,
                                                spdlog::logger& log);

// One call on a group's session: where it runs. `backend` is the
// application's own backend session on `member` (CK_INVALID_HANDLE when it
// holds none, or gave it back during the call): attributes are read there,
// searches on a borrowed one.
struct GroupCall {
  Runtime& rt;
  GroupObjects& objects;
  std::size_t group;
  std::size_t member;
  CK_SESSION_HANDLE backend;
  std::string_view function;
  // The application has a search active (or maybe active) on `backend`:
  // the map's own searches then run on a borrowed session.
  bool searching = false;
};

// `handle` as the member's own handle in `out`: CKR_OK, or the code for a
// handle this member cannot serve: `invalid` (the function's code for that
// argument, policy/filters.hpp object_handle_args) for an unknown,
// destroyed, missing or pinned-elsewhere one; CKR_GENERAL_ERROR when the
// member holds several objects of its identity (refused, never guessed);
// the member's error when its search failed. A cached handle: one shard
// lock and one hash lookup, no allocation, no backend call.
CK_RV group_resolve(GroupCall& call, CK_OBJECT_HANDLE handle, CK_RV invalid,
                    CK_OBJECT_HANDLE& out) noexcept;
// The same, first from the session's last resolution (`last`), which it
// keeps up to date (resolved_handle.hpp).
CK_RV group_resolve(GroupCall& call, ResolvedHandle& last, CK_OBJECT_HANDLE handle, CK_RV invalid,
                    CK_OBJECT_HANDLE& out) noexcept;

// After a successful call, `handle` (the member's, made by this call on
// backend session `made_on`) replaced by its virtual handle: a session object
// pinned to that backend session, a token object by its identity. On an
// error nothing is issued and the object is destroyed again on the member
// (the application cannot name it).
CK_RV group_issue_made(GroupCall& call, CK_SESSION_HANDLE made_on,
                       CK_OBJECT_HANDLE& handle) noexcept;

// C_FindObjects' results, `count` of them in `found`, replaced by virtual
// handles; an object that vanished meanwhile, or one whose handle came
// earlier in the same answer, is left out (`count` shrinks).
CK_RV group_issue_found(GroupCall& call, CK_OBJECT_HANDLE* found, CK_ULONG& count) noexcept;

// C_DestroyObject succeeded: `handle` is never valid again.
void group_destroyed(GroupCall& call, CK_OBJECT_HANDLE handle) noexcept;

// Token objects are on every member (docs/groups.md, "Objects"): whether
// `handle` names one (not pinned to a member).
bool group_replicated(GroupCall& call, CK_OBJECT_HANDLE handle) noexcept;
// A call made the objects its `n` handle arguments `made` name on `call`'s
// member (C_CreateObject's, C_CopyObject's, a key or a pair's two halves;
// a null argument, or one left CK_INVALID_HANDLE, names none): if one is a token object
// whose identity another object there has, all are destroyed again and the
// call refused (CKR_ATTRIBUTE_VALUE_INVALID, a log line): the member would
// hold two objects of one identity, which the map refuses to tell apart
// (docs/groups.md, "Objects"). `others`, for objects that stay on that member
// (token keys, not replicated; nullptr for the replicated, checked where each
// copy is made): every other member up is searched too, through that call
// (on its backend session on its own member), and one holding an object of
// the identity refuses them too: the group's handle would name both. Else
// CKR_OK.
CK_RV group_refuse_taken(GroupCall& call, CK_OBJECT_HANDLE* const* made, std::size_t n,
                         GroupCall* others = nullptr) noexcept;
// C_CreateObject of a token object succeeded on the session's member (`own`,
// now `handle`): made with `templ` on every other member whose token is
// present, through borrowed R/W sessions (a member down, or absent, gets it at
// its return: group_catch_up). A member that refuses: the copies
// made, and `own`, destroyed again, `handle` ended, that member's error
// answered, and a log line.
CK_RV group_replicate_create(GroupCall& call, CK_OBJECT_HANDLE handle, CK_ATTRIBUTE_PTR templ,
                             CK_ULONG count, CK_OBJECT_HANDLE own) noexcept;
// C_CopyObject of a token object (`handle`, the member's `own`) from
// `original` succeeded on the session's member: made with `templ` from each
// other member present's copy of `original`, undone as group_replicate_create
// undoes. A member that holds no copy of `original` is passed over, logged.
// Refused (CKR_ATTRIBUTE_VALUE_INVALID, the copy destroyed again, a log line)
// when the copy has `original`'s identity (every member would hold two objects
// of it) or `original` is on one member only (a session object).
CK_RV group_replicate_copy(GroupCall& call, CK_OBJECT_HANDLE handle, CK_OBJECT_HANDLE original,
                           CK_ATTRIBUTE_PTR templ, CK_ULONG count, CK_OBJECT_HANDLE own) noexcept;
// C_SetAttributeValue of a token object `handle` (`own` on the session's
// member): before the change, the values `templ` names read there into `old`
// (on the call's backend session).
void group_set_snapshot(GroupCall& call, CK_OBJECT_HANDLE own, const CK_ATTRIBUTE* templ,
                        CK_ULONG count, AttributeSnapshot& old) noexcept;
// After it succeeded there: the change made on each other member present,
// each one's old values read first on the borrowed R/W session that makes
// it. A member that refuses: the old values set back where the change was
// made (`old` on the session's member), that member's error answered, and a
// log line naming what could not be set back (a value unreadable, or
// refused). A member that holds no copy is passed over, logged.
CK_RV group_replicate_set(GroupCall& call, CK_OBJECT_HANDLE handle, CK_OBJECT_HANDLE own,
                          CK_ATTRIBUTE_PTR templ, CK_ULONG count,
                          const AttributeSnapshot& old) noexcept;
// C_DestroyObject of a token object succeeded on the session's member: its
// copies on the other members present destroyed too. A member that fails
// keeps its copy (a destroyed object cannot be made again): its error is
// answered, and logged.
CK_RV group_replicate_destroy(GroupCall& call, CK_OBJECT_HANDLE handle) noexcept;

// A backend session of `member` of group `group` ends (closed, or given back
// to the pool after its session objects were destroyed): the session
// objects made there are gone.
void group_session_ended(Runtime& rt, std::size_t group, std::size_t member,
                         CK_SESSION_HANDLE backend) noexcept;
// `member` of group `group` joins after it was down (its probe answered, its
// login done; GroupRuntime::maintain's join step): the changes to token
// objects it missed (object_journal.hpp) are made on it, in order, on a
// session borrowed from its pool. True: it is in step and may be admitted.
// False, with a log line and counted in its errors, it stays down
// (DownReason::out_of_sync): until its next probe when it was absent again;
// until p11mux is initialized again when a change failed there, or it missed
// more than the journal keeps (the operator must then bring its token up to
// date).
bool group_catch_up(Runtime& rt, std::size_t group, std::size_t member) noexcept;
// C_Finalize: the changes kept for members that did not return dropped
// (their templates zeroed now, not when the runtime goes: one kept for a
// thread stuck in a backend never goes), and a warning line for each such
// member: it is behind the others at the next start.
void group_objects_finalize(Runtime& rt) noexcept;
// `member` of group `group` is admitted again after it was down: it may have
// restarted and numbered its objects anew, so its cached handles are
// dropped and its pinned (session) objects are gone (ObjectMap::member_restarted).
void group_member_readmitted(Runtime& rt, std::size_t group, std::size_t member) noexcept;

// The mechanism a call on the member gets for the application's
// `mechanism`: itself when its parameter holds no object handle; a copy in
// `copy` (parameter in `param`) with the handle resolved for a parameter
// that names a key and whose layout p11mux knows; else refused
// (CKR_MECHANISM_PARAM_INVALID, with a log line): a vendor-defined
// mechanism's parameter, or one that returns handles inside its parameter,
// might carry a handle the member does not know, and p11mux does not guess.
struct MechanismCopyParam {
  CK_OBJECT_HANDLE handle;
};
CK_RV group_mechanism(GroupCall& call, CK_MECHANISM_PTR mechanism, CK_MECHANISM& copy,
                      MechanismCopyParam& param, CK_MECHANISM_PTR& out) noexcept;

// Whether `templ` asks for a token object (CKA_TOKEN true).
bool group_token_template(const CK_ATTRIBUTE* templ, CK_ULONG count) noexcept;
// C_GenerateKey / C_GenerateKeyPair with CKA_TOKEN true in a template on a
// group (`whole`: in every template, so no half of a pair is a session key):
// where it runs (docs/groups.md, "Configuration", generate_token_keys).
// generate_token_keys = refuse: CKR_ATTRIBUTE_VALUE_INVALID, with a log line
// saying why. primary: CKR_OK and `member` the primary member, the first in
// `members` order that is up with its token present (the session's own when
// none is); a pair with a session half from a session on another member:
// CKR_ATTRIBUTE_VALUE_INVALID, logged (the session key would be made in a
// borrowed session of the primary, out of the application's reach).
CK_RV group_token_key_member(GroupCall& call, bool whole, std::size_t& member) noexcept;
// The generation on `member`, not the session's (generate_token_keys =
// primary): `run(ctx, port, session)` on a borrowed R/W session of `member`,
// then the `n` handles it wrote (`made`) refused if their identity is taken
// (group_refuse_taken), else turned into the group's as `member`'s objects,
// and a log line: the key is on that member only.
using GroupRunOn = CK_RV (*)(void* ctx, const BackendPort& port,
                             CK_SESSION_HANDLE session) noexcept;
CK_RV group_generate_on(GroupCall& call, std::size_t member, GroupRunOn run, void* ctx,
                        CK_OBJECT_HANDLE* const* made, std::size_t n) noexcept;

}  // namespace p11mux
