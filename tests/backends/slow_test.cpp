// libp11mux-slow.so: the faulty module with network-HSM latency when nothing
// configures it, loaded by p11mux through P11MUX_MODULE alone. No wall-clock
// assertion: the module counts the calls it delayed.
#include "backends_test_support.hpp"

#include "faulty_control.h"
#include "mock_control.h"

#include <stdlib.h>

namespace p11mux::backends_test {
namespace {

const FaultyControl& control_of(const char* path) {
  return *symbol<FaultyGetControlFn>(open_library(path), "faulty_get_control")();
}

FaultyConfig from_env(const FaultyControl& control) {
  FaultyConfig c{};
  REQUIRE(control.config_from_env(&c) == 0);
  return c;
}

bool has_latency(const FaultyConfig& c) {
  return c.open_session_us != 0 && c.close_session_us != 0 && c.login_us != 0 && c.crypto_us != 0;
}

bool no_latency(const FaultyConfig& c) {
  return c.open_session_us == 0 && c.close_session_us == 0 && c.login_us == 0 && c.crypto_us == 0;
}

TEST_CASE("the slow module has latency by default, the faulty module none") {
  ::unsetenv("P11MUX_FAULTY_LATENCY");
  CHECK(has_latency(from_env(control_of(SLOW_PATH))));
  CHECK(no_latency(from_env(control_of(FAULTY_PATH))));
  ::setenv("P11MUX_FAULTY_LATENCY", "", 1);  // set and empty: none
  CHECK(no_latency(from_env(control_of(SLOW_PATH))));
  ::setenv("P11MUX_FAULTY_LATENCY", "open=7", 1);
  FaultyConfig c = from_env(control_of(SLOW_PATH));
  CHECK(c.open_session_us == 7);
  CHECK(c.crypto_us == 0);
  ::unsetenv("P11MUX_FAULTY_LATENCY");
}

// Each call p11mux forwards to one of the slow kinds is delayed once: the
// session open, the login, the random numbers.
TEST_CASE("through p11mux, the slow module delays sessions, login and crypto") {
  ::unsetenv("P11MUX_FAULTY_LATENCY");
  ::setenv("P11MUX_FAULTY_TARGET", MOCK_PATH, 1);
  const FaultyControl& slow = control_of(SLOW_PATH);
  REQUIRE(slow.reset() == 0);
  const MockControl& mock =
      *symbol<MockGetControlFn>(open_library(MOCK_PATH), "mock_get_control")();
  REQUIRE(mock.reset() == 0);
  use_backend(SLOW_PATH);
  CK_FUNCTION_LIST* p11 = function_list(p11mux_library());
  auto delayed = [&] {
    FaultyStats s{};
    slow.stats(&s);
    return s.delayed_calls;
  };
  REQUIRE(p11->C_Initialize(os_locking()) == CKR_OK);
  CHECK(delayed() == 0);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  CHECK(delayed() == 1);
  CK_UTF8CHAR pin[] = MOCK_USER_PIN;
  REQUIRE(p11->C_Login(h, CKU_USER, pin, sizeof pin - 1) == CKR_OK);
  CHECK(delayed() == 2);
  CK_BYTE random[16];
  REQUIRE(p11->C_GenerateRandom(h, random, sizeof random) == CKR_OK);
  CHECK(delayed() == 3);
  CK_SESSION_INFO info;
  REQUIRE(p11->C_GetSessionInfo(h, &info) == CKR_OK);  // not a slow kind
  CHECK(delayed() == 3);
  CHECK(p11->C_CloseSession(h) == CKR_OK);
  REQUIRE(p11->C_Finalize(nullptr) == CKR_OK);
  ::unsetenv("P11MUX_FAULTY_TARGET");
}

}  // namespace
}  // namespace p11mux::backends_test
