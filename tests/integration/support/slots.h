// Finding slots and reading the blank-padded strings of the info structures.
#pragma once

#include <p11mux/pkcs11.h>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace p11test {

// A fixed-size, blank-padded PKCS#11 string (CK_UTF8CHAR[n]) without its padding.
std::string unpad(const CK_UTF8CHAR* text, std::size_t size);

template <std::size_t N>
std::string unpad(const CK_UTF8CHAR (&text)[N]) {
  return unpad(text, N);
}

// C_GetSlotList with the usual size query; throws CkError on failure.
std::vector<CK_SLOT_ID> slot_list(const CK_FUNCTION_LIST& fn, bool token_present);

// The slot whose token has this label (the first one if several do).
std::optional<CK_SLOT_ID> find_slot_by_label(const CK_FUNCTION_LIST& fn, std::string_view label);

// Like find_slot_by_label, but throws std::runtime_error if there is none.
CK_SLOT_ID require_slot_by_label(const CK_FUNCTION_LIST& fn, std::string_view label);

}  // namespace p11test
