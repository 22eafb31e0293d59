#include "entry/entry_points.hpp"

#include "entry/interfaces.hpp"
#include "forward/forward.hpp"
#include "lifecycle/module.hpp"
#include "policy/enforce.hpp"

#include <new>
#include <optional>
#include <vector>

namespace p11mux::entry_points {

// A call with tracing, metrics or a policy on: observed (observe.hpp) when
// the first two are, checked against the policy (enforce.hpp) when it is.
// Out of line, so that the hot path keeps one branch and one call for all
// three. With a policy alone, an allowed call comes back unanswered and goes
// on through the hot path's own forward<F>: the forwarding code is inlined
// in as few places as before, and the compiler keeps it inlined there.
template <class F, class... A>
[[gnu::noinline]] std::optional<CK_RV> slow_call(Runtime& rt, A... a) noexcept {
  const Policy* policy = rt.policy();
  if (rt.observer().active()) {
    return observed_call<F>(
        rt.observer(), rt.log(),
        [&](CallObservation& seen) {
          if (policy != nullptr) {
            if (std::optional<CK_RV> answer = policy_before<F>(rt, *policy, a...)) return *answer;
          }
          CK_RV rv;
          if constexpr (kFiltersObjects<F>) {
            rv = policy != nullptr && policy->objects().on()
                     ? forward_observed<F, ObjectFiltered>(rt, seen, a...)
                     : forward_observed<F>(rt, seen, a...);
          } else {
            rv = forward_observed<F>(rt, seen, a...);
          }
          if (policy != nullptr) policy_after<F>(*policy, rv, a...);
          return rv;
        },
        a...);
  }
  if (std::optional<CK_RV> answer = policy_before<F>(rt, *policy, a...)) return answer;
  if constexpr (kPolicyAfter<F>) {
    const CK_RV rv = forward<F>(rt, a...);
    policy_after<F>(*policy, rv, a...);
    return rv;
  }
  if constexpr (kFiltersObjects<F>) {
    // Objects filtered: on the backend session the call runs on.
    if (policy->objects().on()) return forward<F, ObjectFiltered>(rt, a...);
  }
  return std::nullopt;
}

// The entry point of every function whose dispatch is global, session or
// handled: enter the call gate, then forward (forward.hpp).
template <class F, class Pointer = typename F::Pointer>
struct Entry;

template <class F, class... A>
struct Entry<F, CK_RV (*)(A...)> {
  static CK_RV call(A... a) noexcept {
    Module::Call call(the_module);
    Runtime* rt = call.runtime();
    if (rt == nullptr) [[unlikely]]
      return CKR_CRYPTOKI_NOT_INITIALIZED;
    // Tracing, metrics or a policy: the one branch they cost when all are off.
    if (rt->slow_path()) [[unlikely]] {
      if (std::optional<CK_RV> answer = slow_call<F>(*rt, a...)) return *answer;
    }
    return forward<F>(*rt, a...);
  }
};

namespace {

// Calls fn with the interfaces on offer, holding what keeps the backend's
// answer valid meanwhile: the call gate when initialized (C_Finalize waits),
// otherwise the probe result.
template <class Fn>
CK_RV with_offered_interfaces(Fn&& fn) noexcept {
  try {
    {
      Module::Call call(the_module);
      if (Runtime* rt = call.runtime()) {
        return fn(offered_interfaces(&rt->backend().interfaces(),
                                     rt->config().backend.vendor_interfaces));
      }
    }
    std::shared_ptr<const ProbedBackend> probed = the_module.probed_interfaces();
    const BackendInterfaces* backend =
        probed && probed->backend ? &probed->backend->interfaces() : nullptr;
    return fn(offered_interfaces(backend, probed ? probed->vendor : VendorInterfaces::hide));
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
}

// Each `entry` function of the table, by name; everything else is generated.
#define P11MUX_ENTRY_entry(name) entry_##name
#define P11MUX_ENTRY_handled(name) &Entry<fn::name>::call
#define P11MUX_ENTRY_global(name) &Entry<fn::name>::call
#define P11MUX_ENTRY_session(name) &Entry<fn::name>::call
#define P11MUX_LIST_MEMBER(name, since, dispatch, args) .name = P11MUX_ENTRY_##dispatch(name),
// The 3.0 list shares every entry point except the `handled` ones that report
// the list's own version (handled.hpp, in_list_3_0).
#define P11MUX_ENTRY_3_0_entry(name) P11MUX_ENTRY_entry(name)
#define P11MUX_ENTRY_3_0_handled(name) &Entry<in_list_3_0<fn::name>>::call
#define P11MUX_ENTRY_3_0_global(name) P11MUX_ENTRY_global(name)
#define P11MUX_ENTRY_3_0_session(name) P11MUX_ENTRY_session(name)
#define P11MUX_LIST_3_0_MEMBER(name, since, dispatch, args) \
  .name = P11MUX_ENTRY_3_0_##dispatch(name),

constexpr auto entry_C_Initialize = &initialize;
constexpr auto entry_C_Finalize = &finalize;
constexpr auto entry_C_GetFunctionList = &get_function_list_entry;
constexpr auto entry_C_WaitForSlotEvent = &wait_for_slot_event;
constexpr auto entry_C_GetInterfaceList = &get_interface_list;
constexpr auto entry_C_GetInterface = &get_interface;

// The v2.40 list: exactly the 68 functions of CK_FUNCTION_LIST.
constinit CK_FUNCTION_LIST function_list_v2 = {.version = {2, 40},
                                               P11MUX_FUNCTIONS_V2(P11MUX_LIST_MEMBER)};

// The v3.0 list: all 92 functions of CK_FUNCTION_LIST_3_0. On a 2.x backend
// the v3.0 ones answer CKR_FUNCTION_NOT_SUPPORTED (their backend entry is NULL).
constinit CK_FUNCTION_LIST_3_0 function_list_v3 = {.version = {3, 0},
                                                   P11MUX_FUNCTIONS(P11MUX_LIST_3_0_MEMBER)};

// The name is "PKCS 11" (kStandardInterfaceName); the flags claim nothing.
constinit CK_CHAR standard_interface_name[] = "PKCS 11";
constinit CK_INTERFACE standard_interface_v3{standard_interface_name, &function_list_v3, 0};
constinit CK_INTERFACE standard_interface_v2{standard_interface_name, &function_list_v2, 0};

}  // namespace

CK_RV initialize(CK_VOID_PTR init_args) { return the_module.initialize(init_args); }

CK_RV finalize(CK_VOID_PTR reserved) { return the_module.finalize(reserved); }

CK_RV get_function_list_entry(CK_FUNCTION_LIST_PTR_PTR list) {
  if (list == nullptr) return CKR_ARGUMENTS_BAD;
  *list = &function_list_v2;
  return CKR_OK;
}

const CK_FUNCTION_LIST* function_list() noexcept { return &function_list_v2; }
const CK_FUNCTION_LIST_3_0* function_list_3_0() noexcept { return &function_list_v3; }
const CK_INTERFACE* interface_3_0() noexcept { return &standard_interface_v3; }
const CK_INTERFACE* interface_2_40() noexcept { return &standard_interface_v2; }

namespace {

// Blocking waits must not hold the call gate, or C_Finalize could never drain:
// the caller registers as a waiter inside the gate, then leaves it to wait.
CK_RV wait_once(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved) {
  std::optional<Runtime::WaiterRef> waiter;
  {
    Module::Call call(the_module);
    Runtime* rt = call.runtime();
    if (rt == nullptr) return CKR_CRYPTOKI_NOT_INITIALIZED;
    if (rt->policy() != nullptr) {
      if (CK_RV rv = policy_refusal<fn::C_WaitForSlotEvent>(*rt, flags, slot, reserved);
          rv != CKR_OK) {
        return rv;
      }
    }
    if ((flags & CKF_DONT_BLOCK) != 0) {
      return forward<fn::C_WaitForSlotEvent>(*rt, flags, slot, reserved);
    }
    if (CK_RV rv = check_arguments<fn::C_WaitForSlotEvent>(false, flags, slot, reserved);
        rv != CKR_OK) {
      return rv;
    }
    // Registered inside the gate, so C_Finalize, once drained, sees this waiter
    // and keeps the runtime alive until it has returned.
    waiter.emplace(*rt);
  }
  return waiter->runtime().wait_for_slot_event(flags, slot);
}

// With [policy] tokens: whether the event is on a slot the policy hides
// (asked inside the call gate, after the wait).
bool event_hidden(CK_SLOT_ID slot) {
  Module::Call call(the_module);
  Runtime* rt = call.runtime();
  if (rt == nullptr || rt->policy() == nullptr || !rt->policy()->tokens().on()) return false;
  return !slot_exposed(*rt, rt->policy()->tokens(), slot);
}

}  // namespace

// An event on a hidden slot is not the application's: dropped, and the
// wait goes on (or, with CKF_DONT_BLOCK, the next pending event is taken).
CK_RV wait_for_slot_event(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved) {
  const CK_SLOT_ID asked = slot != nullptr ? *slot : 0;
  for (int dropped = 0;; ++dropped) {
    const CK_RV rv = wait_once(flags, slot, reserved);
    if (rv != CKR_OK || !event_hidden(*slot)) return rv;
    *slot = asked;  // a hidden slot's ID is not told either
    // Pending events end; a backend reporting hidden slots without end ends too.
    if ((flags & CKF_DONT_BLOCK) != 0 && dropped == 64) return CKR_NO_EVENT;
  }
}

CK_RV get_interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count) noexcept {
  if (count == nullptr) return CKR_ARGUMENTS_BAD;
  return with_offered_interfaces([&](const std::vector<const CK_INTERFACE*>& offered) {
    const CK_ULONG n = offered.size();
    // The spec's two ways: a NULL list asks for the count only; otherwise
    // *count is the buffer's size, and is set to n in either outcome.
    if (list != nullptr) {
      if (*count < n) {
        *count = n;
        return CKR_BUFFER_TOO_SMALL;
      }
      for (CK_ULONG i = 0; i < n; ++i) list[i] = *offered[i];
    }
    *count = n;
    return CKR_OK;
  });
}

CK_RV get_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                    CK_FLAGS flags) noexcept {
  if (out == nullptr) return CKR_ARGUMENTS_BAD;
  return with_offered_interfaces([&](const std::vector<const CK_INTERFACE*>& offered) {
    const CK_INTERFACE* found = select_interface(offered, name, version, flags);
    // The spec names no code for "no such interface"; CKR_ARGUMENTS_BAD is
    // among its listed ones and is what NSS softoken answers.
    if (found == nullptr) return CKR_ARGUMENTS_BAD;
    // The application must not write through it (spec, C_GetInterface).
    *out = const_cast<CK_INTERFACE*>(found);
    return CKR_OK;
  });
}

}  // namespace p11mux::entry_points
