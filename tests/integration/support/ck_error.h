// Errors from the set-up helpers: a PKCS#11 call that must succeed did not.
#pragma once

#include <p11mux/pkcs11.h>

#include <stdexcept>
#include <string>

namespace p11test {

class CkError : public std::runtime_error {
 public:
  CkError(const std::string& call, CK_RV rv);
  CK_RV rv() const noexcept { return rv_; }

 private:
  CK_RV rv_;
};

// Throws CkError("call: CKR_...") unless rv is CKR_OK.
void ck_check(CK_RV rv, const char* call);

}  // namespace p11test
