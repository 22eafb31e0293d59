// The hand-written bodies (dispatch `handled` in <p11mux/functions.h>): they
// run on the runtime inside the call gate, after the generic argument checks,
// and are traced like forwarded calls. `handler<F>` names each one in one place.
#pragma once

#include "functions/function_traits.hpp"
#include "lifecycle/runtime.hpp"

namespace p11mux {

CK_RV get_info(Runtime& rt, CK_INFO_PTR info) noexcept;      // through the 2.40 list
CK_RV get_info_3_0(Runtime& rt, CK_INFO_PTR info) noexcept;  // through the 3.0 list
CK_RV open_session(Runtime& rt, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                   CK_NOTIFY notify, CK_SESSION_HANDLE_PTR session) noexcept;
CK_RV close_session(Runtime& rt, CK_SESSION_HANDLE session) noexcept;
CK_RV close_all_sessions(Runtime& rt, CK_SLOT_ID slot) noexcept;
CK_RV get_token_info(Runtime& rt, CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) noexcept;
// What the backend calls for a session opened with a Notify callback
// (`context` is the Session): the application's callback, with its virtual
// handle; nothing for a session closed (or reopened without a callback) since.
CK_RV notify_trampoline(CK_SESSION_HANDLE backend, CK_NOTIFICATION event,
                        CK_VOID_PTR context) noexcept;

template <class F>
constexpr auto handler = nullptr;
template <>
inline constexpr auto handler<fn::C_GetInfo> = &get_info;
template <>
inline constexpr auto handler<fn::C_GetTokenInfo> = &get_token_info;
template <>
inline constexpr auto handler<fn::C_OpenSession> = &open_session;
template <>
inline constexpr auto handler<fn::C_CloseSession> = &close_session;
template <>
inline constexpr auto handler<fn::C_CloseAllSessions> = &close_all_sessions;

// C_GetInfo reports the version of the list it is called through, so the 3.0
// list's C_GetInfo is a function of its own; in_list_3_0<F> names the function
// behind each `handled` member of the 3.0 list.
namespace fn {
struct C_GetInfo_3_0 : C_GetInfo {};
}  // namespace fn
template <>
inline constexpr auto handler<fn::C_GetInfo_3_0> = &get_info_3_0;

template <class F>
struct InList30 {
  using type = F;
};
template <>
struct InList30<fn::C_GetInfo> {
  using type = fn::C_GetInfo_3_0;
};
template <class F>
using in_list_3_0 = typename InList30<F>::type;

}  // namespace p11mux
