// The `trace` log record of one call, built from the argument letters of
// <p11mux/functions.h>: name, arguments, return code name, duration, and the
// time spent waiting for the session's lock when there was any. A buffer and
// its length print as one item ("[32 bytes]"), and so do a template and its
// count, a PIN and its length ("***": both masked), and an output buffer with
// its length pointer ("[256]->64": capacity, then what the call returned).
// Formatting happens only for calls that are traced; see trace_format.hpp for
// what is never written.
#pragma once

#include "functions/function_traits.hpp"
#include "observe/trace_format.hpp"

#include <p11mux/rv_names.hpp>

#include <spdlog/logger.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

namespace p11mux {

// C_GetAttributeValue's template as the caller gave it: each attribute's
// ulValueLen on entry (its buffer's capacity), which the call overwrites.
// Captured only once the call has passed p11mux's checks and the session
// lookup (CallObservation::ran_on), i.e. when the backend gets to read it
// too: a refused call's count is never walked.
struct TemplateCapacities {
  bool captured = false;
  CK_ULONG count = 0;                            // min(ulCount, kMaxAttributesShown)
  std::array<CK_ULONG, kMaxAttributesShown> of;  // left uninitialized: only [0, count) is read

  void capture(const CK_ATTRIBUTE* attributes, CK_ULONG attribute_count) noexcept {
    count = attributes == nullptr ? 0 : std::min<CK_ULONG>(attribute_count, kMaxAttributesShown);
    for (CK_ULONG i = 0; i < count; ++i) of[i] = attributes[i].ulValueLen;
    captured = true;
  }
};

// What the tracer learns from the call besides its arguments.
struct CallFacts {
  CK_RV rv = CKR_OK;
  std::uint64_t elapsed_ns = 0;
  std::uint64_t lock_wait_ns = 0;
  CK_SESSION_HANDLE backend = CK_INVALID_HANDLE;            // the backend session, when known
  const TemplateCapacities* template_capacities = nullptr;  // C_GetAttributeValue's
};

// The capacity of each output buffer ('o'), read before the call overwrites
// it with the length it returns; 0 elsewhere.
template <class F, class... A>
std::array<CK_ULONG, sizeof...(A)> output_capacities(A... a) noexcept {
  std::array<CK_ULONG, sizeof...(A)> caps{};
  const std::tuple<A...> args{a...};
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (
        [&] {
          if constexpr (F::args[I] == 'o') {
            const CK_ULONG* length = std::get<I + 1>(args);
            if (length != nullptr) caps[I] = *length;
          }
        }(),
        ...);
  }
  (std::index_sequence_for<A...>{});
  return caps;
}

namespace trace_detail {

// Whether a pointer's target was written by the call, so that it may be read.
inline bool filled(CK_RV rv) noexcept { return rv == CKR_OK; }
inline bool length_filled(CK_RV rv) noexcept { return rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL; }
// C_GetAttributeValue fills its template even when it reports these.
inline bool template_filled(CK_RV rv) noexcept {
  return rv == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID ||
         rv == CKR_BUFFER_TOO_SMALL;
}

template <class F, std::size_t I, class Tuple, std::size_t N>
void format_argument(TraceBuffer& out, const Tuple& args, const CallFacts& facts,
                     const std::array<CK_ULONG, N>& caps) {
  constexpr char letter = F::args[I];
  constexpr char previous = I > 0 ? F::args[I - 1] : ' ';
  if constexpr (previous == 'k' || previous == 'b' || previous == 't' || previous == 'o') {
    return;  // a length, count or length pointer: shown with what it measures
  } else {
    const auto& value = std::get<I>(args);
    using T = std::remove_cvref_t<decltype(value)>;
    if constexpr (I > 0) append(out, ", ");
    if constexpr (letter == 'h') {
      format_session(out, value, facts.backend);
    } else if constexpr (letter == 'v') {
      format_number(out, value);
    } else if constexpr (letter == 'k') {
      append(out, value == nullptr ? "NULL" : "***");
    } else if constexpr (letter == 'm') {
      format_mechanism(out, value);
    } else if constexpr (letter == 't') {
      // Walked only as far as the call validated it: an input template when
      // the call accepted it, C_GetAttributeValue's when its capacities were
      // captured on the way to the backend. Otherwise by count alone (a
      // stale handle with a count of 1,000,000 and a short template).
      const CK_ULONG count = std::get<I + 1>(args);
      if constexpr (std::is_same_v<F, fn::C_GetAttributeValue>) {
        const TemplateCapacities* caps_in = facts.template_capacities;
        if (caps_in != nullptr && caps_in->captured) {
          // capture() took min(count, kMaxAttributesShown), the attributes shown.
          format_filled_template(out, value, count, caps_in->of.data(), template_filled(facts.rv));
        } else {
          format_template_count(out, value, count);
        }
      } else if (facts.rv == CKR_OK) {
        format_template(out, value, count, true);
      } else {
        format_template_count(out, value, count);
      }
    } else if constexpr (letter == 'b') {
      const CK_ULONG length = std::get<I + 1>(args);
      if (value == nullptr) {
        append(out, "NULL");
      } else if constexpr (std::is_same_v<T, CK_OBJECT_HANDLE_PTR>) {
        // C_FindObjects: the handles found, counted by the pointer after the length.
        fmt::format_to(std::back_inserter(out), "[max {}", length);
        if constexpr (I + 2 < F::args.size() && F::args[I + 2] == 'p') {
          const CK_ULONG* found = std::get<I + 2>(args);
          if (filled(facts.rv) && found != nullptr) {
            for (CK_ULONG i = 0; i < std::min<CK_ULONG>({*found, length, 16}); ++i) {
              fmt::format_to(std::back_inserter(out), "{}{:#x}", i == 0 ? ": " : ", ", value[i]);
            }
          }
        }
        append(out, "]");
      } else {
        fmt::format_to(std::back_inserter(out), "[{} bytes]", length);
      }
    } else if constexpr (letter == 'o') {
      const CK_ULONG* length = std::get<I + 1>(args);
      if (value == nullptr) {
        append(out, "NULL");
      } else {
        fmt::format_to(std::back_inserter(out), "[{}]", caps[I]);
      }
      if (length != nullptr && length_filled(facts.rv)) {
        fmt::format_to(std::back_inserter(out), "->{}", *length);
      }
    } else if constexpr (letter == 'p' || letter == 'n') {
      if (value == nullptr) {
        append(out, "NULL");
      } else if constexpr (letter == 'p' && std::is_same_v<T, CK_UTF8CHAR_PTR>) {
        format_label(out, value);  // C_InitToken's label: the only required byte pointer
      } else if constexpr (std::is_object_v<std::remove_pointer_t<T>> &&
                           !std::is_void_v<std::remove_pointer_t<T>>) {
        if (filled(facts.rv)) {
          format_output(out, *value);
        } else {
          append(out, "&");
        }
      } else {
        fmt::format_to(std::back_inserter(out), "{}", fmt::ptr(value));
      }
    } else {
      static_assert(letter == 0, "functions.h: an argument letter the tracer does not know");
    }
  }
}

}  // namespace trace_detail

// Writes the record at `trace`. Never throws: a record that cannot be
// written must not change the call's result.
template <class F, class... A>
void write_trace(spdlog::logger& log, const CallFacts& facts,
                 const std::array<CK_ULONG, sizeof...(A)>& caps, A... a) noexcept {
  try {
    TraceBuffer text;
    const std::tuple<A...> args{a...};
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (trace_detail::format_argument<F, I>(text, args, facts, caps), ...);
    }
    (std::index_sequence_for<A...>{});
    append(text, ") = ");
    append(text, rv_name(facts.rv));
    append(text, " [");
    format_duration(text, facts.elapsed_ns);
    if (facts.lock_wait_ns >= 1000) {
      append(text, ", session lock wait ");
      format_duration(text, facts.lock_wait_ns);
    }
    append(text, "]");
    log.trace("{}({}", F::name, std::string_view(text.data(), text.size()));
  } catch (...) {
  }
}

}  // namespace p11mux
