// The one table of CKM_ names, for traces, metrics and tools, with the names
// of the mechanism parameter fields a trace shows (CKG_, CKZ_, CKD_).
#pragma once

#include <p11mux/pkcs11.h>

#include <optional>
#include <string_view>

namespace p11mux {

// "CKM_SHA256"; empty for a mechanism the table does not know (vendor-defined
// or newer than the header it was generated from).
std::string_view mechanism_name(CK_MECHANISM_TYPE mechanism) noexcept;
// The value of "CKM_SHA256"; nullopt for a name the table does not have (an
// alias it does not keep, such as CKM_ECDSA_KEY_PAIR_GEN, included).
std::optional<CK_MECHANISM_TYPE> mechanism_by_name(std::string_view name) noexcept;
// "CKG_MGF1_SHA256", "CKZ_DATA_SPECIFIED", "CKD_NULL"; empty when unknown.
std::string_view mgf_name(CK_RSA_PKCS_MGF_TYPE mgf) noexcept;
std::string_view oaep_source_name(CK_RSA_PKCS_OAEP_SOURCE_TYPE source) noexcept;
std::string_view ec_kdf_name(CK_ULONG kdf) noexcept;  // a CK_ECDH1_DERIVE_PARAMS kdf

}  // namespace p11mux
