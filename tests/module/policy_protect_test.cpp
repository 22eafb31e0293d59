// [policy] protect through the real module over the mock. The mock checks no
// attribute (it stores what it is given and wraps any key), so whatever is
// refused here is refused by p11mux, before the backend: the mock's call
// counters for the refused function stay at 0, and an allowed call reaches it.
#include "harness.hpp"

#include "unit/observe_test_support.hpp"

#include <latch>
#include <string>
#include <thread>
#include <vector>

namespace p11mux::test {
namespace {

unsigned long calls(const char* function) { return libs().mock->calls(function); }

std::string temp_path(const std::string& name) { return unique_temp_path("protect", name); }

// A key object's template: class, key type, label, ID and boolean attributes.
struct Key {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_BYTE value[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  CK_UTF8CHAR label[9] = "victim";
  CK_BYTE id[2] = {0xab, 0xcd};
  std::vector<CK_BBOOL> flags;
  std::vector<CK_ATTRIBUTE> attributes;

  Key(std::initializer_list<std::pair<CK_ATTRIBUTE_TYPE, bool>> list, const char* name = "victim") {
    std::snprintf(reinterpret_cast<char*>(label), sizeof label, "%s", name);
    flags.reserve(list.size());
    attributes = {{CKA_CLASS, &cls, sizeof cls},
                  {CKA_KEY_TYPE, &type, sizeof type},
                  {CKA_VALUE, value, sizeof value},
                  {CKA_LABEL, label, std::strlen(name)},
                  {CKA_ID, id, sizeof id}};
    for (auto [t, on] : list) {
      flags.push_back(on ? CK_TRUE : CK_FALSE);
      attributes.push_back({t, &flags.back(), sizeof(CK_BBOOL)});
    }
  }
  CK_ATTRIBUTE* data() { return attributes.data(); }
  CK_ULONG size() const { return static_cast<CK_ULONG>(attributes.size()); }
};

// Boolean attributes alone, for a change or a generation template.
struct Flags {
  std::vector<CK_BBOOL> values;
  std::vector<CK_ATTRIBUTE> attributes;
  Flags(std::initializer_list<std::pair<CK_ATTRIBUTE_TYPE, bool>> list) {
    values.reserve(list.size());
    for (auto [t, on] : list) {
      values.push_back(on ? CK_TRUE : CK_FALSE);
      attributes.push_back({t, &values.back(), sizeof(CK_BBOOL)});
    }
  }
  CK_ATTRIBUTE* data() { return attributes.data(); }
  CK_ULONG size() const { return static_cast<CK_ULONG>(attributes.size()); }
};

// The key is created with the mock directly reachable only through p11mux,
// so its template must itself pass the policy.
CK_OBJECT_HANDLE create(Proxy& proxy, CK_SESSION_HANDLE h, Key key) {
  CK_OBJECT_HANDLE out = CK_INVALID_HANDLE;
  REQUIRE(proxy.p11->C_CreateObject(h, key.data(), key.size(), &out) == CKR_OK);
  return out;
}

CK_BBOOL read_bool(Proxy& proxy, CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t) {
  CK_BBOOL v = 0xff;
  CK_ATTRIBUTE a{t, &v, sizeof v};
  REQUIRE(proxy.p11->C_GetAttributeValue(h, o, &a, 1) == CKR_OK);
  return v;
}

}  // namespace

TEST_CASE(
    "protect: a template with wrap and decrypt, or unwrap and encrypt, never reaches the backend") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_PROTECT", "all"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  CK_OBJECT_HANDLE out = 0, out2 = 0;
  Key wrap_decrypt({{CKA_WRAP, true}, {CKA_DECRYPT, true}});
  Key unwrap_encrypt({{CKA_UNWRAP, true}, {CKA_ENCRYPT, true}});
  CHECK(p->C_CreateObject(h, wrap_decrypt.data(), wrap_decrypt.size(), &out) ==
        CKR_TEMPLATE_INCONSISTENT);
  CHECK(p->C_CreateObject(h, unwrap_encrypt.data(), unwrap_encrypt.size(), &out) ==
        CKR_TEMPLATE_INCONSISTENT);
  Flags bad({{CKA_WRAP, true}, {CKA_DECRYPT, true}}),
      good({{CKA_WRAP, true}, {CKA_DECRYPT, false}});
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CHECK(p->C_GenerateKey(h, &gen, bad.data(), bad.size(), &out) == CKR_TEMPLATE_INCONSISTENT);
  CK_MECHANISM pair{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CHECK(p->C_GenerateKeyPair(h, &pair, bad.data(), bad.size(), good.data(), good.size(), &out,
                             &out2) == CKR_TEMPLATE_INCONSISTENT);
  CHECK(p->C_GenerateKeyPair(h, &pair, good.data(), good.size(), bad.data(), bad.size(), &out,
                             &out2) == CKR_TEMPLATE_INCONSISTENT);
  const CK_OBJECT_HANDLE base = create(proxy, h, Key({{CKA_DERIVE, true}}));
  CK_MECHANISM derive{CKM_SHA256_KEY_DERIVATION, nullptr, 0};
  CHECK(p->C_DeriveKey(h, &derive, base, bad.data(), bad.size(), &out) ==
        CKR_TEMPLATE_INCONSISTENT);
  CK_MECHANISM aes_wrap{CKM_AES_KEY_WRAP, nullptr, 0};
  CK_BYTE blob[24] = {};
  CHECK(p->C_UnwrapKey(h, &aes_wrap, base, blob, sizeof blob, bad.data(), bad.size(), &out) ==
        CKR_TEMPLATE_INCONSISTENT);
  // A change whose template alone conflicts: the key is not even read.
  const unsigned long reads = calls("C_GetAttributeValue");
  CHECK(p->C_SetAttributeValue(h, base, bad.data(), bad.size()) == CKR_TEMPLATE_INCONSISTENT);
  CHECK(p->C_CopyObject(h, base, bad.data(), bad.size(), &out) == CKR_TEMPLATE_INCONSISTENT);
  CHECK(calls("C_GetAttributeValue") == reads);
  for (const char* f : {"C_GenerateKey", "C_GenerateKeyPair", "C_DeriveKey", "C_UnwrapKey",
                        "C_SetAttributeValue", "C_CopyObject"}) {
    CAPTURE(f);
    CHECK(calls(f) == 0);
  }
  CHECK(calls("C_CreateObject") == 1);  // the base key only

  // The same calls with one of each pair off reach the backend.
  Key wrap_only({{CKA_WRAP, true}, {CKA_DECRYPT, false}, {CKA_UNWRAP, true}, {CKA_ENCRYPT, false}});
  CHECK(p->C_CreateObject(h, wrap_only.data(), wrap_only.size(), &out) == CKR_OK);
  p->C_GenerateKey(h, &gen, good.data(), good.size(), &out);
  p->C_GenerateKeyPair(h, &pair, good.data(), good.size(), good.data(), good.size(), &out, &out2);
  p->C_DeriveKey(h, &derive, base, good.data(), good.size(), &out);
  for (const char* f : {"C_GenerateKey", "C_GenerateKeyPair", "C_DeriveKey"}) {
    CAPTURE(f);
    CHECK(calls(f) == 1);
  }
}

TEST_CASE("protect: a change that would make a key both wrap and decrypt is refused") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_PROTECT", "all"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  const CK_OBJECT_HANDLE wrapper = create(proxy, h, Key({{CKA_WRAP, true}, {CKA_DECRYPT, false}}));
  Flags decrypt({{CKA_DECRYPT, true}});
  CHECK(p->C_SetAttributeValue(h, wrapper, decrypt.data(), decrypt.size()) ==
        CKR_ACTION_PROHIBITED);
  CK_OBJECT_HANDLE copy = 0;
  CHECK(p->C_CopyObject(h, wrapper, decrypt.data(), decrypt.size(), &copy) ==
        CKR_ACTION_PROHIBITED);
  CHECK(calls("C_SetAttributeValue") == 0);
  CHECK(calls("C_CopyObject") == 0);
  CHECK(read_bool(proxy, h, wrapper, CKA_DECRYPT) == CK_FALSE);

  const CK_OBJECT_HANDLE encrypter = create(proxy, h, Key({{CKA_ENCRYPT, true}}));
  Flags unwrap({{CKA_UNWRAP, true}});
  CHECK(p->C_SetAttributeValue(h, encrypter, unwrap.data(), unwrap.size()) ==
        CKR_ACTION_PROHIBITED);
  CHECK(calls("C_SetAttributeValue") == 0);

  // Dropping wrap in the same change, or a change that does not touch the
  // pairs, reaches the backend.
  Flags swap({{CKA_DECRYPT, true}, {CKA_WRAP, false}});
  CHECK(p->C_SetAttributeValue(h, wrapper, swap.data(), swap.size()) == CKR_OK);
  CHECK(read_bool(proxy, h, wrapper, CKA_DECRYPT) == CK_TRUE);
  CHECK(read_bool(proxy, h, wrapper, CKA_WRAP) == CK_FALSE);
  CHECK(p->C_CopyObject(h, wrapper, nullptr, 0, &copy) == CKR_OK);
  CHECK(calls("C_SetAttributeValue") == 1);
  CHECK(calls("C_CopyObject") == 1);
}

TEST_CASE("protect: two changes racing on one key cannot each complete half of a pair") {
  // Every backend call lasts 20 ms: without protect's lock both threads would
  // read the key before either changed it, and both changes would pass.
  MockConfig slow{};
  slow.call_spin_us = 20'000;
  Proxy proxy(slow, nullptr, {{"P11MUX_POLICY_PROTECT", "conflicting-attributes"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE h1 = proxy.open(), h2 = proxy.open();
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const CK_OBJECT_HANDLE key = create(proxy, h1, Key({{CKA_WRAP, false}, {CKA_DECRYPT, false}}));
    Flags wrap({{CKA_WRAP, true}}), decrypt({{CKA_DECRYPT, true}});
    CK_RV rv1 = CKR_GENERAL_ERROR, rv2 = CKR_GENERAL_ERROR;
    std::latch start(2);
    std::thread t1([&] {
      start.arrive_and_wait();
      rv1 = p->C_SetAttributeValue(h1, key, wrap.data(), wrap.size());
    });
    std::thread t2([&] {
      start.arrive_and_wait();
      rv2 = p->C_SetAttributeValue(h2, key, decrypt.data(), decrypt.size());
    });
    t1.join();
    t2.join();
    CHECK(((rv1 == CKR_OK && rv2 == CKR_ACTION_PROHIBITED) ||
           (rv2 == CKR_OK && rv1 == CKR_ACTION_PROHIBITED)));
    CHECK_FALSE((read_bool(proxy, h1, key, CKA_WRAP) == CK_TRUE &&
                 read_bool(proxy, h1, key, CKA_DECRYPT) == CK_TRUE));
  }
}

TEST_CASE("protect: CKA_SENSITIVE stays on and CKA_EXTRACTABLE stays off") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_PROTECT", "all"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  const CK_OBJECT_HANDLE secret =
      create(proxy, h, Key({{CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, false}}));
  Flags unsensitive({{CKA_SENSITIVE, false}}), extractable({{CKA_EXTRACTABLE, true}});
  CHECK(p->C_SetAttributeValue(h, secret, unsensitive.data(), unsensitive.size()) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CHECK(p->C_SetAttributeValue(h, secret, extractable.data(), extractable.size()) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CK_OBJECT_HANDLE copy = 0;
  CHECK(p->C_CopyObject(h, secret, unsensitive.data(), unsensitive.size(), &copy) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CHECK(p->C_CopyObject(h, secret, extractable.data(), extractable.size(), &copy) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CHECK(calls("C_SetAttributeValue") == 0);
  CHECK(calls("C_CopyObject") == 0);
  CHECK(read_bool(proxy, h, secret, CKA_SENSITIVE) == CK_TRUE);

  // The safe way is allowed: on for CKA_SENSITIVE, off for CKA_EXTRACTABLE.
  const CK_OBJECT_HANDLE open =
      create(proxy, h, Key({{CKA_SENSITIVE, false}, {CKA_EXTRACTABLE, true}}));
  Flags safer({{CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, false}});
  CHECK(p->C_SetAttributeValue(h, open, safer.data(), safer.size()) == CKR_OK);
  CHECK(read_bool(proxy, h, open, CKA_SENSITIVE) == CK_TRUE);
  // ... and then it sticks.
  CHECK(p->C_SetAttributeValue(h, open, unsensitive.data(), unsensitive.size()) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CHECK(calls("C_SetAttributeValue") == 1);

  // An object without these attributes, and a handle the backend does not know.
  CK_OBJECT_HANDLE data = 0;
  REQUIRE(proxy.create_data_object(h, false, data) == CKR_OK);
  CK_UTF8CHAR label[] = "new";
  CK_ATTRIBUTE relabel{CKA_LABEL, label, 3};
  CHECK(p->C_SetAttributeValue(h, data, &relabel, 1) == CKR_OK);
  CHECK(p->C_SetAttributeValue(h, 0x7777, &relabel, 1) == CKR_OBJECT_HANDLE_INVALID);
}

TEST_CASE("protect: the attribute rules hold in multiplex mode") {
  Proxy proxy(
      {}, nullptr,
      {{"P11MUX_POLICY_PROTECT", "sticky-attributes"}, {"P11MUX_SESSION_MODE", "multiplex"}});
  CK_SESSION_HANDLE h = proxy.open();
  const CK_OBJECT_HANDLE secret = create(proxy, h, Key({{CKA_SENSITIVE, true}}));
  Flags unsensitive({{CKA_SENSITIVE, false}});
  CHECK(proxy.p11->C_SetAttributeValue(h, secret, unsensitive.data(), unsensitive.size()) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CHECK(calls("C_SetAttributeValue") == 0);
  // Only the rule named: a conflicting template goes through.
  Key both({{CKA_WRAP, true}, {CKA_DECRYPT, true}});
  CK_OBJECT_HANDLE out = 0;
  CHECK(proxy.p11->C_CreateObject(h, both.data(), both.size(), &out) == CKR_OK);
}

TEST_CASE("protect: a sensitive key is wrapped only by a trusted key, or when it asks for one") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_PROTECT", "all"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  const CK_OBJECT_HANDLE victim =
      create(proxy, h, Key({{CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, true}}));
  const CK_OBJECT_HANDLE attacker = create(proxy, h, Key({{CKA_WRAP, true}}, "attacker"));
  const CK_OBJECT_HANDLE trusted =
      create(proxy, h, Key({{CKA_WRAP, true}, {CKA_TRUSTED, true}}, "trusted"));
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
  CK_BYTE blob[64];
  CK_ULONG len = sizeof blob;
  CHECK(p->C_WrapKey(h, &wrap, attacker, victim, blob, &len) == CKR_KEY_NOT_WRAPPABLE);
  CHECK(p->C_WrapKey(h, &wrap, attacker, victim, nullptr, &len) == CKR_KEY_NOT_WRAPPABLE);
  CHECK(calls("C_WrapKey") == 0);
  len = sizeof blob;
  CHECK(p->C_WrapKey(h, &wrap, trusted, victim, blob, &len) == CKR_OK);
  CHECK(calls("C_WrapKey") == 1);
  // With CKA_WRAP_WITH_TRUSTED the token itself holds the wrapping key to it.
  const CK_OBJECT_HANDLE bound =
      create(proxy, h, Key({{CKA_SENSITIVE, true}, {CKA_WRAP_WITH_TRUSTED, true}}));
  len = sizeof blob;
  p->C_WrapKey(h, &wrap, attacker, bound, blob, &len);
  CHECK(calls("C_WrapKey") == 2);
  // A key that is not sensitive may be wrapped by any key.
  const CK_OBJECT_HANDLE plain = create(proxy, h, Key({{CKA_SENSITIVE, false}}));
  len = sizeof blob;
  CHECK(p->C_WrapKey(h, &wrap, attacker, plain, blob, &len) == CKR_OK);
  CHECK(calls("C_WrapKey") == 3);
  // Handles the backend does not know get the codes C_WrapKey has for them.
  CHECK(p->C_WrapKey(h, &wrap, attacker, 0x7777, blob, &len) == CKR_KEY_HANDLE_INVALID);
  CHECK(p->C_WrapKey(h, &wrap, 0x7777, victim, blob, &len) == CKR_WRAPPING_KEY_HANDLE_INVALID);
  CHECK(calls("C_WrapKey") == 3);
}

TEST_CASE("protect: CKM_RSA_PKCS cannot decrypt or unwrap, other uses and mechanisms can") {
  Proxy proxy({}, nullptr, {{"P11MUX_POLICY_PROTECT", "no-padding-oracle"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  CK_MECHANISM pkcs{CKM_RSA_PKCS, nullptr, 0}, oaep{CKM_RSA_PKCS_OAEP, nullptr, 0};
  CK_OBJECT_HANDLE out = 0;
  CK_BYTE blob[16] = {};
  CHECK(p->C_DecryptInit(h, &pkcs, 1) == CKR_MECHANISM_INVALID);
  CHECK(p->C_UnwrapKey(h, &pkcs, 1, blob, sizeof blob, nullptr, 0, &out) == CKR_MECHANISM_INVALID);
  CHECK(calls("C_DecryptInit") + calls("C_UnwrapKey") == 0);
  p->C_DecryptInit(h, &oaep, 1);
  p->C_UnwrapKey(h, &oaep, 1, blob, sizeof blob, nullptr, 0, &out);
  p->C_EncryptInit(h, &pkcs, 1);
  p->C_SignInit(h, &pkcs, 1);
  for (const char* f : {"C_DecryptInit", "C_UnwrapKey", "C_EncryptInit", "C_SignInit"}) {
    CAPTURE(f);
    CHECK(calls(f) == 1);
  }
}

TEST_CASE("protect: each refusal is logged at warn with the rule and the object's label and ID") {
  const std::string log = temp_path("audit.log");
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_POLICY_PROTECT", "all"},
                 {"P11MUX_LOG_LEVEL", "warn"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_FUNCTION_LIST* p = proxy.p11;
    CK_SESSION_HANDLE h = proxy.open();
    const CK_OBJECT_HANDLE victim = create(proxy, h, Key({{CKA_SENSITIVE, true}}));
    const CK_OBJECT_HANDLE attacker = create(proxy, h, Key({{CKA_WRAP, true}}, "attacker"));
    Flags unsensitive({{CKA_SENSITIVE, false}});
    CHECK(p->C_SetAttributeValue(h, victim, unsensitive.data(), unsensitive.size()) ==
          CKR_ATTRIBUTE_READ_ONLY);
    CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
    CK_BYTE blob[64];
    CK_ULONG len = sizeof blob;
    CHECK(p->C_WrapKey(h, &wrap, attacker, victim, blob, &len) == CKR_KEY_NOT_WRAPPABLE);
    Key both({{CKA_WRAP, true}, {CKA_DECRYPT, true}}, "both");
    CK_OBJECT_HANDLE out = 0;
    CHECK(p->C_CreateObject(h, both.data(), both.size(), &out) == CKR_TEMPLATE_INCONSISTENT);
    CK_MECHANISM pkcs{CKM_RSA_PKCS, nullptr, 0};
    CHECK(p->C_DecryptInit(h, &pkcs, victim) == CKR_MECHANISM_INVALID);
  }
  const std::string text = slurp(log);
  ::unlink(log.c_str());
  INFO(text);
  CHECK(text.find("warning: policy refused C_SetAttributeValue: rule sticky-attributes "
                  "(CKA_SENSITIVE true -> false): object label 'victim' id abcd: "
                  "CKR_ATTRIBUTE_READ_ONLY") != std::string::npos);
  CHECK(text.find("warning: policy refused C_WrapKey: rule wrap-trusted (a sensitive key, a "
                  "wrapping key without CKA_TRUSTED): object label 'victim' id abcd: "
                  "CKR_KEY_NOT_WRAPPABLE") != std::string::npos);
  CHECK(text.find("warning: policy refused C_CreateObject: rule conflicting-attributes "
                  "(CKA_WRAP with CKA_DECRYPT): object label 'both' id abcd: "
                  "CKR_TEMPLATE_INCONSISTENT") != std::string::npos);
  CHECK(text.find("warning: policy refused C_DecryptInit: rule no-padding-oracle (CKM_RSA_PKCS): "
                  "object label 'victim' id abcd: CKR_MECHANISM_INVALID") != std::string::npos);
  // The key's value (01 02 03 ... 10) is never in the log.
  CHECK(text.find("0102030405") == std::string::npos);
}

TEST_CASE("protect: refusals are counted by rule at /metrics") {
  const std::string sock = temp_path("metrics.sock");
  Proxy proxy({}, nullptr,
              {{"P11MUX_POLICY_PROTECT", "all"}, {"P11MUX_METRICS_LISTEN", sock.c_str()}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE h = proxy.open();
  const CK_OBJECT_HANDLE victim = create(proxy, h, Key({{CKA_SENSITIVE, true}}));
  const CK_OBJECT_HANDLE attacker = create(proxy, h, Key({{CKA_WRAP, true}}, "attacker"));
  Flags unsensitive({{CKA_SENSITIVE, false}}), both({{CKA_UNWRAP, true}, {CKA_ENCRYPT, true}});
  CHECK(p->C_SetAttributeValue(h, victim, unsensitive.data(), unsensitive.size()) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CK_OBJECT_HANDLE copy = 0;
  CHECK(p->C_CopyObject(h, victim, unsensitive.data(), unsensitive.size(), &copy) ==
        CKR_ATTRIBUTE_READ_ONLY);
  CHECK(p->C_SetAttributeValue(h, attacker, both.data(), both.size()) == CKR_TEMPLATE_INCONSISTENT);
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0}, pkcs{CKM_RSA_PKCS, nullptr, 0};
  CK_ULONG len = 0;
  CHECK(p->C_WrapKey(h, &wrap, attacker, victim, nullptr, &len) == CKR_KEY_NOT_WRAPPABLE);
  CHECK(p->C_DecryptInit(h, &pkcs, victim) == CKR_MECHANISM_INVALID);
  // An allowed change, forwarded by protect itself, is observed as any call.
  CK_UTF8CHAR label[] = "renamed";
  CK_ATTRIBUTE relabel{CKA_LABEL, label, 7};
  CHECK(p->C_SetAttributeValue(h, victim, &relabel, 1) == CKR_OK);
  CHECK(calls("C_SetAttributeValue") == 1);
  auto m = http_get(endpoint_of(sock), "/metrics");
  REQUIRE(m);
  const auto prom = parse_prometheus(m->body);
  INFO(m->body);
  for (const auto& e : prom.errors) FAIL_CHECK(e);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"sticky-attributes\"}") == 2);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"conflicting-attributes\"}") == 1);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"wrap-trusted\"}") == 1);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"no-padding-oracle\"}") == 1);
  CHECK(prom.at("p11mux_policy_denied_total{rule=\"mechanism\"}") == 0);
  CHECK(prom.at("p11mux_calls_total{function=\"C_SetAttributeValue\"}") == 3);
}

TEST_CASE("protect: an unknown rule fails C_Initialize, naming it") {
  reset_environment();
  libs().mock->reset();
  ::setenv("P11MUX_POLICY_PROTECT", "sticky-attributes, wrap-trusty", 1);
  CK_RV rv = CKR_OK;
  const std::string err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
  CHECK(rv == CKR_GENERAL_ERROR);
  CHECK_MESSAGE(err.find("unknown rule 'wrap-trusty'") != std::string::npos, err);
  CHECK(mock_stats().initialize_calls == 0);
  reset_environment();
}

}  // namespace p11mux::test
