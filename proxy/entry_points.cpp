#include "entry_points.hpp"

#include "forward.hpp"
#include "interfaces.hpp"
#include "module.hpp"

#include <optional>

namespace p11mux::entry_points {
namespace {

// Each `entry` function of the table, by name; everything else is generated.
#define P11MUX_ENTRY_entry(name) entry_##name
#define P11MUX_ENTRY_handled(name) &Entry<fn::name>::call
#define P11MUX_ENTRY_global(name) &Entry<fn::name>::call
#define P11MUX_ENTRY_session(name) &Entry<fn::name>::call
#define P11MUX_LIST_MEMBER(name, since, dispatch, args) .name = P11MUX_ENTRY_##dispatch(name),
// The 3.0 list shares every entry point except the `handled` ones that report
// the list's own version (handled.hpp, in_list_3_0).
#define P11MUX_ENTRY_3_0_entry(name) P11MUX_ENTRY_entry(name)
#define P11MUX_ENTRY_3_0_handled(name) &Entry<in_list_3_0<fn::name>>::call
#define P11MUX_ENTRY_3_0_global(name) P11MUX_ENTRY_global(name)
#define P11MUX_ENTRY_3_0_session(name) P11MUX_ENTRY_session(name)
#define P11MUX_LIST_3_0_MEMBER(name, since, dispatch, args) \
  .name = P11MUX_ENTRY_3_0_##dispatch(name),

constexpr auto entry_C_Initialize = &initialize;
constexpr auto entry_C_Finalize = &finalize;
constexpr auto entry_C_GetFunctionList = &get_function_list_entry;
constexpr auto entry_C_WaitForSlotEvent = &wait_for_slot_event;
constexpr auto entry_C_GetInterfaceList = &get_interface_list;
constexpr auto entry_C_GetInterface = &get_interface;

// The v2.40 list: exactly the 68 functions of CK_FUNCTION_LIST.
constinit CK_FUNCTION_LIST function_list_v2 = {
    .version = {2, 40},
    P11MUX_FUNCTIONS_V2(P11MUX_LIST_MEMBER)
};

// The v3.0 list: all 92 functions of CK_FUNCTION_LIST_3_0. On a 2.x backend
// the v3.0 ones answer CKR_FUNCTION_NOT_SUPPORTED (their backend entry is NULL).
constinit CK_FUNCTION_LIST_3_0 function_list_v3 = {
    .version = {3, 0},
    P11MUX_FUNCTIONS(P11MUX_LIST_3_0_MEMBER)
};

// The name is "PKCS 11" (kStandardInterfaceName); the flags claim nothing.
constinit CK_CHAR standard_interface_name[] = "PKCS 11";
constinit CK_INTERFACE standard_interface_v3{standard_interface_name, &function_list_v3, 0};
constinit CK_INTERFACE standard_interface_v2{standard_interface_name, &function_list_v2, 0};

}  // namespace

CK_RV initialize(CK_VOID_PTR init_args) { return the_module.initialize(init_args); }

CK_RV finalize(CK_VOID_PTR reserved) { return the_module.finalize(reserved); }

CK_RV get_function_list_entry(CK_FUNCTION_LIST_PTR_PTR list) {
  if (list == nullptr) return CKR_ARGUMENTS_BAD;
  *list = &function_list_v2;
  return CKR_OK;
}

const CK_FUNCTION_LIST* function_list() noexcept { return &function_list_v2; }
const CK_FUNCTION_LIST_3_0* function_list_3_0() noexcept { return &function_list_v3; }
const CK_INTERFACE* interface_3_0() noexcept { return &standard_interface_v3; }
const CK_INTERFACE* interface_2_40() noexcept { return &standard_interface_v2; }

// Blocking waits must not hold the call gate, or C_Finalize could never drain:
// the caller registers as a waiter inside the gate, then leaves it to wait.
CK_RV wait_for_slot_event(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved) {
  std::optional<Runtime::WaiterRef> waiter;
  {
    Module::Call call(the_module);
    Runtime* rt = call.runtime();
    if (rt == nullptr) return CKR_CRYPTOKI_NOT_INITIALIZED;
    if ((flags & CKF_DONT_BLOCK) != 0) {
      return forward<fn::C_WaitForSlotEvent>(*rt, flags, slot, reserved);
    }
    if (CK_RV rv = check_arguments<fn::C_WaitForSlotEvent>(false, flags, slot, reserved);
        rv != CKR_OK) {
      return rv;
    }
    // Registered inside the gate, so C_Finalize, once drained, sees this waiter
    // and keeps the runtime alive until it has returned.
    waiter.emplace(*rt);
  }
  return waiter->runtime().wait_for_slot_event(flags, slot);
}

}  // namespace p11mux::entry_points
