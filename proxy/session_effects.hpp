// What p11mux notes after a backend call on a session, so that the pool can
// reset the backend session later: operations started and ended, session
// objects created, and whether the session or device is gone. Also the two
// refusals caused by p11mux's own idle pooled sessions, retried after a drain.
#pragma once

#include "operation_state.hpp"
#include "runtime.hpp"

#include <type_traits>

namespace p11mux {

// Errors that mean the backend session, or the whole device, is gone.
constexpr bool session_gone(CK_RV rv) noexcept {
  return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
         rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_DEVICE_ERROR;
}

// Records a created object if it is a session object (CKA_TOKEN false).
inline void note_created_object(Runtime& rt, Binding& s, CK_OBJECT_HANDLE object) noexcept {
  CK_BBOOL on_token = CK_FALSE;
  CK_ATTRIBUTE query{CKA_TOKEN, &on_token, sizeof on_token};
  CK_RV rv;
  {
    OptionalGuard serial(rt.backend_lock());
    rv = rt.functions().C_GetAttributeValue(s.backend, object, &query, 1);
  }
  if (rv != CKR_OK) {
    // Unknown: never destroy what may be a token object; close the session
    // at the end instead, which destroys exactly its session objects.
    s.discard = true;
    return;
  }
  if (on_token == CK_TRUE) return;
  try {
    s.objects.push_back(object);
  } catch (...) {
    s.discard = true;
  }
}

template <class F, class... Rest>
void note_call(Runtime& rt, Binding& s, CK_SLOT_ID slot, CK_RV rv, Rest... rest) noexcept {
  constexpr Effect e = effect<F>;
  if constexpr (e.step == Step::create) {
    if (rv == CKR_OK) {
      // The created handles are exactly the CK_OBJECT_HANDLE_PTR arguments.
      ([&](auto arg) {
        if constexpr (std::is_same_v<decltype(arg), CK_OBJECT_HANDLE_PTR>) {
          if (arg != nullptr) note_created_object(rt, s, *arg);
        }
      }(rest), ...);
    }
  } else if constexpr (e.step != Step::none) {
    s.ops = ops_after<F>(s.ops, rv, s.backend, rest...);
  }
  if (rv != CKR_OK && session_gone(rv)) [[unlikely]] {
    s.discard = s.dead = true;
    rt.pool().invalidate(slot);
  }
}

// SO login fails while R/O sessions exist, C_InitToken while any exist; the
// ones in the way may be p11mux's idle pooled sessions, not the application's.
template <class F, class... A>
bool drained_for_retry(Runtime& rt, CK_SLOT_ID slot, CK_RV rv, A... a) noexcept {
  if constexpr (std::is_same_v<F, fn::C_Login>) {
    CK_USER_TYPE user = std::get<0>(std::tuple<A...>{a...});
    return rv == CKR_SESSION_READ_ONLY_EXISTS && user == CKU_SO &&
           rt.pool().drain_idle(slot, /*read_only_only=*/true);
  } else if constexpr (std::is_same_v<F, fn::C_InitToken>) {
    return rv == CKR_SESSION_EXISTS && rt.pool().drain_idle(slot, /*read_only_only=*/false);
  } else {
    return false;
  }
}

}  // namespace p11mux
