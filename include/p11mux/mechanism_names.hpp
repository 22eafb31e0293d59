// The one table of CKM_ names, for traces, metrics and tools.
#pragma once

#include <p11mux/pkcs11.h>

#include <string_view>

namespace p11mux {

// "CKM_SHA256"; empty for a mechanism the table does not know (vendor-defined
// or newer than the header it was generated from).
std::string_view mechanism_name(CK_MECHANISM_TYPE mechanism) noexcept;

}  // namespace p11mux
