// A constexpr table of PKCS#11 constant names, sorted at compile time and
// searched by value: the one implementation behind the CKR_, CKM_ and CKA_
// name tables.
#pragma once

#include <p11mux/pkcs11.h>

#include <algorithm>
#include <array>
#include <string_view>
#include <utility>

namespace p11mux::name_table {

using Name = std::pair<CK_ULONG, std::string_view>;

template <std::size_t N>
constexpr std::array<Name, N> sorted(std::array<Name, N> names) {
  std::sort(names.begin(), names.end());
  return names;
}

template <std::size_t N>
constexpr bool one_name_per_value(const std::array<Name, N>& names) {
  return std::adjacent_find(names.begin(), names.end(), [](const Name& a, const Name& b) {
           return a.first == b.first;
         }) == names.end();
}

// The name of `value`, or an empty view.
template <std::size_t N>
std::string_view find(const std::array<Name, N>& names, CK_ULONG value) noexcept {
  auto it = std::lower_bound(names.begin(), names.end(), value,
                             [](const Name& entry, CK_ULONG v) { return entry.first < v; });
  return it != names.end() && it->first == value ? it->second : std::string_view{};
}

}  // namespace p11mux::name_table

#define P11MUX_NAME(name) \
  ::p11mux::name_table::Name { name, #name }
