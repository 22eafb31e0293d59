// C entry points: encrypt, decrypt, digest, sign, verify.
//
// Operation rules (spec 5.x): a second Init while active -> CKR_OPERATION_ACTIVE;
// a call without Init -> CKR_OPERATION_NOT_INITIALIZED; a single-part call after
// an Update -> CKR_OPERATION_ACTIVE; an operation ends on its final call and on
// any error but CKR_BUFFER_TOO_SMALL (that part is done by session_call); a
// NULL output buffer asks for the length and does not end it.
#include <algorithm>
#include <cstring>

#include "mock_state.h"

using namespace p11mux::mock;

namespace {

CK_RV check_input(const void* data, CK_ULONG len) {
  return data == nullptr && len != 0 ? CKR_ARGUMENTS_BAD : CKR_OK;
}

// Starts operation `op`; key may be null for digests.
CK_RV start(Session& s, Op op, CK_MECHANISM_PTR mechanism, const CK_OBJECT_HANDLE* key) {
  if (mechanism == nullptr) {
    // v3.0: Init with a NULL mechanism cancels the active operation.
    if (!module().settings.provide_v3.load(std::memory_order_relaxed)) return CKR_ARGUMENTS_BAD;
    s.end(op);
    return CKR_OK;
  }
  OpState& state = s.op(op);
  if (state.active) return CKR_OPERATION_ACTIVE;
  OpState next;
  next.active = true;
  if (key != nullptr) {
    // Looked up as if logged in, to tell "not logged in" from "no such key".
    std::optional<Object> obj = module().objects.get(*key, Viewer{s.token->id, true});
    if (!obj) return CKR_KEY_HANDLE_INVALID;
    if (obj->is_true(CKA_PRIVATE) && !s.token->user_logged_in()) return CKR_USER_NOT_LOGGED_IN;
    next.key_id = obj->key_id;
    next.needs_context_login = op == Op::Sign && obj->is_true(CKA_ALWAYS_AUTHENTICATE);
  }
  state = std::move(next);
  return CKR_OK;
}

// The active operation for a continuing call. `single`: a one-shot call
// (C_Encrypt, C_Digest ...), which cannot finish a multi-part operation.
CK_RV continuing(Session& s, Op op, bool single, OpState*& out) {
  OpState& state = s.op(op);
  if (!state.active) return CKR_OPERATION_NOT_INITIALIZED;
  if (single && state.multipart) return CKR_OPERATION_ACTIVE;
  if (state.needs_context_login) return CKR_USER_NOT_LOGGED_IN;
  out = &state;
  return CKR_OK;
}

// Hands out a result by the PKCS#11 buffer convention; a delivered final
// result ends the operation.
CK_RV deliver(Session& s, Op op, const unsigned char* result, std::size_t n, CK_BYTE_PTR out,
              CK_ULONG_PTR out_len, bool final) {
  if (out_len == nullptr) return CKR_ARGUMENTS_BAD;
  if (out == nullptr) {
    *out_len = n;
    return CKR_OK;
  }
  bool fits = *out_len >= n;
  *out_len = n;
  if (!fits) return CKR_BUFFER_TOO_SMALL;
  if (n != 0) std::memcpy(out, result, n);
  if (final) s.end(op);
  return CKR_OK;
}

Bytes xor_with_key(unsigned long key_id, const unsigned char* data, CK_ULONG len) {
  Bytes out(data, data + len);
  unsigned char k = xor_byte(key_id);
  for (auto& b : out) b ^= k;
  return out;
}

// C_Encrypt / C_Decrypt.
CK_RV crypt_single(Session& s, Op op, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                   CK_ULONG_PTR out_len) {
  OpState* state = nullptr;
  if (CK_RV rv = continuing(s, op, true, state); rv != CKR_OK) return rv;
  if (CK_RV rv = check_input(in, in_len); rv != CKR_OK) return rv;
  Bytes result = xor_with_key(state->key_id, in, in_len);
  return deliver(s, op, result.data(), result.size(), out, out_len, true);
}

// C_EncryptUpdate / C_DecryptUpdate: output as long as the input.
CK_RV crypt_update(Session& s, Op op, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                   CK_ULONG_PTR out_len) {
  OpState* state = nullptr;
  if (CK_RV rv = continuing(s, op, false, state); rv != CKR_OK) return rv;
  if (CK_RV rv = check_input(in, in_len); rv != CKR_OK) return rv;
  Bytes result = xor_with_key(state->key_id, in, in_len);
  CK_RV rv = deliver(s, op, result.data(), result.size(), out, out_len, false);
  if (rv == CKR_OK && out != nullptr) state->multipart = true;
  return rv;
}

// C_EncryptFinal / C_DecryptFinal: nothing left over.
CK_RV crypt_final(Session& s, Op op, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  OpState* state = nullptr;
  if (CK_RV rv = continuing(s, op, false, state); rv != CKR_OK) return rv;
  return deliver(s, op, nullptr, 0, out, out_len, true);
}

// C_DigestUpdate / C_SignUpdate / C_VerifyUpdate.
CK_RV accumulate(Session& s, Op op, CK_BYTE_PTR part, CK_ULONG len) {
  OpState* state = nullptr;
  if (CK_RV rv = continuing(s, op, false, state); rv != CKR_OK) return rv;
  if (CK_RV rv = check_input(part, len); rv != CKR_OK) return rv;
  state->data.insert(state->data.end(), part, part + len);
  state->multipart = true;
  return CKR_OK;
}

// What the operation produces from `data`: a digest, or a signature with its key.
Digest produce(Op op, const OpState& state, const unsigned char* data, std::size_t len) {
  return op == Op::Digest ? reference_digest(data, len)
                          : reference_signature(state.key_id, data, len);
}

// C_Digest / C_Sign.
CK_RV produce_single(Session& s, Op op, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                     CK_ULONG_PTR out_len) {
  pause_us(module().settings.slow_us.load(std::memory_order_relaxed));
  OpState* state = nullptr;
  if (CK_RV rv = continuing(s, op, true, state); rv != CKR_OK) return rv;
  if (CK_RV rv = check_input(in, in_len); rv != CKR_OK) return rv;
  Digest result = produce(op, *state, in, in_len);
  return deliver(s, op, result.data(), result.size(), out, out_len, true);
}

// C_DigestFinal / C_SignFinal.
CK_RV produce_final(Session& s, Op op, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  OpState* state = nullptr;
  if (CK_RV rv = continuing(s, op, false, state); rv != CKR_OK) return rv;
  Digest result = produce(op, *state, state->data.data(), state->data.size());
  return deliver(s, op, result.data(), result.size(), out, out_len, true);
}

// C_Verify / C_VerifyFinal: always the last call of the operation.
CK_RV verify(Session& s, const OpState& state, const unsigned char* data, std::size_t len,
             CK_BYTE_PTR signature, CK_ULONG signature_len) {
  if (signature == nullptr) return CKR_ARGUMENTS_BAD;
  if (signature_len != MOCK_DIGEST_LEN) return CKR_SIGNATURE_LEN_RANGE;
  Digest expected = reference_signature(state.key_id, data, len);
  if (!std::equal(expected.begin(), expected.end(), signature)) return CKR_SIGNATURE_INVALID;
  s.end(Op::Verify);
  return CKR_OK;
}

CK_RV not_supported(Session&) { return CKR_FUNCTION_NOT_SUPPORTED; }

}  // namespace

// ---- encrypt ----

MOCK_EXPORT CK_RV C_EncryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                CK_OBJECT_HANDLE hKey) {
  return session_call(Fn::C_EncryptInit, hSession,
                      [&](Session& s) { return start(s, Op::Encrypt, pMechanism, &hKey); });
}

MOCK_EXPORT CK_RV C_Encrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                            CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen) {
  return session_call(Fn::C_Encrypt, hSession, [&](Session& s) {
    return crypt_single(s, Op::Encrypt, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen);
  });
}

MOCK_EXPORT CK_RV C_EncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,
                                  CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen) {
  return session_call(Fn::C_EncryptUpdate, hSession, [&](Session& s) {
    return crypt_update(s, Op::Encrypt, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen);
  });
}

MOCK_EXPORT CK_RV C_EncryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart,
                                 CK_ULONG_PTR pulLastEncryptedPartLen) {
  return session_call(Fn::C_EncryptFinal, hSession, [&](Session& s) {
    return crypt_final(s, Op::Encrypt, pLastEncryptedPart, pulLastEncryptedPartLen);
  });
}

// ---- decrypt ----

MOCK_EXPORT CK_RV C_DecryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                CK_OBJECT_HANDLE hKey) {
  return session_call(Fn::C_DecryptInit, hSession,
                      [&](Session& s) { return start(s, Op::Decrypt, pMechanism, &hKey); });
}

MOCK_EXPORT CK_RV C_Decrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData,
                            CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData,
                            CK_ULONG_PTR pulDataLen) {
  return session_call(Fn::C_Decrypt, hSession, [&](Session& s) {
    return crypt_single(s, Op::Decrypt, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen);
  });
}

MOCK_EXPORT CK_RV C_DecryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,
                                  CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart,
                                  CK_ULONG_PTR pulPartLen) {
  return session_call(Fn::C_DecryptUpdate, hSession, [&](Session& s) {
    return crypt_update(s, Op::Decrypt, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen);
  });
}

MOCK_EXPORT CK_RV C_DecryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart,
                                 CK_ULONG_PTR pulLastPartLen) {
  return session_call(Fn::C_DecryptFinal, hSession, [&](Session& s) {
    return crypt_final(s, Op::Decrypt, pLastPart, pulLastPartLen);
  });
}

// ---- digest ----

MOCK_EXPORT CK_RV C_DigestInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism) {
  return session_call(Fn::C_DigestInit, hSession,
                      [&](Session& s) { return start(s, Op::Digest, pMechanism, nullptr); });
}

MOCK_EXPORT CK_RV C_Digest(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                           CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) {
  return session_call(Fn::C_Digest, hSession, [&](Session& s) {
    return produce_single(s, Op::Digest, pData, ulDataLen, pDigest, pulDigestLen);
  });
}

MOCK_EXPORT CK_RV C_DigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                                 CK_ULONG ulPartLen) {
  return session_call(Fn::C_DigestUpdate, hSession,
                      [&](Session& s) { return accumulate(s, Op::Digest, pPart, ulPartLen); });
}

// Digests the key's CKA_VALUE as if passed to C_DigestUpdate.
MOCK_EXPORT CK_RV C_DigestKey(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey) {
  return session_call(Fn::C_DigestKey, hSession, [&](Session& s) -> CK_RV {
    std::optional<Object> key = module().objects.get(hKey, s.viewer());
    if (!key) return CKR_KEY_HANDLE_INVALID;
    const Bytes* value = key->find(CKA_VALUE);
    if (value == nullptr) return CKR_KEY_INDIGESTIBLE;
    Bytes copy = *value;
    return accumulate(s, Op::Digest, copy.data(), copy.size());
  });
}

MOCK_EXPORT CK_RV C_DigestFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest,
                                CK_ULONG_PTR pulDigestLen) {
  return session_call(Fn::C_DigestFinal, hSession, [&](Session& s) {
    return produce_final(s, Op::Digest, pDigest, pulDigestLen);
  });
}

// ---- sign ----

MOCK_EXPORT CK_RV C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                             CK_OBJECT_HANDLE hKey) {
  return session_call(Fn::C_SignInit, hSession,
                      [&](Session& s) { return start(s, Op::Sign, pMechanism, &hKey); });
}

MOCK_EXPORT CK_RV C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                         CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) {
  return session_call(Fn::C_Sign, hSession, [&](Session& s) {
    return produce_single(s, Op::Sign, pData, ulDataLen, pSignature, pulSignatureLen);
  });
}

MOCK_EXPORT CK_RV C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) {
  return session_call(Fn::C_SignUpdate, hSession,
                      [&](Session& s) { return accumulate(s, Op::Sign, pPart, ulPartLen); });
}

MOCK_EXPORT CK_RV C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                              CK_ULONG_PTR pulSignatureLen) {
  return session_call(Fn::C_SignFinal, hSession, [&](Session& s) {
    return produce_final(s, Op::Sign, pSignature, pulSignatureLen);
  });
}

MOCK_EXPORT CK_RV C_SignRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR,
                                    CK_OBJECT_HANDLE) {
  return session_call(Fn::C_SignRecoverInit, hSession, not_supported);
}

MOCK_EXPORT CK_RV C_SignRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR,
                                CK_ULONG_PTR) {
  return session_call(Fn::C_SignRecover, hSession, not_supported);
}

// ---- verify ----

MOCK_EXPORT CK_RV C_VerifyInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                               CK_OBJECT_HANDLE hKey) {
  return session_call(Fn::C_VerifyInit, hSession,
                      [&](Session& s) { return start(s, Op::Verify, pMechanism, &hKey); });
}

MOCK_EXPORT CK_RV C_Verify(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                           CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen) {
  return session_call(Fn::C_Verify, hSession, [&](Session& s) -> CK_RV {
    OpState* state = nullptr;
    if (CK_RV rv = continuing(s, Op::Verify, true, state); rv != CKR_OK) return rv;
    if (CK_RV rv = check_input(pData, ulDataLen); rv != CKR_OK) return rv;
    return verify(s, *state, pData, ulDataLen, pSignature, ulSignatureLen);
  });
}

MOCK_EXPORT CK_RV C_VerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart,
                                 CK_ULONG ulPartLen) {
  return session_call(Fn::C_VerifyUpdate, hSession,
                      [&](Session& s) { return accumulate(s, Op::Verify, pPart, ulPartLen); });
}

MOCK_EXPORT CK_RV C_VerifyFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
                                CK_ULONG ulSignatureLen) {
  return session_call(Fn::C_VerifyFinal, hSession, [&](Session& s) -> CK_RV {
    OpState* state = nullptr;
    if (CK_RV rv = continuing(s, Op::Verify, false, state); rv != CKR_OK) return rv;
    return verify(s, *state, state->data.data(), state->data.size(), pSignature, ulSignatureLen);
  });
}

MOCK_EXPORT CK_RV C_VerifyRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR,
                                      CK_OBJECT_HANDLE) {
  return session_call(Fn::C_VerifyRecoverInit, hSession, not_supported);
}

MOCK_EXPORT CK_RV C_VerifyRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR,
                                  CK_ULONG_PTR) {
  return session_call(Fn::C_VerifyRecover, hSession, not_supported);
}

// ---- dual-function operations: not modelled ----

MOCK_EXPORT CK_RV C_DigestEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR, CK_ULONG,
                                        CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_DigestEncryptUpdate, hSession, not_supported);
}

MOCK_EXPORT CK_RV C_DecryptDigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR, CK_ULONG,
                                        CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_DecryptDigestUpdate, hSession, not_supported);
}

MOCK_EXPORT CK_RV C_SignEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR, CK_ULONG,
                                      CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_SignEncryptUpdate, hSession, not_supported);
}

MOCK_EXPORT CK_RV C_DecryptVerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR, CK_ULONG,
                                        CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_DecryptVerifyUpdate, hSession, not_supported);
}
