// libp11mux-race-detector.so: not thread-safe by default (only NULL
// C_Initialize arguments work), and it counts every overlap. Called directly
// from 16 threads it sees overlaps; through p11mux, which then serializes
// every call into it, it sees none.
#include "backends_test_support.hpp"

#include "mock_control.h"
#include "std_mutex_callbacks.hpp"

#include <atomic>
#include <chrono>
#include <functional>
#include <thread>
#include <vector>

namespace p11mux::backends_test {
namespace {

constexpr int kThreads = 16;

struct RaceDetector {
  RaceDetector() : lib(open_library(RACE_DETECTOR_PATH)) {
    control = symbol<MockGetControlFn>(lib, "mock_get_control")();
    p11 = function_list(lib);
  }
  MockStats stats() const {
    MockStats s{};
    control->stats(&s);
    return s;
  }
  void* lib;
  const MockControl* control = nullptr;
  CK_FUNCTION_LIST* p11 = nullptr;
};

RaceDetector& detector() {
  static RaceDetector d;
  return d;
}

using p11mux::test_backends::create_mutex;
using p11mux::test_backends::destroy_mutex;
using p11mux::test_backends::lock_mutex;
using p11mux::test_backends::unlock_mutex;

void run_threads(const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) threads.emplace_back(body, i);
  for (auto& t : threads) t.join();
}

TEST_CASE("the race detector refuses every form of locking and accepts none") {
  RaceDetector& d = detector();
  REQUIRE(d.control->reset() == 0);
  CK_C_INITIALIZE_ARGS callbacks{&create_mutex, &destroy_mutex, &lock_mutex, &unlock_mutex, 0,
                                 nullptr};
  CK_C_INITIALIZE_ARGS both = callbacks;
  both.flags = CKF_OS_LOCKING_OK;
  CK_C_INITIALIZE_ARGS none{};
  CHECK(d.p11->C_Initialize(os_locking()) == CKR_CANT_LOCK);
  CHECK(d.p11->C_Initialize(&callbacks) == CKR_CANT_LOCK);
  CHECK(d.p11->C_Initialize(&both) == CKR_CANT_LOCK);
  REQUIRE(d.p11->C_Initialize(&none) == CKR_OK);
  CHECK(d.p11->C_Finalize(nullptr) == CKR_OK);
  REQUIRE(d.p11->C_Initialize(nullptr) == CKR_OK);
  CHECK(d.stats().init_locking == MOCK_LOCK_NONE);
  CHECK(d.p11->C_Finalize(nullptr) == CKR_OK);
}

// Each thread calls until the detector has seen both kinds of overlap (on a
// machine with one core they come when a thread is preempted inside its
// 50 us call). The deadline only keeps a broken detector from hanging.
TEST_CASE("called directly from 16 threads on one session, the race detector sees overlaps") {
  RaceDetector& d = detector();
  REQUIRE(d.control->reset() == 0);
  MockConfig c{};
  c.call_spin_us = 50;
  REQUIRE(d.control->configure(&c) == 0);
  REQUIRE(d.p11->C_Initialize(nullptr) == CKR_OK);
  CK_SESSION_HANDLE shared = CK_INVALID_HANDLE;
  REQUIRE(d.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &shared) == CKR_OK);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::atomic<bool> seen{false};
  run_threads([&](int) {
    CK_SESSION_INFO info;
    while (!seen && std::chrono::steady_clock::now() < deadline) {
      for (int i = 0; i < 16; ++i) d.p11->C_GetSessionInfo(shared, &info);
      MockStats s = d.stats();
      if (s.library_violations > 0 && s.session_violations > 0) seen = true;
    }
  });
  MockStats s = d.stats();
  MESSAGE("library_violations=" << s.library_violations
                                << " session_violations=" << s.session_violations);
  CHECK(s.library_violations > 0);
  CHECK(s.session_violations > 0);
  CHECK(d.p11->C_Finalize(nullptr) == CKR_OK);
}

// p11mux tries OS locking, then its callbacks, then none; the detector
// refuses the first two, so p11mux must serialize every call into it. Every
// call lingers 20 us inside the backend, so unserialized calls would overlap.
TEST_CASE("through p11mux, 16 threads on one shared session: zero violations") {
  RaceDetector& d = detector();
  REQUIRE(d.control->reset() == 0);
  MockConfig c{};
  c.call_spin_us = 20;
  REQUIRE(d.control->configure(&c) == 0);
  use_backend(RACE_DETECTOR_PATH);
  CK_FUNCTION_LIST* p11 = function_list(p11mux_library());
  REQUIRE(p11->C_Initialize(os_locking()) == CKR_OK);
  CK_SESSION_HANDLE shared = CK_INVALID_HANDLE;
  REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &shared) == CKR_OK);
  constexpr int kRounds = 500;
  std::atomic<unsigned long> failed{0};
  run_threads([&](int i) {
    CK_SESSION_INFO info;
    CK_SLOT_INFO slot;
    CK_BYTE random[16];
    for (int n = 0; n < kRounds; ++n) {
      if (p11->C_GetSessionInfo(shared, &info) != CKR_OK) ++failed;
      if (p11->C_GenerateRandom(shared, random, sizeof random) != CKR_OK) ++failed;
      if (p11->C_GetSlotInfo(0, &slot) != CKR_OK) ++failed;
      if ((n + i) % 50 == 0) {  // now and then a session of its own
        CK_SESSION_HANDLE mine = CK_INVALID_HANDLE;
        if (p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &mine) != CKR_OK ||
            p11->C_GenerateRandom(mine, random, sizeof random) != CKR_OK ||
            p11->C_CloseSession(mine) != CKR_OK) {
          ++failed;
        }
      }
    }
  });
  CHECK(p11->C_CloseSession(shared) == CKR_OK);
  REQUIRE(p11->C_Finalize(nullptr) == CKR_OK);
  MockStats s = d.stats();
  MESSAGE(session_mode() << ": " << s.calls_total << " calls reached the race detector");
  CHECK(failed == 0);
  CHECK(s.initialize_calls == 3);  // OS locking and callbacks refused, then NULL
  CHECK(s.initialize_ok == 1);
  CHECK(s.init_null_args == 1);
  CHECK(s.init_locking == MOCK_LOCK_NONE);
  CHECK(s.calls_total > static_cast<unsigned long>(kThreads * kRounds * 2));
  CHECK(s.max_concurrent_calls == 1);
  CHECK(s.library_violations == 0);
  CHECK(s.session_violations == 0);
  CHECK(s.sessions_open == 0);
}

}  // namespace
}  // namespace p11mux::backends_test
