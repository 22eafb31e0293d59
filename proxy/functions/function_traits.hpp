// One type per PKCS#11 function, expanded from <p11mux/functions.h>: its name,
// version, dispatch kind, argument letters and member of CK_FUNCTION_LIST_3_0.
#pragma once

#include <p11mux/functions.h>
#include <p11mux/pkcs11.h>

#include <cstddef>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace p11mux {

enum class Dispatch { entry, handled, global, session };

// The argument types of a CK_C_xxx function pointer, as a tuple.
template <class Fn>
struct FunctionArgs;
template <class... A>
struct FunctionArgs<CK_RV (*)(A...)> {
  using type = std::tuple<A...>;
};

namespace fn {

#define P11MUX_DESCRIBE(name_, since_, dispatch_, args_)                         \
  struct name_ {                                                                 \
    static constexpr std::string_view name = #name_;                             \
    static constexpr unsigned since = since_;                                    \
    static constexpr Dispatch dispatch = Dispatch::dispatch_;                    \
    static constexpr std::string_view args = args_;                              \
    static constexpr auto member = &CK_FUNCTION_LIST_3_0::name_;                 \
    using Pointer = CK_##name_;                                                  \
    static_assert(args.size() == std::tuple_size_v<FunctionArgs<Pointer>::type>, \
                  "functions.h: one argument letter per argument of " #name_);   \
  };
P11MUX_FUNCTIONS(P11MUX_DESCRIBE)
#undef P11MUX_DESCRIBE

}  // namespace fn
}  // namespace p11mux
