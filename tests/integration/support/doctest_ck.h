// doctest assertions on PKCS#11 return values that print names, e.g.
//   CHECK_RV(p11.C_Login(...), CKR_PIN_INCORRECT)
// fails with "CHECK_EQ( CKR_OK, CKR_PIN_INCORRECT )" instead of numbers.
#pragma once

#include "ckr_names.h"

#include <doctest/doctest.h>
#include <p11mux/pkcs11.h>

#include <ostream>

namespace p11test {

struct Rv {
  CK_RV value;
  friend bool operator==(const Rv&, const Rv&) = default;
};

inline std::ostream& operator<<(std::ostream& out, const Rv& rv) {
  return out << ckr_string(rv.value);
}

}  // namespace p11test

#define CHECK_RV(call, expected) CHECK_EQ(::p11test::Rv{call}, ::p11test::Rv{expected})
#define REQUIRE_RV(call, expected) REQUIRE_EQ(::p11test::Rv{call}, ::p11test::Rv{expected})
