// Forwarding of every function whose dispatch is global, session or handled,
// generated from <p11mux/functions.h>; entered from Entry<F> (entry_points.cpp),
// which holds the call gate open meanwhile. The hot path — a session call
// — is: enter the call gate (one atomic add on a per-thread shard), check the
// arguments (compile-time letters), look the handle up (no table lock), lock
// that session, call the backend, unlock, leave the gate; in multiplex mode
// the session's lock gives way to a count and a claim of the thread's own
// backend session (multiplex.hpp). Nothing allocates, nothing is formatted
// unless tracing is on.
#pragma once

#include "forward/multiplex.hpp"
#include "forward/session_effects.hpp"
#include "forward/state_binding.hpp"
#include "functions/arg_check.hpp"
#include "functions/function_traits.hpp"
#include "group/group_calls.hpp"
#include "group/group_login.hpp"
#include "group/group_object_calls.hpp"
#include "group/member_calls.hpp"
#include "group/replay_calls.hpp"
#include "group/session_lanes.hpp"
#include "handled/handled.hpp"
#include "observe/observe.hpp"

namespace p11mux {

// How a forwarded call reaches the backend: straight through `port` (the
// session's, or the runtime's for a call without a session), or through a
// wrapper that runs on the same backend session (the policy's object
// filter, policy/filter_calls.hpp: ObjectFiltered). With InGroup
// (group/group_object_calls.hpp) a group's session calls also translate
// their object handles.
struct ToPort {
  template <class F, class... A>
  [[gnu::always_inline]] static CK_RV call(Runtime&, const BackendPort& port, A... a) noexcept {
    return port.template call<F>(a...);
  }
};

// The call on `s`'s backend session, which it holds: made, and noted
// (call_on_session's last step, and group_objects_call's through
// call_with_objects). kUnbinds: it gives an idle session's backend session
// back ([pool] bind = state) itself; else its caller does
// (group_session_call, which tests the mode once for both).
template <class F, bool kOnGroup, bool kUnbinds = true, class Observation, class CallBackend,
          class... A>
[[gnu::always_inline]] inline CK_RV call_on_binding(Runtime& rt, Session& s, Observation& seen,
                                                    CallBackend& call_backend, A... args) noexcept
    REQUIRES(s.lock) {
  SessionPool& pool = *s.pool;
  Binding& binding = s.anchor;
  seen.ran_on(binding.backend);
  std::conditional_t<kOnGroup, MemberCall, NoMemberCall> member(rt, s);
  CK_RV rv = call_backend(pool.port(), binding.backend, args...);
  if (drained_for_retry<F>(pool, s.slot, rv, args...)) [[unlikely]] {
    rv = call_backend(pool.port(), binding.backend, args...);
  }
  if constexpr (kOnGroup) {
    member.end(rv, s);
  }
  // The slot the application opened it on: a group's, not its member's.
  if constexpr (std::is_same_v<F, fn::C_GetSessionInfo>) {
    if (rv == CKR_OK) std::get<0>(std::tuple<decltype(args)...>{args...})->slotID = s.shown;
  }
  note_call<F>(pool, binding, s.slot, rv, args...);
  note_login<F>(pool, s.slot, rv, args...);
  if constexpr (kUnbinds) {
    if (rt.binds_on_state()) unbind_if_idle(s);
  }
  return rv;
}

// A group's call whose object handles need more than the session's last
// resolution (group_objects_call): out of line, with its own `run`, so
// that no closure of the common path's is kept in memory for it.
template <class F, class Observation, class CallBackend, class... R>
[[gnu::cold, gnu::noinline]] CK_RV call_with_objects(Runtime& rt, Session& s, Observation& seen,
                                                     CallBackend& call_backend, R... rest) noexcept
    REQUIRES(s.lock) {
  auto run = [&](auto... args) __attribute__((always_inline)) {
    HeldLock held(s.lock);  // the lambda's body runs under the caller's lock
    return call_on_binding<F, true>(rt, s, seen, call_backend, args...);
  };
  return group_objects_call<F>(rt, s, run, rest...);
}

// A serialize-mode call on session `s`, its lock held: bound to a backend
// session, made, and noted. kOnGroup: a group's session, which first moves
// off its member if that is down and counts the call on its member
// (group/member_calls.hpp); instantiated apart, so that a single backend's
// calls carry none of it.
template <class F, bool kOnGroup, class Via, class Observation, class CallBackend, class... R>
[[gnu::always_inline]] inline CK_RV call_on_session(Runtime& rt, Session& s, Observation& seen,
                                                    CallBackend& call_backend, R... rest) noexcept
    REQUIRES(s.lock) {
  if constexpr (kOnGroup) {
    if (CK_RV rv = before_member_call<F>(rt, s); rv != CKR_OK) return rv;
  }
  // The backend the session's sessions come from (Session::pool).
  SessionPool& pool = *s.pool;
  if (CK_RV rv = refused_for_sessions<F>(pool, s.slot, rest...); rv != CKR_OK) return rv;
  Binding& binding = s.anchor;
  // [pool] bind = state: an idle session holds none; it waits for one
  // holding nothing else (docs/design.md, "Binding on state").
  if (binding.backend == CK_INVALID_HANDLE) [[unlikely]] {
    // A group's member weighs the wait as work queued for it (balancer.hpp).
    std::conditional_t<kOnGroup, MemberWait, NoMemberWait> waiting(rt, s);
    if (CK_RV rv = bind_anchor(s); rv != CKR_OK) {
      if constexpr (kOnGroup) member_unreached(rt, s, rv);
      return rv;
    }
  }
  // What a failover left: operations to replay here, or lost
  // (group/replay_calls.hpp).
  if constexpr (kOnGroup) {
    if (CK_RV rv = restore_operations<F>(rt, s); rv != CKR_OK) {
      if (rt.binds_on_state()) unbind_if_idle(s);
      return rv;
    }
  }
  // A group's login is every member's (group/group_login.hpp).
  if constexpr (kOnGroup && kGroupLoginCall<F>) {
    CK_RV rv = group_login_call<F>(*rt.group_login(), s, rest...);
    if (rt.binds_on_state()) unbind_if_idle(s);
    return rv;
  }
  // A group's session on the slow path (Via InGroup): its object handles
  // are virtual (group/group_object_calls.hpp).
  constexpr bool kGroupObjects = kOnGroup && requires { Via::kGroupObjects; };
  auto run = [&](auto... args) __attribute__((always_inline)) {
    HeldLock held(s.lock);  // the lambda's body runs under the caller's lock
    return call_on_binding<F, kOnGroup, !kGroupObjects>(rt, s, seen, call_backend, args...);
  };
  if constexpr (kGroupObjects) {
    auto with_objects = [&](auto... args) __attribute__((always_inline)) {
      HeldLock held(s.lock);  // as in `run`
      return call_with_objects<F>(rt, s, seen, call_backend, args...);
    };
    return group_session_call<F>(rt, s, run, with_objects, rest...);
  } else {
    return run(rest...);
  }
}

// Whether F, which `s`'s member answered `rv` after `interruption`
// (SessionOperations::take_interruption) on try `tried`, is made again
// (group/replay_calls.hpp): on the next member, at most once per member, or
// on a fresh backend session of the same member. `rv` may become the answer
// for an operation the renewal lost.
template <class F>
bool made_again(Runtime& rt, Session& s, CK_RV& rv, SessionOperations::Interruption interruption,
                std::size_t tried, bool restorable) noexcept REQUIRES(s.lock) {
  if (rv == CKR_OK || !interrupted(rv) || tried > rt.groups()->members(s.group).size())
    return false;
  const bool unreached = interruption == SessionOperations::Interruption::unreached;
  // Down: the next try moves it (before_member_call). Up: its backend
  // session went, and it gets a fresh one; the virtual session lives on, so
  // an answer saying it is gone would mislead the application.
  const bool member_up = rt.groups()->health(s.group, s.member).up();
  const bool renewed = member_up && !unreached && renew_gone_session(rt, s) == CKR_OK;
  if ((!member_up || renewed || unreached) && restorable &&
      retried_on_failover<F>(s, /*not_run=*/renewed || unreached))
    return true;
  if (renewed) rv = kOperationLostRv;
  return false;
}

// call_on_group_session's first try was interrupted, and answered `rv`:
// made again while made_again says so, each time with the application's
// lengths. Out of line: only a member's failure comes here.
template <class F, class Via, class Observation, class CallBackend, class Lengths,
          class TemplateLengths, class... R>
[[gnu::cold, gnu::noinline]] CK_RV call_again(Runtime& rt, Session& s, Observation& seen,
                                              CallBackend& call_backend, CK_RV rv,
                                              const Lengths& lengths,
                                              const TemplateLengths& template_lengths,
                                              R... rest) noexcept REQUIRES(s.lock) {
  for (std::size_t tried = 1;; ++tried) {
    const auto interruption = s.operations->take_interruption();
    if (interruption == SessionOperations::Interruption::none ||
        !made_again<F>(rt, s, rv, interruption, tried, template_lengths.restorable()))
      return rv;
    lengths.restore(rest...);
    template_lengths.restore(rest...);
    rv = call_on_session<F, true, Via>(rt, s, seen, call_backend, rest...);
  }
}

// A call on a group's session: call_on_session with the member's part,
// made again when an interruption allows (call_again); else the member's
// answer reaches the application, and ends what any error of that call
// ends. Inlined into Entry<F>::call, whose frame it shares: out of line,
// its own frame cost a group's call 30 instructions (callgrind).
template <class F, class Via, class Observation, class CallBackend, class... R>
[[gnu::always_inline]] inline CK_RV call_on_group_session(Runtime& rt, Session& s,
                                                          Observation& seen,
                                                          CallBackend& call_backend,
                                                          R... rest) noexcept REQUIRES(s.lock) {
  if constexpr (requires { Via::kGroupObjects; }) {
    SessionOperations& operations = *s.operations;
    const OutputLengths<F, R...> lengths(rest...);
    const TemplateLengths<F, R...> template_lengths(rest...);
    CK_RV rv = call_on_session<F, true, Via>(rt, s, seen, call_backend, rest...);
    // The application's answer: the records follow it (an interrupted try
    // made again is not one). Only a member's answer other than CKR_OK
    // marks an interruption, and no later step of the call turns that
    // answer into CKR_OK: a success needs no look, and its records' update
    // is compiled for CKR_OK (callgrind: 8 instructions a C_Sign, 3 a
    // C_SignInit; issue 15's "+50").
    if (rv == CKR_OK) [[likely]] {
      operations.template after<F>(CKR_OK, CK_SESSION_HANDLE{}, rest...);
      return CKR_OK;
    }
    if (operations.interrupted())
      rv = call_again<F, Via>(rt, s, seen, call_backend, rv, lengths, template_lengths, rest...);
    operations.template after<F>(rv, CK_SESSION_HANDLE{}, rest...);
    return rv;
  } else {
    return call_on_session<F, true, Via>(rt, s, seen, call_backend, rest...);
  }
}

// Multiplex mode on a group's slot: the call runs on this thread's lane of
// the session (group/session_lanes.hpp), as serialize mode runs a call on a
// group's session. A lane found closed (its session closing, or a stale
// entry of the thread's cache) is looked up once more through its lead.
template <class F, class Via, class Observation, class CallBackend, class... R>
[[gnu::cold, gnu::noinline]] CK_RV call_on_lane(Runtime& rt, Observation& seen,
                                                CallBackend& call_backend, CK_SESSION_HANDLE handle,
                                                R... rest) noexcept {
  // C_SessionCancel names operations, not a thread: it runs on every lane
  // holding one of them (as multiplex.hpp's cancel_where_held on bindings);
  // where none does, on the thread's own lane, as any call.
  if constexpr (std::is_same_v<F, fn::C_SessionCancel>) {
    std::vector<CK_SESSION_HANDLE> lanes;
    if (CK_RV rv = lanes_of(rt, handle, lanes); rv != CKR_OK) return rv;
    const OpMask named = ops_of_cancel_flags(rest...);
    bool ran = false;
    CK_RV first = CKR_OK;
    for (const CK_SESSION_HANDLE lane : lanes) {
      SessionLease session = seen.lease(rt.sessions(), lane);
      if (!session) continue;
      HeldLock leased(session->lock);
      if (session->lead != handle || ((session->anchor.ops | session->anchor.maybe) & named) == 0)
        continue;
      ran = true;
      const CK_RV rv = call_on_group_session<F, Via>(rt, *session, seen, call_backend, rest...);
      if (first == CKR_OK) first = rv;
    }
    if (ran) return first;
  }
  LaneCache::Entry& cached = lane_cache.at(handle);
  for (int looked = 0; looked < 2; ++looked) {
    CK_SESSION_HANDLE lane = cached.lead == handle ? cached.lane : CK_INVALID_HANDLE;
    if (lane == CK_INVALID_HANDLE) {
      if (CK_RV rv = lane_of(rt, handle, this_thread_number(), lane); rv != CKR_OK) return rv;
      cached = {handle, lane};
    }
    if (SessionLease session = seen.lease(rt.sessions(), lane)) {
      HeldLock leased(session->lock);
      if (session->lead == handle) {
        const CK_RV rv = call_on_group_session<F, Via>(rt, *session, seen, call_backend, rest...);
        note_lane_objects(*session);
        return rv;
      }
    }
    cached = {};
  }
  return CKR_SESSION_HANDLE_INVALID;
}

// `seen` is NoObservation on the normal path, CallObservation when observed.
// Inlined into Entry<F>::call: one stack frame on the hot path (callgrind:
// each extra frame costs ~15 instructions of register saves).
template <class F, class Via = ToPort, class Observation, class... A>
[[gnu::always_inline]] inline CK_RV forward_observed(Runtime& rt, Observation& seen,
                                                     A... a) noexcept {
  if (CK_RV rv = check_arguments<F>(rt.port().version().major >= 3, a...); rv != CKR_OK) return rv;
  // The slot functions of a group configuration (none of the session ones).
  if constexpr (kGroupAnswered<F, A...>) {
    if (const GroupRuntime* groups = rt.groups()) [[unlikely]]
      return group_answer(*groups, F{}, a...);
  }
  if constexpr (F::dispatch == Dispatch::handled) {
    return handler<F>(rt, a...);
  } else {
    auto call_backend = [&](const BackendPort& port, auto... args) __attribute__((always_inline)) {
      return Via::template call<F>(rt, port, args...);
    };
    if constexpr (F::dispatch == Dispatch::session) {
      // A group's session: its object handles are virtual (InGroup,
      // group/group_object_calls.hpp). A [policy] refuses group sessions
      // (handled/session_calls.cpp), so its Via never meets one.
      using OnGroup = std::conditional_t<std::is_same_v<Via, ToPort>, InGroup, Via>;
      return [&](CK_SESSION_HANDLE handle, auto... rest) __attribute__((always_inline)) {
        if (rt.multiplexed()) {
          // A group's slot: each thread on a lane of its own.
          if (rt.groups() != nullptr) [[unlikely]]
            return call_on_lane<F, OnGroup>(rt, seen, call_backend, handle, rest...);
          // The single backend: its calls take the runtime's port.
          auto on_runtime_port = [&](auto... args) __attribute__((always_inline)) {
            return call_backend(rt.port(), args...);
          };
          return forward_multiplexed<F>(rt, seen, on_runtime_port, handle, rest...);
        }
        // Serialize mode: the session's lock is held across the call.
        SessionLease session = seen.lease(rt.sessions(), handle);
        if (!session) return CKR_SESSION_HANDLE_INVALID;
        HeldLock leased(session->lock);
        // A group's session also reports to its member (member_calls.hpp).
        if (session->group != Session::kNoGroup) [[unlikely]]
          return call_on_group_session<F, OnGroup>(rt, *session, seen, call_backend, rest...);
        return call_on_session<F, false, Via>(rt, *session, seen, call_backend, rest...);
      }
      (a...);
    } else {
      CK_RV rv = call_backend(rt.port(), a...);
      if constexpr (std::is_same_v<F, fn::C_InitToken>) {
        if (drained_for_retry<F>(rt.pool(), std::get<0>(std::tuple<A...>{a...}), rv)) {
          rv = call_backend(rt.port(), a...);
        }
      }
      return rv;
    }
  }
}

template <class F, class Via = ToPort, class... A>
[[gnu::always_inline]] inline CK_RV forward(Runtime& rt, A... a) noexcept {
  NoObservation none;
  return forward_observed<F, Via>(rt, none, a...);
}

}  // namespace p11mux
