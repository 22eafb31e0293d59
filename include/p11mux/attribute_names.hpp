// The one table of CKA_ names, with the CKO_ and CKK_ names of the values of
// CKA_CLASS and CKA_KEY_TYPE, for traces and tools.
#pragma once

#include <p11mux/pkcs11.h>

#include <string_view>

namespace p11mux {

// "CKA_LABEL"; empty for an attribute the table does not know (vendor-defined
// or newer than the header it was generated from).
std::string_view attribute_name(CK_ATTRIBUTE_TYPE type) noexcept;
// "CKO_SECRET_KEY" / "CKK_EC"; empty when unknown.
std::string_view object_class_name(CK_OBJECT_CLASS value) noexcept;
std::string_view key_type_name(CK_KEY_TYPE value) noexcept;

}  // namespace p11mux
