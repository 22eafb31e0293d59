// A session call on a group's session, with object handles translated
// (docs/groups.md, "Objects"): forward.hpp runs the call through
// group_session_call when its Via is InGroup, which it takes for a session
// with a group only (Session::group), so the single backend's forwarding
// pays one branch for all of this.
//
// Which arguments are object handles, and the code each gets when the
// member cannot serve it, come from the function's traits
// (policy/filters.hpp object_handle_args); which calls make objects, and
// where they return them, from forward/operation_state.hpp (Step::create)
// and the arguments' types, as forward/session_effects.hpp finds them.
#pragma once

#include "forward/operation_state.hpp"
#include "forward/state_binding.hpp"
#include "group/attribute_snapshot.hpp"
#include "group/group_objects.hpp"
#include "group/member_calls.hpp"
#include "group/replay_calls.hpp"
#include "lifecycle/runtime.hpp"
#include "policy/filters.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

namespace p11mux {

// forward.hpp's Via for a group configuration: the backend call as ToPort's,
// and kGroupObjects, which sends a group's session calls through
// group_session_call.
struct InGroup {
  static constexpr bool kGroupObjects = true;
  template <class F, class... A>
  [[gnu::always_inline]] static CK_RV call(Runtime&, const BackendPort& port, A... a) noexcept {
    return port.template call<F>(a...);
  }
};

// Whether group_session_call has anything to do for F: an object handle or
// a mechanism (whose parameter may name one) among its arguments, or
// object handles it returns. The others (C_GenerateRandom, C_Sign, ...)
// go straight through.
template <class F>
inline constexpr bool kTouchesObjects =
    object_handle_args<F>().size() != 0 ||
    (F::args.size() > 1 && F::args[1] == 'm') || effect<F>.step == Step::create
    || F::name == "C_FindObjects";

// Whether F's only object work is its one handle argument, or its
// mechanism (an Init, C_GetAttributeValue, C_DigestKey): it makes, finds,
// changes and destroys none. group_session_call takes those inline when the
// session resolved the same handle last.
template <class F>
inline constexpr bool kResolvesOnly =
    object_handle_args<F>().size() <= 1 &&
    effect<F>.step != Step::create&& F::name != "C_FindObjects" && F::name != "C_DestroyObject" &&
    F::name != "C_SetAttributeValue" && F::name != "C_GenerateKey" &&
    F::name != "C_GenerateKeyPair";

// How many of the templates of F that make objects ask for a token object
// (CKA_TOKEN true): 0 for a call that makes session objects only.
template <class F, class Args>
std::size_t token_templates(const Args& args) noexcept {
  constexpr auto templates = creation_templates<F>();
  std::size_t tokens = 0;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (..., [&] {
      constexpr std::size_t t = templates[I];
      if (group_token_template(std::get<t - 1>(args), std::get<t>(args))) ++tokens;
    }());
  }
  (std::make_index_sequence<templates.size()>{});
  return tokens;
}

// The CK_OBJECT_HANDLE_PTR arguments of a call that makes objects, where the
// member writes them (a pair: two), and how many.
template <class Args>
std::size_t made_handles(const Args& args, std::array<CK_OBJECT_HANDLE_PTR, 2>& made) noexcept {
  std::size_t n = 0;
  auto keep = [&](auto arg) {
    if constexpr (std::is_same_v<decltype(arg), CK_OBJECT_HANDLE_PTR>) made[n++] = arg;
  };
  std::apply([&](auto... a) { (keep(a), ...); }, args);
  return n;
}

// `run(args...)` is forward.hpp's call on the session's backend session,
// with what it notes afterwards (session_effects.hpp), which must see the
// member's handles: it gets them, the application the virtual ones.
// `rest`: the arguments after the session handle.
template <class F, class Run, class... Rest>
CK_RV group_objects_call(Runtime& rt, Session& s, Run run, Rest... rest) noexcept REQUIRES(s.lock);

// The calls with no object work, and the common case of those with a
// little, inline; the rest is group_objects_call's.
template <class F, class Run, class WithObjects, class... Rest>
[[gnu::always_inline]] inline CK_RV group_session_call(Runtime& rt, Session& s, Run& run,
                                                       WithObjects with_objects,
                                                       Rest... rest) noexcept REQUIRES(s.lock) {
  // The call on the member as it is, then, as group_objects_call does: what
  // pinned to a backend session given back is gone with it.
  auto run_as_is = [&](auto... args) __attribute__((always_inline)) {
    HeldLock held(s.lock);  // the lambda's body runs under the caller's lock
    auto run_once = [&]() __attribute__((always_inline)) {
      HeldLock held_here(s.lock);  // as above
      CK_RV rv = run(args...);
      // An Init the member refused for an operation an error ended (replay_calls.hpp).
      if constexpr (kTouchesObjects<F>) {
        if (init_past_kept<F>(rt, s, rv)) [[unlikely]]
          rv = run(args...);
      }
      return rv;
    };
    // [pool] bind = open never gives a backend session back during a call.
    if (!rt.binds_on_state()) [[likely]]
      return run_once();
    // `run` leaves the giving back to this (forward.hpp, call_on_binding's
    // kUnbinds), so that bind = open tests the mode once a call.
    const CK_SESSION_HANDLE made_on = s.anchor.backend;
    const CK_RV rv = run_once();
    unbind_if_idle(s);
    if (made_on != CK_INVALID_HANDLE && s.anchor.backend != made_on) [[unlikely]]
      group_session_ended(rt, s.group, s.member, made_on);
    return rv;
  };
  if constexpr (!kTouchesObjects<F>) {
    return run_as_is(rest...);
  } else {
    if constexpr (kResolvesOnly<F>) {
      // Without group_objects_call's GroupCall: the session's last handle
      // again (ResolvedHandle), a mechanism without a parameter.
      std::tuple<Rest...> args{rest...};
      bool as_is = true;
      if constexpr (F::args.size() > 1 && F::args[1] == 'm') {
        const CK_MECHANISM_PTR mechanism = std::get<0>(args);
        as_is = mechanism == nullptr || mechanism->ulParameterLen == 0;
      }
      if constexpr (constexpr auto handles = object_handle_args<F>(); handles.size() == 1) {
        auto& object = std::get<handles[0].index - 1>(args);
        as_is = as_is && s.operations->last_resolved.reuse(object, object);
      }
      // (std::apply's call would not be inlined.)
      if (as_is) [[likely]] {
        return [&]<std::size_t... I>(std::index_sequence<I...>) __attribute__((always_inline)) {
          return run_as_is(std::get<I>(args)...);
        }
        (std::index_sequence_for<Rest...>{});
      }
    }
    return with_objects(rest...);
  }
}

template <class F, class Run, class... Rest>
CK_RV group_objects_call(Runtime& rt, Session& s, Run run, Rest... rest) noexcept REQUIRES(s.lock) {
  GroupCall call{rt,
                 rt.group_objects(s.group),
                 s.group,
                 s.member,
                 s.anchor.backend,
                 F::name,
                 ((s.anchor.ops | s.anchor.maybe) & op::find) != 0};
  std::tuple<Rest...> args{rest...};
  CK_RV rv = CKR_OK;
  // The handles the application passes: the member's own.
  constexpr auto handles = object_handle_args<F>();
  ResolvedHandle& last = s.operations->last_resolved;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (..., [&] {
      constexpr HandleArg h = handles[I];
      auto& object = std::get<h.index - 1>(args);
      // C_SetOperationState: 0 is "no key".
      if (rv != CKR_OK || (F::name == "C_SetOperationState" && object == CK_INVALID_HANDLE)) return;
      rv = group_resolve(call, last, object, h.invalid, object);
    }());
  }
  (std::make_index_sequence<handles.size()>{});
  // A mechanism whose parameter names an object (group_mechanism).
  CK_MECHANISM mechanism_copy{};
  MechanismCopyParam param{};
  if constexpr (F::args.size() > 1 && F::args[1] == 'm') {
    CK_MECHANISM_PTR& mechanism = std::get<0>(args);
    if (rv == CKR_OK && mechanism != nullptr && mechanism->ulParameterLen != 0) {
      rv = group_mechanism(call, mechanism, mechanism_copy, param, mechanism);
    }
  }
  // generate_token_keys (docs/groups.md, "Configuration"): a token key is
  // refused, or made on the primary member.
  if constexpr (F::name == "C_GenerateKey" || F::name == "C_GenerateKeyPair") {
    const std::size_t tokens = token_templates<F>(args);
    std::size_t maker = s.member;
    if (rv == CKR_OK && tokens != 0)
      rv = group_token_key_member(call, tokens == creation_templates<F>().size(), maker);
    if (rv == CKR_OK && maker != s.member) {
      std::array<CK_OBJECT_HANDLE_PTR, 2> made{};
      const std::size_t n = made_handles(args, made);
      rv = group_generate_on(
          call, maker,
          [](void* ctx, const BackendPort& port, CK_SESSION_HANDLE h) noexcept -> CK_RV {
            return std::apply([&](auto... a) { return port.template call<F>(h, a...); },
                              *static_cast<std::tuple<Rest...>*>(ctx));
          },
          &args, made.data(), n);
      if (rt.binds_on_state()) unbind_if_idle(s);
      return rv;
    }
  }
  // C_SetAttributeValue of a token object: the values it changes, read on
  // the session's member before the change, to set them back if another
  // member refuses it.
  constexpr bool kSet = F::name == "C_SetAttributeValue";
  [[maybe_unused]] std::conditional_t<kSet, AttributeSnapshot, std::monostate> old{};
  [[maybe_unused]] bool replicated_set = false;
  if constexpr (kSet) {
    const CK_OBJECT_HANDLE handle = std::get<0>(std::tuple<Rest...>{rest...});
    if (rv == CKR_OK && group_replicated(call, handle)) {
      replicated_set = true;
      group_set_snapshot(call, std::get<0>(args), std::get<1>(args), std::get<2>(args), old);
    }
  }
  if (rv != CKR_OK) {
    // An error of C_DigestKey ends the digest (docs/pkcs11-facts.md): this
    // one is p11mux's and never reached the member, which still has it.
    if constexpr (F::name == "C_DigestKey") end_digest_on_member(rt, s);
    // forward.hpp bound a backend session for this call ([pool] bind = state).
    if (rt.binds_on_state()) unbind_if_idle(s);
    return rv;
  }
  // The backend session this call makes session objects in.
  const CK_SESSION_HANDLE made_on = s.anchor.backend;
  rv = std::apply(run, args);
  // An Init the member refused for an operation an error ended (replay_calls.hpp).
  if (init_past_kept<F>(rt, s, rv)) [[unlikely]]
    rv = std::apply(run, args);
  // [pool] bind = state may have given the backend session back: the map's
  // reads then borrow one (group_objects.hpp, GroupCall::backend).
  if (s.anchor.backend != made_on) call.backend = CK_INVALID_HANDLE;
  if constexpr (effect<F>.step == Step::create) {
    // Every CK_OBJECT_HANDLE_PTR of a function that makes objects receives
    // one (session_effects.hpp, find_created).
    if (rv == CKR_OK) {
      auto issue = [&](auto arg) {
        if constexpr (std::is_same_v<decltype(arg), CK_OBJECT_HANDLE_PTR>) {
          if (rv == CKR_OK && arg != nullptr && *arg != CK_INVALID_HANDLE)
            rv = group_issue_made(call, made_on, *arg);
        }
      };
      // C_CreateObject's and C_CopyObject's object, the member's number.
      CK_OBJECT_HANDLE own = CK_INVALID_HANDLE;
      if constexpr (F::name == "C_CreateObject") own = *std::get<2>(args);
      if constexpr (F::name == "C_CopyObject") own = *std::get<3>(args);
      // A token object whose identity another has: refused (group_refuse_taken).
      // (A template without CKA_TOKEN true makes a session object: spec default.)
      if constexpr (F::name == "C_CreateObject") {
        if (group_token_template(std::get<0>(args), std::get<1>(args)))
          rv = group_refuse_taken(call, &std::get<2>(args), 1);
      }
      if constexpr (F::name == "C_CopyObject") rv = group_refuse_taken(call, &std::get<3>(args), 1);
      // A token key (generated here, unwrapped, derived) stays on this member:
      // its identity must be free on the others too.
      if constexpr (F::name == "C_GenerateKey" || F::name == "C_GenerateKeyPair" ||
                    F::name == "C_UnwrapKey" || F::name == "C_DeriveKey") {
        if (token_templates<F>(args) != 0) {
          std::array<CK_OBJECT_HANDLE_PTR, 2> made{};
          rv = group_refuse_taken(call, made.data(), made_handles(args, made), &call);
        }
      }
      std::apply([&](auto... a) { (issue(a), ...); }, args);
      // A token object made: on every member (docs/groups.md, "Objects").
      if constexpr (F::name == "C_CreateObject") {
        CK_OBJECT_HANDLE_PTR out = std::get<2>(args);
        if (rv == CKR_OK && group_replicated(call, *out)) {
          rv = group_replicate_create(call, *out, std::get<0>(args), std::get<1>(args), own);
        }
      }
      if constexpr (F::name == "C_CopyObject") {
        CK_OBJECT_HANDLE_PTR out = std::get<3>(args);
        const CK_OBJECT_HANDLE original = std::get<0>(std::tuple<Rest...>{rest...});
        if (rv == CKR_OK && group_replicated(call, *out)) {
          rv =
              group_replicate_copy(call, *out, original, std::get<1>(args), std::get<2>(args), own);
        }
      }
    }
  } else if constexpr (F::name == "C_FindObjects") {
    // A count of 0 ends the search (docs/pkcs11-facts.md): answers whose
    // handles were all left out are asked again.
    CK_OBJECT_HANDLE_PTR found = std::get<0>(args);
    CK_ULONG_PTR count = std::get<2>(args);
    while (rv == CKR_OK && *count != 0) {
      rv = group_issue_found(call, found, *count);
      if (rv != CKR_OK || *count != 0) break;
      rv = std::apply(run, args);
    }
  } else if constexpr (F::name == "C_DestroyObject") {
    if (rv == CKR_OK) {
      const CK_OBJECT_HANDLE handle = std::get<0>(std::tuple<Rest...>{rest...});
      // A token object: its copies on the other members too.
      if (group_replicated(call, handle)) rv = group_replicate_destroy(call, handle);
      group_destroyed(call, handle);
    }
  } else if constexpr (kSet) {
    // A token object: changed on the other members too.
    if (rv == CKR_OK && replicated_set) {
      const CK_OBJECT_HANDLE handle = std::get<0>(std::tuple<Rest...>{rest...});
      rv = group_replicate_set(call, handle, std::get<0>(args), std::get<1>(args),
                               std::get<2>(args), old);
    }
  }
  // [pool] bind = state gave the backend session back (forward.hpp's
  // unbind_if_idle): whatever pinned to it is gone with it.
  if (made_on != CK_INVALID_HANDLE && s.anchor.backend != made_on) {
    group_session_ended(rt, s.group, s.member, made_on);
  }
  return rv;
}

}  // namespace p11mux
