#include "policy/protect.hpp"

#include "config/config.hpp"
#include "sync/lock.hpp"

#include <spdlog/fmt/fmt.h>

#include <algorithm>

namespace p11mux {
namespace {

constexpr std::string_view kAll = "all";

// The value of a boolean attribute in a template, or nothing when it has none.
std::optional<bool> bool_value(const CK_ATTRIBUTE& a) noexcept {
  if (a.pValue == nullptr || a.ulValueLen == 0 || a.ulValueLen == CK_UNAVAILABLE_INFORMATION)
    return std::nullopt;
  const auto* bytes = static_cast<const unsigned char*>(a.pValue);
  return std::any_of(bytes, bytes + a.ulValueLen, [](unsigned char b) { return b != 0; });
}

void note(BoolAttribute& into, bool value) noexcept {
  (value ? into.may_be_true : into.may_be_false) = true;
}

BoolAttribute replaced(const BoolAttribute& was, const BoolAttribute& change) noexcept {
  return change.known() ? change : was;
}

}  // namespace

KeyAttributes KeyAttributes::from_template(const CK_ATTRIBUTE* attributes,
                                           CK_ULONG count) noexcept {
  KeyAttributes out;
  if (attributes == nullptr) return out;
  for (CK_ULONG i = 0; i < count; ++i) {
    const std::optional<bool> value = bool_value(attributes[i]);
    if (!value) continue;
    switch (attributes[i].type) {
      case CKA_WRAP:
        note(out.wrap, *value);
        break;
      case CKA_UNWRAP:
        note(out.unwrap, *value);
        break;
      case CKA_ENCRYPT:
        note(out.encrypt, *value);
        break;
      case CKA_DECRYPT:
        note(out.decrypt, *value);
        break;
      case CKA_SENSITIVE:
        note(out.sensitive, *value);
        break;
      case CKA_EXTRACTABLE:
        note(out.extractable, *value);
        break;
      default:
        break;
    }
  }
  return out;
}

KeyAttributes KeyAttributes::changed_by(const KeyAttributes& change) const noexcept {
  return {replaced(wrap, change.wrap),           replaced(unwrap, change.unwrap),
          replaced(encrypt, change.encrypt),     replaced(decrypt, change.decrypt),
          replaced(sensitive, change.sensitive), replaced(extractable, change.extractable)};
}

bool conflicting(const KeyAttributes& key) noexcept {
  return (key.wrap.may_be_true && key.decrypt.may_be_true) ||
         (key.unwrap.may_be_true && key.encrypt.may_be_true);
}

std::optional<CK_ATTRIBUTE_TYPE> sticky_violation(const KeyAttributes& current,
                                                  const KeyAttributes& change) noexcept {
  if (current.sensitive.may_be_true && change.sensitive.may_be_false) return CKA_SENSITIVE;
  if (current.extractable.may_be_false && change.extractable.may_be_true) return CKA_EXTRACTABLE;
  return std::nullopt;
}

Protect::Protect() noexcept = default;
Protect::~Protect() = default;
Protect::Protect(Protect&&) noexcept = default;
Protect& Protect::operator=(Protect&&) noexcept = default;

Protect::Protect(std::string_view text, const LockSource* locks) {
  constexpr std::string_view kSeparators = ", \t";
  while (!text.empty()) {
    const auto start = text.find_first_not_of(kSeparators);
    if (start == std::string_view::npos) break;
    text.remove_prefix(start);
    const auto end = std::min(text.find_first_of(kSeparators), text.size());
    const std::string_view entry = text.substr(0, end);
    text.remove_prefix(end);
    if (entry == kAll) {
      bits_ = static_cast<std::uint8_t>((1U << kProtectRuleNames.size()) - 1);
      continue;
    }
    const auto* found = std::find(kProtectRuleNames.begin(), kProtectRuleNames.end(), entry);
    if (found == kProtectRuleNames.end()) {
      throw ConfigError(fmt::format(
          "[policy] protect (or P11MUX_POLICY_PROTECT): unknown rule '{}' (expected all, or "
          "some of {})",
          entry, fmt::join(kProtectRuleNames, ", ")));
    }
    bits_ = static_cast<std::uint8_t>(bits_ | 1U << (found - kProtectRuleNames.begin()));
  }
  if (on(ProtectRule::conflicting_attributes) || on(ProtectRule::sticky_attributes))
    change_lock_ = locks != nullptr ? std::make_unique<Mutex>(*locks) : std::make_unique<Mutex>();
}

std::string Protect::describe() const {
  std::string out;
  for (std::size_t i = 0; i < kProtectRuleNames.size(); ++i) {
    if (!on(static_cast<ProtectRule>(i))) continue;
    out += out.empty() ? "" : ",";
    out += kProtectRuleNames[i];
  }
  return out;
}

}  // namespace p11mux
