// Key generation, digests and signatures through a module, for set-up and for
// checking results. These throw CkError on any failure; tests that examine a
// specific return code call the module directly.
#pragma once

#include "bytes.h"

#include <p11mux/pkcs11.h>

#include <string_view>

namespace p11test {

// DER of the prime256v1 (NIST P-256) OID, the CKA_EC_PARAMS of a P-256 key.
inline const Bytes kPrime256v1Params{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

struct KeyPair {
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
};

// Session key pairs (CKA_TOKEN false) labelled label; the private key is private
// and sensitive. Need a logged-in session.
KeyPair generate_ec_p256(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                         std::string_view label);
KeyPair generate_rsa(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_ULONG bits,
                     std::string_view label);
// A sensitive session AES key of value_len bytes that can encrypt and decrypt.
CK_OBJECT_HANDLE generate_aes(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                              CK_ULONG value_len, std::string_view label);

// Single-part C_DigestInit + C_Digest (with size query).
Bytes digest(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
             const Bytes& data);

// Single-part C_SignInit + C_Sign (with size query), parameterless mechanism.
Bytes sign(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
           CK_OBJECT_HANDLE key, const Bytes& data);

// C_VerifyInit (throws on failure) + C_Verify, whose answer is returned:
// CKR_OK or CKR_SIGNATURE_INVALID are the expected ones.
CK_RV verify(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
             CK_OBJECT_HANDLE key, const Bytes& data, const Bytes& signature);

// ECDSA over SHA-256: the digest is made with C_Digest, then signed with CKM_ECDSA.
Bytes ecdsa_sha256_sign(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                        CK_OBJECT_HANDLE private_key, const Bytes& message);
CK_RV ecdsa_sha256_verify(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                          CK_OBJECT_HANDLE public_key, const Bytes& message,
                          const Bytes& signature);

}  // namespace p11test
