// The [policy] rules through the real module over the mock: each refusal
// happens before the backend (the mock's own call counters stay at 0), the
// allowed calls still work, the mechanism list is filtered consistently, and
// every refusal is logged at warn and counted in p11mux_policy_denied_total.
#include "harness.hpp"

#include "unit/observe_test_support.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace p11mux::test {
namespace {

std::string temp_path(const std::string& name) { return unique_temp_path("policy", name); }

unsigned long calls(const char* function) { return libs().mock->calls(function); }

// p11mux's 3.0 function list (the mock offers 3.0 with provide_v3).
CK_FUNCTION_LIST_3_0* list_3_0() {
  void* lib = ::dlopen(P11MUX_TEST_LIBRARY_PATH, RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(lib != nullptr);
  auto get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(lib, "C_GetInterface"));
  REQUIRE(static_cast<bool>(get_interface));
  CK_VERSION v30{3, 0};
  CK_INTERFACE_PTR iface = nullptr;
  CK_UTF8CHAR name[] = "PKCS 11";
  REQUIRE(get_interface(name, &v30, &iface, 0) == CKR_OK);
  return static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
}

MockConfig with_v3() {
  MockConfig c{};
  c.provide_v3 = 1;
  return c;
}

std::vector<CK_MECHANISM_TYPE> mechanism_list(CK_FUNCTION_LIST* p) {
  CK_ULONG n = 0;
  REQUIRE(p->C_GetMechanismList(0, nullptr, &n) == CKR_OK);
  std::vector<CK_MECHANISM_TYPE> list(n);
  REQUIRE(p->C_GetMechanismList(0, list.data(), &n) == CKR_OK);
  CHECK(n == list.size());  // the count query and the filled call agree
  list.resize(n);
  return list;
}

bool has(const std::vector<CK_MECHANISM_TYPE>& list, CK_MECHANISM_TYPE m) {
  return std::find(list.begin(), list.end(), m) != list.end();
}

}  // namespace

TEST_CASE("policy: a denied mechanism is left out of C_GetMechanismList, both calls agree") {
  std::vector<CK_MECHANISM_TYPE> all;
  {
    Proxy proxy;
    all = mechanism_list(proxy.p11);
  }
  REQUIRE(all.size() == 5);
  REQUIRE(has(all, CKM_ECDSA));
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_MECHANISMS_DENY", "CKM_ECDSA, CKM_AES_ECB"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  const std::vector<CK_MECHANISM_TYPE> kept = mechanism_list(p);
  CHECK(kept.size() == 3);
  CHECK_FALSE(has(kept, CKM_ECDSA));
  CHECK_FALSE(has(kept, CKM_AES_ECB));
  CHECK(has(kept, CKM_SHA256));
  // A buffer for the kept ones but one: CKR_BUFFER_TOO_SMALL and the count needed.
  std::vector<CK_MECHANISM_TYPE> small(kept.size() - 1, 0xdeadUL);
  CK_ULONG n = small.size();
  CHECK(p->C_GetMechanismList(0, small.data(), &n) == CKR_BUFFER_TOO_SMALL);
  CHECK(n == kept.size());
  // Exactly big enough, though smaller than the backend's whole list.
  std::vector<CK_MECHANISM_TYPE> exact(kept.size());
  n = exact.size();
  CHECK(p->C_GetMechanismList(0, exact.data(), &n) == CKR_OK);
  CHECK(n == kept.size());
  CHECK(exact == kept);
  // Errors are the backend's, as without a policy.
  CHECK(p->C_GetMechanismList(99, nullptr, &n) == CKR_SLOT_ID_INVALID);
  CHECK(p->C_GetMechanismList(0, nullptr, nullptr) == CKR_ARGUMENTS_BAD);
}

TEST_CASE("policy: mechanisms_allow keeps only the listed ones, less mechanisms_deny") {
  Proxy proxy({}, nullptr,
              {{"P11MUX_POLICY_MECHANISMS_ALLOW", "CKM_SHA256 CKM_ECDSA CKM_EC_KEY_PAIR_GEN"},
               {"P11MUX_POLICY_MECHANISMS_DENY", "CKM_ECDSA"}});
  const std::vector<CK_MECHANISM_TYPE> kept = mechanism_list(proxy.p11);
  CHECK(kept == std::vector<CK_MECHANISM_TYPE>{CKM_SHA256, CKM_EC_KEY_PAIR_GEN});
  CK_MECHANISM_INFO info{};
  CHECK(proxy.p11->C_GetMechanismInfo(0, CKM_AES_ECB, &info) == CKR_MECHANISM_INVALID);
  CHECK(proxy.p11->C_GetMechanismInfo(0, CKM_ECDSA, &info) == CKR_MECHANISM_INVALID);
  CHECK(calls("C_GetMechanismInfo") == 0);
  CHECK(proxy.p11->C_GetMechanismInfo(0, CKM_SHA256, &info) == CKR_OK);
  CHECK(calls("C_GetMechanismInfo") == 1);
}

TEST_CASE("policy: every call with a denied mechanism is refused before the backend") {
  Proxy proxy(with_v3(), nullptr, {{"P11MUX_POLICY_MECHANISMS_DENY", "CKM_ECDSA"}});
  CK_FUNCTION_LIST_3_0* p = list_3_0();
  CK_SESSION_HANDLE h = proxy.open();
  CK_MECHANISM bad{CKM_ECDSA, nullptr, 0};
  CK_OBJECT_HANDLE key = 1, out = 0, out2 = 0;
  CK_ULONG len = 0;
  CK_BYTE blob[8] = {};
  CHECK(p->C_EncryptInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_DecryptInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_DigestInit(h, &bad) == CKR_MECHANISM_INVALID);
  CHECK(p->C_SignInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_SignRecoverInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_VerifyInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_VerifyRecoverInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_GenerateKey(h, &bad, nullptr, 0, &out) == CKR_MECHANISM_INVALID);
  CHECK(p->C_GenerateKeyPair(h, &bad, nullptr, 0, nullptr, 0, &out, &out2) ==
        CKR_MECHANISM_INVALID);
  CHECK(p->C_WrapKey(h, &bad, key, key, nullptr, &len) == CKR_MECHANISM_INVALID);
  CHECK(p->C_UnwrapKey(h, &bad, key, blob, sizeof blob, nullptr, 0, &out) == CKR_MECHANISM_INVALID);
  CHECK(p->C_DeriveKey(h, &bad, key, nullptr, 0, &out) == CKR_MECHANISM_INVALID);
  CHECK(p->C_MessageEncryptInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_MessageDecryptInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_MessageSignInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  CHECK(p->C_MessageVerifyInit(h, &bad, key) == CKR_MECHANISM_INVALID);
  for (const char* f :
       {"C_EncryptInit", "C_DecryptInit", "C_DigestInit", "C_SignInit", "C_SignRecoverInit",
        "C_VerifyInit", "C_VerifyRecoverInit", "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey",
        "C_UnwrapKey", "C_DeriveKey", "C_MessageEncryptInit", "C_MessageDecryptInit",
        "C_MessageSignInit", "C_MessageVerifyInit"}) {
    CAPTURE(f);
    CHECK(calls(f) == 0);
  }
  // Allowed mechanisms work end to end: a key pair, then a digest.
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CHECK(p->C_GenerateKeyPair(h, &gen, nullptr, 0, nullptr, 0, &out, &out2) == CKR_OK);
  CK_MECHANISM digest = sha256();
  REQUIRE(p->C_DigestInit(h, &digest) == CKR_OK);
  CK_BYTE data[] = "abc", result[MOCK_DIGEST_LEN];
  len = sizeof result;
  CHECK(p->C_Digest(h, data, 3, result, &len) == CKR_OK);
  // v3.0's NULL mechanism cancels an operation: not a mechanism to refuse.
  CHECK(p->C_SignInit(h, nullptr, key) == CKR_OK);
  CHECK(calls("C_SignInit") == 1);
}

TEST_CASE("policy: functions_deny refuses the named functions before the backend") {
  Proxy proxy({}, nullptr,
              {{"P11MUX_POLICY_FUNCTIONS_DENY",
                "C_InitToken, C_InitPIN, C_DestroyObject, C_GenerateRandom, C_WaitForSlotEvent"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  CK_UTF8CHAR so_pin[] = MOCK_SO_PIN, label[32] = {};
  CHECK(p->C_InitToken(0, so_pin, 4, label) == CKR_FUNCTION_NOT_SUPPORTED);
  CK_UTF8CHAR pin[] = "5678";
  CHECK(p->C_InitPIN(h, pin, 4) == CKR_FUNCTION_NOT_SUPPORTED);
  CK_OBJECT_HANDLE object = 0;
  REQUIRE(proxy.create_data_object(h, false, object) == CKR_OK);
  CHECK(p->C_DestroyObject(h, object) == CKR_ACTION_PROHIBITED);  // the spec's code for it
  CK_BYTE buf[16];
  CHECK(p->C_GenerateRandom(h, buf, sizeof buf) == CKR_FUNCTION_NOT_SUPPORTED);
  CK_SLOT_ID slot = 0;
  CHECK(p->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(p->C_WaitForSlotEvent(0, &slot, nullptr) == CKR_FUNCTION_NOT_SUPPORTED);
  for (const char* f :
       {"C_InitToken", "C_InitPIN", "C_DestroyObject", "C_GenerateRandom", "C_WaitForSlotEvent"}) {
    CAPTURE(f);
    CHECK(calls(f) == 0);
  }
  // The others still work.
  CHECK(p->C_SeedRandom(h, buf, sizeof buf) == CKR_OK);
  CK_SESSION_INFO info;
  CHECK(p->C_GetSessionInfo(h, &info) == CKR_OK);
  CHECK(calls("C_CreateObject") == 1);
}

TEST_CASE("policy: read_only refuses read-write sessions and every change, reads still work") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_READ_ONLY", "true"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  const unsigned long opened = mock_stats().sessions_opened_total;
  CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
        CKR_TOKEN_WRITE_PROTECTED);
  CHECK(mock_stats().sessions_opened_total == opened);
  h = proxy.open(0, CKF_SERIAL_SESSION);
  CK_TOKEN_INFO token{};
  REQUIRE(p->C_GetTokenInfo(0, &token) == CKR_OK);
  CHECK((token.flags & CKF_WRITE_PROTECTED) != 0);
  CHECK((token.flags & CKF_TOKEN_INITIALIZED) != 0);  // the backend's flags are kept

  CK_OBJECT_HANDLE out = 0, out2 = 0, key = 1;
  CK_MECHANISM m{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_BYTE blob[8] = {};
  CK_UTF8CHAR pin[] = MOCK_USER_PIN, so_pin[] = MOCK_SO_PIN, label[32] = {};
  CHECK(proxy.create_data_object(h, false, out) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_CopyObject(h, key, nullptr, 0, &out) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_DestroyObject(h, key) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_SetAttributeValue(h, key, nullptr, 0) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_GenerateKey(h, &m, nullptr, 0, &out) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_GenerateKeyPair(h, &m, nullptr, 0, nullptr, 0, &out, &out2) ==
        CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_UnwrapKey(h, &m, key, blob, sizeof blob, nullptr, 0, &out) ==
        CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_DeriveKey(h, &m, key, nullptr, 0, &out) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_InitToken(0, so_pin, 4, label) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_InitPIN(h, pin, 4) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(p->C_SetPIN(h, pin, 4, pin, 4) == CKR_TOKEN_WRITE_PROTECTED);
  for (const char* f : {"C_CreateObject", "C_CopyObject", "C_DestroyObject", "C_SetAttributeValue",
                        "C_GenerateKey", "C_GenerateKeyPair", "C_UnwrapKey", "C_DeriveKey",
                        "C_InitToken", "C_InitPIN", "C_SetPIN"}) {
    CAPTURE(f);
    CHECK(calls(f) == 0);
  }
  // Logging in, reading and using keys go on.
  REQUIRE(p->C_Login(h, CKU_USER, pin, 4) == CKR_OK);
  CK_MECHANISM digest = sha256();
  REQUIRE(p->C_DigestInit(h, &digest) == CKR_OK);
  CK_BYTE data[] = "abc", result[MOCK_DIGEST_LEN];
  CK_ULONG len = sizeof result;
  CHECK(p->C_Digest(h, data, 3, result, &len) == CKR_OK);
  CK_BYTE buf[16];
  CHECK(p->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
}

TEST_CASE("policy: without read_only the token info is the backend's") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_MECHANISMS_DENY", "CKM_MD5"}});
  CK_TOKEN_INFO token{};
  REQUIRE(proxy.p11->C_GetTokenInfo(0, &token) == CKR_OK);
  CHECK((token.flags & CKF_WRITE_PROTECTED) == 0);
  CK_SESSION_HANDLE h = proxy.open();  // read-write
  CHECK(h != CK_INVALID_HANDLE);
}

TEST_CASE("policy: each refusal is logged at warn with the function and the rule, no secret") {
  const std::string log = temp_path("audit.log");
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_POLICY_MECHANISMS_DENY", "CKM_ECDSA 0x80001234"},
                 {"P11MUX_POLICY_FUNCTIONS_DENY", "C_InitPIN"},
                 {"P11MUX_LOG_LEVEL", "warn"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_FUNCTION_LIST* p = proxy.p11;
    CK_SESSION_HANDLE h = proxy.open();
    CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0}, vendor{0x80001234UL, nullptr, 0};
    CHECK(p->C_SignInit(h, &ecdsa, 1) == CKR_MECHANISM_INVALID);
    CHECK(p->C_EncryptInit(h, &vendor, 1) == CKR_MECHANISM_INVALID);
    CK_UTF8CHAR secret[] = "S3cr3tPin";
    CHECK(p->C_InitPIN(h, secret, 9) == CKR_FUNCTION_NOT_SUPPORTED);
  }
  const std::string text = slurp(log);
  ::unlink(log.c_str());
  INFO(text);
  CHECK(text.find("warning: policy refused C_SignInit: rule mechanism (CKM_ECDSA): "
                  "CKR_MECHANISM_INVALID") != std::string::npos);
  CHECK(text.find("warning: policy refused C_EncryptInit: rule mechanism (0x80001234): "
                  "CKR_MECHANISM_INVALID") != std::string::npos);
  CHECK(text.find("warning: policy refused C_InitPIN: rule function: "
                  "CKR_FUNCTION_NOT_SUPPORTED") != std::string::npos);
  CHECK(text.find("S3cr3tPin") == std::string::npos);
}

TEST_CASE("policy: refusals are counted by rule at /metrics, with tracing on as well") {
  const std::string sock = temp_path("metrics.sock");
  Proxy proxy({}, nullptr,
              {{"P11MUX_POLICY_MECHANISMS_DENY", "CKM_ECDSA"},
               {"P11MUX_POLICY_READ_ONLY", "true"},
               {"P11MUX_METRICS_LISTEN", sock.c_str()},
               {"P11MUX_LOG_LEVEL", "trace"},
               {"P11MUX_LOG_FILE", "/dev/null"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open(0, CKF_SERIAL_SESSION);
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CHECK(p->C_SignInit(h, &ecdsa, 1) == CKR_MECHANISM_INVALID);
  CHECK(p->C_VerifyInit(h, &ecdsa, 1) == CKR_MECHANISM_INVALID);
  CHECK(p->C_DestroyObject(h, 1) == CKR_TOKEN_WRITE_PROTECTED);
  CHECK(calls("C_SignInit") + calls("C_VerifyInit") + calls("C_DestroyObject") == 0);
  auto m = http_get(endpoint_of(sock), "/metrics");
  REQUIRE(m);
  const auto prom = parse_prometheus(m->body);
  INFO(m->body);
  for (const auto& e : prom.errors) FAIL_CHECK(e);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"mechanism\"}") == 2);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"read_only\"}") == 1);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"function\"}") == 0);
  // The refused calls are still calls, with their code.
  CHECK(prom.at("p11mux_calls_total{function=\"C_SignInit\"}") == 1);
}

TEST_CASE("policy: an unknown mechanism or function fails C_Initialize, naming it") {
  struct Case {
    const char* variable;
    const char* value;
    const char* expected;
  };
  const Case cases[] = {
      {"P11MUX_POLICY_MECHANISMS_DENY", "CKM_SHA256 CKM_SHA257", "unknown mechanism 'CKM_SHA257'"},
      {"P11MUX_POLICY_MECHANISMS_ALLOW", "ECDSA", "unknown mechanism 'ECDSA'"},
      {"P11MUX_POLICY_FUNCTIONS_DENY", "C_Sing", "unknown function 'C_Sing'"},
      {"P11MUX_POLICY_FUNCTIONS_DENY", "C_Finalize", "C_Finalize cannot be denied"},
      {"P11MUX_POLICY_READ_OLNY", "true", "did you mean P11MUX_POLICY_READ_ONLY?"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.variable);
    reset_environment();
    libs().mock->reset();
    ::setenv(c.variable, c.value, 1);
    CK_RV rv = CKR_OK;
    const std::string err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
    CHECK(rv == CKR_GENERAL_ERROR);
    CHECK_MESSAGE(err.find(c.expected) != std::string::npos, err);
    CHECK(mock_stats().initialize_calls == 0);  // the backend never initialized
    CK_ULONG n = 0;
    CHECK(libs().p11->C_GetSlotList(CK_FALSE, nullptr, &n) == CKR_CRYPTOKI_NOT_INITIALIZED);
  }
  reset_environment();
}

}  // namespace p11mux::test
