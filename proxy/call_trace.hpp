// The `trace` log record of one call: name, arguments by their letters in
// <p11mux/functions.h>, return code name and duration. Secrets (letter k)
// and their lengths are masked. Formatting happens only when tracing is on.
#pragma once

#include "function_traits.hpp"

#include <p11mux/rv_names.hpp>

#include <spdlog/fmt/fmt.h>
#include <spdlog/logger.h>

#include <chrono>
#include <tuple>
#include <utility>

namespace p11mux {

template <class F, std::size_t I, class Tuple>
void format_argument(fmt::memory_buffer& out, const Tuple& args) {
  constexpr char letter = F::args[I];
  const auto& value = std::get<I>(args);
  if constexpr (I > 0) fmt::format_to(std::back_inserter(out), ", ");
  if constexpr (letter == 'k') {
    fmt::format_to(std::back_inserter(out), "{}", value == nullptr ? "NULL" : "***");
  } else if constexpr (I > 0 && F::args[I - 1] == 'k') {
    fmt::format_to(std::back_inserter(out), "*");  // a PIN's length is a secret too
  } else if constexpr (letter == 'h') {
    fmt::format_to(std::back_inserter(out), "{:#x}", value);
  } else if constexpr (letter == 'm') {
    if (value == nullptr) {
      fmt::format_to(std::back_inserter(out), "NULL");
    } else {
      fmt::format_to(std::back_inserter(out), "mech {:#x}", value->mechanism);
    }
  } else if constexpr (std::is_pointer_v<std::decay_t<decltype(value)>>) {
    if (value == nullptr) {
      fmt::format_to(std::back_inserter(out), "NULL");
    } else {
      fmt::format_to(std::back_inserter(out), "{}", fmt::ptr(value));
    }
  } else {
    fmt::format_to(std::back_inserter(out), "{}", value);
  }
}

template <class F, class Body, class... A>
CK_RV traced_call(spdlog::logger& log, Body&& body, A... a) noexcept {
  auto start = std::chrono::steady_clock::now();
  CK_RV rv = body();
  auto elapsed = std::chrono::steady_clock::now() - start;
  try {
    fmt::memory_buffer text;
    const std::tuple<A...> args{a...};
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (format_argument<F, I>(text, args), ...);
    }(std::index_sequence_for<A...>{});
    log.trace("{}({}) = {} [{} us]", F::name, fmt::to_string(text), rv_name(rv),
              std::chrono::duration_cast<std::chrono::microseconds>(elapsed).count());
  } catch (...) {
    // A trace record that cannot be written must not change the call's result.
  }
  return rv;
}

}  // namespace p11mux
