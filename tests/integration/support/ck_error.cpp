#include "ck_error.h"

#include "ckr_names.h"

namespace p11test {

CkError::CkError(const std::string& call, CK_RV rv)
    : std::runtime_error(call + " returned " + ckr_string(rv)), rv_(rv) {}

void ck_check(CK_RV rv, const char* call) {
  if (rv != CKR_OK) throw CkError(call, rv);
}

}  // namespace p11test
