// Tests of the mock backend itself, loaded the way p11mux's tests load it:
// dlopen() of the built library, PKCS#11 through C_GetFunctionList, control
// through mock_get_control().
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <dlfcn.h>
#include <doctest/doctest.h>
#include <p11mux/pkcs11.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <latch>
#include <string>
#include <thread>
#include <vector>

#include "mock_control.h"

using namespace std::chrono_literals;

namespace {

using Buffer = std::vector<unsigned char>;

Buffer bytes(const std::string& s) { return Buffer(s.begin(), s.end()); }
CK_UTF8CHAR_PTR pin(const char* text) {
  return reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char*>(text));
}

void* library() {
  static void* lib = [] {
    // Another module's C_* in the global scope first, as in a real
    // application: the mock's function lists must still point to its own.
    dlopen("libp11-kit.so.0", RTLD_NOW | RTLD_GLOBAL);
    return dlopen(MOCK_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
  }();
  return lib;
}

// Every test starts from a freshly reset mock and leaves it reset.
struct Fixture {
  const MockControl* mock = nullptr;
  CK_FUNCTION_LIST* ck = nullptr;

  Fixture() {
    REQUIRE_MESSAGE(library() != nullptr, dlerror());
    auto get_control = reinterpret_cast<MockGetControlFn>(dlsym(library(), "mock_get_control"));
    REQUIRE(static_cast<bool>(get_control));
    mock = get_control();
    REQUIRE(mock->reset() == 0);
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(dlsym(library(), "C_GetFunctionList"));
    REQUIRE(static_cast<bool>(get_list));
    REQUIRE(get_list(&ck) == CKR_OK);
  }
  ~Fixture() { mock->reset(); }
  Fixture(const Fixture&) = delete;
  Fixture& operator=(const Fixture&) = delete;

  template <class T>
  T symbol(const char* name) {
    return reinterpret_cast<T>(dlsym(library(), name));
  }

  void configure(const MockConfig& cfg) { REQUIRE(mock->configure(&cfg) == 0); }
  MockStats stats() {
    MockStats st;
    mock->stats(&st);
    return st;
  }
  void init_os() {
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    REQUIRE(ck->C_Initialize(&args) == CKR_OK);
  }
  CK_SESSION_HANDLE open(CK_FLAGS flags = CKF_SERIAL_SESSION | CKF_RW_SESSION,
                         CK_SLOT_ID slot = 0) {
    CK_SESSION_HANDLE h = 0;
    REQUIRE(ck->C_OpenSession(slot, flags, nullptr, nullptr, &h) == CKR_OK);
    return h;
  }
  CK_STATE state(CK_SESSION_HANDLE h) {
    CK_SESSION_INFO info{};
    REQUIRE(ck->C_GetSessionInfo(h, &info) == CKR_OK);
    return info.state;
  }
  CK_OBJECT_HANDLE secret_key(CK_SESSION_HANDLE h) {
    CK_MECHANISM mech{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE key = 0;
    REQUIRE(ck->C_GenerateKey(h, &mech, nullptr, 0, &key) == CKR_OK);
    return key;
  }
};

// The mutex callbacks of a test application, counting their use.
std::atomic<int> created{0}, locked{0}, unlocked{0}, destroyed{0};
CK_RV create_mutex(CK_VOID_PTR_PTR m) {
  ++created;
  *m = new int(0);
  return CKR_OK;
}
CK_RV destroy_mutex(CK_VOID_PTR m) {
  ++destroyed;
  delete static_cast<int*>(m);
  return CKR_OK;
}
CK_RV lock_mutex(CK_VOID_PTR) {
  ++locked;
  return CKR_OK;
}
CK_RV unlock_mutex(CK_VOID_PTR) {
  ++unlocked;
  return CKR_OK;
}

}  // namespace

TEST_CASE_FIXTURE(Fixture, "the function list is complete and only entry points are exported") {
  CHECK(ck->version.major == 2);
  CHECK(ck->version.minor == 40);
  // The 68 pointers follow the version, in table order.
  auto* first = reinterpret_cast<void**>(&ck->C_Initialize);
  for (unsigned long i = 0; i < 68; ++i) {
    std::string name = mock->function_name(i);
    CAPTURE(name);
    CHECK(first[i] != nullptr);
    CHECK(dlsym(library(), name.c_str()) == first[i]);
  }
  for (unsigned long i = 68; i < MOCK_FUNCTION_COUNT; ++i) {
    std::string name = mock->function_name(i);
    CAPTURE(name);
    CHECK(dlsym(library(), name.c_str()) != nullptr);
  }
  CHECK(std::string(mock->function_name(67)) == "C_WaitForSlotEvent");
  CHECK(mock->function_name(MOCK_FUNCTION_COUNT) == nullptr);
  // Internals stay hidden.
  CHECK(dlsym(library(), "_ZN7p11mux4mock6moduleEv") == nullptr);
  CHECK(dlsym(library(), "_ZN7p11mux4mock9kFunctionsE") == nullptr);
  CHECK(mock->calls("C_Nonexistent") == ~0UL);
}

TEST_CASE_FIXTURE(Fixture, "lifecycle: not initialized, double initialize, finalize arguments") {
  CK_INFO info{};
  CHECK(ck->C_GetInfo(&info) == CKR_CRYPTOKI_NOT_INITIALIZED);
  CHECK(ck->C_Finalize(nullptr) == CKR_CRYPTOKI_NOT_INITIALIZED);
  CK_SESSION_INFO sinfo{};
  CHECK(ck->C_GetSessionInfo(0x5000, &sinfo) == CKR_CRYPTOKI_NOT_INITIALIZED);
  CHECK(stats().calls_after_finalize == 3);

  REQUIRE(ck->C_Initialize(nullptr) == CKR_OK);
  CHECK(ck->C_Initialize(nullptr) == CKR_CRYPTOKI_ALREADY_INITIALIZED);
  CHECK(ck->C_GetInfo(&info) == CKR_OK);
  CHECK(info.cryptokiVersion.major == 2);
  int reserved = 0;
  CHECK(ck->C_Finalize(&reserved) == CKR_ARGUMENTS_BAD);
  CHECK(stats().initialized == 1);
  CHECK(ck->C_Finalize(nullptr) == CKR_OK);
  CHECK(ck->C_GetInfo(&info) == CKR_CRYPTOKI_NOT_INITIALIZED);

  MockStats st = stats();
  CHECK(st.initialized == 0);
  CHECK(st.initialize_calls == 2);
  CHECK(st.initialize_ok == 1);
  CHECK(st.finalize_calls == 3);
  CHECK(st.calls_after_finalize == 4);
  CHECK(st.calls[0] == 2);
  CHECK(mock->calls("C_GetInfo") == 3);

  // mock_reset() on an initialized mock finalizes it and says so.
  REQUIRE(ck->C_Initialize(nullptr) == CKR_OK);
  CHECK(mock->reset() == 1);
  CHECK(stats().initialized == 0);
  CHECK(stats().calls_total == 0);
}

TEST_CASE_FIXTURE(Fixture, "racing C_Initialize calls: exactly one succeeds") {
  std::latch start(8);
  std::atomic<int> ok{0}, already{0}, other{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&] {
      CK_C_INITIALIZE_ARGS args{};
      args.flags = CKF_OS_LOCKING_OK;
      start.arrive_and_wait();
      CK_RV rv = ck->C_Initialize(&args);
      ++(rv == CKR_OK ? ok : rv == CKR_CRYPTOKI_ALREADY_INITIALIZED ? already : other);
    });
  for (auto& t : threads) t.join();
  CHECK(ok == 1);
  CHECK(already == 7);
  CHECK(other == 0);
  CHECK(stats().initialize_ok == 1);
}

TEST_CASE_FIXTURE(Fixture, "C_Initialize locking acceptance matrix") {
  enum Form { NullArgs, NoLocking, Os, Callbacks, OsAndCallbacks };
  auto make_args = [](Form form) {
    CK_C_INITIALIZE_ARGS args{};
    if (form == Os || form == OsAndCallbacks) args.flags = CKF_OS_LOCKING_OK;
    if (form == Callbacks || form == OsAndCallbacks) {
      args.CreateMutex = create_mutex;
      args.DestroyMutex = destroy_mutex;
      args.LockMutex = lock_mutex;
      args.UnlockMutex = unlock_mutex;
    }
    return args;
  };
  const unsigned long masks[] = {MOCK_LOCK_OS, MOCK_LOCK_CALLBACKS, MOCK_LOCK_NONE,
                                 MOCK_LOCK_OS | MOCK_LOCK_NONE, MOCK_LOCK_ALL};
  for (unsigned long mask : masks) {
    for (Form form : {NullArgs, NoLocking, Os, Callbacks, OsAndCallbacks}) {
      CAPTURE(mask);
      CAPTURE(static_cast<int>(form));
      mock->reset();
      MockConfig cfg{};
      cfg.accept_locking = mask;
      configure(cfg);
      unsigned long wanted = form == NullArgs || form == NoLocking ? MOCK_LOCK_NONE
                             : form == Os                          ? MOCK_LOCK_OS
                             : form == Callbacks                   ? MOCK_LOCK_CALLBACKS
                                                 : MOCK_LOCK_OS | MOCK_LOCK_CALLBACKS;
      bool ok = (mask & wanted) != 0;
      CK_C_INITIALIZE_ARGS args = make_args(form);
      CK_RV rv = ck->C_Initialize(form == NullArgs ? nullptr : &args);
      CHECK(rv == (ok ? CKR_OK : CKR_CANT_LOCK));
      if (!ok) continue;
      MockStats st = stats();
      CHECK(st.init_null_args == (form == NullArgs));
      CHECK(st.init_had_callbacks == (form == Callbacks || form == OsAndCallbacks));
      CHECK(st.init_flags == args.flags * (form != NullArgs));
      if (form == OsAndCallbacks)
        CHECK(st.init_locking == ((mask & MOCK_LOCK_OS) ? MOCK_LOCK_OS : MOCK_LOCK_CALLBACKS));
      else
        CHECK(st.init_locking == wanted);
      CHECK(ck->C_Finalize(nullptr) == CKR_OK);
    }
  }

  SUBCASE("some but not all callbacks") {
    CK_C_INITIALIZE_ARGS args{};
    args.CreateMutex = create_mutex;
    args.flags = CKF_OS_LOCKING_OK;
    CHECK(ck->C_Initialize(&args) == CKR_ARGUMENTS_BAD);
  }
  SUBCASE("callbacks are exercised and the mutex destroyed at finalize") {
    int c = created, l = locked, u = unlocked, d = destroyed;
    CK_C_INITIALIZE_ARGS args = make_args(Callbacks);
    REQUIRE(ck->C_Initialize(&args) == CKR_OK);
    CHECK(created == c + 1);
    CHECK(locked == l + 1);
    CHECK(unlocked == u + 1);
    CHECK(destroyed == d);
    CHECK(ck->C_Finalize(nullptr) == CKR_OK);
    CHECK(destroyed == d + 1);
  }
  SUBCASE("pReserved is recorded") {
    char text[] = "configdir='sql:/tmp/x'";
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    args.pReserved = text;
    REQUIRE(ck->C_Initialize(&args) == CKR_OK);
    CHECK(std::string(stats().init_reserved) == text);
  }
}

TEST_CASE_FIXTURE(Fixture, "two threads on one session are a session violation") {
  MockConfig cfg{};
  cfg.call_spin_us = 300;
  configure(cfg);
  init_os();
  auto hammer = [&](std::vector<CK_SESSION_HANDLE> sessions) {
    std::latch start(static_cast<std::ptrdiff_t>(sessions.size()));
    std::vector<std::thread> threads;
    for (CK_SESSION_HANDLE h : sessions)
      threads.emplace_back([&, h] {
        start.arrive_and_wait();
        unsigned char buf[16];
        for (int i = 0; i < 60; ++i) CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
      });
    for (auto& t : threads) t.join();
  };

  SUBCASE("same session") {
    CK_SESSION_HANDLE h = open();
    hammer({h, h});
    CHECK(stats().session_violations > 0);
    CHECK(stats().library_violations == 0);  // OS locking: the library is thread-safe
  }
  SUBCASE("separate sessions") {
    hammer({open(), open()});
    MockStats st = stats();
    CHECK(st.session_violations == 0);
    CHECK(st.library_violations == 0);
    CHECK(st.max_concurrent_calls == 2);
    CHECK(st.last_random_len == 16);
  }
}

TEST_CASE_FIXTURE(Fixture, "overlapping calls into a library initialized without locking") {
  MockConfig cfg{};
  cfg.call_spin_us = 300;
  configure(cfg);
  REQUIRE(ck->C_Initialize(nullptr) == CKR_OK);
  CK_SESSION_HANDLE a = open(), b = open();
  std::latch start(2);
  auto run = [&](CK_SESSION_HANDLE h) {
    start.arrive_and_wait();
    unsigned char buf[8];
    for (int i = 0; i < 60; ++i) CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  };
  std::thread t1(run, a), t2(run, b);
  t1.join();
  t2.join();
  CHECK(stats().library_violations > 0);
  CHECK(stats().session_violations == 0);

  SUBCASE("serialized calls are fine") {
    mock->reset();
    configure(cfg);
    REQUIRE(ck->C_Initialize(nullptr) == CKR_OK);
    CK_SESSION_HANDLE c = open(), d = open();
    std::mutex serial;
    auto polite = [&](CK_SESSION_HANDLE h) {
      unsigned char buf[8];
      for (int i = 0; i < 20; ++i) {
        std::lock_guard lock(serial);
        CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
      }
    };
    std::thread t3(polite, c), t4(polite, d);
    t3.join();
    t4.join();
    CHECK(stats().library_violations == 0);
  }
}

TEST_CASE_FIXTURE(Fixture, "C_Finalize while another thread is inside a call") {
  MockConfig cfg{};
  cfg.slow_us = 300000;
  configure(cfg);
  init_os();
  CK_SESSION_HANDLE h = open();
  std::atomic<CK_RV> result{~0UL};
  std::thread slow([&] {
    unsigned char buf[4];
    result = ck->C_GenerateRandom(h, buf, sizeof buf);
  });
  while (mock->calls("C_GenerateRandom") == 0) std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(50ms);
  CHECK(ck->C_Finalize(nullptr) == CKR_OK);
  slow.join();
  CHECK(result == CKR_OK);  // the running call completes, no crash
  MockStats st = stats();
  CHECK(st.finalize_during_call == 1);
  CHECK(st.sessions_closed_by_finalize == 1);
  CHECK(st.sessions_open == 0);
  unsigned char buf[4];
  CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_CRYPTOKI_NOT_INITIALIZED);
  CHECK(stats().calls_after_finalize == 1);
}

// Sets an environment variable for one scope.
struct ScopedEnv {
  const char* name;
  ScopedEnv(const char* n, const char* value) : name(n) { setenv(n, value, 1); }
  ~ScopedEnv() { unsetenv(name); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
};

template <class F>
std::chrono::microseconds time_of(F&& f) {
  auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                               start);
}

TEST_CASE_FIXTURE(Fixture, "MOCK_* environment variables configure delays at C_Initialize") {
  SUBCASE("set: they override the configuration") {
    ScopedEnv open_us("MOCK_OPEN_SESSION_US", "20000");
    ScopedEnv slow_us("MOCK_SLOW_US", "20000");
    init_os();
    CK_SESSION_HANDLE h = 0;
    CHECK(time_of([&] { h = open(); }) >= 20ms);
    unsigned char buf[4];
    CHECK(time_of([&] { CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK); }) >= 20ms);
    // A later mock_configure() wins until the next C_Initialize.
    configure(MockConfig{});
    CHECK(time_of([&] { open(); }) < 20ms);
  }
  SUBCASE("unset: the configuration stands") {
    init_os();
    CHECK(time_of([&] { open(); }) < 20ms);
  }
  SUBCASE("not a number: C_Initialize fails, nothing changes") {
    {
      ScopedEnv open_us("MOCK_OPEN_SESSION_US", "20000");
      for (const char* bad : {"", "-1", "1ms", "x", "99999999999999999999999"}) {
        CAPTURE(bad);
        ScopedEnv spin("MOCK_CALL_SPIN_US", bad);
        CHECK(ck->C_Initialize(nullptr) == CKR_GENERAL_ERROR);
        CHECK(stats().initialized == 0);
      }
    }
    init_os();
    CHECK(time_of([&] { open(); }) < 20ms);  // the valid variable was not applied either
  }
}

TEST_CASE_FIXTURE(Fixture, "session handles, limits and token info") {
  MockConfig cfg{};
  cfg.slot_count = 2;
  cfg.max_sessions = 2;
  cfg.token_max_session_count = 2;
  cfg.token_max_rw_session_count = CK_UNAVAILABLE_INFORMATION;
  configure(cfg);
  init_os();

  CK_ULONG count = 0;
  REQUIRE(ck->C_GetSlotList(CK_TRUE, nullptr, &count) == CKR_OK);
  CHECK(count == 2);
  CK_SLOT_ID slots[1];
  count = 1;
  CHECK(ck->C_GetSlotList(CK_TRUE, slots, &count) == CKR_BUFFER_TOO_SMALL);
  CHECK(count == 2);

  CK_SESSION_HANDLE a = open(), b = open(CKF_SERIAL_SESSION);
  CHECK(a == MOCK_SESSION_HANDLE_BASE);
  CHECK(b == MOCK_SESSION_HANDLE_BASE + 1);
  CK_SESSION_HANDLE c = 0;
  CHECK(ck->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &c) == CKR_SESSION_COUNT);
  CHECK(ck->C_OpenSession(0, CKF_RW_SESSION, nullptr, nullptr, &c) ==
        CKR_SESSION_PARALLEL_NOT_SUPPORTED);
  CHECK(ck->C_OpenSession(7, CKF_SERIAL_SESSION, nullptr, nullptr, &c) == CKR_SLOT_ID_INVALID);

  CK_TOKEN_INFO info{};
  REQUIRE(ck->C_GetTokenInfo(0, &info) == CKR_OK);
  CHECK(std::string(reinterpret_cast<char*>(info.label), 12) == "mock-token-0");
  CHECK(info.ulMaxSessionCount == 2);
  CHECK(info.ulMaxRwSessionCount == CK_UNAVAILABLE_INFORMATION);
  CHECK(info.ulSessionCount == 2);
  CHECK(info.ulRwSessionCount == 1);
  REQUIRE(ck->C_GetTokenInfo(1, &info) == CKR_OK);
  CHECK(std::string(reinterpret_cast<char*>(info.label), 12) == "mock-token-1");

  CK_SESSION_INFO sinfo{};
  for (CK_SESSION_HANDLE bad : {0UL, 1UL, MOCK_SESSION_HANDLE_BASE - 1, b + 1})
    CHECK(ck->C_GetSessionInfo(bad, &sinfo) == CKR_SESSION_HANDLE_INVALID);
  REQUIRE(ck->C_GetSessionInfo(b, &sinfo) == CKR_OK);
  CHECK(sinfo.flags == CKF_SERIAL_SESSION);
  CHECK(stats().last_session == b);

  CHECK(ck->C_CloseSession(a) == CKR_OK);
  CHECK(ck->C_CloseSession(a) == CKR_SESSION_HANDLE_INVALID);
  CK_SESSION_HANDLE d = open();
  CHECK(d == MOCK_SESSION_HANDLE_BASE + 2);  // never reused
  CK_SESSION_HANDLE other = open(CKF_SERIAL_SESSION, 1);
  CHECK(ck->C_CloseAllSessions(0) == CKR_OK);
  CHECK(ck->C_GetSessionInfo(b, &sinfo) == CKR_SESSION_HANDLE_INVALID);
  CHECK(ck->C_GetSessionInfo(other, &sinfo) == CKR_OK);
  CHECK(sinfo.slotID == 1);
  MockStats st = stats();
  CHECK(st.sessions_open == 1);
  CHECK(st.sessions_opened_total == 4);
  CHECK(st.sessions_closed_total == 3);

  CHECK(mock->drop_sessions() == 1);
  CHECK(ck->C_GetSessionInfo(other, &sinfo) == CKR_SESSION_HANDLE_INVALID);
  CHECK(stats().sessions_dropped == 1);
}

TEST_CASE_FIXTURE(Fixture, "login is per token and ends with the last session") {
  init_os();
  CK_SESSION_HANDLE rw = open(), ro = open(CKF_SERIAL_SESSION);
  CHECK(state(rw) == CKS_RW_PUBLIC_SESSION);
  CHECK(state(ro) == CKS_RO_PUBLIC_SESSION);

  CHECK(ck->C_Login(rw, CKU_USER, pin("9999"), 4) == CKR_PIN_INCORRECT);
  CHECK(ck->C_Login(rw, CKU_USER, pin("1234"), 3) == CKR_PIN_INCORRECT);
  CHECK(ck->C_Login(rw, 77, pin("1234"), 4) == CKR_USER_TYPE_INVALID);
  CHECK(ck->C_Logout(rw) == CKR_USER_NOT_LOGGED_IN);
  CHECK(ck->C_Login(rw, CKU_USER, pin(MOCK_USER_PIN), 4) == CKR_OK);
  CHECK(ck->C_Login(ro, CKU_USER, pin(MOCK_USER_PIN), 4) == CKR_USER_ALREADY_LOGGED_IN);
  CHECK(ck->C_Login(ro, CKU_SO, pin(MOCK_SO_PIN), 4) == CKR_USER_ANOTHER_ALREADY_LOGGED_IN);
  CHECK(state(rw) == CKS_RW_USER_FUNCTIONS);
  CHECK(state(ro) == CKS_RO_USER_FUNCTIONS);
  CHECK(mock->token_user(0) == CKU_USER);

  CHECK(ck->C_Logout(ro) == CKR_OK);  // from any session
  CHECK(state(rw) == CKS_RW_PUBLIC_SESSION);
  CHECK(ck->C_Logout(rw) == CKR_USER_NOT_LOGGED_IN);

  CHECK(ck->C_Login(rw, CKU_SO, pin(MOCK_SO_PIN), 4) == CKR_SESSION_READ_ONLY_EXISTS);
  CHECK(ck->C_CloseSession(ro) == CKR_OK);
  CHECK(ck->C_Login(rw, CKU_SO, pin(MOCK_SO_PIN), 4) == CKR_OK);
  CHECK(state(rw) == CKS_RW_SO_FUNCTIONS);
  CK_SESSION_HANDLE h = 0;
  CHECK(ck->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
        CKR_SESSION_READ_WRITE_SO_EXISTS);
  CHECK(ck->C_Logout(rw) == CKR_OK);

  CHECK(ck->C_Login(rw, CKU_USER, pin(MOCK_USER_PIN), 4) == CKR_OK);
  CK_SESSION_HANDLE second = open(CKF_SERIAL_SESSION);
  CHECK(ck->C_CloseSession(rw) == CKR_OK);
  CHECK(mock->token_user(0) == CKU_USER);  // "second" still open
  CHECK(ck->C_CloseSession(second) == CKR_OK);
  CHECK(mock->token_user(0) == MOCK_NOBODY);
  CHECK(state(open()) == CKS_RW_PUBLIC_SESSION);

  SUBCASE("C_SetPIN changes the PIN until reset") {
    CK_SESSION_HANDLE s = open();
    CHECK(ck->C_SetPIN(s, pin("1234"), 4, pin("5678"), 4) == CKR_OK);
    CHECK(ck->C_Login(s, CKU_USER, pin("1234"), 4) == CKR_PIN_INCORRECT);
    CHECK(ck->C_Login(s, CKU_USER, pin("5678"), 4) == CKR_OK);
  }
}

TEST_CASE_FIXTURE(Fixture, "operation state rules") {
  init_os();
  CK_SESSION_HANDLE h = open();
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  Buffer data = bytes("hello mock");
  unsigned char expected[MOCK_DIGEST_LEN];
  mock->reference_digest(data.data(), data.size(), expected);
  unsigned char out[64];
  CK_ULONG len = sizeof out;

  CHECK(ck->C_Digest(h, data.data(), data.size(), out, &len) == CKR_OPERATION_NOT_INITIALIZED);
  REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
  CHECK(ck->C_DigestInit(h, &sha) == CKR_OPERATION_ACTIVE);

  len = 0;
  CHECK(ck->C_Digest(h, data.data(), data.size(), nullptr, &len) == CKR_OK);  // size query
  CHECK(len == MOCK_DIGEST_LEN);
  len = 10;
  CHECK(ck->C_Digest(h, data.data(), data.size(), out, &len) == CKR_BUFFER_TOO_SMALL);
  CHECK(len == MOCK_DIGEST_LEN);
  len = sizeof out;
  CHECK(ck->C_Digest(h, data.data(), data.size(), out, &len) == CKR_OK);
  CHECK(len == MOCK_DIGEST_LEN);
  CHECK(std::memcmp(out, expected, MOCK_DIGEST_LEN) == 0);
  CHECK(ck->C_Digest(h, data.data(), data.size(), out, &len) == CKR_OPERATION_NOT_INITIALIZED);

  SUBCASE("an error ends the operation") {
    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(ck->C_Digest(h, data.data(), data.size(), out, nullptr) == CKR_ARGUMENTS_BAD);
    CHECK(ck->C_DigestFinal(h, out, &len) == CKR_OPERATION_NOT_INITIALIZED);
    CHECK(ck->C_DigestInit(h, &sha) == CKR_OK);
  }
  SUBCASE("multi-part equals single-part; C_Digest cannot finish it") {
    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(ck->C_DigestUpdate(h, data.data(), 5) == CKR_OK);
    CHECK(ck->C_DigestUpdate(h, data.data() + 5, data.size() - 5) == CKR_OK);
    len = sizeof out;
    CHECK(ck->C_DigestFinal(h, out, &len) == CKR_OK);
    CHECK(std::memcmp(out, expected, MOCK_DIGEST_LEN) == 0);

    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(ck->C_DigestUpdate(h, data.data(), 5) == CKR_OK);
    CHECK(ck->C_Digest(h, data.data(), data.size(), out, &len) == CKR_OPERATION_ACTIVE);
    CHECK(ck->C_DigestFinal(h, out, &len) == CKR_OPERATION_NOT_INITIALIZED);
  }
  SUBCASE("find") {
    CK_OBJECT_HANDLE found[4];
    CK_ULONG n = 0;
    CHECK(ck->C_FindObjects(h, found, 4, &n) == CKR_OPERATION_NOT_INITIALIZED);
    REQUIRE(ck->C_FindObjectsInit(h, nullptr, 0) == CKR_OK);
    CHECK(ck->C_FindObjectsInit(h, nullptr, 0) == CKR_OPERATION_ACTIVE);
    CHECK(ck->C_FindObjects(h, found, 4, &n) == CKR_OK);
    CHECK(n == 0);
    CHECK(ck->C_FindObjectsFinal(h) == CKR_OK);
    CHECK(ck->C_FindObjectsFinal(h) == CKR_OPERATION_NOT_INITIALIZED);
  }
  SUBCASE("operations of different kinds coexist; sessions are independent") {
    CK_OBJECT_HANDLE key = secret_key(h);
    CK_MECHANISM aes{CKM_AES_ECB, nullptr, 0};
    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(ck->C_EncryptInit(h, &aes, key) == CKR_OK);
    CK_SESSION_HANDLE other = open();
    CHECK(ck->C_DigestInit(other, &sha) == CKR_OK);
  }
  SUBCASE("NULL mechanism: ARGUMENTS_BAD in v2, cancels in v3") {
    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(ck->C_DigestInit(h, nullptr) == CKR_ARGUMENTS_BAD);
    MockConfig cfg{};
    cfg.provide_v3 = 1;
    configure(cfg);
    CHECK(ck->C_DigestInit(h, nullptr) == CKR_OK);
    CHECK(ck->C_DigestInit(h, &sha) == CKR_OK);
  }
}

TEST_CASE_FIXTURE(Fixture, "sign, verify, encrypt and decrypt are checkable") {
  init_os();
  CK_SESSION_HANDLE h = open();
  Buffer data = bytes("to be signed");
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CK_MECHANISM aes{CKM_AES_ECB, nullptr, 0};
  CK_OBJECT_HANDLE key = secret_key(h);
  CHECK(key >= MOCK_OBJECT_HANDLE_BASE);

  unsigned char expected[MOCK_DIGEST_LEN], sig[MOCK_DIGEST_LEN];
  mock->reference_signature(key, data.data(), data.size(), expected);
  CK_ULONG len = sizeof sig;
  REQUIRE(ck->C_SignInit(h, &ecdsa, key) == CKR_OK);
  REQUIRE(ck->C_Sign(h, data.data(), data.size(), sig, &len) == CKR_OK);
  CHECK(std::memcmp(sig, expected, sizeof sig) == 0);

  REQUIRE(ck->C_SignInit(h, &ecdsa, key) == CKR_OK);
  CHECK(ck->C_SignUpdate(h, data.data(), 3) == CKR_OK);
  CHECK(ck->C_SignUpdate(h, data.data() + 3, data.size() - 3) == CKR_OK);
  len = sizeof sig;
  CHECK(ck->C_SignFinal(h, sig, &len) == CKR_OK);
  CHECK(std::memcmp(sig, expected, sizeof sig) == 0);

  REQUIRE(ck->C_VerifyInit(h, &ecdsa, key) == CKR_OK);
  CHECK(ck->C_Verify(h, data.data(), data.size(), sig, sizeof sig) == CKR_OK);
  CHECK(ck->C_Verify(h, data.data(), data.size(), sig, sizeof sig) ==
        CKR_OPERATION_NOT_INITIALIZED);
  sig[0] ^= 1;
  REQUIRE(ck->C_VerifyInit(h, &ecdsa, key) == CKR_OK);
  CHECK(ck->C_Verify(h, data.data(), data.size(), sig, sizeof sig) == CKR_SIGNATURE_INVALID);
  CHECK(ck->C_VerifyFinal(h, sig, sizeof sig) == CKR_OPERATION_NOT_INITIALIZED);
  CHECK(ck->C_SignInit(h, &ecdsa, 0x1234) == CKR_KEY_HANDLE_INVALID);

  SUBCASE("key pair: the public key verifies the private key's signature") {
    CK_OBJECT_HANDLE pub = 0, priv = 0;
    CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
    REQUIRE(ck->C_GenerateKeyPair(h, &gen, nullptr, 0, nullptr, 0, &pub, &priv) == CKR_OK);
    REQUIRE(ck->C_SignInit(h, &ecdsa, priv) == CKR_OK);
    len = sizeof sig;
    REQUIRE(ck->C_Sign(h, data.data(), data.size(), sig, &len) == CKR_OK);
    mock->reference_signature(priv, data.data(), data.size(), expected);
    CHECK(std::memcmp(sig, expected, sizeof sig) == 0);
    REQUIRE(ck->C_VerifyInit(h, &ecdsa, pub) == CKR_OK);
    CHECK(ck->C_VerifyUpdate(h, data.data(), data.size()) == CKR_OK);
    CHECK(ck->C_VerifyFinal(h, sig, sizeof sig) == CKR_OK);
  }
  SUBCASE("encrypt and decrypt XOR with the key byte") {
    Buffer plain = bytes("secret"), cipher(plain.size()), back(plain.size());
    REQUIRE(ck->C_EncryptInit(h, &aes, key) == CKR_OK);
    len = 0;
    CHECK(ck->C_Encrypt(h, plain.data(), plain.size(), nullptr, &len) == CKR_OK);
    CHECK(len == plain.size());
    CHECK(ck->C_Encrypt(h, plain.data(), plain.size(), cipher.data(), &len) == CKR_OK);
    for (std::size_t i = 0; i < plain.size(); ++i)
      CHECK(cipher[i] == (plain[i] ^ mock->reference_xor_byte(key)));
    REQUIRE(ck->C_DecryptInit(h, &aes, key) == CKR_OK);
    len = back.size();
    CHECK(ck->C_DecryptUpdate(h, cipher.data(), cipher.size(), back.data(), &len) == CKR_OK);
    CK_ULONG last = 0;
    CHECK(ck->C_DecryptFinal(h, nullptr, &last) == CKR_OK);
    CHECK(last == 0);
    CHECK(ck->C_DecryptFinal(h, back.data(), &last) == CKR_OK);
    CHECK(back == plain);
    CHECK(ck->C_DecryptFinal(h, back.data(), &last) == CKR_OPERATION_NOT_INITIALIZED);
  }
  SUBCASE("CKA_ALWAYS_AUTHENTICATE needs a context-specific login") {
    CHECK(ck->C_Login(h, CKU_USER, pin(MOCK_USER_PIN), 4) == CKR_OK);
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE templ[] = {{CKA_PRIVATE, &yes, sizeof yes},
                            {CKA_ALWAYS_AUTHENTICATE, &yes, sizeof yes}};
    CK_OBJECT_HANDLE pub = 0, priv = 0;
    CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
    REQUIRE(ck->C_GenerateKeyPair(h, &gen, nullptr, 0, templ, 2, &pub, &priv) == CKR_OK);
    REQUIRE(ck->C_SignInit(h, &ecdsa, priv) == CKR_OK);
    len = sizeof sig;
    CHECK(ck->C_Sign(h, data.data(), data.size(), sig, &len) == CKR_USER_NOT_LOGGED_IN);
    REQUIRE(ck->C_SignInit(h, &ecdsa, priv) == CKR_OK);
    CHECK(ck->C_Login(h, CKU_CONTEXT_SPECIFIC, pin(MOCK_USER_PIN), 4) == CKR_OK);
    CHECK(ck->C_Sign(h, data.data(), data.size(), sig, &len) == CKR_OK);
    CHECK(ck->C_Logout(h) == CKR_OK);
    CHECK(ck->C_SignInit(h, &ecdsa, priv) == CKR_USER_NOT_LOGGED_IN);
  }
}

TEST_CASE_FIXTURE(Fixture, "objects: session objects die with their session") {
  init_os();
  CK_SESSION_HANDLE a = open(), b = open(), ro = open(CKF_SERIAL_SESSION);
  CK_OBJECT_CLASS cls = CKO_DATA;
  CK_BBOOL yes = CK_TRUE;
  char label[] = "label-1";
  CK_ATTRIBUTE session_templ[] = {{CKA_CLASS, &cls, sizeof cls},
                                  {CKA_LABEL, label, sizeof label - 1}};
  CK_ATTRIBUTE token_templ[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_TOKEN, &yes, sizeof yes}};
  CK_OBJECT_HANDLE obj = 0, tok = 0;
  REQUIRE(ck->C_CreateObject(a, session_templ, 2, &obj) == CKR_OK);
  CHECK(ck->C_CreateObject(ro, token_templ, 2, &tok) == CKR_SESSION_READ_ONLY);
  REQUIRE(ck->C_CreateObject(a, token_templ, 2, &tok) == CKR_OK);
  CHECK(stats().session_objects == 1);
  CHECK(stats().token_objects == 1);

  // Visible from another session; attribute conventions.
  char buf[32];
  CK_ATTRIBUTE get{CKA_LABEL, nullptr, 0};
  REQUIRE(ck->C_GetAttributeValue(b, obj, &get, 1) == CKR_OK);
  CHECK(get.ulValueLen == sizeof label - 1);
  get.pValue = buf;
  get.ulValueLen = 2;
  CHECK(ck->C_GetAttributeValue(b, obj, &get, 1) == CKR_BUFFER_TOO_SMALL);
  CHECK(get.ulValueLen == CK_UNAVAILABLE_INFORMATION);
  get.ulValueLen = sizeof buf;
  REQUIRE(ck->C_GetAttributeValue(b, obj, &get, 1) == CKR_OK);
  CHECK(std::string(buf, get.ulValueLen) == label);
  CK_ATTRIBUTE missing{CKA_VALUE, nullptr, 0};
  CHECK(ck->C_GetAttributeValue(b, obj, &missing, 1) == CKR_ATTRIBUTE_TYPE_INVALID);

  CK_ATTRIBUTE find_templ[] = {{CKA_LABEL, label, sizeof label - 1}};
  REQUIRE(ck->C_FindObjectsInit(b, find_templ, 1) == CKR_OK);
  CK_OBJECT_HANDLE found[4];
  CK_ULONG n = 0;
  CHECK(ck->C_FindObjects(b, found, 4, &n) == CKR_OK);
  CHECK(n == 1);
  CHECK(found[0] == obj);
  CHECK(ck->C_FindObjectsFinal(b) == CKR_OK);

  CK_OBJECT_HANDLE copy = 0;
  REQUIRE(ck->C_CopyObject(b, obj, nullptr, 0, &copy) == CKR_OK);  // owned by b
  CHECK(ck->C_CloseSession(a) == CKR_OK);
  CHECK(ck->C_GetAttributeValue(b, obj, &get, 1) == CKR_OBJECT_HANDLE_INVALID);
  CHECK(ck->C_GetAttributeValue(b, copy, &get, 1) == CKR_OK);
  CHECK(stats().session_objects == 1);
  CHECK(ck->C_DestroyObject(b, copy) == CKR_OK);
  CHECK(ck->C_DestroyObject(ro, tok) == CKR_SESSION_READ_ONLY);

  // Token objects outlive C_Finalize, not mock_reset().
  REQUIRE(ck->C_Finalize(nullptr) == CKR_OK);
  init_os();
  CK_SESSION_HANDLE c = open();
  CK_ULONG size = 0;
  CHECK(ck->C_GetObjectSize(c, tok, &size) == CKR_OK);
  CHECK(stats().token_objects == 1);
  CHECK(stats().session_objects == 0);

  SUBCASE("private objects are invisible until login") {
    CK_ATTRIBUTE priv_templ[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_PRIVATE, &yes, sizeof yes}};
    CK_OBJECT_HANDLE priv = 0;
    CHECK(ck->C_CreateObject(c, priv_templ, 2, &priv) == CKR_USER_NOT_LOGGED_IN);
    REQUIRE(ck->C_Login(c, CKU_USER, pin(MOCK_USER_PIN), 4) == CKR_OK);
    REQUIRE(ck->C_CreateObject(c, priv_templ, 2, &priv) == CKR_OK);
    CHECK(ck->C_GetObjectSize(c, priv, &size) == CKR_OK);
    REQUIRE(ck->C_Logout(c) == CKR_OK);
    CHECK(ck->C_GetObjectSize(c, priv, &size) == CKR_OBJECT_HANDLE_INVALID);
  }
}

TEST_CASE_FIXTURE(Fixture, "C_WaitForSlotEvent") {
  MockConfig cfg{};
  cfg.slot_count = 2;
  configure(cfg);
  init_os();
  CK_SLOT_ID slot = 99;
  CHECK(ck->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_NO_EVENT);
  mock->trigger_slot_event(1);
  CHECK(ck->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_OK);
  CHECK(slot == 1);
  CHECK(ck->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_NO_EVENT);
  int reserved = 0;
  CHECK(ck->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, &reserved) == CKR_ARGUMENTS_BAD);

  SUBCASE("blocking wait returns on an event") {
    std::atomic<CK_RV> rv{~0UL};
    std::atomic<CK_SLOT_ID> got{99};
    std::thread waiter([&] {
      CK_SLOT_ID s = 99;
      rv = ck->C_WaitForSlotEvent(0, &s, nullptr);
      got = s;
    });
    std::this_thread::sleep_for(50ms);
    CHECK(rv == ~0UL);  // still blocked
    mock->trigger_slot_event(0);
    waiter.join();
    CHECK(rv == CKR_OK);
    CHECK(got == 0);
  }
  SUBCASE("blocking wait returns CKR_CRYPTOKI_NOT_INITIALIZED at C_Finalize") {
    std::atomic<CK_RV> rv{~0UL};
    std::thread waiter([&] {
      CK_SLOT_ID s = 99;
      rv = ck->C_WaitForSlotEvent(0, &s, nullptr);
    });
    while (mock->calls("C_WaitForSlotEvent") < 5) std::this_thread::sleep_for(1ms);
    std::this_thread::sleep_for(50ms);
    CHECK(ck->C_Finalize(nullptr) == CKR_OK);
    waiter.join();
    CHECK(rv == CKR_CRYPTOKI_NOT_INITIALIZED);
    CHECK(stats().finalize_during_call == 0);  // a blocked waiter is allowed
  }
  SUBCASE("blocking form unsupported, like SoftHSM2") {
    cfg.wait_blocking_unsupported = 1;
    configure(cfg);
    CHECK(ck->C_WaitForSlotEvent(0, &slot, nullptr) == CKR_FUNCTION_NOT_SUPPORTED);
    mock->trigger_slot_event(0);
    CHECK(ck->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_OK);
  }
}

namespace {
struct NotifyRecord {
  std::atomic<int> calls{0};
  CK_SESSION_HANDLE session = 0;
  CK_NOTIFICATION event = 0;
};
CK_RV on_notify(CK_SESSION_HANDLE h, CK_NOTIFICATION event, CK_VOID_PTR app) {
  auto* rec = static_cast<NotifyRecord*>(app);
  rec->session = h;
  rec->event = event;
  ++rec->calls;
  return CKR_OK;
}
}  // namespace

TEST_CASE_FIXTURE(Fixture, "Notify callbacks get the backend handle and pApplication") {
  init_os();
  NotifyRecord rec;
  CK_SESSION_HANDLE with = 0;
  REQUIRE(ck->C_OpenSession(0, CKF_SERIAL_SESSION, &rec, on_notify, &with) == CKR_OK);
  open();  // without Notify
  CHECK(mock->fire_notify(CKN_SURRENDER) == 1);
  CHECK(rec.calls == 1);
  CHECK(rec.session == with);
  CHECK(rec.event == CKN_SURRENDER);
  CHECK(ck->C_CloseSession(with) == CKR_OK);
  CHECK(mock->fire_notify(CKN_SURRENDER) == 0);
}

TEST_CASE_FIXTURE(Fixture, "failure injection") {
  MockConfig cfg{};
  std::strcpy(cfg.fail_function, "C_Bogus");
  CHECK(mock->configure(&cfg) == -1);

  std::strcpy(cfg.fail_function, "C_GenerateRandom");
  cfg.fail_rv = CKR_DEVICE_ERROR;
  configure(cfg);
  init_os();
  CK_SESSION_HANDLE h = open();
  unsigned char buf[4];
  CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_DEVICE_ERROR);
  CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_DEVICE_ERROR);
  CHECK(ck->C_GenerateRandom(0x1, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);

  SUBCASE("only the Nth call") {
    cfg.fail_nth = 2;
    configure(cfg);
    CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
    CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_DEVICE_ERROR);
    CHECK(ck->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  }
  SUBCASE("an injected error ends the operation it continues") {
    std::strcpy(cfg.fail_function, "C_DigestUpdate");
    configure(cfg);
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(ck->C_DigestUpdate(h, buf, sizeof buf) == CKR_DEVICE_ERROR);
    unsigned char out[MOCK_DIGEST_LEN];
    CK_ULONG len = sizeof out;
    CHECK(ck->C_DigestFinal(h, out, &len) == CKR_OPERATION_NOT_INITIALIZED);
  }
  SUBCASE("C_Initialize and C_OpenSession can fail too") {
    REQUIRE(ck->C_Finalize(nullptr) == CKR_OK);
    std::strcpy(cfg.fail_function, "C_Initialize");
    cfg.fail_rv = CKR_GENERAL_ERROR;
    cfg.fail_nth = 1;
    configure(cfg);
    CHECK(ck->C_Initialize(nullptr) == CKR_GENERAL_ERROR);
    CHECK(ck->C_Initialize(nullptr) == CKR_OK);
    std::strcpy(cfg.fail_function, "C_OpenSession");
    cfg.fail_rv = CKR_DEVICE_REMOVED;
    configure(cfg);
    CK_SESSION_HANDLE s = 0;
    CHECK(ck->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &s) == CKR_DEVICE_REMOVED);
    CHECK(stats().sessions_open == 0);
  }
}

TEST_CASE_FIXTURE(Fixture, "v3.0 interfaces") {
  auto get_list = symbol<CK_C_GetInterfaceList>("C_GetInterfaceList");
  auto get_interface = symbol<CK_C_GetInterface>("C_GetInterface");
  REQUIRE(static_cast<bool>(get_list));
  REQUIRE(static_cast<bool>(get_interface));
  CK_ULONG count = 0;
  CK_INTERFACE* iface = nullptr;
  CHECK(get_list(nullptr, &count) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(get_interface(nullptr, nullptr, &iface, 0) == CKR_FUNCTION_NOT_SUPPORTED);

  MockConfig cfg{};
  cfg.provide_v3 = 1;
  configure(cfg);
  REQUIRE(get_list(nullptr, &count) == CKR_OK);
  CHECK(count == 2);
  std::array<CK_INTERFACE, 2> list{};
  REQUIRE(get_list(list.data(), &count) == CKR_OK);
  CHECK(std::string(reinterpret_cast<char*>(list[0].pInterfaceName)) == "PKCS 11");
  CHECK(static_cast<CK_VERSION*>(list[0].pFunctionList)->major == 3);
  CHECK(static_cast<CK_VERSION*>(list[1].pFunctionList)->minor == 40);

  REQUIRE(get_interface(nullptr, nullptr, &iface, 0) == CKR_OK);
  auto* f3 = static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
  CHECK(f3->version.major == 3);
  CK_VERSION v240{2, 40};
  REQUIRE(get_interface(pin("PKCS 11"), &v240, &iface, 0) == CKR_OK);
  CHECK(iface->pFunctionList == ck);
  CHECK(get_interface(pin("Vendor"), nullptr, &iface, 0) == CKR_ARGUMENTS_BAD);
  CHECK(get_interface(nullptr, nullptr, &iface, CKF_INTERFACE_FORK_SAFE) == CKR_ARGUMENTS_BAD);

  auto* first = reinterpret_cast<void**>(&f3->C_Initialize);
  for (unsigned long i = 0; i < MOCK_FUNCTION_COUNT; ++i) CHECK(first[i] != nullptr);

  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  REQUIRE(f3->C_Initialize(&args) == CKR_OK);
  CK_INFO info{};
  REQUIRE(f3->C_GetInfo(&info) == CKR_OK);
  CHECK(info.cryptokiVersion.major == 3);
  CK_SESSION_HANDLE h = open();
  CHECK(f3->C_LoginUser(h, CKU_USER, pin(MOCK_USER_PIN), 4, pin("bob"), 3) == CKR_OK);
  CHECK(state(h) == CKS_RW_USER_FUNCTIONS);

  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  REQUIRE(f3->C_DigestInit(h, &sha) == CKR_OK);
  CHECK(f3->C_SessionCancel(h, CKF_SIGN) == CKR_OK);
  CHECK(f3->C_DigestInit(h, &sha) == CKR_OPERATION_ACTIVE);
  CHECK(f3->C_SessionCancel(h, CKF_DIGEST) == CKR_OK);
  CHECK(f3->C_DigestInit(h, &sha) == CKR_OK);
  CHECK(f3->C_MessageSignInit(h, &sha, 0) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(f3->C_MessageSignInit(0x42, &sha, 0) == CKR_SESSION_HANDLE_INVALID);
  CHECK(mock->calls("C_MessageSignInit") == 2);
}

// ---- the spec bends (MockConfig.bend): each deviation seen by a direct caller ----

namespace {

MockConfig bending(unsigned long bits) {
  MockConfig cfg{};
  cfg.bend = bits;
  return cfg;
}

}  // namespace

TEST_CASE_FIXTURE(Fixture, "bend keep-op: an error leaves the operation active") {
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  Buffer data = bytes("so far");
  unsigned char expected[MOCK_DIGEST_LEN], out[MOCK_DIGEST_LEN];
  mock->reference_digest(data.data(), data.size(), expected);
  CK_ULONG len = sizeof out;

  SUBCASE("obeying (bend 0): C_DigestKey on a bad key ends the digest") {
    init_os();
    CK_SESSION_HANDLE h = open();
    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    REQUIRE(ck->C_DigestUpdate(h, data.data(), data.size()) == CKR_OK);
    CHECK(ck->C_DigestKey(h, 0xdead) == CKR_KEY_HANDLE_INVALID);
    CHECK(ck->C_DigestFinal(h, out, &len) == CKR_OPERATION_NOT_INITIALIZED);
    CHECK(ck->C_DigestInit(h, &sha) == CKR_OK);
    CHECK(stats().bend_ops_kept == 0);
  }
  SUBCASE("bending: the digest survives C_DigestKey's error, like SoftHSM2") {
    configure(bending(MOCK_BEND_KEEP_OP));
    init_os();
    CK_SESSION_HANDLE h = open();
    REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
    REQUIRE(ck->C_DigestUpdate(h, data.data(), data.size()) == CKR_OK);
    CHECK(ck->C_DigestKey(h, 0xdead) == CKR_KEY_HANDLE_INVALID);
    CHECK(ck->C_DigestInit(h, &sha) == CKR_OPERATION_ACTIVE);
    REQUIRE(ck->C_DigestFinal(h, out, &len) == CKR_OK);
    CHECK(std::memcmp(out, expected, sizeof out) == 0);  // the data so far
    CHECK(stats().bend_ops_kept == 1);
  }
  SUBCASE("bending: single-part, Update and Final errors keep sign and verify too") {
    configure(bending(MOCK_BEND_KEEP_OP));
    init_os();
    CK_SESSION_HANDLE h = open();
    CK_OBJECT_HANDLE key = secret_key(h);
    CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
    REQUIRE(ck->C_SignInit(h, &mac, key) == CKR_OK);
    CHECK(ck->C_Sign(h, nullptr, 5, out, &len) == CKR_ARGUMENTS_BAD);
    CHECK(ck->C_SignInit(h, &mac, key) == CKR_OPERATION_ACTIVE);
    CHECK(ck->C_SignUpdate(h, nullptr, 5) == CKR_ARGUMENTS_BAD);
    CHECK(ck->C_SignFinal(h, nullptr, nullptr) == CKR_ARGUMENTS_BAD);
    CHECK(ck->C_SignInit(h, &mac, key) == CKR_OPERATION_ACTIVE);
    REQUIRE(ck->C_VerifyInit(h, &mac, key) == CKR_OK);
    unsigned char wrong[MOCK_DIGEST_LEN] = {};
    CHECK(ck->C_Verify(h, data.data(), data.size(), wrong, sizeof wrong) == CKR_SIGNATURE_INVALID);
    CHECK(ck->C_VerifyInit(h, &mac, key) == CKR_OPERATION_ACTIVE);
    CHECK(stats().bend_ops_kept == 4);
    // Only closing the session ends them.
    REQUIRE(ck->C_CloseSession(h) == CKR_OK);
  }
  ck->C_Finalize(nullptr);
}

TEST_CASE_FIXTURE(Fixture, "bend fill-len: a short buffer gets the length it needs") {
  unsigned long bits = 0;
  SUBCASE("obeying") { bits = 0; }
  SUBCASE("bending") { bits = MOCK_BEND_FILL_LEN; }
  configure(bending(bits));
  init_os();
  CK_SESSION_HANDLE h = open();
  unsigned char label[] = "a label of 24 characters";
  CK_OBJECT_CLASS cls = CKO_DATA;
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, label, sizeof label - 1}};
  CK_OBJECT_HANDLE obj = 0;
  REQUIRE(ck->C_CreateObject(h, templ, 2, &obj) == CKR_OK);
  unsigned char small[4];
  CK_ATTRIBUTE get{CKA_LABEL, small, sizeof small};
  CHECK(ck->C_GetAttributeValue(h, obj, &get, 1) == CKR_BUFFER_TOO_SMALL);
  if (bits != 0) {
    CHECK(get.ulValueLen == sizeof label - 1);
    CHECK(stats().bend_lengths_filled == 1);
  } else {
    CHECK(get.ulValueLen == CK_UNAVAILABLE_INFORMATION);
    CHECK(stats().bend_lengths_filled == 0);
  }
  ck->C_Finalize(nullptr);
}

TEST_CASE_FIXTURE(Fixture, "bend reuse-handles: the lowest free number at once") {
  SUBCASE("obeying: never reused") {
    init_os();
    CK_SESSION_HANDLE a = open();
    CK_OBJECT_HANDLE k = secret_key(a);
    REQUIRE(ck->C_DestroyObject(a, k) == CKR_OK);
    CHECK(secret_key(a) != k);
    REQUIRE(ck->C_CloseSession(a) == CKR_OK);
    CHECK(open() != a);
  }
  SUBCASE("bending") {
    configure(bending(MOCK_BEND_REUSE_HANDLES));
    init_os();
    CK_SESSION_HANDLE a = open(), b = open();
    CHECK(a == MOCK_SESSION_HANDLE_BASE);
    CHECK(b == MOCK_SESSION_HANDLE_BASE + 1);
    CK_OBJECT_HANDLE k1 = secret_key(b), k2 = secret_key(b);
    REQUIRE(ck->C_DestroyObject(b, k1) == CKR_OK);
    CHECK(secret_key(b) == k1);
    REQUIRE(ck->C_CloseSession(a) == CKR_OK);
    CHECK(open() == a);
    // Closing b destroys its keys: the next key of a new session gets k1 again.
    REQUIRE(ck->C_CloseSession(b) == CKR_OK);
    CK_SESSION_HANDLE c = open();
    CHECK(c == b);
    CHECK(secret_key(c) == k1);
    CHECK(secret_key(c) == k2);
    CHECK(stats().bend_handles_reused == 5);
  }
  ck->C_Finalize(nullptr);
}

TEST_CASE_FIXTURE(Fixture, "bend key-mat: TLS derivation returns session keys in the parameter") {
  CK_SSL3_KEY_MAT_OUT out{};
  unsigned char client_random[32] = {1}, server_random[32] = {2};
  unsigned char iv_client[16] = {}, iv_server[16] = {};
  out.pIVClient = iv_client;
  out.pIVServer = iv_server;
  CK_SSL3_KEY_MAT_PARAMS params{};
  params.ulMacSizeInBits = 256;
  params.ulKeySizeInBits = 128;
  params.ulIVSizeInBits = 128;
  params.RandomInfo = {client_random, sizeof client_random, server_random, sizeof server_random};
  params.pReturnedKeyMaterial = &out;
  CK_MECHANISM derive{CKM_TLS_KEY_AND_MAC_DERIVE, &params, sizeof params};

  SUBCASE("obeying: the mechanism is invalid; other derivations return phKey") {
    init_os();
    CK_SESSION_HANDLE h = open();
    CK_OBJECT_HANDLE base = secret_key(h), key = 0;
    CHECK(ck->C_DeriveKey(h, &derive, base, nullptr, 0, nullptr) == CKR_MECHANISM_INVALID);
    CK_MECHANISM plain{CKM_SHA256_KEY_DERIVATION, nullptr, 0};
    REQUIRE(ck->C_DeriveKey(h, &plain, base, nullptr, 0, &key) == CKR_OK);
    CHECK(key != CK_INVALID_HANDLE);
  }
  SUBCASE("bending: four usable session keys, gone with their session") {
    configure(bending(MOCK_BEND_KEY_MAT));
    init_os();
    CK_SESSION_HANDLE h = open();
    CK_OBJECT_HANDLE base = secret_key(h);
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE token[] = {{CKA_TOKEN, &yes, sizeof yes}};  // ignored: always session keys
    REQUIRE(ck->C_DeriveKey(h, &derive, base, token, 1, nullptr) == CKR_OK);
    CK_OBJECT_HANDLE keys[] = {out.hClientMacSecret, out.hServerMacSecret, out.hClientKey,
                               out.hServerKey};
    for (CK_OBJECT_HANDLE k : keys) CHECK(k != CK_INVALID_HANDLE);
    CHECK(iv_client[0] + iv_client[1] + iv_client[2] != 0);
    CHECK(stats().bend_key_mat_keys == 4);
    CHECK(stats().session_objects == 5);
    CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
    Buffer data = bytes("finished");
    unsigned char sig[MOCK_DIGEST_LEN], expected[MOCK_DIGEST_LEN];
    CK_ULONG len = sizeof sig;
    REQUIRE(ck->C_SignInit(h, &mac, out.hClientMacSecret) == CKR_OK);
    REQUIRE(ck->C_Sign(h, data.data(), data.size(), sig, &len) == CKR_OK);
    mock->reference_signature(out.hClientMacSecret, data.data(), data.size(), expected);
    CHECK(std::memcmp(sig, expected, sizeof sig) == 0);
    // TLS 1.2's parameter, and a MAC-only derivation: two keys.
    CK_TLS12_KEY_MAT_PARAMS params12{};
    params12.ulMacSizeInBits = 256;
    params12.pReturnedKeyMaterial = &out;
    params12.prfHashMechanism = CKM_SHA256;
    CK_MECHANISM derive12{CKM_TLS12_KEY_AND_MAC_DERIVE, &params12, sizeof params12};
    REQUIRE(ck->C_DeriveKey(h, &derive12, base, nullptr, 0, nullptr) == CKR_OK);
    CHECK(out.hClientMacSecret != CK_INVALID_HANDLE);
    CHECK(out.hClientKey == CK_INVALID_HANDLE);
    CHECK(stats().bend_key_mat_keys == 6);
    CK_MECHANISM bad{CKM_TLS12_KEY_AND_MAC_DERIVE, &params, sizeof params};  // wrong size
    CHECK(ck->C_DeriveKey(h, &bad, base, nullptr, 0, nullptr) == CKR_MECHANISM_PARAM_INVALID);

    REQUIRE(ck->C_CloseSession(h) == CKR_OK);
    CHECK(stats().session_objects == 0);
    CK_SESSION_HANDLE next = open();
    CHECK(ck->C_SignInit(next, &mac, keys[0]) == CKR_KEY_HANDLE_INVALID);
  }
  ck->C_Finalize(nullptr);
}

TEST_CASE_FIXTURE(Fixture, "wrap, unwrap and derive keys with the fake crypto") {
  init_os();
  CK_SESSION_HANDLE h = open();
  CK_OBJECT_HANDLE kek = secret_key(h), key = secret_key(h);
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
  unsigned char wrapped[64];
  CK_ULONG len = 0;
  REQUIRE(ck->C_WrapKey(h, &wrap, kek, key, nullptr, &len) == CKR_OK);
  CHECK(len == 32);
  len = sizeof wrapped;
  REQUIRE(ck->C_WrapKey(h, &wrap, kek, key, wrapped, &len) == CKR_OK);
  CK_OBJECT_HANDLE unwrapped = 0;
  REQUIRE(ck->C_UnwrapKey(h, &wrap, kek, wrapped, len, nullptr, 0, &unwrapped) == CKR_OK);
  unsigned char a[32], b[32];
  CK_ATTRIBUTE va{CKA_VALUE, a, sizeof a}, vb{CKA_VALUE, b, sizeof b};
  REQUIRE(ck->C_GetAttributeValue(h, key, &va, 1) == CKR_OK);
  REQUIRE(ck->C_GetAttributeValue(h, unwrapped, &vb, 1) == CKR_OK);
  CHECK(std::memcmp(a, b, sizeof a) == 0);
  CHECK(ck->C_UnwrapKey(h, &wrap, 0xdead, wrapped, len, nullptr, 0, &unwrapped) ==
        CKR_UNWRAPPING_KEY_HANDLE_INVALID);
  CK_MECHANISM derive{CKM_SHA256_KEY_DERIVATION, nullptr, 0};
  CK_OBJECT_HANDLE derived = 0;
  REQUIRE(ck->C_DeriveKey(h, &derive, key, nullptr, 0, &derived) == CKR_OK);
  CHECK(ck->C_DeriveKey(h, &derive, 0xdead, nullptr, 0, &derived) == CKR_KEY_HANDLE_INVALID);
  CHECK(stats().session_objects == 4);
  REQUIRE(ck->C_CloseSession(h) == CKR_OK);
  CHECK(stats().session_objects == 0);
  ck->C_Finalize(nullptr);
}

TEST_CASE_FIXTURE(Fixture, "bend transient-count: every Nth open is refused below the limit") {
  MockConfig cfg = bending(MOCK_BEND_TRANSIENT_COUNT);
  cfg.transient_count_every = 3;
  configure(cfg);
  init_os();
  std::vector<CK_RV> rvs;
  for (int i = 0; i < 7; ++i) {
    CK_SESSION_HANDLE h = 0;
    rvs.push_back(ck->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h));
  }
  std::vector<CK_RV> expected = {
      CKR_OK, CKR_OK, CKR_SESSION_COUNT, CKR_OK, CKR_OK, CKR_SESSION_COUNT, CKR_OK};
  CHECK(rvs == expected);
  MockStats st = stats();
  CHECK(st.bend_session_count == 2);
  CHECK(st.sessions_open == 5);
  CHECK(st.sessions_open_peak == 5);
  ck->C_Finalize(nullptr);
}

TEST_CASE_FIXTURE(Fixture, "sessions_open_peak is the most open at once") {
  init_os();
  CK_SESSION_HANDLE a = open(), b = open();
  REQUIRE(ck->C_CloseSession(a) == CKR_OK);
  REQUIRE(ck->C_CloseSession(b) == CKR_OK);
  open();
  CHECK(stats().sessions_open_peak == 2);
  ck->C_Finalize(nullptr);
}

TEST_CASE_FIXTURE(Fixture, "bend slow-open and the MOCK_BEND environment variable") {
  SUBCASE("names") {
    ScopedEnv bend("MOCK_BEND", "slow-open,fill-len");
    init_os();
    CHECK(time_of([&] { open(); }) >= std::chrono::microseconds(MOCK_BEND_SLOW_OPEN_US));
    // A later mock_configure() wins until the next C_Initialize.
    configure(MockConfig{});
    CHECK(time_of([&] { open(); }) < std::chrono::microseconds(MOCK_BEND_SLOW_OPEN_US));
  }
  SUBCASE("a number, and none") {
    {
      ScopedEnv bend("MOCK_BEND", "0x10");
      ScopedEnv every("MOCK_TRANSIENT_COUNT_EVERY", "1");
      init_os();
      CK_SESSION_HANDLE h = 0;
      CHECK(ck->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_SESSION_COUNT);
      REQUIRE(ck->C_Finalize(nullptr) == CKR_OK);
    }
    ScopedEnv bend("MOCK_BEND", "none");
    init_os();
    open();
  }
  SUBCASE("not a bend: C_Initialize fails") {
    for (const char* bad : {"", "keep-op,", "keep_op", "all,nope", "-3"}) {
      CAPTURE(bad);
      ScopedEnv bend("MOCK_BEND", bad);
      CHECK(ck->C_Initialize(nullptr) == CKR_GENERAL_ERROR);
    }
    init_os();
  }
  ck->C_Finalize(nullptr);
}
