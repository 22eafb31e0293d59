// A list the backend gives in two calls (C_GetSlotList, C_GetMechanismList),
// shown with some entries left out, answered with the spec's length rules:
// NULL list, the count; a short buffer, CKR_BUFFER_TOO_SMALL and the count.
#pragma once

#include <p11mux/pkcs11.h>

#include <algorithm>
#include <new>
#include <vector>

namespace p11mux {

// ask(T* list, CK_ULONG* n) is the backend's call; keep(T) says which entries
// the application sees. The whole list is asked for (count, then fill), again
// if it grew in between (a token or reader plugged in), at most four times.
template <class T, class Ask, class Keep>
CK_RV filtered_list(Ask ask, Keep keep, T* list, CK_ULONG_PTR count) noexcept {
  std::vector<T> all;
  for (int attempt = 0;; ++attempt) {
    CK_ULONG n = 0;
    CK_RV rv = ask(nullptr, &n);
    if (rv != CKR_OK) return rv;
    try {
      all.resize(n);
    } catch (const std::bad_alloc&) {
      return CKR_HOST_MEMORY;
    }
    if (n == 0) break;
    rv = ask(all.data(), &n);
    if (rv == CKR_OK) {
      all.resize(std::min<std::size_t>(n, all.size()));
      break;
    }
    if (rv != CKR_BUFFER_TOO_SMALL) return rv;
    if (attempt == 3) return CKR_FUNCTION_FAILED;  // still growing: no answer to trust
  }
  std::erase_if(all, [&](T entry) { return !keep(entry); });
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
