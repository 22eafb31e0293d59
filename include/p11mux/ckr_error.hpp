// Failures inside p11mux that must reach the application as a CKR code.
#pragma once

#include <p11mux/pkcs11.h>

#include <stdexcept>
#include <string>

namespace p11mux {

class CkrError : public std::runtime_error {
 public:
  CkrError(CK_RV rv, const std::string& what) : std::runtime_error(what), rv_(rv) {}
  CK_RV rv() const noexcept { return rv_; }

 private:
  CK_RV rv_;
};

}  // namespace p11mux
