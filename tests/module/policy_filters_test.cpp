// The [policy] tokens and objects filters through the real module over the
// mock: hidden slots are left out of C_GetSlotList and unknown to every call
// that names them (the backend never sees those calls), hidden objects are
// left out of C_FindObjects and unknown wherever their handle is used, in
// both session modes; objects made through p11mux are checked from their
// template; refusals are logged and counted.
#include "harness.hpp"

#include "unit/observe_test_support.hpp"

#include <algorithm>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace p11mux::test {
namespace {

std::string temp_path(const std::string& name) { return unique_temp_path("filters", name); }

unsigned long calls(const char* function) { return libs().mock->calls(function); }

std::vector<CK_SLOT_ID> slot_list(CK_FUNCTION_LIST* p, CK_BBOOL present) {
  CK_ULONG n = 0;
  REQUIRE(p->C_GetSlotList(present, nullptr, &n) == CKR_OK);
  std::vector<CK_SLOT_ID> slots(n);
  REQUIRE(p->C_GetSlotList(present, slots.data(), &n) == CKR_OK);
  CHECK(n == slots.size());  // the count query and the filled call agree
  slots.resize(n);
  return slots;
}

MockConfig slots(unsigned long n) {
  MockConfig c{};
  c.slot_count = n;
  return c;
}

// The mock's own function list: objects made behind p11mux's back, as
// another application (or the token's owner) would.
CK_FUNCTION_LIST* mock_direct() {
  void* lib = ::dlopen(P11MUX_TEST_MOCK_PATH, RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(lib != nullptr);
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  REQUIRE(static_cast<bool>(get_list));
  CK_FUNCTION_LIST* list = nullptr;
  REQUIRE(get_list(&list) == CKR_OK);
  return list;
}

// A token secret key made directly on the mock (p11mux has initialized it).
CK_OBJECT_HANDLE make_key(const char* label, std::string_view id = {}) {
  CK_FUNCTION_LIST* m = mock_direct();
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE(m->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s) == CKR_OK);
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_BBOOL yes = CK_TRUE;
  CK_BYTE value[16] = {1, 2, 3};
  std::vector<CK_ATTRIBUTE> tmpl = {{CKA_CLASS, &cls, sizeof cls},
                                    {CKA_TOKEN, &yes, sizeof yes},
                                    {CKA_VALUE, value, sizeof value}};
  if (label != nullptr) tmpl.push_back({CKA_LABEL, const_cast<char*>(label), std::strlen(label)});
  if (!id.empty()) tmpl.push_back({CKA_ID, const_cast<char*>(id.data()), id.size()});
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  REQUIRE(m->C_CreateObject(s, tmpl.data(), tmpl.size(), &key) == CKR_OK);
  REQUIRE(m->C_CloseSession(s) == CKR_OK);
  return key;
}

std::vector<CK_OBJECT_HANDLE> find_all(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h, CK_ULONG batch) {
  REQUIRE(p->C_FindObjectsInit(h, nullptr, 0) == CKR_OK);
  std::vector<CK_OBJECT_HANDLE> all;
  for (int i = 0; i < 100; ++i) {
    std::vector<CK_OBJECT_HANDLE> buf(batch + 1, 0xdeadUL);
    CK_ULONG n = 99;
    REQUIRE(p->C_FindObjects(h, buf.data(), batch, &n) == CKR_OK);
    REQUIRE(n <= batch);
    CHECK(buf[batch] == 0xdeadUL);  // never past the caller's buffer
    for (CK_ULONG k = n; k < batch; ++k) CHECK(buf[k] == 0xdeadUL);  // nor hidden ones left there
    if (n == 0) break;
    all.insert(all.end(), buf.begin(), buf.begin() + static_cast<long>(n));
  }
  CHECK(p->C_FindObjectsFinal(h) == CKR_OK);
  std::sort(all.begin(), all.end());
  return all;
}

CK_ATTRIBUTE text_attr(CK_ATTRIBUTE_TYPE type, const char* value) {
  return {type, const_cast<char*>(value), std::strlen(value)};
}

}  // namespace

TEST_CASE("filters: tokens hides the other tokens' slots from every call, before the backend") {
  Proxy proxy(slots(3), nullptr, {{"P11MUX_POLICY_TOKENS", "mock-token-0, serial:2"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CHECK(slot_list(p, CK_FALSE) == std::vector<CK_SLOT_ID>{0, 2});
  CHECK(slot_list(p, CK_TRUE) == std::vector<CK_SLOT_ID>{0, 2});
  // A buffer for one: too small, and the count needed is the filtered one.
  CK_SLOT_ID one[1];
  CK_ULONG n = 1;
  CHECK(p->C_GetSlotList(CK_FALSE, one, &n) == CKR_BUFFER_TOO_SMALL);
  CHECK(n == 2);

  const unsigned long opened = mock_stats().sessions_opened_total;
  const unsigned long slot_infos = calls("C_GetSlotInfo");
  const unsigned long mechanism_lists = calls("C_GetMechanismList");
  CK_SLOT_INFO slot_info{};
  CK_TOKEN_INFO token_info{};
  CK_MECHANISM_INFO mech_info{};
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CK_UTF8CHAR so_pin[] = MOCK_SO_PIN, label[32];
  std::memset(label, ' ', sizeof label);
  CHECK(p->C_GetSlotInfo(1, &slot_info) == CKR_SLOT_ID_INVALID);
  CHECK(p->C_GetTokenInfo(1, &token_info) == CKR_SLOT_ID_INVALID);
  CHECK(p->C_GetMechanismList(1, nullptr, &n) == CKR_SLOT_ID_INVALID);
  CHECK(p->C_GetMechanismInfo(1, CKM_SHA256, &mech_info) == CKR_SLOT_ID_INVALID);
  CHECK(p->C_InitToken(1, so_pin, 4, label) == CKR_SLOT_ID_INVALID);
  CHECK(p->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_SLOT_ID_INVALID);
  CHECK(p->C_CloseAllSessions(1) == CKR_SLOT_ID_INVALID);
  CHECK(calls("C_GetSlotInfo") == slot_infos);
  CHECK(calls("C_GetMechanismList") == mechanism_lists);
  CHECK(calls("C_GetMechanismInfo") == 0);
  CHECK(calls("C_InitToken") == 0);
  CHECK(mock_stats().sessions_opened_total == opened);
  CHECK(h == CK_INVALID_HANDLE);
  // A slot the backend does not know either: the same answer.
  CHECK(p->C_GetSlotInfo(7, &slot_info) == CKR_SLOT_ID_INVALID);

  // The exposed ones work.
  CHECK(p->C_GetSlotInfo(0, &slot_info) == CKR_OK);
  CHECK(p->C_GetTokenInfo(2, &token_info) == CKR_OK);
  CHECK(p->C_GetMechanismList(2, nullptr, &n) == CKR_OK);
  h = proxy.open(2);
  CK_BYTE buf[8];
  CHECK(p->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
}

TEST_CASE("filters: a token is matched when asked, so a relabelled token hides or shows at once") {
  Proxy proxy(slots(2), nullptr, {{"P11MUX_POLICY_TOKENS", "label:mock-token-0, label:renamed"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CHECK(slot_list(p, CK_TRUE) == std::vector<CK_SLOT_ID>{0});
  CK_UTF8CHAR so_pin[] = MOCK_SO_PIN, label[32];
  std::memset(label, ' ', sizeof label);
  std::memcpy(label, "elsewhere", 9);
  REQUIRE(p->C_InitToken(0, so_pin, 4, label) == CKR_OK);
  CHECK(slot_list(p, CK_TRUE).empty());  // its label no longer matches
  CK_SLOT_INFO info{};
  CHECK(p->C_GetSlotInfo(0, &info) == CKR_SLOT_ID_INVALID);
  // Relabelled by someone else (directly on the backend): shown from the next call.
  std::memset(label, ' ', sizeof label);
  std::memcpy(label, "renamed", 7);
  REQUIRE(mock_direct()->C_InitToken(1, so_pin, 4, label) == CKR_OK);
  CHECK(slot_list(p, CK_TRUE) == std::vector<CK_SLOT_ID>{1});
  CHECK(p->C_GetSlotInfo(1, &info) == CKR_OK);
}

TEST_CASE("filters: C_WaitForSlotEvent drops the events of hidden slots") {
  Proxy proxy(slots(3), nullptr, {{"P11MUX_POLICY_TOKENS", "mock-token-2"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SLOT_ID slot = 99;
  libs().mock->trigger_slot_event(1);
  CHECK(p->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_NO_EVENT);
  CHECK(slot == 99);  // the hidden slot's ID is not told
  libs().mock->trigger_slot_event(0);
  libs().mock->trigger_slot_event(2);
  CHECK(p->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_OK);
  CHECK(slot == 2);
  // Blocking: the hidden slot's event is passed over, the wait goes on.
  libs().mock->trigger_slot_event(1);
  libs().mock->trigger_slot_event(2);
  slot = 99;
  CHECK(p->C_WaitForSlotEvent(0, &slot, nullptr) == CKR_OK);
  CHECK(slot == 2);
}

TEST_CASE("filters: a token refusal is logged with the slot, label and serial, and counted") {
  const std::string log = temp_path("tokens.log");
  const std::string sock = temp_path("tokens.sock");
  {
    Proxy proxy(slots(2), nullptr,
                {{"P11MUX_POLICY_TOKENS", "mock-token-0"},
                 {"P11MUX_LOG_LEVEL", "warn"},
                 {"P11MUX_LOG_FILE", log.c_str()},
                 {"P11MUX_METRICS_LISTEN", sock.c_str()}});
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    CHECK(proxy.p11->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
          CKR_SLOT_ID_INVALID);
    CK_SLOT_INFO info{};
    CHECK(proxy.p11->C_GetSlotInfo(5, &info) == CKR_SLOT_ID_INVALID);  // no token: no refusal
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    const auto prom = parse_prometheus(m->body);
    CHECK(prom.at("p11mux_policy_denied_total{rule=\"token\"}") == 1);
    auto s = http_get(endpoint_of(sock), "/stats");
    REQUIRE(s);
    CHECK(s->body.find("\"token\":1") != std::string::npos);
  }
  const std::string text = slurp(log);
  ::unlink(log.c_str());
  INFO(text);
  CHECK(text.find("warning: policy refused C_OpenSession: rule token (slot 1, label "
                  "'mock-token-1', serial '1'): CKR_SLOT_ID_INVALID") != std::string::npos);
  CHECK(text.find("slot 5") == std::string::npos);
}

TEST_CASE("filters: objects hides the other objects from C_FindObjects and every handle use") {
  for (const char* mode : {"serialize", "multiplex"}) {
    CAPTURE(mode);
    Proxy proxy(
        {}, nullptr,
        {{"P11MUX_POLICY_OBJECTS", "label:tls-key, id:0a1b"}, {"P11MUX_SESSION_MODE", mode}});
    CK_FUNCTION_LIST* p = proxy.p11;
    // Hidden objects first: a search meets them before the shown ones.
    std::vector<CK_OBJECT_HANDLE> hidden;
    for (int i = 0; i < 40; ++i) hidden.push_back(make_key("other-key"));
    hidden.push_back(make_key(nullptr));  // no label, no ID
    const CK_OBJECT_HANDLE tls = make_key("tls-key");
    const CK_OBJECT_HANDLE by_id = make_key("anything", "\x0a\x1b");
    const CK_OBJECT_HANDLE other = hidden.front();
    CK_SESSION_HANDLE h = proxy.open();

    // Every batch size finds exactly the shown ones: the filter asks again
    // until the buffer is full or the search has ended.
    const std::vector<CK_OBJECT_HANDLE> shown{tls, by_id};
    for (CK_ULONG batch : {1UL, 2UL, 3UL, 64UL}) {
      CAPTURE(batch);
      CHECK(find_all(p, h, batch) == shown);
    }

    // Every use of a hidden handle, as if it did not exist; the backend never sees it.
    CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
    CK_BYTE label[32];
    CK_ATTRIBUTE get{CKA_LABEL, label, sizeof label};
    CK_ULONG len = 0, size = 0;
    CK_OBJECT_HANDLE out = 0;
    CHECK(p->C_SignInit(h, &mech, other) == CKR_KEY_HANDLE_INVALID);
    CHECK(p->C_VerifyInit(h, &mech, other) == CKR_KEY_HANDLE_INVALID);
    CHECK(p->C_EncryptInit(h, &mech, other) == CKR_KEY_HANDLE_INVALID);
    CHECK(p->C_DecryptInit(h, &mech, other) == CKR_KEY_HANDLE_INVALID);
    CHECK(p->C_DeriveKey(h, &mech, other, nullptr, 0, &out) == CKR_KEY_HANDLE_INVALID);
    CHECK(p->C_WrapKey(h, &mech, other, tls, nullptr, &len) == CKR_WRAPPING_KEY_HANDLE_INVALID);
    CHECK(p->C_WrapKey(h, &mech, tls, other, nullptr, &len) == CKR_KEY_HANDLE_INVALID);
    CHECK(p->C_GetAttributeValue(h, other, &get, 1) == CKR_OBJECT_HANDLE_INVALID);
    CHECK(p->C_GetObjectSize(h, other, &size) == CKR_OBJECT_HANDLE_INVALID);
    CHECK(p->C_DestroyObject(h, other) == CKR_OBJECT_HANDLE_INVALID);
    CHECK(p->C_CopyObject(h, other, nullptr, 0, &out) == CKR_OBJECT_HANDLE_INVALID);
    CHECK(p->C_SetAttributeValue(h, hidden.back(), nullptr, 0) == CKR_OBJECT_HANDLE_INVALID);
    CK_MECHANISM sha = sha256();
    REQUIRE(p->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(p->C_DigestKey(h, other) == CKR_KEY_HANDLE_INVALID);
    // That error ended the digest, on the backend too (it never saw it).
    CK_BYTE digest[MOCK_DIGEST_LEN];
    CK_ULONG digest_len = sizeof digest;
    CHECK(p->C_DigestFinal(h, digest, &digest_len) == CKR_OPERATION_NOT_INITIALIZED);
    REQUIRE(p->C_DigestInit(h, &sha) == CKR_OK);
    digest_len = sizeof digest;
    CHECK(p->C_DigestFinal(h, digest, &digest_len) == CKR_OK);
    for (const char* f : {"C_SignInit", "C_VerifyInit", "C_EncryptInit", "C_DecryptInit",
                          "C_DeriveKey", "C_WrapKey", "C_GetObjectSize", "C_DestroyObject",
                          "C_CopyObject", "C_SetAttributeValue", "C_DigestKey"}) {
      CAPTURE(f);
      CHECK(calls(f) == 0);
    }
    // A handle nobody has: the same code, as the backend would answer.
    CHECK(p->C_SignInit(h, &mech, 0x7777777UL) == CKR_KEY_HANDLE_INVALID);

    // The shown ones work, by label and by ID.
    get.ulValueLen = sizeof label;
    CHECK(p->C_GetAttributeValue(h, by_id, &get, 1) == CKR_OK);
    CHECK(p->C_WrapKey(h, &mech, tls, by_id, nullptr, &len) == CKR_OK);
    REQUIRE(p->C_SignInit(h, &mech, tls) == CKR_OK);
    CK_BYTE data[] = "abc", sig[MOCK_DIGEST_LEN];
    len = sizeof sig;
    CHECK(p->C_Sign(h, data, 3, sig, &len) == CKR_OK);
    CHECK(calls("C_SignInit") == 1);
  }
}

TEST_CASE("filters: objects made or changed through p11mux are checked from their template") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_OBJECTS", "label:app-*"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  CK_OBJECT_CLASS cls = CKO_DATA;
  CK_ATTRIBUTE unlabelled[] = {{CKA_CLASS, &cls, sizeof cls}};
  CK_ATTRIBUTE wrong[] = {{CKA_CLASS, &cls, sizeof cls}, text_attr(CKA_LABEL, "other")};
  CK_ATTRIBUTE right[] = {{CKA_CLASS, &cls, sizeof cls}, text_attr(CKA_LABEL, "app-data")};
  CK_OBJECT_HANDLE made = 0;
  CHECK(p->C_CreateObject(h, unlabelled, 1, &made) == CKR_TEMPLATE_INCOMPLETE);
  CHECK(p->C_CreateObject(h, wrong, 2, &made) == CKR_ATTRIBUTE_VALUE_INVALID);
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CHECK(p->C_GenerateKey(h, &gen, wrong + 1, 1, &made) == CKR_ATTRIBUTE_VALUE_INVALID);
  CK_MECHANISM pair{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = 0, priv = 0;
  CHECK(p->C_GenerateKeyPair(h, &pair, right + 1, 1, wrong + 1, 1, &pub, &priv) ==
        CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK(calls("C_CreateObject") + calls("C_GenerateKey") + calls("C_GenerateKeyPair") == 0);

  // Made with a matching label: found and usable like any shown object.
  REQUIRE(p->C_CreateObject(h, right, 2, &made) == CKR_OK);
  REQUIRE(p->C_GenerateKeyPair(h, &pair, right + 1, 1, right + 1, 1, &pub, &priv) == CKR_OK);
  std::vector<CK_OBJECT_HANDLE> mine{made, pub, priv};
  std::sort(mine.begin(), mine.end());
  CHECK(find_all(p, h, 8) == mine);
  // A change or a copy that would hide it is refused; one that keeps it shown is not.
  CK_ATTRIBUTE rename_wrong[] = {text_attr(CKA_LABEL, "other")};
  CK_ATTRIBUTE rename_right[] = {text_attr(CKA_LABEL, "app-renamed")};
  CHECK(p->C_SetAttributeValue(h, made, rename_wrong, 1) == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK(p->C_CopyObject(h, made, rename_wrong, 1, &pub) == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK(calls("C_SetAttributeValue") + calls("C_CopyObject") == 0);
  CHECK(p->C_SetAttributeValue(h, made, rename_right, 1) == CKR_OK);
  CK_OBJECT_HANDLE copy = 0;
  CHECK(p->C_CopyObject(h, made, nullptr, 0, &copy) == CKR_OK);
  CHECK(p->C_DestroyObject(h, copy) == CKR_OK);
}

namespace {

// A token AES key with the given booleans, made directly on the mock.
CK_OBJECT_HANDLE make_key_with(const char* label,
                               std::initializer_list<std::pair<CK_ATTRIBUTE_TYPE, bool>> flags) {
  CK_FUNCTION_LIST* m = mock_direct();
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE(m->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s) == CKR_OK);
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_BBOOL yes = CK_TRUE;
  CK_BYTE value[16] = {1, 2, 3};
  std::vector<CK_BBOOL> values;
  values.reserve(flags.size());
  std::vector<CK_ATTRIBUTE> tmpl = {{CKA_CLASS, &cls, sizeof cls},
                                    {CKA_KEY_TYPE, &type, sizeof type},
                                    {CKA_TOKEN, &yes, sizeof yes},
                                    {CKA_VALUE, value, sizeof value},
                                    text_attr(CKA_LABEL, label)};
  for (auto [t, on] : flags) {
    values.push_back(on ? CK_TRUE : CK_FALSE);
    tmpl.push_back({t, &values.back(), sizeof(CK_BBOOL)});
  }
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  REQUIRE(m->C_CreateObject(s, tmpl.data(), tmpl.size(), &key) == CKR_OK);
  REQUIRE(m->C_CloseSession(s) == CKR_OK);
  return key;
}

}  // namespace

// protect reads a key's attributes and makes the changes it allows itself:
// with objects on, only after the filter and through it, so a hidden key
// gets the filter's answer (protect neither reads nor names it) and a change
// protect allows is still checked by the filter.
TEST_CASE("filters: with protect on too, a hidden key gets the filter's answer, not protect's") {
  const std::string log = temp_path("protect.log");
  for (const char* mode : {"serialize", "multiplex"}) {
    CAPTURE(mode);
    {
      Proxy proxy({}, nullptr,
                  {{"P11MUX_POLICY_OBJECTS", "label:app-*"},
                   {"P11MUX_POLICY_PROTECT", "all"},
                   {"P11MUX_SESSION_MODE", mode},
                   {"P11MUX_LOG_LEVEL", "warn"},
                   {"P11MUX_LOG_FILE", log.c_str()}});
      CK_FUNCTION_LIST* p = proxy.p11;
      CK_SESSION_HANDLE h = proxy.open();
      const CK_OBJECT_HANDLE secret =
          make_key_with("db-secret", {{CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, true}});
      const CK_OBJECT_HANDLE wrapper = make_key_with("db-wrapper", {{CKA_WRAP, true}});
      const CK_OBJECT_HANDLE mine =
          make_key_with("app-secret", {{CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, true}});
      const CK_OBJECT_HANDLE my_wrapper = make_key_with("app-wrapper", {{CKA_WRAP, true}});
      CK_BBOOL no = CK_FALSE;
      CK_ATTRIBUTE unsensitive[] = {{CKA_SENSITIVE, &no, sizeof no}};
      CK_OBJECT_HANDLE copy = 0;
      CHECK(p->C_SetAttributeValue(h, secret, unsensitive, 1) == CKR_OBJECT_HANDLE_INVALID);
      CHECK(p->C_CopyObject(h, secret, unsensitive, 1, &copy) == CKR_OBJECT_HANDLE_INVALID);
      CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
      CK_BYTE blob[64];
      CK_ULONG len = sizeof blob;
      CHECK(p->C_WrapKey(h, &wrap, my_wrapper, secret, blob, &len) == CKR_KEY_HANDLE_INVALID);
      CHECK(p->C_WrapKey(h, &wrap, wrapper, mine, blob, &len) == CKR_WRAPPING_KEY_HANDLE_INVALID);
      // A shown key: protect's own codes, as without objects.
      CHECK(p->C_SetAttributeValue(h, mine, unsensitive, 1) == CKR_ATTRIBUTE_READ_ONLY);
      CHECK(p->C_WrapKey(h, &wrap, my_wrapper, mine, blob, &len) == CKR_KEY_NOT_WRAPPABLE);
      // A change protect allows that would hide the key: the filter refuses it.
      CK_ATTRIBUTE rename_wrong[] = {text_attr(CKA_LABEL, "other")};
      CHECK(p->C_SetAttributeValue(h, mine, rename_wrong, 1) == CKR_ATTRIBUTE_VALUE_INVALID);
      CHECK(p->C_CopyObject(h, mine, rename_wrong, 1, &copy) == CKR_ATTRIBUTE_VALUE_INVALID);
      CHECK(calls("C_SetAttributeValue") + calls("C_CopyObject") + calls("C_WrapKey") == 0);
      // ... one that keeps it shown reaches the backend.
      CK_ATTRIBUTE rename_right[] = {text_attr(CKA_LABEL, "app-renamed")};
      CHECK(p->C_SetAttributeValue(h, mine, rename_right, 1) == CKR_OK);
      CHECK(calls("C_SetAttributeValue") == 1);
    }
    const std::string text = slurp(log);
    ::unlink(log.c_str());
    INFO(text);
    // protect refused the shown key, naming it...
    CHECK(text.find("rule sticky-attributes (CKA_SENSITIVE true -> false): object label "
                    "'app-secret'") != std::string::npos);
    CHECK(text.find("rule wrap-trusted") != std::string::npos);
    // ... and never looked at the hidden ones: only the filter's own lines
    // (the operator's log names what it hid, as without protect) name them.
    std::size_t at = 0;
    while ((at = text.find("'db-", at)) != std::string::npos) {
      const std::size_t begin = text.rfind('\n', at) + 1;
      const std::string line = text.substr(begin, text.find('\n', at) - begin);
      CAPTURE(line);
      CHECK(line.find(": rule object (label 'db-") != std::string::npos);
      ++at;
    }
    CHECK(text.find("object label 'db-") == std::string::npos);
  }
}

TEST_CASE("filters: an object refusal is logged with the label and ID, and counted") {
  const std::string log = temp_path("objects.log");
  const std::string sock = temp_path("objects.sock");
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_POLICY_OBJECTS", "label:tls-key"},
                 {"P11MUX_LOG_LEVEL", "warn"},
                 {"P11MUX_LOG_FILE", log.c_str()},
                 {"P11MUX_METRICS_LISTEN", sock.c_str()}});
    const CK_OBJECT_HANDLE other = make_key("db-key", "\x01\xff");
    CK_SESSION_HANDLE h = proxy.open();
    CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
    CHECK(proxy.p11->C_SignInit(h, &mech, other) == CKR_KEY_HANDLE_INVALID);
    CHECK(proxy.p11->C_SignInit(h, &mech, 0x7777777UL) == CKR_KEY_HANDLE_INVALID);  // not counted
    CHECK(find_all(proxy.p11, h, 4).empty());  // left out silently
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    CHECK(parse_prometheus(m->body).at("p11mux_policy_denied_total{rule=\"object\"}") == 1);
  }
  const std::string text = slurp(log);
  ::unlink(log.c_str());
  INFO(text);
  CHECK(text.find("warning: policy refused C_SignInit: rule object (label 'db-key', id 01ff): "
                  "CKR_KEY_HANDLE_INVALID") != std::string::npos);
  CHECK(text.find("C_FindObjects") == std::string::npos);
}

TEST_CASE("filters: an ill-formed tokens or objects value fails C_Initialize, naming it") {
  struct Case {
    const char* variable;
    const char* value;
    const char* expected;
  };
  const Case cases[] = {
      {"P11MUX_POLICY_OBJECTS", "label:a, tls-key", "'tls-key' is neither label:NAME nor id:HEX"},
      {"P11MUX_POLICY_OBJECTS", "id:0g", "'id:0g' is not an ID in hex"},
      {"P11MUX_POLICY_TOKENS", "serial:", "'serial:' names no token"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.value);
    reset_environment();
    libs().mock->reset();
    ::setenv(c.variable, c.value, 1);
    CK_RV rv = CKR_OK;
    const std::string err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
    CHECK(rv == CKR_GENERAL_ERROR);
    CHECK_MESSAGE(err.find(c.expected) != std::string::npos, err);
    CHECK_MESSAGE(err.find(c.variable) != std::string::npos, err);
    CHECK(mock_stats().initialize_calls == 0);
  }
  reset_environment();
}

}  // namespace p11mux::test
