// Sessions and login: state transitions, login errors, invalid handles and arguments.
#include "support/doctest_ck.h"
#include "support/fixture.h"

#include <string>

using namespace p11test;

namespace {

CK_STATE state_of(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session) {
  CK_SESSION_INFO info{};
  REQUIRE_RV(p11.C_GetSessionInfo(session, &info), CKR_OK);
  return info.state;
}

}  // namespace

TEST_CASE_FIXTURE(TokenFixture, "session info follows login and logout") {
  Session rw(p11, slot, Access::read_write);
  Session ro(p11, slot, Access::read_only);

  CK_SESSION_INFO info{};
  REQUIRE_RV(p11.C_GetSessionInfo(rw, &info), CKR_OK);
  CHECK(info.slotID == slot);
  CHECK(info.flags == (CKF_SERIAL_SESSION | CKF_RW_SESSION));
  CHECK(info.state == CKS_RW_PUBLIC_SESSION);
  REQUIRE_RV(p11.C_GetSessionInfo(ro, &info), CKR_OK);
  CHECK(info.flags == CKF_SERIAL_SESSION);
  CHECK(info.state == CKS_RO_PUBLIC_SESSION);

  REQUIRE_RV(login_user(p11, rw, kUserPin), CKR_OK);
  CHECK(state_of(p11, rw) == CKS_RW_USER_FUNCTIONS);
  CHECK(state_of(p11, ro) == CKS_RO_USER_FUNCTIONS);  // login is per token, not per session
  Session late(p11, slot, Access::read_only);
  CHECK(state_of(p11, late) == CKS_RO_USER_FUNCTIONS);

  REQUIRE_RV(p11.C_Logout(ro), CKR_OK);
  CHECK(state_of(p11, rw) == CKS_RW_PUBLIC_SESSION);
  CHECK(state_of(p11, ro) == CKS_RO_PUBLIC_SESSION);
  CHECK(state_of(p11, late) == CKS_RO_PUBLIC_SESSION);
  // (A second C_Logout is not checked: the spec says CKR_USER_NOT_LOGGED_IN,
  // SoftHSM2 answers CKR_OK, and a proxy must forward the backend's answer.)
}

TEST_CASE_FIXTURE(TokenFixture, "closing the application's last session logs it out") {
  {
    Session first(p11, slot, Access::read_write);
    REQUIRE_RV(login_user(p11, first, kUserPin), CKR_OK);
    CHECK(state_of(p11, first) == CKS_RW_USER_FUNCTIONS);
  }
  Session next(p11, slot, Access::read_write);
  CHECK(state_of(p11, next) == CKS_RW_PUBLIC_SESSION);
}

TEST_CASE_FIXTURE(TokenFixture, "login errors") {
  Session first(p11, slot, Access::read_write);
  Session second(p11, slot, Access::read_only);

  CHECK_RV(login_user(p11, first, "654321"), CKR_PIN_INCORRECT);
  CHECK(state_of(p11, first) == CKS_RW_PUBLIC_SESSION);

  REQUIRE_RV(login_user(p11, first, kUserPin), CKR_OK);
  CHECK_RV(login_user(p11, first, kUserPin), CKR_USER_ALREADY_LOGGED_IN);
  CHECK_RV(login_user(p11, second, kUserPin), CKR_USER_ALREADY_LOGGED_IN);
  CHECK(state_of(p11, first) == CKS_RW_USER_FUNCTIONS);
}

TEST_CASE_FIXTURE(TokenFixture, "invalid session handles are CKR_SESSION_HANDLE_INVALID") {
  Session closed(p11, slot, Access::read_write);
  const CK_SESSION_HANDLE stale = closed.handle();
  REQUIRE_RV(closed.close(), CKR_OK);

  CK_SESSION_INFO info{};
  CK_BYTE random[16];
  for (CK_SESSION_HANDLE bad : {stale, CK_SESSION_HANDLE{CK_INVALID_HANDLE},
                                CK_SESSION_HANDLE{0x7fffffffUL}, ~CK_SESSION_HANDLE{0}}) {
    CAPTURE(bad);
    CHECK_RV(p11.C_GetSessionInfo(bad, &info), CKR_SESSION_HANDLE_INVALID);
    CHECK_RV(p11.C_GenerateRandom(bad, random, sizeof random), CKR_SESSION_HANDLE_INVALID);
    CHECK_RV(p11.C_CloseSession(bad), CKR_SESSION_HANDLE_INVALID);
  }
}

TEST_CASE_FIXTURE(SessionFixture, "NULL pointer arguments are CKR_ARGUMENTS_BAD") {
  CHECK_RV(p11.C_GetSessionInfo(session, nullptr), CKR_ARGUMENTS_BAD);
  CHECK_RV(p11.C_GetSlotList(CK_FALSE, nullptr, nullptr), CKR_ARGUMENTS_BAD);
  CHECK_RV(p11.C_GetInfo(nullptr), CKR_ARGUMENTS_BAD);
  CHECK_RV(p11.C_GetSlotInfo(slot, nullptr), CKR_ARGUMENTS_BAD);
  CHECK_RV(p11.C_GetTokenInfo(slot, nullptr), CKR_ARGUMENTS_BAD);
  CHECK_RV(p11.C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, nullptr),
           CKR_ARGUMENTS_BAD);
  CHECK_RV(p11.C_GenerateRandom(session, nullptr, 16), CKR_ARGUMENTS_BAD);
  // The session still works after the refused calls.
  CK_SESSION_INFO info{};
  CHECK_RV(p11.C_GetSessionInfo(session, &info), CKR_OK);
}

TEST_CASE_FIXTURE(TokenFixture, "sessions must be serial") {
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
  CHECK_RV(p11.C_OpenSession(slot, CKF_RW_SESSION, nullptr, nullptr, &handle),
           CKR_SESSION_PARALLEL_NOT_SUPPORTED);
}

TEST_CASE_FIXTURE(SessionFixture, "C_GenerateRandom fills the buffer with fresh bytes") {
  CK_BYTE first[32] = {};
  CK_BYTE second[32] = {};
  REQUIRE_RV(p11.C_GenerateRandom(session, first, sizeof first), CKR_OK);
  REQUIRE_RV(p11.C_GenerateRandom(session, second, sizeof second), CKR_OK);
  const std::string a(std::begin(first), std::end(first));
  const std::string b(std::begin(second), std::end(second));
  CHECK(a != std::string(sizeof first, '\0'));
  CHECK(a != b);
}
