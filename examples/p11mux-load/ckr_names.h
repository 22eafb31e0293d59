// Names of PKCS#11 return values (CKR_*), for error messages and reports.
#pragma once

#include <p11mux/pkcs11.h>

#include <string>

namespace p11mux::load {

// "CKR_PIN_INCORRECT"; unknown values as "CKR_0x00000123", vendor ones as
// "CKR_VENDOR_DEFINED+0x1".
std::string ckr_name(CK_RV rv);

}  // namespace p11mux::load
