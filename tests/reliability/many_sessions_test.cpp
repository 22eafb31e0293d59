// Many virtual sessions over few backend sessions (issue 13): with
// `[pool] bind = state` a virtual session holds a backend session only while
// it has state to keep (an active operation, session objects), so an
// application can keep far more sessions open than the HSM allows.
//   - 1,000 virtual sessions open at once, from 64 threads, over a backend of
//     4 sessions, each thread running sign, digest, find and session-object
//     lifecycles on its sessions with pauses while the state is held: never
//     more than 4 backend sessions, every result right, no operation or
//     object of one virtual session seen in another, the cap on virtual
//     sessions enforced, every backend session closed at C_Finalize. Over
//     the mock announcing 4 sessions (ulMaxSessionCount; it would open a
//     fifth, so the peak it records is a real check), over the faulty module
//     refusing a fifth (the limit learned from CKR_SESSION_COUNT), and over
//     SoftHSM2 behind the faulty module.
//   - The deadlock of the design: N virtual sessions each holding one of the
//     backend's N sessions (an active find or sign), and another thread
//     calling on each of them meanwhile. A virtual session that holds a
//     backend session never waits for the pool, so every call returns, with
//     the answer its own backend session gives; a watchdog fails the test
//     after 30 s (the pool's wait is set to 60 s, so a call that waited for
//     the pool shows as a hang, not as CKR_SESSION_COUNT).
//   - 16 threads sign and verify on ONE virtual session over 4 backend
//     sessions (test suite shared-session, over the mock; and network-hsm,
//     over SoftHSM2 with 0.5 ms per crypto call): every thread finishes.
//   - Logged in, 8 threads with R/O sessions of their own sign with a private
//     key over SoftHSM2 whose C_OpenSession takes 2 ms (network-hsm): the
//     pool never closes the HSM's last session, which would log the
//     application out and lose its object handles.
// Both session modes (ctest sets P11MUX_SESSION_MODE); P11MUX_TEST_SCALE
// scales the rounds.
#include "support.hpp"
#include "workload.hpp"

#include <doctest/doctest.h>

#ifdef P11MUX_RELIABILITY_SOFTHSM2
#include "support/slots.h"
#include "support/softhsm_token.h"
#endif

#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <latch>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace p11mux::reliability {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr std::size_t kThreads = 64;
constexpr std::size_t kVirtualSessions = 1000;
constexpr unsigned long kBackendLimit = 4;

// Sets variables for one scope (P11MUX_* for p11mux's C_Initialize).
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, std::string>> vars) {
    for (const auto& [name, value] : vars) {
      ::setenv(name, value.c_str(), 1);
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

// Fails the test (the process) if not disarmed within `limit`: a deadlock
// must fail, not stall CI until ctest's timeout.
class Watchdog {
 public:
  Watchdog(std::chrono::seconds limit, std::string what)
      : what_(std::move(what)), thread_([this, limit] {
          std::unique_lock lock(mu_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; }))
            hung(what_ + ": still running after " + std::to_string(limit.count()) + " s");
        }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::string what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;  // guarded by mu_
  std::thread thread_;
};

CK_BYTE* bytes(const std::string& s) {
  return reinterpret_cast<CK_BYTE*>(const_cast<char*>(s.data()));
}
CK_BYTE* bytes(const Bytes& b) { return const_cast<CK_BYTE*>(b.data()); }

// A session EC key pair labelled `label` (CKA_TOKEN false: session objects
// that pin the backend session they are made on).
CK_RV session_key_pair(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s, const std::string& label,
                       KeyPair& out) {
  static const CK_BYTE p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_ATTRIBUTE pub[] = {{CKA_TOKEN, &no, sizeof no},
                        {CKA_PRIVATE, &no, sizeof no},
                        {CKA_VERIFY, &yes, sizeof yes},
                        {CKA_EC_PARAMS, const_cast<CK_BYTE*>(p256), sizeof p256},
                        {CKA_LABEL, bytes(label), label.size()}};
  CK_ATTRIBUTE priv[] = {{CKA_TOKEN, &no, sizeof no},
                         {CKA_PRIVATE, &no, sizeof no},
                         {CKA_SENSITIVE, &yes, sizeof yes},
                         {CKA_SIGN, &yes, sizeof yes},
                         {CKA_LABEL, bytes(label), label.size()}};
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  return p11.C_GenerateKeyPair(s, &gen, pub, std::size(pub), priv, std::size(priv), &out.public_key,
                               &out.private_key);
}

// What one thread saw.
struct Counts {
  Tally tally;
  unsigned long wrong = 0;           // a result that is not the right one
  unsigned long foreign_object = 0;  // an object of a closed virtual session found
  unsigned long lifecycles = 0;
  std::vector<std::string> first_wrong;

  void bad(const std::string& what) {
    ++wrong;
    if (first_wrong.size() < 5) first_wrong.push_back(what);
  }
  void merge(const Counts& o) {
    tally.merge(o.tally);
    wrong += o.wrong;
    foreign_object += o.foreign_object;
    lifecycles += o.lifecycles;
    for (const auto& w : o.first_wrong)
      if (first_wrong.size() < 5) first_wrong.push_back(w);
  }
};

// The lifecycles of one thread on its virtual sessions. Every one pauses
// (yields) while its state is held, so that other threads' calls run
// between its calls; a state that crossed virtual sessions would show as a
// wrong digest, a signature that does not verify or a search that finds
// other objects.
class Lifecycles {
 public:
  Lifecycles(CK_FUNCTION_LIST& p11, const Token& token, Counts& c) : p11_(p11), t_(token), c_(c) {}

  bool ok(const char* call, CK_RV rv) { return c_.tally.record(call, rv) && rv == CKR_OK; }

  // ECDSA: SignInit, pause, Sign; verified on the same session.
  void sign(CK_SESSION_HANDLE s, std::size_t m) {
    CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
    const Bytes& data = t_.digests[m];
    if (!ok("C_SignInit", p11_.C_SignInit(s, &ecdsa, t_.key.private_key))) return;
    std::this_thread::yield();
    Bytes sig(256);
    CK_ULONG len = sig.size();
    if (!ok("C_Sign", p11_.C_Sign(s, bytes(data), data.size(), sig.data(), &len))) return;
    verify(s, t_.key.public_key, data, sig, len, "token key");
  }

  // SHA-256 in two parts with a pause between: the digest of the whole.
  void digest(CK_SESSION_HANDLE s, std::size_t m) {
    CK_MECHANISM sha256{CKM_SHA256, nullptr, 0};
    const Bytes& data = t_.messages[m];
    const std::size_t half = data.size() / 2;
    if (!ok("C_DigestInit", p11_.C_DigestInit(s, &sha256))) return;
    if (!ok("C_DigestUpdate", p11_.C_DigestUpdate(s, bytes(data), half))) return;
    std::this_thread::yield();
    if (!ok("C_DigestUpdate", p11_.C_DigestUpdate(s, bytes(data) + half, data.size() - half)))
      return;
    Bytes out(64);
    CK_ULONG len = out.size();
    if (!ok("C_DigestFinal", p11_.C_DigestFinal(s, out.data(), &len))) return;
    out.resize(len);
    if (out != t_.digests[m]) c_.bad("multi-part digest of message " + std::to_string(m));
  }

  // The token key pair by its label, one handle per C_FindObjects, pausing.
  void find(CK_SESSION_HANDLE s) {
    std::vector<CK_OBJECT_HANDLE> found;
    if (!search(s, t_.key_label, found, true)) return;
    bool pub = false, priv = false;
    for (CK_OBJECT_HANDLE h : found) {
      pub = pub || h == t_.key.public_key;
      priv = priv || h == t_.key.private_key;
    }
    if (found.size() != 2 || !pub || !priv)
      c_.bad("search of the key pair found " + std::to_string(found.size()) + " objects");
  }

  // A session data object (and sometimes a session key pair) labelled
  // `label`: created, found, read, used, destroyed, then gone.
  void objects(CK_SESSION_HANDLE s, const std::string& label, bool key_pair, std::size_t m) {
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
    if (!create_data(s, label, obj)) return;
    std::this_thread::yield();
    std::vector<CK_OBJECT_HANDLE> found;
    KeyPair pair;
    if (key_pair) {
      if (!ok("C_GenerateKeyPair", session_key_pair(p11_, s, label, pair))) {
        destroy(s, obj);
        return;
      }
      std::this_thread::yield();
    }
    if (search(s, label, found, false)) {
      std::size_t expected = key_pair ? 3 : 1;
      bool has_obj = false;
      for (CK_OBJECT_HANDLE h : found) has_obj = has_obj || h == obj;
      if (found.size() != expected || !has_obj)
        c_.bad("search of " + label + " found " + std::to_string(found.size()) + " objects");
    }
    char value[64] = {};
    CK_ATTRIBUTE get{CKA_VALUE, value, sizeof value};
    if (ok("C_GetAttributeValue", p11_.C_GetAttributeValue(s, obj, &get, 1)) &&
        std::string(value, get.ulValueLen) != label)
      c_.bad("CKA_VALUE of " + label);
    if (key_pair) {
      CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
      const Bytes& data = t_.digests[m];
      Bytes sig(256);
      CK_ULONG len = sig.size();
      if (ok("C_SignInit", p11_.C_SignInit(s, &ecdsa, pair.private_key)) &&
          ok("C_Sign", p11_.C_Sign(s, bytes(data), data.size(), sig.data(), &len)))
        verify(s, pair.public_key, data, sig, len, "session key " + label);
      destroy(s, pair.public_key);
      destroy(s, pair.private_key);
    }
    destroy(s, obj);
    if (search(s, label, found, false) && !found.empty())
      c_.bad(label + " still found after C_DestroyObject");
  }

  // A data object left on a virtual session that then closes: the new
  // session that replaces it must not find it.
  void close_with_object(CK_SESSION_HANDLE& s, bool rw, const std::string& label) {
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
    if (!create_data(s, label, obj)) return;
    std::this_thread::yield();
    ok("C_CloseSession", p11_.C_CloseSession(s));
    s = CK_INVALID_HANDLE;
    CK_FLAGS flags = CKF_SERIAL_SESSION | (rw ? CKF_RW_SESSION : 0);
    if (!ok("C_OpenSession", p11_.C_OpenSession(t_.slot, flags, nullptr, nullptr, &s))) {
      s = CK_INVALID_HANDLE;
      return;
    }
    std::vector<CK_OBJECT_HANDLE> found;
    if (search(s, label, found, false) && !found.empty()) ++c_.foreign_object;
  }

  // Stateless calls: random and the session's own description.
  void stateless(CK_SESSION_HANDLE s, bool rw) {
    CK_BYTE buf[32];
    ok("C_GenerateRandom", p11_.C_GenerateRandom(s, buf, sizeof buf));
    CK_SESSION_INFO info{};
    if (ok("C_GetSessionInfo", p11_.C_GetSessionInfo(s, &info)) &&
        (info.slotID != t_.slot || ((info.flags & CKF_RW_SESSION) != 0) != rw))
      c_.bad("C_GetSessionInfo: slot or R/W flag of another session");
  }

 private:
  bool create_data(CK_SESSION_HANDLE s, const std::string& label, CK_OBJECT_HANDLE& out) {
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE attrs[] = {{CKA_CLASS, &cls, sizeof cls},
                            {CKA_TOKEN, &no, sizeof no},
                            {CKA_PRIVATE, &no, sizeof no},  // no login in this test
                            {CKA_LABEL, bytes(label), label.size()},
                            {CKA_VALUE, bytes(label), label.size()}};
    return ok("C_CreateObject", p11_.C_CreateObject(s, attrs, std::size(attrs), &out));
  }

  void destroy(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h) {
    ok("C_DestroyObject", p11_.C_DestroyObject(s, h));
  }

  bool search(CK_SESSION_HANDLE s, const std::string& label, std::vector<CK_OBJECT_HANDLE>& out,
              bool pause) {
    out.clear();
    CK_ATTRIBUTE templ[] = {{CKA_LABEL, bytes(label), label.size()}};
    if (!ok("C_FindObjectsInit", p11_.C_FindObjectsInit(s, templ, 1))) return false;
    bool good = true;
    for (int i = 0; i < 16; ++i) {
      CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
      CK_ULONG n = 0;
      if (!ok("C_FindObjects", p11_.C_FindObjects(s, &h, 1, &n))) {
        good = false;
        break;
      }
      if (n == 0) break;
      out.push_back(h);
      if (pause) std::this_thread::yield();
    }
    return ok("C_FindObjectsFinal", p11_.C_FindObjectsFinal(s)) && good;
  }

  void verify(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE pub, const Bytes& data, Bytes& sig,
              CK_ULONG len, const std::string& what) {
    CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
    if (!ok("C_VerifyInit", p11_.C_VerifyInit(s, &ecdsa, pub))) return;
    CK_RV rv = p11_.C_Verify(s, bytes(data), data.size(), sig.data(), len);
    if (rv == CKR_SIGNATURE_INVALID) {
      c_.bad("signature with the " + what + " does not verify");
      return;
    }
    ok("C_Verify", rv);
  }

  CK_FUNCTION_LIST& p11_;
  const Token& t_;
  Counts& c_;
};

// The backend as the test sees it: its own count of sessions.
struct BackendView {
  std::string name;
  std::function<unsigned long()> open_now;  // backend sessions open now
  std::function<unsigned long()> peak;      // most open at once
  std::function<unsigned long()> opened;    // backend sessions opened in all
  std::function<void()> check_finalized;    // after C_Finalize: every session closed by p11mux
};

Token prepare_token(CK_FUNCTION_LIST& p11, CK_SLOT_ID slot, std::string pin) {
  Token t;
  t.slot = slot;
  t.user_pin = std::move(pin);
  t.key_label = "many-sessions-key";
  CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
  REQUIRE(p11.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &setup) ==
          CKR_OK);
  t.key = make_sign_key(p11, setup, t.key_label.c_str(), true);
  for (int i = 0; i < 8; ++i) {
    Bytes m;
    for (int j = 0; j <= i * 11 + 1; ++j) m.push_back(static_cast<CK_BYTE>(i * 37 + j));
    t.messages.push_back(m);
  }
  compute_digests(p11, setup, t);
  REQUIRE(p11.C_CloseSession(setup) == CKR_OK);
  return t;
}

// p11mux is initialized over the backend; `slot` found by the caller.
// Opens kVirtualSessions from kThreads threads, all open at once, runs
// `rounds` lifecycles per thread, closes them, finalizes, checks.
void many_sessions(const BackendView& backend, const Token& token, long rounds) {
  CK_FUNCTION_LIST& p11 = p11mux();
  std::vector<Counts> counts(kThreads);
  std::latch all_open(static_cast<std::ptrdiff_t>(kThreads));
  std::latch checked(1);
  std::atomic<unsigned long> opened{0};
  CK_RV extra_open_rv = CKR_OK;
  double extra_open_seconds = 0;
  CK_TOKEN_INFO info_at_peak{};
  CK_RV info_rv = CKR_OK;
  unsigned long backend_open_at_peak = 0;
  const std::uint64_t seed = base_seed();
  const auto start = Clock::now();
  run_threads(
      kThreads,
      [&](std::size_t t) {
        Counts& c = counts[t];
        Lifecycles life(p11, token, c);
        Rng rng(seed + 7000 + t);
        // Thread t's virtual sessions: numbers t, t + 64, ... below 1000.
        struct Mine {
          CK_SESSION_HANDLE handle;
          bool rw;
          std::size_t number;
        };
        std::vector<Mine> mine;
        for (std::size_t n = t; n < kVirtualSessions; n += kThreads) {
          Mine s{CK_INVALID_HANDLE, n % 2 == 0, n};
          CK_FLAGS flags = CKF_SERIAL_SESSION | (s.rw ? CKF_RW_SESSION : 0);
          if (life.ok("C_OpenSession",
                      p11.C_OpenSession(token.slot, flags, nullptr, nullptr, &s.handle))) {
            mine.push_back(s);
            ++opened;
          }
        }
        all_open.arrive_and_wait();
        if (t == 0) {
          // 1,000 open at once, over at most 4 backend sessions; the token
          // counts the application's sessions; the cap refuses one more at once.
          backend_open_at_peak = backend.open_now();
          info_rv = p11.C_GetTokenInfo(token.slot, &info_at_peak);
          CK_SESSION_HANDLE extra = CK_INVALID_HANDLE;
          auto before = Clock::now();
          extra_open_rv =
              p11.C_OpenSession(token.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &extra);
          extra_open_seconds = std::chrono::duration<double>(Clock::now() - before).count();
          if (extra_open_rv == CKR_OK) p11.C_CloseSession(extra);
          checked.count_down();
        }
        checked.wait();
        if (mine.empty()) return;
        for (long r = 0; r < rounds; ++r) {
          Mine& s = mine[rng.below(mine.size())];
          if (s.handle == CK_INVALID_HANDLE) continue;
          std::size_t m = rng.below(token.messages.size());
          std::string label = "many-" + std::to_string(s.number) + "-" + std::to_string(t) + "-" +
                              std::to_string(r);
          auto pick = rng.below(100);
          if (pick < 25) {
            life.sign(s.handle, m);
          } else if (pick < 45) {
            life.digest(s.handle, m);
          } else if (pick < 60) {
            life.find(s.handle);
          } else if (pick < 80) {
            life.objects(s.handle, label, rng.chance(25), m);
          } else if (pick < 85) {
            life.close_with_object(s.handle, s.rw, label);
          } else {
            life.stateless(s.handle, s.rw);
          }
          ++c.lifecycles;
        }
        for (const Mine& s : mine)
          if (s.handle != CK_INVALID_HANDLE)
            life.ok("C_CloseSession", p11.C_CloseSession(s.handle));
      },
      "many sessions");
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  Counts all;
  for (const auto& c : counts) all.merge(c);
  // Every virtual session is closed: no session object of any is left.
  const unsigned long backend_open_idle = backend.open_now();
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
  const unsigned long peak = backend.peak();
  std::printf(
      "FIGURES many-sessions %s mode=%s: virtual=%lu threads=%zu lifecycles=%lu calls=%lu "
      "backend_peak=%lu limit=%lu backend_open_with_all_idle=%lu backend_opened=%lu wrong=%lu "
      "foreign_object=%lu seconds=%.2f\n",
      backend.name.c_str(), session_mode().c_str(), opened.load(), kThreads, all.lifecycles,
      all.tally.calls(), peak, kBackendLimit, backend_open_at_peak, backend.opened(), all.wrong,
      all.foreign_object, seconds);
  MESSAGE(backend.name << " (" << session_mode() << "): " << all.tally.summary());
  for (const auto& u : all.tally.unexpected()) MESSAGE("unexpected: " << u);
  for (const auto& w : all.first_wrong) MESSAGE("wrong: " << w);
  CHECK(opened.load() == kVirtualSessions);
  CHECK(all.tally.unexpected_count() == 0);
  CHECK(all.wrong == 0);
  CHECK(all.foreign_object == 0);
  CHECK(all.lifecycles > 0);
  CHECK(peak <= kBackendLimit);
  CHECK(backend_open_at_peak <= kBackendLimit);
  CHECK(backend_open_idle <= kBackendLimit);
  // ulSessionCount counts the application's virtual sessions (issue 13).
  CHECK(info_rv == CKR_OK);
  CHECK(info_at_peak.ulSessionCount == kVirtualSessions);
  // [pool] max_virtual_sessions is kVirtualSessions: one more is refused at
  // once, without the pool's wait.
  CHECK(extra_open_rv == CKR_SESSION_COUNT);
  CHECK(extra_open_seconds < 5.0);
  backend.check_finalized();
}

// bind = state, the cap at exactly the sessions the test opens, and a long
// wait at the backend's limit: a call that gets CKR_SESSION_COUNT has waited
// 30 s, far longer than any lifecycle holds a backend session.
ScopedEnv many_sessions_env() {
  return ScopedEnv({{"P11MUX_POOL_BIND", "state"},
                    {"P11MUX_POOL_MAX_VIRTUAL_SESSIONS", std::to_string(kVirtualSessions)},
                    {"P11MUX_POOL_WAIT_MS", "30000"}});
}

BackendView mock_view(const char* name) {
  return {name, [] { return mock_stats().sessions_open; },
          [] { return mock_stats().sessions_open_peak; },
          [] { return mock_stats().sessions_opened_total; },
          [] {
            MockStats s = mock_stats();
            CHECK(s.session_violations == 0);
            CHECK(s.sessions_open == 0);
            CHECK(s.sessions_closed_by_finalize == 0);
            CHECK(s.sessions_opened_total == s.sessions_closed_total);
            CHECK(s.session_objects == 0);
          }};
}

BackendView faulty_view(const char* name) {
  return {name, [] { return faulty_stats().sessions_open; },
          [] { return faulty_stats().max_sessions_open; },
          [] { return faulty_stats().sessions_opened; },
          [] {
            FaultyStats s = faulty_stats();
            std::printf("FIGURES many-sessions backend: refused=%lu\n", s.session_count_refusals);
            CHECK(s.session_violations == 0);
            CHECK(s.finalize_during_call == 0);
            CHECK(s.sessions_open_at_finalize == 0);
            CHECK(s.sessions_opened == s.sessions_closed + s.sessions_closed_all);
          }};
}

// The faulty module over `target`, refusing a fifth session; no latency
// unless `open_us` (a network HSM's round trip in C_OpenSession) or
// `crypto_us` (in every crypto call, C_SignInit included).
void faulty_limit(const char* target, unsigned long open_us = 0, unsigned long crypto_us = 0) {
  use_backend(faulty_path());
  REQUIRE(faulty().reset() == 0);
  FaultyConfig c{};
  std::snprintf(c.target, sizeof c.target, "%s", target);
  c.seed = base_seed();
  c.max_sessions = kBackendLimit;
  c.open_session_us = open_us;
  c.crypto_us = crypto_us;
  REQUIRE(faulty().configure(&c) == 0);
}

TEST_CASE("1,000 virtual sessions from 64 threads over a backend that announces 4 sessions" *
          doctest::test_suite("mock")) {
  auto env = many_sessions_env();
  use_backend(mock_path());
  REQUIRE(mock().reset() == 0);
  // ulMaxSessionCount 4, and no refusal of a fifth: a fifth backend session
  // would be opened and show in the peak.
  MockConfig c{};
  c.token_max_session_count = kBackendLimit;
  REQUIRE(mock().configure(&c) == 0);
  CK_FUNCTION_LIST& p11 = p11mux();
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  Token token = prepare_token(p11, 0, MOCK_USER_PIN);
  many_sessions(mock_view("mock"), token, scaled(100, 20));
}

TEST_CASE("1,000 virtual sessions from 64 threads over a backend that refuses a fifth session" *
          doctest::test_suite("mock")) {
  auto env = many_sessions_env();
  REQUIRE(mock().reset() == 0);
  MockConfig m{};
  m.accept_locking = MOCK_LOCK_OS;
  REQUIRE(mock().configure(&m) == 0);
  faulty_limit(mock_path());
  CK_FUNCTION_LIST& p11 = p11mux();
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  Token token = prepare_token(p11, 0, MOCK_USER_PIN);
  many_sessions(faulty_view("faulty-mock"), token, scaled(60, 12));
  CHECK(mock_stats().sessions_open == 0);
}

// 16 threads sign and verify on ONE virtual session over a backend of 4
// sessions (what p11mux-load --sessions shared does in scripts/bench.sh,
// section capacity). An Init that finds an operation under way answers
// CKR_OPERATION_ACTIVE and the thread tries again; once it succeeds, the
// thread's C_Sign or C_Verify must find its operation (in multiplex mode a
// thread's operation is its own). Every thread must finish: an operation no
// thread can reach stays active on its backend session for good, and once
// all 4 carry one every Init answers CKR_OPERATION_ACTIVE forever (the
// watchdog). p11mux is initialized over the backend by the caller.
void shared_signers(const Token& token, const BackendView& backend, long rounds) {
  constexpr std::size_t kSigners = 16;
  CK_FUNCTION_LIST& p11 = p11mux();
  CK_SESSION_HANDLE shared = CK_INVALID_HANDLE;
  REQUIRE(p11.C_OpenSession(token.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &shared) == CKR_OK);
  std::vector<Counts> counts(kSigners);
  std::atomic<unsigned long> collisions{0};
  {
    Watchdog watchdog(30s, "16 threads signing on one virtual session");
    run_threads(
        kSigners,
        [&](std::size_t t) {
          Counts& cnt = counts[t];
          CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
          auto init = [&](const char* call, auto&& f) {
            CK_RV rv;
            while ((rv = f()) == CKR_OPERATION_ACTIVE) {
              ++collisions;
              std::this_thread::yield();
            }
            return cnt.tally.record(call, rv) && rv == CKR_OK;
          };
          for (long r = 0; r < rounds; ++r) {
            const Bytes& data =
                token.digests[(t + static_cast<std::size_t>(r)) % token.digests.size()];
            if (!init("C_SignInit",
                      [&] { return p11.C_SignInit(shared, &ecdsa, token.key.private_key); }))
              continue;
            CK_BYTE sig[256];
            CK_ULONG len = sizeof sig;
            CK_RV rv = p11.C_Sign(shared, bytes(data), data.size(), sig, &len);
            if (!cnt.tally.record("C_Sign", rv) || rv != CKR_OK) continue;
            if (!init("C_VerifyInit",
                      [&] { return p11.C_VerifyInit(shared, &ecdsa, token.key.public_key); }))
              continue;
            rv = p11.C_Verify(shared, bytes(data), data.size(), sig, len);
            if (rv == CKR_SIGNATURE_INVALID) {
              cnt.bad("a signature of other data");
              continue;
            }
            if (!cnt.tally.record("C_Verify", rv) || rv != CKR_OK) continue;
            ++cnt.lifecycles;
          }
        },
        "shared-session signers");
  }
  CHECK(p11.C_CloseSession(shared) == CKR_OK);
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
  Counts all;
  for (const auto& cnt : counts) all.merge(cnt);
  const unsigned long peak = backend.peak();
  std::printf(
      "FIGURES many-sessions shared-session signers %s mode=%s: threads=%zu signatures=%lu "
      "collisions=%lu backend_peak=%lu\n",
      backend.name.c_str(), session_mode().c_str(), kSigners, all.lifecycles, collisions.load(),
      peak);
  MESSAGE("shared-session signers (" << session_mode() << "): " << all.tally.summary());
  for (const auto& u : all.tally.unexpected()) MESSAGE("unexpected: " << u);
  for (const auto& w : all.first_wrong) MESSAGE("wrong: " << w);
  CHECK(all.tally.unexpected_count() == 0);
  CHECK(all.wrong == 0);
  CHECK(all.lifecycles == kSigners * static_cast<unsigned long>(rounds));
  CHECK(peak <= kBackendLimit);
  backend.check_finalized();
}

TEST_CASE("16 threads sign on one virtual session over a backend of 4 sessions" *
          doctest::test_suite("shared-session")) {
  ScopedEnv env({{"P11MUX_POOL_BIND", "state"}, {"P11MUX_POOL_WAIT_MS", "30000"}});
  use_backend(mock_path());
  REQUIRE(mock().reset() == 0);
  MockConfig c{};
  c.token_max_session_count = kBackendLimit;
  c.call_spin_us = 50;  // calls linger, so that they overlap
  REQUIRE(mock().configure(&c) == 0);
  CK_FUNCTION_LIST& p11 = p11mux();
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  shared_signers(prepare_token(p11, 0, MOCK_USER_PIN), mock_view("mock"), scaled(100, 20));
}

#ifdef P11MUX_RELIABILITY_SOFTHSM2
TEST_CASE("1,000 virtual sessions from 64 threads over SoftHSM2 that refuses a fifth session" *
          doctest::test_suite("softhsm2")) {
  p11test::SoftHsmToken softhsm;
  auto env = many_sessions_env();
  faulty_limit(softhsm2_path());
  CK_FUNCTION_LIST& p11 = p11mux();
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  Token token =
      prepare_token(p11, p11test::require_slot_by_label(p11, softhsm.label()), p11test::kUserPin);
  many_sessions(faulty_view("faulty-softhsm2"), token, scaled(40, 8));
}

// What p11mux-load does on a network HSM (scripts/bench.sh, section
// capacity): log in on an R/W session, then threads each with an R/O session
// of their own sign with a private token key. SoftHSM2 logs the application
// out, and forgets its object handles, when its last session closes
// (docs/pkcs11-facts.md, "Object handles"): the pool must never close the
// last backend session while the application has sessions open, not even to
// trade the idle R/W one for an R/O one at the limit while the new sessions
// are still on their way (C_OpenSession takes 2 ms here, as on a network HSM).
TEST_CASE(
    "logged in over a network HSM that refuses a fifth session, 8 threads sign with a private key" *
    doctest::test_suite("network-hsm")) {
  p11test::SoftHsmToken softhsm;
  ScopedEnv env({{"P11MUX_POOL_BIND", "state"}, {"P11MUX_POOL_WAIT_MS", "30000"}});
  faulty_limit(softhsm2_path(), 2000);
  CK_FUNCTION_LIST& p11 = p11mux();
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  const CK_SLOT_ID slot = p11test::require_slot_by_label(p11, softhsm.label());
  CK_SESSION_HANDLE setup = CK_INVALID_HANDLE;
  REQUIRE(p11.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &setup) ==
          CKR_OK);
  std::string pin = p11test::kUserPin;
  REQUIRE(p11.C_Login(setup, CKU_USER, bytes(pin), pin.size()) == CKR_OK);
  static const CK_BYTE p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE pub[] = {{CKA_TOKEN, &yes, sizeof yes},
                        {CKA_VERIFY, &yes, sizeof yes},
                        {CKA_EC_PARAMS, const_cast<CK_BYTE*>(p256), sizeof p256}};
  CK_ATTRIBUTE priv[] = {
      {CKA_TOKEN, &yes, sizeof yes}, {CKA_PRIVATE, &yes, sizeof yes}, {CKA_SIGN, &yes, sizeof yes}};
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  KeyPair key;
  REQUIRE(p11.C_GenerateKeyPair(setup, &gen, pub, std::size(pub), priv, std::size(priv),
                                &key.public_key, &key.private_key) == CKR_OK);
  constexpr std::size_t kSigners = 8;
  const long rounds = scaled(40, 8);
  std::vector<Counts> counts(kSigners);
  run_threads(
      kSigners,
      [&](std::size_t t) {
        Counts& c = counts[t];
        CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
        CK_RV rv = p11.C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
        if (!c.tally.record("C_OpenSession", rv) || rv != CKR_OK) return;
        CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
        CK_BYTE hash[32];
        for (std::size_t i = 0; i < sizeof hash; ++i) hash[i] = static_cast<CK_BYTE>(t + i);
        for (long r = 0; r < rounds; ++r) {
          CK_BYTE sig[128];
          CK_ULONG len = sizeof sig;
          rv = p11.C_SignInit(s, &ecdsa, key.private_key);
          if (!c.tally.record("C_SignInit", rv) || rv != CKR_OK) continue;
          rv = p11.C_Sign(s, hash, sizeof hash, sig, &len);
          if (!c.tally.record("C_Sign", rv) || rv != CKR_OK) continue;
          rv = p11.C_VerifyInit(s, &ecdsa, key.public_key);
          if (!c.tally.record("C_VerifyInit", rv) || rv != CKR_OK) continue;
          rv = p11.C_Verify(s, hash, sizeof hash, sig, len);
          if (rv == CKR_SIGNATURE_INVALID) c.bad("signature does not verify");
          c.tally.record("C_Verify", rv);
        }
        c.tally.record("C_CloseSession", p11.C_CloseSession(s));
      },
      "logged-in signers");
  Counts all;
  for (const auto& c : counts) all.merge(c);
  MESSAGE("logged-in signers (" << session_mode() << "): " << all.tally.summary());
  for (const auto& u : all.tally.unexpected()) MESSAGE("unexpected: " << u);
  CHECK(all.tally.unexpected_count() == 0);
  CHECK(all.wrong == 0);
  CHECK(p11.C_DestroyObject(setup, key.private_key) == CKR_OK);
  CHECK(p11.C_DestroyObject(setup, key.public_key) == CKR_OK);
  CHECK(p11.C_CloseSession(setup) == CKR_OK);
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
  FaultyStats st = faulty_stats();
  std::printf(
      "FIGURES many-sessions logged-in signers mode=%s: calls=%lu backend_peak=%lu "
      "backend_opened=%lu refused=%lu\n",
      session_mode().c_str(), all.tally.calls(), st.max_sessions_open, st.sessions_opened,
      st.session_count_refusals);
  CHECK(st.sessions_open_at_finalize == 0);
}

// SoftHSM2 runs one operation at a time per session (a sign under way makes
// C_VerifyInit answer CKR_OPERATION_ACTIVE), unlike the mock; each crypto
// call takes 0.5 ms, as on the slow backend (a network HSM).
TEST_CASE("16 threads sign on one virtual session over a network HSM that refuses a fifth session" *
          doctest::test_suite("network-hsm")) {
  p11test::SoftHsmToken softhsm;
  ScopedEnv env({{"P11MUX_POOL_BIND", "state"}, {"P11MUX_POOL_WAIT_MS", "30000"}});
  faulty_limit(softhsm2_path(), 0, 500);
  CK_FUNCTION_LIST& p11 = p11mux();
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  shared_signers(
      prepare_token(p11, p11test::require_slot_by_label(p11, softhsm.label()), p11test::kUserPin),
      faulty_view("faulty-softhsm2"), scaled(20, 5));
}
#endif

// ---- the deadlock: N sessions each holding one of N, each wanted again ----

// N virtual sessions; in each round, thread A[i] starts an operation on
// session i (a find or an ECDSA sign: session i now holds a backend session,
// and together they hold all N) and continues it (one handle of the search,
// or a length query; each backend call lingers 2 ms in the mock) while
// thread B[i] calls on session i too: random, a digest, a search, its
// description. In multiplex mode B[i]'s call would want a backend session of
// its own, and none is left: it must run on the one session i holds, and get
// the answer that backend session gives (asked beforehand, single-threaded).
// A finishes its operation once B is done.
TEST_CASE("N virtual sessions each holding one of N backend sessions, each called again" *
          doctest::test_suite("mock")) {
  constexpr std::size_t kN = kBackendLimit;
  ScopedEnv env({{"P11MUX_POOL_BIND", "state"}, {"P11MUX_POOL_WAIT_MS", "60000"}});
  use_backend(mock_path());
  REQUIRE(mock().reset() == 0);
  MockConfig c{};
  c.token_max_session_count = kN;  // announced; a session beyond it would show in the peak
  REQUIRE(mock().configure(&c) == 0);
  CK_FUNCTION_LIST& p11 = p11mux();
  REQUIRE(p11.C_Initialize(os_locking()) == CKR_OK);
  Token token = prepare_token(p11, 0, MOCK_USER_PIN);
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CK_MECHANISM sha256{CKM_SHA256, nullptr, 0};
  CK_ATTRIBUTE by_label[] = {{CKA_LABEL, bytes(token.key_label), token.key_label.size()}};

  // What the backend answers B's Init calls on a session where A's find or
  // sign is active: asked once, on one session, single-threaded.
  struct Reference {
    CK_RV digest_init, find_init;
  };
  auto reference = [&](bool find) {
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    REQUIRE(p11.C_OpenSession(token.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s) == CKR_OK);
    if (find)
      REQUIRE(p11.C_FindObjectsInit(s, by_label, 1) == CKR_OK);
    else
      REQUIRE(p11.C_SignInit(s, &ecdsa, token.key.private_key) == CKR_OK);
    Reference r{p11.C_DigestInit(s, &sha256), p11.C_FindObjectsInit(s, by_label, 1)};
    REQUIRE(p11.C_CloseSession(s) == CKR_OK);
    return r;
  };
  const std::array<Reference, 2> expected = {reference(false), reference(true)};

  std::vector<CK_SESSION_HANDLE> sessions(kN);
  for (auto& s : sessions)
    REQUIRE(p11.C_OpenSession(token.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s) == CKR_OK);
  // Every call lingers in the backend, so B's calls land while A's are inside.
  MockConfig slow = c;
  slow.call_spin_us = 2000;
  REQUIRE(mock().configure(&slow) == 0);

  const long rounds = scaled(40, 10);
  std::barrier sync(static_cast<std::ptrdiff_t>(2 * kN));
  std::vector<std::atomic<int>> a_inside(kN);
  std::vector<Counts> counts(2 * kN);
  std::atomic<unsigned long> overlapped{0};
  {
    Watchdog watchdog(30s, "N sessions each holding one of N backend sessions");
    run_threads(
        2 * kN,
        [&](std::size_t t) {
          const std::size_t i = t % kN;
          const CK_SESSION_HANDLE s = sessions[i];
          Counts& cnt = counts[t];
          auto ok = [&](const char* call, CK_RV rv, RvSet allowed = {}) {
            return cnt.tally.record(call, rv, allowed) && rv == CKR_OK;
          };
          for (long r = 0; r < rounds; ++r) {
            const bool find = (r + static_cast<long>(i)) % 2 == 0;
            if (t < kN) {  // A[i]
              CK_RV init = find ? p11.C_FindObjectsInit(s, by_label, 1)
                                : p11.C_SignInit(s, &ecdsa, token.key.private_key);
              const bool held = ok(find ? "A C_FindObjectsInit" : "A C_SignInit", init);
              sync.arrive_and_wait();  // all N hold their backend session; B starts
              // A continues its operation while B calls; the operation stays
              // active until B is done (one handle of two; a length query).
              std::array<CK_OBJECT_HANDLE, 4> found{};
              CK_ULONG n = 0, len = 0;
              const Bytes& data = token.digests[static_cast<std::size_t>(r) % token.digests.size()];
              if (held) {
                a_inside[i] = 1;
                CK_RV rv = find ? p11.C_FindObjects(s, found.data(), 1, &n)
                                : p11.C_Sign(s, bytes(data), data.size(), nullptr, &len);
                a_inside[i] = 0;
                ok(find ? "A C_FindObjects" : "A C_Sign (length)", rv);
              }
              sync.arrive_and_wait();  // B is done
              if (!held) continue;
              if (find) {
                CK_ULONG more = 0;
                if (ok("A C_FindObjects", p11.C_FindObjects(s, found.data() + n, 3, &more)) &&
                    n + more != 2)
                  cnt.bad("A's search found " + std::to_string(n + more));
                ok("A C_FindObjectsFinal", p11.C_FindObjectsFinal(s));
              } else {
                Bytes sig(256);
                len = sig.size();
                if (ok("A C_Sign", p11.C_Sign(s, bytes(data), data.size(), sig.data(), &len)) &&
                    ok("A C_VerifyInit", p11.C_VerifyInit(s, &ecdsa, token.key.public_key))) {
                  CK_RV rv = p11.C_Verify(s, bytes(data), data.size(), sig.data(), len);
                  if (rv == CKR_SIGNATURE_INVALID)
                    cnt.bad("A's signature does not verify");
                  else
                    ok("A C_Verify", rv);
                }
              }
            } else {  // B[i]
              sync.arrive_and_wait();
              const Reference& ref = expected[find ? 1 : 0];
              std::this_thread::sleep_for(200us);  // A is inside its 2 ms call by now, mostly
              if (a_inside[i] != 0) ++overlapped;
              CK_BYTE buf[16];
              ok("B C_GenerateRandom", p11.C_GenerateRandom(s, buf, sizeof buf));
              CK_RV rv = p11.C_DigestInit(s, &sha256);
              if (rv != ref.digest_init)
                cnt.bad("B C_DigestInit " + rv_string(rv) + ", the backend says " +
                        rv_string(ref.digest_init));
              cnt.tally.record("B C_DigestInit", rv, {ref.digest_init});
              if (rv == CKR_OK) {
                const Bytes& m = token.messages[i % token.messages.size()];
                Bytes out(64);
                CK_ULONG len = out.size();
                if (ok("B C_Digest", p11.C_Digest(s, bytes(m), m.size(), out.data(), &len))) {
                  out.resize(len);
                  if (out != token.digests[i % token.digests.size()]) cnt.bad("B's digest");
                }
              }
              rv = p11.C_FindObjectsInit(s, by_label, 1);
              if (rv != ref.find_init)
                cnt.bad("B C_FindObjectsInit " + rv_string(rv) + ", the backend says " +
                        rv_string(ref.find_init));
              cnt.tally.record("B C_FindObjectsInit", rv, {ref.find_init});
              if (rv == CKR_OK) {
                std::array<CK_OBJECT_HANDLE, 4> found{};
                CK_ULONG n = 0;
                if (ok("B C_FindObjects", p11.C_FindObjects(s, found.data(), found.size(), &n)) &&
                    n != 2)
                  cnt.bad("B's search found " + std::to_string(n));
                ok("B C_FindObjectsFinal", p11.C_FindObjectsFinal(s));
              }
              CK_SESSION_INFO info{};
              ok("B C_GetSessionInfo", p11.C_GetSessionInfo(s, &info));
              sync.arrive_and_wait();
            }
          }
        },
        "deadlock");
  }
  REQUIRE(mock().configure(&c) == 0);
  for (auto s : sessions) CHECK(p11.C_CloseSession(s) == CKR_OK);
  REQUIRE(p11.C_Finalize(nullptr) == CKR_OK);
  Counts all;
  for (const auto& cnt : counts) all.merge(cnt);
  MockStats st = mock_stats();
  std::printf(
      "FIGURES many-sessions deadlock mode=%s: sessions=%zu rounds=%ld calls=%lu "
      "b_while_a_inside=%lu backend_peak=%lu wrong=%lu\n",
      session_mode().c_str(), kN, rounds, all.tally.calls(), overlapped.load(),
      st.sessions_open_peak, all.wrong);
  MESSAGE("deadlock (" << session_mode() << "): " << all.tally.summary());
  for (const auto& u : all.tally.unexpected()) MESSAGE("unexpected: " << u);
  for (const auto& w : all.first_wrong) MESSAGE("wrong: " << w);
  CHECK(all.tally.unexpected_count() == 0);
  CHECK(all.wrong == 0);
  // B's calls did come while A's were inside the backend.
  CHECK(overlapped.load() > 0);
  CHECK(st.sessions_open_peak <= kN);
  // Calls on one backend session never overlapped in it.
  CHECK(st.session_violations == 0);
  CHECK(st.sessions_open == 0);
  CHECK(st.sessions_closed_by_finalize == 0);
}

}  // namespace
}  // namespace p11mux::reliability
