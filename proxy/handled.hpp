// The hand-written bodies (dispatch `handled` in <p11mux/functions.h>): they
// run on the runtime inside the call gate, after the generic argument checks,
// and are traced like forwarded calls. `handler<F>` names each one in one place.
#pragma once

#include "function_traits.hpp"
#include "runtime.hpp"

namespace p11mux {

CK_RV get_info(Runtime& rt, CK_INFO_PTR info) noexcept;
CK_RV open_session(Runtime& rt, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                   CK_NOTIFY notify, CK_SESSION_HANDLE_PTR session) noexcept;
CK_RV close_session(Runtime& rt, CK_SESSION_HANDLE session) noexcept;
CK_RV close_all_sessions(Runtime& rt, CK_SLOT_ID slot) noexcept;

template <class F>
constexpr auto handler = nullptr;
template <>
constexpr auto handler<fn::C_GetInfo> = &get_info;
template <>
constexpr auto handler<fn::C_OpenSession> = &open_session;
template <>
constexpr auto handler<fn::C_CloseSession> = &close_session;
template <>
constexpr auto handler<fn::C_CloseAllSessions> = &close_all_sessions;

}  // namespace p11mux
