// C_Initialize and C_Finalize as the application sees them, and how p11mux
// initializes the backend (docs/pkcs11-facts.md, "C_Initialize", "Initializing the backend").
#include "functions/function_traits.hpp"
#include "harness.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>
#include <tuple>

namespace p11mux::test {
namespace {

// Calls every function of the list with zero/NULL arguments.
template <class Check>
void call_every_function(CK_FUNCTION_LIST* list, Check check, bool finalize = true) {
  auto* full = reinterpret_cast<CK_FUNCTION_LIST_3_0*>(list);
#define P11MUX_CALL_ONE(name, since, dispatch, args)             \
  if (since == 2 && std::string_view(#name) != "C_Initialize" && \
      std::string_view(#name) != "C_GetFunctionList" &&          \
      (finalize || std::string_view(#name) != "C_Finalize")) {   \
    typename FunctionArgs<fn::name::Pointer>::type zero{};       \
    check(#name, std::apply(full->name, zero));                  \
  }
  P11MUX_FUNCTIONS(P11MUX_CALL_ONE)
#undef P11MUX_CALL_ONE
}

TEST_CASE("every function before C_Initialize: CKR_CRYPTOKI_NOT_INITIALIZED") {
  reset_environment();
  call_every_function(libs().p11, [](const char* name, CK_RV rv) {
    INFO(name);
    CHECK(rv == CKR_CRYPTOKI_NOT_INITIALIZED);
  });
}

TEST_CASE("every function after C_Finalize: CKR_CRYPTOKI_NOT_INITIALIZED, backend untouched") {
  { Proxy proxy; }
  unsigned long calls = mock_stats().calls_total;
  call_every_function(libs().p11, [](const char* name, CK_RV rv) {
    INFO(name);
    CHECK(rv == CKR_CRYPTOKI_NOT_INITIALIZED);
  });
  CHECK(mock_stats().calls_total == calls);
}

TEST_CASE("every function with NULL arguments while initialized: an error, no crash") {
  Proxy proxy;
  call_every_function(
      proxy.p11,
      [](const char* name, CK_RV rv) {
        INFO(name);
        if (std::string_view(name) == "C_CloseAllSessions") return;  // slot 0 exists: OK
        CHECK(rv != CKR_OK);
        CHECK(rv != CKR_CRYPTOKI_NOT_INITIALIZED);
      },
      false);
}

CK_RV app_create(CK_VOID_PTR_PTR m);
CK_RV app_destroy(CK_VOID_PTR m);
CK_RV app_lock(CK_VOID_PTR m);
CK_RV app_unlock(CK_VOID_PTR m);
struct AppMutexCounts {
  std::atomic<long> created{0}, destroyed{0}, locked{0}, unlocked{0};
} app_counts;
CK_RV app_create(CK_VOID_PTR_PTR m) {
  app_counts.created++;
  *m = new std::mutex;
  return CKR_OK;
}
CK_RV app_destroy(CK_VOID_PTR m) {
  app_counts.destroyed++;
  delete static_cast<std::mutex*>(m);
  return CKR_OK;
}
CK_RV app_lock(CK_VOID_PTR m) {
  app_counts.locked++;
  static_cast<std::mutex*>(m)->lock();
  return CKR_OK;
}
CK_RV app_unlock(CK_VOID_PTR m) {
  app_counts.unlocked++;
  static_cast<std::mutex*>(m)->unlock();
  return CKR_OK;
}

CK_C_INITIALIZE_ARGS app_args(CK_FLAGS flags, bool callbacks) {
  CK_C_INITIALIZE_ARGS a{};
  a.flags = flags;
  if (callbacks) {
    a.CreateMutex = &app_create;
    a.DestroyMutex = &app_destroy;
    a.LockMutex = &app_lock;
    a.UnlockMutex = &app_unlock;
  }
  return a;
}

TEST_CASE("the four locking cases all initialize") {
  for (auto [flags, callbacks] :
       {std::pair{CK_FLAGS{0}, false}, std::pair{CK_FLAGS{0}, true},
        std::pair{CKF_OS_LOCKING_OK, false}, std::pair{CKF_OS_LOCKING_OK, true}}) {
    CAPTURE(flags);
    CAPTURE(callbacks);
    auto args = app_args(flags, callbacks);
    Proxy proxy({}, &args);
    CK_SESSION_HANDLE h = proxy.open();
    CK_BYTE buf[16];
    CHECK(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  }
  // NULL args: case 1 as well.
  reset_environment();
  libs().mock->reset();
  CHECK(libs().p11->C_Initialize(nullptr) == CKR_OK);
  CHECK(libs().p11->C_Finalize(nullptr) == CKR_OK);
}

TEST_CASE("case 2: p11mux's own locks go through the application's callbacks") {
  app_counts.created = app_counts.destroyed = app_counts.locked = app_counts.unlocked = 0;
  {
    auto args = app_args(0, true);
    MockConfig config{};
    config.accept_locking = MOCK_LOCK_OS;  // the backend must not get the app's callbacks
    Proxy proxy(config, &args);
    long locks_before = app_counts.locked;
    CK_SESSION_HANDLE h = proxy.open();
    CK_BYTE buf[16];
    for (int i = 0; i < 10; ++i) REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
    CHECK(app_counts.created > 0);
    // At least one lock per call on the session.
    CHECK(app_counts.locked - locks_before >= 10);
    CHECK(mock_stats().init_had_callbacks == 0);
  }
  CHECK(app_counts.locked == app_counts.unlocked);
  CHECK(app_counts.created == app_counts.destroyed);
}

TEST_CASE("bad initialize arguments: CKR_ARGUMENTS_BAD, and nothing initialized") {
  reset_environment();
  libs().mock->reset();
  auto partial = app_args(0, true);
  partial.UnlockMutex = nullptr;
  CHECK(libs().p11->C_Initialize(&partial) == CKR_ARGUMENTS_BAD);
  CK_C_INITIALIZE_ARGS reserved{};
  char junk[] = "x";
  reserved.pReserved = junk;
  CHECK(libs().p11->C_Initialize(&reserved) == CKR_ARGUMENTS_BAD);
  CHECK(mock_stats().initialize_calls == 0);
  CK_ULONG n = 0;
  CHECK(libs().p11->C_GetSlotList(CK_FALSE, nullptr, &n) == CKR_CRYPTOKI_NOT_INITIALIZED);
}

TEST_CASE(
    "second C_Initialize: CKR_CRYPTOKI_ALREADY_INITIALIZED; C_Finalize(non-NULL): ARGUMENTS_BAD") {
  Proxy proxy;
  CHECK(proxy.p11->C_Initialize(nullptr) == CKR_CRYPTOKI_ALREADY_INITIALIZED);
  char junk[] = "x";
  CHECK(proxy.p11->C_Finalize(junk) == CKR_ARGUMENTS_BAD);
  CHECK(mock_stats().initialize_calls == 1);
}

TEST_CASE("many threads racing the first C_Initialize: one backend init, one CKR_OK") {
  reset_environment();
  libs().mock->reset();
  std::atomic<int> ok{0}, already{0}, other{0}, usable{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      CK_C_INITIALIZE_ARGS args{};
      args.flags = CKF_OS_LOCKING_OK;
      CK_RV rv = libs().p11->C_Initialize(&args);
      (rv == CKR_OK ? ok : rv == CKR_CRYPTOKI_ALREADY_INITIALIZED ? already : other)++;
      // Whoever returned, the module is usable now: no half-initialized state.
      CK_ULONG n = 0;
      if (libs().p11->C_GetSlotList(CK_FALSE, nullptr, &n) == CKR_OK) usable++;
    });
  }
  go.store(true);
  for (auto& t : threads) t.join();
  CHECK(ok == 1);
  CHECK(already == 15);
  CHECK(other == 0);
  CHECK(usable == 16);
  CHECK(mock_stats().initialize_calls == 1);
  CHECK(libs().p11->C_Finalize(nullptr) == CKR_OK);
  CHECK(mock_stats().finalize_calls == 1);
}

TEST_CASE("backend locking: OS locking first, then p11mux's callbacks, then none") {
  SUBCASE("accepts OS locking") {
    MockConfig c{};
    c.accept_locking = MOCK_LOCK_OS;
    Proxy proxy(c);
    CHECK(mock_stats().init_locking == MOCK_LOCK_OS);
  }
  SUBCASE("accepts only callbacks: gets p11mux's own") {
    MockConfig c{};
    c.accept_locking = MOCK_LOCK_CALLBACKS;
    Proxy proxy(c);
    CHECK(mock_stats().init_locking == MOCK_LOCK_CALLBACKS);
    CHECK(mock_stats().init_had_callbacks == 1);
  }
  SUBCASE("accepts only no locking: initialized with NULL args") {
    MockConfig c{};
    c.accept_locking = MOCK_LOCK_NONE;
    Proxy proxy(c);
    CHECK(mock_stats().init_locking == MOCK_LOCK_NONE);
    CHECK(mock_stats().init_null_args == 1);
  }
}

TEST_CASE("backend.locking forces one kind; a refusal names the backend's CKR code") {
  reset_environment();
  libs().mock->reset();
  MockConfig c{};
  c.accept_locking = MOCK_LOCK_NONE;
  libs().mock->configure(&c);
  ::setenv("P11MUX_BACKEND_LOCKING", "os", 1);
  CK_RV rv = CKR_OK;
  std::string err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
  CHECK(rv == CKR_GENERAL_ERROR);
  CHECK(err.find("CKR_CANT_LOCK") != std::string::npos);
  CHECK(err.find(P11MUX_TEST_MOCK_PATH) != std::string::npos);
  ::setenv("P11MUX_BACKEND_LOCKING", "none", 1);
  libs().mock->reset();
  REQUIRE(libs().p11->C_Initialize(nullptr) == CKR_OK);
  CHECK(mock_stats().init_locking == MOCK_LOCK_NONE);
  CHECK(libs().p11->C_Finalize(nullptr) == CKR_OK);
}

TEST_CASE("a non-thread-safe backend is never entered by two threads at once") {
  MockConfig c{};
  c.accept_locking = MOCK_LOCK_NONE;
  c.call_spin_us = 20;
  Proxy proxy(c);
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) != CKR_OK) {
        errors++;
        return;
      }
      CK_BYTE buf[16];
      for (int i = 0; i < 200; ++i) {
        if (proxy.p11->C_GenerateRandom(h, buf, sizeof buf) != CKR_OK) errors++;
      }
      if (proxy.p11->C_CloseSession(h) != CKR_OK) errors++;
    });
  }
  for (auto& t : threads) t.join();
  CHECK(errors == 0);
  CHECK(mock_stats().library_violations == 0);
  CHECK(mock_stats().max_concurrent_calls == 1);
}

TEST_CASE("a thread-safe backend is called in parallel on different sessions") {
  MockConfig c{};
  c.call_spin_us = 200;
  Proxy proxy(c);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      CK_SESSION_HANDLE h = proxy.open();
      CK_BYTE buf[16];
      for (int i = 0; i < 200 && mock_stats().max_concurrent_calls < 2; ++i) {
        proxy.p11->C_GenerateRandom(h, buf, sizeof buf);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(mock_stats().max_concurrent_calls >= 2);
}

struct BadBackendCase {
  const char* what;
  std::string module;
  const char* expected;
};

TEST_CASE("a missing or broken backend: C_Initialize fails with a message naming it") {
  std::string text_file = "/tmp/p11mux-not-a-library.so";
  std::ofstream(text_file) << "this is not an ELF file\n";
  const BadBackendCase cases[] = {
      {"no backend configured", "", "no backend module configured"},
      {"missing file", "/nonexistent/vendor.so", "No such file or directory"},
      {"not a shared library", text_file, text_file.c_str()},
      {"no C_GetFunctionList", "libm.so.6", "no C_GetFunctionList"},
      {"p11mux itself", P11MUX_TEST_LIBRARY_PATH, "is p11mux itself"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    reset_environment();
    libs().mock->reset();
    ::setenv("P11MUX_MODULE", c.module.c_str(), 1);
    CK_RV rv = CKR_OK;
    std::string err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
    CHECK(rv == CKR_GENERAL_ERROR);
    CHECK_MESSAGE(err.find(c.expected) != std::string::npos, err);
    CK_ULONG n = 0;
    CHECK(libs().p11->C_GetSlotList(CK_FALSE, nullptr, &n) == CKR_CRYPTOKI_NOT_INITIALIZED);
  }
  ::unlink(text_file.c_str());
  // And the next C_Initialize with a good configuration works.
  Proxy proxy;
  CHECK(mock_stats().initialize_ok == 1);
}

TEST_CASE("a bad configuration file: C_Initialize fails naming file, line and key") {
  reset_environment();
  std::string path = "/tmp/p11mux-test-bad.conf";
  std::ofstream(path) << "module = " << P11MUX_TEST_MOCK_PATH << "\n[log]\nlevl = warn\n";
  ::setenv("P11MUX_CONFIG", path.c_str(), 1);
  CK_RV rv = CKR_OK;
  std::string err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
  CHECK(rv == CKR_GENERAL_ERROR);
  CHECK_MESSAGE(err.find(path + ":3") != std::string::npos, err);
  CHECK_MESSAGE(err.find("levl") != std::string::npos, err);
  ::setenv("P11MUX_CONFIG", "/nonexistent/p11mux.conf", 1);
  err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
  CHECK(rv == CKR_GENERAL_ERROR);
  CHECK_MESSAGE(err.find("/nonexistent/p11mux.conf") != std::string::npos, err);
  ::unlink(path.c_str());
  reset_environment();
}

// Issue 12: a misspelled variable was ignored, leaving its setting at the default.
TEST_CASE("a misspelled P11MUX_ variable fails C_Initialize as an unknown key in the file does") {
  auto initialize = [](std::string& err) {
    CK_RV rv = CKR_OK;
    err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
    if (rv == CKR_OK) libs().p11->C_Finalize(nullptr);
    return rv;
  };
  std::string err;
  reset_environment();
  std::string path = "/tmp/p11mux-test-unknown-key-" + std::to_string(::getpid()) + ".conf";
  std::ofstream(path) << "sesion_mode = multiplex\n";
  ::setenv("P11MUX_CONFIG", path.c_str(), 1);
  const CK_RV in_file = initialize(err);
  ::unlink(path.c_str());
  CHECK(in_file == CKR_GENERAL_ERROR);

  reset_environment();
  ::setenv("P11MUX_SESION_MODE", "multiplex", 1);
  CHECK(initialize(err) == in_file);
  CHECK_MESSAGE(err.find("unknown environment variable P11MUX_SESION_MODE (did you mean "
                         "P11MUX_SESSION_MODE?)") != std::string::npos,
                err);
  CK_ULONG n = 0;
  CHECK(libs().p11->C_GetSlotList(CK_FALSE, nullptr, &n) == CKR_CRYPTOKI_NOT_INITIALIZED);

  // The prefixes of the project's own tools are theirs: no error.
  reset_environment();
  ::setenv("P11MUX_TEST_ANYTHING", "1", 1);
  ::setenv("P11MUX_LOAD_PIN", "123456", 1);
  ::setenv("P11MUX_FAULTY_SEED", "42", 1);
  CHECK(initialize(err) == CKR_OK);
  CHECK(err.empty());
  reset_environment();
}

// The forked child starts from the parent's parsed configuration: it reads
// no file again (here the file has gone bad since), whatever its environment.
TEST_CASE("fork: the child does not read the configuration file again") {
  reset_environment();
  std::string path = "/tmp/p11mux-test-fork-" + std::to_string(::getpid()) + ".conf";
  std::ofstream(path) << "module = " << P11MUX_TEST_MOCK_PATH << "\n";
  ::setenv("P11MUX_CONFIG", path.c_str(), 1);
  ::unsetenv("P11MUX_MODULE");
  libs().mock->reset();
  CK_C_INITIALIZE_ARGS os{};
  os.flags = CKF_OS_LOCKING_OK;
  REQUIRE(libs().p11->C_Initialize(&os) == CKR_OK);
  std::fflush(stdout);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::alarm(20);
    { std::ofstream(path) << "modul = broken\n"; }
    ::setenv("P11MUX_SESION_MODE", "multiplex", 1);
    if (libs().p11->C_Initialize(&os) != CKR_OK) _exit(3);
    if (libs().p11->C_Finalize(nullptr) != CKR_OK) _exit(4);
    _exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(libs().p11->C_Finalize(nullptr) == CKR_OK);
  ::unlink(path.c_str());
  reset_environment();
}

TEST_CASE("backend.init_reserved reaches the backend's C_Initialize as pReserved") {
  reset_environment();
  libs().mock->reset();
  ::setenv("P11MUX_BACKEND_INIT_RESERVED", "configdir='sql:/tmp/x' certPrefix=''", 1);
  REQUIRE(libs().p11->C_Initialize(nullptr) == CKR_OK);
  CHECK(std::string(mock_stats().init_reserved) == "configdir='sql:/tmp/x' certPrefix=''");
  CHECK(libs().p11->C_Finalize(nullptr) == CKR_OK);
  reset_environment();
}

}  // namespace
}  // namespace p11mux::test
