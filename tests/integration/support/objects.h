// Object templates, attribute reads, object search and creation.
#pragma once

#include "bytes.h"

#include <p11mux/pkcs11.h>

#include <string_view>
#include <utility>
#include <vector>

namespace p11test {

// An attribute template that owns its values, so it can be built in one expression:
//   Template().add_ulong(CKA_CLASS, CKO_DATA).add_string(CKA_LABEL, "x")
class Template {
 public:
  Template& add_bool(CK_ATTRIBUTE_TYPE type, bool value);
  Template& add_ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value);
  Template& add_bytes(CK_ATTRIBUTE_TYPE type, Bytes value);
  Template& add_string(CK_ATTRIBUTE_TYPE type, std::string_view value);

  // Valid until the template is next modified.
  CK_ATTRIBUTE* data();
  CK_ULONG size() const noexcept { return values_.size(); }

 private:
  std::vector<std::pair<CK_ATTRIBUTE_TYPE, Bytes>> values_;
  std::vector<CK_ATTRIBUTE> attributes_;
};

// C_GetAttributeValue with size query; throws CkError on failure.
Bytes attribute_bytes(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                      CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type);
CK_ULONG attribute_ulong(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                         CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type);
std::string attribute_string(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                             CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type);

// C_FindObjectsInit/C_FindObjects (batch objects at a time)/C_FindObjectsFinal.
std::vector<CK_OBJECT_HANDLE> find_objects(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                                           Template& match, CK_ULONG batch = 16);

// A CKO_DATA object with this label and value, a token or a session object.
enum class Lifetime { session, token };
CK_OBJECT_HANDLE create_data_object(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                                    std::string_view label, std::string_view value,
                                    Lifetime lifetime);

}  // namespace p11test
