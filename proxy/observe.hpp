// The observed path of a call, taken only when tracing or metrics are on:
// times the call, learns from forward<F> the backend session it ran on and
// how long it waited for the session's lock, counts it, and traces it.
//
// forward<F> takes an observation policy: NoObservation (the normal path,
// compiled exactly as without observation) or CallObservation.
#pragma once

#include "call_trace.hpp"
#include "metrics.hpp"
#include "observer.hpp"
#include "session_table.hpp"

#include <chrono>
#include <cstdint>

namespace p11mux {

struct NoObservation {
  [[gnu::always_inline]] SessionLease lease(SessionTable& sessions, CK_SESSION_HANDLE handle) const noexcept {
    return sessions.lease(handle);
  }
  void ran_on(CK_SESSION_HANDLE) const noexcept {}
};

struct CallObservation {
  CK_SESSION_HANDLE backend = CK_INVALID_HANDLE;
  std::uint64_t lock_wait_ns = 0;
  bool locked = false;

  SessionLease lease(SessionTable& sessions, CK_SESSION_HANDLE handle) noexcept {
    return sessions.lease(handle, [this](Mutex& lock) {
      auto start = std::chrono::steady_clock::now();
      lock.lock();
      lock_wait_ns = static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
              .count());
      locked = true;
    });
  }
  void ran_on(CK_SESSION_HANDLE backend_session) noexcept { backend = backend_session; }
};

// `body(CallObservation&)` is the call: forward<F> with an observation.
template <class F, class Body, class... A>
CK_RV observed_call(Observer& observer, spdlog::logger& log, Body&& body, A... a) noexcept {
  constexpr std::size_t index = function_index<F>;
  const bool trace = observer.traces(index);
  std::array<CK_ULONG, sizeof...(A)> capacities{};
  if (trace) capacities = output_capacities<F>(a...);
  CallObservation seen;
  const auto start = std::chrono::steady_clock::now();
  const CK_RV rv = body(seen);
  const auto ns = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count());
  if (Metrics* metrics = observer.metrics()) {
    metrics->record_call(index, rv, ns);
    if (seen.locked) metrics->record_lock_wait(seen.lock_wait_ns);
  }
  if (trace && ns >= observer.min_trace_ns()) {
    write_trace<F>(log, CallFacts{rv, ns, seen.lock_wait_ns, seen.backend}, capacities, a...);
  }
  observer.poll_summary_request();
  return rv;
}

}  // namespace p11mux
