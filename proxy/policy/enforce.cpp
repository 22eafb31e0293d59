#include "policy/enforce.hpp"

#include <algorithm>
#include <new>
#include <vector>

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
  std::vector<CK_MECHANISM_TYPE> all;
  // The backend's whole list, asked twice (count, then fill); again if it
  // grew in between (a token inserted).
  for (int attempt = 0;; ++attempt) {
    CK_ULONG n = 0;
    CK_RV rv = forward<fn::C_GetMechanismList>(rt, slot, nullptr, &n);
    if (rv != CKR_OK) return rv;
    try {
      all.resize(n);
    } catch (const std::bad_alloc&) {
      return CKR_HOST_MEMORY;
    }
    if (n == 0) break;
    rv = forward<fn::C_GetMechanismList>(rt, slot, all.data(), &n);
    if (rv == CKR_OK) {
      all.resize(std::min<std::size_t>(n, all.size()));
      break;
    }
    if (rv != CKR_BUFFER_TOO_SMALL) return rv;
    if (attempt == 3) return CKR_FUNCTION_FAILED;  // still growing: no answer to trust
  }
  std::erase_if(all, [&](CK_MECHANISM_TYPE m) { return !policy.mechanism_allowed(m); });
  const CK_ULONG kept = all.size();
  if (list != nullptr) {
    if (*count < kept) {
      *count = kept;
      return CKR_BUFFER_TOO_SMALL;
    }
    std::copy(all.begin(), all.end(), list);
  }
  *count = kept;
  return CKR_OK;
}

}  // namespace p11mux
