// C_Initialize's argument rules (docs/pkcs11-facts.md, "C_Initialize").
#include "lifecycle/init_args.hpp"

#include <doctest/doctest.h>

namespace p11mux {
namespace {

CK_RV create(CK_VOID_PTR_PTR) { return CKR_OK; }
CK_RV destroy(CK_VOID_PTR) { return CKR_OK; }
CK_RV lock(CK_VOID_PTR) { return CKR_OK; }
CK_RV unlock(CK_VOID_PTR) { return CKR_OK; }

CK_C_INITIALIZE_ARGS with_callbacks(CK_FLAGS flags) {
  CK_C_INITIALIZE_ARGS a{};
  a.CreateMutex = &create;
  a.DestroyMutex = &destroy;
  a.LockMutex = &lock;
  a.UnlockMutex = &unlock;
  a.flags = flags;
  return a;
}

TEST_CASE("NULL init args: no threads promised, succeeds with OS locks") {
  InitArgs out;
  CHECK(parse_init_args(nullptr, out) == CKR_OK);
  CHECK_FALSE(out.locks.uses_app_callbacks());
  CHECK(out.may_create_threads);
}

TEST_CASE("case 1: flag clear, no callbacks succeeds (not CKR_CANT_LOCK)") {
  CK_C_INITIALIZE_ARGS a{};
  InitArgs out;
  CHECK(parse_init_args(&a, out) == CKR_OK);
  CHECK_FALSE(out.locks.uses_app_callbacks());
}

TEST_CASE("case 2: flag clear, callbacks given: p11mux locks with them") {
  auto a = with_callbacks(0);
  InitArgs out;
  REQUIRE(parse_init_args(&a, out) == CKR_OK);
  CHECK(out.locks.uses_app_callbacks());
  CHECK((out.locks.lock == &lock));
}

TEST_CASE("case 3: OS locking flag, no callbacks") {
  CK_C_INITIALIZE_ARGS a{};
  a.flags = CKF_OS_LOCKING_OK;
  InitArgs out;
  CHECK(parse_init_args(&a, out) == CKR_OK);
  CHECK_FALSE(out.locks.uses_app_callbacks());
}

TEST_CASE("case 4: flag and callbacks: OS locks are chosen") {
  auto a = with_callbacks(CKF_OS_LOCKING_OK);
  InitArgs out;
  CHECK(parse_init_args(&a, out) == CKR_OK);
  CHECK_FALSE(out.locks.uses_app_callbacks());
}

TEST_CASE("some but not all callbacks: CKR_ARGUMENTS_BAD") {
  for (int missing = 0; missing < 4; ++missing) {
    auto a = with_callbacks(0);
    CK_VOID_PTR* slots[] = {reinterpret_cast<CK_VOID_PTR*>(&a.CreateMutex),
                            reinterpret_cast<CK_VOID_PTR*>(&a.DestroyMutex),
                            reinterpret_cast<CK_VOID_PTR*>(&a.LockMutex),
                            reinterpret_cast<CK_VOID_PTR*>(&a.UnlockMutex)};
    *slots[missing] = nullptr;
    InitArgs out;
    CHECK(parse_init_args(&a, out) == CKR_ARGUMENTS_BAD);
  }
}

TEST_CASE("pReserved non-NULL: CKR_ARGUMENTS_BAD") {
  CK_C_INITIALIZE_ARGS a{};
  char junk[] = "x";
  a.pReserved = junk;
  InitArgs out;
  CHECK(parse_init_args(&a, out) == CKR_ARGUMENTS_BAD);
}

TEST_CASE("CKF_LIBRARY_CANT_CREATE_OS_THREADS is remembered") {
  CK_C_INITIALIZE_ARGS a{};
  a.flags = CKF_LIBRARY_CANT_CREATE_OS_THREADS | CKF_OS_LOCKING_OK;
  InitArgs out;
  CHECK(parse_init_args(&a, out) == CKR_OK);
  CHECK_FALSE(out.may_create_threads);
}

}  // namespace
}  // namespace p11mux
