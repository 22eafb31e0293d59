// BackendPort over a fake function table: NULL entries, and the
// serialization lock around a call to a backend that is not thread-safe.
#include "port/backend_port.hpp"

#include <doctest/doctest.h>

#include <memory>
#include <type_traits>

namespace p11mux {
namespace {

// The application's mutex callbacks, recording whether the one mutex a port
// creates is held (a port makes exactly one, and only when serialized).
bool held = false;
int locks = 0;
CK_RV create(CK_VOID_PTR_PTR m) {
  *m = &held;
  return CKR_OK;
}
CK_RV destroy(CK_VOID_PTR) { return CKR_OK; }
CK_RV lock(CK_VOID_PTR) {
  REQUIRE_FALSE(held);
  held = true;
  ++locks;
  return CKR_OK;
}
CK_RV unlock(CK_VOID_PTR) {
  REQUIRE(held);
  held = false;
  return CKR_OK;
}
const LockSource recording{&create, &destroy, &lock, &unlock};

// What the fake backend saw of the lock during its call.
bool held_in_call = false;
CK_RV fake_generate_random(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG length) {
  held_in_call = held;
  if (session != 7 || length != 1) return CKR_ARGUMENTS_BAD;
  data[0] = 42;
  return CKR_OK;
}

CK_FUNCTION_LIST_3_0 fake_table() {
  CK_FUNCTION_LIST_3_0 table{};
  table.version = {2, 40};
  table.C_GenerateRandom = &fake_generate_random;
  return table;
}

// A port's lock points at its LockSource: a temporary one is refused at compile time.
static_assert(!std::is_constructible_v<BackendPort, const CK_FUNCTION_LIST_3_0&, bool, LockSource>);
static_assert(!std::is_constructible_v<BackendPort, std::unique_ptr<Backend>, LockSource>);
static_assert(
    std::is_constructible_v<BackendPort, const CK_FUNCTION_LIST_3_0&, bool, const LockSource&>);

TEST_CASE("a port answers a NULL entry with CKR_FUNCTION_NOT_SUPPORTED") {
  const LockSource none{};
  BackendPort port(fake_table(), /*thread_safe=*/true, none);
  CK_SLOT_ID slot = 0;
  CHECK(port.call<fn::C_WaitForSlotEvent>(CK_FLAGS{0}, &slot, nullptr) ==
        CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(port.call<fn::C_SessionCancel>(CK_SESSION_HANDLE{7}, CK_FLAGS{0}) ==
        CKR_FUNCTION_NOT_SUPPORTED);  // v3.0, absent from a 2.40 table
  CHECK(port.call<fn::C_Finalize>(nullptr) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(port.version().major == 2);
  CHECK(port.backend() == nullptr);
  CHECK(port.finalize() == CKR_OK);  // no loaded backend: nothing to finalize
}

TEST_CASE("a port serializes every call to a backend that is not thread-safe") {
  held = held_in_call = false;
  locks = 0;
  BackendPort port(fake_table(), /*thread_safe=*/false, recording);
  CHECK(port.serialized());
  CK_BYTE byte = 0;
  CHECK(port.call<fn::C_GenerateRandom>(CK_SESSION_HANDLE{7}, &byte, CK_ULONG{1}) == CKR_OK);
  CHECK(byte == 42);
  CHECK(held_in_call);
  CHECK_FALSE(held);  // released after the call
  CHECK(locks == 1);
  // A NULL entry is still a call: serialized too, and answered.
  CHECK(port.call<fn::C_Logout>(CK_SESSION_HANDLE{7}) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(locks == 2);
  CHECK_FALSE(held);
}

TEST_CASE("a port over a thread-safe backend takes no lock") {
  held = held_in_call = false;
  locks = 0;
  BackendPort port(fake_table(), /*thread_safe=*/true, recording);
  CHECK_FALSE(port.serialized());
  CK_BYTE byte = 0;
  CHECK(port.call<fn::C_GenerateRandom>(CK_SESSION_HANDLE{7}, &byte, CK_ULONG{1}) == CKR_OK);
  CHECK_FALSE(held_in_call);
  CHECK(locks == 0);
}

}  // namespace
}  // namespace p11mux
