// A C_DeriveKey mechanism that returns its keys inside its parameter (the
// SSL3/TLS key-and-MAC derivations, as NSS softoken and the spec bender do),
// for the tests that check p11mux follows those keys.
#pragma once

#include <p11mux/pkcs11.h>

#include <array>

namespace p11mux::test {

// The parameter and the structure the keys come back in, with the mechanism
// pointing at them: keep the object where it is while the call runs.
struct KeyMaterialDerive {
  explicit KeyMaterialDerive(CK_MECHANISM_TYPE type = CKM_TLS_KEY_AND_MAC_DERIVE,
                             CK_ULONG mac_bits = 256, CK_ULONG key_bits = 128) noexcept
      : mechanism{type, &params, sizeof params} {
    params.ulMacSizeInBits = mac_bits;
    params.ulKeySizeInBits = key_bits;
    params.pReturnedKeyMaterial = &out;
  }
  KeyMaterialDerive(const KeyMaterialDerive&) = delete;  // the mechanism points into it
  KeyMaterialDerive& operator=(const KeyMaterialDerive&) = delete;

  // The four handles the call returned (CK_INVALID_HANDLE before it).
  std::array<CK_OBJECT_HANDLE, 4> keys() const noexcept {
    return {out.hClientMacSecret, out.hServerMacSecret, out.hClientKey, out.hServerKey};
  }

  CK_SSL3_KEY_MAT_OUT out{};
  CK_SSL3_KEY_MAT_PARAMS params{};
  CK_MECHANISM mechanism;
};

}  // namespace p11mux::test
