// Faults: p11mux in front of the faulty module, which wraps the mock or
// SoftHSM2 and injects errors (1% of calls), an HSM restart mid-run, a
// session limit, a removed device and a failing close; and in front of the
// slow module (the same, with network-HSM latency).
// The application must never crash or hang (every wait is bounded), every
// code it gets must be a real CKR code, it must recover (new sessions work
// after the restart), and at C_Finalize every backend session p11mux opened
// must have been closed (the faulty module counts them; over the mock, the
// mock counts them too).
#include "support.hpp"
#include "workload.hpp"

#include <doctest/doctest.h>

#ifdef P11MUX_RELIABILITY_SOFTHSM2
#include "support/slots.h"
#include "support/softhsm_token.h"
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace p11mux::reliability {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

void add_rule(FaultyConfig& c, const char* function, CK_RV rv, unsigned long per_million,
              unsigned long nth = 0) {
  for (auto& r : c.rules) {
    if (r.function[0] != '\0') continue;
    std::snprintf(r.function, sizeof r.function, "%s", function);
    r.rv = rv;
    r.per_million = per_million;
    r.nth = nth;
    return;
  }
  FAIL("no free rule");
}

// 1% of calls fail, with the codes a failing HSM gives: transient errors, and
// sessions reported dead (while the faulty module keeps them: p11mux must
// still close what it stops using).
FaultyConfig one_percent_faults() {
  FaultyConfig c{};
  c.seed = base_seed();
  add_rule(c, "*", CKR_DEVICE_ERROR, 3000);
  add_rule(c, "*", CKR_FUNCTION_FAILED, 2000);
  add_rule(c, "*", CKR_DEVICE_MEMORY, 1000);
  add_rule(c, "*", CKR_SESSION_HANDLE_INVALID, 2000);
  add_rule(c, "*", CKR_SESSION_CLOSED, 1000);
  add_rule(c, "*", CKR_DEVICE_REMOVED, 1000);
  return c;
}

// A session is dead for the application after these: close it, open another.
bool session_dead(CK_RV rv) {
  return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED || rv == CKR_DEVICE_REMOVED ||
         rv == CKR_TOKEN_NOT_PRESENT;
}

// p11mux over the faulty module over `target`; the token is prepared with no
// fault configured, then `faults` applies.
// The module is the faulty one, or the slow one (which keeps the latency its
// environment gives it, P11MUX_FAULTY_LATENCY or its default, until apply()).
class FaultyBackend {
 public:
  FaultyBackend(const char* target, CK_SLOT_ID slot_hint, const std::string& label, std::string pin,
                bool slow_module = false)
      : p11(p11mux()), control(slow_module ? slow() : faulty()) {
    use_backend(slow_module ? slow_path() : faulty_path());
    REQUIRE(control.reset() == 0);
    FaultyConfig none{};
    REQUIRE(control.config_from_env(&none) == 0);
    none.keep_object_handles = 1;
    std::snprintf(none.target, sizeof none.target, "%s", target);
    target_ = none.target;
    REQUIRE(control.configure(&none) == 0);
    REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
    token.slot = slot_hint;
#ifdef P11MUX_RELIABILITY_SOFTHSM2
    if (!label.empty()) token.slot = p11test::require_slot_by_label(p11, label);
#else
    (void)label;
#endif
    token.user_pin = std::move(pin);
    token.key_label = "faults-key";
    CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
    REQUIRE(p11.C_OpenSession(token.slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                              &setup) == CKR_OK);
    // Token objects: they survive the restart, as keys in an HSM do.
    token.key = make_sign_key(p11, setup, token.key_label.c_str(), true);
    for (int i = 0; i < 8; ++i)
      token.messages.push_back(
          Bytes(static_cast<std::size_t>(i * 13 + 1), static_cast<CK_BYTE>(i)));
    compute_digests(p11, setup, token);
    REQUIRE(p11.C_CloseSession(setup) == CKR_OK);
  }
  ~FaultyBackend() {
    if (!finalized_) p11.C_Finalize(nullptr);
  }
  FaultyBackend(const FaultyBackend&) = delete;
  FaultyBackend& operator=(const FaultyBackend&) = delete;

  // Whatever `c` says, a restart keeps the key's handles valid: these tests
  // are about lost sessions, and SoftHSM2 would renumber its objects once its
  // last session closed (docs/pkcs11-facts.md, "Object handles").
  void apply(FaultyConfig c) {
    std::snprintf(c.target, sizeof c.target, "%s", target_.c_str());
    c.keep_object_handles = 1;
    REQUIRE(control.configure(&c) == 0);
  }
  FaultyStats stats() const { return faulty_stats(control); }
  void no_faults() { apply(FaultyConfig{}); }

  // A new session works: open, sign and verify, close.
  void check_fresh_session() {
    Tally t;
    Workload w(p11, token, t);
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    REQUIRE(w.open(s, false) == CKR_OK);
    CHECK(w.sign(s, false, 0, s) == CKR_OK);
    CHECK(w.digest(s, false, 1) == CKR_OK);
    CHECK(w.close(s) == CKR_OK);
    CHECK(w.wrong_results() == 0);
  }

  // C_Finalize, then what the faulty module saw.
  FaultyStats finalize_and_check() {
    REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
    finalized_ = true;
    FaultyStats s = stats();
    MESSAGE("backend sessions: opened " << s.sessions_opened << ", closed " << s.sessions_closed
                                        << ", closed by C_CloseAllSessions "
                                        << s.sessions_closed_all << ", dropped by restarts "
                                        << s.sessions_dropped << ", open at C_Finalize "
                                        << s.sessions_open_at_finalize);
    CHECK(s.session_violations == 0);
    CHECK(s.finalize_during_call == 0);
    CHECK(s.sessions_open_at_finalize == 0);
    CHECK(s.sessions_opened == s.sessions_closed + s.sessions_closed_all + s.sessions_dropped +
                                   s.sessions_open_at_finalize);
    return s;
  }

  void finalized() { finalized_ = true; }

  CK_FUNCTION_LIST& p11;
  const FaultyControl& control;
  Token token;

 private:
  std::string target_;
  bool finalized_ = false;
};

// The mock (or the spec bender, `control`) behind the faulty module.
struct MockTarget {
  explicit MockTarget(MockConfig c = {}, const MockControl& control = mock()) {
    REQUIRE(control.reset() == 0);
    c.accept_locking = c.accept_locking ? c.accept_locking : MOCK_LOCK_OS;
    REQUIRE(control.configure(&c) == 0);
  }
  // After C_Finalize: the mock's own count agrees.
  static void check(const MockControl& control = mock()) {
    MockStats s = mock_stats(control);
    CHECK(s.session_violations == 0);
    CHECK(s.sessions_open == 0);
    CHECK(s.sessions_closed_by_finalize == 0);
    CHECK(s.sessions_opened_total == s.sessions_closed_total);
  }
};

// ---- traffic under faults ----

struct FaultRun {
  std::size_t threads = 16;
  long conversations = 300;      // per thread, before the chaos is over
  std::chrono::seconds cap{60};  // bound on the run, not an assertion
  // The chaos thread's action once this share of the traffic is done.
  std::function<void()> chaos;
  std::function<void()> chaos_end;  // after the pause, if any
  std::chrono::milliseconds chaos_pause{0};
};

struct FaultResult {
  Tally tally;
  unsigned long wrong = 0, conversations = 0;
  std::size_t recovered = 0;  // threads with a successful conversation after the chaos
  double seconds = 0;
};

FaultResult run_faults(FaultyBackend& b, const FaultRun& run) {
  std::vector<Tally> tallies(run.threads);
  std::vector<unsigned long> wrong(run.threads), done(run.threads);
  std::vector<char> recovered(run.threads, 0);
  std::atomic<long> progress{0};
  std::atomic<bool> chaos_over{!run.chaos};
  const long chaos_at = static_cast<long>(run.threads) * run.conversations * 2 / 5;
  const auto start = Clock::now();
  const auto end = start + run.cap;
  const std::uint64_t seed = base_seed();
  run_threads(
      run.threads + 1,
      [&](std::size_t i) {
        if (i == run.threads) {  // the chaos thread
          if (!run.chaos) return;
          while (progress < chaos_at && Clock::now() < end) std::this_thread::sleep_for(1ms);
          run.chaos();
          if (run.chaos_end) {
            std::this_thread::sleep_for(run.chaos_pause);
            run.chaos_end();
          }
          chaos_over = true;
          return;
        }
        Rng rng(seed + 1000 + i);
        Workload w(b.p11, b.token, tallies[i]);
        CK_SESSION_HANDLE mine = CK_INVALID_HANDLE;
        long n = 0;
        // Past its share, a thread goes on until it has worked after the chaos.
        for (; Clock::now() < end && (n < run.conversations || !recovered[i]); ++n) {
          bool after_chaos = chaos_over;
          if (mine == CK_INVALID_HANDLE && w.open(mine, true) != CKR_OK) {
            mine = CK_INVALID_HANDLE;
            std::this_thread::yield();
            continue;
          }
          std::size_t m = rng.below(w.message_count());
          CK_RV rv;
          auto pick = rng.below(100);
          if (pick < 35) {
            rv = w.sign(mine, false, m, mine);
          } else if (pick < 60) {
            rv = w.digest(mine, false, m);
          } else if (pick < 70) {
            rv = w.find(mine, false);
          } else if (pick < 80) {
            rv = w.open_use_close(rng.chance(50));
          } else if (pick < 85) {
            rv = w.login_logout(mine);
          } else if (pick < 93) {
            rv = w.session_info(mine);
          } else {
            rv = w.random(mine);
          }
          if (rv == CKR_OK && after_chaos) recovered[i] = 1;
          if (session_dead(rv)) {
            w.close(mine);
            mine = CK_INVALID_HANDLE;
          }
          ++progress;
        }
        if (mine != CK_INVALID_HANDLE) w.close(mine);
        wrong[i] = w.wrong_results();
        done[i] = static_cast<unsigned long>(n);
      },
      "faults");
  FaultResult r;
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (std::size_t i = 0; i < run.threads; ++i) {
    r.tally.merge(tallies[i]);
    r.wrong += wrong[i];
    r.conversations += done[i];
    r.recovered += recovered[i] != 0;
  }
  return r;
}

void check_and_report(FaultyBackend& b, const char* name, const FaultRun& run,
                      const FaultResult& r) {
  FaultyStats s = b.stats();
  std::printf(
      "FIGURES faults %s mode=%s: threads=%zu conversations=%lu calls=%lu "
      "faults_injected=%lu restarts=%lu sessions_dropped=%lu recovered=%zu/%zu "
      "invalid_codes=%lu wrong=%lu seconds=%.1f\n",
      name, session_mode().c_str(), run.threads, r.conversations, r.tally.calls(),
      s.faults_injected, s.restarts, s.sessions_dropped, r.recovered, run.threads,
      r.tally.invalid_count(), r.wrong, r.seconds);
  MESSAGE(std::string(name) << " (" << session_mode() << "): " << r.tally.summary());
  CHECK(r.tally.invalid_count() == 0);
  CHECK(r.wrong == 0);
  CHECK(r.recovered == run.threads);
}

void faults_and_restart(FaultyBackend& b, const char* name, long conversations) {
  b.apply(one_percent_faults());
  FaultRun run;
  run.conversations = conversations;
  run.chaos = [] { faulty().restart(); };
  FaultResult r = run_faults(b, run);
  check_and_report(b, name, run, r);
  CHECK(faulty_stats().faults_injected > 0);
  CHECK(faulty_stats().restarts == 1);
  b.no_faults();
  b.check_fresh_session();
  b.finalize_and_check();
}

TEST_CASE("1% injected errors and an HSM restart mid-run" * doctest::test_suite("mock")) {
  MockTarget target;
  {
    FaultyBackend b(mock_path(), 0, "", MOCK_USER_PIN);
    faults_and_restart(b, "mock", scaled(1500, 60));
  }
  MockTarget::check();
}

TEST_CASE("a device removed and put back" * doctest::test_suite("mock")) {
  MockTarget target;
  {
    FaultyBackend b(mock_path(), 0, "", MOCK_USER_PIN);
    FaultRun run;
    run.threads = 8;
    run.conversations = scaled(200, 20);
    run.chaos = [] { faulty().set_removed(1); };
    run.chaos_pause = 20ms;
    run.chaos_end = [] { faulty().set_removed(0); };
    FaultResult r = run_faults(b, run);
    check_and_report(b, "mock-removed", run, r);
    CHECK(r.tally.count_rv(CKR_DEVICE_REMOVED) + r.tally.count_rv(CKR_TOKEN_NOT_PRESENT) +
              r.tally.count_rv(CKR_SESSION_HANDLE_INVALID) >
          0);
    b.check_fresh_session();
    b.finalize_and_check();
  }
  MockTarget::check();
}

// Over `target_path` (the mock, or the spec bender whose transient
// CKR_SESSION_COUNT must not lower the limit for good).
void session_limit(const char* target_path, bool transient = false) {
  {
    FaultyBackend b(target_path, 0, "", MOCK_USER_PIN);
    FaultyConfig c{};
    c.max_sessions = 8;
    b.apply(c);
    constexpr std::size_t kThreads = 16;
    std::vector<Tally> tallies(kThreads);
    const long rounds = scaled(200, 20);
    run_threads(
        kThreads,
        [&](std::size_t i) {
          Workload w(b.p11, b.token, tallies[i]);
          for (long n = 0; n < rounds; ++n) {
            CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
            CK_RV rv = b.p11.C_OpenSession(b.token.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
            tallies[i].record("C_OpenSession", rv, {CKR_SESSION_COUNT});
            if (rv != CKR_OK) {
              std::this_thread::yield();
              continue;
            }
            w.random(s);
            w.digest(s, false, static_cast<std::size_t>(n) % w.message_count());
            w.close(s);
          }
        },
        "session limit");
    Tally all;
    for (auto& t : tallies) all.merge(t);
    MESSAGE("session limit (" << session_mode() << "): " << all.summary());
    CHECK(all.unexpected_count() == 0);
    for (const auto& u : all.unexpected()) MESSAGE("unexpected: " << u);
    FaultyStats s = faulty_stats();
    std::printf(
        "FIGURES faults session-limit mode=%s: threads=%zu calls=%lu "
        "session_count_refusals=%lu max_sessions_open=%lu\n",
        session_mode().c_str(), kThreads, all.calls(), s.session_count_refusals,
        s.max_sessions_open);
    CHECK(s.max_sessions_open <= 8);
    MESSAGE("backend sessions open after the traffic: " << s.sessions_open);
    // Nothing leaked: all 8 can be open at once again.
    std::vector<CK_SESSION_HANDLE> eight(8);
    // (A backend that refuses now and then may refuse one of them: try again,
    // for 10 s in all.)
    const auto deadline = Clock::now() + 10s;
    for (auto& h : eight) {
      CK_RV rv = b.p11.C_OpenSession(b.token.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
      while (transient && rv == CKR_SESSION_COUNT && Clock::now() < deadline) {
        std::this_thread::sleep_for(10ms);
        rv = b.p11.C_OpenSession(b.token.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
      }
      CHECK(rv == CKR_OK);
    }
    for (auto h : eight) CHECK(b.p11.C_CloseSession(h) == CKR_OK);
    b.finalize_and_check();
  }
}

TEST_CASE("an HSM that allows 8 sessions, 16 threads" * doctest::test_suite("mock")) {
  MockTarget target;
  session_limit(mock_path());
  MockTarget::check();
}

// ---- over the spec bender (operations kept after errors, reused handles,
// transient CKR_SESSION_COUNT ...) behind the faulty module ----

// Every bend but the transient CKR_SESSION_COUNT, which the workload does not
// expect from C_OpenSession.
MockConfig bends_but_count() {
  MockConfig c{};
  c.bend = MOCK_BEND_ALL & ~MOCK_BEND_TRANSIENT_COUNT;
  return c;
}

// Faults and a restart (every backend session gone) over a backend that
// hands the freed handle numbers out again at once: a stale backend handle
// must never reach another virtual session's backend session.
TEST_CASE("1% injected errors and an HSM restart mid-run" * doctest::test_suite("spec-bender")) {
  MockTarget target(bends_but_count(), spec_bender());
  {
    FaultyBackend b(spec_bender_path(), 0, "", MOCK_USER_PIN);
    faults_and_restart(b, "spec-bender", scaled(1000, 40));
  }
  MockTarget::check(spec_bender());
  MockStats s = mock_stats(spec_bender());
  std::printf("FIGURES faults spec-bender bends: ops_kept=%lu handles_reused=%lu\n",
              s.bend_ops_kept, s.bend_handles_reused);
}

TEST_CASE("an HSM that allows 8 sessions, 16 threads" * doctest::test_suite("spec-bender")) {
  MockConfig c{};               // every bend
  c.transient_count_every = 3;  // the faulty module refuses past 8 first: refuse often
  MockTarget target(c, spec_bender());
  ::setenv("P11MUX_POOL_WAIT_MS", "200", 1);  // at a (learned) limit, not 5 s per open
  session_limit(spec_bender_path(), /*transient=*/true);
  ::unsetenv("P11MUX_POOL_WAIT_MS");
  MockTarget::check(spec_bender());
  CHECK(mock_stats(spec_bender()).bend_session_count > 0);
}

// A network HSM (libp11mux-slow.so as it comes): every open, close, login
// and crypto call takes milliseconds. Calls on different sessions must
// overlap in it (p11mux must not serialize a thread-safe backend), and
// nothing may time out or leak.
void slow_hsm(FaultyBackend& b, const char* name, long conversations) {
  FaultRun run;
  run.threads = 32;
  run.conversations = conversations;
  FaultResult r = run_faults(b, run);
  check_and_report(b, name, run, r);
  CHECK(r.tally.unexpected_count() == 0);
  for (const auto& u : r.tally.unexpected()) MESSAGE("unexpected: " << u);
  FaultyStats s = b.stats();
  std::printf("FIGURES faults %s backend: delayed_calls=%lu max_concurrent=%lu\n", name,
              s.delayed_calls, s.max_concurrent_calls);
  CHECK(s.delayed_calls > 0);
  CHECK(s.max_concurrent_calls > 1);
  b.finalize_and_check();
}

TEST_CASE("a slow network HSM, 32 threads" * doctest::test_suite("mock")) {
  MockTarget target;
  {
    FaultyBackend b(mock_path(), 0, "", MOCK_USER_PIN, true);
    slow_hsm(b, "mock-slow", scaled(20, 5));
  }
  MockTarget::check();
}

// A close the HSM refuses (CKR_DEVICE_ERROR) leaves its session open there.
// Whatever p11mux answers, that backend session must not be lost: on an HSM
// that allows one session, the application must still get a session next
// time (p11mux kept it, reuses it, or closes it again). The injected failure
// may also land on p11mux's own close at C_Finalize, where the backend's
// C_Finalize closes what is left: the counts at C_Finalize are not checked.
TEST_CASE("a backend C_CloseSession that fails once costs no session slot" *
          doctest::test_suite("mock")) {
  MockTarget target;
  {
    FaultyBackend b(mock_path(), 0, "", MOCK_USER_PIN);
    FaultyConfig c{};
    c.max_sessions = 1;
    add_rule(c, "C_CloseSession", CKR_DEVICE_ERROR, 0, 1);
    b.apply(c);
    for (int round = 0; round < 3; ++round) {
      CAPTURE(round);
      CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
      // R/W like the set-up session, which p11mux may keep open for reuse.
      REQUIRE(b.p11.C_OpenSession(b.token.slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr,
                                  nullptr, &s) == CKR_OK);
      CK_BYTE buf[8];
      CHECK(b.p11.C_GenerateRandom(s, buf, sizeof buf) == CKR_OK);
      CK_RV rv = b.p11.C_CloseSession(s);
      CHECK(valid_ckr(rv));
      if (rv != CKR_OK) {
        MESSAGE("C_CloseSession -> " << rv_string(rv) << "; closing again -> "
                                     << rv_string(b.p11.C_CloseSession(s)));
      }
    }
    REQUIRE(b.p11.C_Finalize(nullptr) == CKR_OK);
    b.finalized();
    CHECK(faulty_stats().faults_injected == 1);
    CHECK(faulty_stats().session_violations == 0);
  }
  CHECK(mock_stats().sessions_open == 0);
}

#ifdef P11MUX_RELIABILITY_SOFTHSM2
TEST_CASE("1% injected errors and an HSM restart mid-run" * doctest::test_suite("softhsm2")) {
  p11test::SoftHsmToken softhsm;
  FaultyBackend b(softhsm2_path(), 0, softhsm.label(), p11test::kUserPin);
  faults_and_restart(b, "softhsm2", scaled(300, 30));
}

// A restart while no call is in flight drops every SoftHSM2 session at once,
// p11mux's pooled one included, and SoftHSM2 then numbers the key anew. The
// run above failed `wrong == 0` in CI that way (a search found other
// handles, C_SignInit answered CKR_OBJECT_HANDLE_INVALID); this makes that
// restart certain. It needs the faulty module's own target session.
TEST_CASE("a restart with no call in flight leaves the application's key handles valid" *
          doctest::test_suite("softhsm2")) {
  p11test::SoftHsmToken softhsm;
  FaultyBackend b(softhsm2_path(), 0, softhsm.label(), p11test::kUserPin);
  faulty().restart();
  b.check_fresh_session();
  Tally t;
  Workload w(b.p11, b.token, t);
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  REQUIRE(w.open(s, false) == CKR_OK);
  CHECK(w.find(s, false) == CKR_OK);
  CHECK(w.close(s) == CKR_OK);
  CHECK(w.wrong_results() == 0);
  b.finalize_and_check();
}

TEST_CASE("a slow network HSM, 32 threads" * doctest::test_suite("softhsm2")) {
  p11test::SoftHsmToken softhsm;
  FaultyBackend b(softhsm2_path(), 0, softhsm.label(), p11test::kUserPin, true);
  slow_hsm(b, "softhsm2-slow", scaled(10, 3));
}
#endif

}  // namespace
}  // namespace p11mux::reliability
