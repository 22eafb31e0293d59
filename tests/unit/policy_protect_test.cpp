// Unit tests for proxy/policy/protect: the `protect` key, its rule names, and
// the pure checks of each rule (conflicting and sticky attributes, wrapping
// with a trusted key, the padding oracle).
#include "config/config.hpp"
#include "policy/policy.hpp"
#include "policy/protect.hpp"

#include "fake_environment.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

namespace p11mux {
namespace {

Config parse(std::string_view text, EnvMap vars = {}) {
  return parse_config(text, "test.conf", env_from(std::move(vars)));
}

std::string protect_error(std::string_view text) {
  try {
    Protect p(text, nullptr);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

// A template of boolean attributes; the values live as long as the template.
struct Template {
  std::vector<CK_BBOOL> values;
  std::vector<CK_ATTRIBUTE> attributes;
  Template(std::initializer_list<std::pair<CK_ATTRIBUTE_TYPE, bool>> list) {
    values.reserve(list.size());
    for (auto [type, on] : list) {
      values.push_back(on ? CK_TRUE : CK_FALSE);
      attributes.push_back({type, &values.back(), sizeof(CK_BBOOL)});
    }
  }
  KeyAttributes key() const {
    return KeyAttributes::from_template(attributes.data(),
                                        static_cast<CK_ULONG>(attributes.size()));
  }
};

}  // namespace

TEST_CASE("protect: the key is read from the file and from P11MUX_POLICY_PROTECT") {
  CHECK(parse("[policy]\nprotect = wrap-trusted\n").policy.protect == "wrap-trusted");
  CHECK(parse("[policy]\nprotect = wrap-trusted\n", {{"P11MUX_POLICY_PROTECT", "all"}})
            .policy.protect == "all");
  CHECK(parse("", {{"P11MUX_POLICY_PROTECT", "all"}}).policy.any());
  CHECK_FALSE(parse("").policy.any());
}

TEST_CASE("protect: rule names, all, and nothing") {
  const Protect none;
  CHECK_FALSE(none.any());
  CHECK(none.change_lock() == nullptr);

  const Protect all("all", nullptr);
  CHECK(all.describe() ==
        "conflicting-attributes,sticky-attributes,wrap-trusted,no-padding-oracle");
  CHECK(all.change_lock() != nullptr);

  const Protect some("no-padding-oracle, wrap-trusted", nullptr);
  CHECK(some.on(ProtectRule::no_padding_oracle));
  CHECK(some.on(ProtectRule::wrap_trusted));
  CHECK_FALSE(some.on(ProtectRule::conflicting_attributes));
  CHECK_FALSE(some.on(ProtectRule::sticky_attributes));
  // Neither attribute rule: changes are not read, so no lock.
  CHECK(some.change_lock() == nullptr);
  CHECK(Protect("sticky-attributes", nullptr).change_lock() != nullptr);
}

TEST_CASE("protect: an unknown rule fails naming it, the key and the variable") {
  const std::string e = protect_error("sticky-attributes, no-paddingoracle");
  CHECK(e.find("unknown rule 'no-paddingoracle'") != std::string::npos);
  CHECK(e.find("[policy] protect (or P11MUX_POLICY_PROTECT)") != std::string::npos);
  // Through the policy, as C_Initialize builds it.
  CHECK_THROWS_WITH_AS(Policy(parse("[policy]\nprotect = All\n").policy),
                       doctest::Contains("unknown rule 'All'"), ConfigError);
  CHECK(
      Policy(parse("[policy]\nprotect = all\n").policy)
          .describe()
          .find(
              "protect conflicting-attributes,sticky-attributes,wrap-trusted,no-padding-oracle") !=
      std::string::npos);
}

TEST_CASE("protect: each refusal is counted under its own rule name") {
  CHECK(to_string(policy_rule(ProtectRule::conflicting_attributes)) == "conflicting-attributes");
  CHECK(to_string(policy_rule(ProtectRule::sticky_attributes)) == "sticky-attributes");
  CHECK(to_string(policy_rule(ProtectRule::wrap_trusted)) == "wrap-trusted");
  CHECK(to_string(policy_rule(ProtectRule::no_padding_oracle)) == "no-padding-oracle");
}

TEST_CASE("protect: conflicting attributes in a template") {
  CHECK(conflicting(Template{{CKA_WRAP, true}, {CKA_DECRYPT, true}}.key()));
  CHECK(conflicting(Template{{CKA_UNWRAP, true}, {CKA_ENCRYPT, true}}.key()));
  CHECK_FALSE(conflicting(Template{{CKA_WRAP, true}, {CKA_DECRYPT, false}}.key()));
  CHECK_FALSE(conflicting(Template{{CKA_WRAP, true}, {CKA_UNWRAP, true}}.key()));
  CHECK_FALSE(conflicting(Template{{CKA_ENCRYPT, true}, {CKA_DECRYPT, true}}.key()));
  CHECK_FALSE(conflicting(Template{{CKA_WRAP, true}, {CKA_ENCRYPT, true}}.key()));
  // Only what the template says: a token's defaults are not known here.
  CHECK_FALSE(conflicting(Template{{CKA_WRAP, true}}.key()));
  // A template naming an attribute twice: either value may be the one taken.
  CHECK(conflicting(Template{{CKA_WRAP, true}, {CKA_DECRYPT, false}, {CKA_DECRYPT, true}}.key()));
  CHECK(conflicting(Template{{CKA_DECRYPT, true}, {CKA_WRAP, true}, {CKA_WRAP, false}}.key()));
}

TEST_CASE("protect: a boolean value is true when any byte is not zero") {
  CK_BBOOL two = 2;
  CK_ULONG long_true = 1;
  CK_ULONG long_false = 0;
  CK_BBOOL on = CK_TRUE;
  std::vector<CK_ATTRIBUTE> t{{CKA_WRAP, &two, 1}, {CKA_DECRYPT, &long_true, sizeof long_true}};
  CHECK(conflicting(KeyAttributes::from_template(t.data(), 2)));
  t[1] = {CKA_DECRYPT, &long_false, sizeof long_false};
  CHECK_FALSE(conflicting(KeyAttributes::from_template(t.data(), 2)));
  // No value, or an empty one, says nothing.
  t[1] = {CKA_DECRYPT, nullptr, 1};
  CHECK_FALSE(KeyAttributes::from_template(t.data(), 2).decrypt.known());
  t[1] = {CKA_DECRYPT, &on, 0};
  CHECK_FALSE(KeyAttributes::from_template(t.data(), 2).decrypt.known());
  CHECK_FALSE(KeyAttributes::from_template(nullptr, 3).wrap.known());
}

TEST_CASE("protect: a change conflicts with what the key already is") {
  const KeyAttributes wrap_key = Template{{CKA_WRAP, true}, {CKA_DECRYPT, false}}.key();
  CHECK(conflicting(wrap_key.changed_by(Template{{CKA_DECRYPT, true}}.key())));
  // Turning wrap off in the same change makes it fine.
  CHECK_FALSE(
      conflicting(wrap_key.changed_by(Template{{CKA_DECRYPT, true}, {CKA_WRAP, false}}.key())));
  CHECK_FALSE(conflicting(wrap_key.changed_by(Template{{CKA_LABEL, true}}.key())));
  const KeyAttributes encrypt_key = Template{{CKA_ENCRYPT, true}}.key();
  CHECK(conflicting(encrypt_key.changed_by(Template{{CKA_UNWRAP, true}}.key())));
  // A key that already conflicts (made before p11mux) cannot be changed
  // without undoing it.
  const KeyAttributes bad = Template{{CKA_WRAP, true}, {CKA_DECRYPT, true}}.key();
  CHECK(conflicting(bad.changed_by(Template{{CKA_LABEL, true}}.key())));
  CHECK_FALSE(conflicting(bad.changed_by(Template{{CKA_WRAP, false}}.key())));
}

TEST_CASE("protect: sticky attributes only move the safe way") {
  const KeyAttributes sensitive = Template{{CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, false}}.key();
  CHECK(sticky_violation(sensitive, Template{{CKA_SENSITIVE, false}}.key()) == CKA_SENSITIVE);
  CHECK(sticky_violation(sensitive, Template{{CKA_EXTRACTABLE, true}}.key()) == CKA_EXTRACTABLE);
  CHECK_FALSE(sticky_violation(sensitive, Template{{CKA_SENSITIVE, true}}.key()));
  CHECK_FALSE(sticky_violation(sensitive, Template{{CKA_EXTRACTABLE, false}}.key()));
  CHECK_FALSE(sticky_violation(sensitive, Template{{CKA_WRAP, true}}.key()));
  // Twice in one template: the false one may be taken.
  CHECK(
      sticky_violation(sensitive, Template{{CKA_SENSITIVE, true}, {CKA_SENSITIVE, false}}.key()) ==
      CKA_SENSITIVE);

  const KeyAttributes open = Template{{CKA_SENSITIVE, false}, {CKA_EXTRACTABLE, true}}.key();
  CHECK_FALSE(sticky_violation(open, Template{{CKA_SENSITIVE, true}}.key()));
  CHECK_FALSE(sticky_violation(open, Template{{CKA_EXTRACTABLE, false}}.key()));
  CHECK_FALSE(sticky_violation(open, Template{{CKA_SENSITIVE, false}}.key()));
  // An object without the attributes (a certificate) has nothing to keep.
  CHECK_FALSE(sticky_violation(KeyAttributes{}, Template{{CKA_SENSITIVE, false}}.key()));
}

TEST_CASE("protect: wrapping a sensitive key needs a trusted wrapping key") {
  CHECK(wrap_allowed(false, false, false));
  CHECK_FALSE(wrap_allowed(true, false, false));
  CHECK(wrap_allowed(true, false, true));
  CHECK(wrap_allowed(true, true, false));
}

TEST_CASE("protect: the padding oracle is CKM_RSA_PKCS, not OAEP or raw RSA") {
  CHECK(padding_oracle(CKM_RSA_PKCS));
  CHECK_FALSE(padding_oracle(CKM_RSA_PKCS_OAEP));
  CHECK_FALSE(padding_oracle(CKM_AES_KEY_WRAP));
  CHECK_FALSE(padding_oracle(CKM_RSA_PKCS_PSS));
}

}  // namespace p11mux
