// The [policy] filters applied to calls (filters.hpp has the rules): on
// Entry<F>'s slow path only, which calls take when a [policy] is set.
#pragma once

#include "forward/end_digest.hpp"
#include "lifecycle/runtime.hpp"
#include "policy/filters.hpp"
#include "policy/protect_enforce.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

namespace p11mux {

// An object's CKA_LABEL and CKA_ID as read from the backend; no value when
// the object has none (or will not say).
struct ObjectIdentity {
  std::optional<std::string_view> label, id;
  // Storage: a label or ID up to kInline bytes needs no allocation.
  static constexpr std::size_t kInline = 128;
  std::array<CK_BYTE, kInline> label_buf{}, id_buf{};
  std::string label_big, id_big;
};

// Reads `object`'s identity on backend session `s`: its CKA_LABEL when
// `labels`, its CKA_ID when `ids` (one backend call for both; a backend's
// C_GetAttributeValue is most of what the filter costs). CKR_OK, or the
// backend's error (CKR_OBJECT_HANDLE_INVALID for an object it does not know).
CK_RV read_identity(Runtime& rt, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object, ObjectIdentity& out,
                    bool labels = true, bool ids = true) noexcept;

// The log line (warn) and the count of one filter refusal.
void report_token_refusal(Runtime& rt, std::string_view function, CK_SLOT_ID slot,
                          const CK_TOKEN_INFO& token, CK_RV rv) noexcept;
void report_object_refusal(Runtime& rt, std::string_view function,
                           std::optional<std::string_view> label,
                           std::optional<std::string_view> id, CK_RV rv) noexcept;

// ---- tokens -----------------------------------------------------------------

// Whether the token in `slot` is exposed, asked of the backend now: a
// token inserted, removed or relabelled since counts at once.
bool slot_exposed(Runtime& rt, const TokenFilter& tokens, CK_SLOT_ID slot) noexcept;

// CKR_OK when `slot` is exposed; otherwise CKR_SLOT_ID_INVALID, logged and
// counted when a token is there (a refusal), silently for an empty slot or
// one the backend does not know (as a token would answer).
CK_RV token_refusal(Runtime& rt, const TokenFilter& tokens, std::string_view function,
                    CK_SLOT_ID slot) noexcept;

// C_GetSlotList without the hidden slots; the count query and the filled
// call count the same way.
CK_RV filtered_slot_list(Runtime& rt, const TokenFilter& tokens, CK_BBOOL token_present,
                         CK_SLOT_ID_PTR list, CK_ULONG_PTR count) noexcept;

// ---- objects ----------------------------------------------------------------

// One object handle argument: CKR_OK when the object is exposed (and, with
// `change`, stays exposed once changed by it), else the code to answer.
CK_RV object_refusal(Runtime& rt, const ObjectFilter& objects, std::string_view function,
                     CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object, CK_RV invalid,
                     const CK_ATTRIBUTE* change, CK_ULONG change_count) noexcept;

// A template that makes an object: CKR_OK when the object will be exposed.
CK_RV creation_refusal(Runtime& rt, const ObjectFilter& objects, std::string_view function,
                       const CK_ATTRIBUTE* tmpl, CK_ULONG count) noexcept;

// C_FindObjects on backend session `s` without the hidden objects: asks the
// backend again until the caller's buffer is full or the search has ended
// (a count of 0 always means the end, as the spec says).
CK_RV filtered_find_objects(Runtime& rt, const ObjectFilter& objects, CK_SESSION_HANDLE s,
                            CK_OBJECT_HANDLE_PTR found, CK_ULONG max, CK_ULONG_PTR count) noexcept;

// How forward/ calls the backend when objects are filtered: the checks
// above, on the backend session the call runs on, then protect's (when on:
// only on what the filter shows, protect_enforce.hpp), then the call itself.
struct ObjectFiltered {
  template <class F, class... A>
  static CK_RV call(Runtime& rt, const BackendPort& port, A... a) noexcept;
};

template <class F, class... A>
CK_RV ObjectFiltered::call(Runtime& rt, const BackendPort& port, A... a) noexcept {
  const ObjectFilter& objects = rt.policy()->objects();
  if constexpr (F::name == "C_FindObjects") {
    return filtered_find_objects(rt, objects, a...);
  } else {
    const std::tuple<A...> args{a...};
    constexpr auto handles = object_handle_args<F>();
    constexpr auto templates = creation_templates<F>();
    // A copy and a change are checked with the object: what it becomes.
    constexpr bool changes = F::name == "C_CopyObject" || F::name == "C_SetAttributeValue";
    CK_RV rv = CKR_OK;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (..., [&] {
        constexpr HandleArg h = handles[I];
        if (rv != CKR_OK) return;
        const CK_OBJECT_HANDLE object = std::get<h.index>(args);
        if (F::name == "C_SetOperationState" && object == CK_INVALID_HANDLE) return;
        if constexpr (changes) {
          rv = object_refusal(rt, objects, F::name, std::get<0>(args), object, h.invalid,
                              std::get<2>(args), std::get<3>(args));
        } else {
          rv = object_refusal(rt, objects, F::name, std::get<0>(args), object, h.invalid, nullptr,
                              0);
        }
      }());
    }
    (std::make_index_sequence<handles.size()>{});
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (..., [&] {
        constexpr std::size_t t = templates[I];
        if (rv == CKR_OK) {
          rv = creation_refusal(rt, objects, F::name, std::get<t>(args), std::get<t + 1>(args));
        }
      }());
    }
    (std::make_index_sequence<templates.size()>{});
    if (rv != CKR_OK) {
      // The refusal of a C_DigestKey ends the digest, on the backend too.
      if constexpr (F::name == "C_DigestKey") (void)end_digest(port, std::get<0>(args));
      return rv;
    }
    if constexpr (kProtected<F>) {
      const Protect& protect = rt.policy()->protect();
      if (protect.any()) {
        if (std::optional<CK_RV> answer = protect_call<F, true>(rt, protect, a...)) return *answer;
      }
    }
    return port.template call<F>(a...);
  }
}

}  // namespace p11mux
