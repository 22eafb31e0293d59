// PKCS#11 v3.0 through p11mux in front of NSS softoken (a real 3.0 module),
// compared with softoken called directly: the interfaces and their versions,
// C_LoginUser, C_SessionCancel, and AES-GCM message encryption. Each test makes
// its own database; direct and p11mux runs happen one after the other, never
// with softoken initialized twice at once.
#include "nss_support.h"

#include "support/ckr_names.h"
#include "support/doctest_ck.h"
#include "support/softhsm_token.h"

#include <algorithm>
#include <string>
#include <vector>

using namespace p11test;

namespace {

const std::vector<std::string> kP11muxInterfaces = {"PKCS 11 3.0 flags=0", "PKCS 11 2.40 flags=0"};

std::vector<std::string> described(const std::vector<CK_INTERFACE>& list) {
  std::vector<std::string> out;
  for (const CK_INTERFACE& i : list) out.push_back(describe(i));
  return out;
}

CK_UTF8CHAR* utf8(const char* text) {
  return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(text));
}

struct Modules {
  Library softoken{required_env("P11MUX_TEST_SOFTOKEN")};
  Library p11mux{required_env("P11MUX_TEST_P11MUX")};
};

// What a sequence of calls returned, to compare a direct run with a p11mux run.
using Answers = std::vector<std::string>;

// Sets a user PIN on the key database (made with an empty password), logs
// out, then C_LoginUser and C_Login with it.
Answers login_user_run(CK_FUNCTION_LIST_3_0* fn) {
  Answers out;
  const CK_SLOT_ID slot = slot_labelled(fn, kNssKeySlot);
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s),
             CKR_OK);
  REQUIRE_RV(fn->C_SetPIN(s, utf8(""), 0, utf8("pin-1234"), 8), CKR_OK);
  // Softoken keeps the user logged in after setting the first PIN.
  out.push_back(ckr_string(fn->C_Logout(s)));
  out.push_back(ckr_string(fn->C_LoginUser(s, CKU_USER, utf8("pin-1234"), 8, utf8("alice"), 5)));
  out.push_back(ckr_string(fn->C_LoginUser(s, CKU_USER, utf8("pin-1234"), 8, nullptr, 0)));
  out.push_back(ckr_string(fn->C_LoginUser(s, CKU_USER, utf8("wrong"), 5, utf8("alice"), 5)));
  out.push_back(ckr_string(fn->C_Login(s, CKU_USER, utf8("pin-1234"), 8)));
  CK_SESSION_INFO info{};
  REQUIRE_RV(fn->C_GetSessionInfo(s, &info), CKR_OK);
  out.push_back("state " + std::to_string(info.state));
  CHECK_RV(fn->C_CloseSession(s), CKR_OK);
  return out;
}

// C_SessionCancel with and without an operation to cancel.
Answers session_cancel_run(CK_FUNCTION_LIST_3_0* fn) {
  Answers out;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_OpenSession(slot_labelled(fn, kNssCryptoSlot), CKF_SERIAL_SESSION, nullptr,
                               nullptr, &s),
             CKR_OK);
  const CK_OBJECT_HANDLE key = import_aes_key(fn, s, gcm_test_case_4().key);
  CK_MECHANISM gcm{CKM_AES_GCM, nullptr, 0};
  out.push_back(ckr_string(fn->C_SessionCancel(s, 0)));
  out.push_back(ckr_string(fn->C_SessionCancel(s, CKF_ENCRYPT)));  // nothing to cancel
  out.push_back(ckr_string(fn->C_MessageDecryptInit(s, &gcm, key)));
  out.push_back(ckr_string(fn->C_MessageDecryptInit(s, &gcm, key)));  // already active
  out.push_back(ckr_string(fn->C_SessionCancel(s, CKF_MESSAGE_DECRYPT)));
  out.push_back(ckr_string(fn->C_MessageDecryptFinal(s)));            // nothing left to finish
  out.push_back(ckr_string(fn->C_MessageDecryptInit(s, &gcm, key)));  // free again
  out.push_back(ckr_string(fn->C_MessageDecryptFinal(s)));
  CHECK_RV(fn->C_CloseSession(s), CKR_OK);
  return out;
}

// The known answer, the length query, the multi-part message calls and a
// forged tag, with encryption and decryption in turn on one session.
Answers gcm_message_run(CK_FUNCTION_LIST_3_0* fn) {
  Answers out;
  const GcmVector& v = gcm_test_case_4();
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_OpenSession(slot_labelled(fn, kNssCryptoSlot), CKF_SERIAL_SESSION, nullptr,
                               nullptr, &s),
             CKR_OK);
  const CK_OBJECT_HANDLE key = import_aes_key(fn, s, v.key);
  CK_MECHANISM gcm{CKM_AES_GCM, nullptr, 0};

  REQUIRE_RV(fn->C_MessageEncryptInit(s, &gcm, key), CKR_OK);
  {
    Bytes iv = v.iv, aad = v.aad, in = v.plaintext, tag(16);
    GcmMessageParams params{iv.data(), iv.size(), 0, 0, tag.data(), 128};
    CK_ULONG length = 0;
    out.push_back(ckr_string(fn->C_EncryptMessage(s, &params, sizeof params, aad.data(), aad.size(),
                                                  in.data(), in.size(), nullptr, &length)));
    out.push_back("length " + std::to_string(length));
  }
  Bytes ciphertext, tag;
  REQUIRE_RV(encrypt_message(fn, s, v.iv, v.aad, v.plaintext, ciphertext, tag), CKR_OK);
  CHECK(to_hex(ciphertext) == to_hex(v.ciphertext));
  CHECK(to_hex(tag) == to_hex(v.tag));
  {
    Bytes iv = v.iv, aad = v.aad, tag2(16);
    GcmMessageParams params{iv.data(), iv.size(), 0, 0, tag2.data(), 128};
    out.push_back(
        ckr_string(fn->C_EncryptMessageBegin(s, &params, sizeof params, aad.data(), aad.size())));
  }
  REQUIRE_RV(fn->C_MessageEncryptFinal(s), CKR_OK);

  REQUIRE_RV(fn->C_MessageDecryptInit(s, &gcm, key), CKR_OK);
  Bytes plaintext;
  REQUIRE_RV(decrypt_message(fn, s, v.iv, v.aad, ciphertext, tag, plaintext), CKR_OK);
  CHECK(to_hex(plaintext) == to_hex(v.plaintext));
  Bytes forged = tag;
  forged[0] ^= 1;
  out.push_back(ckr_string(decrypt_message(fn, s, v.iv, v.aad, ciphertext, forged, plaintext)));
  CHECK(plaintext.empty());
  // Message operations survive a failed message: the next one decrypts.
  REQUIRE_RV(decrypt_message(fn, s, v.iv, v.aad, ciphertext, tag, plaintext), CKR_OK);
  CHECK(to_hex(plaintext) == to_hex(v.plaintext));
  REQUIRE_RV(fn->C_MessageDecryptFinal(s), CKR_OK);
  CHECK_RV(fn->C_CloseSession(s), CKR_OK);
  return out;
}

// Runs `run` on softoken directly and through p11mux (fresh databases) and
// checks both answered the same.
template <class Run>
Answers same_direct_and_through_p11mux(Run run) {
  Modules m;
  Answers direct;
  {
    NssDatabase db;
    CK_FUNCTION_LIST_3_0* fn = function_list_3_0(m.softoken);
    REQUIRE(fn != nullptr);
    Initialized init(fn, db.init_string());
    direct = run(fn);
  }
  Answers through;
  {
    NssDatabase db;
    SoftokenBehindP11mux config(db);
    CK_FUNCTION_LIST_3_0* fn = function_list_3_0(m.p11mux);
    REQUIRE(fn != nullptr);
    Initialized init(fn);
    through = run(fn);
  }
  CHECK(through == direct);
  return through;
}

}  // namespace

TEST_CASE("interfaces: p11mux offers 3.0 and 2.40 over softoken, claims no fork safety") {
  Modules m;
  NssDatabase db;
  SoftokenBehindP11mux config(db);
  refresh_p11mux_probe(m.p11mux);

  // Softoken itself: 3.0 and 2.40 and its vendor interfaces, all fork-safe.
  const std::vector<std::string> direct = described(interface_list(m.softoken));
  CHECK(std::find(direct.begin(), direct.end(), "PKCS 11 3.0 flags=1") != direct.end());
  CHECK(std::find(direct.begin(), direct.end(), "PKCS 11 2.40 flags=1") != direct.end());
  CHECK(direct.size() > 2);

  // Before C_Initialize (probed) and after it (the running backend): the same.
  CHECK(described(interface_list(m.p11mux)) == kP11muxInterfaces);
  CK_FUNCTION_LIST_3_0* fn = function_list_3_0(m.p11mux);
  REQUIRE(fn != nullptr);
  Initialized init(fn);
  CHECK(described(interface_list(m.p11mux)) == kP11muxInterfaces);

  CK_INTERFACE* got = nullptr;
  REQUIRE_RV(m.p11mux.get_interface()(nullptr, nullptr, &got, 0), CKR_OK);
  CHECK(got->pFunctionList == fn);  // the default: 3.0
  CK_VERSION v240{2, 40};
  REQUIRE_RV(m.p11mux.get_interface()(utf8("PKCS 11"), &v240, &got, 0), CKR_OK);
  CHECK(got->pFunctionList == m.p11mux.function_list());
  CHECK_RV(m.p11mux.get_interface()(nullptr, nullptr, &got, CKF_INTERFACE_FORK_SAFE),
           CKR_ARGUMENTS_BAD);
  CHECK_RV(m.p11mux.get_interface()(utf8("Vendor NSS Module Interface"), nullptr, &got, 0),
           CKR_ARGUMENTS_BAD);

  CK_INFO info{};
  REQUIRE_RV(fn->C_GetInfo(&info), CKR_OK);
  CHECK(info.cryptokiVersion.major == 3);
  CHECK(info.cryptokiVersion.minor == 0);
  REQUIRE_RV(m.p11mux.function_list()->C_GetInfo(&info), CKR_OK);
  CHECK(info.cryptokiVersion.major == 2);
  CHECK(info.cryptokiVersion.minor == 40);
}

TEST_CASE("vendor_interfaces = pass: softoken's own interfaces, unchanged") {
  Modules m;
  NssDatabase db;
  SoftokenBehindP11mux config(db);
  ScopedEnv pass("P11MUX_BACKEND_VENDOR_INTERFACES", "pass");
  refresh_p11mux_probe(m.p11mux);

  std::vector<CK_INTERFACE> vendor;
  for (const CK_INTERFACE& i : interface_list(m.softoken)) {
    if (std::string(reinterpret_cast<const char*>(i.pInterfaceName)) != "PKCS 11") {
      vendor.push_back(i);
    }
  }
  REQUIRE(!vendor.empty());
  const std::vector<CK_INTERFACE> list = interface_list(m.p11mux);
  REQUIRE(list.size() == 2 + vendor.size());
  CHECK(describe(list[0]) == kP11muxInterfaces[0]);
  CHECK(describe(list[1]) == kP11muxInterfaces[1]);
  for (std::size_t i = 0; i < vendor.size(); ++i) {
    CAPTURE(describe(vendor[i]));
    CHECK(list[2 + i].pFunctionList == vendor[i].pFunctionList);
    CHECK(list[2 + i].flags == vendor[i].flags);
    CHECK(describe(list[2 + i]) == describe(vendor[i]));
    CK_INTERFACE* got = nullptr;
    REQUIRE_RV(m.p11mux.get_interface()(vendor[i].pInterfaceName, nullptr, &got, 0), CKR_OK);
    CHECK(got->pFunctionList == vendor[i].pFunctionList);
  }
}

TEST_CASE("C_LoginUser: the same answers through p11mux as from softoken directly") {
  const Answers answers = same_direct_and_through_p11mux(login_user_run);
  REQUIRE(answers.size() == 6);
  MESSAGE("softoken: C_LoginUser -> " << answers[1] << ", then C_Login -> " << answers[4]);
  CHECK(answers[0] == "CKR_OK");
  CHECK(answers[4] == "CKR_OK");  // the PIN set through the same calls works
  CHECK(answers.back() == "state " + std::to_string(CKS_RW_USER_FUNCTIONS));
}

TEST_CASE(
    "C_SessionCancel: the same answers, and it cancels the operation on the backend session") {
  const Answers answers = same_direct_and_through_p11mux(session_cancel_run);
  REQUIRE(answers.size() == 8);
  CHECK(answers[2] == "CKR_OK");
  CHECK(answers[3] == "CKR_OPERATION_ACTIVE");
  CHECK(answers[4] == "CKR_OK");
  CHECK(answers[5] == "CKR_OPERATION_NOT_INITIALIZED");  // it was cancelled
  CHECK(answers[6] == "CKR_OK");
}

TEST_CASE("AES-GCM message encryption: known answer, decryption back, same answers as directly") {
  const Answers answers = same_direct_and_through_p11mux(gcm_message_run);
  REQUIRE(answers.size() == 4);
  CHECK(answers[0] == "CKR_OK");
  CHECK(answers[1] == "length " + std::to_string(gcm_test_case_4().plaintext.size()));
  CHECK(answers[3] != "CKR_OK");  // a forged tag never decrypts
}

TEST_CASE("SoftHSM2 (2.40) behind p11mux: only 2.40 offered; v3.0 calls fail cleanly") {
  Library softhsm(required_env("P11MUX_TEST_SOFTHSM2"));
  CHECK_FALSE(static_cast<bool>(softhsm.get_interface()));  // a 2.40 module
  Library p11mux(required_env("P11MUX_TEST_P11MUX"));

  // A 3.0 list handed out while the configuration named softoken...
  CK_FUNCTION_LIST_3_0* fn = nullptr;
  {
    NssDatabase db;
    SoftokenBehindP11mux config(db);
    refresh_p11mux_probe(p11mux);
    fn = function_list_3_0(p11mux);
    REQUIRE(fn != nullptr);
  }
  // ...and then the configuration names SoftHSM2.
  SoftHsmToken token;
  ScopedEnv module("P11MUX_MODULE", required_env("P11MUX_TEST_SOFTHSM2"));
  Initialized init(fn);
  const std::vector<std::string> only_240 = {"PKCS 11 2.40 flags=0"};
  CHECK(described(interface_list(p11mux)) == only_240);
  CK_VERSION v30{3, 0};
  CK_INTERFACE* got = nullptr;
  CHECK_RV(p11mux.get_interface()(utf8("PKCS 11"), &v30, &got, 0), CKR_ARGUMENTS_BAD);
  REQUIRE_RV(p11mux.get_interface()(nullptr, nullptr, &got, 0), CKR_OK);
  CHECK(got->pFunctionList == p11mux.function_list());

  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_OpenSession(slot_labelled(fn, kTokenLabel), CKF_SERIAL_SESSION | CKF_RW_SESSION,
                               nullptr, nullptr, &s),
             CKR_OK);
  CK_MECHANISM gcm{CKM_AES_GCM, nullptr, 0};
  Bytes buffer(64);
  CK_ULONG length = buffer.size();
  CHECK_RV(fn->C_LoginUser(s, CKU_USER, utf8(kUserPin), 6, utf8("alice"), 5),
           CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_RV(fn->C_SessionCancel(s, 0), CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_RV(fn->C_MessageEncryptInit(s, &gcm, 1), CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_RV(
      fn->C_EncryptMessage(s, nullptr, 0, nullptr, 0, buffer.data(), 16, buffer.data(), &length),
      CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_RV(fn->C_MessageDecryptInit(s, &gcm, 1), CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_RV(fn->C_MessageSignInit(s, &gcm, 1), CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_RV(fn->C_MessageVerifyFinal(s), CKR_FUNCTION_NOT_SUPPORTED);
  // NULL mechanism is "cancel" only in 3.0; for a 2.40 backend it is a bad argument.
  CHECK_RV(fn->C_DigestInit(s, nullptr), CKR_ARGUMENTS_BAD);
  // The 2.40 functions work through the same list, C_Login included.
  CHECK_RV(fn->C_Login(s, CKU_USER, utf8(kUserPin), 6), CKR_OK);
  Bytes random(16);
  CHECK_RV(fn->C_GenerateRandom(s, random.data(), random.size()), CKR_OK);
  CHECK_RV(fn->C_CloseSession(s), CKR_OK);
}
