// The argument checks the spec requires, derived from the letters in
// <p11mux/functions.h> at compile time, done before the backend is reached.
#pragma once

#include "functions/function_traits.hpp"

#include <tuple>
#include <utility>

namespace p11mux {

template <class F, std::size_t I, class Tuple>
constexpr bool argument_ok(const Tuple& args, bool v3_backend) noexcept {
  constexpr char letter = F::args[I];
  if constexpr (letter == 'p') {
    return std::get<I>(args) != nullptr;
  } else if constexpr (letter == 'b' || letter == 't') {
    // A buffer or template may be NULL only when its length or count is 0.
    return std::get<I>(args) != nullptr || std::get<I + 1>(args) == 0;
  } else if constexpr (letter == 'm') {
    // v3.0: C_xxxInit(hSession, NULL, ...) cancels the operation.
    return std::get<I>(args) != nullptr || v3_backend;
  } else {
    return true;
  }
}

template <class F, class... A>
constexpr CK_RV check_arguments(bool v3_backend, A... a) noexcept {
  const std::tuple<A...> args{a...};
  bool ok = [&]<std::size_t... I>(std::index_sequence<I...>) {
    return (argument_ok<F, I>(args, v3_backend) && ...);
  }
  (std::index_sequence_for<A...>{});
  return ok ? CKR_OK : CKR_ARGUMENTS_BAD;
}

}  // namespace p11mux
