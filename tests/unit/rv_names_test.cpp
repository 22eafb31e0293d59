// Every CKR code has its name: the fuzzer, the tracer and the metrics take a
// code without one for a value that is not a CKR code at all.
#include <p11mux/rv_names.hpp>

#include <doctest/doctest.h>

#include <string_view>

namespace p11mux {
namespace {

TEST_CASE("CKR names: the unwrap and wrap key codes, and an unknown value") {
  // CKR_UNWRAPPING_KEY_HANDLE_INVALID was missing: the fuzzer aborted on the
  // mock's C_UnwrapKey answering it.
  CHECK(rv_name(CKR_UNWRAPPING_KEY_HANDLE_INVALID) ==
        std::string_view("CKR_UNWRAPPING_KEY_HANDLE_INVALID"));
  CHECK(rv_name(CKR_UNWRAPPING_KEY_SIZE_RANGE) ==
        std::string_view("CKR_UNWRAPPING_KEY_SIZE_RANGE"));
  CHECK(rv_name(CKR_WRAPPING_KEY_HANDLE_INVALID) ==
        std::string_view("CKR_WRAPPING_KEY_HANDLE_INVALID"));
  CHECK(rv_name(0x7777) == std::string_view("CKR_(unknown)"));
}

}  // namespace
}  // namespace p11mux
