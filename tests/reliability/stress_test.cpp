// Stress: 64 threads of mixed traffic through libp11mux.so, on sessions
// shared between threads and on sessions of their own, in the session mode
// that P11MUX_SESSION_MODE names (ctest registers each mode).
//   - over the race detector (libp11mux-race-detector.so: it accepts only
//     C_Initialize without locking, so p11mux must serialize every call into
//     it): zero library and session violations;
//   - over the mock with OS locking and calls that linger inside it: zero
//     session violations while calls really overlap;
//   - over SoftHSM2: no crash, only the codes the spec allows each call;
//   - over the spec bender (libp11mux-spec-bender.so, a backend bending the
//     spec as real ones do): the same traffic, then a canary per virtual
//     session (its objects, operations, digests and MACs are its own), the
//     pool within its limit, and C_Finalize and fork() bounded while threads
//     wait at the limit.
// Everywhere: every result right (digests, signatures, searches), and every
// backend session closed by C_Finalize.
#include "support.hpp"
#include "workload.hpp"

#include "key_material.hpp"

#include <doctest/doctest.h>

#ifdef P11MUX_RELIABILITY_SOFTHSM2
#include "support/slots.h"
#include "support/softhsm_token.h"
#endif

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
// C_OpenSession for a suite's own setup, through a backend's transient
// CKR_SESSION_COUNT (the spec bender) if any.
CK_RV open_retrying(CK_FUNCTION_LIST& p11, CK_SLOT_ID slot, CK_FLAGS flags,
                    CK_SESSION_HANDLE& out) {
  CK_RV rv = CKR_SESSION_COUNT;
  for (int attempt = 0; attempt < 50 && rv == CKR_SESSION_COUNT; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    rv = p11.C_OpenSession(slot, flags, nullptr, nullptr, &out);
  }
  return rv;
}

// `transient_count`: the backend refuses sessions now and then (the spec
// bender); the workload may see CKR_SESSION_COUNT from C_OpenSession.
StressResult run_stress(CK_FUNCTION_LIST& p11, const Token& token, long iterations,
                        std::chrono::seconds time_cap, bool transient_count = false) {
  std::vector<CK_SESSION_HANDLE> shared(kSharedSessions);
  for (auto& s : shared)
    REQUIRE(open_retrying(p11, token.slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, s) == CKR_OK);
  std::vector<Tally> tallies(kThreads);
  std::vector<unsigned long> wrong(kThreads), done(kThreads);
  const auto start = Clock::now();
  const auto end = start + time_cap;
  const std::uint64_t seed = base_seed();
  run_threads(
      kThreads,
      [&](std::size_t i) {
        Rng rng(seed + i);
        Workload w(p11, token, tallies[i]);
        if (transient_count) {
          w.allow_transient_session_count();
          // A multiplexed call may need a backend session of its own: it waits
          // for one at the limit, then answers CKR_SESSION_COUNT (README).
          if (session_mode() == "multiplex") tallies[i].allow_everywhere(CKR_SESSION_COUNT);
        }
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
      },
      "stress");
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
  std::printf(
      "FIGURES stress %s mode=%s: threads=%zu conversations=%lu calls=%lu "
      "operation_active=%lu wrong=%lu unexpected=%lu seconds=%.1f\n",
      name, session_mode().c_str(), kThreads, r.iterations, r.tally.calls(),
      r.tally.count_rv(CKR_OPERATION_ACTIVE), r.wrong, r.tally.unexpected_count(), r.seconds);
  MESSAGE(std::string(name) << " (" << session_mode() << "): " << r.tally.summary());
  CHECK(r.tally.unexpected_count() == 0);
  for (const auto& u : r.tally.unexpected()) MESSAGE("unexpected: " << u);
  CHECK(r.wrong == 0);
  CHECK(r.iterations > 0);
}

// p11mux over the mock or the race detector (`path`, `control`): a token with
// the signing key on a setup session.
void stress_over_mock(const char* name, const char* path, const MockControl& control,
                      const MockConfig& config, long iterations, bool transient_count = false,
                      std::chrono::seconds time_cap = std::chrono::seconds(60)) {
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(path);
  REQUIRE(control.reset() == 0);
  REQUIRE(control.configure(&config) == 0);
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
  REQUIRE(open_retrying(p11, 0, CKF_SERIAL_SESSION | CKF_RW_SESSION, setup) == CKR_OK);
  Token token = prepare_token(p11, setup, 0, MOCK_USER_PIN);
  StressResult r = run_stress(p11, token, iterations, time_cap, transient_count);
  CHECK(p11.C_CloseSession(setup) == CKR_OK);
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);

  MockStats s = mock_stats(control);
  std::printf(
      "FIGURES stress %s backend: calls=%lu max_concurrent=%lu library_violations=%lu "
      "session_violations=%lu sessions_opened=%lu\n",
      name, s.calls_total, s.max_concurrent_calls, s.library_violations, s.session_violations,
      s.sessions_opened_total);
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
    std::thread other(
        [&] { CHECK(p11.C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK); });
    other.join();
    CHECK(p11.C_CloseAllSessions(0) == CKR_OK);
    CHECK(p11.C_GenerateRandom(h, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
  }
  constexpr std::size_t kUsers = 8;
  const long rounds = scaled(300, 20);
  std::atomic<bool> stop{false};
  std::vector<Tally> tallies(kUsers + 1);
  run_threads(
      kUsers + 1,
      [&](std::size_t i) {
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
          if (!t.record("C_OpenSession",
                        p11.C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h))) {
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
      },
      "close-all race");
  stop = true;
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
  Tally all;
  for (auto& t : tallies) all.merge(t);
  MockStats s = mock_stats();
  MESSAGE("C_CloseAllSessions race: " << all.summary());
  std::printf(
      "FIGURES close-all-race mode=%s: calls=%lu closed_under_user=%lu "
      "session_violations=%lu\n",
      session_mode().c_str(), all.calls(), all.count_rv(CKR_SESSION_HANDLE_INVALID),
      s.session_violations);
  CHECK(all.unexpected_count() == 0);
  for (const auto& u : all.unexpected()) MESSAGE("unexpected: " << u);
  CHECK(s.session_violations == 0);
  CHECK(s.sessions_open == 0);
  CHECK(s.sessions_opened_total == s.sessions_closed_total + s.sessions_closed_by_finalize);
}

// ---- over the spec bender: a backend that bends the spec as real ones do ----

// The mixed traffic over every bend at once (operations kept after errors,
// reused handles, transient CKR_SESSION_COUNT, slow opens ...).
TEST_CASE("stress over the spec bender" * doctest::test_suite("spec-bender")) {
  stress_over_mock("spec-bender", spec_bender_path(), spec_bender(), MockConfig{}, scaled(300, 20),
                   /*transient_count=*/true, std::chrono::seconds(30));
  MockStats s = mock_stats(spec_bender());
  std::printf(
      "FIGURES stress spec-bender bends: ops_kept=%lu handles_reused=%lu "
      "session_count=%lu\n",
      s.bend_ops_kept, s.bend_handles_reused, s.bend_session_count);
}

// Sets P11MUX_* variables for one scope.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (auto [name, value] : vars) {
      ::setenv(name, value, 1);
      names_.push_back(name);
    }
  }
  ~ScopedEnv() {
    for (const char* name : names_) ::unsetenv(name);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::vector<const char*> names_;
};

constexpr char kCanaryApplication[] = "p11mux-canary";

// The canary of one virtual session: objects labelled "canary-<thread>-<n>"
// (n: the thread's n-th session), a digest and a signature of that label.
struct Canary {
  std::size_t thread;
  long n;
  std::string label() const { return "canary-" + std::to_string(thread) + "-" + std::to_string(n); }
};

struct CanaryCounts {
  unsigned long sessions = 0, refused = 0;
  unsigned long inherited_operation = 0;  // an Init of a fresh session found one active
  unsigned long foreign_object = 0;       // an object of an already closed session found
  unsigned long own_missing = 0;          // its own objects not found (or found twice)
  unsigned long wrong = 0;                // a digest or signature that is not its own
  unsigned long other_error = 0;
  std::vector<std::string> first_errors;

  void error(const std::string& what) {
    ++other_error;
    if (first_errors.size() < 5) first_errors.push_back(what);
  }
  void merge(const CanaryCounts& o) {
    sessions += o.sessions;
    refused += o.refused;
    inherited_operation += o.inherited_operation;
    foreign_object += o.foreign_object;
    own_missing += o.own_missing;
    wrong += o.wrong;
    other_error += o.other_error;
    for (const auto& e : o.first_errors)
      if (first_errors.size() < 5) first_errors.push_back(e);
  }
};

// Every session of every thread carries a canary; whatever the bender keeps
// (operations after errors, handle numbers, keys returned in parameters), a
// new virtual session never sees a closed one's objects or operations, and
// the backend never has more sessions open than the pool's limit.
TEST_CASE("spec bender: a canary per virtual session, the pool within its limit" *
          doctest::test_suite("spec-bender")) {
  constexpr std::size_t kCanaryThreads = 16;
  constexpr unsigned long kLimit = 6;
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(spec_bender_path());
  ScopedEnv env({{"P11MUX_POOL_MAX_SESSIONS", "6"}, {"P11MUX_POOL_WAIT_MS", "2000"}});
  const MockControl& bender = spec_bender();
  REQUIRE(bender.reset() == 0);
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);

  // closed[t] = the last n of thread t whose session C_CloseSession has ended.
  std::array<std::atomic<long>, kCanaryThreads> closed;
  for (auto& c : closed) c.store(-1);
  std::vector<CanaryCounts> counts(kCanaryThreads);
  const long iterations = scaled(150, 12);
  const auto end = Clock::now() + std::chrono::seconds(30);
  const std::uint64_t seed = base_seed();
  CK_BYTE application[sizeof kCanaryApplication - 1];
  std::memcpy(application, kCanaryApplication, sizeof application);
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};

  const bool multiplex = session_mode() == "multiplex";
  run_threads(
      kCanaryThreads,
      [&](std::size_t t) {
        CanaryCounts& c = counts[t];
        Rng rng(seed + 1000 + t);
        for (long n = 0; n < iterations && Clock::now() < end; ++n) {
          Canary canary{t, n};
          std::string label = canary.label();
          // A multiplexed call may answer CKR_SESSION_COUNT (README: it waits for
          // a backend session at the limit first): the session's checks are then off.
          bool degraded = false;
          auto fail = [&](const char* call, CK_RV code) {
            if (code == CKR_SESSION_COUNT && multiplex) {
              degraded = true;
              ++c.refused;
            } else {
              c.error(std::string(call) + " " + rv_string(code));
            }
          };
          Bytes data(label.begin(), label.end());
          CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
          CK_RV rv =
              p11.C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s);
          if (rv == CKR_SESSION_COUNT) {
            ++c.refused;
            continue;
          }
          if (rv != CKR_OK) {
            c.error("C_OpenSession " + rv_string(rv));
            continue;
          }
          ++c.sessions;
          // Its objects: a data object, a key, sometimes keys returned in the
          // TLS derivation's parameter and an unwrapped key, all labelled.
          CK_OBJECT_CLASS data_class = CKO_DATA;
          CK_ATTRIBUTE tagged[] = {{CKA_LABEL, label.data(), label.size()},
                                   {CKA_APPLICATION, application, sizeof application},
                                   {CKA_CLASS, &data_class, sizeof data_class}};
          CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE, key = CK_INVALID_HANDLE;
          if ((rv = p11.C_CreateObject(s, tagged, 3, &obj)) != CKR_OK) fail("C_CreateObject", rv);
          CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
          if ((rv = p11.C_GenerateKey(s, &gen, tagged, 2, &key)) != CKR_OK)
            fail("C_GenerateKey", rv);
          unsigned long own_objects = 2;
          if (rng.chance(30)) {
            test::KeyMaterialDerive tls;
            if ((rv = p11.C_DeriveKey(s, &tls.mechanism, key, tagged, 2, nullptr)) == CKR_OK)
              own_objects += 4;
            else
              fail("C_DeriveKey", rv);
          }
          if (rng.chance(20)) {
            CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
            CK_BYTE wrapped[32] = {};
            CK_OBJECT_HANDLE unwrapped = CK_INVALID_HANDLE;
            if ((rv = p11.C_UnwrapKey(s, &wrap, key, wrapped, sizeof wrapped, tagged, 2,
                                      &unwrapped)) == CKR_OK)
              ++own_objects;
            else
              fail("C_UnwrapKey", rv);
          }
          // Its operations: a fresh session has none active.
          rv = p11.C_DigestInit(s, &sha);
          if (rv == CKR_OPERATION_ACTIVE)
            ++c.inherited_operation;
          else if (rv != CKR_OK)
            fail("C_DigestInit", rv);
          bool digesting = rv == CKR_OK;
          if (digesting && (rv = p11.C_DigestUpdate(s, data.data(), data.size())) != CKR_OK)
            fail("C_DigestUpdate", rv);
          rv = p11.C_SignInit(s, &mac, key);
          if (rv == CKR_OPERATION_ACTIVE)
            ++c.inherited_operation;
          else if (rv != CKR_OK)
            fail("C_SignInit", rv);
          if (rv == CKR_OK) {
            CK_BYTE sig[MOCK_DIGEST_LEN];
            CK_ULONG len = sizeof sig;
            if ((rv = p11.C_Sign(s, data.data(), data.size(), sig, &len)) != CKR_OK) {
              fail("C_Sign", rv);
            } else if ((rv = p11.C_VerifyInit(s, &mac, key)) == CKR_OK) {
              // The signature is of its own data with its own key.
              rv = p11.C_Verify(s, data.data(), data.size(), sig, len);
              if (rv == CKR_SIGNATURE_INVALID)
                ++c.wrong;
              else if (rv != CKR_OK)
                fail("C_Verify", rv);
            } else if (rv == CKR_OPERATION_ACTIVE) {
              ++c.inherited_operation;
            } else {
              fail("C_VerifyInit", rv);
            }
          }
          // Its view of the objects: its own, never one of a session already closed.
          std::array<long, kCanaryThreads> closed_before;
          for (std::size_t i = 0; i < kCanaryThreads; ++i) closed_before[i] = closed[i].load();
          CK_ATTRIBUTE find[] = {{CKA_APPLICATION, application, sizeof application}};
          unsigned long own_found = 0;
          if ((rv = p11.C_FindObjectsInit(s, find, 1)) != CKR_OK) {
            fail("C_FindObjectsInit", rv);
          } else {
            std::vector<CK_OBJECT_HANDLE> found(512);
            CK_ULONG count = 0;
            if ((rv = p11.C_FindObjects(s, found.data(), found.size(), &count)) != CKR_OK)
              fail("C_FindObjects", rv);
            p11.C_FindObjectsFinal(s);
            for (CK_ULONG k = 0; k < count; ++k) {
              char text[64] = {};
              CK_ATTRIBUTE get{CKA_LABEL, text, sizeof text - 1};
              rv = p11.C_GetAttributeValue(s, found[k], &get, 1);
              if (rv == CKR_OBJECT_HANDLE_INVALID) continue;  // its session closed meanwhile
              if (rv != CKR_OK) {
                fail("C_GetAttributeValue", rv);
                continue;
              }
              unsigned long owner = 0;
              long owner_n = 0;
              if (std::sscanf(text, "canary-%lu-%ld", &owner, &owner_n) != 2 ||
                  owner >= kCanaryThreads) {
                ++c.wrong;
                continue;
              }
              if (owner == t && owner_n == n)
                ++own_found;
              else if (owner_n <= closed_before[owner])
                ++c.foreign_object;
            }
          }
          // Its own, by a search of its label (the search above may be cut short
          // when objects leak).
          CK_ATTRIBUTE own[] = {{CKA_APPLICATION, application, sizeof application},
                                {CKA_LABEL, label.data(), label.size()}};
          if ((rv = p11.C_FindObjectsInit(s, own, 2)) != CKR_OK) {
            fail("C_FindObjectsInit", rv);
          } else {
            std::vector<CK_OBJECT_HANDLE> found(64);
            CK_ULONG count = 0;
            if ((rv = p11.C_FindObjects(s, found.data(), found.size(), &count)) != CKR_OK)
              fail("C_FindObjects", rv);
            p11.C_FindObjectsFinal(s);
            if (!degraded && (count != own_objects || own_found > own_objects)) ++c.own_missing;
          }
          // End the digest, or leave it in error (the bender keeps it active).
          if (digesting) {
            if (rng.chance(40)) {
              if ((rv = p11.C_DigestKey(s, 0x7fff0000 + t)) != CKR_KEY_HANDLE_INVALID &&
                  rv != CKR_OBJECT_HANDLE_INVALID)
                fail("C_DigestKey", rv);
            } else {
              CK_BYTE d[MOCK_DIGEST_LEN], expected[MOCK_DIGEST_LEN];
              CK_ULONG len = sizeof d;
              bender.reference_digest(data.data(), data.size(), expected);
              if ((rv = p11.C_DigestFinal(s, d, &len)) != CKR_OK)
                fail("C_DigestFinal", rv);
              else if (len != sizeof d || std::memcmp(d, expected, sizeof d) != 0)
                ++c.wrong;
            }
          }
          if ((rv = p11.C_CloseSession(s)) != CKR_OK) fail("C_CloseSession", rv);
          closed[t].store(n);
        }
      },
      "canary");

  // Every virtual session is closed: the backend holds no object of any.
  MockStats live = mock_stats(bender);
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
  MockStats s = mock_stats(bender);
  CanaryCounts all;
  for (const auto& c : counts) all.merge(c);
  std::printf(
      "FIGURES canary spec-bender mode=%s: sessions=%lu refused=%lu inherited_operation=%lu "
      "foreign_object=%lu own_missing=%lu wrong=%lu errors=%lu session_objects_left=%lu "
      "backend_peak=%lu limit=%lu ops_kept=%lu handles_reused=%lu key_mat_keys=%lu\n",
      session_mode().c_str(), all.sessions, all.refused, all.inherited_operation,
      all.foreign_object, all.own_missing, all.wrong, all.other_error, live.session_objects,
      s.sessions_open_peak, kLimit, s.bend_ops_kept, s.bend_handles_reused, s.bend_key_mat_keys);
  for (const auto& e : all.first_errors) MESSAGE("error: " << e);
  CHECK(all.sessions > 0);
  CHECK(all.inherited_operation == 0);
  CHECK(all.foreign_object == 0);
  CHECK(all.own_missing == 0);
  CHECK(all.wrong == 0);
  CHECK(all.other_error == 0);
  CHECK(live.session_objects == 0);
  CHECK(s.sessions_open_peak <= kLimit);
  CHECK(s.session_violations == 0);
  CHECK(s.sessions_open == 0);
}

// Threads waiting for a session at the pool's limit: C_Finalize and fork()
// do not wait for them (their wait is long: 30 s).
TEST_CASE("spec bender: C_Finalize and fork() are bounded with threads waiting at the limit" *
          doctest::test_suite("spec-bender")) {
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(spec_bender_path());
  ScopedEnv env({{"P11MUX_POOL_MAX_SESSIONS", "2"}, {"P11MUX_POOL_WAIT_MS", "30000"}});
  REQUIRE(spec_bender().reset() == 0);
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  // Two sessions in use hold the limit: each with a digest active, so that
  // it keeps its backend session with [pool] bind = state too.
  std::vector<CK_SESSION_HANDLE> held(2);
  for (auto& h : held) {
    REQUIRE(open_retrying(p11, 0, CKF_SERIAL_SESSION, h) == CKR_OK);
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    REQUIRE(p11.C_DigestInit(h, &sha) == CKR_OK);
  }
  constexpr int kWaiters = 4;
  std::atomic<int> started{0}, returned{0};
  std::vector<std::thread> waiters;
  for (int i = 0; i < kWaiters; ++i)
    waiters.emplace_back([&] {
      ++started;
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (p11.C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK) {
        CK_BYTE buf[8];
        p11.C_GenerateRandom(h, buf, sizeof buf);  // multiplex: the backend session is bound here
      }
      ++returned;
    });
  while (started < kWaiters) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let them reach the wait
  CHECK(returned == 0);  // they do wait (else this test proves nothing)

  auto t0 = Clock::now();
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  double fork_s = std::chrono::duration<double>(Clock::now() - t0).count();
  REQUIRE(child > 0);
  int status = 0;
  ::waitpid(child, &status, 0);

  t0 = Clock::now();
  CHECK(p11.C_Finalize(nullptr) == CKR_OK);
  double finalize_s = std::chrono::duration<double>(Clock::now() - t0).count();
  auto guard = Clock::now() + std::chrono::seconds(60);
  while (returned < kWaiters && Clock::now() < guard)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (returned < kWaiters) hung("threads waiting at the pool limit after C_Finalize");
  for (auto& w : waiters) w.join();
  std::printf("FIGURES spec-bender waiters mode=%s: fork_s=%.3f finalize_s=%.3f\n",
              session_mode().c_str(), fork_s, finalize_s);
  // Liveness bounds, not performance: the waiters' own wait is 30 s and the
  // fork handler's give-up time 3 s.
  CHECK(fork_s < 2.5);
  CHECK(finalize_s < 10.0);
}

#ifdef P11MUX_RELIABILITY_SOFTHSM2
TEST_CASE("stress over SoftHSM2" * doctest::test_suite("softhsm2")) {
  p11test::SoftHsmToken softhsm;  // first: SOFTHSM2_CONF must be set at C_Initialize
  CK_FUNCTION_LIST& p11 = p11mux();
  use_backend(softhsm2_path());
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  CK_SLOT_ID slot = p11test::require_slot_by_label(p11, softhsm.label());
  CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
  REQUIRE(p11.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &setup) ==
          CKR_OK);
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
  REQUIRE(p11.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &setup) ==
          CKR_OK);
  Token token = prepare_token(p11, setup, slot, p11test::kUserPin);
  StressResult r = run_stress(p11, token, scaled(100, 8), std::chrono::seconds(60));
  CHECK(p11.C_CloseSession(setup) == CKR_OK);
  CHECK(p11.C_Finalize(nullptr) == CKR_OK);
  check_and_report("softhsm2-watched", r);
  FaultyStats s = faulty_stats();
  std::printf(
      "FIGURES stress softhsm2-watched backend: calls=%lu max_concurrent=%lu "
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
