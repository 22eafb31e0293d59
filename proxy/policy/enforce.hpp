// The policy applied to a call: entered from Entry<F>'s slow path
// (entry_points.cpp), which calls take only when a policy, tracing or metrics
// are on, so with no [policy] the hot path is exactly as without this layer.
// A refused call never reaches the backend; it is logged at warn and counted
// (p11mux_policy_denied_total) here.
#pragma once

#include "forward/forward.hpp"
#include "lifecycle/runtime.hpp"
#include "policy/filter_calls.hpp"
#include "policy/policy.hpp"
#include "policy/protect_enforce.hpp"

#include <p11mux/mechanism_names.hpp>
#include <p11mux/rv_names.hpp>

#include <optional>
#include <tuple>

namespace p11mux {

// The log line and the count of one refusal. Names only: no argument values
// other than the mechanism type.
void report_refusal(Runtime& rt, std::string_view function, const PolicyDecision& d) noexcept;

// C_GetMechanismList without the mechanisms the policy refuses. The count
// query and the filled call agree: both count the kept ones, and a buffer
// too small for them gets CKR_BUFFER_TOO_SMALL with the count needed.
CK_RV filtered_mechanism_list(Runtime& rt, const Policy& policy, CK_SLOT_ID slot,
                              CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count) noexcept;

// The rule check, for C_WaitForSlotEvent's own entry point (dispatch `entry`).
template <class F, class... A>
CK_RV policy_refusal(Runtime& rt, A... a) noexcept {
  if (const Policy* policy = rt.policy()) {
    if (PolicyDecision d = policy->check<F>(a...); d.refused()) {
      report_refusal(rt, F::name, d);
      return d.rv;
    }
  }
  return CKR_OK;
}

// What the policy says before the backend: the answer (bad arguments, a
// refusal, a filtered C_GetMechanismList), or nothing when the call is to
// be forwarded as without a policy.
template <class F, class... A>
std::optional<CK_RV> policy_before(Runtime& rt, const Policy& policy, A... a) noexcept {
  // Bad arguments are told as such before any rule: as without a policy.
  if (CK_RV rv = check_arguments<F>(rt.port().version().major >= 3, a...); rv != CKR_OK) return rv;
  if (PolicyDecision d = policy.check<F>(a...); d.refused()) {
    report_refusal(rt, F::name, d);
    return d.rv;
  }
  if constexpr (kNamesSlot<F>) {
    if (policy.tokens().on()) {
      const CK_SLOT_ID slot = std::get<0>(std::tuple<A...>{a...});
      if (CK_RV rv = token_refusal(rt, policy.tokens(), F::name, slot); rv != CKR_OK) return rv;
    }
  }
  if constexpr (F::name == "C_GetSlotList") {
    if (policy.tokens().on()) return filtered_slot_list(rt, policy.tokens(), a...);
  }
  if constexpr (kProtected<F>) {
    // With objects on, ObjectFiltered applies protect after the filter.
    static_assert(kFiltersObjects<F>);
    if (policy.protect().any() && !policy.objects().on())
      return protect_call<F>(rt, policy.protect(), a...);
  }
  if constexpr (F::name == "C_GetMechanismList") {
    if (policy.filters_mechanisms()) return filtered_mechanism_list(rt, policy, a...);
  }
  return std::nullopt;
}

// Whether F's answer is changed by the policy after the backend (policy_after).
template <class F>
inline constexpr bool kPolicyAfter = F::name == "C_GetTokenInfo";

// The backend's answer as the policy shows it.
template <class F, class... A>
void policy_after(const Policy& policy, CK_RV rv, A... a) noexcept {
  if constexpr (kPolicyAfter<F>) {
    // A read-only deployment says so, as a write-protected token does.
    const CK_TOKEN_INFO_PTR info = std::get<1>(std::tuple<A...>{a...});
    if (rv == CKR_OK && policy.read_only()) info->flags |= CKF_WRITE_PROTECTED;
  }
}

}  // namespace p11mux
