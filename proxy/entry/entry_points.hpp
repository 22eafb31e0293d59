// The hand-written entry points (dispatch `entry` in <p11mux/functions.h>)
// and the function lists and interfaces the application receives.
#pragma once

#include <p11mux/pkcs11.h>

namespace p11mux::entry_points {

CK_RV initialize(CK_VOID_PTR init_args);
CK_RV finalize(CK_VOID_PTR reserved);
CK_RV get_function_list_entry(CK_FUNCTION_LIST_PTR_PTR list);
CK_RV wait_for_slot_event(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved);
// C_GetInterfaceList and C_GetInterface (interfaces.hpp chooses what is offered).
CK_RV get_interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count) noexcept;
CK_RV get_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                    CK_FLAGS flags) noexcept;

// p11mux's own function lists: the v2.40 one (also what the backend loader
// compares against, to refuse loading p11mux as its own backend) and the v3.0
// one. Each is exactly as long as its interface says.
const CK_FUNCTION_LIST* function_list() noexcept;
const CK_FUNCTION_LIST_3_0* function_list_3_0() noexcept;

// p11mux's "PKCS 11" interfaces over those lists, in static storage: C_GetInterface
// returns pointers to them. Flags 0: CKF_INTERFACE_FORK_SAFE is not claimed.
const CK_INTERFACE* interface_3_0() noexcept;
const CK_INTERFACE* interface_2_40() noexcept;

}  // namespace p11mux::entry_points
