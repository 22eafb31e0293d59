#include "group/object_map.hpp"

#include "group/fnv1a.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <utility>

namespace p11mux {

namespace {

// The return values after which C_GetAttributeValue has processed every
// attribute of the template (each one's ulValueLen says what it got).
bool attributes_processed(CK_RV rv) noexcept {
  return rv == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID ||
         rv == CKR_BUFFER_TOO_SMALL;
}

// The first read's buffer for CKA_ID and CKA_LABEL: most fit, so most
// objects are read in one call.
constexpr std::size_t kFirstRead = 64;
// A longer CKA_ID or CKA_LABEL is not read (nor matched): no allocation on
// the strength of a length a module reports.
constexpr CK_ULONG kMaxValue = CK_ULONG{64} * 1024;
// A changing attribute (another thread relabelling) is read again at most so often.
constexpr int kReadAttempts = 3;
// At most this many candidates are checked one by one when the search
// template cannot say the identity alone; more are taken as ambiguous.
constexpr std::size_t kVerifyLimit = 256;

}  // namespace

std::size_t ObjectIdentityHash::operator()(const ObjectIdentity& identity) const noexcept {
  Fnv1a f;
  f.add(identity.cls);
  f.add(identity.by_id);
  f.add(identity.by_label);
  f.add(identity.id.size());
  f.add(identity.id.data(), identity.id.size());
  f.add(identity.label.data(), identity.label.size());
  return static_cast<std::size_t>(f.h);
}

std::size_t ObjectMap::PinKeyHash::operator()(const PinKey& key) const noexcept {
  Fnv1a f;
  f.add(key.member);
  f.add(key.handle);
  return static_cast<std::size_t>(f.h);
}

std::optional<ObjectIdentity> identity_under(ObjectKey rule, CK_OBJECT_CLASS cls,
                                             const std::optional<std::vector<CK_BYTE>>& id,
                                             const std::optional<std::vector<CK_BYTE>>& label) {
  const bool has_id = id && !id->empty();
  const bool has_label = label && !label->empty();
  ObjectIdentity identity;
  identity.cls = cls;
  switch (rule) {
    case ObjectKey::id_or_label:
      if (has_id) {
        identity.by_id = true;
        identity.id = *id;
      } else if (has_label) {
        // An ID empty or absent (a data object has none): the label stands in.
        identity.by_label = true;
        identity.label = *label;
      } else {
        return std::nullopt;
      }
      return identity;
    case ObjectKey::id:
      if (!has_id) return std::nullopt;
      identity.by_id = true;
      identity.id = *id;
      return identity;
    case ObjectKey::label:
      if (!has_label) return std::nullopt;
      identity.by_label = true;
      identity.label = *label;
      return identity;
    case ObjectKey::id_and_label:
      // Both read (an empty one is a value too), one at least not empty.
      if (!id || !label || (!has_id && !has_label)) return std::nullopt;
      identity.by_id = identity.by_label = true;
      identity.id = *id;
      identity.label = *label;
      return identity;
  }
  return std::nullopt;
}

ObjectRead read_object(MemberObjects& members, MemberIndex member, CK_OBJECT_HANDLE object,
                       ObjectKey rule) {
  const bool want_id = rule != ObjectKey::label;
  const bool want_label = rule != ObjectKey::id;
  CK_OBJECT_CLASS cls = 0;
  CK_BBOOL token = CK_FALSE;
  std::vector<CK_BYTE> id(want_id ? kFirstRead : 0);
  std::vector<CK_BYTE> label(want_label ? kFirstRead : 0);
  // Attributes known absent or sensitive: not asked for again.
  bool id_unreadable = false;
  bool label_unreadable = false;

  for (int attempt = 0; attempt < kReadAttempts; ++attempt) {
    std::array<CK_ATTRIBUTE, 4> templ{};
    CK_ULONG count = 0;
    templ[count++] = {CKA_CLASS, &cls, sizeof cls};
    templ[count++] = {CKA_TOKEN, &token, sizeof token};
    CK_ATTRIBUTE* id_attr = nullptr;
    CK_ATTRIBUTE* label_attr = nullptr;
    if (want_id && !id_unreadable) {
      id_attr = &templ[count];
      templ[count++] = {CKA_ID, id.data(), static_cast<CK_ULONG>(id.size())};
    }
    if (want_label && !label_unreadable) {
      label_attr = &templ[count];
      templ[count++] = {CKA_LABEL, label.data(), static_cast<CK_ULONG>(label.size())};
    }
    const CK_RV rv = members.get_attribute_value(member, object, templ.data(), count);
    if (!attributes_processed(rv)) return {rv, false, std::nullopt};

    // A buffer too small shows as CK_UNAVAILABLE_INFORMATION, which also
    // marks an attribute absent or sensitive; some modules write the length
    // needed instead (docs/pkcs11-facts.md, "Backends that bend the
    // specification"). Either way, ask the lengths alone, then read again.
    const auto unsure = [&](const CK_ATTRIBUTE* a, std::size_t room) {
      if (a == nullptr) return false;
      return a->ulValueLen == CK_UNAVAILABLE_INFORMATION ? rv == CKR_BUFFER_TOO_SMALL
                                                         : a->ulValueLen > room;
    };
    const bool id_unsure = unsure(id_attr, id.size());
    const bool label_unsure = unsure(label_attr, label.size());
    if (rv == CKR_BUFFER_TOO_SMALL || id_unsure || label_unsure) {
      std::array<CK_ATTRIBUTE, 2> lengths{};
      CK_ULONG asked = 0;
      if (id_unsure) lengths[asked++] = {CKA_ID, nullptr, 0};
      if (label_unsure) lengths[asked++] = {CKA_LABEL, nullptr, 0};
      // Too small, says the module, yet nothing is: its values cannot be trusted.
      if (asked == 0) return {CKR_OK, false, std::nullopt};
      const CK_RV lrv = members.get_attribute_value(member, object, lengths.data(), asked);
      if (!attributes_processed(lrv)) return {lrv, false, std::nullopt};
      for (CK_ULONG i = 0; i < asked; ++i) {
        const bool is_id = lengths[i].type == CKA_ID;
        if (lengths[i].ulValueLen == CK_UNAVAILABLE_INFORMATION ||
            lengths[i].ulValueLen > kMaxValue) {
          (is_id ? id_unreadable : label_unreadable) = true;
        } else {
          (is_id ? id : label).resize(lengths[i].ulValueLen);
        }
      }
      continue;  // read again with buffers of the lengths given
    }

    ObjectRead read;
    read.rv = CKR_OK;
    const bool class_read = templ[0].ulValueLen == sizeof cls;
    const bool token_read = templ[1].ulValueLen == sizeof token;
    read.token = token_read && token == CK_TRUE;
    if (!class_read || !token_read) return read;  // cannot be matched: pinned
    std::optional<std::vector<CK_BYTE>> id_value;
    std::optional<std::vector<CK_BYTE>> label_value;
    if (id_attr != nullptr && id_attr->ulValueLen != CK_UNAVAILABLE_INFORMATION) {
      id.resize(id_attr->ulValueLen);
      id_value = std::move(id);
    }
    if (label_attr != nullptr && label_attr->ulValueLen != CK_UNAVAILABLE_INFORMATION) {
      label.resize(label_attr->ulValueLen);
      label_value = std::move(label);
    }
    read.identity = identity_under(rule, cls, id_value, label_value);
    return read;
  }
  // The attributes kept changing length: read, but not matchable.
  ObjectRead read;
  read.token = token == CK_TRUE;
  return read;
}

ObjectMap::ObjectMap(std::size_t members, ObjectKey rule, const LockSource& locks,
                     spdlog::logger* log)
    : rule_(rule), log_(log), generations_(members) {
  for (std::size_t i = 0; i < kShards; ++i) shards_.emplace_back(locks);
  // Generation 0 is a Copy never filled: a fresh Copy is never current.
  for (auto& g : generations_) g.store(1, std::memory_order_relaxed);
}

CK_OBJECT_HANDLE ObjectMap::new_handle(Shard& shard, std::size_t index) noexcept {
  constexpr CK_ULONG kMaxSerial = std::numeric_limits<CK_ULONG>::max() >> kShardBits;
  if (shard.next > kMaxSerial) return CK_INVALID_HANDLE;  // never wrap: a reuse would alias
  const CK_ULONG serial = shard.next++;
  // serial >= 1, so the handle is never 0; its low bits name its shard.
  return (serial << kShardBits) | static_cast<CK_ULONG>(index);
}

ObjectMap::Issued ObjectMap::issue_found(MemberObjects& members, MemberIndex member,
                                         CK_OBJECT_HANDLE object) {
  return issue_found(member, object, read_object(members, member, object, rule_));
}

ObjectMap::Issued ObjectMap::issue_found(MemberIndex member, CK_OBJECT_HANDLE object,
                                         const ObjectRead& read) {
  const Changed changed{*this};
  if (member >= members()) return {CKR_GENERAL_ERROR, CK_INVALID_HANDLE};
  if (read.rv != CKR_OK) return {read.rv, CK_INVALID_HANDLE};
  if (!read.token || !read.identity) {
    return issue_pinned(member, object, CK_INVALID_HANDLE, /*made_now=*/false);
  }
  const ObjectIdentity& identity = *read.identity;
  const std::uint64_t gen = generation(member);
  const std::size_t index = ObjectIdentityHash{}(identity) & (kShards - 1);
  // The member's object is the entry's copy there (a second object of the
  // identity on the member, or one made again: the next resolve searches).
  const auto seen = [&](Entry& entry) {
    Copy& copy = entry.copies[member];
    if (copy.generation != gen || copy.state == CacheState::missing) {
      copy = {gen, CacheState::found, 1, object};
    } else if (copy.state == CacheState::found && copy.object != object) {
      copy = {};
    }
  };
  // The identity is looked up in the shard its hash picks; its entry is in
  // its handle's shard: the same one, unless the handle was re-keyed
  // (rekey), when the identity's shard holds an alias. An alias whose entry
  // no longer has the identity (re-keyed again, destroyed) is dropped.
  for (int attempt = 0; attempt < 3; ++attempt) {
    CK_OBJECT_HANDLE aliased = CK_INVALID_HANDLE;
    {
      Locked shard(shards_[index]);
      auto it = shard->by_identity.find(identity);
      if (it == shard->by_identity.end()) {
        const CK_OBJECT_HANDLE handle = new_handle(*shard, index);
        if (handle == CK_INVALID_HANDLE) return {CKR_GENERAL_ERROR, CK_INVALID_HANDLE};
        Entry entry;
        entry.identity = identity;
        entry.copies.resize(members());
        entry.copies[member] = {gen, CacheState::found, 1, object};
        shard->entries.emplace(handle, std::move(entry));
        shard->by_identity.emplace(identity, handle);
        return {CKR_OK, handle};
      }
      if ((it->second & (kShards - 1)) == index) {
        auto e = shard->entries.find(it->second);
        if (e != shard->entries.end() && e->second.identity == identity) {
          seen(e->second);
          return {CKR_OK, it->second};
        }
        shard->by_identity.erase(it);
        continue;
      }
      aliased = it->second;
    }
    {
      Locked shard(shard_of(aliased));
      auto e = shard->entries.find(aliased);
      if (e != shard->entries.end() && e->second.identity == identity) {
        seen(e->second);
        return {CKR_OK, aliased};
      }
    }
    Locked shard(shards_[index]);
    if (auto it = shard->by_identity.find(identity);
        it != shard->by_identity.end() && it->second == aliased) {
      shard->by_identity.erase(it);
    }
  }
  return {CKR_GENERAL_ERROR, CK_INVALID_HANDLE};  // re-keyed to and fro meanwhile, each time
}

ObjectMap::Issued ObjectMap::issue_session_object(MemberIndex member,
                                                  CK_SESSION_HANDLE backend_session,
                                                  CK_OBJECT_HANDLE object) {
  if (member >= members()) return {CKR_GENERAL_ERROR, CK_INVALID_HANDLE};
  return issue_pinned(member, object, backend_session, /*made_now=*/true);
}

ObjectMap::Issued ObjectMap::issue_pinned(MemberIndex member, CK_OBJECT_HANDLE object,
                                          CK_SESSION_HANDLE backend_session, bool made_now) {
  const Changed changed{*this};
  const std::uint64_t gen = generation(member);
  const PinKey key{member, object};
  const std::size_t index = PinKeyHash{}(key) & (kShards - 1);
  Locked shard(shards_[index]);
  if (auto it = shard->by_pin.find(key); it != shard->by_pin.end()) {
    const Entry& old = shard->entries.at(it->second);
    // The same object seen again (a search): the same handle. An object just
    // made under a handle we knew means the old object is gone (the backend
    // reused its handle); so is one from before a restart.
    if (!made_now && old.generation == gen) return {CKR_OK, it->second};
    erase(*shard, it->second);
  }
  const CK_OBJECT_HANDLE handle = new_handle(*shard, index);
  if (handle == CK_INVALID_HANDLE) return {CKR_GENERAL_ERROR, CK_INVALID_HANDLE};
  Entry entry;
  entry.member = member;
  entry.generation = gen;
  entry.object = object;
  entry.backend_session = backend_session;
  shard->entries.emplace(handle, std::move(entry));
  shard->by_pin.emplace(key, handle);
  if (backend_session != CK_INVALID_HANDLE) {
    shard->by_session.emplace(PinKey{member, backend_session}, handle);
  }
  return {CKR_OK, handle};
}

void ObjectMap::erase(Shard& shard, CK_OBJECT_HANDLE handle) {
  auto it = shard.entries.find(handle);
  if (it == shard.entries.end()) return;
  const Entry& entry = it->second;
  if (entry.identity) {
    if (auto k = shard.by_identity.find(*entry.identity);
        k != shard.by_identity.end() && k->second == handle) {
      shard.by_identity.erase(k);
    }
  } else {
    if (auto k = shard.by_pin.find(PinKey{entry.member, entry.object});
        k != shard.by_pin.end() && k->second == handle) {
      shard.by_pin.erase(k);
    }
    if (entry.backend_session != CK_INVALID_HANDLE) {
      auto [first, last] =
          shard.by_session.equal_range(PinKey{entry.member, entry.backend_session});
      for (auto k = first; k != last; ++k) {
        if (k->second == handle) {
          shard.by_session.erase(k);
          break;
        }
      }
    }
  }
  shard.entries.erase(it);
}

bool ObjectMap::record(CK_OBJECT_HANDLE handle, MemberIndex member, CK_OBJECT_HANDLE object) {
  const Changed changed{*this};
  if (member >= members()) return false;
  const std::uint64_t gen = generation(member);
  Locked shard(shard_of(handle));
  auto it = shard->entries.find(handle);
  if (it == shard->entries.end()) return false;
  Entry& entry = it->second;
  if (!entry.identity) return entry.member == member && entry.object == object;
  entry.copies[member] = {gen, CacheState::found, 1, object};
  return true;
}

ObjectMap::Resolved ObjectMap::resolve(MemberObjects& members, CK_OBJECT_HANDLE handle,
                                       MemberIndex member) {
  if (member >= this->members()) return {};
  const std::uint64_t gen = generation(member);
  std::optional<ObjectIdentity> identity;
  {
    Locked shard(shard_of(handle));
    auto it = shard->entries.find(handle);
    if (it == shard->entries.end()) return {};
    const Entry& entry = it->second;
    if (!entry.identity) {
      if (entry.generation != generation(entry.member)) {
        erase(*shard, handle);  // its member restarted: the object is gone
        return {};
      }
      if (entry.member != member) return {Status::elsewhere, CK_INVALID_HANDLE, CKR_OK, 0};
      return {Status::found, entry.object, CKR_OK, 1};
    }
    const Copy& copy = entry.copies[member];
    if (copy.generation == gen) {
      switch (copy.state) {
        case CacheState::found:
          return {Status::found, copy.object, CKR_OK, 1};
        case CacheState::missing:
          return {Status::missing, CK_INVALID_HANDLE, CKR_OK, 0};
        case CacheState::ambiguous:
          return {Status::ambiguous, CK_INVALID_HANDLE, CKR_OK, copy.matches};
        case CacheState::unknown:
          break;
      }
    }
    identity = *entry.identity;
  }

  // Not known on this member yet: search it, without a lock held.
  CK_RV rv = CKR_OK;
  const Copy found = search(members, member, *identity, rv);
  bool first_ambiguity = false;
  if (rv != CKR_OK) return {Status::failed, CK_INVALID_HANDLE, rv, 0};
  {
    Locked shard(shard_of(handle));
    auto it = shard->entries.find(handle);
    if (it == shard->entries.end()) return {};  // destroyed meanwhile
    // A member that restarted meanwhile numbers its objects anew: the
    // result is not kept (the caller's own call will fail on it and retry).
    if (generation(member) == gen) {
      Copy& copy = it->second.copies[member];
      first_ambiguity = found.state == CacheState::ambiguous &&
                        !(copy.generation == gen && copy.state == CacheState::ambiguous);
      copy = found;
    }
  }
  if (first_ambiguity && log_ != nullptr) {
    // Not under the lock: no log record is made under a shard's lock.
    log_->warn(
        "group object handle {}: member {} holds {} objects of class {:#x} with its {}; "
        "refused there (object_key = {})",
        handle, member, found.matches, identity->cls,
        identity->by_id && identity->by_label ? "CKA_ID and CKA_LABEL"
        : identity->by_id                     ? "CKA_ID"
                                              : "CKA_LABEL",
        to_string(rule_));
  }
  return resolved(found);
}

ObjectMap::Resolved ObjectMap::resolved(const Copy& found) noexcept {
  switch (found.state) {
    case CacheState::found:
      return {Status::found, found.object, CKR_OK, 1};
    case CacheState::ambiguous:
      return {Status::ambiguous, CK_INVALID_HANDLE, CKR_OK, found.matches};
    default:
      return {Status::missing, CK_INVALID_HANDLE, CKR_OK, 0};
  }
}

ObjectMap::Copy ObjectMap::search(MemberObjects& members, MemberIndex member,
                                  const ObjectIdentity& identity, CK_RV& rv) const {
  CK_OBJECT_CLASS cls = identity.cls;
  CK_BBOOL token = CK_TRUE;
  std::array<CK_ATTRIBUTE, 4> templ{};
  CK_ULONG count = 0;
  templ[count++] = {CKA_CLASS, &cls, sizeof cls};
  templ[count++] = {CKA_TOKEN, &token, sizeof token};
  // An empty value is left out of the template (modules disagree on what an
  // empty template value matches); the candidates are then checked one by
  // one. So is a label standing in for an empty ID: an object with that
  // label and an ID of its own is another object.
  bool verify = false;
  if (identity.by_id) {
    if (identity.id.empty()) {
      verify = true;
    } else {
      templ[count++] = {CKA_ID, const_cast<CK_BYTE*>(identity.id.data()),
                        static_cast<CK_ULONG>(identity.id.size())};
    }
  }
  if (identity.by_label) {
    if (identity.label.empty()) {
      verify = true;
    } else {
      templ[count++] = {CKA_LABEL, const_cast<CK_BYTE*>(identity.label.data()),
                        static_cast<CK_ULONG>(identity.label.size())};
    }
    if (!identity.by_id) verify = verify || rule_ == ObjectKey::id_or_label;
  }
  const std::uint64_t gen = generation(member);
  std::vector<CK_OBJECT_HANDLE> found;
  // Two are enough to tell one from several.
  rv = members.find_objects(member, templ.data(), count, verify ? kVerifyLimit : 2, found);
  if (rv != CKR_OK) return {};
  if (verify) {
    if (found.size() >= kVerifyLimit) return {gen, CacheState::ambiguous, found.size(), 0};
    std::erase_if(found, [&](CK_OBJECT_HANDLE candidate) {
      const ObjectRead read = read_object(members, member, candidate, rule_);
      return read.rv != CKR_OK || !read.token || read.identity != identity;
    });
  }
  if (found.empty()) return {gen, CacheState::missing, 0, CK_INVALID_HANDLE};
  if (found.size() > 1) return {gen, CacheState::ambiguous, found.size(), CK_INVALID_HANDLE};
  return {gen, CacheState::found, 1, found.front()};
}

std::optional<MemberIndex> ObjectMap::pinned_member(CK_OBJECT_HANDLE handle) {
  Locked shard(shard_of(handle));
  auto it = shard->entries.find(handle);
  if (it == shard->entries.end() || it->second.identity) return std::nullopt;
  if (it->second.generation != generation(it->second.member)) return std::nullopt;
  return it->second.member;
}

std::optional<ObjectIdentity> ObjectMap::identity_of(CK_OBJECT_HANDLE handle) {
  Locked shard(shard_of(handle));
  auto it = shard->entries.find(handle);
  if (it == shard->entries.end()) return std::nullopt;
  return it->second.identity;
}

ObjectMap::Resolved ObjectMap::find(MemberObjects& members, MemberIndex member,
                                    const ObjectIdentity& identity) const {
  if (member >= this->members()) return {};
  CK_RV rv = CKR_OK;
  const Copy found = search(members, member, identity, rv);
  if (rv != CKR_OK) return {Status::failed, CK_INVALID_HANDLE, rv, 0};
  return resolved(found);
}

bool ObjectMap::rekey(CK_OBJECT_HANDLE handle, const ObjectIdentity& identity) {
  const Changed changed{*this};
  ObjectIdentity old;
  {
    Locked shard(shard_of(handle));
    auto it = shard->entries.find(handle);
    if (it == shard->entries.end() || !it->second.identity) return false;
    if (*it->second.identity == identity) return true;
    old = std::exchange(*it->second.identity, identity);
  }
  // One shard at a time (a leaf lock): the entry first, then the new
  // identity's alias, then the old one's dropped. A search result seen in
  // between is issued a handle of its own (issue_found), never another
  // object's.
  {
    Locked shard(shards_[ObjectIdentityHash{}(identity) & (kShards - 1)]);
    shard->by_identity.insert_or_assign(identity, handle);
  }
  Locked shard(shards_[ObjectIdentityHash{}(old) & (kShards - 1)]);
  if (auto it = shard->by_identity.find(old);
      it != shard->by_identity.end() && it->second == handle) {
    shard->by_identity.erase(it);
  }
  return true;
}

void ObjectMap::destroy(CK_OBJECT_HANDLE handle) {
  const Changed changed{*this};
  std::optional<ObjectIdentity> identity;
  {
    Locked shard(shard_of(handle));
    if (auto it = shard->entries.find(handle); it != shard->entries.end()) {
      identity = it->second.identity;
    }
    erase(*shard, handle);
  }
  // A re-keyed handle's alias, in its identity's shard.
  if (!identity) return;
  const std::size_t index = ObjectIdentityHash{}(*identity) & (kShards - 1);
  if (index == (handle & (kShards - 1))) return;
  Locked shard(shards_[index]);
  if (auto it = shard->by_identity.find(*identity);
      it != shard->by_identity.end() && it->second == handle) {
    shard->by_identity.erase(it);
  }
}

void ObjectMap::forget_session(MemberIndex member, CK_SESSION_HANDLE backend_session) {
  const PinKey key{member, backend_session};
  std::vector<CK_OBJECT_HANDLE> gone;
  for (auto& guarded : shards_) {
    Locked shard(guarded);
    gone.clear();
    auto [first, last] = shard->by_session.equal_range(key);
    for (auto it = first; it != last; ++it) gone.push_back(it->second);
    for (CK_OBJECT_HANDLE handle : gone) erase(*shard, handle);
    // After the change (version()): a session without objects, the common
    // case, changes nothing.
    if (!gone.empty()) version_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ObjectMap::member_restarted(MemberIndex member) {
  const Changed changed{*this};
  if (member >= members()) return;
  generations_[member].fetch_add(1, std::memory_order_acq_rel);
  // Cached copies are dropped lazily (their generation is old); pinned
  // objects are gone now, so their entries go at once.
  std::vector<CK_OBJECT_HANDLE> gone;
  for (auto& guarded : shards_) {
    Locked shard(guarded);
    gone.clear();
    for (const auto& [handle, entry] : shard->entries) {
      if (!entry.identity && entry.member == member) gone.push_back(handle);
    }
    for (CK_OBJECT_HANDLE handle : gone) erase(*shard, handle);
  }
}

std::size_t ObjectMap::size() {
  std::size_t total = 0;
  for (auto& guarded : shards_) {
    Locked shard(guarded);
    total += shard->entries.size();
  }
  return total;
}

CK_RV ObjectMap::to_ckr(const Resolved& resolved) noexcept {
  switch (resolved.status) {
    case Status::found:
      return CKR_OK;
    case Status::ambiguous:
      return CKR_GENERAL_ERROR;
    case Status::failed:
      return resolved.rv;
    default:
      return CKR_OBJECT_HANDLE_INVALID;
  }
}

}  // namespace p11mux
