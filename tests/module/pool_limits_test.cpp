// The pool's own promises over a backend that refuses, forgets and restarts:
// slots it does not know leave no trace, stale sessions stop counting, a
// learned limit does not stick, every backend session counts against the
// limit (Notify ones too), maintenance reaches threads' caches, and the
// token info tells the application's figures.
#include "harness.hpp"

#include <chrono>
#include <thread>
#include <vector>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

CK_RV open_on(Proxy& proxy, CK_SLOT_ID slot, CK_SESSION_HANDLE& h, CK_NOTIFY notify = nullptr) {
  return proxy.p11->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, notify, &h);
}

// Each test runs in both session modes, one SUBCASE each, with [pool] bind =
// open: each virtual session holds a backend session (state_binding_test.cpp
// has bind = state).
const char* session_mode() {
  const char* mode = "serialize";
  SUBCASE("serialize") {}
  SUBCASE("multiplex") { mode = "multiplex"; }
  return mode;
}

TEST_CASE("slot IDs the backend does not know leave no trace in the pool") {
  Proxy proxy({}, nullptr, {{"P11MUX_SESSION_MODE", session_mode()}, {"P11MUX_POOL_BIND", "open"}});
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  for (CK_SLOT_ID bogus = 1000; bogus < 1300; ++bogus) {
    REQUIRE(open_on(proxy, bogus, h) == CKR_SLOT_ID_INVALID);
  }
  CHECK(open_on(proxy, 0, h) == CKR_OK);
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
}

TEST_CASE("C_GetTokenInfo tells the application's session figures, not p11mux's backend sessions") {
  MockConfig c{};
  c.token_max_session_count = 100;
  c.token_max_rw_session_count = CK_EFFECTIVELY_INFINITE;
  CK_TOKEN_INFO info{};
  SUBCASE("pool.max_sessions caps the limits the token reports") {
    Proxy proxy(c, nullptr,
                {{"P11MUX_SESSION_MODE", session_mode()},
                 {"P11MUX_POOL_BIND", "open"},
                 {"P11MUX_POOL_MAX_SESSIONS", "4"}});
    REQUIRE(proxy.p11->C_GetTokenInfo(0, &info) == CKR_OK);
    CHECK(info.ulMaxSessionCount == 4);
    CHECK(info.ulMaxRwSessionCount == 4);
    // Sessions the application closed stay open in the pool: the backend
    // would count them.
    CK_SESSION_HANDLE a = proxy.open(0, CKF_SERIAL_SESSION | CKF_RW_SESSION);
    CK_SESSION_HANDLE b = proxy.open(0, CKF_SERIAL_SESSION);
    REQUIRE(proxy.p11->C_GetTokenInfo(0, &info) == CKR_OK);
    CHECK(info.ulSessionCount == 2);
    CHECK(info.ulRwSessionCount == 1);
    REQUIRE(proxy.p11->C_CloseSession(a) == CKR_OK);
    REQUIRE(proxy.p11->C_CloseSession(b) == CKR_OK);
    REQUIRE(mock_stats().sessions_open == 2);
    REQUIRE(proxy.p11->C_GetTokenInfo(0, &info) == CKR_OK);
    CHECK(info.ulSessionCount == 0);
    CHECK(info.ulRwSessionCount == 0);
  }
  SUBCASE("without it, a lower limit of the token's stands") {
    c.token_max_session_count = 3;
    Proxy proxy(c, nullptr,
                {{"P11MUX_SESSION_MODE", session_mode()}, {"P11MUX_POOL_BIND", "open"}});
    REQUIRE(proxy.p11->C_GetTokenInfo(0, &info) == CKR_OK);
    CHECK(info.ulMaxSessionCount == 3);
    CHECK(info.ulMaxRwSessionCount == CK_EFFECTIVELY_INFINITE);
  }
  SUBCASE("a bogus slot is the backend's error") {
    Proxy proxy(c, nullptr, {{"P11MUX_POOL_MAX_SESSIONS", "4"}});
    CHECK(proxy.p11->C_GetTokenInfo(77, &info) == CKR_SLOT_ID_INVALID);
  }
}

TEST_CASE("stale sessions in a thread's cache stop counting against the limit") {
  Proxy proxy({}, nullptr,
              {{"P11MUX_SESSION_MODE", session_mode()},
               {"P11MUX_POOL_BIND", "open"},
               {"P11MUX_POOL_MAX_SESSIONS", "2"},
               {"P11MUX_POOL_WAIT_MS", "100"}});
  CK_SESSION_HANDLE a = proxy.open(0, CKF_SERIAL_SESSION);
  CK_SESSION_HANDLE b = proxy.open(0, CKF_SERIAL_SESSION);
  REQUIRE(proxy.p11->C_CloseSession(b) == CKR_OK);  // idle, in this thread's cache
  REQUIRE(libs().mock->drop_sessions() == 2);       // the HSM restarts
  CK_BYTE buf[8];
  REQUIRE(proxy.p11->C_GenerateRandom(a, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
  REQUIRE(proxy.p11->C_CloseSession(a) == CKR_OK);
  // The cached session is stale: it must neither be handed out nor counted.
  CK_SESSION_HANDLE c = CK_INVALID_HANDLE, d = CK_INVALID_HANDLE;
  REQUIRE(open_on(proxy, 0, c) == CKR_OK);
  CHECK(proxy.p11->C_GenerateRandom(c, buf, sizeof buf) == CKR_OK);
  REQUIRE(open_on(proxy, 0, d) == CKR_OK);  // the application holds one: room for a second
  CHECK(proxy.p11->C_GenerateRandom(d, buf, sizeof buf) == CKR_OK);
  CHECK(mock_stats().sessions_open == 2);
}

TEST_CASE("stale sessions in another thread's cache are dropped when the pool is full") {
  Proxy proxy({}, nullptr,
              {{"P11MUX_SESSION_MODE", session_mode()},
               {"P11MUX_POOL_BIND", "open"},
               {"P11MUX_POOL_MAX_SESSIONS", "2"},
               {"P11MUX_POOL_WAIT_MS", "100"}});
  CK_SESSION_HANDLE a = proxy.open(0, CKF_SERIAL_SESSION);
  std::thread([&] {
    CK_SESSION_HANDLE t = proxy.open(0, CKF_SERIAL_SESSION);
    CHECK(proxy.p11->C_CloseSession(t) == CKR_OK);  // idle in that thread's cache...
    REQUIRE(libs().mock->drop_sessions() == 2);     // ...when the HSM restarts
    CK_BYTE buf[8];
    CHECK(proxy.p11->C_GenerateRandom(a, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
    CHECK(proxy.p11->C_CloseSession(a) == CKR_OK);
    // This thread stays alive (its cache with it) while the main thread opens.
    std::vector<CK_SESSION_HANDLE> held(2);
    CHECK(open_on(proxy, 0, held[0]) == CKR_OK);
    CHECK(open_on(proxy, 0, held[1]) == CKR_OK);
    CHECK(mock_stats().sessions_open == 2);
  }).join();
}

TEST_CASE("a limit learned from CKR_SESSION_COUNT rises again when the backend has room") {
  MockConfig c{};
  c.max_sessions = 1;  // for now: another process holds the HSM's sessions
  Proxy proxy(c, nullptr,
              {{"P11MUX_SESSION_MODE", session_mode()},
               {"P11MUX_POOL_BIND", "open"},
               {"P11MUX_POOL_WAIT_MS", "0"}});
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE, d = CK_INVALID_HANDLE;
  REQUIRE(open_on(proxy, 0, a) == CKR_OK);
  REQUIRE(open_on(proxy, 0, b) == CKR_SESSION_COUNT);  // the limit is learned: 1
  c.max_sessions = 8;                                  // the other process is gone
  REQUIRE(libs().mock->configure(&c) == 0);
  // Within the probe interval the learned limit holds; after it, one more is tried.
  CHECK(eventually([&] { return open_on(proxy, 0, b) == CKR_OK; }));
  CHECK(open_on(proxy, 0, d) == CKR_OK);  // the probe succeeded: the next follows at once
  CHECK(mock_stats().sessions_open == 3);
}

TEST_CASE("one transient CKR_SESSION_COUNT does not lower the limit: the open is retried") {
  MockConfig c{};
  std::snprintf(c.fail_function, sizeof c.fail_function, "C_OpenSession");
  c.fail_rv = CKR_SESSION_COUNT;
  c.fail_nth = 2;  // the HSM is busy for a moment, once
  Proxy proxy(c, nullptr,
              {{"P11MUX_SESSION_MODE", session_mode()},
               {"P11MUX_POOL_BIND", "open"},
               {"P11MUX_POOL_WAIT_MS", "0"}});
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE, d = CK_INVALID_HANDLE;
  REQUIRE(open_on(proxy, 0, a) == CKR_OK);
  CHECK(open_on(proxy, 0, b) == CKR_OK);
  CHECK(open_on(proxy, 0, d) == CKR_OK);
  CHECK(mock_stats().sessions_open == 3);
}

TEST_CASE("sessions opened with a Notify callback count against the session limit") {
  Proxy proxy({}, nullptr,
              {{"P11MUX_SESSION_MODE", session_mode()},
               {"P11MUX_POOL_BIND", "open"},
               {"P11MUX_POOL_MAX_SESSIONS", "2"},
               {"P11MUX_POOL_WAIT_MS", "100"}});
  auto notify = [](CK_SESSION_HANDLE, CK_NOTIFICATION, CK_VOID_PTR) -> CK_RV { return CKR_OK; };
  CK_SESSION_HANDLE plain = proxy.open(0, CKF_SERIAL_SESSION);
  REQUIRE(proxy.p11->C_CloseSession(plain) == CKR_OK);  // one idle pooled session
  std::vector<CK_SESSION_HANDLE> own(5, CK_INVALID_HANDLE);
  CHECK(open_on(proxy, 0, own[0], notify) == CKR_OK);
  CHECK(open_on(proxy, 0, own[1], notify) == CKR_OK);  // the idle one closed to make room
  CHECK(open_on(proxy, 0, own[2], notify) == CKR_SESSION_COUNT);
  CHECK(open_on(proxy, 0, own[3], notify) == CKR_SESSION_COUNT);
  CHECK(mock_stats().sessions_open == 2);
  REQUIRE(proxy.p11->C_CloseSession(own[0]) == CKR_OK);
  CHECK(open_on(proxy, 0, own[4], notify) == CKR_OK);
  CHECK(mock_stats().sessions_open == 2);
}

TEST_CASE("maintenance: idle sessions in threads' caches time out too") {
  Proxy proxy({}, nullptr,
              {{"P11MUX_SESSION_MODE", session_mode()},
               {"P11MUX_POOL_BIND", "open"},
               {"P11MUX_POOL_IDLE_TIMEOUT_S", "1"}});
  CK_SESSION_HANDLE h = proxy.open();
  REQUIRE(proxy.p11->C_CloseSession(h) == CKR_OK);  // into this thread's cache
  CHECK(eventually([] { return mock_stats().sessions_open == 0; }));
  CHECK(mock_stats().sessions_closed_total == 1);
  h = proxy.open();  // a fresh one
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
}

TEST_CASE("maintenance: a session whose keepalive ping fails is closed, not forgotten") {
  MockConfig c{};
  std::snprintf(c.fail_function, sizeof c.fail_function, "C_GetSessionInfo");
  c.fail_rv = CKR_DEVICE_ERROR;
  Proxy proxy(c, nullptr,
              {{"P11MUX_SESSION_MODE", session_mode()},
               {"P11MUX_POOL_BIND", "open"},
               {"P11MUX_POOL_KEEPALIVE_S", "1"},
               {"P11MUX_POOL_MAX_SESSIONS", "1"},
               {"P11MUX_POOL_WAIT_MS", "100"}});
  CK_SESSION_HANDLE h = proxy.open();
  REQUIRE(proxy.p11->C_CloseSession(h) == CKR_OK);  // in this thread's cache
  CHECK(eventually([] { return mock_stats().sessions_closed_total == 1; }));
  CHECK(mock_stats().sessions_open == 0);
  // And it no longer counts: the one allowed session can be opened.
  CK_SESSION_HANDLE again = CK_INVALID_HANDLE;
  CHECK(open_on(proxy, 0, again) == CKR_OK);
}

}  // namespace
}  // namespace p11mux::test
