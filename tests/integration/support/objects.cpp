#include "objects.h"

#include "ck_error.h"

#include <cstring>

namespace p11test {

Template& Template::add_bool(CK_ATTRIBUTE_TYPE type, bool value) {
  return add_bytes(type, Bytes{static_cast<CK_BYTE>(value ? CK_TRUE : CK_FALSE)});
}

Template& Template::add_ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value) {
  Bytes raw(sizeof value);
  std::memcpy(raw.data(), &value, sizeof value);
  return add_bytes(type, std::move(raw));
}

Template& Template::add_bytes(CK_ATTRIBUTE_TYPE type, Bytes value) {
  values_.emplace_back(type, std::move(value));
  return *this;
}

Template& Template::add_string(CK_ATTRIBUTE_TYPE type, std::string_view value) {
  return add_bytes(type, to_bytes(value));
}

CK_ATTRIBUTE* Template::data() {
  attributes_.clear();
  for (auto& [type, value] : values_) {
    attributes_.push_back(CK_ATTRIBUTE{type, value.data(), value.size()});
  }
  return attributes_.data();
}

Bytes attribute_bytes(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                      CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attribute{type, nullptr, 0};
  ck_check(fn.C_GetAttributeValue(session, object, &attribute, 1), "C_GetAttributeValue(size)");
  Bytes value(attribute.ulValueLen);
  attribute.pValue = value.data();
  ck_check(fn.C_GetAttributeValue(session, object, &attribute, 1), "C_GetAttributeValue");
  value.resize(attribute.ulValueLen);
  return value;
}

CK_ULONG attribute_ulong(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                         CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  const Bytes raw = attribute_bytes(fn, session, object, type);
  CK_ULONG value = 0;
  if (raw.size() != sizeof value) throw CkError("attribute is not a CK_ULONG", CKR_GENERAL_ERROR);
  std::memcpy(&value, raw.data(), sizeof value);
  return value;
}

std::string attribute_string(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                             CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  const Bytes raw = attribute_bytes(fn, session, object, type);
  return std::string(raw.begin(), raw.end());
}

std::vector<CK_OBJECT_HANDLE> find_objects(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                                           Template& match, CK_ULONG batch) {
  ck_check(fn.C_FindObjectsInit(session, match.data(), match.size()), "C_FindObjectsInit");
  std::vector<CK_OBJECT_HANDLE> found;
  for (;;) {
    std::vector<CK_OBJECT_HANDLE> chunk(batch);
    CK_ULONG count = 0;
    const CK_RV rv = fn.C_FindObjects(session, chunk.data(), batch, &count);
    if (rv != CKR_OK) {
      fn.C_FindObjectsFinal(session);
      throw CkError("C_FindObjects", rv);
    }
    if (count == 0) break;
    found.insert(found.end(), chunk.begin(), chunk.begin() + static_cast<std::ptrdiff_t>(count));
  }
  ck_check(fn.C_FindObjectsFinal(session), "C_FindObjectsFinal");
  return found;
}

CK_OBJECT_HANDLE create_data_object(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                                    std::string_view label, std::string_view value,
                                    Lifetime lifetime) {
  Template object;
  object.add_ulong(CKA_CLASS, CKO_DATA)
      .add_bool(CKA_TOKEN, lifetime == Lifetime::token)
      .add_bool(CKA_PRIVATE, false)
      .add_string(CKA_LABEL, label)
      .add_string(CKA_APPLICATION, "p11mux-integration")
      .add_string(CKA_VALUE, value);
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  ck_check(fn.C_CreateObject(session, object.data(), object.size(), &handle), "C_CreateObject");
  return handle;
}

}  // namespace p11test
