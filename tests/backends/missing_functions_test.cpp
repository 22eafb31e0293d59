// A backend whose function list lacks entries (NULL), as some vendor modules'
// do: p11mux's own calls into it (pool, reset, slot checks, slot events)
// answer or carry on, never jump through NULL. The faulty module over the
// mock, with P11MUX_FAULTY_MISSING naming the functions it leaves out.
#include "backends_test_support.hpp"

#include "faulty_control.h"
#include "mock_control.h"

#include <stdlib.h>

namespace p11mux::backends_test {
namespace {

TEST_CASE("a backend lacking functions: p11mux's own calls get CKR_FUNCTION_NOT_SUPPORTED") {
  ::unsetenv("P11MUX_FAULTY_LATENCY");
  ::setenv("P11MUX_FAULTY_TARGET", MOCK_PATH, 1);
  ::setenv("P11MUX_FAULTY_MISSING",
           "C_CloseSession,C_Logout,C_GetTokenInfo,C_GetSessionInfo,C_SessionCancel,"
           "C_FindObjectsFinal,C_DestroyObject,C_GetAttributeValue,C_GetSlotInfo,"
           "C_WaitForSlotEvent,C_DigestKey",
           1);
  const FaultyControl& faulty =
      *symbol<FaultyGetControlFn>(open_library(FAULTY_PATH), "faulty_get_control")();
  REQUIRE(faulty.reset() == 0);
  const MockControl& mock =
      *symbol<MockGetControlFn>(open_library(MOCK_PATH), "mock_get_control")();
  REQUIRE(mock.reset() == 0);
  use_backend(FAULTY_PATH);
  CK_FUNCTION_LIST* p11 = function_list(p11mux_library());
  REQUIRE(p11->C_Initialize(os_locking()) == CKR_OK);

  for (int round = 0; round < 2; ++round) {  // the second reuses what the first left
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
            CKR_OK);
    CK_SESSION_INFO info{};
    CHECK(p11->C_GetSessionInfo(h, &info) == CKR_FUNCTION_NOT_SUPPORTED);
    // A session object whose CKA_TOKEN p11mux cannot ask for, and a digest it
    // cannot cancel: the backend session must not be pooled, and cannot be closed.
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_TOKEN, &no, sizeof no}};
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    CHECK(p11->C_CreateObject(h, tmpl, 2, &object) == CKR_OK);
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    CHECK(p11->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(p11->C_DigestKey(h, object) == CKR_FUNCTION_NOT_SUPPORTED);
    CHECK(p11->C_CloseSession(h) == CKR_OK);
    CHECK(p11->C_CloseSession(h) == CKR_SESSION_HANDLE_INVALID);
  }
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  // Without C_GetSlotInfo to check the slot with, the slot's sessions still close.
  CHECK(p11->C_CloseAllSessions(0) == CKR_OK);
  CHECK(p11->C_CloseSession(h) == CKR_SESSION_HANDLE_INVALID);
  CK_SLOT_ID slot = 0;
  CHECK(p11->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(p11->C_WaitForSlotEvent(0, &slot, nullptr) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(p11->C_Finalize(nullptr) == CKR_OK);
  ::unsetenv("P11MUX_FAULTY_MISSING");
  ::unsetenv("P11MUX_FAULTY_TARGET");
}

}  // namespace
}  // namespace p11mux::backends_test
