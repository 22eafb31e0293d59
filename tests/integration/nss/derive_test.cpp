// Keys a mechanism returns inside its parameter, not through phKey: the
// SSL3/TLS key-and-MAC derivation makes four session keys and returns their
// handles in CK_SSL3_KEY_MAT_OUT. They must die with their session, through
// p11mux as on softoken directly: a pooled backend session must not carry
// them to the next virtual session (issue 10, defect 1).
//
// The session mode comes from P11MUX_SESSION_MODE (ctest registers one test
// per mode).
#include "nss_support.h"

#include "support/ckr_names.h"
#include "support/doctest_ck.h"

#include <iterator>
#include <string>
#include <vector>

using namespace p11test;

namespace {

CK_OBJECT_HANDLE import_master_secret(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_GENERIC_SECRET;
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  Bytes value(48, 0x5a);
  CK_ATTRIBUTE attrs[] = {
      {CKA_CLASS, &cls, sizeof cls},  {CKA_KEY_TYPE, &type, sizeof type},
      {CKA_TOKEN, &no, sizeof no},    {CKA_VALUE, value.data(), value.size()},
      {CKA_DERIVE, &yes, sizeof yes},
  };
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_CreateObject(session, attrs, std::size(attrs), &key), CKR_OK);
  return key;
}

// The four handles CKM_TLS_KEY_AND_MAC_DERIVE returns in its parameter.
std::vector<CK_OBJECT_HANDLE> derive_tls_key_material(CK_FUNCTION_LIST_3_0* fn,
                                                      CK_SESSION_HANDLE session) {
  CK_OBJECT_HANDLE master = import_master_secret(fn, session);
  Bytes client_random(32, 0x01), server_random(32, 0x02), iv_client(16, 0), iv_server(16, 0);
  CK_SSL3_KEY_MAT_OUT out{CK_INVALID_HANDLE, CK_INVALID_HANDLE, CK_INVALID_HANDLE,
                          CK_INVALID_HANDLE, iv_client.data(),  iv_server.data()};
  CK_SSL3_KEY_MAT_PARAMS params{
      160,
      128,
      128,
      CK_FALSE,
      {client_random.data(), client_random.size(), server_random.data(), server_random.size()},
      &out};
  CK_MECHANISM mech{CKM_TLS_KEY_AND_MAC_DERIVE, &params, sizeof params};
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_ULONG key_length = 16;  // softoken makes no cipher keys without it
  CK_ATTRIBUTE tmpl[] = {
      {CKA_CLASS, &cls, sizeof cls},   {CKA_KEY_TYPE, &type, sizeof type},
      {CKA_TOKEN, &no, sizeof no},     {CKA_ENCRYPT, &yes, sizeof yes},
      {CKA_DECRYPT, &yes, sizeof yes}, {CKA_VALUE_LEN, &key_length, sizeof key_length},
  };
  // phKey is NULL for this mechanism: every key comes back in `out`.
  REQUIRE_RV(fn->C_DeriveKey(session, &mech, master, tmpl, std::size(tmpl), nullptr), CKR_OK);
  std::vector<CK_OBJECT_HANDLE> keys{out.hClientMacSecret, out.hServerMacSecret, out.hClientKey,
                                     out.hServerKey};
  for (CK_OBJECT_HANDLE k : keys) REQUIRE(k != CK_INVALID_HANDLE);
  return keys;
}

// Secret keys the session can see.
CK_ULONG count_secret_keys(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_ATTRIBUTE query{CKA_CLASS, &cls, sizeof cls};
  REQUIRE_RV(fn->C_FindObjectsInit(session, &query, 1), CKR_OK);
  CK_ULONG total = 0;
  for (;;) {
    CK_OBJECT_HANDLE found[16];
    CK_ULONG n = 0;
    REQUIRE_RV(fn->C_FindObjects(session, found, std::size(found), &n), CKR_OK);
    if (n == 0) break;
    total += n;
  }
  REQUIRE_RV(fn->C_FindObjectsFinal(session), CKR_OK);
  return total;
}

bool handle_invalid(CK_RV rv) {
  return rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID;
}

// Derive in one session, close it, look from the next one.
void derived_keys_die_with_their_session(CK_FUNCTION_LIST_3_0* fn) {
  const CK_SLOT_ID slot = slot_labelled(fn, kNssCryptoSlot);
  CK_SESSION_HANDLE first = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &first), CKR_OK);
  std::vector<CK_OBJECT_HANDLE> keys = derive_tls_key_material(fn, first);
  CHECK(count_secret_keys(fn, first) == 5);  // the master secret and the four derived keys
  CK_MECHANISM hmac{CKM_SHA_1_HMAC, nullptr, 0};
  CHECK_RV(fn->C_SignInit(first, &hmac, keys[0]), CKR_OK);
  REQUIRE_RV(fn->C_CloseSession(first), CKR_OK);

  CK_SESSION_HANDLE next = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &next), CKR_OK);
  CHECK(count_secret_keys(fn, next) == 0);
  for (CK_OBJECT_HANDLE k : {keys[0], keys[1]}) {
    CK_RV rv = fn->C_SignInit(next, &hmac, k);
    CHECK_MESSAGE(handle_invalid(rv), "C_SignInit(HMAC, derived MAC key) = " << ckr_name(rv));
    if (rv == CKR_OK) (void)fn->C_SessionCancel(next, CKF_SIGN);
  }
  CK_MECHANISM ecb{CKM_AES_ECB, nullptr, 0};
  for (CK_OBJECT_HANDLE k : {keys[2], keys[3]}) {
    CK_RV rv = fn->C_EncryptInit(next, &ecb, k);
    CHECK_MESSAGE(handle_invalid(rv), "C_EncryptInit(AES, derived key) = " << ckr_name(rv));
    if (rv == CKR_OK) (void)fn->C_SessionCancel(next, CKF_ENCRYPT);
  }
  CHECK_RV(fn->C_CloseSession(next), CKR_OK);
}

}  // namespace

TEST_CASE(
    "TLS key material derived in a closed session is gone from the next one: softoken directly") {
  Library softoken(required_env("P11MUX_TEST_SOFTOKEN"));
  NssDatabase db;
  CK_FUNCTION_LIST_3_0* fn = function_list_3_0(softoken);
  REQUIRE(fn != nullptr);
  Initialized init(fn, db.init_string());
  derived_keys_die_with_their_session(fn);
}

TEST_CASE(
    "TLS key material derived in a closed session is gone from the next one: through p11mux") {
  MESSAGE("session_mode = " << env_or("P11MUX_SESSION_MODE", "serialize"));
  Library p11mux(required_env("P11MUX_TEST_P11MUX"));
  NssDatabase db;
  SoftokenBehindP11mux config(db);
  refresh_p11mux_probe(p11mux);
  CK_FUNCTION_LIST_3_0* fn = function_list_3_0(p11mux);
  REQUIRE(fn != nullptr);
  Initialized init(fn);
  derived_keys_die_with_their_session(fn);
}
