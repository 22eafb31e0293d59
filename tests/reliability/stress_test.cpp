// Stress: 64 threads of mixed traffic through libp11mux.so, on sessions
// shared between threads and on sessions of their own, in the session mode
// that P11MUX_SESSION_MODE names (ctest registers each mode).
//   - over the race detector (libp11mux-race-detector.so: it accepts only
//     C_Initialize without locking, so p11mux must serialize every call into
//     it): zero library and session violations;
//   - over the mock with OS locking and calls that linger inside it: zero
//     session violations while calls really overlap;
//   - over SoftHSM2: no crash, only the codes the spec allows each call.
// Everywhere: every result right (digests, signatures, searches), and every
// backend session closed by C_Finalize.
#include "support.hpp"
#include "workload.hpp"

#include <doctest/doctest.h>

#ifdef P11MUX_RELIABILITY_SOFTHSM2
#include "../integration/support/slots.h"
#include "../integration/support/softhsm_token.h"
#endif

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace p11mux::reliability {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::size_t kThreads = 64;
constexpr std::size_t kSharedSessions = 4;

Token prepare_token(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE setup, CK_SLOT_ID slot,
                    std::string pin) {
  Token t;
  t.slot = slot;
  t.user_pin = std::move(pin);
  t.key_label = "stress-key";
  t.key = make_sign_key(p11, setup, t.key_label.c_str(), false);
  for (int i = 0; i < 16; ++i) {
    Bytes m;
    for (int j = 0; j <= i * 7; ++j) m.push_back(static_cast<CK_BYTE>(i * 31 + j));
    t.messages.push_back(m);
  }
  compute_digests(p11, setup, t);
  return t;
}

struct StressResult {
  Tally tally;
  unsigned long wrong = 0;
  unsigned long iterations = 0;
  double seconds = 0;
};

// The traffic of one run: kThreads threads, `iterations` conversations each
// (or until `time_cap`, a bound on the run, not an assertion).
StressResult run_stress(CK_FUNCTION_LIST& p11, const Token& token, long iterations,
                        std::chrono::seconds time_cap) {
  std::vector<CK_SESSION_HANDLE> shared(kSharedSessions);
  for (auto& s : shared) {
    REQUIRE(p11.C_OpenSession(token.slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                              &s) == CKR_OK);
  }
  std::vector<Tally> tallies(kThreads);
  std::vector<unsigned long> wrong(kThreads), done(kThreads);
  const auto start = Clock::now();
  const auto end = start + time_cap;
  const std::uint64_t seed = base_seed();
  run_threads(kThreads, [&](std::size_t i) {
    Rng rng(seed + i);
    Workload w(p11, token, tallies[i]);
    CK_SESSION_HANDLE mine = CK_INVALID_HANDLE;
    if (w.open(mine, i % 2 == 0) != CKR_OK) return;
    long n = 0;
    for (; n < iterations && Clock::now() < end; ++n) {
      bool on_shared = rng.chance(50);
      CK_SESSION_HANDLE s = on_shared ? shared[rng.below(kSharedSessions)] : mine;
      std::size_t m = rng.below(w.message_count());
      auto pick = rng.below(100);
      if (pick < 10) {
        w.open_use_close(rng.chance(50));
      } else if (pick < 35) {
        w.sign(s, on_shared, m, mine);
      } else if (pick < 60) {
        w.digest(s, on_shared, m);
      } else if (pick < 75) {
        w.find(s, on_shared);
      } else if (pick < 80) {
        w.login_logout(s);
      } else if (pick < 90) {
        w.session_info(s);
      } else {
        w.random(s);
      }
    }
    w.close(mine);
    wrong[i] = w.wrong_results();
    done[i] = static_cast<unsigned long>(n);
  }, "stress");
  StressResult r;
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (std::size_t i = 0; i < kThreads; ++i) {
    r.tally.merge(tallies[i]);
    r.wrong += wrong[i];
    r.iterations += done[i];
  }
  for (auto s : shared) CHECK(p11.C_CloseSession(s) == CKR_OK);
  return r;
}

void check_and_report(const char* name, const StressResult& r) {
  std::printf("FIGURES stress %s mode=%s: threads=%zu conversations=%lu calls=%lu "
              "operation_active=%lu wrong=%lu unexpected=%lu seconds=%.1f\n",
              name, session_mode().c_str(), kThreads, r.iterations, r.tally.calls(),
              r.tally.count_rv(CKR_OPERATION_ACTIVE), r.wrong, r.tally.unexpected_count(),
              r.seconds);
  MESSAGE(std::string(name) << " (" << session_mode() << "): " << r.tally.summary());
  CHECK(r.tally.unexpected_count() == 0);
  for (const auto& u : r.tally.unexpected()) MESSAGE("unexpected: " << u);
  CHECK(r.wrong == 0);
  CHECK(r.iterations > 0);
}

// p11mux over the mock or the race detector (`path`, `control`): a token with
// the signing key on a setup session.
void stress_over_mock(const char* name, const char* path, const MockControl& control,
                      const MockConfig& config, long iterations) {
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(path);
  REQUIRE(control.reset() == 0);
  REQUIRE(control.configure(&config) == 0);
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
  REQUIRE(p11.C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &setup) ==
          CKR_OK);
  Token token = prepare_token(p11, setup, 0, MOCK_USER_PIN);
  StressResult r = run_stress(p11, token, iterations, std::chrono::seconds(60));
  CHECK(p11.C_CloseSession(setup) == CKR_OK);
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);

  MockStats s = mock_stats(control);
  std::printf("FIGURES stress %s backend: calls=%lu max_concurrent=%lu library_violations=%lu "
              "session_violations=%lu sessions_opened=%lu\n",
              name, s.calls_total, s.max_concurrent_calls, s.library_violations,
              s.session_violations, s.sessions_opened_total);
  check_and_report(name, r);
  CHECK(s.library_violations == 0);
  CHECK(s.session_violations == 0);
  CHECK(s.finalize_during_call == 0);
  CHECK(s.calls_after_finalize == 0);
  CHECK(s.sessions_open == 0);
  CHECK(s.sessions_closed_by_finalize == 0);
  CHECK(s.sessions_opened_total == s.sessions_closed_total);
}

// The race detector as it comes (not thread-safe: p11mux must serialize
// every call into it).
TEST_CASE("stress over the race detector" * doctest::test_suite("mock")) {
  stress_over_mock("race-detector", race_detector_path(), race_detector(), MockConfig{},
                   scaled(1500, 60));
  CHECK(mock_stats(race_detector()).init_locking == MOCK_LOCK_NONE);
}

TEST_CASE("stress over the mock with OS locking and lingering calls" *
          doctest::test_suite("mock")) {
  MockConfig c{};
  c.accept_locking = MOCK_LOCK_OS;
  c.call_spin_us = 5;  // every session call stays inside a while: overlaps happen
  stress_over_mock("mock-os-locking", mock_path(), mock(), c, scaled(1500, 60));
  CHECK(mock_stats().max_concurrent_calls > 1);
}

// C_CloseAllSessions closes this application's sessions on the slot; it must
// never close a backend session under a call in progress on it, nor leave a
// virtual session pointing at a backend session that is gone.
TEST_CASE("C_CloseAllSessions racing calls on the same slot" * doctest::test_suite("mock")) {
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(mock_path());
  REQUIRE(mock().reset() == 0);
  MockConfig c{};
  c.accept_locking = MOCK_LOCK_OS;
  c.call_spin_us = 20;
  REQUIRE(mock().configure(&c) == 0);
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  {  // what the race is about, single-threaded
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p11.C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
    CHECK(p11.C_CloseAllSessions(0) == CKR_OK);
    CK_BYTE buf[16];
    CHECK(p11.C_GenerateRandom(h, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
    // A session of another thread, too.
    std::thread other([&] {
      CHECK(p11.C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
    });
    other.join();
    CHECK(p11.C_CloseAllSessions(0) == CKR_OK);
    CHECK(p11.C_GenerateRandom(h, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
  }
  constexpr std::size_t kUsers = 8;
  const long rounds = scaled(300, 20);
  std::atomic<bool> stop{false};
  std::vector<Tally> tallies(kUsers + 1);
  run_threads(kUsers + 1, [&](std::size_t i) {
    Tally& t = tallies[i];
    if (i == kUsers) {
      while (!stop) {
        t.record("C_CloseAllSessions", p11.C_CloseAllSessions(0));
        std::this_thread::yield();
      }
      return;
    }
    const RvSet gone{CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED};
    for (long r = 0; r < rounds; ++r) {
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (!t.record("C_OpenSession", p11.C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr,
                                                       &h))) {
        continue;
      }
      CK_BYTE buf[16];
      for (int k = 0; k < 3; ++k) {
        // A pause between calls: a session used back to back keeps its lock
        // (std::mutex hands nothing over), and the closer would only ever
        // find sessions already closed.
        std::this_thread::yield();
        t.record("C_GenerateRandom", p11.C_GenerateRandom(h, buf, 16), gone);
      }
      t.record("C_CloseSession", p11.C_CloseSession(h), gone);
    }
    if (i == 0) stop = true;  // the closer stops once one user is done
  }, "close-all race");
  stop = true;
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
  Tally all;
  for (auto& t : tallies) all.merge(t);
  MockStats s = mock_stats();
  MESSAGE("C_CloseAllSessions race: " << all.summary());
  std::printf("FIGURES close-all-race mode=%s: calls=%lu closed_under_user=%lu "
              "session_violations=%lu\n",
              session_mode().c_str(), all.calls(), all.count_rv(CKR_SESSION_HANDLE_INVALID),
              s.session_violations);
  CHECK(all.unexpected_count() == 0);
  for (const auto& u : all.unexpected()) MESSAGE("unexpected: " << u);
  CHECK(s.session_violations == 0);
  CHECK(s.sessions_open == 0);
  CHECK(s.sessions_opened_total == s.sessions_closed_total + s.sessions_closed_by_finalize);
}

#ifdef P11MUX_RELIABILITY_SOFTHSM2
TEST_CASE("stress over SoftHSM2" * doctest::test_suite("softhsm2")) {
  p11test::SoftHsmToken softhsm;  // first: SOFTHSM2_CONF must be set at C_Initialize
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(softhsm2_path());
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  CK_SLOT_ID slot = p11test::require_slot_by_label(p11, softhsm.label());
  CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
  REQUIRE(p11.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                            &setup) == CKR_OK);
  Token token = prepare_token(p11, setup, slot, p11test::kUserPin);
  StressResult r = run_stress(p11, token, scaled(150, 10), std::chrono::seconds(60));
  CHECK(p11.C_CloseSession(setup) == CKR_OK);
  CHECK(p11.C_Finalize(nullptr) == CKR_OK);
  check_and_report("softhsm2", r);
}

// The same over the faulty module wrapping SoftHSM2 with no fault configured:
// it counts what p11mux does to the real token (overlapping calls on one
// session would crash SoftHSM2; sessions left open at C_Finalize leak).
TEST_CASE("stress over SoftHSM2, watched by the faulty module" * doctest::test_suite("softhsm2")) {
  p11test::SoftHsmToken softhsm;
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(faulty_path());
  REQUIRE(faulty().reset() == 0);
  FaultyConfig fc{};
  std::snprintf(fc.target, sizeof fc.target, "%s", softhsm2_path());
  REQUIRE(faulty().configure(&fc) == 0);
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  CK_SLOT_ID slot = p11test::require_slot_by_label(p11, softhsm.label());
  CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
  REQUIRE(p11.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                            &setup) == CKR_OK);
  Token token = prepare_token(p11, setup, slot, p11test::kUserPin);
  StressResult r = run_stress(p11, token, scaled(100, 8), std::chrono::seconds(60));
  CHECK(p11.C_CloseSession(setup) == CKR_OK);
  CHECK(p11.C_Finalize(nullptr) == CKR_OK);
  check_and_report("softhsm2-watched", r);
  FaultyStats s = faulty_stats();
  std::printf("FIGURES stress softhsm2-watched backend: calls=%lu max_concurrent=%lu "
              "session_violations=%lu sessions_opened=%lu open_at_finalize=%lu\n",
              s.calls_total, s.max_concurrent_calls, s.session_violations, s.sessions_opened,
              s.sessions_open_at_finalize);
  CHECK(s.session_violations == 0);
  CHECK(s.finalize_during_call == 0);
  CHECK(s.sessions_open_at_finalize == 0);
  CHECK(s.sessions_opened == s.sessions_closed + s.sessions_closed_all + s.sessions_dropped);
}
#endif

}  // namespace
}  // namespace p11mux::reliability
