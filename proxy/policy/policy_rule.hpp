// The rules of [policy] a refusal is counted under
// (p11mux_policy_denied_total{rule=...}, and the log line of the refusal).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace p11mux {

enum class PolicyRule : std::uint8_t {
  mechanism,  // mechanisms_allow / mechanisms_deny
  function,   // functions_deny
  read_only,  // read_only = true
  // protect = ... (policy/protect.hpp), named as in the configuration
  conflicting_attributes,
  sticky_attributes,
  wrap_trusted,
  no_padding_oracle,
  token,   // tokens (filters.hpp)
  object,  // objects (filters.hpp)
};

inline constexpr std::array<std::string_view, 9> kPolicyRuleNames{"mechanism",
                                                                  "function",
                                                                  "read_only",
                                                                  "conflicting-attributes",
                                                                  "sticky-attributes",
                                                                  "wrap-trusted",
                                                                  "no-padding-oracle",
                                                                  "token",
                                                                  "object"};
inline constexpr std::size_t kPolicyRuleCount = kPolicyRuleNames.size();

constexpr std::string_view to_string(PolicyRule rule) noexcept {
  return kPolicyRuleNames[static_cast<std::size_t>(rule)];
}

}  // namespace p11mux
