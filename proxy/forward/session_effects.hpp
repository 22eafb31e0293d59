// What p11mux notes after a backend call on a session, so that the pool can
// reset the backend session later: operations started, ended and maybe left
// active, session objects created and destroyed, and whether the session or
// device is gone. What p11mux cannot follow marks the session unclean: it is
// closed at the end instead of pooled (issue 10, deny by default). Also the two
// refusals caused by p11mux's own idle pooled sessions, retried after a drain.
#pragma once

#include "forward/key_mechanisms.hpp"
#include "forward/operation_state.hpp"
#include "lifecycle/runtime.hpp"
#include "sessions/gone_codes.hpp"

#include <algorithm>
#include <cstddef>
#include <optional>
#include <tuple>
#include <type_traits>

namespace p11mux {

// An object the application destroyed: no longer the binding's to destroy.
inline void forget_object(Binding& s, CK_OBJECT_HANDLE object) noexcept {
  s.objects.erase(std::remove(s.objects.begin(), s.objects.end(), object), s.objects.end());
}

// Marks a backend session "not provably clean": closed at the end, never
// pooled. The first reason is the one counted.
inline void mark_unclean(Binding& s, CloseReason why) noexcept {
  if (!s.discard) s.why = why;
  s.discard = true;
}

// What a successful key- or object-making call created: the session objects
// among the handles it returned, found with backend calls (CKA_TOKEN) that
// run before the session lock is taken, or why p11mux cannot know them.
struct CreatedObjects {
  CK_OBJECT_HANDLE session_objects[kMaxReturnedKeys];
  std::size_t count = 0;
  bool unclean = false;
  CloseReason why{};

  void deny(CloseReason reason) noexcept {
    if (!unclean) why = reason;
    unclean = true;
  }
};
struct NothingCreated {};

template <class F>
using CreatedBy =
    std::conditional_t<effect<F>.step == Step::create, CreatedObjects, NothingCreated>;

// Where the keys of a call with this mechanism come back: deny by default
// (key_mechanisms.hpp).
template <class F>
std::optional<KeyOutputs> key_outputs(CK_MECHANISM_PTR mechanism) noexcept {
  if (mechanism == nullptr) return std::nullopt;
  if constexpr (std::is_same_v<F, fn::C_DeriveKey>) {
    return derive_outputs(mechanism->mechanism);
  } else {
    return make_key_outputs(mechanism->mechanism);
  }
}

// The objects a call created, with `backend` the session it ran on. Makes
// backend calls: in multiplex mode, call it without the session lock.
template <class F, class... Rest>
CreatedBy<F> find_created(const BackendPort& port, CK_SESSION_HANDLE backend, CK_RV rv,
                          Rest... rest) noexcept {
  CreatedBy<F> created{};
  if constexpr (effect<F>.step == Step::create) {
    if (rv != CKR_OK) return created;
    ReturnedKeys keys;
    // The handles a mechanism returns in its parameter...
    std::optional<KeyOutputs> outputs = KeyOutputs::handle_args;
    if constexpr (F::args[1] == 'm') {
      CK_MECHANISM_PTR mechanism = std::get<0>(std::tuple<Rest...>{rest...});
      outputs = key_outputs<F>(mechanism);
      if (!outputs) {
        created.deny(CloseReason::unknown_mechanism);
      } else if (!add_parameter_keys(*outputs, *mechanism, keys)) {
        created.deny(CloseReason::object_untracked);
      }
    }
    // ... and those in the function's own CK_OBJECT_HANDLE_PTR arguments,
    // where the mechanism writes them (add_argument_keys).
    ReturnedKeys in_args;
    (
        [&](auto arg) {
          if constexpr (std::is_same_v<decltype(arg), CK_OBJECT_HANDLE_PTR>) {
            if (arg != nullptr) in_args.add(*arg);
          }
        }(rest),
        ...);
    if (outputs && !add_argument_keys(*outputs, in_args, keys)) {
      created.deny(CloseReason::object_untracked);
    }
    if (!keys.complete) created.deny(CloseReason::object_untracked);
    if (created.unclean) return created;  // closed at the end: what it made dies with it
    for (std::size_t i = 0; i < keys.count; ++i) {
      CK_BBOOL on_token = CK_FALSE;
      CK_ATTRIBUTE query{CKA_TOKEN, &on_token, sizeof on_token};
      CK_RV got = port.call<fn::C_GetAttributeValue>(backend, keys.handles[i], &query, CK_ULONG{1});
      // Unknown: never destroy what may be a token object; close the session
      // at the end instead, which destroys exactly its session objects.
      if (got != CKR_OK) {
        created.deny(CloseReason::object_untracked);
      } else if (on_token != CK_TRUE) {
        created.session_objects[created.count++] = keys.handles[i];
      }
    }
  }
  return created;
}

// Records what a call did to a binding: operations started, ended or maybe
// left active, the session objects it created or destroyed, a dead session.
// Makes no backend call (multiplex mode runs it under the session lock).
template <class F, class... Rest>
void record_call(SessionPool& pool, Binding& s, CK_SLOT_ID slot, CK_RV rv,
                 const CreatedBy<F>& created, Rest... rest) noexcept {
  constexpr Effect e = effect<F>;
  if constexpr (e.step == Step::create) {
    if (created.unclean) mark_unclean(s, created.why);
    for (std::size_t i = 0; i < created.count; ++i) {
      try {
        s.objects.push_back(created.session_objects[i]);
      } catch (...) {
        mark_unclean(s, CloseReason::object_untracked);
      }
    }
  } else if constexpr (e.step != Step::none) {
    const OpMask ops = s.ops;
    s.ops = ops_after<F>(ops, rv, s.backend, rest...);
    s.maybe = maybe_after<F>(ops, s.maybe, rv, s.backend, rest...);
  } else if constexpr (std::is_same_v<F, fn::C_DestroyObject>) {
    // Gone: never destroy that number again, the backend may reuse it.
    if (rv == CKR_OK) forget_object(s, std::get<0>(std::tuple<Rest...>{rest...}));
  }
  if (rv != CKR_OK && session_gone(rv)) [[unlikely]] {
    s.discard = s.dead = true;
    pool.invalidate(slot);
  }
}

// Both, for serialize mode, where the session lock is held across the call anyway.
template <class F, class... Rest>
void note_call(SessionPool& pool, Binding& s, CK_SLOT_ID slot, CK_RV rv, Rest... rest) noexcept {
  record_call<F>(pool, s, slot, rv, find_created<F>(pool.port(), s.backend, rv, rest...), rest...);
}

// Refusals p11mux makes before the call because the backend may not see the
// application's sessions: with [pool] bind = state they may hold no backend
// session. An SO login while the application has a read-only session
// (docs/pkcs11-facts.md, "Sessions").
template <class F, class... A>
[[gnu::always_inline]] inline CK_RV refused_for_sessions(SessionPool& pool, CK_SLOT_ID slot,
                                                         A... a) noexcept {
  if constexpr (std::is_same_v<F, fn::C_Login> || std::is_same_v<F, fn::C_LoginUser>) {
    if (std::get<0>(std::tuple<A...>{a...}) == CKU_SO) return pool.may_log_in_so(slot);
  }
  return CKR_OK;
}

// After the call: the login state it changed, for the same checks.
template <class F, class... A>
[[gnu::always_inline]] inline void note_login(SessionPool& pool, CK_SLOT_ID slot, CK_RV rv,
                                              A... a) noexcept {
  if constexpr (std::is_same_v<F, fn::C_Login> || std::is_same_v<F, fn::C_LoginUser>) {
    pool.logged_in(slot, std::get<0>(std::tuple<A...>{a...}), rv);
  } else if constexpr (std::is_same_v<F, fn::C_Logout>) {
    pool.logged_out(slot, rv);
  }
}

// SO login fails while R/O sessions exist, C_InitToken while any exist; the
// ones in the way may be p11mux's idle pooled sessions, not the application's.
template <class F, class... A>
bool drained_for_retry(SessionPool& pool, CK_SLOT_ID slot, CK_RV rv, A... a) noexcept {
  if constexpr (std::is_same_v<F, fn::C_Login>) {
    CK_USER_TYPE user = std::get<0>(std::tuple<A...>{a...});
    return rv == CKR_SESSION_READ_ONLY_EXISTS && user == CKU_SO &&
           pool.drain_idle(slot, /*read_only_only=*/true);
  } else if constexpr (std::is_same_v<F, fn::C_InitToken>) {
    return rv == CKR_SESSION_EXISTS && pool.drain_idle(slot, /*read_only_only=*/false);
  } else {
    return false;
  }
}

}  // namespace p11mux
