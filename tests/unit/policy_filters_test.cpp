// Unit tests for proxy/policy/filters: the `tokens` and `objects` keys, their
// parsing and errors, the matching of a token (padding, label or serial) and
// of an object (label, label prefix, ID), the check of a template that makes
// or changes an object, which calls each filter changes, and the counter of
// their refusals in the /stats report.
#include "config/config.hpp"
#include "observe/metrics.hpp"
#include "observe/stats_report.hpp"
#include "policy/filters.hpp"
#include "policy/policy.hpp"

#include "fake_environment.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <string>

namespace p11mux {
namespace {

Config parse(std::string_view text, EnvMap vars = {}) {
  return parse_config(text, "test.conf", env_from(std::move(vars)));
}

template <class Filter>
std::string error_of(std::string_view text) {
  try {
    Filter filter(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

// A token as a backend describes it: blank-padded fields.
CK_TOKEN_INFO token(std::string_view label, std::string_view serial, char pad = ' ') {
  CK_TOKEN_INFO info{};
  std::memset(info.label, pad, sizeof info.label);
  std::memcpy(info.label, label.data(), label.size());
  std::memset(info.serialNumber, pad, sizeof info.serialNumber);
  std::memcpy(info.serialNumber, serial.data(), serial.size());
  return info;
}

CK_ATTRIBUTE attr(CK_ATTRIBUTE_TYPE type, const char* value) {
  return {type, const_cast<char*>(value), std::strlen(value)};
}

}  // namespace

TEST_CASE("filters: tokens and objects are read from the file and the environment") {
  const Config config = parse("[policy]\ntokens = web, serial:42\nobjects = label:tls-key\n",
                              {{"P11MUX_POLICY_OBJECTS", "id:0a1b"}});
  CHECK(config.policy.tokens == "web, serial:42");
  CHECK(config.policy.objects == "id:0a1b");
  CHECK(config.policy.any());
  CHECK(parse("", {{"P11MUX_POLICY_TOKENS", "t"}}).policy.any());
  CHECK(parse("[policy]\nobjects = label:k\n").policy.any());
  CHECK_FALSE(parse("[policy]\ntokens =\nobjects =\n").policy.any());
}

TEST_CASE("filters: a token matches by label or serial, less its padding") {
  const TokenFilter filter("web token, serial:0042, label:db");
  CHECK(filter.on());
  CHECK(filter.exposes(token("web token", "1")));      // bare: label...
  CHECK(filter.exposes(token("other", "web token")));  // ... or serial
  CHECK(filter.exposes(token("x", "0042")));
  CHECK_FALSE(filter.exposes(token("0042", "x")));  // serial: only the serial
  CHECK(filter.exposes(token("db", "x")));
  CHECK_FALSE(filter.exposes(token("x", "db")));  // label: only the label
  // Exact, less the padding: neither a prefix nor case-blind, blanks inside kept.
  CHECK_FALSE(filter.exposes(token("web", "1")));
  CHECK_FALSE(filter.exposes(token("web token 2", "1")));
  CHECK_FALSE(filter.exposes(token("Web Token", "1")));
  CHECK_FALSE(filter.exposes(token("webtoken", "1")));
  // Modules that pad with NULs are read the same way.
  CHECK(filter.exposes(token("db", "x", '\0')));
  // A label of the full 32 bytes, no padding at all.
  const std::string full(32, 'L');
  CHECK(TokenFilter("label:" + full).exposes(token(full, "1")));
  CHECK_FALSE(TokenFilter("").on());
}

TEST_CASE("filters: a bad tokens entry is an error naming it") {
  CHECK(error_of<TokenFilter>("a, label:") ==
        "[policy] tokens (or P11MUX_POLICY_TOKENS): 'label:' names no token");
  CHECK(error_of<TokenFilter>("serial:12345678901234567") ==
        "[policy] tokens (or P11MUX_POLICY_TOKENS): 'serial:12345678901234567' is longer than a "
        "token's serial number (16 bytes): it can never match");
  CHECK(error_of<TokenFilter>(std::string(33, 'x')).find("can never match") != std::string::npos);
  CHECK(error_of<TokenFilter>(" a , b ,, ") == "(no error)");  // empty entries are skipped
}

TEST_CASE("filters: an object matches by label, label prefix or ID") {
  const ObjectFilter filter("label:tls-key, label:web-*, id:0A1b");
  CHECK(filter.on());
  CHECK(filter.exposes(std::string_view("tls-key"), std::nullopt));
  CHECK_FALSE(filter.exposes(std::string_view("tls-key2"), std::nullopt));
  CHECK_FALSE(filter.exposes(std::string_view("tls"), std::nullopt));
  CHECK(filter.exposes(std::string_view("web-"), std::nullopt));
  CHECK(filter.exposes(std::string_view("web-1"), std::nullopt));
  CHECK_FALSE(filter.exposes(std::string_view("we"), std::nullopt));
  CHECK(filter.exposes(std::nullopt, std::string_view("\x0a\x1b", 2)));
  CHECK(filter.exposes(std::string_view("other"), std::string_view("\x0a\x1b", 2)));
  CHECK_FALSE(filter.exposes(std::nullopt, std::string_view("\x0a\x1b\x00", 3)));
  CHECK_FALSE(filter.exposes(std::nullopt, std::nullopt));
  CHECK_FALSE(filter.exposes(std::string_view(""), std::string_view("")));
  CHECK(filter.describe() == "label:tls-key,label:web-*,id:0a1b");
}

TEST_CASE("filters: a bad objects entry is an error naming it") {
  const std::string key = "[policy] objects (or P11MUX_POLICY_OBJECTS): ";
  CHECK(error_of<ObjectFilter>("tls-key") ==
        key + "'tls-key' is neither label:NAME nor id:HEX (e.g. label:tls-key, id:0a1b)");
  CHECK(error_of<ObjectFilter>("label:a, id:0a1") ==
        key + "'id:0a1' is not an ID in hex (two hex digits per byte, e.g. id:0a1b)");
  CHECK(error_of<ObjectFilter>("id:zz").find("'id:zz' is not an ID in hex") != std::string::npos);
  CHECK(error_of<ObjectFilter>("id:").find("'id:' is not an ID in hex") != std::string::npos);
  CHECK(error_of<ObjectFilter>("label:").find("'label:' names no label") != std::string::npos);
  CHECK(error_of<ObjectFilter>("label:*") == "(no error)");
}

TEST_CASE("filters: an unknown or ill-formed value fails the policy, naming it") {
  CHECK_THROWS_WITH_AS(Policy(parse("[policy]\nobjects = key:x\n").policy),
                       doctest::Contains("'key:x' is neither label:NAME nor id:HEX"), ConfigError);
  CHECK_THROWS_WITH_AS(Policy(parse("", {{"P11MUX_POLICY_TOKENS", "label:"}}).policy),
                       doctest::Contains("P11MUX_POLICY_TOKENS"), ConfigError);
  const Policy policy(parse("[policy]\ntokens = a\nobjects = id:01\n").policy);
  CHECK(policy.tokens().on());
  CHECK(policy.objects().on());
  CHECK(policy.describe() == "policy: tokens a objects id:01");
}

TEST_CASE("filters: a template is checked for what the object becomes") {
  const ObjectFilter filter("label:tls-key, id:01");
  CK_ATTRIBUTE good_label[] = {attr(CKA_LABEL, "tls-key")};
  CK_ATTRIBUTE bad_label[] = {attr(CKA_LABEL, "other")};
  CK_ATTRIBUTE good_id[] = {attr(CKA_LABEL, "other"), attr(CKA_ID, "\x01")};
  CK_ATTRIBUTE neither[] = {attr(CKA_APPLICATION, "x")};
  CHECK(filter.check_template(good_label, 1) == CKR_OK);
  CHECK(filter.check_template(good_id, 2) == CKR_OK);  // either attribute will do
  CHECK(filter.check_template(bad_label, 1) == CKR_ATTRIBUTE_VALUE_INVALID);
  CHECK(filter.check_template(neither, 1) == CKR_TEMPLATE_INCOMPLETE);
  CHECK(filter.check_template(nullptr, 0) == CKR_TEMPLATE_INCOMPLETE);
  // A change (or a copy) keeps what the template does not set...
  CHECK(filter.check_template(neither, 1, std::string_view("tls-key"), std::nullopt) == CKR_OK);
  CHECK(filter.check_template(bad_label, 1, std::string_view("x"), std::string_view("\x01")) ==
        CKR_OK);
  // ... and loses what it sets.
  CHECK(filter.check_template(bad_label, 1, std::string_view("tls-key"), std::nullopt) ==
        CKR_ATTRIBUTE_VALUE_INVALID);
  // The last value of an attribute given twice is the one a token keeps.
  CK_ATTRIBUTE twice[] = {attr(CKA_LABEL, "tls-key"), attr(CKA_LABEL, "other")};
  CHECK(filter.check_template(twice, 2) == CKR_ATTRIBUTE_VALUE_INVALID);
}

TEST_CASE("filters: which calls each filter changes, and the code for a hidden handle") {
  CHECK(kNamesSlot<fn::C_OpenSession>);
  CHECK(kNamesSlot<fn::C_GetSlotInfo>);
  CHECK(kNamesSlot<fn::C_InitToken>);
  CHECK(kNamesSlot<fn::C_CloseAllSessions>);
  CHECK_FALSE(kNamesSlot<fn::C_GetSlotList>);  // filtered, not refused
  CHECK_FALSE(kNamesSlot<fn::C_Sign>);

  CHECK(object_handle_args<fn::C_SignInit>()[0].index == 2);
  CHECK(object_handle_args<fn::C_SignInit>()[0].invalid == CKR_KEY_HANDLE_INVALID);
  CHECK(object_handle_args<fn::C_DigestKey>()[0].invalid == CKR_KEY_HANDLE_INVALID);
  CHECK(object_handle_args<fn::C_DeriveKey>()[0].invalid == CKR_KEY_HANDLE_INVALID);
  CHECK(object_handle_args<fn::C_GetAttributeValue>()[0].invalid == CKR_OBJECT_HANDLE_INVALID);
  CHECK(object_handle_args<fn::C_DestroyObject>()[0].invalid == CKR_OBJECT_HANDLE_INVALID);
  constexpr auto wrap = object_handle_args<fn::C_WrapKey>();
  CHECK(wrap.size() == 2);
  CHECK(wrap[0].invalid == CKR_WRAPPING_KEY_HANDLE_INVALID);
  CHECK(wrap[1].invalid == CKR_KEY_HANDLE_INVALID);
  CHECK(object_handle_args<fn::C_UnwrapKey>()[0].invalid == CKR_UNWRAPPING_KEY_HANDLE_INVALID);
  CHECK(object_handle_args<fn::C_MessageSignInit>().size() == 1);
  CHECK(object_handle_args<fn::C_SetOperationState>().size() == 2);
  CHECK(object_handle_args<fn::C_Sign>().size() == 0);

  CHECK(creation_templates<fn::C_GenerateKeyPair>().size() == 2);
  CHECK(creation_templates<fn::C_UnwrapKey>()[0] == 5);
  CHECK(creation_templates<fn::C_CopyObject>().size() == 0);  // checked with its source

  CHECK(kFiltersObjects<fn::C_FindObjects>);
  CHECK(kFiltersObjects<fn::C_CreateObject>);
  CHECK(kFiltersObjects<fn::C_CopyObject>);
  CHECK_FALSE(kFiltersObjects<fn::C_FindObjectsInit>);
  CHECK_FALSE(kFiltersObjects<fn::C_Sign>);
  CHECK_FALSE(kFiltersObjects<fn::C_GenerateRandom>);
}

TEST_CASE("filters: the /stats report counts the policy's refusals by rule") {
  Metrics metrics;
  metrics.record_policy_denied(PolicyRule::token);
  metrics.record_policy_denied(PolicyRule::object);
  metrics.record_policy_denied(PolicyRule::object);
  const std::string json = stats_json(metrics.snapshot(), LiveFigures{});
  INFO(json);
  // Every rule, in the order of kPolicyRuleNames, each with its count.
  const auto at = json.find("\"policy_denied\":{\"mechanism\":0,\"function\":0,\"read_only\":0,");
  REQUIRE(at != std::string::npos);
  CHECK(json.find("\"token\":1", at) != std::string::npos);
  CHECK(json.find("\"object\":2", at) != std::string::npos);
  const std::string prom = prometheus_text(metrics.snapshot(), LiveFigures{});
  CHECK(prom.find("p11mux_policy_denied_total{rule=\"object\"} 2") != std::string::npos);
  CHECK(prom.find("p11mux_policy_denied_total{rule=\"token\"} 1") != std::string::npos);
}

}  // namespace p11mux
