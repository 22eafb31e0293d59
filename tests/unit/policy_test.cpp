// Unit tests for proxy/policy: the [policy] keys (file and environment), the
// parsing of mechanism and function lists, and the decision for each call.
#include "policy/policy.hpp"
#include "config/config.hpp"
#include "observe/metrics.hpp"
#include "observe/stats_report.hpp"

#include "fake_environment.hpp"

#include <doctest/doctest.h>

#include <map>
#include <memory>
#include <string>

namespace p11mux {
namespace {

Config parse(std::string_view text, EnvMap vars = {}) {
  return parse_config(text, "test.conf", env_from(std::move(vars)));
}

Policy policy_of(std::string_view text, EnvMap vars = {}) {
  return Policy(parse(text, std::move(vars)).policy);
}

// The ConfigError message of building the policy of `text`, or "(no error)".
std::string policy_error(std::string_view text, EnvMap vars = {}) {
  try {
    policy_of(text, std::move(vars));
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

CK_MECHANISM mech(CK_MECHANISM_TYPE type) { return CK_MECHANISM{type, nullptr, 0}; }

}  // namespace

TEST_CASE("policy: no [policy] section means no rule at all") {
  const Config config = parse("");
  CHECK_FALSE(config.policy.any());
  CHECK(parse("[policy]\nread_only = false\n").policy.any() == false);
  CHECK(parse("[policy]\nread_only = true\n").policy.any());
  CHECK(parse("[policy]\nfunctions_deny = C_InitToken\n").policy.any());
  CHECK(parse("", {{"P11MUX_POLICY_MECHANISMS_DENY", "CKM_MD5"}}).policy.any());
}

TEST_CASE("policy: every key is read from the file and overridden by the environment") {
  const Config config = parse(
      "[policy]\nmechanisms_allow = CKM_ECDSA\nmechanisms_deny = CKM_RSA_PKCS\n"
      "functions_deny = C_InitToken\nread_only = true\n",
      {{"P11MUX_POLICY_MECHANISMS_ALLOW", "CKM_SHA256"}, {"P11MUX_POLICY_READ_ONLY", "false"}});
  CHECK(config.policy.mechanisms_allow == "CKM_SHA256");
  CHECK(config.policy.mechanisms_deny == "CKM_RSA_PKCS");
  CHECK(config.policy.functions_deny == "C_InitToken");
  CHECK_FALSE(config.policy.read_only);
}

TEST_CASE("policy: a misspelled key or variable is an error that names it") {
  try {
    parse("[policy]\nmechanism_deny = CKM_MD5\n");
    FAIL("no error");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()) == "test.conf:2: unknown key 'mechanism_deny' in section [policy]");
  }
  try {
    parse("", {{"P11MUX_POLICY_MECHANISM_DENY", "CKM_MD5"}});
    FAIL("no error");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()) ==
          "unknown environment variable P11MUX_POLICY_MECHANISM_DENY "
          "(did you mean P11MUX_POLICY_MECHANISMS_DENY?)");
  }
  try {
    parse("[policy]\nread_only = yes\n");
    FAIL("no error");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("[policy] read_only") != std::string::npos);
  }
}

TEST_CASE("policy: mechanism lists take CKM_ names and hex, separated by commas or spaces") {
  CHECK(parse_mechanisms("CKM_SHA256, CKM_ECDSA  0x80000001,,", "mechanisms_deny") ==
        std::vector<CK_MECHANISM_TYPE>{CKM_SHA256, CKM_ECDSA, 0x80000001UL});
  CHECK(parse_mechanisms("", "mechanisms_deny").empty());
  CHECK(parse_mechanisms("CKM_MD5 CKM_MD5 0x210", "mechanisms_deny") ==
        std::vector<CK_MECHANISM_TYPE>{CKM_MD5});  // CKM_MD5 is 0x210
}

TEST_CASE("policy: an unknown mechanism fails with a message naming it and the key") {
  CHECK(policy_error("[policy]\nmechanisms_deny = CKM_SHA256, CKM_SHA257\n") ==
        "[policy] mechanisms_deny (or P11MUX_POLICY_MECHANISMS_DENY): unknown mechanism "
        "'CKM_SHA257' (expected a CKM_ name, or 0x and hex digits for a vendor mechanism)");
  CHECK(policy_error("", {{"P11MUX_POLICY_MECHANISMS_ALLOW", "SHA256"}}).find("'SHA256'") !=
        std::string::npos);
  CHECK(policy_error("[policy]\nmechanisms_allow = 0x\n").find("'0x'") != std::string::npos);
  CHECK(policy_error("[policy]\nmechanisms_allow = 0x12g\n").find("'0x12g'") != std::string::npos);
  CHECK(policy_error("[policy]\nmechanisms_allow = 0x10000000000000000\n")
            .find("unknown mechanism") != std::string::npos);
}

TEST_CASE("policy: an unknown function, or one that cannot be denied, fails naming it") {
  CHECK(policy_error("[policy]\nfunctions_deny = C_InitToken, C_InitPin\n") ==
        "[policy] functions_deny (or P11MUX_POLICY_FUNCTIONS_DENY): unknown function "
        "'C_InitPin' (expected a PKCS#11 name such as C_InitToken)");
  for (std::string_view name : kUndeniableFunctions) {
    CAPTURE(name);
    CHECK(policy_error("[policy]\nfunctions_deny = " + std::string(name) + "\n")
              .find(std::string(name) + " cannot be denied") != std::string::npos);
  }
}

TEST_CASE("policy: mechanisms_allow, mechanisms_deny and both together") {
  SUBCASE("neither: every mechanism") {
    const Policy p = policy_of("[policy]\nread_only = true\n");
    CHECK_FALSE(p.filters_mechanisms());
    CHECK(p.mechanism_allowed(CKM_RSA_PKCS));
  }
  SUBCASE("deny only: all but the listed") {
    const Policy p = policy_of("[policy]\nmechanisms_deny = CKM_RSA_PKCS 0x80000001\n");
    CHECK(p.filters_mechanisms());
    CHECK_FALSE(p.mechanism_allowed(CKM_RSA_PKCS));
    CHECK_FALSE(p.mechanism_allowed(0x80000001UL));
    CHECK(p.mechanism_allowed(CKM_RSA_PKCS_PSS));
  }
  SUBCASE("allow only: only the listed") {
    const Policy p = policy_of("[policy]\nmechanisms_allow = CKM_ECDSA, CKM_RSA_PKCS_PSS\n");
    CHECK(p.mechanism_allowed(CKM_ECDSA));
    CHECK(p.mechanism_allowed(CKM_RSA_PKCS_PSS));
    CHECK_FALSE(p.mechanism_allowed(CKM_RSA_PKCS));
    CHECK_FALSE(p.mechanism_allowed(0x80000001UL));
  }
  SUBCASE("both: listed in allow and not in deny (deny wins)") {
    const Policy p = policy_of(
        "[policy]\nmechanisms_allow = CKM_ECDSA, CKM_RSA_PKCS, CKM_SHA256\n"
        "mechanisms_deny = CKM_RSA_PKCS, CKM_MD5\n");
    CHECK(p.mechanism_allowed(CKM_ECDSA));
    CHECK(p.mechanism_allowed(CKM_SHA256));
    CHECK_FALSE(p.mechanism_allowed(CKM_RSA_PKCS));  // in both
    CHECK_FALSE(p.mechanism_allowed(CKM_MD5));       // denied, not allowed anyway
    CHECK_FALSE(p.mechanism_allowed(CKM_AES_CBC));   // in neither
  }
}

TEST_CASE("policy: every call that takes a mechanism is refused with CKR_MECHANISM_INVALID") {
  const Policy p = policy_of("[policy]\nmechanisms_deny = CKM_RSA_PKCS\n");
  CK_MECHANISM bad = mech(CKM_RSA_PKCS), good = mech(CKM_RSA_PKCS_PSS);
  CK_ULONG n = 0;
  CK_OBJECT_HANDLE key = 0;
  auto refused = [](PolicyDecision d) {
    return d.rv == CKR_MECHANISM_INVALID && d.rule == PolicyRule::mechanism &&
           d.mechanism == CKM_RSA_PKCS;
  };
  CHECK(refused(p.check<fn::C_SignInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_EncryptInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_DecryptInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_VerifyInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_SignRecoverInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_VerifyRecoverInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_DigestInit>(CK_SESSION_HANDLE{1}, &bad)));
  CHECK(
      refused(p.check<fn::C_MessageEncryptInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(
      refused(p.check<fn::C_MessageDecryptInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_MessageSignInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_MessageVerifyInit>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2})));
  CHECK(refused(p.check<fn::C_GenerateKey>(CK_SESSION_HANDLE{1}, &bad, CK_ATTRIBUTE_PTR{},
                                           CK_ULONG{0}, &key)));
  CHECK(refused(p.check<fn::C_GenerateKeyPair>(CK_SESSION_HANDLE{1}, &bad, CK_ATTRIBUTE_PTR{},
                                               CK_ULONG{0}, CK_ATTRIBUTE_PTR{}, CK_ULONG{0}, &key,
                                               &key)));
  CHECK(refused(p.check<fn::C_WrapKey>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2},
                                       CK_OBJECT_HANDLE{3}, CK_BYTE_PTR{}, &n)));
  CHECK(refused(p.check<fn::C_UnwrapKey>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2},
                                         CK_BYTE_PTR{}, CK_ULONG{0}, CK_ATTRIBUTE_PTR{},
                                         CK_ULONG{0}, &key)));
  CHECK(refused(p.check<fn::C_DeriveKey>(CK_SESSION_HANDLE{1}, &bad, CK_OBJECT_HANDLE{2},
                                         CK_ATTRIBUTE_PTR{}, CK_ULONG{0}, &key)));
  CK_MECHANISM_INFO info{};
  CHECK(refused(
      p.check<fn::C_GetMechanismInfo>(CK_SLOT_ID{0}, CK_MECHANISM_TYPE{CKM_RSA_PKCS}, &info)));
  // Allowed: another mechanism, v3.0's NULL (cancel), calls without one.
  CHECK_FALSE(p.check<fn::C_SignInit>(CK_SESSION_HANDLE{1}, &good, CK_OBJECT_HANDLE{2}).refused());
  CHECK_FALSE(
      p.check<fn::C_SignInit>(CK_SESSION_HANDLE{1}, CK_MECHANISM_PTR{nullptr}, CK_OBJECT_HANDLE{2})
          .refused());
  CHECK_FALSE(p.check<fn::C_GetMechanismInfo>(CK_SLOT_ID{0}, CK_MECHANISM_TYPE{CKM_ECDSA}, &info)
                  .refused());
  CK_BYTE data[4] = {};
  CHECK_FALSE(p.check<fn::C_Sign>(CK_SESSION_HANDLE{1}, data, CK_ULONG{4}, data, &n).refused());
}

TEST_CASE("policy: functions_deny refuses the named functions with the spec's code") {
  const Policy p = policy_of(
      "[policy]\nfunctions_deny = C_InitToken C_CopyObject C_SetAttributeValue C_DestroyObject "
      "C_GenerateRandom\n");
  CK_OBJECT_HANDLE out = 0;
  PolicyDecision d =
      p.check<fn::C_InitToken>(CK_SLOT_ID{0}, CK_UTF8CHAR_PTR{}, CK_ULONG{0}, CK_UTF8CHAR_PTR{});
  CHECK(d.rv == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(d.rule == PolicyRule::function);
  CHECK(p.check<fn::C_CopyObject>(CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{2}, CK_ATTRIBUTE_PTR{},
                                  CK_ULONG{0}, &out)
            .rv == CKR_ACTION_PROHIBITED);
  CHECK(p.check<fn::C_SetAttributeValue>(CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{2},
                                         CK_ATTRIBUTE_PTR{}, CK_ULONG{0})
            .rv == CKR_ACTION_PROHIBITED);
  CHECK(p.check<fn::C_DestroyObject>(CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{2}).rv ==
        CKR_ACTION_PROHIBITED);
  CK_BYTE buf[4];
  CHECK(p.check<fn::C_GenerateRandom>(CK_SESSION_HANDLE{1}, buf, CK_ULONG{4}).rv ==
        CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_FALSE(p.check<fn::C_SeedRandom>(CK_SESSION_HANDLE{1}, buf, CK_ULONG{4}).refused());
  CHECK(p.function_denied(*policy_function_index("C_InitToken")));
  CHECK_FALSE(p.function_denied(*policy_function_index("C_InitPIN")));
}

TEST_CASE("policy: read_only refuses read-write sessions and every call that changes the token") {
  const Policy p = policy_of("[policy]\nread_only = true\n");
  CK_SESSION_HANDLE h = 0;
  CHECK(p.check<fn::C_OpenSession>(CK_SLOT_ID{0}, CK_FLAGS{CKF_SERIAL_SESSION | CKF_RW_SESSION},
                                   CK_VOID_PTR{}, CK_NOTIFY{}, &h)
            .rv == CKR_TOKEN_WRITE_PROTECTED);
  CHECK_FALSE(p.check<fn::C_OpenSession>(CK_SLOT_ID{0}, CK_FLAGS{CKF_SERIAL_SESSION}, CK_VOID_PTR{},
                                         CK_NOTIFY{}, &h)
                  .refused());
  // Without CKF_SERIAL_SESSION the call gets CKR_SESSION_PARALLEL_NOT_SUPPORTED downstream.
  CHECK_FALSE(p.check<fn::C_OpenSession>(CK_SLOT_ID{0}, CK_FLAGS{CKF_RW_SESSION}, CK_VOID_PTR{},
                                         CK_NOTIFY{}, &h)
                  .refused());
  CK_OBJECT_HANDLE o = 0;
  CK_MECHANISM m = mech(CKM_AES_KEY_GEN);
  auto write_protected = [](PolicyDecision d) {
    return d.rv == CKR_TOKEN_WRITE_PROTECTED && d.rule == PolicyRule::read_only;
  };
  CHECK(write_protected(
      p.check<fn::C_CreateObject>(CK_SESSION_HANDLE{1}, CK_ATTRIBUTE_PTR{}, CK_ULONG{0}, &o)));
  CHECK(write_protected(p.check<fn::C_CopyObject>(CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{2},
                                                  CK_ATTRIBUTE_PTR{}, CK_ULONG{0}, &o)));
  CHECK(write_protected(p.check<fn::C_DestroyObject>(CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{2})));
  CHECK(write_protected(p.check<fn::C_SetAttributeValue>(CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{2},
                                                         CK_ATTRIBUTE_PTR{}, CK_ULONG{0})));
  CHECK(write_protected(
      p.check<fn::C_GenerateKey>(CK_SESSION_HANDLE{1}, &m, CK_ATTRIBUTE_PTR{}, CK_ULONG{0}, &o)));
  CHECK(write_protected(p.check<fn::C_GenerateKeyPair>(CK_SESSION_HANDLE{1}, &m, CK_ATTRIBUTE_PTR{},
                                                       CK_ULONG{0}, CK_ATTRIBUTE_PTR{}, CK_ULONG{0},
                                                       &o, &o)));
  CHECK(write_protected(p.check<fn::C_UnwrapKey>(CK_SESSION_HANDLE{1}, &m, CK_OBJECT_HANDLE{2},
                                                 CK_BYTE_PTR{}, CK_ULONG{0}, CK_ATTRIBUTE_PTR{},
                                                 CK_ULONG{0}, &o)));
  CHECK(write_protected(p.check<fn::C_DeriveKey>(CK_SESSION_HANDLE{1}, &m, CK_OBJECT_HANDLE{2},
                                                 CK_ATTRIBUTE_PTR{}, CK_ULONG{0}, &o)));
  CHECK(write_protected(
      p.check<fn::C_InitToken>(CK_SLOT_ID{0}, CK_UTF8CHAR_PTR{}, CK_ULONG{0}, CK_UTF8CHAR_PTR{})));
  CHECK(write_protected(
      p.check<fn::C_InitPIN>(CK_SESSION_HANDLE{1}, CK_UTF8CHAR_PTR{}, CK_ULONG{0})));
  CHECK(write_protected(p.check<fn::C_SetPIN>(CK_SESSION_HANDLE{1}, CK_UTF8CHAR_PTR{}, CK_ULONG{0},
                                              CK_UTF8CHAR_PTR{}, CK_ULONG{0})));
  // Reading, using keys, wrapping (which changes nothing) and logging in stay allowed.
  CK_ULONG n = 0;
  CHECK_FALSE(p.check<fn::C_WrapKey>(CK_SESSION_HANDLE{1}, &m, CK_OBJECT_HANDLE{2},
                                     CK_OBJECT_HANDLE{3}, CK_BYTE_PTR{}, &n)
                  .refused());
  CHECK_FALSE(p.check<fn::C_SignInit>(CK_SESSION_HANDLE{1}, &m, CK_OBJECT_HANDLE{2}).refused());
  CHECK_FALSE(p.check<fn::C_Login>(CK_SESSION_HANDLE{1}, CK_USER_TYPE{CKU_USER}, CK_UTF8CHAR_PTR{},
                                   CK_ULONG{0})
                  .refused());
  CHECK_FALSE(p.check<fn::C_GetAttributeValue>(CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{2},
                                               CK_ATTRIBUTE_PTR{}, CK_ULONG{0})
                  .refused());
  // The set is exactly the functions of kChangesToken, each in functions.h.
  for (std::string_view name : kChangesToken) CHECK(policy_function_index(name).has_value());
}

TEST_CASE("policy: a function denied wins over read_only and the mechanism rule") {
  const Policy p = policy_of(
      "[policy]\nfunctions_deny = C_GenerateKey\nread_only = true\n"
      "mechanisms_deny = CKM_AES_KEY_GEN\n");
  CK_MECHANISM m = mech(CKM_AES_KEY_GEN);
  CK_OBJECT_HANDLE o = 0;
  CHECK(p.check<fn::C_GenerateKey>(CK_SESSION_HANDLE{1}, &m, CK_ATTRIBUTE_PTR{}, CK_ULONG{0}, &o)
            .rule == PolicyRule::function);
  CHECK(p.check<fn::C_DeriveKey>(CK_SESSION_HANDLE{1}, &m, CK_OBJECT_HANDLE{2}, CK_ATTRIBUTE_PTR{},
                                 CK_ULONG{0}, &o)
            .rule == PolicyRule::read_only);
}

TEST_CASE("policy: describe says what is on") {
  CHECK(policy_of("[policy]\nmechanisms_allow = CKM_SHA256 0x80000001\nread_only = true\n"
                  "functions_deny = C_InitToken\n")
            .describe() ==
        "policy: mechanisms only CKM_SHA256,0x80000001 functions denied C_InitToken read-only");
  CHECK(policy_of("[policy]\nmechanisms_deny = CKM_MD5\n").describe() ==
        "policy: mechanisms but CKM_MD5");
}

TEST_CASE("policy: refusals are counted by rule in p11mux_policy_denied_total") {
  Metrics metrics;
  metrics.record_policy_denied(PolicyRule::mechanism);
  metrics.record_policy_denied(PolicyRule::mechanism);
  metrics.record_policy_denied(PolicyRule::read_only);
  const MetricsSnapshot snap = metrics.snapshot();
  CHECK(snap.policy_denied[static_cast<std::size_t>(PolicyRule::mechanism)] == 2);
  CHECK(snap.policy_denied[static_cast<std::size_t>(PolicyRule::function)] == 0);
  const std::string text = prometheus_text(snap, LiveFigures{});
  CHECK(text.find("# TYPE p11mux_policy_denied_total counter\n") != std::string::npos);
  CHECK(text.find("p11mux_policy_denied_total{rule=\"mechanism\"} 2\n") != std::string::npos);
  CHECK(text.find("p11mux_policy_denied_total{rule=\"function\"} 0\n") != std::string::npos);
  CHECK(text.find("p11mux_policy_denied_total{rule=\"read_only\"} 1\n") != std::string::npos);
}

// The two examples of README.md, "Policy", as written there.
TEST_CASE("policy: the README's examples parse and do what the README says") {
  const Policy tls = policy_of(
      "[policy]\n"
      "mechanisms_allow = CKM_ECDSA CKM_ECDSA_SHA256 CKM_RSA_PKCS_PSS CKM_SHA256_RSA_PKCS_PSS\n"
      "functions_deny = C_InitToken, C_InitPIN, C_SetPIN\n");
  CHECK(tls.mechanism_allowed(CKM_ECDSA));
  CHECK(tls.mechanism_allowed(CKM_SHA256_RSA_PKCS_PSS));
  CHECK_FALSE(tls.mechanism_allowed(CKM_RSA_PKCS));
  CHECK_FALSE(tls.mechanism_allowed(CKM_AES_GCM));
  CHECK(tls.function_denied(*policy_function_index("C_SetPIN")));
  const Policy auditor = policy_of(
      "[policy]\n"
      "read_only = true\n"
      "functions_deny = C_SignInit C_SignRecoverInit C_DecryptInit C_WrapKey C_MessageSignInit "
      "C_MessageDecryptInit\n");
  CHECK(auditor.read_only());
  CHECK_FALSE(auditor.filters_mechanisms());
  for (std::string_view f : {"C_SignInit", "C_SignRecoverInit", "C_DecryptInit", "C_WrapKey",
                             "C_MessageSignInit", "C_MessageDecryptInit"})
    CHECK(auditor.function_denied(*policy_function_index(f)));
  CHECK_FALSE(auditor.function_denied(*policy_function_index("C_VerifyInit")));
  CHECK_FALSE(auditor.function_denied(*policy_function_index("C_FindObjectsInit")));
}

}  // namespace p11mux
