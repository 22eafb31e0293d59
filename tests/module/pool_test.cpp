// The backend session pool, over the mock: reuse, limits and waiting, reset
// on return, login semantics, dead sessions, thread caches, prewarm.
#include "harness.hpp"

#include "unit/observe_test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <string>
#include <thread>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

CK_UTF8CHAR* pin(const char* text) {
  return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(text));
}

// A liveness guard, not a timing assertion.
template <class T>
bool finishes(std::future<T>& f) {
  return f.wait_for(20s) == std::future_status::ready;
}

TEST_CASE("open+close reuses one backend session; nothing leaks at C_Finalize") {
  {
    Proxy proxy;
    for (int i = 0; i < 100; ++i) {
      CK_SESSION_HANDLE h = proxy.open();
      CK_BYTE buf[8];
      REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
      REQUIRE(proxy.p11->C_CloseSession(h) == CKR_OK);
    }
    CHECK(mock_stats().sessions_opened_total == 1);
    CHECK(mock_stats().sessions_open == 1);  // idle in the pool
  }
  MockStats s = mock_stats();
  CHECK(s.sessions_open == 0);
  CHECK(s.sessions_opened_total == s.sessions_closed_total);
  CHECK(s.sessions_closed_by_finalize == 0);
}

TEST_CASE("at the backend's limit: learn it, wait, then CKR_SESSION_COUNT") {
  MockConfig c{};
  c.max_sessions = 4;  // the token does not say so (reports no limit)
  Proxy proxy(c, nullptr, {{"P11MUX_POOL_WAIT_MS", "100"}});
  std::vector<CK_SESSION_HANDLE> held;
  for (int i = 0; i < 4; ++i) held.push_back(proxy.open(0, CKF_SERIAL_SESSION));
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_SESSION_COUNT);
  CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_SESSION_COUNT);
  CHECK(mock_stats().sessions_open == 4);
  REQUIRE(proxy.p11->C_CloseSession(held.back()) == CKR_OK);
  held.pop_back();
  CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  CHECK(mock_stats().sessions_opened_total == 4);  // the returned one was reused
  // At the limit, an idle session of the other kind is traded for one of this kind.
  REQUIRE(proxy.p11->C_CloseSession(h) == CKR_OK);
  CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
        CKR_OK);
  CHECK(mock_stats().sessions_opened_total == 5);
  CHECK(mock_stats().sessions_open == 4);
}

// At a limit of one session, a second C_OpenSession waits; closing the first
// must wake it, whether the session comes back to the pool (clean) or is
// closed because it cannot be reset (dirty: an operation left active).
void waiter_wakes_when_first_session_closes(bool dirty) {
  Proxy proxy({}, nullptr, {{"P11MUX_POOL_MAX_SESSIONS", "1"}, {"P11MUX_POOL_WAIT_MS", "15000"}});
  CK_SESSION_HANDLE first = proxy.open(0, CKF_SERIAL_SESSION);
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  if (dirty) REQUIRE(proxy.p11->C_DigestInit(first, &mech) == CKR_OK);  // v2 mock: no cancel
  auto waiter = std::async(std::launch::async, [&] {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    return proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
  });
  std::this_thread::sleep_for(50ms);
  REQUIRE(proxy.p11->C_CloseSession(first) == CKR_OK);
  REQUIRE(finishes(waiter));
  CHECK(waiter.get() == CKR_OK);
  CHECK(mock_stats().sessions_opened_total == (dirty ? 2u : 1u));
}

TEST_CASE("a waiter at the limit gets the session another thread gives back") {
  waiter_wakes_when_first_session_closes(false);
}

TEST_CASE("a waiter wakes when a dirty session is closed instead of returned") {
  waiter_wakes_when_first_session_closes(true);
}

TEST_CASE("an open that fails in the backend returns its error and leaves no one waiting") {
  MockConfig c{};
  std::snprintf(c.fail_function, sizeof c.fail_function, "C_OpenSession");
  c.fail_rv = CKR_DEVICE_ERROR;
  Proxy proxy(c, nullptr, {{"P11MUX_POOL_MAX_SESSIONS", "1"}});
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  for (int i = 0; i < 3; ++i) {
    CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
          CKR_DEVICE_ERROR);
  }
  MockConfig ok{};
  libs().mock->configure(&ok);
  CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
}

TEST_CASE(
    "reset on return: session objects, operations and searches do not leak to the next user") {
  for (int v3 : {0, 1}) {
    CAPTURE(v3);
    MockConfig c{};
    c.provide_v3 = v3;
    Proxy proxy(c);
    CK_SESSION_HANDLE a = proxy.open();
    // A session object and an active sign and find, left behind.
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
    REQUIRE(proxy.create_data_object(a, false, obj) == CKR_OK);
    CHECK(mock_stats().session_objects == 1);
    REQUIRE(proxy.p11->C_FindObjectsInit(a, nullptr, 0) == CKR_OK);
    REQUIRE(proxy.p11->C_CloseSession(a) == CKR_OK);
    CHECK(mock_stats().session_objects == 0);
    CK_SESSION_HANDLE b = proxy.open();
    CHECK(proxy.p11->C_FindObjectsInit(b, nullptr, 0) == CKR_OK);  // no search left active
    CK_OBJECT_HANDLE found[4];
    CK_ULONG n = 99;
    REQUIRE(proxy.p11->C_FindObjects(b, found, 4, &n) == CKR_OK);
    CHECK(n == 0);  // and a's session object is gone
    REQUIRE(proxy.p11->C_FindObjectsFinal(b) == CKR_OK);
    CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
    REQUIRE(proxy.p11->C_DigestInit(b, &mech) == CKR_OK);
    REQUIRE(proxy.p11->C_CloseSession(b) == CKR_OK);
    CK_SESSION_HANDLE next = proxy.open();
    CHECK(proxy.p11->C_DigestInit(next, &mech) == CKR_OK);  // no digest left active
    // The search and the object were cleaned in place; the digest needed
    // C_SessionCancel (v3.0) or a fresh session (v2.40).
    CHECK(mock_stats().sessions_opened_total == (v3 ? 1u : 2u));
  }
}

TEST_CASE("token objects survive the reset") {
  Proxy proxy;
  CK_SESSION_HANDLE a = proxy.open();
  CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
  std::string user = MOCK_USER_PIN;
  REQUIRE(proxy.p11->C_Login(a, CKU_USER, pin(MOCK_USER_PIN), user.size()) == CKR_OK);
  REQUIRE(proxy.create_data_object(a, true, obj) == CKR_OK);
  REQUIRE(proxy.p11->C_CloseSession(a) == CKR_OK);
  CHECK(mock_stats().token_objects == 1);
}

TEST_CASE("the application's last session closing logs the token out, unless keep_login") {
  for (bool keep : {false, true}) {
    CAPTURE(keep);
    Proxy proxy({}, nullptr, {{"P11MUX_POOL_KEEP_LOGIN", keep ? "true" : "false"}});
    CK_SESSION_HANDLE a = proxy.open();
    CK_SESSION_HANDLE b = proxy.open();
    REQUIRE(proxy.p11->C_Login(a, CKU_USER, pin(MOCK_USER_PIN), 4) == CKR_OK);
    CHECK(proxy.p11->C_Login(b, CKU_USER, pin(MOCK_USER_PIN), 4) == CKR_USER_ALREADY_LOGGED_IN);
    REQUIRE(proxy.p11->C_CloseSession(a) == CKR_OK);
    CHECK(libs().mock->token_user(0) == CKU_USER);  // b is still open
    REQUIRE(proxy.p11->C_CloseSession(b) == CKR_OK);
    CHECK(mock_stats().sessions_open >= 1);  // pooled
    CHECK(libs().mock->token_user(0) == (keep ? CKU_USER : MOCK_NOBODY));
  }
}

TEST_CASE("SO login works while only idle pooled R/O sessions exist") {
  Proxy proxy;
  CK_SESSION_HANDLE ro = proxy.open(0, CKF_SERIAL_SESSION);
  REQUIRE(proxy.p11->C_CloseSession(ro) == CKR_OK);  // idle in the pool now
  CK_SESSION_HANDLE rw = proxy.open(0, CKF_SERIAL_SESSION | CKF_RW_SESSION);
  CHECK(proxy.p11->C_Login(rw, CKU_SO, pin(MOCK_SO_PIN), 4) == CKR_OK);
  REQUIRE(proxy.p11->C_Logout(rw) == CKR_OK);
  // With an R/O session of the application's own open, the spec's refusal stands.
  CK_SESSION_HANDLE mine = proxy.open(0, CKF_SERIAL_SESSION);
  CHECK(proxy.p11->C_Login(rw, CKU_SO, pin(MOCK_SO_PIN), 4) == CKR_SESSION_READ_ONLY_EXISTS);
  (void)mine;
}

TEST_CASE("C_InitToken works while only idle pooled sessions exist") {
  Proxy proxy;
  CK_SESSION_HANDLE h = proxy.open();
  REQUIRE(proxy.p11->C_CloseSession(h) == CKR_OK);
  CK_UTF8CHAR label[32];
  std::memset(label, ' ', sizeof label);
  CHECK(proxy.p11->C_InitToken(0, pin(MOCK_SO_PIN), 4, label) == CKR_OK);
  CK_SESSION_HANDLE open_one = proxy.open();
  CHECK(proxy.p11->C_InitToken(0, pin(MOCK_SO_PIN), 4, label) == CKR_SESSION_EXISTS);
  (void)open_one;
}

TEST_CASE("a dead backend session is discarded; the next open gets a fresh one") {
  Proxy proxy;
  CK_SESSION_HANDLE a = proxy.open();
  CK_SESSION_HANDLE idle = proxy.open();
  REQUIRE(proxy.p11->C_CloseSession(idle) == CKR_OK);  // one idle in the pool
  CHECK(libs().mock->drop_sessions() == 2);            // the HSM restarts
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(a, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
  CHECK(proxy.p11->C_CloseSession(a) == CKR_OK);
  CK_SESSION_HANDLE b = proxy.open();
  CHECK(proxy.p11->C_GenerateRandom(b, buf, sizeof buf) == CKR_OK);
}

TEST_CASE("a thread's cached sessions return to the pool when it exits") {
  Proxy proxy;
  std::thread([&] {
    CK_SESSION_HANDLE h = proxy.open();
    CHECK(proxy.p11->C_CloseSession(h) == CKR_OK);  // into this thread's cache
  }).join();
  CK_SESSION_HANDLE h = proxy.open();  // reused from the shared pool
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  CHECK(mock_stats().sessions_opened_total == 1);
}

TEST_CASE("many threads opening and closing: bounded by the limit, nothing leaks") {
  {
    Proxy proxy({}, nullptr, {{"P11MUX_POOL_MAX_SESSIONS", "3"}, {"P11MUX_POOL_WAIT_MS", "20000"}});
    std::atomic<int> errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 12; ++t) {
      threads.emplace_back([&] {
        for (int i = 0; i < 200; ++i) {
          CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
          if (proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) != CKR_OK) {
            errors++;
            continue;
          }
          CK_BYTE buf[8];
          if (proxy.p11->C_GenerateRandom(h, buf, sizeof buf) != CKR_OK) errors++;
          if (proxy.p11->C_CloseSession(h) != CKR_OK) errors++;
        }
      });
    }
    for (auto& t : threads) t.join();
    CHECK(errors == 0);
    CHECK(mock_stats().sessions_opened_total <= 3);
    CHECK(mock_stats().max_concurrent_calls >= 1);
  }
  MockStats s = mock_stats();
  CHECK(s.sessions_opened_total == s.sessions_closed_total);
  CHECK(s.session_violations == 0);
}

TEST_CASE("pool.prewarm opens sessions at C_Initialize") {
  Proxy proxy({}, nullptr, {{"P11MUX_POOL_PREWARM", "3"}});
  CHECK(mock_stats().sessions_open == 3);
  CK_SESSION_HANDLE h = proxy.open(0, CKF_SERIAL_SESSION);
  (void)h;
  CHECK(mock_stats().sessions_opened_total == 3);
}

TEST_CASE("sessions opened with a Notify callback are the application's alone") {
  Proxy proxy;
  auto notify = [](CK_SESSION_HANDLE, CK_NOTIFICATION, CK_VOID_PTR) -> CK_RV { return CKR_OK; };
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, notify, &h) == CKR_OK);
  REQUIRE(proxy.p11->C_CloseSession(h) == CKR_OK);
  CHECK(mock_stats().sessions_open == 0);
}

}  // namespace
}  // namespace p11mux::test

namespace p11mux::test {
namespace {

TEST_CASE("maintenance: idle sessions past pool.idle_timeout_s are closed") {
  Proxy proxy({}, nullptr, {{"P11MUX_POOL_IDLE_TIMEOUT_S", "1"}});
  CK_SESSION_HANDLE h = proxy.open();
  REQUIRE(proxy.p11->C_CloseSession(h) == CKR_OK);
  // The closed session sits in this thread's cache; a session in the shared
  // pool is what maintenance looks at: give it back from a thread that exits.
  std::thread([&] {
    CK_SESSION_HANDLE t = proxy.open();
    CHECK(proxy.p11->C_CloseSession(t) == CKR_OK);
  }).join();
  CHECK(eventually([] { return mock_stats().sessions_closed_total >= 1; }));
}

TEST_CASE("maintenance: idle sessions are pinged every pool.keepalive_s") {
  Proxy proxy({}, nullptr, {{"P11MUX_POOL_KEEPALIVE_S", "1"}});
  std::thread([&] {
    CK_SESSION_HANDLE t = proxy.open();
    CHECK(proxy.p11->C_CloseSession(t) == CKR_OK);
  }).join();
  CHECK(eventually([] { return libs().mock->calls("C_GetSessionInfo") >= 2; }));
  CHECK(mock_stats().sessions_open == 1);  // kept alive, not closed
}

TEST_CASE("maintenance never starts under CKF_LIBRARY_CANT_CREATE_OS_THREADS") {
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS;
  Proxy proxy({}, &args, {{"P11MUX_POOL_KEEPALIVE_S", "1"}});
  std::thread([&] {
    CK_SESSION_HANDLE t = proxy.open();
    CHECK(proxy.p11->C_CloseSession(t) == CKR_OK);
  }).join();
  std::this_thread::sleep_for(2500ms);
  CHECK(libs().mock->calls("C_GetSessionInfo") == 0);
}

}  // namespace
}  // namespace p11mux::test

namespace p11mux::test {
namespace {

// /metrics: p11mux_pool_sessions_unclean_total for slot 0, by reason.
struct Unclean {
  std::string sock;
  double operator()(const char* reason) const {
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    auto prom = parse_prometheus(m->body);
    for (const auto& e : prom.errors) FAIL_CHECK(e);
    return prom.at(std::string("p11mux_pool_sessions_unclean_total{slot=\"0\",reason=\"") + reason +
                   "\"}");
  }
};

std::string unclean_socket(const char* name) {
  return "/tmp/p11mux-pool-" + std::to_string(::getpid()) + "-" + name;
}

void configure_failure(const char* function, CK_RV rv) {
  MockConfig c{};
  c.provide_v3 = 0;
  std::snprintf(c.fail_function, sizeof c.fail_function, "%s", function);
  c.fail_rv = rv;
  REQUIRE(libs().mock->configure(&c) == 0);
}

TEST_CASE(
    "sessions closed instead of pooled are counted by reason (v2.40 backend: no C_SessionCancel)") {
  std::string sock = unclean_socket("unclean.sock");
  MockConfig v2{};
  v2.provide_v3 = 0;  // the default; said for the reader
  Proxy proxy(v2, nullptr, {{"P11MUX_METRICS_LISTEN", sock.c_str()}});
  CK_FUNCTION_LIST* p = proxy.p11;
  Unclean unclean{sock};
  CK_MECHANISM digest = sha256();
  CK_BYTE data[4] = {1, 2, 3, 4};

  // A clean session is pooled: nothing counted, nothing closed.
  CK_SESSION_HANDLE h = proxy.open();
  REQUIRE(p->C_DigestInit(h, &digest) == CKR_OK);
  CK_BYTE out[MOCK_DIGEST_LEN];
  CK_ULONG len = sizeof out;
  REQUIRE(p->C_Digest(h, data, sizeof data, out, &len) == CKR_OK);
  REQUIRE(p->C_CloseSession(h) == CKR_OK);
  CHECK(mock_stats().sessions_closed_total == 0);
  for (std::string r : {"operation_active", "operation_maybe_active", "unknown_mechanism",
                        "object_untracked", "object_not_destroyed", "notify_callback"}) {
    CAPTURE(r);
    CHECK(unclean(r.c_str()) == 0);
  }

  SUBCASE("an operation left active") {
    h = proxy.open();
    REQUIRE(p->C_DigestInit(h, &digest) == CKR_OK);
    REQUIRE(p->C_CloseSession(h) == CKR_OK);
    CHECK(unclean("operation_active") == 1);
  }
  SUBCASE("an operation an error may have left active") {
    h = proxy.open();
    REQUIRE(p->C_DigestInit(h, &digest) == CKR_OK);
    configure_failure("C_DigestUpdate", CKR_DEVICE_MEMORY);
    CHECK(p->C_DigestUpdate(h, data, sizeof data) == CKR_DEVICE_MEMORY);
    REQUIRE(p->C_CloseSession(h) == CKR_OK);
    CHECK(unclean("operation_maybe_active") == 1);
    CHECK(unclean("operation_active") == 0);
  }
  SUBCASE("a key made with a vendor-defined mechanism") {
    h = proxy.open();
    CK_MECHANISM vendor{CKM_VENDOR_DEFINED + 7, nullptr, 0};
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    REQUIRE(p->C_GenerateKey(h, &vendor, nullptr, 0, &key) == CKR_OK);
    REQUIRE(p->C_CloseSession(h) == CKR_OK);
    CHECK(unclean("unknown_mechanism") == 1);
  }
  SUBCASE("an object whose CKA_TOKEN cannot be read") {
    h = proxy.open();
    configure_failure("C_GetAttributeValue", CKR_DEVICE_MEMORY);
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    REQUIRE(proxy.create_data_object(h, false, object) == CKR_OK);
    REQUIRE(p->C_CloseSession(h) == CKR_OK);
    CHECK(unclean("object_untracked") == 1);
  }
  SUBCASE("a session object that cannot be destroyed") {
    h = proxy.open();
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    REQUIRE(proxy.create_data_object(h, false, object) == CKR_OK);
    configure_failure("C_DestroyObject", CKR_GENERAL_ERROR);
    REQUIRE(p->C_CloseSession(h) == CKR_OK);
    CHECK(unclean("object_not_destroyed") == 1);
  }
  SUBCASE("a session opened with a Notify callback") {
    auto notify = [](CK_SESSION_HANDLE, CK_NOTIFICATION, CK_VOID_PTR) -> CK_RV { return CKR_OK; };
    REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, notify, &h) == CKR_OK);
    REQUIRE(p->C_CloseSession(h) == CKR_OK);
    CHECK(unclean("notify_callback") == 1);
  }
  // Each was closed, not pooled.
  CHECK(mock_stats().sessions_closed_total == 1);
}

TEST_CASE("a v3.0 backend's C_SessionCancel proves an operation ended: the session is pooled") {
  std::string sock = unclean_socket("cancel.sock");
  MockConfig v3{};
  v3.provide_v3 = 1;
  Proxy proxy(v3, nullptr, {{"P11MUX_METRICS_LISTEN", sock.c_str()}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_MECHANISM digest = sha256();
  CK_BYTE data[4] = {1, 2, 3, 4};
  CK_SESSION_HANDLE h = proxy.open();
  REQUIRE(p->C_DigestInit(h, &digest) == CKR_OK);
  MockConfig fail{};
  fail.provide_v3 = 1;
  std::snprintf(fail.fail_function, sizeof fail.fail_function, "C_DigestUpdate");
  fail.fail_rv = CKR_DEVICE_MEMORY;
  REQUIRE(libs().mock->configure(&fail) == 0);
  CHECK(p->C_DigestUpdate(h, data, sizeof data) == CKR_DEVICE_MEMORY);
  REQUIRE(p->C_CloseSession(h) == CKR_OK);
  CHECK(mock_stats().sessions_closed_total == 0);
  CHECK(libs().mock->calls("C_SessionCancel") == 1);
  CHECK(Unclean{sock}("operation_maybe_active") == 0);
}

}  // namespace
}  // namespace p11mux::test
