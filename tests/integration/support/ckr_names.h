// Names for PKCS#11 return values, so that test failures read "CKR_PIN_INCORRECT"
// rather than "160".
#pragma once

#include <p11mux/pkcs11.h>

#include <string>
#include <string_view>

namespace p11test {

// The symbolic name of rv, or an empty view if rv is not in the table.
std::string_view ckr_name(CK_RV rv) noexcept;

// The symbolic name of rv, or "CKR_0x<hex>" for codes not in the table.
std::string ckr_string(CK_RV rv);

}  // namespace p11test
