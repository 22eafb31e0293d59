// The one table of CKR_ names, for logs, traces and error messages.
#pragma once

#include <p11mux/pkcs11.h>

#include <string_view>

namespace p11mux {

std::string_view rv_name(CK_RV rv) noexcept;

}  // namespace p11mux
