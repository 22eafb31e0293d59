// The [policy] rules, parsed and checked once at C_Initialize, and the
// decision for one call. Pure: no runtime, no backend, no logging, so the
// decisions are unit-tested alone; enforce.hpp applies them to a call.
//
// What each rule refuses, and with which code (docs/pkcs11-facts.md, "Policy"):
//   functions_deny    the named functions: CKR_ACTION_PROHIBITED for
//                     C_CopyObject, C_SetAttributeValue and C_DestroyObject
//                     (the only ones the spec lets return it), otherwise
//                     CKR_FUNCTION_NOT_SUPPORTED
//   read_only         C_OpenSession with CKF_RW_SESSION, and every call that
//                     creates, changes or destroys an object or a PIN or the
//                     token (kChangesToken): CKR_TOKEN_WRITE_PROTECTED
//   mechanisms_*      every call that takes a CK_MECHANISM (an `m` argument
//                     in <p11mux/functions.h>: each *Init, the v3.0
//                     C_Message*Init, C_GenerateKey*, C_WrapKey, C_UnwrapKey,
//                     C_DeriveKey) and C_GetMechanismInfo:
//                     CKR_MECHANISM_INVALID; C_GetMechanismList leaves the
//                     mechanism out (enforce.hpp)
// A call the rules refuse never reaches the backend.
#pragma once

#include "config/config.hpp"
#include "functions/function_traits.hpp"
#include "policy/filters.hpp"
#include "policy/policy_rule.hpp"
#include "policy/protect.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <cstddef>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace p11mux {

// Every function of <p11mux/functions.h>, numbered in table order.
#define P11MUX_POLICY_FUNCTION_NAME(name, since, dispatch, args) std::string_view(#name),
inline constexpr std::array kPolicyFunctionNames{P11MUX_FUNCTIONS(P11MUX_POLICY_FUNCTION_NAME)};
#undef P11MUX_POLICY_FUNCTION_NAME

constexpr std::optional<std::size_t> policy_function_index(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kPolicyFunctionNames.size(); ++i)
    if (kPolicyFunctionNames[i] == name) return i;
  return std::nullopt;
}

// Functions functions_deny may not name: without them an application cannot
// even start or stop (C_Initialize, C_Finalize) or find the other functions.
inline constexpr std::array<std::string_view, 5> kUndeniableFunctions{
    "C_Initialize", "C_Finalize", "C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface"};

// What read_only refuses: every call that can create, change or destroy an
// object (session objects included: a read-only deployment makes nothing),
// a PIN or the token.
inline constexpr std::array<std::string_view, 11> kChangesToken{
    "C_InitToken",     "C_InitPIN",           "C_SetPIN",      "C_CreateObject",    "C_CopyObject",
    "C_DestroyObject", "C_SetAttributeValue", "C_GenerateKey", "C_GenerateKeyPair", "C_UnwrapKey",
    "C_DeriveKey"};

constexpr bool changes_token(std::string_view function) noexcept {
  for (std::string_view f : kChangesToken)
    if (f == function) return true;
  return false;
}

// The only functions the spec lets answer CKR_ACTION_PROHIBITED.
constexpr CK_RV function_denied_rv(std::string_view function) noexcept {
  return function == "C_CopyObject" || function == "C_SetAttributeValue" ||
                 function == "C_DestroyObject"
             ? CKR_ACTION_PROHIBITED
             : CKR_FUNCTION_NOT_SUPPORTED;
}

// The outcome of one call's check: refused (rule and code) or not.
struct PolicyDecision {
  CK_RV rv = CKR_OK;
  PolicyRule rule = PolicyRule::function;
  // The refused mechanism, for the log line (mechanism rule only).
  CK_MECHANISM_TYPE mechanism = 0;
  bool refused() const noexcept { return rv != CKR_OK; }
};

class Policy {
 public:
  // Throws ConfigError naming the key and the name it does not know (an
  // unknown CKM_ or C_ name, a bad hex value, an undeniable function).
  explicit Policy(const Config::Policy& config);
  // The same, with the runtime's locks for protect's lock (protect.hpp).
  Policy(const Config::Policy& config, const LockSource& locks);

  // mechanisms_allow and mechanisms_deny together: allowed when listed in
  // mechanisms_allow (or it is empty) and not listed in mechanisms_deny.
  bool mechanism_allowed(CK_MECHANISM_TYPE mechanism) const noexcept;
  bool filters_mechanisms() const noexcept { return mode_ != Mode::all; }
  bool function_denied(std::size_t index) const noexcept { return denied_functions_[index]; }
  bool read_only() const noexcept { return read_only_; }
  // protect = ...: applied after check<F> by protect_enforce.hpp.
  const Protect& protect() const noexcept { return protect_; }
  // tokens and objects (filters.hpp); applied by filter_calls.hpp.
  const TokenFilter& tokens() const noexcept { return tokens_; }
  const ObjectFilter& objects() const noexcept { return objects_; }

  // One line for the log at C_Initialize: what is on.
  std::string describe() const;

  // The decision for a call of F with these arguments (before the backend).
  template <class F, class... A>
  PolicyDecision check(A... a) const noexcept {
    constexpr std::size_t index = *policy_function_index(F::name);
    if (denied_functions_[index]) [[unlikely]]
      return {function_denied_rv(F::name), PolicyRule::function};
    if constexpr (changes_token(F::name)) {
      if (read_only_) return {CKR_TOKEN_WRITE_PROTECTED, PolicyRule::read_only};
    }
    const std::tuple<A...> args{a...};
    if constexpr (F::name == "C_OpenSession") {
      // Without CKF_SERIAL_SESSION the call is refused for that first.
      constexpr CK_FLAGS rw = CKF_SERIAL_SESSION | CKF_RW_SESSION;
      if (read_only_ && (std::get<1>(args) & rw) == rw)
        return {CKR_TOKEN_WRITE_PROTECTED, PolicyRule::read_only};
    }
    constexpr std::size_t m = F::args.find('m');
    if constexpr (m != std::string_view::npos) {
      // NULL: v3.0's "cancel the operation", allowed (or refused by the
      // argument checks on a 2.x backend).
      const CK_MECHANISM* mechanism = std::get<m>(args);
      if (mechanism != nullptr && !mechanism_allowed(mechanism->mechanism))
        return {CKR_MECHANISM_INVALID, PolicyRule::mechanism, mechanism->mechanism};
    }
    if constexpr (F::name == "C_GetMechanismInfo") {
      if (!mechanism_allowed(std::get<1>(args)))
        return {CKR_MECHANISM_INVALID, PolicyRule::mechanism, std::get<1>(args)};
    }
    return {};
  }

 private:
  Policy(const Config::Policy& config, const LockSource* locks);
  enum class Mode { all, only_listed, all_but_listed };
  Mode mode_ = Mode::all;
  std::vector<CK_MECHANISM_TYPE> mechanisms_;  // sorted; what mode_ lists
  std::array<bool, kPolicyFunctionNames.size()> denied_functions_{};
  bool read_only_ = false;
  Protect protect_;
  TokenFilter tokens_;
  ObjectFilter objects_;
};

// Parses a mechanism list ("CKM_SHA256, 0x80000001"): names from p11mux's CKM_
// table, or hex for vendor mechanisms; commas or spaces between. Throws
// ConfigError naming `key` and the entry it cannot read.
std::vector<CK_MECHANISM_TYPE> parse_mechanisms(std::string_view text, std::string_view key);
// The same for function names; the indexes of kPolicyFunctionNames.
std::vector<std::size_t> parse_functions(std::string_view text, std::string_view key);

}  // namespace p11mux
