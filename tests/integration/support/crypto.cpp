#include "crypto.h"

#include "ck_error.h"
#include "objects.h"

namespace p11test {
namespace {

KeyPair generate_key_pair(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                          CK_MECHANISM_TYPE mechanism, Template& public_template,
                          Template& private_template) {
  CK_MECHANISM mech{mechanism, nullptr, 0};
  KeyPair pair;
  ck_check(fn.C_GenerateKeyPair(session, &mech, public_template.data(), public_template.size(),
                                private_template.data(), private_template.size(), &pair.public_key,
                                &pair.private_key),
           "C_GenerateKeyPair");
  return pair;
}

Template private_key_template(std::string_view label) {
  Template t;
  t.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_SENSITIVE, true)
      .add_bool(CKA_SIGN, true)
      .add_string(CKA_LABEL, label);
  return t;
}

// The input pointer for data: never NULL, as some modules (SoftHSM2) refuse a NULL
// pointer even with length 0.
CK_BYTE* input(const Bytes& data) {
  static CK_BYTE empty = 0;
  return data.empty() ? &empty : const_cast<CK_BYTE*>(data.data());
}

}  // namespace

KeyPair generate_ec_p256(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                         std::string_view label) {
  Template public_template;
  public_template.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_VERIFY, true)
      .add_bytes(CKA_EC_PARAMS, kPrime256v1Params)
      .add_string(CKA_LABEL, label);
  Template private_template = private_key_template(label);
  return generate_key_pair(fn, session, CKM_EC_KEY_PAIR_GEN, public_template, private_template);
}

KeyPair generate_rsa(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_ULONG bits,
                     std::string_view label) {
  Template public_template;
  public_template.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_VERIFY, true)
      .add_ulong(CKA_MODULUS_BITS, bits)
      .add_bytes(CKA_PUBLIC_EXPONENT, Bytes{0x01, 0x00, 0x01})
      .add_string(CKA_LABEL, label);
  Template private_template = private_key_template(label);
  return generate_key_pair(fn, session, CKM_RSA_PKCS_KEY_PAIR_GEN, public_template,
                           private_template);
}

CK_OBJECT_HANDLE generate_aes(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                              CK_ULONG value_len, std::string_view label) {
  Template key;
  key.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_SENSITIVE, true)
      .add_bool(CKA_ENCRYPT, true)
      .add_bool(CKA_DECRYPT, true)
      .add_ulong(CKA_VALUE_LEN, value_len)
      .add_string(CKA_LABEL, label);
  CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  ck_check(fn.C_GenerateKey(session, &mech, key.data(), key.size(), &handle), "C_GenerateKey");
  return handle;
}

Bytes digest(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
             const Bytes& data) {
  CK_MECHANISM mech{mechanism, nullptr, 0};
  ck_check(fn.C_DigestInit(session, &mech), "C_DigestInit");
  CK_BYTE* in = input(data);
  CK_ULONG length = 0;
  ck_check(fn.C_Digest(session, in, data.size(), nullptr, &length), "C_Digest(size)");
  Bytes out(length);
  ck_check(fn.C_Digest(session, in, data.size(), out.data(), &length), "C_Digest");
  out.resize(length);
  return out;
}

Bytes sign(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
           CK_OBJECT_HANDLE key, const Bytes& data) {
  CK_MECHANISM mech{mechanism, nullptr, 0};
  ck_check(fn.C_SignInit(session, &mech, key), "C_SignInit");
  CK_BYTE* in = input(data);
  CK_ULONG length = 0;
  ck_check(fn.C_Sign(session, in, data.size(), nullptr, &length), "C_Sign(size)");
  Bytes signature(length);
  ck_check(fn.C_Sign(session, in, data.size(), signature.data(), &length), "C_Sign");
  signature.resize(length);
  return signature;
}

CK_RV verify(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
             CK_OBJECT_HANDLE key, const Bytes& data, const Bytes& signature) {
  CK_MECHANISM mech{mechanism, nullptr, 0};
  ck_check(fn.C_VerifyInit(session, &mech, key), "C_VerifyInit");
  return fn.C_Verify(session, input(data), data.size(), input(signature), signature.size());
}

Bytes ecdsa_sha256_sign(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                        CK_OBJECT_HANDLE private_key, const Bytes& message) {
  return sign(fn, session, CKM_ECDSA, private_key, digest(fn, session, CKM_SHA256, message));
}

CK_RV ecdsa_sha256_verify(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                          CK_OBJECT_HANDLE public_key, const Bytes& message,
                          const Bytes& signature) {
  return verify(fn, session, CKM_ECDSA, public_key, digest(fn, session, CKM_SHA256, message),
                signature);
}

}  // namespace p11test
