// The faulty module's slot faults (faulty/README.md) behind libp11mux.so, as
// the HSM-group tests of issue 15 will use them: a module with two slots over
// the mock, one killed and revived at run time while the other keeps
// working. p11mux forwards slot IDs unchanged, so what a slot fault does
// reaches the application through it; the session mode comes from ctest.
#include "backends_test_support.hpp"

#include "faulty_control.h"
#include "mock_control.h"

#include <atomic>
#include <thread>

namespace p11mux::backends_test {
namespace {

constexpr CK_SLOT_ID kSlotA = 0, kSlotB = 1;

struct ThroughP11mux {
  ThroughP11mux()
      : faulty(*symbol<FaultyGetControlFn>(open_library(FAULTY_PATH), "faulty_get_control")()),
        mock(*symbol<MockGetControlFn>(open_library(MOCK_PATH), "mock_get_control")()) {
    ::setenv("P11MUX_FAULTY_TARGET", MOCK_PATH, 1);
    REQUIRE(faulty.reset() == 0);
    REQUIRE(mock.reset() == 0);
    MockConfig m{};
    m.slot_count = 2;
    REQUIRE(mock.configure(&m) == 0);
    use_backend(FAULTY_PATH);
    p11 = function_list(p11mux_library());
    REQUIRE(p11->C_Initialize(os_locking()) == CKR_OK);
  }
  ~ThroughP11mux() {
    p11->C_Finalize(nullptr);
    faulty.reset();
    ::unsetenv("P11MUX_FAULTY_TARGET");
  }
  ThroughP11mux(const ThroughP11mux&) = delete;
  ThroughP11mux& operator=(const ThroughP11mux&) = delete;

  CK_RV open(CK_SLOT_ID slot, CK_SESSION_HANDLE& h) {
    return p11->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
  }
  CK_SESSION_HANDLE open(CK_SLOT_ID slot) {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(open(slot, h) == CKR_OK);
    return h;
  }
  CK_RV random(CK_SESSION_HANDLE h) {
    CK_BYTE buf[16];
    return p11->C_GenerateRandom(h, buf, sizeof buf);
  }
  FaultySlotStats slot_stats(CK_SLOT_ID slot) {
    FaultySlotStats s{};
    faulty.slot_stats(slot, &s);
    return s;
  }

  const FaultyControl& faulty;
  const MockControl& mock;
  CK_FUNCTION_LIST* p11 = nullptr;
};

TEST_CASE("through p11mux, a slot of the faulty module fails and comes back; the other works") {
  CAPTURE(session_mode());
  ThroughP11mux t;
  CK_SESSION_HANDLE a = t.open(kSlotA), b = t.open(kSlotB);
  REQUIRE(t.random(a) == CKR_OK);
  t.faulty.fail_slot(kSlotA, CKR_DEVICE_ERROR);
  CHECK(t.random(a) == CKR_DEVICE_ERROR);
  CHECK(t.random(b) == CKR_OK);
  CK_TOKEN_INFO info{};
  CHECK(t.p11->C_GetTokenInfo(kSlotB, &info) == CKR_OK);
  CHECK(t.random(t.open(kSlotB)) == CKR_OK);
  t.faulty.clear_slot(kSlotA);
  CHECK(t.random(t.open(kSlotA)) == CKR_OK);  // new sessions work again
  CHECK(t.random(b) == CKR_OK);
}

TEST_CASE("through p11mux, a slot's token removed and back; the other works") {
  CAPTURE(session_mode());
  ThroughP11mux t;
  CK_SESSION_HANDLE a = t.open(kSlotA), b = t.open(kSlotB);
  REQUIRE(t.random(a) == CKR_OK);
  t.faulty.set_slot_removed(kSlotA, 1);
  const CK_RV gone = t.random(a);
  // A backend session of p11mux's own on slot A is gone; which code the
  // application sees is p11mux's business (and issue 15's), not the fixture's.
  CHECK(gone != CKR_OK);
  MESSAGE("p11mux (" << session_mode() << ") answered " << gone);
  CHECK(t.random(b) == CKR_OK);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CHECK(t.open(kSlotA, h) == CKR_TOKEN_NOT_PRESENT);
  t.faulty.set_slot_removed(kSlotA, 0);
  CHECK(t.random(t.open(kSlotA)) == CKR_OK);
  CHECK(t.random(b) == CKR_OK);
}

TEST_CASE("through p11mux, a hung slot does not hold up the other; released, the call returns") {
  CAPTURE(session_mode());
  ThroughP11mux t;
  CK_SESSION_HANDLE a = t.open(kSlotA), b = t.open(kSlotB);
  REQUIRE(t.random(a) == CKR_OK);
  t.faulty.hang_slot(kSlotA, FAULTY_HANG_UNTIL_RELEASED);
  std::atomic<bool> returned{false};
  CK_RV rv = CKR_GENERAL_ERROR;
  std::thread hung([&] {
    rv = t.random(a);
    returned = true;
  });
  while (t.slot_stats(kSlotA).hung_now == 0) std::this_thread::yield();
  CHECK(t.random(b) == CKR_OK);
  CHECK(t.random(t.open(kSlotB)) == CKR_OK);
  CHECK_FALSE(returned.load());
  CHECK(t.faulty.release_slot(kSlotA) == 1);
  hung.join();
  CHECK(rv == CKR_OK);
}

}  // namespace
}  // namespace p11mux::backends_test
