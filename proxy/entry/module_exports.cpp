// The symbols libp11mux.so exports (see exports.map): how an application
// finds p11mux's function lists. Everything else is reached through them.
#include "entry/entry_points.hpp"
#include "entry/interfaces.hpp"

#define P11MUX_EXPORT extern "C" __attribute__((visibility("default")))

P11MUX_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
  return p11mux::entry_points::get_function_list_entry(list);
}

// v3.0 (both may be called before C_Initialize).
P11MUX_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  return p11mux::entry_points::get_interface_list(list, count);
}

P11MUX_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                                   CK_INTERFACE_PTR_PTR interface, CK_FLAGS flags) {
  return p11mux::entry_points::get_interface(name, version, interface, flags);
}
