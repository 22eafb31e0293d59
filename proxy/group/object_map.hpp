// A group's object handles (issue 15, docs/groups.md "Objects"): the
// application sees virtual object handles; each names one object that every
// member holds a copy of, and resolves to that member's own handle lazily.
//
// A token object is recognised across members by its identity: CKA_CLASS
// plus CKA_ID and/or CKA_LABEL, as [group.NAME] object_key says. Resolving a
// virtual handle for member M looks in a per-member cache, else searches M
// for the identity (C_FindObjects*) and caches what it found: one object, none
// (missing there; the caller may use another member) or several (ambiguous:
// refused, never guessed). A member that restarts gets a new generation,
// which drops its cached handles.
//
// Objects that cannot be matched are pinned to the member they were seen on
// and resolve nowhere else: session objects (they live in one backend
// session), and token objects whose identity cannot be read or is empty
// under the rule. A pinned object dies with its member's generation.
//
// The map never calls a backend itself: the caller passes a MemberObjects,
// which makes the calls on a session of the member it names. No lock is held
// across those calls. The map is sharded (no lock shared by every call on
// the hot path): each shard is a Guarded and a leaf of the lock order
// (sync/lock.hpp): no other lock is taken under it, and never two shards.
//
// Virtual handles are never 0 (CK_INVALID_HANDLE) and never reused while the
// map lives (one C_Initialize): a backend may reuse its handles; an
// application holding a stale virtual handle must get
// CKR_OBJECT_HANDLE_INVALID, never another object.
#pragma once

#include "config/config.hpp"
#include "sync/guarded.hpp"
#include "sync/lock.hpp"

#include <p11mux/pkcs11.h>

#include <spdlog/logger.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace p11mux {

// The position of a member in its group's `members` list.
using MemberIndex = std::size_t;

// The calls the map needs on a member, made by the runtime on a session of
// that member (the unit tests give a fake).
class MemberObjects {
 public:
  // C_GetAttributeValue(session of member, object, templ, count), as the spec
  // defines it: every attribute is processed, whatever the return value.
  virtual CK_RV get_attribute_value(MemberIndex member, CK_OBJECT_HANDLE object,
                                    CK_ATTRIBUTE* templ, CK_ULONG count) = 0;
  // C_FindObjectsInit(templ), C_FindObjects until it answers 0 handles or
  // `limit` are found, C_FindObjectsFinal. `found` receives the handles (at
  // most `limit`); the return value is the first error, else CKR_OK.
  virtual CK_RV find_objects(MemberIndex member, const CK_ATTRIBUTE* templ, CK_ULONG count,
                             std::size_t limit, std::vector<CK_OBJECT_HANDLE>& found) = 0;

 protected:
  ~MemberObjects() = default;
};

// What names a token object on every member. Only the parts the rule uses
// are filled; two objects are the same object when every field is equal.
struct ObjectIdentity {
  CK_OBJECT_CLASS cls = 0;
  bool by_id = false;  // id is part of the identity
  bool by_label = false;
  std::vector<CK_BYTE> id;
  std::vector<CK_BYTE> label;

  bool operator==(const ObjectIdentity&) const = default;
};

struct ObjectIdentityHash {
  std::size_t operator()(const ObjectIdentity& identity) const noexcept;
};

// The identity an object has under `rule`, from its attributes; nullopt when
// it has none (its rule's attributes are empty or could not be read):
//   id-or-label  CKA_ID if not empty, else (empty or absent) CKA_LABEL if not empty
//   id           CKA_ID, not empty
//   label        CKA_LABEL, not empty
//   id+label     both, as they are, one of them at least not empty
// `id` / `label` nullopt: the attribute could not be read (absent, sensitive).
std::optional<ObjectIdentity> identity_under(ObjectKey rule, CK_OBJECT_CLASS cls,
                                             const std::optional<std::vector<CK_BYTE>>& id,
                                             const std::optional<std::vector<CK_BYTE>>& label);

// An object's attributes as the map reads them from a member.
struct ObjectRead {
  CK_RV rv = CKR_OK;   // not CKR_OK: the object could not be read (handle, session...)
  bool token = false;  // CKA_TOKEN; false also when unreadable
  std::optional<ObjectIdentity> identity;  // nullopt: cannot be matched
};

// Reads CKA_CLASS, CKA_TOKEN, CKA_ID and CKA_LABEL of `object` on `member`
// (one call usually; the length query and a second call when an attribute is
// longer than the first call's buffer), and the identity under `rule`.
ObjectRead read_object(MemberObjects& members, MemberIndex member, CK_OBJECT_HANDLE object,
                       ObjectKey rule);

class ObjectMap {
 public:
  // `members`: the group's member count (fixed). `locks` must outlive the
  // map, and `log` (nullptr: no log), where an ambiguous member is told.
  ObjectMap(std::size_t members, ObjectKey rule, const LockSource& locks,
            spdlog::logger* log = nullptr);
  ObjectMap(const ObjectMap&) = delete;  // it hands out handles; a copy would hand out the same
  ObjectMap& operator=(const ObjectMap&) = delete;

  ObjectKey rule() const noexcept { return rule_; }
  std::size_t members() const noexcept { return generations_.size(); }

  struct Issued {
    CK_RV rv = CKR_OK;  // not CKR_OK: nothing issued (the backend's error, or out of handles)
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  };

  // The virtual handle of the object `object` that `member` returned (a
  // C_FindObjects result, a token object just created): the same handle as
  // before for the same object. Reads the object's attributes from the
  // member, unless `read` gives them (read_object's result for this object).
  Issued issue_found(MemberObjects& members, MemberIndex member, CK_OBJECT_HANDLE object);
  Issued issue_found(MemberIndex member, CK_OBJECT_HANDLE object, const ObjectRead& read);

  // A session object `backend_session` of `member` just made: a new virtual
  // handle, pinned to that member (no identity lookup).
  Issued issue_session_object(MemberIndex member, CK_SESSION_HANDLE backend_session,
                              CK_OBJECT_HANDLE object);

  // Records that `object` on `member` is `handle`'s copy there (a token
  // object created on every member). False if `handle` is unknown or pinned
  // to another member.
  bool record(CK_OBJECT_HANDLE handle, MemberIndex member, CK_OBJECT_HANDLE object);

  enum class Status {
    found,      // `object` is the member's handle
    unknown,    // not a handle this map issued, or destroyed, or its member restarted
    missing,    // the member holds no copy: another member may
    ambiguous,  // the member holds several objects with this identity: refused
    elsewhere,  // pinned to another member
    failed,     // the search on the member failed: `rv`
  };
  struct Resolved {
    Status status = Status::unknown;
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    CK_RV rv = CKR_OK;        // the backend's error when failed
    std::size_t matches = 0;  // ambiguous: how many the member holds (for the caller's log)
  };

  // `handle`'s object on `member`. From the cache when it has it (no
  // backend call, no allocation); else a search on the member, cached
  // unless the member restarted meanwhile. A member found ambiguous is
  // logged (warn) once per generation of it.
  Resolved resolve(MemberObjects& members, CK_OBJECT_HANDLE handle, MemberIndex member);

  // The member a pinned handle is on; nullopt for a replicated or unknown one.
  std::optional<MemberIndex> pinned_member(CK_OBJECT_HANDLE handle);
  // A replicated handle's identity; nullopt for a pinned or unknown one.
  std::optional<ObjectIdentity> identity_of(CK_OBJECT_HANDLE handle);

  // The objects of `identity` on `member`, searched now (nothing cached, no
  // handle issued): found (one), missing, ambiguous (several), or failed.
  Resolved find(MemberObjects& members, MemberIndex member, const ObjectIdentity& identity) const;

  // `handle`'s object now has `identity` (a C_SetAttributeValue changed the
  // attributes of object_key on every member): the handle and its cached
  // copies stay; it is found by the new identity, and the old one names
  // nothing. False if `handle` is unknown or pinned. The identity is looked
  // up in the shard its hash picks, which may not be the handle's: an alias
  // there points to the handle (issue_found follows it).
  bool rekey(CK_OBJECT_HANDLE handle, const ObjectIdentity& identity);

  // The object is gone (C_DestroyObject done): its handle is never valid again.
  void destroy(CK_OBJECT_HANDLE handle);
  // `backend_session` of `member` closed: its session objects are gone.
  void forget_session(MemberIndex member, CK_SESSION_HANDLE backend_session);
  // `member` restarted or recovered (or dropped every session: SoftHSM2 then
  // numbers objects anew, docs/pkcs11-facts.md "Object handles"): its cached
  // handles are dropped and its pinned objects are gone.
  void member_restarted(MemberIndex member);

  // The live virtual handles (tests, metrics).
  std::size_t size();

  // Bumped by every call that changes the map (issue, record, rekey,
  // destroy, forget_session, member_restarted), after its change: a
  // resolution of a handle made after reading a version is still right while
  // the version stays the same, so a session may keep its last one
  // (group_objects.hpp, ResolvedHandle) and skip the shard's lock.
  std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }
  const std::atomic<std::uint64_t>& version_counter() const noexcept { return version_; }

  // Beside the member's handle, how a member's copy is cached.
  enum class CacheState : std::uint8_t { unknown, found, missing, ambiguous };

  // A Resolved as the CK_RV for a caller that has no other member to try:
  // found CKR_OK; unknown, missing, elsewhere CKR_OBJECT_HANDLE_INVALID (a
  // key argument's caller says CKR_KEY_HANDLE_INVALID instead); ambiguous
  // CKR_GENERAL_ERROR (the handle is valid; p11mux will not pick one of the
  // member's objects); failed the backend's error.
  static CK_RV to_ckr(const Resolved& resolved) noexcept;

 private:
  static constexpr std::size_t kShardBits = 4;
  static constexpr std::size_t kShards = std::size_t{1} << kShardBits;

  struct Copy {
    std::uint64_t generation = 0;
    CacheState state = CacheState::unknown;
    std::size_t matches = 0;
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
  };
  struct Entry {
    std::optional<ObjectIdentity> identity;  // nullopt: pinned
    std::vector<Copy> copies;                // replicated: one per member
    // pinned only: the member, its generation then, the object there, and
    // the backend session that made it (a session object made through us)
    MemberIndex member = 0;
    std::uint64_t generation = 0;
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    CK_SESSION_HANDLE backend_session = CK_INVALID_HANDLE;
  };
  // A member's handle: of an object (by_pin), or of a session (by_session).
  struct PinKey {
    MemberIndex member;
    CK_ULONG handle;
    bool operator==(const PinKey&) const = default;
  };
  struct PinKeyHash {
    std::size_t operator()(const PinKey& key) const noexcept;
  };
  struct Shard {
    CK_ULONG next = 1;  // the next handle's serial in this shard; never reused
    std::unordered_map<CK_OBJECT_HANDLE, Entry> entries;
    std::unordered_map<ObjectIdentity, CK_OBJECT_HANDLE, ObjectIdentityHash> by_identity;
    std::unordered_map<PinKey, CK_OBJECT_HANDLE, PinKeyHash> by_pin;           // pinned objects
    std::unordered_multimap<PinKey, CK_OBJECT_HANDLE, PinKeyHash> by_session;  // their makers
  };

  Guarded<Shard>& shard_of(CK_OBJECT_HANDLE handle) noexcept {
    return shards_[handle & (kShards - 1)];
  }
  std::uint64_t generation(MemberIndex member) const noexcept {
    return generations_[member].load(std::memory_order_acquire);
  }
  // A new handle in shard `index`; CK_INVALID_HANDLE when its serials ran out.
  static CK_OBJECT_HANDLE new_handle(Shard& shard, std::size_t index) noexcept;
  Issued issue_pinned(MemberIndex member, CK_OBJECT_HANDLE object,
                      CK_SESSION_HANDLE backend_session, bool made_now);
  static void erase(Shard& shard, CK_OBJECT_HANDLE handle);
  // A search's outcome as resolve answers it.
  static Resolved resolved(const Copy& found) noexcept;
  // Searches `member` for `identity`: the outcome, with the object when found.
  Copy search(MemberObjects& members, MemberIndex member, const ObjectIdentity& identity,
              CK_RV& rv) const;

  const ObjectKey rule_;
  spdlog::logger* const log_;
  std::deque<Guarded<Shard>> shards_;  // a deque: a Guarded cannot move
  std::vector<std::atomic<std::uint64_t>> generations_;
  alignas(64) std::atomic<std::uint64_t> version_{0};
  // Bumps version_ when the changing call returns, after its change: a
  // resolution that read the version before it then never keeps an entry
  // the change removed.
  struct Changed {
    ObjectMap& map;
    ~Changed() { map.version_.fetch_add(1, std::memory_order_acq_rel); }
  };
};

}  // namespace p11mux
