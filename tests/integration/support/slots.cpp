#include "slots.h"

#include "ck_error.h"

#include <stdexcept>

namespace p11test {

std::string unpad(const CK_UTF8CHAR* text, std::size_t size) {
  std::string result(reinterpret_cast<const char*>(text), size);
  result.erase(result.find_last_not_of(' ') + 1);  // npos + 1 == 0: all blank
  return result;
}

std::vector<CK_SLOT_ID> slot_list(const CK_FUNCTION_LIST& fn, bool token_present) {
  const CK_BBOOL present = token_present ? CK_TRUE : CK_FALSE;
  // The list can grow between the size query and the fetch; retry then.
  for (;;) {
    CK_ULONG count = 0;
    ck_check(fn.C_GetSlotList(present, nullptr, &count), "C_GetSlotList(size)");
    std::vector<CK_SLOT_ID> slots(count);
    const CK_RV rv = fn.C_GetSlotList(present, slots.data(), &count);
    if (rv == CKR_BUFFER_TOO_SMALL) continue;
    ck_check(rv, "C_GetSlotList");
    slots.resize(count);
    return slots;
  }
}

std::optional<CK_SLOT_ID> find_slot_by_label(const CK_FUNCTION_LIST& fn, std::string_view label) {
  for (CK_SLOT_ID slot : slot_list(fn, true)) {
    CK_TOKEN_INFO info{};
    if (fn.C_GetTokenInfo(slot, &info) != CKR_OK) continue;  // e.g. token just removed
    if (unpad(info.label) == label) return slot;
  }
  return std::nullopt;
}

CK_SLOT_ID require_slot_by_label(const CK_FUNCTION_LIST& fn, std::string_view label) {
  if (auto slot = find_slot_by_label(fn, label)) return *slot;
  throw std::runtime_error("no token labelled '" + std::string(label) + "'");
}

}  // namespace p11test
