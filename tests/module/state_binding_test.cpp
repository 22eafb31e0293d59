// [pool] bind = state (docs/design.md, "Binding on state"): virtual sessions
// beyond the backend's limit, each holding a backend session only while it
// has state to keep; C_OpenSession's checks without a backend session; the
// cap on virtual sessions; a session that holds one never waits for the
// pool; waiters served in turn; the token's login kept and ended as the
// application's sessions say.
#include "harness.hpp"
#include "unit/observe_test_support.hpp"

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

// Each test runs in both session modes with bind = state.
const char* session_mode() {
  const char* mode = "serialize";
  SUBCASE("serialize") {}
  SUBCASE("multiplex") { mode = "multiplex"; }
  return mode;
}

MockConfig limited(unsigned long max_sessions) {
  MockConfig c{};
  c.max_sessions = max_sessions;
  return c;
}

CK_RV digest_of(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h, std::string_view text,
                std::vector<CK_BYTE>& out) {
  CK_MECHANISM mech = sha256();
  if (CK_RV rv = p->C_DigestInit(h, &mech); rv != CKR_OK) return rv;
  out.assign(MOCK_DIGEST_LEN, 0);
  CK_ULONG len = out.size();
  std::string data(text);
  return p->C_Digest(h, reinterpret_cast<CK_BYTE_PTR>(data.data()), data.size(), out.data(), &len);
}

CK_RV login(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h, CK_USER_TYPE user) {
  std::string pin = user == CKU_SO ? MOCK_SO_PIN : MOCK_USER_PIN;
  return p->C_Login(h, user, reinterpret_cast<CK_UTF8CHAR_PTR>(pin.data()), pin.size());
}

CK_STATE state_of(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h) {
  CK_SESSION_INFO info{};
  REQUIRE(p->C_GetSessionInfo(h, &info) == CKR_OK);
  return info.state;
}

TEST_CASE("bind = state: 64 application sessions over a backend that allows 4, each working") {
  const char* mode = session_mode();
  {
    Proxy proxy(limited(4), nullptr,
                {{"P11MUX_SESSION_MODE", mode}, {"P11MUX_POOL_BIND", "state"}});
    CK_FUNCTION_LIST* p = proxy.p11;
    std::vector<CK_SESSION_HANDLE> sessions;
    for (int i = 0; i < 64; ++i) sessions.push_back(proxy.open());
    CK_TOKEN_INFO info{};
    REQUIRE(p->C_GetTokenInfo(0, &info) == CKR_OK);
    CHECK(info.ulSessionCount == 64);
    CHECK(info.ulRwSessionCount == 64);
    CHECK(info.ulMaxSessionCount == 100'000);
    // Each from a thread of its own (a thread per connection), 8 at a time.
    std::vector<CK_BYTE> expected;
    {
      CK_SESSION_HANDLE h = sessions[0];
      REQUIRE(digest_of(p, h, "p11mux", expected) == CKR_OK);
    }
    std::atomic<int> right{0};
    for (int batch = 0; batch < 8; ++batch) {
      std::vector<std::thread> threads;
      for (int i = 0; i < 8; ++i) {
        threads.emplace_back([&, h = sessions[batch * 8 + i]] {
          for (int n = 0; n < 10; ++n) {
            std::vector<CK_BYTE> got;
            CK_BYTE random[16];
            if (digest_of(p, h, "p11mux", got) == CKR_OK && got == expected &&
                p->C_GenerateRandom(h, random, sizeof random) == CKR_OK) {
              ++right;
            }
          }
        });
      }
      for (auto& t : threads) t.join();
    }
    CHECK(right == 640);
    CHECK(mock_stats().sessions_open_peak <= 4);
    for (CK_SESSION_HANDLE h : sessions) CHECK(p->C_CloseSession(h) == CKR_OK);
    REQUIRE(p->C_GetTokenInfo(0, &info) == CKR_OK);
    CHECK(info.ulSessionCount == 0);
  }
  CHECK(mock_stats().sessions_open == 0);  // every backend session closed at C_Finalize
}

TEST_CASE("bind = state: an operation keeps its backend session; other sessions share the rest") {
  const char* mode = session_mode();
  Proxy proxy(limited(2), nullptr, {{"P11MUX_SESSION_MODE", mode}, {"P11MUX_POOL_BIND", "state"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = proxy.open();
  CK_MECHANISM mech = sha256();
  REQUIRE(p->C_DigestInit(a, &mech) == CKR_OK);
  CK_BYTE part1[] = "p11", part2[] = "mux";
  REQUIRE(p->C_DigestUpdate(a, part1, 3) == CKR_OK);
  // Twenty sessions come and go on the one backend session left.
  for (int i = 0; i < 20; ++i) {
    CK_SESSION_HANDLE other = proxy.open();
    std::vector<CK_BYTE> got;
    CHECK(digest_of(p, other, "other", got) == CKR_OK);
    CHECK(p->C_CloseSession(other) == CKR_OK);
  }
  REQUIRE(p->C_DigestUpdate(a, part2, 3) == CKR_OK);
  std::vector<CK_BYTE> got(MOCK_DIGEST_LEN), expected;
  CK_ULONG len = got.size();
  REQUIRE(p->C_DigestFinal(a, got.data(), &len) == CKR_OK);
  REQUIRE(digest_of(p, proxy.open(), "p11mux", expected) == CKR_OK);
  CHECK(got == expected);
  CHECK(mock_stats().sessions_open_peak <= 2);
}

TEST_CASE("bind = state: a session object pins its backend session until it is destroyed") {
  const char* mode = session_mode();
  Proxy proxy(limited(2), nullptr, {{"P11MUX_SESSION_MODE", mode}, {"P11MUX_POOL_BIND", "state"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = proxy.open();
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
  REQUIRE(proxy.create_data_object(a, false, object) == CKR_OK);
  // Other sessions open, run and close on the other backend session, and are
  // reset there: the object lives on, usable where it was made.
  for (int i = 0; i < 20; ++i) {
    CK_SESSION_HANDLE other = proxy.open();
    CK_BYTE random[8];
    CHECK(p->C_GenerateRandom(other, random, sizeof random) == CKR_OK);
    CHECK(p->C_CloseSession(other) == CKR_OK);
  }
  CK_OBJECT_CLASS cls = 0;
  CK_ATTRIBUTE query{CKA_CLASS, &cls, sizeof cls};
  CHECK(p->C_GetAttributeValue(a, object, &query, 1) == CKR_OK);
  CHECK(cls == CKO_DATA);
  CHECK(mock_stats().session_objects == 1);
  // Destroyed: nothing pins the backend session any more; closing the
  // virtual session leaves no object behind either way.
  CHECK(p->C_DestroyObject(a, object) == CKR_OK);
  REQUIRE(proxy.create_data_object(a, false, object) == CKR_OK);
  CHECK(p->C_CloseSession(a) == CKR_OK);
  CHECK(mock_stats().session_objects == 0);
  CHECK(mock_stats().sessions_open_peak <= 2);
}

TEST_CASE("bind = state: C_OpenSession follows the application's sessions and login") {
  const char* mode = session_mode();
  // One backend session: the checks must hold when p11mux has none at hand.
  Proxy proxy(limited(1), nullptr,
              {{"P11MUX_SESSION_MODE", mode},
               {"P11MUX_POOL_BIND", "state"},
               {"P11MUX_POOL_WAIT_MS", "100"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE rw = proxy.open();
  CK_SESSION_HANDLE ro = proxy.open(0, CKF_SERIAL_SESSION);
  // The read-only session holds no backend session: the backend would let
  // the SO log in; the application's session says no.
  CHECK(login(p, rw, CKU_SO) == CKR_SESSION_READ_ONLY_EXISTS);
  CHECK(p->C_CloseSession(ro) == CKR_OK);
  REQUIRE(login(p, rw, CKU_SO) == CKR_OK);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
        CKR_SESSION_READ_WRITE_SO_EXISTS);
  SUBCASE("with the backend session in use, from what p11mux knows") {
    CK_MECHANISM mech = sha256();
    REQUIRE(p->C_DigestInit(rw, &mech) == CKR_OK);  // holds the only backend session
    CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
          CKR_SESSION_READ_WRITE_SO_EXISTS);
    CHECK(p->C_OpenSession(7, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_SLOT_ID_INVALID);
    CK_SESSION_HANDLE more = CK_INVALID_HANDLE;
    CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &more) ==
          CKR_OK);
    CK_TOKEN_INFO info{};
    REQUIRE(p->C_GetTokenInfo(0, &info) == CKR_OK);
    CHECK(info.ulSessionCount == 2);
  }
  CHECK(p->C_Logout(rw) == CKR_OK);
  CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  CHECK(p->C_OpenSession(0, 0, nullptr, nullptr, &h) == CKR_SESSION_PARALLEL_NOT_SUPPORTED);
}

TEST_CASE("[pool] max_virtual_sessions caps the application's sessions per token") {
  const char* mode = session_mode();
  const char* bind = "state";
  SUBCASE("bind = state") {}
  SUBCASE("bind = open") { bind = "open"; }
  Proxy proxy({}, nullptr,
              {{"P11MUX_SESSION_MODE", mode},
               {"P11MUX_POOL_BIND", bind},
               {"P11MUX_POOL_MAX_VIRTUAL_SESSIONS", "3"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  std::vector<CK_SESSION_HANDLE> held{proxy.open(), proxy.open(), proxy.open()};
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_SESSION_COUNT);
  CHECK(h == CK_INVALID_HANDLE);
  CHECK(p->C_CloseSession(held[0]) == CKR_OK);
  CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
}

TEST_CASE("bind = state: a session holding a backend session never waits for the pool") {
  // Multiplex: a second thread on a session whose only backend session holds
  // a digest, with the backend's one session in use, runs on the session's
  // own backend session rather than wait 30 s for the pool.
  Proxy proxy(limited(1), nullptr,
              {{"P11MUX_SESSION_MODE", "multiplex"},
               {"P11MUX_POOL_BIND", "state"},
               {"P11MUX_POOL_WAIT_MS", "30000"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = proxy.open();
  CK_MECHANISM mech = sha256();
  REQUIRE(p->C_DigestInit(a, &mech) == CKR_OK);
  auto other_thread = std::async(std::launch::async, [&] {
    CK_BYTE random[8];
    return p->C_GenerateRandom(a, random, sizeof random);
  });
  REQUIRE(other_thread.wait_for(10s) == std::future_status::ready);  // a liveness guard
  CHECK(other_thread.get() == CKR_OK);
  CK_BYTE data[] = "abc", digest[MOCK_DIGEST_LEN];
  CK_ULONG len = sizeof digest;
  CHECK(p->C_Digest(a, data, 3, digest, &len) == CKR_OK);
  CHECK(mock_stats().sessions_open_peak == 1);
}

TEST_CASE("bind = state: a backend session taken from the cache but not used goes back") {
  // Multiplex: a call on a session whose anchor is empty takes a backend
  // session from its thread's cache before choosing (multiplex.hpp,
  // claim_locked). Here the rules choose the session's other binding (free,
  // pinned by another thread's object), so the one taken must go back to the
  // pool: lost, it would count against the limit of 2 for ever, and the last
  // call below would wait and get CKR_SESSION_COUNT.
  Proxy proxy(limited(2), nullptr,
              {{"P11MUX_SESSION_MODE", "multiplex"},
               {"P11MUX_POOL_BIND", "state"},
               {"P11MUX_POOL_WAIT_MS", "200"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = proxy.open();
  std::thread([&] {
    CK_MECHANISM mech = sha256();
    CHECK(p->C_DigestInit(a, &mech) == CKR_OK);  // the anchor, this thread's
    // Another thread's object, on a second backend session (the anchor holds
    // the digest).
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    std::thread([&] { CHECK(proxy.create_data_object(a, false, object) == CKR_OK); }).join();
    CK_BYTE data[] = "abc", digest[MOCK_DIGEST_LEN];
    CK_ULONG len = sizeof digest;
    // The anchor goes back to this thread's cache, and is taken from there again.
    CHECK(p->C_Digest(a, data, 3, digest, &len) == CKR_OK);
    for (int i = 0; i < 3; ++i) {
      CK_BYTE random[8];
      CHECK(p->C_GenerateRandom(a, random, sizeof random) == CKR_OK);
    }
  }).join();
  CHECK(mock_stats().sessions_open_peak == 2);
  // The other backend session is free again: another session's call gets it.
  CK_SESSION_HANDLE b = proxy.open();
  CK_BYTE random[8];
  CHECK(p->C_GenerateRandom(b, random, sizeof random) == CKR_OK);
  CHECK(p->C_CloseSession(b) == CKR_OK);
  CHECK(p->C_CloseSession(a) == CKR_OK);
  CHECK(mock_stats().session_objects == 0);
}

TEST_CASE("bind = state: calls waiting at the backend's limit are served in turn") {
  const char* mode = session_mode();
  const std::string sock = unique_temp_path("state", "turn.sock");
  Proxy proxy(limited(1), nullptr,
              {{"P11MUX_SESSION_MODE", mode},
               {"P11MUX_POOL_BIND", "state"},
               {"P11MUX_POOL_WAIT_MS", "30000"},
               {"P11MUX_METRICS_LISTEN", sock.c_str()}});
  // Calls that have begun to wait at the limit (each counts itself first).
  auto waiting = [&] {
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    return parse_prometheus(m->body).at("p11mux_pool_waits_total{slot=\"0\"}");
  };
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE holder = proxy.open();
  CK_MECHANISM mech = sha256();
  REQUIRE(p->C_DigestInit(holder, &mech) == CKR_OK);  // the one backend session
  constexpr int kWaiters = 5;
  std::vector<CK_SESSION_HANDLE> sessions;
  for (int i = 0; i < kWaiters; ++i) sessions.push_back(proxy.open());
  std::mutex order_lock;
  std::vector<int> order;
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      // Noted while it holds the one backend session (its digest active):
      // the next cannot have been served yet.
      CK_MECHANISM sha = sha256();
      CHECK(p->C_DigestInit(sessions[i], &sha) == CKR_OK);
      {
        std::lock_guard guard(order_lock);
        order.push_back(i);
      }
      CK_BYTE data[] = "abc", digest[MOCK_DIGEST_LEN];
      CK_ULONG len = sizeof digest;
      CHECK(p->C_Digest(sessions[i], data, 3, digest, &len) == CKR_OK);
    });
    // Each in line before the next comes: the order of arrival is known.
    REQUIRE(eventually([&] { return waiting() == i + 1; }));
  }
  {
    std::lock_guard guard(order_lock);
    REQUIRE(order.empty());  // they do wait (else this test proves nothing)
  }
  CK_BYTE data[] = "abc", digest[MOCK_DIGEST_LEN];
  CK_ULONG len = sizeof digest;
  REQUIRE(p->C_Digest(holder, data, 3, digest, &len) == CKR_OK);
  for (auto& t : threads) t.join();
  std::string seen;
  for (int i : order) seen += std::to_string(i);
  CHECK(seen == "01234");
}

// A thread of its own that runs one step at a time, when told: multiplex
// mode tells threads apart, and an arrangement of bindings needs the same
// thread for several steps.
class Worker {
 public:
  Worker() : thread_([this] { loop(); }) {}
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  template <class F>
  auto run(F step) {
    std::packaged_task<decltype(step())()> task(std::move(step));
    auto result = task.get_future();
    {
      std::lock_guard guard(lock_);
      job_ = [&task] { task(); };
    }
    wake_.notify_all();
    return result.get();
  }

  ~Worker() {
    run([this] { done_ = true; });
    thread_.join();
  }

 private:
  void loop() {
    while (!done_) {
      std::function<void()> job;
      {
        std::unique_lock guard(lock_);
        wake_.wait(guard, [this] { return job_ != nullptr; });
        job = std::exchange(job_, nullptr);
      }
      job();
    }
  }
  std::mutex lock_;
  std::condition_variable wake_;
  std::function<void()> job_;
  bool done_ = false;  // written and read by the worker's own thread only
  std::thread thread_;
};

TEST_CASE("bind = state: at the limit, each thread's operation stays its own, as owner or guest") {
  // Issue 13: 16 threads signing and verifying on one multiplexed session
  // over 4 backend sessions hung now and then. A binding's operations were
  // known by kind only: G verified as the guest of A's binding, H as the
  // guest of G's; G's C_Verify took G's own binding (it held "a
  // verification") and ended H's, and G's own stayed on A's binding for
  // good. The arrangement, step by step, over 3 backend sessions.
  Proxy proxy(limited(3), nullptr,
              {{"P11MUX_SESSION_MODE", "multiplex"},
               {"P11MUX_POOL_BIND", "state"},
               {"P11MUX_POOL_WAIT_MS", "30000"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  // Two key pairs on a session of their own (the objects pin its backend
  // session): a signature by one never verifies with the other.
  CK_SESSION_HANDLE keys = proxy.open();
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, key_g = CK_INVALID_HANDLE, key_h = CK_INVALID_HANDLE;
  REQUIRE(p->C_GenerateKeyPair(keys, &gen, nullptr, 0, nullptr, 0, &pub, &key_g) == CKR_OK);
  REQUIRE(p->C_GenerateKeyPair(keys, &gen, nullptr, 0, nullptr, 0, &pub, &key_h) == CKR_OK);
  CK_SESSION_HANDLE shared = proxy.open();
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CK_MECHANISM sha = sha256();
  auto verify = [&](CK_OBJECT_HANDLE key, std::string text) {
    std::array<CK_BYTE, MOCK_DIGEST_LEN> sig{};
    libs().mock->reference_signature(key, reinterpret_cast<const unsigned char*>(text.data()),
                                     text.size(), sig.data());
    return p->C_Verify(shared, reinterpret_cast<CK_BYTE*>(text.data()), text.size(), sig.data(),
                       sig.size());
  };
  Worker g, h, a;
  // G's binding (the anchor) holds G's signature; A's holds A's digest. The
  // pool is at its limit: keys, G's, A's.
  REQUIRE(g.run([&] { return p->C_SignInit(shared, &ecdsa, key_g); }) == CKR_OK);
  REQUIRE(a.run([&] { return p->C_DigestInit(shared, &sha); }) == CKR_OK);
  // H has none: it verifies as the guest of G's binding.
  REQUIRE(h.run([&] { return p->C_VerifyInit(shared, &ecdsa, key_h); }) == CKR_OK);
  // G's own binding holds H's verification: G's goes to A's, as its guest
  // (it collided with H's before: CKR_OPERATION_ACTIVE).
  CHECK(g.run([&] { return p->C_VerifyInit(shared, &ecdsa, key_g); }) == CKR_OK);
  // A has no verification: it may not take G's, nor H's.
  CHECK(a.run([&] { return verify(key_g, "by A"); }) == CKR_OPERATION_NOT_INITIALIZED);
  // Each verification is its thread's.
  CHECK(g.run([&] { return verify(key_g, "by G"); }) == CKR_OK);
  CHECK(h.run([&] { return verify(key_h, "by H"); }) == CKR_OK);
  // Nothing is left behind: A verifies on its own binding, G signs on its.
  CHECK(a.run([&] { return p->C_VerifyInit(shared, &ecdsa, key_g); }) == CKR_OK);
  CHECK(a.run([&] { return verify(key_g, "by A"); }) == CKR_OK);
  CHECK(g.run([&] {
    CK_BYTE data[] = "abc", sig[MOCK_DIGEST_LEN];
    CK_ULONG len = sizeof sig;
    return p->C_Sign(shared, data, 3, sig, &len);
  }) == CKR_OK);
  CHECK(a.run([&] {
    CK_BYTE data[] = "abc", digest[MOCK_DIGEST_LEN];
    CK_ULONG len = sizeof digest;
    return p->C_Digest(shared, data, 3, digest, &len);
  }) == CKR_OK);
  CHECK(mock_stats().sessions_open_peak == 3);
  CHECK(p->C_CloseSession(shared) == CKR_OK);
  CHECK(p->C_CloseSession(keys) == CKR_OK);
}

TEST_CASE("bind = state: the token stays logged in while the application has a session") {
  const char* mode = session_mode();
  // The maintenance thread closes idle backend sessions after 1 s; every one
  // is idle between calls, but the last one stays: closing it would log the
  // token out (and, on SoftHSM2, renumber its objects).
  Proxy proxy({}, nullptr,
              {{"P11MUX_SESSION_MODE", mode},
               {"P11MUX_POOL_BIND", "state"},
               {"P11MUX_POOL_IDLE_TIMEOUT_S", "1"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = proxy.open();
  REQUIRE(login(p, a, CKU_USER) == CKR_OK);
  std::this_thread::sleep_for(2500ms);
  CHECK(mock_stats().sessions_open >= 1);
  CHECK(state_of(p, a) == CKS_RW_USER_FUNCTIONS);
}

TEST_CASE("bind = state: closing the application's last session logs the token out") {
  const char* mode = session_mode();
  Proxy proxy({}, nullptr, {{"P11MUX_SESSION_MODE", mode}, {"P11MUX_POOL_BIND", "state"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = proxy.open();
  REQUIRE(login(p, a, CKU_USER) == CKR_OK);
  CHECK(state_of(p, a) == CKS_RW_USER_FUNCTIONS);
  REQUIRE(p->C_CloseSession(a) == CKR_OK);  // holds no backend session now
  CHECK(mock_stats().sessions_open >= 1);   // pooled, still open
  CK_SESSION_HANDLE b = proxy.open();
  CHECK(state_of(p, b) == CKS_RW_PUBLIC_SESSION);
}

}  // namespace
}  // namespace p11mux::test
