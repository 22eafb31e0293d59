#include "policy/protect_enforce.hpp"

#include "forward/forward.hpp"
#include "sync/lock.hpp"

#include <p11mux/attribute_names.hpp>
#include <p11mux/mechanism_names.hpp>
#include <p11mux/rv_names.hpp>

#include <spdlog/fmt/fmt.h>

#include <array>
#include <string>

namespace p11mux {
namespace {

// A backend call on the session protect reads and changes through: the
// application's (forward<F>: looked up and locked there), or, inside
// ObjectFiltered (policy/filter_calls.hpp), the backend session the call
// already runs on and holds, after the object filter let the call through.
template <class F, class... A>
CK_RV call_on(Runtime& rt, bool backend, CK_SESSION_HANDLE session, A... a) noexcept {
  return backend ? rt.port().template call<F>(session, a...) : forward<F>(rt, session, a...);
}

// What the log says of the object a refusal is about: its CKA_LABEL (as
// printable text) and CKA_ID (hex), both public attributes, never a value.
struct ObjectName {
  std::string label = "?";
  std::string id = "?";
};

constexpr std::size_t kNameBytes = 64;

std::string printable(const CK_ATTRIBUTE& a) {
  if (a.pValue == nullptr || a.ulValueLen == CK_UNAVAILABLE_INFORMATION) return "?";
  const auto* bytes = static_cast<const unsigned char*>(a.pValue);
  std::string out;
  for (CK_ULONG i = 0; i < std::min<CK_ULONG>(a.ulValueLen, kNameBytes); ++i)
    out +=
        bytes[i] >= 0x20 && bytes[i] < 0x7f && bytes[i] != '\'' ? static_cast<char>(bytes[i]) : '.';
  if (a.ulValueLen > kNameBytes) out += "...";
  return "'" + out + "'";
}

std::string hex(const CK_ATTRIBUTE& a) {
  if (a.pValue == nullptr || a.ulValueLen == CK_UNAVAILABLE_INFORMATION) return "?";
  const auto* bytes = static_cast<const unsigned char*>(a.pValue);
  std::string out;
  for (CK_ULONG i = 0; i < std::min<CK_ULONG>(a.ulValueLen, kNameBytes); ++i)
    out += fmt::format("{:02x}", bytes[i]);
  if (a.ulValueLen > kNameBytes) out += "...";
  return out.empty() ? "(empty)" : out;
}

ObjectName name_in_template(const CK_ATTRIBUTE* attributes, CK_ULONG count) {
  ObjectName out{"(none)", "(none)"};
  for (CK_ULONG i = 0; attributes != nullptr && i < count; ++i) {
    if (attributes[i].type == CKA_LABEL) out.label = printable(attributes[i]);
    if (attributes[i].type == CKA_ID) out.id = hex(attributes[i]);
  }
  return out;
}

// Read on a refusal only. A label or ID longer than the buffer is left out
// (the backend answers CKR_BUFFER_TOO_SMALL for it and fills the other).
ObjectName name_of(Runtime& rt, bool backend, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object) {
  std::array<unsigned char, 256> label{}, id{};
  std::array<CK_ATTRIBUTE, 2> read{
      {{CKA_LABEL, label.data(), label.size()}, {CKA_ID, id.data(), id.size()}}};
  const CK_RV rv = call_on<fn::C_GetAttributeValue>(rt, backend, session, object, read.data(),
                                                    static_cast<CK_ULONG>(read.size()));
  if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL && rv != CKR_ATTRIBUTE_TYPE_INVALID) return {};
  return {printable(read[0]), hex(read[1])};
}

// The log line and the count of one refusal.
CK_RV report(Runtime& rt, std::string_view function, ProtectRule rule, CK_RV rv,
             std::string_view detail, const ObjectName& object) noexcept {
  if (Metrics* metrics = rt.observer().metrics()) metrics->record_policy_denied(policy_rule(rule));
  try {
    rt.log().warn("policy refused {}: rule {} ({}): object label {} id {}: {}", function,
                  kProtectRuleNames[static_cast<std::size_t>(rule)], detail, object.label,
                  object.id, rv_name(rv));
  } catch (...) {
    // A log line that cannot be written does not change the answer.
  }
  return rv;
}

template <class NameFn>
CK_RV refuse(Runtime& rt, std::string_view function, ProtectRule rule, CK_RV rv,
             std::string_view detail, NameFn&& name) noexcept {
  ObjectName object;
  try {
    object = name();
  } catch (...) {
    // Without the name the refusal stands.
  }
  return report(rt, function, rule, rv, detail, object);
}

// The attributes of an existing key the rules read, in one C_GetAttributeValue.
struct CurrentKey {
  KeyAttributes key;
  bool trusted = false;            // CKA_TRUSTED
  bool wrap_with_trusted = false;  // CKA_WRAP_WITH_TRUSTED
};

// An attribute the object does not have (CKR_ATTRIBUTE_TYPE_INVALID: a
// certificate has no CKA_WRAP) is left unknown; any other failure is the answer.
CK_RV read_key(Runtime& rt, bool backend, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
               CurrentKey& out) {
  constexpr std::array<CK_ATTRIBUTE_TYPE, 8> kTypes{
      CKA_WRAP,      CKA_UNWRAP,      CKA_ENCRYPT, CKA_DECRYPT,
      CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_TRUSTED, CKA_WRAP_WITH_TRUSTED};
  std::array<CK_BBOOL, kTypes.size()> values{};
  std::array<CK_ATTRIBUTE, kTypes.size()> read{};
  for (std::size_t i = 0; i < kTypes.size(); ++i)
    read[i] = {kTypes[i], &values[i], sizeof(CK_BBOOL)};
  const CK_RV rv = call_on<fn::C_GetAttributeValue>(rt, backend, session, object, read.data(),
                                                    static_cast<CK_ULONG>(read.size()));
  if (rv != CKR_OK && rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_ATTRIBUTE_SENSITIVE) return rv;
  BoolAttribute* fields[] = {&out.key.wrap,    &out.key.unwrap,    &out.key.encrypt,
                             &out.key.decrypt, &out.key.sensitive, &out.key.extractable};
  for (std::size_t i = 0; i < kTypes.size(); ++i) {
    if (read[i].ulValueLen != sizeof(CK_BBOOL)) continue;
    const bool on = values[i] != CK_FALSE;
    if (i < std::size(fields)) {
      (on ? fields[i]->may_be_true : fields[i]->may_be_false) = true;
    } else if (kTypes[i] == CKA_TRUSTED) {
      out.trusted = on;
    } else {
      out.wrap_with_trusted = on;
    }
  }
  return CKR_OK;
}

std::string_view conflict_detail(const KeyAttributes& key) noexcept {
  return key.wrap.may_be_true && key.decrypt.may_be_true ? "CKA_WRAP with CKA_DECRYPT"
                                                         : "CKA_UNWRAP with CKA_ENCRYPT";
}

std::optional<CK_RV> check_template(Runtime& rt, const Protect& protect, std::string_view function,
                                    const CK_ATTRIBUTE* attributes, CK_ULONG count) noexcept {
  if (!protect.on(ProtectRule::conflicting_attributes)) return std::nullopt;
  const KeyAttributes key = KeyAttributes::from_template(attributes, count);
  if (!conflicting(key)) return std::nullopt;
  return refuse(rt, function, ProtectRule::conflicting_attributes, CKR_TEMPLATE_INCONSISTENT,
                conflict_detail(key), [&] { return name_in_template(attributes, count); });
}

// A handle C_GetAttributeValue did not know, as the calling function names it.
CK_RV as_key_handle(CK_RV rv, CK_RV key_handle_invalid) noexcept {
  return rv == CKR_OBJECT_HANDLE_INVALID ? key_handle_invalid : rv;
}

}  // namespace

std::optional<CK_RV> protect_new_key(Runtime& rt, const Protect& protect, std::string_view function,
                                     const CK_ATTRIBUTE* attributes, CK_ULONG count) noexcept {
  return check_template(rt, protect, function, attributes, count);
}

std::optional<CK_RV> protect_key_pair(Runtime& rt, const Protect& protect, const CK_ATTRIBUTE* pub,
                                      CK_ULONG pub_count, const CK_ATTRIBUTE* priv,
                                      CK_ULONG priv_count) noexcept {
  if (auto answer = check_template(rt, protect, "C_GenerateKeyPair", pub, pub_count)) return answer;
  return check_template(rt, protect, "C_GenerateKeyPair", priv, priv_count);
}

std::optional<CK_RV> protect_change(Runtime& rt, const Protect& protect, bool backend,
                                    CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                                    CK_ATTRIBUTE_PTR attributes, CK_ULONG count,
                                    CK_OBJECT_HANDLE_PTR new_object) noexcept {
  const std::string_view function = new_object != nullptr ? "C_CopyObject" : "C_SetAttributeValue";
  // The template alone first: its code does not depend on the key.
  if (auto answer = check_template(rt, protect, function, attributes, count)) return answer;
  Mutex* lock = protect.change_lock();
  if (lock == nullptr) return std::nullopt;  // neither attribute rule on
  try {
    MutexGuard changing(*lock);
    CurrentKey current;
    if (CK_RV rv = read_key(rt, backend, session, object, current); rv != CKR_OK) return rv;
    const KeyAttributes change = KeyAttributes::from_template(attributes, count);
    auto name = [&] { return name_of(rt, backend, session, object); };
    if (protect.on(ProtectRule::sticky_attributes)) {
      if (std::optional<CK_ATTRIBUTE_TYPE> moved = sticky_violation(current.key, change)) {
        return refuse(rt, function, ProtectRule::sticky_attributes, CKR_ATTRIBUTE_READ_ONLY,
                      *moved == CKA_SENSITIVE ? "CKA_SENSITIVE true -> false"
                                              : "CKA_EXTRACTABLE false -> true",
                      name);
      }
    }
    if (protect.on(ProtectRule::conflicting_attributes)) {
      const KeyAttributes after = current.key.changed_by(change);
      if (conflicting(after)) {
        return refuse(rt, function, ProtectRule::conflicting_attributes, CKR_ACTION_PROHIBITED,
                      conflict_detail(after), name);
      }
    }
    if (new_object != nullptr) {
      return call_on<fn::C_CopyObject>(rt, backend, session, object, attributes, count, new_object);
    }
    return call_on<fn::C_SetAttributeValue>(rt, backend, session, object, attributes, count);
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
}

std::optional<CK_RV> protect_decrypt_init(Runtime& rt, const Protect& protect, bool backend,
                                          CK_SESSION_HANDLE session, const CK_MECHANISM* mechanism,
                                          CK_OBJECT_HANDLE key) noexcept {
  if (!protect.on(ProtectRule::no_padding_oracle) || mechanism == nullptr ||
      !padding_oracle(mechanism->mechanism)) {
    return std::nullopt;
  }
  return refuse(rt, "C_DecryptInit", ProtectRule::no_padding_oracle, CKR_MECHANISM_INVALID,
                "CKM_RSA_PKCS", [&] { return name_of(rt, backend, session, key); });
}

std::optional<CK_RV> protect_unwrap(Runtime& rt, const Protect& protect, bool backend,
                                    CK_SESSION_HANDLE session, const CK_MECHANISM* mechanism,
                                    CK_OBJECT_HANDLE unwrapping_key, const CK_ATTRIBUTE* attributes,
                                    CK_ULONG count) noexcept {
  if (protect.on(ProtectRule::no_padding_oracle) && mechanism != nullptr &&
      padding_oracle(mechanism->mechanism)) {
    return refuse(rt, "C_UnwrapKey", ProtectRule::no_padding_oracle, CKR_MECHANISM_INVALID,
                  "CKM_RSA_PKCS", [&] { return name_of(rt, backend, session, unwrapping_key); });
  }
  return check_template(rt, protect, "C_UnwrapKey", attributes, count);
}

std::optional<CK_RV> protect_wrap(Runtime& rt, const Protect& protect, bool backend,
                                  CK_SESSION_HANDLE session, CK_OBJECT_HANDLE wrapping_key,
                                  CK_OBJECT_HANDLE key) noexcept {
  if (!protect.on(ProtectRule::wrap_trusted)) return std::nullopt;
  CurrentKey wrapped, wrapping;
  if (CK_RV rv = read_key(rt, backend, session, key, wrapped); rv != CKR_OK)
    return as_key_handle(rv, CKR_KEY_HANDLE_INVALID);
  // A key that is not sensitive needs nothing of the wrapping key.
  if (!wrapped.key.sensitive.may_be_true) return std::nullopt;
  if (CK_RV rv = read_key(rt, backend, session, wrapping_key, wrapping); rv != CKR_OK)
    return as_key_handle(rv, CKR_WRAPPING_KEY_HANDLE_INVALID);
  if (wrap_allowed(true, wrapped.wrap_with_trusted, wrapping.trusted)) return std::nullopt;
  return refuse(rt, "C_WrapKey", ProtectRule::wrap_trusted, CKR_KEY_NOT_WRAPPABLE,
                "a sensitive key, a wrapping key without CKA_TRUSTED",
                [&] { return name_of(rt, backend, session, key); });
}

}  // namespace p11mux
