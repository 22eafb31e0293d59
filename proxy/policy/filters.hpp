// The [policy] filters: `tokens` (which tokens' slots the application sees)
// and `objects` (which objects it sees), README "Policy".
//
// Here: the parsed rules, their matching and which calls they change, pure
// (unit-tested alone). filter_calls.hpp applies them to calls, on the slow
// path only (Runtime::slow_path(): a [policy] is set):
//   - a call naming a slot asks the backend for that slot's token
//     (C_GetTokenInfo) first and answers CKR_SLOT_ID_INVALID for a slot
//     whose token does not match, or that has no token; C_GetSlotList and
//     C_WaitForSlotEvent leave those slots out (token_refusal,
//     filtered_slot_list, slot_event_hidden);
//   - a call on a session that names objects (ObjectFiltered, wrapped around
//     the backend call where forward/ runs it, so on the backend session the
//     call runs on) reads each object's CKA_LABEL and CKA_ID there first and
//     answers CKR_OBJECT_HANDLE_INVALID (or the call's key-handle code) for
//     one that does not match; C_FindObjects leaves such objects out; an
//     object a call would create or change is checked from its template.
#pragma once

#include "config/config.hpp"
#include "functions/function_traits.hpp"
#include "policy/policy_rule.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace p11mux {

// A CK_TOKEN_INFO field without its padding: PKCS#11 pads with blanks;
// some modules pad with NULs, also removed.
std::string_view unpadded(std::string_view field) noexcept;

// `tokens`: entries separated by commas (a label may hold blanks, so not
// by blanks), each trimmed of the blanks around it:
//   label:NAME   the token whose label, less its padding, is NAME
//   serial:SN    the token whose serial number, less its padding, is SN
//   NAME         either
class TokenFilter {
 public:
  TokenFilter() = default;
  // Throws ConfigError naming the key and the entry it cannot take.
  explicit TokenFilter(std::string_view text);
  bool on() const noexcept { return !entries_.empty(); }
  bool exposes(const CK_TOKEN_INFO& token) const noexcept;
  std::string describe() const;

 private:
  enum class Field { label, serial, either };
  struct Entry {
    Field field;
    std::string value;
  };
  std::vector<Entry> entries_;
};

// `objects`: entries separated by commas, each trimmed of blanks around it:
//   label:NAME   objects whose CKA_LABEL is NAME (bytes, exactly)
//   label:PFX*   objects whose CKA_LABEL starts with PFX
//   id:HEX       objects whose CKA_ID is these bytes (hex digits, two per byte)
// An object is exposed when any entry matches it; an absent attribute
// matches nothing.
class ObjectFilter {
 public:
  ObjectFilter() = default;
  // Throws ConfigError naming the key and the entry it cannot take.
  explicit ObjectFilter(std::string_view text);
  bool on() const noexcept { return !labels_.empty() || !ids_.empty(); }
  // Which attributes the entries look at: only those need reading.
  bool uses_labels() const noexcept { return !labels_.empty(); }
  bool uses_ids() const noexcept { return !ids_.empty(); }
  bool exposes(std::optional<std::string_view> label,
               std::optional<std::string_view> id) const noexcept;
  // An object made from `tmpl`, over what it had before (a copy's source,
  // a changed object; nothing for a new one): exposed? CKR_OK, or the code
  // that refuses the template: CKR_ATTRIBUTE_VALUE_INVALID when it sets a
  // CKA_LABEL or CKA_ID that matches no entry, CKR_TEMPLATE_INCOMPLETE when
  // it sets neither (and what it had does not match).
  CK_RV check_template(const CK_ATTRIBUTE* tmpl, CK_ULONG count,
                       std::optional<std::string_view> label_before = std::nullopt,
                       std::optional<std::string_view> id_before = std::nullopt) const noexcept;
  std::string describe() const;

 private:
  struct Label {
    std::string value;
    bool prefix;
  };
  std::vector<Label> labels_;
  std::vector<std::string> ids_;
};

// ---- which calls the filters change ----------------------------------------

// The functions whose first argument is a slot ID the application chose.
template <class F>
inline constexpr bool kNamesSlot =
    F::name == "C_GetSlotInfo" || F::name == "C_GetTokenInfo" || F::name == "C_GetMechanismList" ||
    F::name == "C_GetMechanismInfo" || F::name == "C_InitToken" || F::name == "C_OpenSession" ||
    F::name == "C_CloseAllSessions";

// Which arguments of F are object handles, and the code a hidden one gets:
// the one the spec gives that function for a handle it does not know.
struct HandleArg {
  std::size_t index;
  CK_RV invalid;
};
template <class F>
constexpr auto object_handle_args() noexcept {
  constexpr std::string_view n = F::name;
  using A = std::array<HandleArg, 1>;
  if constexpr (n == "C_CopyObject" || n == "C_DestroyObject" || n == "C_GetObjectSize" ||
                n == "C_GetAttributeValue" || n == "C_SetAttributeValue") {
    return A{{{1, CKR_OBJECT_HANDLE_INVALID}}};
  } else if constexpr (n == "C_DigestKey") {
    return A{{{1, CKR_KEY_HANDLE_INVALID}}};
  } else if constexpr (n == "C_EncryptInit" || n == "C_DecryptInit" || n == "C_SignInit" ||
                       n == "C_SignRecoverInit" || n == "C_VerifyInit" ||
                       n == "C_VerifyRecoverInit" || n == "C_DeriveKey" ||
                       n == "C_MessageEncryptInit" || n == "C_MessageDecryptInit" ||
                       n == "C_MessageSignInit" || n == "C_MessageVerifyInit") {
    return A{{{2, CKR_KEY_HANDLE_INVALID}}};
  } else if constexpr (n == "C_WrapKey") {
    return std::array<HandleArg, 2>{
        {{2, CKR_WRAPPING_KEY_HANDLE_INVALID}, {3, CKR_KEY_HANDLE_INVALID}}};
  } else if constexpr (n == "C_UnwrapKey") {
    return A{{{2, CKR_UNWRAPPING_KEY_HANDLE_INVALID}}};
  } else if constexpr (n == "C_SetOperationState") {
    // Either may be 0: no key.
    return std::array<HandleArg, 2>{{{3, CKR_KEY_HANDLE_INVALID}, {4, CKR_KEY_HANDLE_INVALID}}};
  } else {
    return std::array<HandleArg, 0>{};
  }
}

// The templates of F that make a new object (index of the pointer; the
// count follows it).
template <class F>
constexpr auto creation_templates() noexcept {
  constexpr std::string_view n = F::name;
  using A = std::array<std::size_t, 1>;
  if constexpr (n == "C_CreateObject") {
    return A{1};
  } else if constexpr (n == "C_GenerateKey") {
    return A{2};
  } else if constexpr (n == "C_GenerateKeyPair") {
    return std::array<std::size_t, 2>{2, 4};
  } else if constexpr (n == "C_UnwrapKey") {
    return A{5};
  } else if constexpr (n == "C_DeriveKey") {
    return A{3};
  } else {
    return std::array<std::size_t, 0>{};
  }
}

// The functions the objects filter changes: those above, and C_FindObjects.
template <class F>
inline constexpr bool kFiltersObjects =
    F::name == "C_FindObjects" ||
    object_handle_args<F>().size() != 0 || creation_templates<F>().size() != 0;

}  // namespace p11mux
