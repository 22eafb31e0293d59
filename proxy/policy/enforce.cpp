#include "policy/enforce.hpp"

#include "policy/filtered_list.hpp"

namespace p11mux {

void report_refusal(Runtime& rt, std::string_view function, const PolicyDecision& d) noexcept {
  if (Metrics* metrics = rt.observer().metrics()) metrics->record_policy_denied(d.rule);
  try {
    if (d.rule == PolicyRule::mechanism) {
      const std::string_view name = mechanism_name(d.mechanism);
      rt.log().warn("policy refused {}: rule {} ({}): {}", function, to_string(d.rule),
                    name.empty() ? fmt::format("{:#x}", d.mechanism) : std::string(name),
                    rv_name(d.rv));
    } else {
      rt.log().warn("policy refused {}: rule {}: {}", function, to_string(d.rule), rv_name(d.rv));
    }
  } catch (...) {
    // A log line that cannot be written does not change the answer.
  }
}

CK_RV filtered_mechanism_list(Runtime& rt, const Policy& policy, CK_SLOT_ID slot,
                              CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count) noexcept {
  return filtered_list(
      [&](CK_MECHANISM_TYPE_PTR l, CK_ULONG_PTR n) {
        return forward<fn::C_GetMechanismList>(rt, slot, l, n);
      },
      [&](CK_MECHANISM_TYPE m) { return policy.mechanism_allowed(m); }, list, count);
}

}  // namespace p11mux
