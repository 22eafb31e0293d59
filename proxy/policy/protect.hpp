// [policy] protect: the rules against the known key-extraction attacks
// (docs/policy.md, "Attacks"), parsed at C_Initialize, and the pure checks
// they make on a template and on a key's current attributes. No runtime, no
// backend: protect_enforce.hpp reads the attributes a check needs from the
// backend and applies the outcome.
//
// What each rule refuses, and with which code (docs/policy.md says why):
//   conflicting-attributes  a template giving one key both CKA_WRAP and
//                           CKA_DECRYPT, or both CKA_UNWRAP and CKA_ENCRYPT:
//                           CKR_TEMPLATE_INCONSISTENT; a C_SetAttributeValue
//                           or C_CopyObject whose template is fine alone but
//                           conflicts with the key's current attributes:
//                           CKR_ACTION_PROHIBITED
//   sticky-attributes       CKA_SENSITIVE true -> false, CKA_EXTRACTABLE
//                           false -> true (C_SetAttributeValue, C_CopyObject):
//                           CKR_ATTRIBUTE_READ_ONLY
//   wrap-trusted            C_WrapKey of a CKA_SENSITIVE key by a wrapping
//                           key without CKA_TRUSTED, unless the key has
//                           CKA_WRAP_WITH_TRUSTED: CKR_KEY_NOT_WRAPPABLE
//   no-padding-oracle       CKM_RSA_PKCS in C_DecryptInit and C_UnwrapKey:
//                           CKR_MECHANISM_INVALID
#pragma once

#include "policy/policy_rule.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace p11mux {

class Mutex;
struct LockSource;

enum class ProtectRule : std::uint8_t {
  conflicting_attributes,
  sticky_attributes,
  wrap_trusted,
  no_padding_oracle,
};

inline constexpr std::array<std::string_view, 4> kProtectRuleNames{
    "conflicting-attributes", "sticky-attributes", "wrap-trusted", "no-padding-oracle"};

// The rule a refusal is counted and logged under.
constexpr PolicyRule policy_rule(ProtectRule rule) noexcept {
  switch (rule) {
    case ProtectRule::conflicting_attributes:
      return PolicyRule::conflicting_attributes;
    case ProtectRule::sticky_attributes:
      return PolicyRule::sticky_attributes;
    case ProtectRule::wrap_trusted:
      return PolicyRule::wrap_trusted;
    case ProtectRule::no_padding_oracle:
      break;
  }
  return PolicyRule::no_padding_oracle;
}

// What one boolean attribute is, as far as a template or an object says:
// a template may name an attribute twice, and a token may take either
// occurrence, so each value any occurrence gives is kept.
struct BoolAttribute {
  bool may_be_true = false;
  bool may_be_false = false;
  bool known() const noexcept { return may_be_true || may_be_false; }
};

// The attributes the rules look at.
struct KeyAttributes {
  BoolAttribute wrap, unwrap, encrypt, decrypt, sensitive, extractable;

  // The boolean attributes a template sets. A value of any length counts:
  // true when any of its bytes is not zero (a token may read CK_TRUE as any
  // non-zero value), false when all are zero; an empty or NULL value says
  // nothing.
  static KeyAttributes from_template(const CK_ATTRIBUTE* attributes, CK_ULONG count) noexcept;

  // These attributes after `change` is applied: what the change sets
  // replaces what they were.
  KeyAttributes changed_by(const KeyAttributes& change) const noexcept;
};

// One of the two pairs (wrap and decrypt, unwrap and encrypt) may be on together.
bool conflicting(const KeyAttributes& key) noexcept;

// The attribute `change` would move the wrong way on a key that has
// `current`, or nothing: CKA_SENSITIVE off once on, CKA_EXTRACTABLE on once off.
std::optional<CK_ATTRIBUTE_TYPE> sticky_violation(const KeyAttributes& current,
                                                  const KeyAttributes& change) noexcept;

// Whether C_WrapKey may wrap a key that is (maybe) sensitive, has
// CKA_WRAP_WITH_TRUSTED or not, with a wrapping key that has CKA_TRUSTED or not.
constexpr bool wrap_allowed(bool key_sensitive, bool key_wrap_with_trusted,
                            bool wrapping_key_trusted) noexcept {
  return !key_sensitive || key_wrap_with_trusted || wrapping_key_trusted;
}

// The padding oracle: CKM_RSA_PKCS used to decrypt or unwrap, where a
// padding error tells the caller something about the plaintext.
constexpr bool padding_oracle(CK_MECHANISM_TYPE mechanism) noexcept {
  return mechanism == CKM_RSA_PKCS;
}

// The rules on, from `[policy] protect`.
class Protect {
 public:
  Protect() noexcept;
  // Throws ConfigError naming the key and the entry it does not know.
  // `locks`: the runtime's (the lock of attribute changes locks through the
  // application's callbacks when it gave them); it must outlive this.
  Protect(std::string_view text, const LockSource* locks);
  ~Protect();
  Protect(Protect&&) noexcept;
  Protect& operator=(Protect&&) noexcept;

  bool on(ProtectRule rule) const noexcept {
    return (bits_ & (1U << static_cast<unsigned>(rule))) != 0;
  }
  bool any() const noexcept { return bits_ != 0; }
  // The rules on, by name, separated by commas (empty when none).
  std::string describe() const;

  // Held from reading a key's attributes to the backend's answer of the
  // C_SetAttributeValue or C_CopyObject they allowed, so that two changes
  // racing on one key cannot each pass the check alone (one sets CKA_WRAP,
  // the other CKA_DECRYPT). NULL unless sticky- or conflicting-attributes is on.
  Mutex* change_lock() const noexcept { return change_lock_.get(); }

 private:
  std::uint8_t bits_ = 0;
  std::unique_ptr<Mutex> change_lock_;
};

}  // namespace p11mux
