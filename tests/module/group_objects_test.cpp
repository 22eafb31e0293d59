// Issue 15, virtual object handles on a group's sessions (docs/groups.md,
// "Objects"): the application sees the group's handles, resolved for the
// member each session runs on. Over the mock (its slots hold "mock-token-N",
// serial N, and number objects across all of them, so one object's copies
// have different handles on different members), behind the faulty module
// where a member's token must be absent.
#include "group_harness.hpp"

#include <array>
#include <chrono>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace p11mux::test {
namespace {

MockConfig three_tokens(unsigned long bend = 0) {
  MockConfig mock{};
  mock.slot_count = 3;
  mock.bend = bend;
  return mock;
}

// A group over the faulty module (over the mock): first member the mock's
// slot 2, then its slot 1.
std::string faulty_group(const std::string& extra = "") {
  return std::string("[backend.faulty]\nmodule = ") + P11MUX_TEST_FAULTY_PATH +
         "\n[group.signing]\nmembers = faulty/serial:2, faulty/label:mock-token-1\n" + extra;
}

// A token secret key with CKA_ID "k1" and `label`, made straight on the
// mock's `slot` (the members' copies, as provisioning would make them).
CK_OBJECT_HANDLE provision(CK_SLOT_ID slot, const std::string& label) {
  CK_FUNCTION_LIST* mock = mock_functions();
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE(mock->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s) ==
          CKR_OK);
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_GENERIC_SECRET;
  CK_BBOOL yes = CK_TRUE;
  std::string id = "k1";
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_KEY_TYPE, &type, sizeof type},
                          {CKA_TOKEN, &yes, sizeof yes},
                          {CKA_ID, id.data(), id.size()},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(mock->C_CreateObject(s, templ, 5, &h) == CKR_OK);
  REQUIRE(mock->C_CloseSession(s) == CKR_OK);
  return h;
}

// The handles a search by CKA_ID "k1" finds on session `s`.
std::vector<CK_OBJECT_HANDLE> find_k1(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s) {
  std::string id = "k1";
  CK_ATTRIBUTE templ[] = {{CKA_ID, id.data(), id.size()}};
  REQUIRE(p->C_FindObjectsInit(s, templ, 1) == CKR_OK);
  std::array<CK_OBJECT_HANDLE, 8> found{};
  CK_ULONG n = 0;
  REQUIRE(p->C_FindObjects(s, found.data(), found.size(), &n) == CKR_OK);
  REQUIRE(p->C_FindObjectsFinal(s) == CKR_OK);
  return {found.begin(), found.begin() + n};
}

std::string label_of(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object,
                     CK_RV* rv = nullptr) {
  std::array<char, 64> text{};
  CK_ATTRIBUTE a{CKA_LABEL, text.data(), text.size()};
  const CK_RV got = p->C_GetAttributeValue(s, object, &a, 1);
  if (rv != nullptr) *rv = got;
  if (got != CKR_OK) return {};
  return {text.data(), a.ulValueLen};
}

CK_OBJECT_HANDLE create_data(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, bool token,
                             const std::string& label) {
  CK_OBJECT_CLASS cls = CKO_DATA;
  CK_BBOOL on_token = token ? CK_TRUE : CK_FALSE;
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_TOKEN, &on_token, sizeof on_token},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(p->C_CreateObject(s, templ, 3, &h) == CKR_OK);
  return h;
}

}  // namespace

TEST_CASE("group objects: a handle found on one member serves a session on another") {
  const FaultyControl* faulty = faulty_control();
  GroupProxy proxy(faulty_group(), three_tokens(),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}});
  REQUIRE(faulty->reset() == 0);
  // The same key on both members, each with its own handle (and, to tell
  // which copy a call reached, its own label).
  REQUIRE(proxy.initialize() == CKR_OK);
  const CK_OBJECT_HANDLE on_first = provision(2, "copy-on-slot-2");
  const CK_OBJECT_HANDLE on_second = provision(1, "copy-on-slot-1");
  REQUIRE(on_first != on_second);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE a = proxy.open();  // on the first member
  const std::vector<CK_OBJECT_HANDLE> found = find_k1(p, a);
  REQUIRE(found.size() == 1);
  const CK_OBJECT_HANDLE key = found[0];
  CHECK(label_of(p, a, key) == "copy-on-slot-2");
  // The first member's token gone: a new session runs on the second.
  faulty->set_slot_removed(2, 1);
  const CK_SESSION_HANDLE b = proxy.open();
  CHECK(label_of(p, b, key) == "copy-on-slot-1");
  // The same object found there is the same handle.
  CHECK(find_k1(p, b) == std::vector<CK_OBJECT_HANDLE>{key});
  // A member's own number is none of the group's handles.
  CK_RV rv = CKR_OK;
  for (CK_OBJECT_HANDLE raw : {on_first, on_second}) {
    if (raw == key) continue;
    label_of(p, b, raw, &rv);
    CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  }
  faulty->clear_slot(2);
}

TEST_CASE("group objects: at a member's session limit, a handle resolves on the call's session") {
  // One backend session per token: a search on a second session of the
  // member would wait for the one this call holds (and time out).
  const FaultyControl* faulty = faulty_control();
  GroupProxy proxy(faulty_group(), three_tokens(),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                    {"P11MUX_FAULTY_MAX_SLOT_SESSIONS", "1"},
                    {"P11MUX_POOL_WAIT_MS", "200"}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  provision(2, "copy-on-slot-2");
  provision(1, "copy-on-slot-1");
  CK_FUNCTION_LIST* p = proxy.p11;
  // The handle is found on the second member only (the first is absent).
  faulty->set_slot_removed(2, 1);
  const CK_SESSION_HANDLE b = proxy.open();
  const std::vector<CK_OBJECT_HANDLE> found = find_k1(p, b);
  REQUIRE(found.size() == 1);
  faulty->clear_slot(2);
  // A session on the first member holds its only backend session; the
  // handle is resolved there for the first time.
  const CK_SESSION_HANDLE a = proxy.open();
  CK_RV rv = CKR_OK;
  CHECK(label_of(p, a, found[0], &rv) == "copy-on-slot-2");
  CHECK(rv == CKR_OK);
  // A search of the application's own in progress is left alone: the map
  // then needs another session, which the limit refuses.
  CK_OBJECT_CLASS data_class = CKO_DATA;
  CK_ATTRIBUTE any_data{CKA_CLASS, &data_class, sizeof data_class};
  REQUIRE(p->C_FindObjectsInit(a, &any_data, 1) == CKR_OK);
  CHECK(label_of(p, a, found[0]) == "copy-on-slot-2");  // cached now: no search
  REQUIRE(p->C_FindObjectsFinal(a) == CKR_OK);
}

TEST_CASE("group objects: a destroyed handle stays invalid when the backend reuses its number") {
  GroupProxy proxy(two_mock_members(), three_tokens(MOCK_BEND_REUSE_HANDLES));
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  const CK_OBJECT_HANDLE first = create_data(p, s, true, "first");
  CHECK(label_of(p, s, first) == "first");
  REQUIRE(p->C_DestroyObject(s, first) == CKR_OK);
  CK_RV rv = CKR_OK;
  label_of(p, s, first, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  CHECK(p->C_DestroyObject(s, first) == CKR_OBJECT_HANDLE_INVALID);
  // The mock gives the next object the number the first one had: the
  // group's handle is new, and the old one names nothing.
  const CK_OBJECT_HANDLE second = create_data(p, s, true, "second");
  CHECK(mock_stats().bend_handles_reused >= 1);
  CHECK(second != first);
  label_of(p, s, first, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  CHECK(label_of(p, s, second) == "second");
}

TEST_CASE("group objects: session objects live in their session, on their member") {
  const FaultyControl* faulty = faulty_control();
  // primary: the sessions opened while the first member is there go to it.
  GroupProxy proxy(faulty_group("balance = primary\n"), three_tokens(MOCK_BEND_REUSE_HANDLES),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  // A session on the second member (the first's token absent meanwhile;
  // removing it drops the sessions there, so before the others open).
  faulty->set_slot_removed(2, 1);
  const CK_SESSION_HANDLE elsewhere = proxy.open();
  faulty->clear_slot(2);
  const CK_SESSION_HANDLE a = proxy.open();
  const CK_SESSION_HANDLE b = proxy.open();
  const CK_OBJECT_HANDLE object = create_data(p, a, false, "session object");
  // Any session of the application on that member may use it.
  CHECK(label_of(p, b, object) == "session object");
  // Not one on another member: the object is not there.
  CK_RV rv = CKR_OK;
  label_of(p, elsewhere, object, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  // Gone with its session; the next object made takes its number on the
  // mock, not its handle.
  REQUIRE(p->C_CloseSession(a) == CKR_OK);
  label_of(p, b, object, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  const CK_OBJECT_HANDLE next = create_data(p, b, false, "next");
  CHECK(next != object);
  label_of(p, b, object, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  CHECK(label_of(p, b, next) == "next");
}

TEST_CASE("group objects: key arguments get their own codes; keys made are the group's") {
  GroupProxy proxy(two_mock_members(), three_tokens());
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  REQUIRE(p->C_GenerateKeyPair(s, &gen, nullptr, 0, nullptr, 0, &pub, &priv) == CKR_OK);
  // The mock's own numbers for them are not the group's handles.
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CHECK(p->C_SignInit(s, &ecdsa, priv) == CKR_OK);
  std::string text = "over a group";
  std::array<CK_BYTE, MOCK_DIGEST_LEN> sig{};
  CK_ULONG sig_len = sig.size();
  REQUIRE(p->C_Sign(s, reinterpret_cast<CK_BYTE_PTR>(text.data()), text.size(), sig.data(),
                    &sig_len) == CKR_OK);
  REQUIRE(p->C_VerifyInit(s, &ecdsa, pub) == CKR_OK);
  CHECK(p->C_Verify(s, reinterpret_cast<CK_BYTE_PTR>(text.data()), text.size(), sig.data(),
                    sig_len) == CKR_OK);
  // A handle the group never issued: the code of that argument.
  const CK_OBJECT_HANDLE bogus = priv + pub + 4096;
  CHECK(p->C_SignInit(s, &ecdsa, bogus) == CKR_KEY_HANDLE_INVALID);
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
  CK_ULONG wrapped_len = 0;
  CHECK(p->C_WrapKey(s, &wrap, bogus, priv, nullptr, &wrapped_len) ==
        CKR_WRAPPING_KEY_HANDLE_INVALID);
  CHECK(p->C_WrapKey(s, &wrap, pub, bogus, nullptr, &wrapped_len) == CKR_KEY_HANDLE_INVALID);
  CHECK(p->C_GetObjectSize(s, bogus, &wrapped_len) == CKR_OBJECT_HANDLE_INVALID);
  // The mock numbers the pair it made from MOCK_OBJECT_HANDLE_BASE: those
  // numbers name nothing of the group's, though the member has the keys.
  for (CK_OBJECT_HANDLE raw : {MOCK_OBJECT_HANDLE_BASE, MOCK_OBJECT_HANDLE_BASE + 1}) {
    CHECK(p->C_GetObjectSize(s, raw, &wrapped_len) == CKR_OBJECT_HANDLE_INVALID);
    CHECK(p->C_SignInit(s, &ecdsa, raw) == CKR_KEY_HANDLE_INVALID);
  }
}

TEST_CASE("group objects: a C_DigestKey p11mux refuses ends the digest on the member too") {
  // The spec ends a digest at any error of C_DigestKey; this one p11mux
  // answers itself (the key is none of the group's), so the member, which
  // never saw it, still has the digest, and would refuse the next Init.
  GroupProxy proxy(two_mock_members(), three_tokens());
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  std::string part = "digested after a refused key";
  auto* bytes = reinterpret_cast<CK_BYTE*>(part.data());
  for (int round = 0; round < 2; ++round) {
    CAPTURE(round);
    REQUIRE(p->C_DigestInit(s, &sha) == CKR_OK);
    REQUIRE(p->C_DigestUpdate(s, bytes, part.size()) == CKR_OK);
    CHECK(p->C_DigestKey(s, 0x7fff0000) == CKR_KEY_HANDLE_INVALID);
    std::array<CK_BYTE, 64> out{};
    CK_ULONG len = out.size();
    CHECK(p->C_DigestFinal(s, out.data(), &len) == CKR_OPERATION_NOT_INITIALIZED);
  }
  // And the session digests as before.
  REQUIRE(p->C_DigestInit(s, &sha) == CKR_OK);
  std::array<CK_BYTE, 64> out{};
  CK_ULONG len = out.size();
  CHECK(p->C_Digest(s, bytes, part.size(), out.data(), &len) == CKR_OK);
}

TEST_CASE("group objects: a mechanism parameter that may name an object is refused, logged") {
  GroupProxy proxy(std::string("[backend.mock]\nmodule = ") + P11MUX_TEST_MOCK_PATH +
                       "\n[group.signing]\nmembers = mock/serial:2\n",
                   three_tokens(), {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  REQUIRE(p->C_GenerateKeyPair(s, &gen, nullptr, 0, nullptr, 0, &pub, &priv) == CKR_OK);
  // A vendor's mechanism with a parameter: p11mux cannot know its layout.
  CK_ULONG vendor_param = priv;
  CK_MECHANISM vendor{CKM_VENDOR_DEFINED + 7, &vendor_param, sizeof vendor_param};
  CK_RV rv = CKR_OK;
  std::string err = capture_stderr([&] { rv = p->C_SignInit(s, &vendor, priv); });
  CHECK(rv == CKR_MECHANISM_PARAM_INVALID);
  CHECK_MESSAGE(err.find("C_SignInit on group 'signing' refused") != std::string::npos, err);
  // CKM_CONCATENATE_BASE_AND_KEY's parameter is the other key: resolved
  // like any key argument.
  CK_OBJECT_HANDLE other = priv + pub + 4096;  // never issued
  CK_MECHANISM concatenate{CKM_CONCATENATE_BASE_AND_KEY, &other, sizeof other};
  CK_OBJECT_HANDLE derived = CK_INVALID_HANDLE;
  CHECK(p->C_DeriveKey(s, &concatenate, priv, nullptr, 0, &derived) == CKR_KEY_HANDLE_INVALID);
  other = pub;
  REQUIRE(p->C_DeriveKey(s, &concatenate, priv, nullptr, 0, &derived) == CKR_OK);
  CHECK(other == pub);  // the application's parameter is left as it was
  CK_ULONG size = 0;
  CHECK(p->C_GetObjectSize(s, derived, &size) == CKR_OK);
  // A derivation that returns its keys inside the parameter.
  CK_SSL3_KEY_MAT_OUT out{};
  CK_SSL3_KEY_MAT_PARAMS tls{};
  tls.pReturnedKeyMaterial = &out;
  CK_MECHANISM derive{CKM_TLS_KEY_AND_MAC_DERIVE, &tls, sizeof tls};
  err = capture_stderr([&] { rv = p->C_DeriveKey(s, &derive, priv, nullptr, 0, nullptr); });
  CHECK(rv == CKR_MECHANISM_PARAM_INVALID);
  CHECK_MESSAGE(err.find("returns keys inside its parameter") != std::string::npos, err);
}

TEST_CASE("group objects: generate_token_keys = refuse refuses token keys, with a log line") {
  GroupProxy proxy(two_mock_members(), three_tokens(), {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE token[] = {{CKA_TOKEN, &yes, sizeof yes}};
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  CK_RV rv = CKR_OK;
  const std::string err = capture_stderr(
      [&] { rv = p->C_GenerateKeyPair(s, &gen, nullptr, 0, token, 1, &pub, &priv); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("generate_token_keys = refuse") != std::string::npos, err);
  CHECK(mock_stats().token_objects == 0);
  // Session keys are made as ever.
  CHECK(p->C_GenerateKeyPair(s, &gen, nullptr, 0, nullptr, 0, &pub, &priv) == CKR_OK);
}

}  // namespace p11mux::test

namespace p11mux::test {
namespace {

// The token objects labelled `label` on the mock's `slot`, seen directly.
CK_ULONG objects_on(CK_SLOT_ID slot, const std::string& label) {
  CK_FUNCTION_LIST* mock = mock_functions();
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE(mock->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s) == CKR_OK);
  CK_ATTRIBUTE templ[] = {{CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  REQUIRE(mock->C_FindObjectsInit(s, templ, 1) == CKR_OK);
  std::array<CK_OBJECT_HANDLE, 8> found{};
  CK_ULONG n = 0;
  REQUIRE(mock->C_FindObjects(s, found.data(), found.size(), &n) == CKR_OK);
  REQUIRE(mock->C_FindObjectsFinal(s) == CKR_OK);
  REQUIRE(mock->C_CloseSession(s) == CKR_OK);
  return n;
}

}  // namespace

TEST_CASE("group objects: a token object is made and destroyed on every member present") {
  const FaultyControl* faulty = faulty_control();
  GroupProxy proxy(faulty_group(), three_tokens(),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE a = proxy.open();
  const CK_OBJECT_HANDLE object = create_data(p, a, true, "replicated");
  CHECK(objects_on(2, "replicated") == 1);
  CHECK(objects_on(1, "replicated") == 1);
  CHECK(objects_on(0, "replicated") == 0);  // no member
  // Session objects stay in their session's member.
  create_data(p, a, false, "session only");
  CHECK(objects_on(1, "session only") == 0);
  // Destroyed from a session on the second member: gone from both.
  faulty->set_slot_removed(2, 1);
  const CK_SESSION_HANDLE b = proxy.open();
  faulty->clear_slot(2);
  CHECK(label_of(p, b, object) == "replicated");
  REQUIRE(p->C_DestroyObject(b, object) == CKR_OK);
  CHECK(objects_on(2, "replicated") == 0);
  CHECK(objects_on(1, "replicated") == 0);
  // A member whose token is absent is passed over, with a log line.
  faulty->set_slot_removed(1, 1);
  const CK_SESSION_HANDLE c = proxy.open();  // on the first member
  CK_OBJECT_HANDLE absent_one = CK_INVALID_HANDLE;
  const std::string err = capture_stderr([&] { absent_one = create_data(p, c, true, "partial"); });
  faulty->clear_slot(1);
  CHECK(objects_on(2, "partial") == 1);
  CHECK(objects_on(1, "partial") == 0);
  CHECK(absent_one != CK_INVALID_HANDLE);
}

TEST_CASE("group objects: a token object one member refuses is undone on the others") {
  MockConfig mock = three_tokens();
  // The second C_CreateObject: the copy on the second member.
  std::strncpy(mock.fail_function, "C_CreateObject", sizeof mock.fail_function - 1);
  mock.fail_rv = CKR_DEVICE_MEMORY;
  mock.fail_nth = 2;
  GroupProxy proxy(two_mock_members(), mock, {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  CK_OBJECT_CLASS cls = CKO_DATA;
  CK_BBOOL yes = CK_TRUE;
  std::string label = "undone";
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_TOKEN, &yes, sizeof yes},
                          {CKA_LABEL, label.data(), label.size()}};
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  CK_RV rv = CKR_OK;
  const std::string err = capture_stderr([&] { rv = p->C_CreateObject(s, templ, 3, &h); });
  CHECK(rv == CKR_DEVICE_MEMORY);
  CHECK_MESSAGE(err.find("destroyed again") != std::string::npos, err);
  CHECK(mock_stats().token_objects == 0);
}

}  // namespace p11mux::test

namespace p11mux::test {

// [pool] bind = state: an idle session holds no backend session, so a call
// that makes a token object gives its backend session back before the map
// reads the object (on a borrowed one then).
TEST_CASE("group objects: with [pool] bind = state, objects made, found and ended alike") {
  GroupProxy proxy(
      two_mock_members() + "balance = primary\n",  // a and b on one member: its session objects
      three_tokens(MOCK_BEND_REUSE_HANDLES), {{"P11MUX_POOL_BIND", "state"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE a = proxy.open();
  const CK_SESSION_HANDLE b = proxy.open();
  const CK_OBJECT_HANDLE token = create_data(p, a, true, "state token");
  CHECK(label_of(p, b, token) == "state token");
  const CK_OBJECT_HANDLE session = create_data(p, a, false, "state session");
  CHECK(label_of(p, b, session) == "state session");
  REQUIRE(p->C_CloseSession(a) == CKR_OK);
  CK_RV rv = CKR_OK;
  label_of(p, b, session, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  REQUIRE(p->C_DestroyObject(b, token) == CKR_OK);
  CHECK(mock_stats().token_objects == 0);
}

}  // namespace p11mux::test

// C_CopyObject and C_SetAttributeValue of token objects (docs/groups.md,
// "Objects": every member, or undone).
namespace p11mux::test {
namespace {

// The mock's token secret keys with CKA_ID `id` on `slot`, and their labels.
std::vector<std::string> keys_on(CK_SLOT_ID slot, const std::string& id) {
  CK_FUNCTION_LIST* mock = mock_functions();
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE(mock->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s) == CKR_OK);
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_ID, const_cast<char*>(id.data()), id.size()}};
  REQUIRE(mock->C_FindObjectsInit(s, templ, 2) == CKR_OK);
  std::array<CK_OBJECT_HANDLE, 8> found{};
  CK_ULONG n = 0;
  REQUIRE(mock->C_FindObjects(s, found.data(), found.size(), &n) == CKR_OK);
  REQUIRE(mock->C_FindObjectsFinal(s) == CKR_OK);
  std::vector<std::string> labels;
  for (CK_ULONG i = 0; i < n; ++i) labels.push_back(label_of(mock, s, found[i]));
  REQUIRE(mock->C_CloseSession(s) == CKR_OK);
  return labels;
}

// A token secret key with CKA_ID `id` and `label`, made through the group.
CK_OBJECT_HANDLE create_key(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, const std::string& id,
                            const std::string& label) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_GENERIC_SECRET;
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_KEY_TYPE, &type, sizeof type},
                          {CKA_TOKEN, &yes, sizeof yes},
                          {CKA_ID, const_cast<char*>(id.data()), id.size()},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(p->C_CreateObject(s, templ, 5, &h) == CKR_OK);
  return h;
}

CK_RV set_label(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object,
                const std::string& label) {
  CK_ATTRIBUTE a{CKA_LABEL, const_cast<char*>(label.data()), label.size()};
  return p->C_SetAttributeValue(s, object, &a, 1);
}

using Labels = std::vector<std::string>;

// Three tokens, the second call of `function` answering CKR_DEVICE_MEMORY:
// the call on the second member, after the session's member's.
MockConfig second_call_fails(const char* function) {
  MockConfig mock = three_tokens();
  std::strncpy(mock.fail_function, function, sizeof mock.fail_function - 1);
  mock.fail_rv = CKR_DEVICE_MEMORY;
  mock.fail_nth = 2;
  return mock;
}

}  // namespace

TEST_CASE("group objects: a token object copied is on every member, with its identity") {
  GroupProxy proxy(two_mock_members(), three_tokens(), {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  const CK_OBJECT_HANDLE key = create_key(p, s, "k1", "original");
  std::string id = "k2";
  std::string label = "copy";
  CK_ATTRIBUTE templ[] = {{CKA_ID, id.data(), id.size()}, {CKA_LABEL, label.data(), label.size()}};
  CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
  REQUIRE(p->C_CopyObject(s, key, templ, 2, &copy) == CKR_OK);
  CHECK(copy != key);
  CHECK(keys_on(2, "k2") == Labels{"copy"});
  CHECK(keys_on(1, "k2") == Labels{"copy"});
  CHECK(keys_on(0, "k2").empty());  // no member
  CHECK(keys_on(1, "k1") == Labels{"original"});
  CHECK(label_of(p, s, copy) == "copy");
  // The copy is one object of the group: destroyed everywhere.
  REQUIRE(p->C_DestroyObject(s, copy) == CKR_OK);
  CHECK(keys_on(2, "k2").empty());
  CHECK(keys_on(1, "k2").empty());

  // A copy with the original's identity would make two objects of it on
  // every member: refused, the copy destroyed again, logged.
  CK_RV rv = CKR_OK;
  std::string err = capture_stderr([&] { rv = p->C_CopyObject(s, key, nullptr, 0, &copy); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("the original's identity") != std::string::npos, err);
  CHECK(keys_on(2, "k1") == Labels{"original"});
  CHECK(keys_on(1, "k1") == Labels{"original"});
  CHECK(label_of(p, s, key) == "original");

  // A session object's token copy could be made on its member only.
  const CK_OBJECT_HANDLE session_object = create_data(p, s, false, "in the session");
  CK_BBOOL yes = CK_TRUE;
  std::string persisted = "persisted";
  CK_ATTRIBUTE to_token[] = {{CKA_TOKEN, &yes, sizeof yes},
                             {CKA_LABEL, persisted.data(), persisted.size()}};
  err = capture_stderr([&] { rv = p->C_CopyObject(s, session_object, to_token, 2, &copy); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("on one member only") != std::string::npos, err);
  CHECK(objects_on(2, "persisted") == 0);
  CHECK(objects_on(1, "persisted") == 0);
  CHECK(mock_stats().token_objects == 2);  // the key on each member

  // A session copy of a session object stays on its member.
  std::string session_copy = "session copy";
  CK_ATTRIBUTE relabel[] = {{CKA_LABEL, session_copy.data(), session_copy.size()}};
  REQUIRE(p->C_CopyObject(s, session_object, relabel, 1, &copy) == CKR_OK);
  CHECK(label_of(p, s, copy) == "session copy");
  CHECK(mock_stats().token_objects == 2);
}

TEST_CASE("group objects: a token object's copy one member refuses is undone on the others") {
  GroupProxy proxy(two_mock_members(), second_call_fails("C_CopyObject"),
                   {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  const CK_OBJECT_HANDLE key = create_key(p, s, "k1", "original");
  std::string id = "k2";
  CK_ATTRIBUTE templ[] = {{CKA_ID, id.data(), id.size()}};
  CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
  CK_RV rv = CKR_OK;
  const std::string err = capture_stderr([&] { rv = p->C_CopyObject(s, key, templ, 1, &copy); });
  CHECK(rv == CKR_DEVICE_MEMORY);
  CHECK_MESSAGE(err.find("destroyed again") != std::string::npos, err);
  CHECK(keys_on(2, "k2").empty());
  CHECK(keys_on(1, "k2").empty());
  CHECK(mock_stats().token_objects == 2);  // the original on each member
  CHECK(label_of(p, s, key) == "original");
}

TEST_CASE("group objects: a token object's attributes are changed on every member") {
  const FaultyControl* faulty = faulty_control();
  // primary: the sessions opened while the first member is there go to it.
  GroupProxy proxy(faulty_group("balance = primary\n"), three_tokens(),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  // A session on the second member (the first's token absent meanwhile;
  // removing it drops the sessions there, so before the others open).
  faulty->set_slot_removed(2, 1);
  const CK_SESSION_HANDLE b = proxy.open();
  faulty->clear_slot(2);
  const CK_SESSION_HANDLE a = proxy.open();  // on the first member
  const CK_OBJECT_HANDLE key = create_key(p, a, "k1", "before");
  REQUIRE(set_label(p, a, key, "after") == CKR_OK);
  CHECK(keys_on(2, "k1") == Labels{"after"});
  CHECK(keys_on(1, "k1") == Labels{"after"});
  // Seen so from the session on the second member.
  CHECK(label_of(p, b, key) == "after");
  // Changed from there: on the first member too.
  REQUIRE(set_label(p, b, key, "from b") == CKR_OK);
  CHECK(keys_on(2, "k1") == Labels{"from b"});
  CHECK(keys_on(1, "k1") == Labels{"from b"});
  CHECK(label_of(p, a, key) == "from b");

  // A session object is changed in its session, on its member only.
  const CK_OBJECT_HANDLE session_object = create_data(p, a, false, "session");
  REQUIRE(set_label(p, a, session_object, "session, changed") == CKR_OK);
  CHECK(label_of(p, a, session_object) == "session, changed");
  CHECK(mock_stats().session_objects == 1);
  CHECK(objects_on(1, "session, changed") == 0);

  // Bad input: the spec's codes, nothing changed.
  CHECK(p->C_SetAttributeValue(a, key, nullptr, 1) == CKR_ARGUMENTS_BAD);
  CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
  CHECK(p->C_CopyObject(a, key, nullptr, 1, &copy) == CKR_ARGUMENTS_BAD);
  const CK_OBJECT_HANDLE bogus = key + session_object + 4096;  // never issued
  CHECK(set_label(p, a, bogus, "none") == CKR_OBJECT_HANDLE_INVALID);
  CHECK(p->C_CopyObject(a, bogus, nullptr, 0, &copy) == CKR_OBJECT_HANDLE_INVALID);
  CHECK(keys_on(2, "k1") == Labels{"from b"});
  CHECK(keys_on(1, "k1") == Labels{"from b"});
  CHECK(mock_stats().token_objects == 2);
}

TEST_CASE("group objects: a token object's change one member refuses is undone on the others") {
  GroupProxy proxy(two_mock_members(), second_call_fails("C_SetAttributeValue"),
                   {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  const CK_OBJECT_HANDLE key = create_key(p, s, "k1", "old");
  CK_RV rv = CKR_OK;
  const std::string err = capture_stderr([&] { rv = set_label(p, s, key, "new"); });
  CHECK(rv == CKR_DEVICE_MEMORY);
  CHECK_MESSAGE(err.find("was undone") != std::string::npos, err);
  CHECK(keys_on(2, "k1") == Labels{"old"});
  CHECK(keys_on(1, "k1") == Labels{"old"});
  CHECK(label_of(p, s, key) == "old");
}

TEST_CASE("group objects: at a member's session limit, copies and changes use the call's session") {
  // One backend session per token: the session's member has none to lend.
  const FaultyControl* faulty = faulty_control();
  GroupProxy proxy(faulty_group(), three_tokens(),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                    {"P11MUX_FAULTY_MAX_SLOT_SESSIONS", "1"},
                    {"P11MUX_POOL_WAIT_MS", "200"}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE a = proxy.open();
  const CK_OBJECT_HANDLE key = create_key(p, a, "k1", "before");
  REQUIRE(set_label(p, a, key, "after") == CKR_OK);
  std::string id = "k2";
  CK_ATTRIBUTE templ[] = {{CKA_ID, id.data(), id.size()}};
  CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
  REQUIRE(p->C_CopyObject(a, key, templ, 1, &copy) == CKR_OK);
  CHECK(keys_on(2, "k2") == Labels{"after"});
  CHECK(keys_on(1, "k2") == Labels{"after"});
  CHECK(keys_on(1, "k1") == Labels{"after"});
}

TEST_CASE("group objects: generate_token_keys = primary makes token keys on the primary member") {
  const FaultyControl* faulty = faulty_control();
  GroupProxy proxy(faulty_group("balance = primary\ngenerate_token_keys = primary\n"),
                   three_tokens(),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "info"}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  // b on the second member (the first's token absent meanwhile), a on the
  // first, the primary.
  faulty->set_slot_removed(2, 1);
  const CK_SESSION_HANDLE b = proxy.open();
  faulty->clear_slot(2);
  const CK_SESSION_HANDLE a = proxy.open();
  CK_BBOOL yes = CK_TRUE;
  CK_ULONG length = 32;
  std::string id = "gen";
  std::string label = "generated";
  CK_ATTRIBUTE templ[] = {{CKA_TOKEN, &yes, sizeof yes},
                          {CKA_VALUE_LEN, &length, sizeof length},
                          {CKA_ID, id.data(), id.size()},
                          {CKA_LABEL, label.data(), label.size()}};
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  CK_RV rv = CKR_OK;
  std::string err = capture_stderr([&] { rv = p->C_GenerateKey(b, &gen, templ, 4, &key); });
  REQUIRE(rv == CKR_OK);
  CHECK_MESSAGE(err.find("generated on the primary member 0") != std::string::npos, err);
  CHECK(keys_on(2, "gen") == Labels{"generated"});
  CHECK(keys_on(1, "gen").empty());
  // Usable on the primary only.
  CHECK(label_of(p, a, key) == "generated");
  label_of(p, b, key, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  // A pair: both halves token keys from b; a session half only from a.
  CK_MECHANISM pair{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_ATTRIBUTE token[] = {{CKA_TOKEN, &yes, sizeof yes}};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  const unsigned long tokens = mock_stats().token_objects;
  REQUIRE(p->C_GenerateKeyPair(b, &pair, token, 1, token, 1, &pub, &priv) == CKR_OK);
  CHECK(mock_stats().token_objects == tokens + 2);
  CK_ULONG size = 0;
  CHECK(p->C_GetObjectSize(a, priv, &size) == CKR_OK);
  CHECK(p->C_GetObjectSize(b, priv, &size) == CKR_OBJECT_HANDLE_INVALID);
  err = capture_stderr(
      [&] { rv = p->C_GenerateKeyPair(b, &pair, nullptr, 0, token, 1, &pub, &priv); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("out of its reach") != std::string::npos, err);
  CHECK(mock_stats().token_objects == tokens + 2);
  REQUIRE(p->C_GenerateKeyPair(a, &pair, nullptr, 0, token, 1, &pub, &priv) == CKR_OK);
  CHECK(p->C_GetObjectSize(a, pub, &size) == CKR_OK);
  CHECK(mock_stats().token_objects == tokens + 3);
  // Session keys are made on the session's member, as ever.
  CK_OBJECT_HANDLE session_key = CK_INVALID_HANDLE;
  REQUIRE(p->C_GenerateKey(b, &gen, templ + 1, 1, &session_key) == CKR_OK);
  CHECK(p->C_GetObjectSize(b, session_key, &size) == CKR_OK);
}

}  // namespace p11mux::test

// Identity changes, identities taken, and members that missed changes
// (docs/groups.md, "Objects").
namespace p11mux::test {
namespace {

CK_RV set_id(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object,
             const std::string& id) {
  CK_ATTRIBUTE a{CKA_ID, const_cast<char*>(id.data()), id.size()};
  return p->C_SetAttributeValue(s, object, &a, 1);
}

// The group's handles a search by CKA_ID `id` finds on session `s`.
std::vector<CK_OBJECT_HANDLE> find_id(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s,
                                      const std::string& id) {
  CK_ATTRIBUTE templ[] = {{CKA_ID, const_cast<char*>(id.data()), id.size()}};
  REQUIRE(p->C_FindObjectsInit(s, templ, 1) == CKR_OK);
  std::array<CK_OBJECT_HANDLE, 8> found{};
  CK_ULONG n = 0;
  REQUIRE(p->C_FindObjects(s, found.data(), found.size(), &n) == CKR_OK);
  REQUIRE(p->C_FindObjectsFinal(s) == CKR_OK);
  return {found.begin(), found.begin() + n};
}

CK_RV try_create_key(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, const std::string& id,
                     const std::string& label) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_GENERIC_SECRET;
  CK_BBOOL yes = CK_TRUE;
  std::string value = "a secret value of 32 bytes......";
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_KEY_TYPE, &type, sizeof type},
                          {CKA_TOKEN, &yes, sizeof yes},
                          {CKA_ID, const_cast<char*>(id.data()), id.size()},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
                          {CKA_VALUE, value.data(), value.size()}};
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  return p->C_CreateObject(s, templ, 6, &h);
}

}  // namespace

TEST_CASE("group objects: an identity changed, the handle follows it on every member") {
  const FaultyControl* faulty = faulty_control();
  GroupProxy proxy(faulty_group("balance = primary\n"), three_tokens(),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  faulty->set_slot_removed(2, 1);
  const CK_SESSION_HANDLE b = proxy.open();  // on the second member
  faulty->clear_slot(2);
  const CK_SESSION_HANDLE a = proxy.open();  // on the first
  const CK_OBJECT_HANDLE key = create_key(p, a, "k1", "renamed");
  REQUIRE(set_id(p, a, key, "k9") == CKR_OK);
  CHECK(keys_on(2, "k9") == Labels{"renamed"});
  CHECK(keys_on(1, "k9") == Labels{"renamed"});
  // Found by its new identity on the other member: the same handle.
  CHECK(find_id(p, b, "k9") == std::vector<CK_OBJECT_HANDLE>{key});
  CHECK(find_id(p, a, "k9") == std::vector<CK_OBJECT_HANDLE>{key});
  CHECK(find_id(p, b, "k1").empty());
  CHECK(label_of(p, b, key) == "renamed");
  // The old identity names nothing now: a new object with it is another handle.
  const CK_OBJECT_HANDLE again = create_key(p, a, "k1", "new k1");
  CHECK(again != key);
  CHECK(label_of(p, b, again) == "new k1");
  CHECK(label_of(p, b, key) == "renamed");
  // A data object is known by its label: relabelled, the handle follows.
  const CK_OBJECT_HANDLE data = create_data(p, a, true, "data before");
  REQUIRE(set_label(p, b, data, "data after") == CKR_OK);
  CHECK(objects_on(2, "data after") == 1);
  CHECK(objects_on(1, "data after") == 1);
  CHECK(label_of(p, a, data) == "data after");
  REQUIRE(p->C_DestroyObject(a, data) == CKR_OK);
  CHECK(objects_on(2, "data after") == 0);
  CHECK(objects_on(1, "data after") == 0);
}

TEST_CASE("group objects: a token object whose identity is taken is refused, logged") {
  GroupProxy proxy(two_mock_members(), three_tokens(), {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  const CK_OBJECT_HANDLE first = create_key(p, s, "k1", "first");
  CK_RV rv = CKR_OK;
  std::string err = capture_stderr([&] { rv = try_create_key(p, s, "k1", "second"); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("another token object has its identity") != std::string::npos, err);
  CHECK(keys_on(2, "k1") == Labels{"first"});
  CHECK(keys_on(1, "k1") == Labels{"first"});
  CHECK(label_of(p, s, first) == "first");
  // An identity change onto a taken identity: refused, undone on every member.
  const CK_OBJECT_HANDLE second = create_key(p, s, "k2", "second");
  err = capture_stderr([&] { rv = set_id(p, s, second, "k1"); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("another token object has the new identity") != std::string::npos, err);
  CHECK(keys_on(2, "k2") == Labels{"second"});
  CHECK(keys_on(1, "k2") == Labels{"second"});
  CHECK(label_of(p, s, second) == "second");
}

TEST_CASE("group objects: a token object taken on one member only is refused everywhere") {
  GroupProxy proxy(two_mock_members(), three_tokens(), {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  provision(1, "stray");  // CKA_ID "k1" on the second member only
  CK_RV rv = CKR_OK;
  const std::string err = capture_stderr([&] { rv = try_create_key(p, s, "k1", "made"); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("holds another token object of its identity") != std::string::npos, err);
  CHECK(keys_on(2, "k1").empty());
  CHECK(keys_on(1, "k1") == Labels{"stray"});
}

TEST_CASE("group objects: a member down during changes is given them when it returns") {
  FaultyGroup g("",
                {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open(true);  // member 0 (the mock's slot 2)
  const CK_OBJECT_HANDLE doomed = create_key(p, a, "doomed", "doomed");
  const CK_OBJECT_HANDLE changed = create_key(p, a, "changed", "old label");
  const CK_OBJECT_HANDLE renamed = create_data(p, a, true, "renamed before");
  REQUIRE(keys_on(1, "doomed") == Labels{"doomed"});
  // Member 1 (slot 1) fails; the changes meanwhile are kept for it.
  g.faulty->fail_slot(1, CKR_DEVICE_ERROR);
  std::string err = capture_stderr([&] {
    CHECK(try_create_key(p, a, "made", "made while down") == CKR_OK);
    CHECK(p->C_DestroyObject(a, doomed) == CKR_OK);
    CHECK(set_label(p, a, changed, "new label") == CKR_OK);
    CHECK(set_label(p, a, renamed, "renamed after") == CKR_OK);
    CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
    std::string id = "copied";
    CK_ATTRIBUTE templ[] = {{CKA_ID, id.data(), id.size()}};
    CHECK(p->C_CopyObject(a, changed, templ, 1, &copy) == CKR_OK);
  });
  CHECK_MESSAGE(err.find("kept for its return") != std::string::npos, err);
  // Behind p11mux's back: member 1 still has what it had.
  CHECK(keys_on(1, "doomed") == Labels{"doomed"});
  CHECK(keys_on(1, "made").empty());
  CHECK(keys_on(2, "made") == Labels{"made while down"});
  g.faulty->clear_slot(1);
  // Its next probe: the changes are made there, in order, before it is admitted.
  CHECK(eventually([] { return keys_on(1, "copied").size() == 1; }));
  CHECK(keys_on(1, "made") == Labels{"made while down"});
  CHECK(keys_on(1, "doomed").empty());
  CHECK(keys_on(1, "changed") == Labels{"new label"});
  CHECK(keys_on(1, "copied") == Labels{"new label"});
  CHECK(objects_on(1, "renamed after") == 1);
  CHECK(objects_on(1, "renamed before") == 0);
  // The same objects on both members, and the secret key's value with them.
  for (const char* id : {"made", "doomed", "changed", "copied"}) {
    CAPTURE(id);
    CHECK(keys_on(1, id) == keys_on(2, id));
  }
  CHECK(mock_stats().token_objects == 2 * 4);  // made, changed, copied, renamed on each
  // Admitted (just after): a change is made on it directly again.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  create_data(p, a, true, "after");
  CHECK(objects_on(1, "after") == 1);
}

TEST_CASE("group objects: a missed change that fails on the returning member keeps it down") {
  FaultyGroup g("",
                {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open(true);  // member 0
  g.faulty->fail_slot(1, CKR_DEVICE_ERROR);
  (void)capture_stderr([&] { CHECK(try_create_key(p, a, "k1", "made while down") == CKR_OK); });
  // Meanwhile an object of that identity appears on member 1 (out of band):
  // which one would be the group's cannot be told.
  provision(1, "out of band");
  g.faulty->clear_slot(1);
  const std::string err =
      capture_stderr([] { std::this_thread::sleep_for(std::chrono::seconds(3)); });
  CHECK_MESSAGE(err.find("member 1 stays out of the group") != std::string::npos, err);
  CHECK_MESSAGE(err.find("bring the token up to date") != std::string::npos, err);
  CHECK(keys_on(1, "k1") == Labels{"out of band"});
  // Down: every session runs on member 0 (member 1's slot answers a code
  // that would show a session there).
  std::vector<CK_SESSION_HANDLE> sessions;
  for (int i = 0; i < 4; ++i) sessions.push_back(g.open());
  g.faulty->fail_slot(1, CKR_FUNCTION_FAILED);
  for (CK_SESSION_HANDLE s : sessions) CHECK(g.random(s) == CKR_OK);
  g.faulty->clear_slot(1);
}

}  // namespace p11mux::test

namespace p11mux::test {

TEST_CASE("group objects: C_Finalize drops the changes a member did not get, and says so") {
  FaultyGroup g("",
                {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open(true);  // member 0
  g.faulty->set_slot_removed(1, 1);          // member 1 stays away until the end
  (void)capture_stderr([&] { create_data(p, a, true, "never on member 1"); });
  const std::string err = capture_stderr([&] { CHECK(p->C_Finalize(nullptr) == CKR_OK); });
  g.proxy.finalized();
  g.faulty->clear_slot(1);
  CHECK_MESSAGE(err.find("member 1 did not get 1 change(s) to token objects") != std::string::npos,
                err);
}

}  // namespace p11mux::test

// Token keys made by C_GenerateKey(Pair), C_UnwrapKey and C_DeriveKey: on one
// member only, and refused when another token object has their identity
// (docs/groups.md, "Objects").
namespace p11mux::test {
namespace {

// A token secret key's template: CKA_TOKEN true, `id` and `label`.
class TokenKey {
 public:
  TokenKey(std::string id, std::string label) : id_(std::move(id)), label_(std::move(label)) {}
  TokenKey(const TokenKey&) = delete;  // attrs_ points into it
  TokenKey& operator=(const TokenKey&) = delete;
  CK_ATTRIBUTE* attrs() { return attrs_.data(); }
  CK_ULONG count() const { return attrs_.size(); }

 private:
  CK_BBOOL yes_ = CK_TRUE;
  std::string id_;
  std::string label_;
  std::array<CK_ATTRIBUTE, 3> attrs_{{{CKA_TOKEN, &yes_, sizeof yes_},
                                      {CKA_ID, id_.data(), id_.size()},
                                      {CKA_LABEL, label_.data(), label_.size()}}};
};

// A session secret key on `s`'s member: the unwrapping or base key.
CK_OBJECT_HANDLE session_key(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s) {
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  REQUIRE(p->C_GenerateKey(s, &gen, nullptr, 0, &key) == CKR_OK);
  return key;
}

CK_RV unwrap_token_key(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE kek,
                       const std::string& id, const std::string& label, CK_OBJECT_HANDLE& out) {
  TokenKey t(id, label);
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
  std::array<CK_BYTE, 32> wrapped{};
  return p->C_UnwrapKey(s, &wrap, kek, wrapped.data(), wrapped.size(), t.attrs(), t.count(), &out);
}

CK_RV derive_token_key(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE base,
                       const std::string& id, const std::string& label, CK_OBJECT_HANDLE& out) {
  TokenKey t(id, label);
  CK_MECHANISM derive{CKM_SHA256_KEY_DERIVATION, nullptr, 0};
  return p->C_DeriveKey(s, &derive, base, t.attrs(), t.count(), &out);
}

CK_RV generate_token_key(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, const std::string& id,
                         const std::string& label, CK_OBJECT_HANDLE& out) {
  TokenKey t(id, label);
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  return p->C_GenerateKey(s, &gen, t.attrs(), t.count(), &out);
}

using MakeKey = CK_RV (*)(CK_FUNCTION_LIST*, CK_SESSION_HANDLE, CK_OBJECT_HANDLE,
                          const std::string&, const std::string&, CK_OBJECT_HANDLE&);

// The faulty module's group with balance = primary and `extra`, warnings
// logged: session `b` on member 1 (the mock's slot 1; the first member's
// token absent meanwhile), then `a` on member 0 (slot 2).
struct SessionsOnBoth {
  explicit SessionsOnBoth(const std::string& extra)
      : faulty(faulty_control()),
        proxy(faulty_group("balance = primary\n" + extra), three_tokens(),
              {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "warn"}}) {
    REQUIRE(faulty->reset() == 0);
    REQUIRE(proxy.initialize() == CKR_OK);
    faulty->set_slot_removed(2, 1);
    b = proxy.open();
    faulty->clear_slot(2);
    a = proxy.open();
  }
  const FaultyControl* faulty;
  GroupProxy proxy;
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE b = CK_INVALID_HANDLE;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
};

}  // namespace

TEST_CASE("group objects: a token key unwrapped or derived with a taken identity is refused") {
  GroupProxy proxy(two_mock_members() + "balance = primary\n", three_tokens(),
                   {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();  // on member 0 (the mock's slot 2)
  const CK_OBJECT_HANDLE first = create_key(p, s, "k1", "first");
  const CK_OBJECT_HANDLE base = session_key(p, s);
  const unsigned long tokens = mock_stats().token_objects;
  for (auto [name, make] : {std::pair<const char*, MakeKey>{"C_UnwrapKey", unwrap_token_key},
                            std::pair<const char*, MakeKey>{"C_DeriveKey", derive_token_key}}) {
    CAPTURE(name);
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    CK_RV rv = CKR_OK;
    const std::string err = capture_stderr([&] { rv = make(p, s, base, "k1", "second", key); });
    // Accepted, the key would be `first`'s handle, and member 0 would hold
    // two objects of one identity: `first` ambiguous there.
    CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
    CHECK_MESSAGE(err.find(std::string(name) + " on group 'signing' refused") != std::string::npos,
                  err);
    CHECK_MESSAGE(err.find("another token object has its identity") != std::string::npos, err);
    CHECK(mock_stats().token_objects == tokens);  // destroyed again
    CHECK(keys_on(2, "k1") == Labels{"first"});
    CHECK(label_of(p, s, first) == "first");
    CHECK(find_id(p, s, "k1") == std::vector<CK_OBJECT_HANDLE>{first});
  }
}

TEST_CASE("group objects: a token key unwrapped or derived is on its session's member only") {
  SessionsOnBoth g("");
  CK_FUNCTION_LIST* p = g.p;
  const CK_SESSION_HANDLE a = g.a;
  const CK_SESSION_HANDLE b = g.b;
  // Made where the session runs, usable there only (not replicated).
  CK_OBJECT_HANDLE derived = CK_INVALID_HANDLE;
  REQUIRE(derive_token_key(p, a, session_key(p, a), "d1", "derived", derived) == CKR_OK);
  CHECK(keys_on(2, "d1") == Labels{"derived"});
  CHECK(keys_on(1, "d1").empty());
  CHECK(label_of(p, a, derived) == "derived");
  CK_RV rv = CKR_OK;
  label_of(p, b, derived, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  // The same identity made on the other member: two keys under one handle
  // (`derived` on member 0, this one on member 1). Refused.
  CK_OBJECT_HANDLE unwrapped = CK_INVALID_HANDLE;
  const CK_OBJECT_HANDLE kek = session_key(p, b);
  std::string err =
      capture_stderr([&] { rv = unwrap_token_key(p, b, kek, "d1", "unwrapped", unwrapped); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK_MESSAGE(err.find("member 0 holds a token object of its identity") != std::string::npos,
                err);
  CHECK(keys_on(1, "d1").empty());
  label_of(p, b, derived, &rv);
  CHECK(rv == CKR_OBJECT_HANDLE_INVALID);
  // So with an object the group never saw (provisioned on member 0 only).
  provision(2, "stray");  // CKA_ID "k1"
  err = capture_stderr(
      [&] { rv = derive_token_key(p, b, session_key(p, b), "k1", "derived", derived); });
  CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK(keys_on(1, "k1").empty());
  // A free identity: made on member 1 only.
  REQUIRE(unwrap_token_key(p, b, kek, "u1", "unwrapped", unwrapped) == CKR_OK);
  CHECK(keys_on(1, "u1") == Labels{"unwrapped"});
  CHECK(keys_on(2, "u1").empty());
  CHECK(label_of(p, b, unwrapped) == "unwrapped");
}

TEST_CASE("group objects: a token key generated on the primary with a taken identity is refused") {
  SessionsOnBoth g("generate_token_keys = primary\n");
  CK_FUNCTION_LIST* p = g.p;
  const CK_SESSION_HANDLE a = g.a;  // on member 0, the primary
  const CK_SESSION_HANDLE b = g.b;
  const CK_OBJECT_HANDLE first = create_key(p, a, "k1", "first");
  const unsigned long tokens = mock_stats().token_objects;
  // From the primary's own session, and from another member's (made on a
  // session borrowed from the primary).
  for (CK_SESSION_HANDLE s : {a, b}) {
    CAPTURE(s);
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    CK_RV rv = CKR_OK;
    const std::string err = capture_stderr([&] { rv = generate_token_key(p, s, "k1", "k", key); });
    CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
    CHECK_MESSAGE(err.find("C_GenerateKey on group 'signing' refused") != std::string::npos, err);
    CHECK(mock_stats().token_objects == tokens);
    CHECK(keys_on(2, "k1") == Labels{"first"});
    CHECK(label_of(p, a, first) == "first");
    CHECK(label_of(p, b, first) == "first");
  }
  // A pair whose private half's identity is taken: both halves destroyed.
  CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
  CK_KEY_TYPE type = CKK_EC;
  CK_BBOOL yes = CK_TRUE;
  std::string id = "pair";
  CK_ATTRIBUTE held[] = {{CKA_CLASS, &cls, sizeof cls},
                         {CKA_KEY_TYPE, &type, sizeof type},
                         {CKA_TOKEN, &yes, sizeof yes},
                         {CKA_ID, id.data(), id.size()}};
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  REQUIRE(p->C_CreateObject(a, held, 4, &private_key) == CKR_OK);
  const unsigned long before_pair = mock_stats().token_objects;
  CK_ATTRIBUTE half[] = {{CKA_TOKEN, &yes, sizeof yes}, {CKA_ID, id.data(), id.size()}};
  CK_MECHANISM pair{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  for (CK_SESSION_HANDLE s : {a, b}) {
    CAPTURE(s);
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
    CK_RV rv = CKR_OK;
    const std::string err =
        capture_stderr([&] { rv = p->C_GenerateKeyPair(s, &pair, half, 2, half, 2, &pub, &priv); });
    CHECK(rv == CKR_ATTRIBUTE_VALUE_INVALID);
    CHECK_MESSAGE(err.find("C_GenerateKeyPair on group 'signing' refused") != std::string::npos,
                  err);
    CHECK(mock_stats().token_objects == before_pair);
    CK_ULONG size = 0;
    CHECK(p->C_GetObjectSize(a, private_key, &size) == CKR_OK);
  }
}

}  // namespace p11mux::test
