// The backend's function table as p11mux calls it. Vendor modules leave
// entries NULL (and a v2.x backend has no v3.0 entries at all); every entry
// the backend left NULL here answers CKR_FUNCTION_NOT_SUPPORTED, so that no
// call site, forwarded or p11mux's own (pool, reset, notify, slot events),
// can jump through a NULL pointer, and none needs a check of its own.
// Whether the backend really has a function is asked of Backend::functions().
#pragma once

#include "functions/function_traits.hpp"

namespace p11mux {

template <class F, class Pointer = typename F::Pointer>
struct Unsupported;

template <class F, class... A>
struct Unsupported<F, CK_RV (*)(A...)> {
  static CK_RV call(A...) noexcept { return CKR_FUNCTION_NOT_SUPPORTED; }
};

// `table` with every NULL entry pointing to its Unsupported stub.
inline CK_FUNCTION_LIST_3_0 without_null_entries(CK_FUNCTION_LIST_3_0 table) noexcept {
#define P11MUX_FILL_NULL(name, ...) \
  if (table.name == nullptr) table.name = &Unsupported<fn::name>::call;
  P11MUX_FUNCTIONS(P11MUX_FILL_NULL)
#undef P11MUX_FILL_NULL
  return table;
}

}  // namespace p11mux
