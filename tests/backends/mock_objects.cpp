// The in-memory object store: attribute lists keyed by handle.
#include <algorithm>
#include <cstring>

#include "mock_state.h"

namespace p11mux::mock {

CK_RV read_template(const CK_ATTRIBUTE* templ, CK_ULONG count, Attributes& out) {
  if (templ == nullptr && count != 0) return CKR_ARGUMENTS_BAD;
  out.clear();
  for (CK_ULONG i = 0; i < count; ++i) {
    const CK_ATTRIBUTE& a = templ[i];
    if (a.pValue == nullptr && a.ulValueLen != 0) return CKR_ARGUMENTS_BAD;
    const auto* bytes = static_cast<const unsigned char*>(a.pValue);
    out.push_back({a.type, Bytes(bytes, bytes + (bytes ? a.ulValueLen : 0))});
  }
  return CKR_OK;
}

const Bytes* Object::find(CK_ATTRIBUTE_TYPE type) const {
  for (const auto& a : attrs)
    if (a.type == type) return &a.value;
  return nullptr;
}

bool Object::is_true(CK_ATTRIBUTE_TYPE type) const {
  const Bytes* v = find(type);
  return v != nullptr && v->size() == sizeof(CK_BBOOL) && (*v)[0] == CK_TRUE;
}

void Object::set(const Attribute& attr) {
  for (auto& a : attrs)
    if (a.type == attr.type) {
      a.value = attr.value;
      return;
    }
  attrs.push_back(attr);
}

void Object::set(const Attributes& list) {
  for (const auto& a : list) set(a);
}

bool Object::matches(const Attributes& templ) const {
  for (const auto& want : templ) {
    const Bytes* have = find(want.type);
    if (have == nullptr || *have != want.value) return false;
  }
  return true;
}

const Object* ObjectStore::visible(CK_OBJECT_HANDLE handle, Viewer who) const {
  auto it = objects_.find(handle);
  if (it == objects_.end()) return nullptr;
  const Object& obj = it->second;
  if (obj.slot != who.slot || (obj.is_true(CKA_PRIVATE) && !who.user)) return nullptr;
  return &obj;
}

CK_OBJECT_HANDLE ObjectStore::add(Object obj) {
  Module& m = module();
  std::unique_lock lock(mu_);
  CK_OBJECT_HANDLE handle = next_;
  if (m.settings.bends(MOCK_BEND_REUSE_HANDLES)) {
    handle = lowest_free(objects_, MOCK_OBJECT_HANDLE_BASE);
    if (handle < next_) bump(m.counters.bend_handles_reused);
  }
  next_ = std::max(next_, handle + 1);
  if (obj.key_id == 0) obj.key_id = handle;
  objects_.emplace(handle, std::move(obj));
  return handle;
}

std::optional<Object> ObjectStore::get(CK_OBJECT_HANDLE handle, Viewer who) const {
  std::shared_lock lock(mu_);
  if (const Object* obj = visible(handle, who)) return *obj;
  return std::nullopt;
}

bool ObjectStore::erase(CK_OBJECT_HANDLE handle, Viewer who) {
  std::unique_lock lock(mu_);
  if (visible(handle, who) == nullptr) return false;
  objects_.erase(handle);
  return true;
}

std::vector<CK_OBJECT_HANDLE> ObjectStore::find(Viewer who, const Attributes& templ) const {
  std::shared_lock lock(mu_);
  std::vector<CK_OBJECT_HANDLE> out;
  for (const auto& [handle, obj] : objects_)
    if (obj.slot == who.slot && (who.user || !obj.is_true(CKA_PRIVATE)) && obj.matches(templ))
      out.push_back(handle);
  return out;
}

void ObjectStore::erase_owned_by(CK_SESSION_HANDLE owner) {
  std::unique_lock lock(mu_);
  std::erase_if(objects_, [&](const auto& entry) { return entry.second.owner == owner; });
}

void ObjectStore::erase_session_objects() {
  std::unique_lock lock(mu_);
  std::erase_if(objects_, [](const auto& entry) { return entry.second.owner != 0; });
}

void ObjectStore::erase_token_objects(CK_SLOT_ID slot) {
  std::unique_lock lock(mu_);
  std::erase_if(objects_, [&](const auto& entry) {
    return entry.second.owner == 0 && entry.second.slot == slot;
  });
}

void ObjectStore::clear() {
  std::unique_lock lock(mu_);
  objects_.clear();
  next_ = MOCK_OBJECT_HANDLE_BASE;
}

void ObjectStore::count(unsigned long& session_objects, unsigned long& token_objects) const {
  std::shared_lock lock(mu_);
  session_objects = token_objects = 0;
  for (const auto& [handle, obj] : objects_) ++(obj.owner != 0 ? session_objects : token_objects);
}

}  // namespace p11mux::mock
