// The symbols libp11mux.so exports (see exports.map): how an application
// finds p11mux's function lists. Everything else is reached through them.
#include "entry_points.hpp"

#define P11MUX_EXPORT extern "C" __attribute__((visibility("default")))

P11MUX_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
  return p11mux::entry_points::get_function_list_entry(list);
}
