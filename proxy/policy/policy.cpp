#include "policy/policy.hpp"

#include <p11mux/mechanism_names.hpp>

#include <spdlog/fmt/fmt.h>

#include <algorithm>
#include <charconv>

namespace p11mux {
namespace {

// The entries of a list: separated by commas and/or whitespace.
template <class Fn>
void for_each_entry(std::string_view text, Fn&& fn) {
  constexpr std::string_view kSeparators = ", \t";
  while (!text.empty()) {
    const auto start = text.find_first_not_of(kSeparators);
    if (start == std::string_view::npos) return;
    text.remove_prefix(start);
    const auto end = std::min(text.find_first_of(kSeparators), text.size());
    fn(text.substr(0, end));
    text.remove_prefix(end);
  }
}

std::string where(std::string_view key) {
  std::string env = "P11MUX_POLICY_";
  for (char c : key) env += static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
  return fmt::format("[policy] {} (or {})", key, env);
}

// "0x80000001": hex digits only after the prefix, within a CK_ULONG.
std::optional<CK_MECHANISM_TYPE> parse_hex(std::string_view entry) {
  if (!entry.starts_with("0x") && !entry.starts_with("0X")) return std::nullopt;
  entry.remove_prefix(2);
  CK_MECHANISM_TYPE value = 0;
  auto [end, ec] = std::from_chars(entry.data(), entry.data() + entry.size(), value, 16);
  if (entry.empty() || ec != std::errc() || end != entry.data() + entry.size()) return std::nullopt;
  return value;
}

}  // namespace

std::vector<CK_MECHANISM_TYPE> parse_mechanisms(std::string_view text, std::string_view key) {
  std::vector<CK_MECHANISM_TYPE> out;
  for_each_entry(text, [&](std::string_view entry) {
    std::optional<CK_MECHANISM_TYPE> value =
        entry.starts_with("CKM_") ? mechanism_by_name(entry) : parse_hex(entry);
    if (!value) {
      throw ConfigError(fmt::format(
          "{}: unknown mechanism '{}' (expected a CKM_ name, or 0x and hex digits for a "
          "vendor mechanism)",
          where(key), entry));
    }
    out.push_back(*value);
  });
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<std::size_t> parse_functions(std::string_view text, std::string_view key) {
  std::vector<std::size_t> out;
  for_each_entry(text, [&](std::string_view entry) {
    const std::optional<std::size_t> index = policy_function_index(entry);
    if (!index) {
      throw ConfigError(
          fmt::format("{}: unknown function '{}' (expected a PKCS#11 name such as C_InitToken)",
                      where(key), entry));
    }
    if (std::find(kUndeniableFunctions.begin(), kUndeniableFunctions.end(), entry) !=
        kUndeniableFunctions.end()) {
      throw ConfigError(
          fmt::format("{}: {} cannot be denied (C_Initialize, C_Finalize, C_GetFunctionList, "
                      "C_GetInterfaceList and C_GetInterface are always allowed)",
                      where(key), entry));
    }
    out.push_back(*index);
  });
  return out;
}

Policy::Policy(const Config::Policy& config) : Policy(config, nullptr) {}

Policy::Policy(const Config::Policy& config, const LockSource& locks) : Policy(config, &locks) {}

Policy::Policy(const Config::Policy& config, const LockSource* locks)
    : read_only_(config.read_only),
      protect_(config.protect, locks),
      tokens_(config.tokens),
      objects_(config.objects) {
  const std::vector<CK_MECHANISM_TYPE> allow =
      parse_mechanisms(config.mechanisms_allow, "mechanisms_allow");
  const std::vector<CK_MECHANISM_TYPE> deny =
      parse_mechanisms(config.mechanisms_deny, "mechanisms_deny");
  for (std::size_t index : parse_functions(config.functions_deny, "functions_deny"))
    denied_functions_[index] = true;
  // One list and one search per call: the allowed ones, or the denied ones.
  if (!config.mechanisms_allow.empty()) {
    mode_ = Mode::only_listed;
    std::set_difference(allow.begin(), allow.end(), deny.begin(), deny.end(),
                        std::back_inserter(mechanisms_));
  } else if (!deny.empty()) {
    mode_ = Mode::all_but_listed;
    mechanisms_ = deny;
  }
}

bool Policy::mechanism_allowed(CK_MECHANISM_TYPE mechanism) const noexcept {
  if (mode_ == Mode::all) return true;
  const bool listed = std::binary_search(mechanisms_.begin(), mechanisms_.end(), mechanism);
  return listed == (mode_ == Mode::only_listed);
}

std::string Policy::describe() const {
  std::string out;
  auto names = [&] {
    std::string list;
    for (CK_MECHANISM_TYPE m : mechanisms_) {
      const std::string_view name = mechanism_name(m);
      list += list.empty() ? "" : ",";
      list += name.empty() ? fmt::format("0x{:x}", m) : std::string(name);
    }
    return list;
  };
  if (mode_ == Mode::only_listed) out += fmt::format(" mechanisms only {}", names());
  if (mode_ == Mode::all_but_listed) out += fmt::format(" mechanisms but {}", names());
  std::string functions;
  for (std::size_t i = 0; i < denied_functions_.size(); ++i) {
    if (!denied_functions_[i]) continue;
    functions += functions.empty() ? "" : ",";
    functions += kPolicyFunctionNames[i];
  }
  if (!functions.empty()) out += " functions denied " + functions;
  if (read_only_) out += " read-only";
  if (protect_.any()) out += " protect " + protect_.describe();
  if (tokens_.on()) out += " tokens " + tokens_.describe();
  if (objects_.on()) out += " objects " + objects_.describe();
  return "policy:" + (out.empty() ? std::string(" nothing refused") : out);
}

}  // namespace p11mux
