// The faulty module on its own, over the mock (whose counters show what
// really reached the target): forwarding, handle mapping, each kind of fault,
// and the configuration from the environment.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <p11mux/pkcs11.h>

#include "faulty_control.h"
#include "mock_control.h"

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <thread>
#include <vector>

namespace {

struct Libraries {
  Libraries() {
    void* mock_lib = ::dlopen(MOCK_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(mock_lib != nullptr, ::dlerror());
    mock = reinterpret_cast<MockGetControlFn>(::dlsym(mock_lib, "mock_get_control"))();
    void* lib = ::dlopen(FAULTY_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(lib != nullptr, ::dlerror());
    faulty = reinterpret_cast<FaultyGetControlFn>(::dlsym(lib, "faulty_get_control"))();
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
    REQUIRE(get_list(&p11) == CKR_OK);
    get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(lib, "C_GetInterface"));
    REQUIRE(static_cast<bool>(get_interface));
  }
  const MockControl* mock = nullptr;
  const FaultyControl* faulty = nullptr;
  CK_FUNCTION_LIST* p11 = nullptr;
  CK_C_GetInterface get_interface = nullptr;
};

Libraries& libs() {
  static Libraries instance;
  return instance;
}

FaultyConfig over_mock() {
  FaultyConfig c{};
  std::strcpy(c.target, MOCK_LIBRARY_PATH);
  c.seed = 1;
  return c;
}

void add_rule(FaultyConfig& c, const char* function, CK_RV rv, unsigned long per_million,
              unsigned long nth) {
  for (auto& r : c.rules) {
    if (r.function[0] != '\0') continue;
    std::strcpy(r.function, function);
    r.rv = rv;
    r.per_million = per_million;
    r.nth = nth;
    return;
  }
  FAIL("no free rule");
}

// Index of a function in the counters (both modules use the order of CK_FUNCTION_LIST_3_0).
unsigned long index_of(const char* name) {
  for (unsigned long i = 0; i < FAULTY_FUNCTION_COUNT; ++i) {
    if (std::strcmp(libs().faulty->function_name(i), name) == 0) return i;
  }
  FAIL("unknown function " << name);
  return 0;
}

FaultyStats faulty_stats() {
  FaultyStats s{};
  libs().faulty->stats(&s);
  return s;
}

MockStats mock_stats() {
  MockStats s{};
  libs().mock->stats(&s);
  return s;
}

// The faulty module initialized over a fresh mock; finalized at the end.
struct Fixture {
  explicit Fixture(FaultyConfig c = over_mock(), MockConfig m = {}) : p11(libs().p11) {
    ::unsetenv("P11MUX_FAULTY_FAIL");
    CHECK(libs().faulty->reset() == 0);
    CHECK(libs().mock->reset() == 0);
    REQUIRE(libs().mock->configure(&m) == 0);
    REQUIRE(libs().faulty->configure(&c) == 0);
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    REQUIRE(p11->C_Initialize(&args) == CKR_OK);
  }
  ~Fixture() { p11->C_Finalize(nullptr); }
  Fixture(const Fixture&) = delete;
  Fixture& operator=(const Fixture&) = delete;

  CK_SESSION_HANDLE open() {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
            CKR_OK);
    return h;
  }
  CK_RV random(CK_SESSION_HANDLE h) {
    CK_BYTE buf[16];
    return p11->C_GenerateRandom(h, buf, sizeof buf);
  }

  CK_FUNCTION_LIST* p11;
};

// opened = closed + closed_all + dropped + open_at_finalize + open
void check_session_balance(const FaultyStats& s) {
  CHECK(s.sessions_opened == s.sessions_closed + s.sessions_closed_all + s.sessions_dropped +
                                 s.sessions_open_at_finalize + s.sessions_open);
}

TEST_CASE("forwards calls with its own session handles") {
  {
    Fixture f;
    CHECK(mock_stats().initialized == 1);
    CK_SESSION_HANDLE h = f.open();
    CHECK(h >= FAULTY_SESSION_HANDLE_BASE);
    CHECK(f.random(h) == CKR_OK);
    CHECK(mock_stats().last_session >= MOCK_SESSION_HANDLE_BASE);  // the mock's own handle
    CHECK(mock_stats().last_session != h);
    CK_SESSION_INFO info{};
    CHECK(f.p11->C_GetSessionInfo(h, &info) == CKR_OK);
    CHECK((info.flags & CKF_RW_SESSION) != 0);
    CHECK(f.random(h + 1) == CKR_SESSION_HANDLE_INVALID);
    CHECK(f.p11->C_CloseSession(h) == CKR_OK);
    CHECK(f.random(h) == CKR_SESSION_HANDLE_INVALID);
    CHECK(f.p11->C_CloseSession(h) == CKR_SESSION_HANDLE_INVALID);
    CHECK(mock_stats().sessions_closed_total == 1);
    CHECK(libs().faulty->calls("C_GenerateRandom") == 3);
  }
  CHECK(mock_stats().initialized == 0);
  FaultyStats s = faulty_stats();
  CHECK(s.sessions_opened == 1);
  CHECK(s.sessions_closed == 1);
  CHECK(s.sessions_open_at_finalize == 0);
  CHECK(s.stale_handle_calls == 3);
  check_session_balance(s);
}

TEST_CASE("sessions left open at C_Finalize are counted") {
  {
    Fixture f;
    f.open();
    f.open();
  }
  FaultyStats s = faulty_stats();
  CHECK(s.sessions_open_at_finalize == 2);
  CHECK(s.sessions_open == 0);
  check_session_balance(s);
}

TEST_CASE("a rule on the Nth call") {
  FaultyConfig c = over_mock();
  add_rule(c, "C_GenerateRandom", CKR_DEVICE_ERROR, 0, 2);
  Fixture f(c);
  CK_SESSION_HANDLE h = f.open();
  CHECK(f.random(h) == CKR_OK);
  CHECK(f.random(h) == CKR_DEVICE_ERROR);
  CHECK(f.random(h) == CKR_OK);
  CHECK(libs().mock->calls("C_GenerateRandom") == 2);  // the failed call never reached it
  FaultyStats s = faulty_stats();
  CHECK(s.faults_injected == 1);
  CHECK(s.faults[index_of("C_GenerateRandom")] == 1);
  CHECK(s.faults[index_of("C_SeedRandom")] == 0);
  CHECK(libs().mock->function_name(index_of("C_GenerateRandom")) ==
        std::string_view("C_GenerateRandom"));
}

std::vector<CK_RV> draw_sequence(unsigned long seed) {
  FaultyConfig c = over_mock();
  c.seed = seed;
  add_rule(c, "C_GenerateRandom", CKR_FUNCTION_FAILED, 300000, 0);
  Fixture f(c);
  CK_SESSION_HANDLE h = f.open();
  std::vector<CK_RV> rvs;
  for (int i = 0; i < 1000; ++i) rvs.push_back(f.random(h));
  return rvs;
}

TEST_CASE("a rule with a probability follows the seed") {
  auto a = draw_sequence(7), b = draw_sequence(7), other = draw_sequence(8);
  CHECK(a == b);
  CHECK(a != other);
  auto failed = std::count(a.begin(), a.end(), CKR_FUNCTION_FAILED);
  CHECK(failed > 200);  // 30% of 1000, give or take
  CHECK(failed < 400);
  CHECK(std::count(a.begin(), a.end(), CKR_OK) == 1000 - failed);
}

TEST_CASE("'*' matches every call but the lifecycle and the closes") {
  Fixture f;
  CK_SESSION_HANDLE h = f.open();
  FaultyConfig c = over_mock();
  add_rule(c, "*", CKR_DEVICE_MEMORY, 1000000, 0);
  REQUIRE(libs().faulty->configure(&c) == 0);
  CHECK(f.random(h) == CKR_DEVICE_MEMORY);
  CK_ULONG count = 0;
  CHECK(f.p11->C_GetSlotList(CK_FALSE, nullptr, &count) == CKR_DEVICE_MEMORY);
  CK_SESSION_HANDLE other = 0;
  CHECK(f.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &other) == CKR_DEVICE_MEMORY);
  CHECK(f.p11->C_CloseSession(h) == CKR_OK);
  CHECK(f.p11->C_CloseAllSessions(0) == CKR_OK);
}

TEST_CASE("a fault on a call that ends an operation ends it in the target too") {
  FaultyConfig c = over_mock();
  add_rule(c, "C_Sign", CKR_DEVICE_ERROR, 0, 1);
  Fixture f(c);
  CK_SESSION_HANDLE h = f.open();
  CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE sign[] = {{CKA_SIGN, &yes, sizeof yes}};
  CK_OBJECT_HANDLE pub = 0, priv = 0;
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  REQUIRE(f.p11->C_GenerateKeyPair(h, &gen, nullptr, 0, sign, 1, &pub, &priv) == CKR_OK);
  CK_BYTE data[32] = {1}, sig[64];
  CK_ULONG len = 0;
  REQUIRE(f.p11->C_SignInit(h, &mech, priv) == CKR_OK);
  CHECK(f.p11->C_Sign(h, data, sizeof data, nullptr, &len) == CKR_OK);  // a length query: no fault
  len = sizeof sig;
  CHECK(f.p11->C_Sign(h, data, sizeof data, sig, &len) == CKR_DEVICE_ERROR);
  CHECK(f.p11->C_SignInit(h, &mech, priv) == CKR_OK);  // not CKR_OPERATION_ACTIVE
  len = sizeof sig;
  CHECK(f.p11->C_Sign(h, data, sizeof data, sig, &len) == CKR_OK);
  CHECK(libs().mock->calls("C_Sign") == 3);
}

TEST_CASE("'*' leaves alone the calls that continue an operation") {
  FaultyConfig c = over_mock();
  add_rule(c, "*", CKR_DEVICE_ERROR, 1000000, 0);
  Fixture f;
  CK_SESSION_HANDLE h = f.open();
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  REQUIRE(f.p11->C_DigestInit(h, &sha) == CKR_OK);
  REQUIRE(libs().faulty->configure(&c) == 0);
  CK_BYTE data[8] = {};
  CHECK(f.p11->C_DigestUpdate(h, data, sizeof data) == CKR_OK);
  CK_BYTE out[64];
  CK_ULONG len = sizeof out;
  CHECK(f.p11->C_DigestFinal(h, out, &len) == CKR_DEVICE_ERROR);  // forwarded, then failed
  CHECK(f.p11->C_DigestInit(h, &sha) == CKR_DEVICE_ERROR);        // replaced: nothing started
  FaultyConfig none = over_mock();
  REQUIRE(libs().faulty->configure(&none) == 0);
  CHECK(f.p11->C_DigestInit(h, &sha) == CKR_OK);  // the target agrees: nothing active
}

TEST_CASE("a failed C_CloseSession leaves the session open") {
  FaultyConfig c = over_mock();
  add_rule(c, "C_CloseSession", CKR_DEVICE_ERROR, 0, 1);
  Fixture f(c);
  CK_SESSION_HANDLE h = f.open();
  CHECK(f.p11->C_CloseSession(h) == CKR_DEVICE_ERROR);
  CHECK(f.random(h) == CKR_OK);
  CHECK(mock_stats().sessions_open == 1);
  CHECK(f.p11->C_CloseSession(h) == CKR_OK);
  CHECK(mock_stats().sessions_open == 0);
}

TEST_CASE("CKR_SESSION_COUNT beyond max_sessions") {
  FaultyConfig c = over_mock();
  c.max_sessions = 2;
  Fixture f(c);
  CK_SESSION_HANDLE a = f.open();
  f.open();
  CK_SESSION_HANDLE h = 0;
  CHECK(f.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_SESSION_COUNT);
  CHECK(f.p11->C_CloseSession(a) == CKR_OK);
  CHECK(f.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  FaultyStats s = faulty_stats();
  CHECK(s.session_count_refusals == 1);
  CHECK(s.max_sessions_open == 2);
  CHECK(mock_stats().sessions_opened_total == 3);
}

TEST_CASE("an HSM restart drops every session and really closes it") {
  Fixture f;
  std::vector<CK_SESSION_HANDLE> old{f.open(), f.open(), f.open()};
  CHECK(libs().faulty->restart() == 3);
  CHECK(mock_stats().sessions_open == 0);
  for (auto h : old) CHECK(f.random(h) == CKR_SESSION_HANDLE_INVALID);
  CHECK(f.p11->C_CloseSession(old[0]) == CKR_SESSION_HANDLE_INVALID);
  CK_SESSION_HANDLE h = f.open();
  CHECK(f.random(h) == CKR_OK);
  FaultyStats s = faulty_stats();
  CHECK(s.sessions_dropped == 3);
  CHECK(s.target_sessions_closed_by_restart == 3);
  CHECK(s.restarts == 1);
  check_session_balance(s);
}

TEST_CASE("a restart during a call closes that target session after the call") {
  MockConfig m{};
  m.slow_us = 200000;  // C_GenerateRandom stays inside the mock
  Fixture f(over_mock(), m);
  CK_SESSION_HANDLE h = f.open();
  std::atomic<bool> started{false};
  CK_RV rv = CKR_GENERAL_ERROR;
  std::thread call([&] {
    started = true;
    rv = f.random(h);
  });
  while (!started) std::this_thread::yield();
  while (libs().mock->calls("C_GenerateRandom") == 0) std::this_thread::yield();  // inside it now
  CHECK(libs().faulty->restart() == 1);
  call.join();
  CHECK(rv == CKR_OK);
  CHECK(mock_stats().session_violations == 0);  // not closed under the call
  CHECK(mock_stats().sessions_open == 0);       // but closed once it returned
  CHECK(faulty_stats().target_sessions_closed_by_restart == 1);
}

TEST_CASE("a removed device: CKR_DEVICE_REMOVED, then old sessions are gone") {
  Fixture f;
  CK_SESSION_HANDLE h = f.open();
  libs().faulty->set_removed(1);
  CHECK(f.random(h) == CKR_DEVICE_REMOVED);
  CHECK(f.p11->C_CloseSession(h) == CKR_DEVICE_REMOVED);
  CK_SESSION_HANDLE other = 0;
  CHECK(f.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &other) ==
        CKR_TOKEN_NOT_PRESENT);
  CK_TOKEN_INFO info{};
  CHECK(f.p11->C_GetTokenInfo(0, &info) == CKR_TOKEN_NOT_PRESENT);
  CK_SLOT_INFO slot{};
  CHECK(f.p11->C_GetSlotInfo(0, &slot) == CKR_OK);
  libs().faulty->set_removed(0);
  CHECK(f.random(h) == CKR_SESSION_HANDLE_INVALID);
  CHECK(f.random(f.open()) == CKR_OK);
  CHECK(mock_stats().sessions_open == 1);
}

TEST_CASE("latency is added to the configured calls") {
  FaultyConfig c = over_mock();
  c.open_session_us = 1000;
  c.login_us = 1000;
  c.crypto_us = 100;
  Fixture f(c);
  CK_SESSION_HANDLE h = f.open();
  CHECK(f.random(h) == CKR_OK);
  CK_SESSION_INFO info{};
  CHECK(f.p11->C_GetSessionInfo(h, &info) == CKR_OK);
  CHECK(f.p11->C_Login(h, CKU_USER, (CK_UTF8CHAR_PTR) "1234", 4) == CKR_OK);
  CHECK(faulty_stats().delayed_calls == 3);  // open, random, login
}

TEST_CASE("two calls on one session at once are counted") {
  MockConfig m{};
  m.call_spin_us = 2000;
  Fixture f(over_mock(), m);
  CK_SESSION_HANDLE h = f.open();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) f.random(h);
    });
  for (auto& t : threads) t.join();
  CHECK(faulty_stats().session_violations > 0);
  CHECK(faulty_stats().max_concurrent_calls > 1);
}

TEST_CASE("C_CloseAllSessions closes the slot's sessions") {
  Fixture f;
  CK_SESSION_HANDLE a = f.open(), b = f.open();
  CHECK(f.p11->C_CloseAllSessions(0) == CKR_OK);
  CHECK(f.random(a) == CKR_SESSION_HANDLE_INVALID);
  CHECK(f.random(b) == CKR_SESSION_HANDLE_INVALID);
  FaultyStats s = faulty_stats();
  CHECK(s.sessions_closed_all == 2);
  CHECK(s.session_violations == 0);
  check_session_balance(s);
}

TEST_CASE("the 3.0 interface when the target has one") {
  MockConfig m{};
  m.provide_v3 = 1;
  Fixture f(over_mock(), m);
  CK_INTERFACE* iface = nullptr;
  CK_VERSION v30{3, 0};
  REQUIRE(libs().get_interface(nullptr, &v30, &iface, 0) == CKR_OK);
  auto* list = static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
  CHECK(list->version.major == 3);
  CK_SESSION_HANDLE h = f.open();
  CHECK(list->C_SessionCancel(h, 0) == CKR_OK);
  CHECK(libs().mock->calls("C_SessionCancel") == 1);
}

TEST_CASE("the configuration from the environment") {
  ::setenv("P11MUX_FAULTY_FAIL",
           "*:CKR_DEVICE_ERROR:p=0.01,C_OpenSession:0x31:nth=3,"
           "C_GetAttributeValue:CKR_SESSION_CLOSED:nth=1:after",
           1);
  ::setenv("P11MUX_FAULTY_SEED", "42", 1);
  ::setenv("P11MUX_FAULTY_MAX_SESSIONS", "16", 1);
  ::setenv("P11MUX_FAULTY_MAX_SLOT_SESSIONS", "4", 1);
  ::setenv("P11MUX_FAULTY_LATENCY", "open=2000,close=10,login=2000,crypto=300", 1);
  FaultyConfig c{};
  REQUIRE(libs().faulty->config_from_env(&c) == 0);
  CHECK(std::strcmp(c.rules[0].function, "*") == 0);
  CHECK(c.rules[0].rv == CKR_DEVICE_ERROR);
  CHECK(c.rules[0].per_million == 10000);
  CHECK(std::strcmp(c.rules[1].function, "C_OpenSession") == 0);
  CHECK(c.rules[1].rv == CKR_DEVICE_MEMORY);
  CHECK(c.rules[1].nth == 3);
  CHECK(c.rules[1].after == 0);
  CHECK(std::strcmp(c.rules[2].function, "C_GetAttributeValue") == 0);
  CHECK(c.rules[2].rv == CKR_SESSION_CLOSED);
  CHECK(c.rules[2].nth == 1);
  CHECK(c.rules[2].after == 1);
  CHECK(c.rules[3].function[0] == '\0');
  CHECK(c.seed == 42);
  CHECK(c.max_sessions == 16);
  CHECK(c.max_sessions_per_slot == 4);
  CHECK(c.open_session_us == 2000);
  CHECK(c.close_session_us == 10);
  CHECK(c.crypto_us == 300);

  for (const char* bad : {"C_Nope:CKR_DEVICE_ERROR:p=0.1", "C_Sign:CKR_NOPE:p=0.1",
                          "C_Sign:CKR_DEVICE_ERROR:p=2", "C_Sign:CKR_DEVICE_ERROR:nth=0",
                          "C_Sign:CKR_DEVICE_ERROR", "C_Sign:CKR_DEVICE_ERROR:after"}) {
    CAPTURE(bad);
    ::setenv("P11MUX_FAULTY_FAIL", bad, 1);
    CHECK(libs().faulty->config_from_env(&c) == -1);
    CHECK(std::strstr(libs().faulty->last_error(), "P11MUX_FAULTY_FAIL") != nullptr);
  }
  // C_Initialize refuses a malformed environment.
  CHECK(libs().faulty->reset() == 0);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  CHECK(libs().p11->C_Initialize(&args) == CKR_GENERAL_ERROR);
  for (const char* name : {"P11MUX_FAULTY_FAIL", "P11MUX_FAULTY_SEED", "P11MUX_FAULTY_MAX_SESSIONS",
                           "P11MUX_FAULTY_MAX_SLOT_SESSIONS", "P11MUX_FAULTY_LATENCY"}) {
    ::unsetenv(name);
  }
}

TEST_CASE("an unknown function in a rule is refused") {
  FaultyConfig c = over_mock();
  add_rule(c, "C_Nope", CKR_DEVICE_ERROR, 0, 1);
  CHECK(libs().faulty->configure(&c) == -1);
}

// ---- faults aimed at one slot (the members of an HSM group, issue 15) ----

// Two slots over the mock: slot 0 gets the faults, slot 1 must not notice.
constexpr CK_SLOT_ID kSlotA = 0, kSlotB = 1;

MockConfig two_slots() {
  MockConfig m{};
  m.slot_count = 2;
  return m;
}

CK_SESSION_HANDLE open_on(Fixture& f, CK_SLOT_ID slot) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(f.p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
          CKR_OK);
  return h;
}

CK_RV try_open(Fixture& f, CK_SLOT_ID slot) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  return f.p11->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
}

CK_RV token_info(Fixture& f, CK_SLOT_ID slot) {
  CK_TOKEN_INFO info{};
  return f.p11->C_GetTokenInfo(slot, &info);
}

FaultySlotStats slot_stats(CK_SLOT_ID slot) {
  FaultySlotStats s{};
  libs().faulty->slot_stats(slot, &s);
  return s;
}

TEST_CASE("a code aimed at one slot fails that slot's calls only, until cleared") {
  for (CK_RV code : {CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT}) {
    CAPTURE(code);
    Fixture f(over_mock(), two_slots());
    CK_SESSION_HANDLE a = open_on(f, kSlotA), b = open_on(f, kSlotB);
    libs().faulty->fail_slot(kSlotA, code);
    CHECK(f.random(a) == code);
    CHECK(f.random(b) == CKR_OK);
    CHECK(token_info(f, kSlotA) == code);
    CHECK(token_info(f, kSlotB) == CKR_OK);
    CK_SLOT_INFO info{};
    CHECK(f.p11->C_GetSlotInfo(kSlotA, &info) == code);
    CHECK(f.p11->C_GetSlotInfo(kSlotB, &info) == CKR_OK);
    CHECK(try_open(f, kSlotA) == code);
    CHECK(f.random(open_on(f, kSlotB)) == CKR_OK);
    CK_ULONG count = 0;
    CHECK(f.p11->C_GetSlotList(CK_TRUE, nullptr, &count) == CKR_OK);
    CHECK(count == 2);
    CHECK(f.p11->C_CloseSession(a) == code);             // and it stays open
    CHECK(libs().mock->calls("C_GenerateRandom") == 2);  // slot B's calls only reached it
    CHECK(slot_stats(kSlotA).faults == 5);
    CHECK(slot_stats(kSlotA).sessions_open == 1);
    CHECK(slot_stats(kSlotB).faults == 0);

    libs().faulty->fail_slot(kSlotA, CKR_OK);
    CHECK(f.random(a) == CKR_OK);  // the session survived the fault
    CHECK(f.random(open_on(f, kSlotA)) == CKR_OK);
    CHECK(token_info(f, kSlotA) == CKR_OK);
    CHECK(f.p11->C_CloseSession(a) == CKR_OK);
    check_session_balance(faulty_stats());
  }
}

TEST_CASE("a slot's code on a call that ends an operation ends it in the target too") {
  Fixture f(over_mock(), two_slots());
  CK_SESSION_HANDLE h = open_on(f, kSlotA);
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  CK_BYTE data[8] = {}, out[64];
  CK_ULONG len = sizeof out;
  REQUIRE(f.p11->C_DigestInit(h, &sha) == CKR_OK);
  libs().faulty->fail_slot(kSlotA, CKR_DEVICE_ERROR);
  CHECK(f.p11->C_Digest(h, data, sizeof data, out, &len) == CKR_DEVICE_ERROR);
  CHECK(libs().mock->calls("C_Digest") == 1);               // forwarded, its answer replaced
  CHECK(f.p11->C_DigestInit(h, &sha) == CKR_DEVICE_ERROR);  // replaced: nothing started
  libs().faulty->clear_slot(kSlotA);
  CHECK(f.p11->C_DigestInit(h, &sha) == CKR_OK);  // not CKR_OPERATION_ACTIVE
}

TEST_CASE("a token removed from one slot: its sessions gone, the other slot untouched") {
  Fixture f(over_mock(), two_slots());
  CK_SESSION_HANDLE a = open_on(f, kSlotA), b = open_on(f, kSlotB);
  libs().faulty->set_slot_removed(kSlotA, 1);
  CHECK(mock_stats().sessions_open == 1);  // a's target session really closed
  CHECK(f.random(a) == CKR_DEVICE_REMOVED);
  CHECK(f.p11->C_CloseSession(a) == CKR_DEVICE_REMOVED);
  CHECK(try_open(f, kSlotA) == CKR_TOKEN_NOT_PRESENT);
  CHECK(token_info(f, kSlotA) == CKR_TOKEN_NOT_PRESENT);
  CHECK(f.p11->C_CloseAllSessions(kSlotA) == CKR_TOKEN_NOT_PRESENT);
  CK_SLOT_INFO info{};
  REQUIRE(f.p11->C_GetSlotInfo(kSlotA, &info) == CKR_OK);
  CHECK((info.flags & CKF_TOKEN_PRESENT) == 0);
  REQUIRE(f.p11->C_GetSlotInfo(kSlotB, &info) == CKR_OK);
  CHECK((info.flags & CKF_TOKEN_PRESENT) != 0);
  CHECK(f.random(b) == CKR_OK);
  CHECK(token_info(f, kSlotB) == CKR_OK);
  CHECK(f.random(open_on(f, kSlotB)) == CKR_OK);

  libs().faulty->set_slot_removed(kSlotA, 0);
  CHECK(f.random(a) == CKR_SESSION_HANDLE_INVALID);  // gone with the token
  CK_SESSION_HANDLE again = open_on(f, kSlotA);
  CHECK(f.random(again) == CKR_OK);
  REQUIRE(f.p11->C_GetSlotInfo(kSlotA, &info) == CKR_OK);
  CHECK((info.flags & CKF_TOKEN_PRESENT) != 0);
  CHECK(f.random(b) == CKR_OK);
  FaultySlotStats s = slot_stats(kSlotA);
  CHECK(s.restarts == 1);
  CHECK(s.sessions_dropped == 1);
  CHECK(s.sessions_open == 1);
  CHECK(slot_stats(kSlotB).sessions_open == 2);
  CHECK(faulty_stats().sessions_dropped == 1);
  check_session_balance(faulty_stats());
}

TEST_CASE("a restart of one slot drops its sessions only; new ones work at once") {
  Fixture f(over_mock(), two_slots());
  CK_SESSION_HANDLE a1 = open_on(f, kSlotA), a2 = open_on(f, kSlotA), b = open_on(f, kSlotB);
  CHECK(libs().faulty->restart_slot(kSlotA) == 2);
  CHECK(mock_stats().sessions_open == 1);
  CHECK(f.random(a1) == CKR_SESSION_HANDLE_INVALID);
  CHECK(f.random(a2) == CKR_SESSION_HANDLE_INVALID);
  CHECK(f.p11->C_CloseSession(a1) == CKR_SESSION_HANDLE_INVALID);
  CHECK(f.random(b) == CKR_OK);
  CHECK(f.random(open_on(f, kSlotA)) == CKR_OK);
  FaultyStats s = faulty_stats();
  CHECK(s.sessions_dropped == 2);
  CHECK(s.target_sessions_closed_by_restart == 2);
  CHECK(s.restarts == 0);  // the whole device did not restart
  CHECK(slot_stats(kSlotA).restarts == 1);
  check_session_balance(s);
}

TEST_CASE("a hang on one slot does not block another; released, the call returns") {
  Fixture f(over_mock(), two_slots());
  CK_SESSION_HANDLE a = open_on(f, kSlotA), b = open_on(f, kSlotB);
  libs().faulty->hang_slot(kSlotA, FAULTY_HANG_UNTIL_RELEASED);
  std::atomic<bool> returned{false};
  CK_RV rv = CKR_GENERAL_ERROR;
  std::thread call([&] {
    rv = f.random(a);
    returned = true;
  });
  while (slot_stats(kSlotA).hung_now == 0) std::this_thread::yield();
  CHECK(f.random(b) == CKR_OK);
  CHECK(token_info(f, kSlotB) == CKR_OK);
  CHECK(f.random(open_on(f, kSlotB)) == CKR_OK);
  CHECK(libs().mock->calls("C_GenerateRandom") == 2);  // slot B's only
  CHECK_FALSE(returned.load());
  CHECK(libs().faulty->release_slot(kSlotA) == 1);
  call.join();
  CHECK(rv == CKR_OK);  // it went on to the target
  CHECK(slot_stats(kSlotA).hung_now == 0);
  CHECK(slot_stats(kSlotA).hung_total == 1);
  CHECK(f.random(a) == CKR_OK);  // no longer hanging
  CHECK(slot_stats(kSlotA).hung_total == 1);
}

TEST_CASE("a hang for N ms; then a code: the call waits, then fails") {
  Fixture f(over_mock(), two_slots());
  CK_SESSION_HANDLE a = open_on(f, kSlotA);
  libs().faulty->hang_slot(kSlotA, 100);
  libs().faulty->fail_slot(kSlotA, CKR_DEVICE_ERROR);
  auto start = std::chrono::steady_clock::now();
  CHECK(f.random(a) == CKR_DEVICE_ERROR);
  CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(100));
  CHECK(slot_stats(kSlotA).hung_total == 1);
  // The deadline passed: the slot answers at once again (with its code).
  CHECK(f.random(a) == CKR_DEVICE_ERROR);
  CHECK(slot_stats(kSlotA).hung_total == 1);
}

TEST_CASE("a new hang replaces the deadline of the calls already waiting") {
  Fixture f(over_mock(), two_slots());
  CK_SESSION_HANDLE a = open_on(f, kSlotA);
  libs().faulty->hang_slot(kSlotA, FAULTY_HANG_UNTIL_RELEASED);
  CK_RV rv = CKR_GENERAL_ERROR;
  std::thread call([&] { rv = f.random(a); });
  while (slot_stats(kSlotA).hung_now == 0) std::this_thread::yield();
  libs().faulty->hang_slot(kSlotA, 50);
  call.join();  // returns by itself once the new deadline passes
  CHECK(rv == CKR_OK);
  CHECK(libs().faulty->release_slot(kSlotA) == 0);
}

TEST_CASE("clearing a slot releases its hung calls; faulty_reset clears every slot") {
  Fixture f(over_mock(), two_slots());
  CK_SESSION_HANDLE a = open_on(f, kSlotA);
  libs().faulty->hang_slot(kSlotA, FAULTY_HANG_UNTIL_RELEASED);
  CK_RV rv = CKR_GENERAL_ERROR;
  std::thread call([&] { rv = f.random(a); });
  while (slot_stats(kSlotA).hung_now == 0) std::this_thread::yield();
  libs().faulty->clear_slot(kSlotA);
  call.join();
  CHECK(rv == CKR_OK);

  libs().faulty->fail_slot(kSlotB, CKR_DEVICE_ERROR);
  libs().faulty->set_slot_removed(kSlotA, 1);
  CHECK(libs().faulty->reset() == 1);  // it finalized first
  FaultyConfig c = over_mock();        // reset read the environment: SoftHSM2 again
  REQUIRE(libs().faulty->configure(&c) == 0);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  REQUIRE(f.p11->C_Initialize(&args) == CKR_OK);
  CHECK(token_info(f, kSlotA) == CKR_OK);
  CHECK(token_info(f, kSlotB) == CKR_OK);
  CHECK(slot_stats(kSlotA).restarts == 0);
}

TEST_CASE("a session limit on each slot") {
  FaultyConfig c = over_mock();
  c.max_sessions_per_slot = 2;
  Fixture f(c, two_slots());
  CK_SESSION_HANDLE a1 = open_on(f, kSlotA);
  open_on(f, kSlotA);
  CHECK(try_open(f, kSlotA) == CKR_SESSION_COUNT);
  open_on(f, kSlotB);  // the other slot has its own places
  open_on(f, kSlotB);
  CHECK(try_open(f, kSlotB) == CKR_SESSION_COUNT);
  CHECK(f.p11->C_CloseSession(a1) == CKR_OK);
  open_on(f, kSlotA);
  CHECK(try_open(f, kSlotA) == CKR_SESSION_COUNT);
  CHECK(libs().faulty->restart_slot(kSlotA) == 2);  // a restart frees its places
  open_on(f, kSlotA);
  open_on(f, kSlotA);
  CHECK(try_open(f, kSlotA) == CKR_SESSION_COUNT);
  CHECK(f.p11->C_CloseAllSessions(kSlotB) == CKR_OK);
  open_on(f, kSlotB);
  FaultyStats s = faulty_stats();
  CHECK(s.session_count_refusals == 4);
  CHECK(s.max_sessions_open == 4);
  CHECK(mock_stats().sessions_open == 3);
  check_session_balance(s);
}

TEST_CASE("a slot's fault set before C_Initialize holds from the start") {
  Fixture f(over_mock(), two_slots());
  REQUIRE(f.p11->C_Finalize(nullptr) == CKR_OK);
  libs().faulty->fail_slot(kSlotB, CKR_DEVICE_ERROR);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  REQUIRE(f.p11->C_Initialize(&args) == CKR_OK);
  CHECK(token_info(f, kSlotB) == CKR_DEVICE_ERROR);
  CHECK(try_open(f, kSlotB) == CKR_DEVICE_ERROR);
  CHECK(f.random(open_on(f, kSlotA)) == CKR_OK);
  libs().faulty->clear_slot(kSlotB);
  CHECK(f.random(open_on(f, kSlotB)) == CKR_OK);
}

// ---- P11MUX_FAULTY_SCHEDULE: slot faults at fixed times after C_Initialize ----

// Sets a variable for one test case.
struct ScopedEnv {
  ScopedEnv(const char* variable, const char* value) : name(variable) {
    ::setenv(variable, value, 1);
  }
  ~ScopedEnv() { ::unsetenv(name); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  const char* name;
};

TEST_CASE("a schedule removes a slot's token and brings it back, at its times") {
  ScopedEnv schedule("P11MUX_FAULTY_SCHEDULE", "1.0:slot=0:back,0.5:slot=0:removed");
  Fixture f(over_mock(), two_slots());
  const auto t0 = std::chrono::steady_clock::now();
  CK_SESSION_HANDLE a = open_on(f, kSlotA), b = open_on(f, kSlotB);
  CHECK(f.random(a) == CKR_OK);  // nothing before its time
  std::this_thread::sleep_until(t0 + std::chrono::milliseconds(750));
  CHECK(f.random(a) == CKR_DEVICE_REMOVED);
  CHECK(try_open(f, kSlotA) == CKR_TOKEN_NOT_PRESENT);
  CHECK(f.random(b) == CKR_OK);
  std::this_thread::sleep_until(t0 + std::chrono::milliseconds(1300));
  CHECK(f.random(open_on(f, kSlotA)) == CKR_OK);
  CHECK(f.random(a) == CKR_SESSION_HANDLE_INVALID);  // gone with the token
  CHECK(slot_stats(kSlotA).restarts == 1);
  CHECK(slot_stats(kSlotB).restarts == 0);
}

TEST_CASE("C_Finalize drops the faults not yet due; each C_Initialize starts the clock again") {
  ScopedEnv schedule("P11MUX_FAULTY_SCHEDULE", "0.3:slot=0:restart");
  Fixture f(over_mock(), two_slots());
  REQUIRE(f.p11->C_Finalize(nullptr) == CKR_OK);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  CHECK(slot_stats(kSlotA).restarts == 0);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  REQUIRE(f.p11->C_Initialize(&args) == CKR_OK);
  CK_SESSION_HANDLE a = open_on(f, kSlotA);
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  CHECK(slot_stats(kSlotA).restarts == 1);
  CHECK(f.random(a) == CKR_SESSION_HANDLE_INVALID);
}

TEST_CASE("a schedule needs a thread: CKR_NEED_TO_CREATE_THREADS if the application forbids one") {
  ScopedEnv schedule("P11MUX_FAULTY_SCHEDULE", "1:slot=0:removed");
  CHECK(libs().faulty->reset() == 0);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS;
  CHECK(libs().p11->C_Initialize(&args) == CKR_NEED_TO_CREATE_THREADS);
  CHECK_FALSE(faulty_stats().initialized);
}

TEST_CASE("a malformed schedule fails C_Initialize") {
  {
    ScopedEnv good("P11MUX_FAULTY_SCHEDULE",
                   "0:slot=7:removed,1.5:slot=7:back,2:slot=1:restart,3:slot=1:hang,3.5:slot=1:"
                   "release,4:slot=1:hang=200,5:slot=1:fail=CKR_DEVICE_ERROR,6:slot=1:clear");
    FaultyConfig c{};
    CHECK(libs().faulty->config_from_env(&c) == 0);
  }
  for (const char* bad : {"1.0:slot=0", "x:slot=0:removed", "-1:slot=0:removed", "1:slot=a:removed",
                          "1:0:removed", "1:slot=0:explode", "1:slot=0:fail=CKR_NOPE",
                          "1:slot=0:hang=x", "1:slot=0:removed,2:slot=0"}) {
    CAPTURE(bad);
    ScopedEnv schedule("P11MUX_FAULTY_SCHEDULE", bad);
    FaultyConfig c{};
    CHECK(libs().faulty->config_from_env(&c) == -1);
    CHECK(std::strstr(libs().faulty->last_error(), "P11MUX_FAULTY_SCHEDULE") != nullptr);
    CHECK(libs().faulty->reset() == 0);
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    CHECK(libs().p11->C_Initialize(&args) == CKR_GENERAL_ERROR);
  }
}

}  // namespace
