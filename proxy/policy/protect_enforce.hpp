// [policy] protect applied to a call (protect.hpp has the rules): entered
// from policy_before (enforce.hpp) after the other rules allowed the call,
// only for the functions below and only when a rule is on, so a policy
// without protect, and no policy at all, cost nothing more.
//
// The checks that need a key's current attributes (C_SetAttributeValue,
// C_CopyObject, C_WrapKey) read them from the backend with
// C_GetAttributeValue on the call's own session, before the call is
// forwarded. A change (C_SetAttributeValue, C_CopyObject) is then forwarded
// from here, under Protect::change_lock(), so that no other change can come
// between the read and the change.
//
// With [policy] objects on too, protect runs inside ObjectFiltered
// (filter_calls.hpp) instead, after the object filter, on the backend
// session the call runs on (`backend` true: the handle is that session's):
// a hidden object gets the filter's answer, as without protect, and protect
// never reads, logs or changes it; a change protect lets through is made
// there, so the filter has checked it too.
#pragma once

#include "lifecycle/runtime.hpp"
#include "policy/protect.hpp"

#include <p11mux/pkcs11.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace p11mux {

// A new key's template alone (C_CreateObject, C_GenerateKey, C_DeriveKey).
std::optional<CK_RV> protect_new_key(Runtime& rt, const Protect& protect, std::string_view function,
                                     const CK_ATTRIBUTE* attributes, CK_ULONG count) noexcept;
std::optional<CK_RV> protect_key_pair(Runtime& rt, const Protect& protect, const CK_ATTRIBUTE* pub,
                                      CK_ULONG pub_count, const CK_ATTRIBUTE* priv,
                                      CK_ULONG priv_count) noexcept;
// C_SetAttributeValue (new_object NULL) or C_CopyObject: checked and, when
// a rule that reads the key is on, forwarded here (the answer is the call's).
std::optional<CK_RV> protect_change(Runtime& rt, const Protect& protect, bool backend,
                                    CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                                    CK_ATTRIBUTE_PTR attributes, CK_ULONG count,
                                    CK_OBJECT_HANDLE_PTR new_object) noexcept;
std::optional<CK_RV> protect_decrypt_init(Runtime& rt, const Protect& protect, bool backend,
                                          CK_SESSION_HANDLE session, const CK_MECHANISM* mechanism,
                                          CK_OBJECT_HANDLE key) noexcept;
std::optional<CK_RV> protect_unwrap(Runtime& rt, const Protect& protect, bool backend,
                                    CK_SESSION_HANDLE session, const CK_MECHANISM* mechanism,
                                    CK_OBJECT_HANDLE unwrapping_key, const CK_ATTRIBUTE* attributes,
                                    CK_ULONG count) noexcept;
std::optional<CK_RV> protect_wrap(Runtime& rt, const Protect& protect, bool backend,
                                  CK_SESSION_HANDLE session, CK_OBJECT_HANDLE wrapping_key,
                                  CK_OBJECT_HANDLE key) noexcept;

// The functions some protect rule looks at.
template <class F>
inline constexpr bool kProtected =
    F::name == "C_CreateObject" || F::name == "C_CopyObject" || F::name == "C_SetAttributeValue" ||
    F::name == "C_GenerateKey" || F::name == "C_GenerateKeyPair" || F::name == "C_UnwrapKey" ||
    F::name == "C_DeriveKey" || F::name == "C_WrapKey" || F::name == "C_DecryptInit";

// The answer protect gives F (a refusal, or the forwarded change), or
// nothing when the call goes on as without it. kOnBackend: called from
// ObjectFiltered, the session argument is the backend session.
template <class F, bool kOnBackend = false, class... A>
std::optional<CK_RV> protect_call(Runtime& rt, const Protect& protect, A... a) noexcept {
  const std::tuple<A...> args{a...};
  using std::get;
  if constexpr (F::name == "C_CreateObject") {
    return protect_new_key(rt, protect, F::name, get<1>(args), get<2>(args));
  } else if constexpr (F::name == "C_GenerateKey") {
    return protect_new_key(rt, protect, F::name, get<2>(args), get<3>(args));
  } else if constexpr (F::name == "C_DeriveKey") {
    return protect_new_key(rt, protect, F::name, get<3>(args), get<4>(args));
  } else if constexpr (F::name == "C_GenerateKeyPair") {
    return protect_key_pair(rt, protect, get<2>(args), get<3>(args), get<4>(args), get<5>(args));
  } else if constexpr (F::name == "C_SetAttributeValue") {
    return protect_change(rt, protect, kOnBackend, get<0>(args), get<1>(args), get<2>(args),
                          get<3>(args), nullptr);
  } else if constexpr (F::name == "C_CopyObject") {
    return protect_change(rt, protect, kOnBackend, get<0>(args), get<1>(args), get<2>(args),
                          get<3>(args), get<4>(args));
  } else if constexpr (F::name == "C_DecryptInit") {
    return protect_decrypt_init(rt, protect, kOnBackend, get<0>(args), get<1>(args), get<2>(args));
  } else if constexpr (F::name == "C_UnwrapKey") {
    return protect_unwrap(rt, protect, kOnBackend, get<0>(args), get<1>(args), get<2>(args),
                          get<5>(args), get<6>(args));
  } else if constexpr (F::name == "C_WrapKey") {
    return protect_wrap(rt, protect, kOnBackend, get<0>(args), get<2>(args), get<3>(args));
  } else {
    return std::nullopt;
  }
}

}  // namespace p11mux
