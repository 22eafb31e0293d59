// The hand-written entry points (dispatch `entry` in <p11mux/functions.h>)
// and the function list the application receives.
#pragma once

#include <p11mux/pkcs11.h>

namespace p11mux::entry_points {

CK_RV initialize(CK_VOID_PTR init_args);
CK_RV finalize(CK_VOID_PTR reserved);
CK_RV get_function_list_entry(CK_FUNCTION_LIST_PTR_PTR list);
CK_RV wait_for_slot_event(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved);

// p11mux's own function list, so the backend loader can refuse to load us.
const CK_FUNCTION_LIST* function_list() noexcept;

}  // namespace p11mux::entry_points
