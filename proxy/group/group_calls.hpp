// The functions a group configuration answers itself, not its backends
// (GroupRuntime, group_runtime.hpp): those that name a slot, whose IDs in a
// group configuration are p11mux's own. forward.hpp calls group_answer<F>
// for an F that has an overload here, when the runtime has groups: a
// function without one (every session function) costs nothing.
#pragma once

#include "functions/function_traits.hpp"
#include "group/group_runtime.hpp"

namespace p11mux {

inline CK_RV group_answer(const GroupRuntime& g, fn::C_GetSlotList, CK_BBOOL present,
                          CK_SLOT_ID_PTR list, CK_ULONG_PTR count) noexcept {
  return g.get_slot_list(present, list, count);
}
inline CK_RV group_answer(const GroupRuntime& g, fn::C_GetSlotInfo, CK_SLOT_ID slot,
                          CK_SLOT_INFO_PTR info) noexcept {
  return g.get_slot_info(slot, info);
}
inline CK_RV group_answer(const GroupRuntime& g, fn::C_GetTokenInfo, CK_SLOT_ID slot,
                          CK_TOKEN_INFO_PTR info) noexcept {
  return g.get_token_info(slot, info);
}
inline CK_RV group_answer(const GroupRuntime& g, fn::C_GetMechanismList, CK_SLOT_ID slot,
                          CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count) noexcept {
  return g.get_mechanism_list(slot, list, count);
}
inline CK_RV group_answer(const GroupRuntime& g, fn::C_GetMechanismInfo, CK_SLOT_ID slot,
                          CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info) noexcept {
  return g.get_mechanism_info(slot, type, info);
}
// Not built yet (docs/groups.md, "Not built yet"). C_OpenSession and
// C_CloseAllSessions are the runtime's (handled/session_calls.cpp).
inline CK_RV group_answer(const GroupRuntime& g, fn::C_InitToken, CK_SLOT_ID slot, CK_UTF8CHAR_PTR,
                          CK_ULONG, CK_UTF8CHAR_PTR) noexcept {
  return g.refuse("C_InitToken", slot, "initializing every member's token is not built");
}
// With CKF_DONT_BLOCK (the blocking wait: Runtime::wait_for_slot_event).
inline CK_RV group_answer(const GroupRuntime& g, fn::C_WaitForSlotEvent, CK_FLAGS, CK_SLOT_ID_PTR,
                          CK_VOID_PTR) noexcept {
  return g.refuse_slot_events();
}

template <class F, class... A>
inline constexpr bool kGroupAnswered = requires(const GroupRuntime& g, A... a) {
  group_answer(g, F{}, a...);
};

}  // namespace p11mux
