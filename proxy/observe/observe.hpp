// The observed path of a call, taken only when tracing or metrics are on:
// times the call, learns from forward<F> the backend session it ran on and
// how long it waited for the session's lock, counts it, and traces it.
//
// forward<F> takes an observation policy: NoObservation (the normal path,
// compiled exactly as without observation) or CallObservation.
#pragma once

#include "observe/call_trace.hpp"
#include "observe/metrics.hpp"
#include "observe/observer.hpp"
#include "sessions/session_table.hpp"

#include <chrono>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace p11mux {

struct NoObservation {
  [[gnu::always_inline]] SessionLease lease(SessionTable& sessions,
                                            CK_SESSION_HANDLE handle) const noexcept {
    return sessions.lease(handle);
  }
  void ran_on(CK_SESSION_HANDLE) const noexcept {}
};

struct CallObservation {
  CK_SESSION_HANDLE backend = CK_INVALID_HANDLE;
  std::uint64_t lock_wait_ns = 0;
  bool locked = false;
  // C_GetAttributeValue, traced: its template's capacities, taken in ran_on.
  TemplateCapacities* capture = nullptr;
  const CK_ATTRIBUTE* capture_template = nullptr;
  CK_ULONG capture_count = 0;

  SessionLease lease(SessionTable& sessions, CK_SESSION_HANDLE handle) noexcept {
    // NO_THREAD_SAFETY_ANALYSIS: the lock goes to the lease (session_table.hpp).
    return sessions.lease(handle, [this](Mutex& lock) NO_THREAD_SAFETY_ANALYSIS {
      auto start = std::chrono::steady_clock::now();
      lock.lock();
      lock_wait_ns =
          static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                         std::chrono::steady_clock::now() - start)
                                         .count());
      locked = true;
    });
  }
  // Called just before the backend is: the arguments passed p11mux's checks
  // and the session handle is valid, so the backend reads them as well.
  void ran_on(CK_SESSION_HANDLE backend_session) noexcept {
    backend = backend_session;
    if (capture != nullptr) capture->capture(capture_template, capture_count);
  }
};

// `body(CallObservation&)` is the call: forward<F> with an observation.
template <class F, class Body, class... A>
CK_RV observed_call(Observer& observer, spdlog::logger& log, Body&& body, A... a) noexcept {
  constexpr std::size_t index = function_index<F>;
  const bool trace = observer.traces(index);
  std::array<CK_ULONG, sizeof...(A)> capacities{};
  if (trace) capacities = output_capacities<F>(a...);
  CallObservation seen;
  constexpr bool fills_template = std::is_same_v<F, fn::C_GetAttributeValue>;
  std::array<TemplateCapacities, fills_template ? 1 : 0> template_capacities;
  if constexpr (fills_template) {
    if (trace) {
      const std::tuple<A...> args{a...};
      seen.capture = &template_capacities[0];
      seen.capture_template = std::get<2>(args);
      seen.capture_count = std::get<3>(args);
    }
  }
  const auto start = std::chrono::steady_clock::now();
  const CK_RV rv = body(seen);
  const auto ns = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count());
  if (Metrics* metrics = observer.metrics()) {
    metrics->record_call(index, rv, ns);
    if (seen.locked) metrics->record_lock_wait(seen.lock_wait_ns);
  }
  if (trace && ns >= observer.min_trace_ns()) {
    write_trace<F>(log,
                   CallFacts{rv, ns, seen.lock_wait_ns, seen.backend,
                             fills_template ? template_capacities.data() : nullptr},
                   capacities, a...);
  }
  observer.poll_summary_request();
  return rv;
}

}  // namespace p11mux
