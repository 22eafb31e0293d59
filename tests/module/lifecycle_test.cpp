// C_Finalize while calls are running, blocking slot events, and fork().
#include "group_harness.hpp"
#include "harness.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <future>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define P11MUX_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define P11MUX_TEST_SANITIZED 1
#endif
#endif

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

// A liveness guard, not a timing assertion: a hang would otherwise stall the suite.
template <class T>
bool finishes(std::future<T>& f) {
  return f.wait_for(20s) == std::future_status::ready;
}

TEST_CASE("C_Finalize waits for calls inside the backend and refuses new ones") {
  MockConfig c{};
  c.slow_us = 30000;
  Proxy proxy(c);
  std::atomic<int> started{0};
  std::vector<std::future<CK_RV>> calls;
  for (int t = 0; t < 4; ++t) {
    CK_SESSION_HANDLE h = proxy.open();
    calls.push_back(std::async(std::launch::async, [&, h] {
      started++;
      CK_BYTE buf[16];
      CK_RV last = CKR_OK;
      for (int i = 0; i < 1000 && last == CKR_OK; ++i) {
        last = proxy.p11->C_GenerateRandom(h, buf, sizeof buf);
      }
      return last;
    }));
  }
  while (started < 4) std::this_thread::yield();
  std::this_thread::sleep_for(50ms);  // let them get inside the backend
  REQUIRE(proxy.p11->C_Finalize(nullptr) == CKR_OK);
  for (auto& f : calls) {
    REQUIRE(finishes(f));
    CHECK(f.get() == CKR_CRYPTOKI_NOT_INITIALIZED);
  }
  MockStats s = mock_stats();
  CHECK(s.finalize_during_call == 0);
  CHECK(s.calls_after_finalize == 0);
  CHECK(s.sessions_open == 0);
  CHECK(s.sessions_opened_total == s.sessions_closed_total);
  CHECK(s.finalize_calls == 1);
}

void blocking_wait_then_finalize(MockConfig c) {
  Proxy proxy(c);
  // An event wakes a blocked waiter with its slot.
  auto waiter = std::async(std::launch::async, [&] {
    CK_SLOT_ID slot = 99;
    CK_RV rv = proxy.p11->C_WaitForSlotEvent(0, &slot, nullptr);
    return std::pair{rv, slot};
  });
  std::this_thread::sleep_for(50ms);
  // Other calls are not held up by the waiter.
  CK_SESSION_HANDLE h = proxy.open();
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  libs().mock->trigger_slot_event(0);
  REQUIRE(finishes(waiter));
  auto [rv, slot] = waiter.get();
  CHECK(rv == CKR_OK);
  CHECK(slot == 0);
  // C_Finalize from another thread makes a blocked waiter return.
  auto blocked = std::async(std::launch::async, [&] {
    CK_SLOT_ID s = 0;
    return proxy.p11->C_WaitForSlotEvent(0, &s, nullptr);
  });
  std::this_thread::sleep_for(50ms);
  CHECK(proxy.p11->C_Finalize(nullptr) == CKR_OK);
  REQUIRE(finishes(blocked));
  CHECK(blocked.get() == CKR_CRYPTOKI_NOT_INITIALIZED);
}

TEST_CASE("C_WaitForSlotEvent blocks in a thread-safe backend; C_Finalize wakes it") {
  blocking_wait_then_finalize(MockConfig{});
}

TEST_CASE("C_WaitForSlotEvent is emulated by polling when the backend cannot block") {
  MockConfig c{};
  c.wait_blocking_unsupported = 1;
  blocking_wait_then_finalize(c);
  CHECK(libs().mock->calls("C_WaitForSlotEvent") > 1);  // it polled
}

TEST_CASE("C_WaitForSlotEvent over a non-thread-safe backend polls without holding it") {
  MockConfig c{};
  c.accept_locking = MOCK_LOCK_NONE;
  blocking_wait_then_finalize(c);
  CHECK(mock_stats().library_violations == 0);
}

TEST_CASE("CKF_DONT_BLOCK is forwarded: CKR_NO_EVENT or the event") {
  Proxy proxy;
  CK_SLOT_ID slot = 99;
  CHECK(proxy.p11->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_NO_EVENT);
  libs().mock->trigger_slot_event(0);
  CHECK(proxy.p11->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr) == CKR_OK);
  CHECK(slot == 0);
  CHECK(proxy.p11->C_WaitForSlotEvent(CKF_DONT_BLOCK, nullptr, nullptr) == CKR_ARGUMENTS_BAD);
}

// Runs body() in a forked child, which exits with what it returns (exit
// codes say which check failed: doctest is not fork-safe); a hang ends the
// child after 20 s. Returns the child's pid, for child_status().
template <class Body>
pid_t in_child(Body body) {
  std::fflush(stdout);  // else the child writes the runner's buffered output again
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::alarm(20);
    _exit(body());
  }
  return pid;
}

// The child's first steps in most fork tests: initialize, open a session.
// 0, or the step that failed (2, 3).
int initialize_and_open(CK_FUNCTION_LIST* p11, CK_SESSION_HANDLE& h, CK_VOID_PTR args = nullptr) {
  if (p11->C_Initialize(args) != CKR_OK) return 2;
  if (p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) != CKR_OK) return 3;
  return 0;
}

// Waits (bounded) for a forked child; its exit status, or -1 if it hung or died.
int child_status(pid_t pid) {
  auto deadline = std::chrono::steady_clock::now() + 30s;
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(1ms);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Until the mock has seen `n` calls of `function` enter (a liveness guard bounds it).
void wait_for_calls(const char* function, unsigned long n) {
  auto deadline = std::chrono::steady_clock::now() + 20s;
  while (libs().mock->calls(function) < n) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(1ms);
  }
}

TEST_CASE("fork: the child must C_Initialize, then works; the parent carries on") {
  Proxy proxy;
  CK_SESSION_HANDLE parent_session = proxy.open();
  std::atomic<bool> stop{false};
  std::atomic<unsigned long> failed{0};
  std::thread traffic([&] {
    CK_BYTE buf[8];
    while (!stop) failed += proxy.p11->C_GenerateRandom(parent_session, buf, sizeof buf) != CKR_OK;
  });
  std::this_thread::sleep_for(10ms);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // In the child: exit codes say which check failed (doctest is not fork-safe).
    ::alarm(20);  // a hang ends the child: the parent sees it fail
    CK_BYTE buf[8];
    CK_ULONG n = 0;
    if (proxy.p11->C_GetSlotList(CK_FALSE, nullptr, &n) != CKR_CRYPTOKI_NOT_INITIALIZED) _exit(2);
    if (proxy.p11->C_GenerateRandom(parent_session, buf, sizeof buf) !=
        CKR_CRYPTOKI_NOT_INITIALIZED) {
      _exit(3);
    }
    if (proxy.p11->C_Initialize(nullptr) != CKR_OK) _exit(4);
    // The parent's handle means nothing in the child.
    if (proxy.p11->C_GenerateRandom(parent_session, buf, sizeof buf) !=
        CKR_SESSION_HANDLE_INVALID) {
      _exit(5);
    }
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    if (proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) != CKR_OK) _exit(6);
    if (proxy.p11->C_GenerateRandom(h, buf, sizeof buf) != CKR_OK) _exit(7);
    if (proxy.p11->C_Finalize(nullptr) != CKR_OK) _exit(8);
    _exit(0);
  }
  CHECK(child_status(pid) == 0);
  stop = true;
  traffic.join();
  CHECK(failed == 0);
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(parent_session, buf, sizeof buf) == CKR_OK);
}

// The child inherits the backend's memory as it was at fork(): a call inside
// the backend then (holding its locks) never leaves it in the child. The
// mock's race detector counts threads inside its calls; over a backend
// initialized without locking, the child's first call finds the copied count
// and records a violation unless p11mux kept every call out across fork().
TEST_CASE("fork waits for a call inside the backend; callers meanwhile get no error") {
  MockConfig c{};
  c.accept_locking = MOCK_LOCK_NONE;
  c.slow_us = 500000;  // C_GenerateRandom stays in the backend 0.5 s
  Proxy proxy(c);
  CK_SESSION_HANDLE slow_session = proxy.open(), busy_session = proxy.open();
  auto slow = std::async(std::launch::async, [&] {
    CK_BYTE buf[8];
    return proxy.p11->C_GenerateRandom(slow_session, buf, sizeof buf);
  });
  std::atomic<bool> stop{false};
  std::atomic<unsigned long> calls{0}, failed{0};
  std::thread busy([&] {
    CK_SESSION_INFO info{};
    for (; !stop; ++calls) failed += proxy.p11->C_GetSessionInfo(busy_session, &info) != CKR_OK;
  });
  wait_for_calls("C_GenerateRandom", 1);  // inside the backend, for a while yet
  pid_t pid = in_child([&] {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    if (int step = initialize_and_open(proxy.p11, h)) return step;
    CK_SESSION_INFO info{};
    if (proxy.p11->C_GetSessionInfo(h, &info) != CKR_OK) return 4;
    if (mock_stats().library_violations != 0) return 5;  // a parent's call was inside at fork()
    if (proxy.p11->C_Finalize(nullptr) != CKR_OK) return 6;
    return 0;
  });
  CHECK(child_status(pid) == 0);
  REQUIRE(finishes(slow));
  CHECK(slow.get() == CKR_OK);
  auto deadline = std::chrono::steady_clock::now() + 20s;
  for (unsigned long before = calls; calls < before + 10;) {  // the held caller got back in
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::yield();
  }
  stop = true;
  busy.join();
  CHECK(failed == 0);
  CHECK(mock_stats().library_violations == 0);
}

TEST_CASE("fork with a call stuck in the backend goes ahead after a bounded wait, and says so") {
  std::string log = "/tmp/p11mux-lifecycle-" + std::to_string(::getpid()) + ".log";
  ::unlink(log.c_str());
  {
    MockConfig c{};
    c.slow_us = 4500000;  // longer than p11mux waits at fork() (3 s)
    Proxy proxy(c, nullptr, {{"P11MUX_LOG_LEVEL", "warn"}, {"P11MUX_LOG_FILE", log.c_str()}});
    CK_SESSION_HANDLE h = proxy.open();
    auto stuck = std::async(std::launch::async, [&] {
      CK_BYTE buf[8];
      return proxy.p11->C_GenerateRandom(h, buf, sizeof buf);
    });
    wait_for_calls("C_GenerateRandom", 1);
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) _exit(0);
    CHECK(child_status(pid) == 0);
    REQUIRE(finishes(stuck));
    CHECK(stuck.get() == CKR_OK);
    CK_SESSION_INFO info{};
    CHECK(proxy.p11->C_GetSessionInfo(h, &info) == CKR_OK);  // the gate is open again
  }
  std::ifstream in(log);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text.find("fork(): calls still inside the backend after 3 s") != std::string::npos);
  ::unlink(log.c_str());
}

// Issue 10, defect 3: refused callers used to count as in flight for a
// moment, and with enough of them knocking the drain never saw zero (48 s at
// 128 threads). The bound is a liveness guard, far above a normal drain.
TEST_CASE("C_Finalize finishes promptly while 256 threads keep knocking") {
  constexpr int kThreads = 256;
  Proxy proxy;
  std::vector<CK_SESSION_HANDLE> sessions;
  for (int t = 0; t < kThreads; ++t) sessions.push_back(proxy.open(0, CKF_SERIAL_SESSION));
  std::atomic<bool> stop{false};
  std::atomic<int> knocking{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, h = sessions[t]] {
      bool counted = false;
      CK_INFO info{};
      CK_BYTE buf[8];
      while (!stop.load(std::memory_order_relaxed)) {
        (void)proxy.p11->C_GetInfo(&info);
        (void)proxy.p11->C_GenerateRandom(h, buf, sizeof buf);
        if (!std::exchange(counted, true)) knocking++;
      }
    });
  }
  while (knocking < kThreads) std::this_thread::sleep_for(1ms);
  auto finalize = std::async(std::launch::async, [&] {
    auto start = std::chrono::steady_clock::now();
    CK_RV rv = proxy.p11->C_Finalize(nullptr);
    return std::pair{rv, std::chrono::steady_clock::now() - start};
  });
#ifdef P11MUX_TEST_SANITIZED
  constexpr auto kBound = 60s;  // every knock is many times slower, the CPUs as few
#else
  constexpr auto kBound = 10s;
#endif
  bool prompt = finalize.wait_for(kBound) == std::future_status::ready;
  stop = true;  // lets a starved drain finish, so that the test ends either way
  for (auto& t : threads) t.join();
  CHECK(prompt);
  auto [rv, took] = finalize.get();
  CHECK(rv == CKR_OK);
  MESSAGE("C_Finalize with " << kThreads << " threads knocking: "
                             << std::chrono::duration<double, std::milli>(took).count() << " ms");
  MockStats s = mock_stats();
  CHECK(s.calls_after_finalize == 0);
  CHECK(s.finalize_during_call == 0);
}

// Issue 10, defect 6: a thread waiting for a session at the pool's limit is
// not inside the backend; C_Finalize wakes it at once rather than waiting
// out pool.wait_ms.
TEST_CASE("C_Finalize wakes a thread waiting at the pool limit: CKR_CRYPTOKI_NOT_INITIALIZED") {
  Proxy proxy({}, nullptr, {{"P11MUX_POOL_MAX_SESSIONS", "1"}, {"P11MUX_POOL_WAIT_MS", "30000"}});
  proxy.open(0, CKF_SERIAL_SESSION);
  auto waiter = std::async(std::launch::async, [&] {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    return proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
  });
  std::this_thread::sleep_for(200ms);  // asleep in the pool by now
  REQUIRE(waiter.wait_for(0s) == std::future_status::timeout);
  auto finalize = std::async(std::launch::async, [&] { return proxy.p11->C_Finalize(nullptr); });
  bool prompt = finalize.wait_for(10s) == std::future_status::ready;
  CHECK(prompt);  // without the wake-up: 30 s
  REQUIRE(finishes(finalize));
  CHECK(finalize.get() == CKR_OK);
  REQUIRE(finishes(waiter));
  CHECK(waiter.get() == CKR_CRYPTOKI_NOT_INITIALIZED);
  MockStats s = mock_stats();
  CHECK(s.sessions_open == 0);
  CHECK(s.calls_after_finalize == 0);
}

// ... nor does fork() wait for it (it used to, 3 s, with a warning); the
// waiter in the parent still gets its session once one is given back.
TEST_CASE("fork does not wait for a thread waiting at the pool limit") {
  std::string log = "/tmp/p11mux-lifecycle-park-" + std::to_string(::getpid()) + ".log";
  ::unlink(log.c_str());
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_POOL_MAX_SESSIONS", "1"},
                 {"P11MUX_POOL_WAIT_MS", "30000"},
                 {"P11MUX_LOG_LEVEL", "warn"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_SESSION_HANDLE first = proxy.open(0, CKF_SERIAL_SESSION);
    auto waiter = std::async(std::launch::async, [&] {
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      CK_RV rv = proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
      CK_BYTE buf[8];
      return rv == CKR_OK ? proxy.p11->C_GenerateRandom(h, buf, sizeof buf) : rv;
    });
    std::this_thread::sleep_for(200ms);  // asleep in the pool by now
    REQUIRE(waiter.wait_for(0s) == std::future_status::timeout);
    auto start = std::chrono::steady_clock::now();
    pid_t pid = in_child([&] {
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (int step = initialize_and_open(proxy.p11, h)) return step;
      return proxy.p11->C_Finalize(nullptr) == CKR_OK ? 0 : 4;
    });
    auto fork_took = std::chrono::steady_clock::now() - start;
    CHECK(child_status(pid) == 0);
    MESSAGE("fork() with a waiter at the pool limit: "
            << std::chrono::duration<double, std::milli>(fork_took).count() << " ms");
    CHECK(waiter.wait_for(0s) == std::future_status::timeout);  // still waiting
    REQUIRE(proxy.p11->C_CloseSession(first) == CKR_OK);
    REQUIRE(finishes(waiter));
    CHECK(waiter.get() == CKR_OK);
  }
  std::ifstream in(log);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text.find("fork()") == std::string::npos);
  ::unlink(log.c_str());
}

// Issue 10, defect 13: a handle kept across C_Finalize/C_Initialize names
// nothing in the new initialization (it used to equal the first new one).
TEST_CASE("a session handle kept across C_Finalize/C_Initialize is stale, not the new session's") {
  Proxy proxy;
  CK_SESSION_HANDLE old = proxy.open();
  REQUIRE(proxy.p11->C_Finalize(nullptr) == CKR_OK);
  CK_C_INITIALIZE_ARGS os{};
  os.flags = CKF_OS_LOCKING_OK;
  REQUIRE(proxy.p11->C_Initialize(&os) == CKR_OK);
  CK_SESSION_HANDLE fresh = proxy.open();
  CHECK(fresh != old);
  CHECK(proxy.p11->C_CloseSession(old) == CKR_SESSION_HANDLE_INVALID);
  CK_SESSION_INFO info{};
  CHECK(proxy.p11->C_GetSessionInfo(fresh, &info) == CKR_OK);  // still open
  // Again, with sessions reused within one initialization first.
  REQUIRE(proxy.p11->C_CloseSession(fresh) == CKR_OK);
  std::vector<CK_SESSION_HANDLE> before;
  for (int i = 0; i < 3; ++i) before.push_back(proxy.open());
  REQUIRE(proxy.p11->C_Finalize(nullptr) == CKR_OK);
  REQUIRE(proxy.p11->C_Initialize(&os) == CKR_OK);
  std::vector<CK_SESSION_HANDLE> after;
  for (int i = 0; i < 3; ++i) after.push_back(proxy.open());
  for (CK_SESSION_HANDLE h : before) {
    CHECK(std::find(after.begin(), after.end(), h) == after.end());
    CHECK(proxy.p11->C_CloseSession(h) == CKR_SESSION_HANDLE_INVALID);
  }
  for (CK_SESSION_HANDLE h : after) CHECK(proxy.p11->C_GetSessionInfo(h, &info) == CKR_OK);
}

TEST_CASE("a parent's session handle names no session of the child's initialization") {
  Proxy proxy;
  CK_SESSION_HANDLE parent_session = proxy.open();
  pid_t pid = in_child([&] {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    if (int step = initialize_and_open(proxy.p11, h)) return step;
    if (h == parent_session) return 4;
    if (proxy.p11->C_CloseSession(parent_session) != CKR_SESSION_HANDLE_INVALID) return 5;
    CK_SESSION_INFO info{};
    if (proxy.p11->C_GetSessionInfo(h, &info) != CKR_OK) return 6;
    if (proxy.p11->C_Finalize(nullptr) != CKR_OK) return 7;
    return 0;
  });
  CHECK(child_status(pid) == 0);
  CK_SESSION_INFO info{};
  CHECK(proxy.p11->C_GetSessionInfo(parent_session, &info) == CKR_OK);
}

// The lines of `log` in which the backends of forked child `pid` said how
// they were initialized, in order.
std::vector<std::string> child_init_lines(const std::string& log, pid_t pid) {
  std::ifstream in(log);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    if (line.find("p11mux[" + std::to_string(pid) + ":") == std::string::npos) continue;
    if (line.find("initialized: cryptoki") != std::string::npos) lines.push_back(line);
  }
  return lines;
}

// Issue 12, defect 4: the child's copy of the backend answers
// CKR_CRYPTOKI_ALREADY_INITIALIZED (the mock does, as SoftHSM2 does); p11mux
// took it for someone else's and serialized every call in the child.
TEST_CASE("fork: the child keeps the locking p11mux initialized the backend with, and owns it") {
  const std::string log = "/tmp/p11mux-fork-backend-test.log";
  ::unlink(log.c_str());
  pid_t pid = -1;
  {
    Proxy proxy({}, nullptr, {{"P11MUX_LOG_LEVEL", "info"}, {"P11MUX_LOG_FILE", log.c_str()}});
    std::fflush(stdout);  // else the child writes the runner's buffered output again
    pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::alarm(20);
      CK_C_INITIALIZE_ARGS os{};
      os.flags = CKF_OS_LOCKING_OK;
      if (proxy.p11->C_Initialize(&os) != CKR_OK) _exit(2);
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) != CKR_OK) _exit(3);
      CK_BYTE buf[8];
      if (proxy.p11->C_GenerateRandom(h, buf, sizeof buf) != CKR_OK) _exit(4);
      unsigned long finalized = mock_stats().finalize_calls;
      if (proxy.p11->C_Finalize(nullptr) != CKR_OK) _exit(5);
      // Owned: the child's C_Finalize finalized its copy of the backend, so
      // that its next C_Initialize starts it afresh.
      if (mock_stats().finalize_calls != finalized + 1) _exit(6);
      if (proxy.p11->C_Initialize(&os) != CKR_OK) _exit(7);
      if (proxy.p11->C_Finalize(nullptr) != CKR_OK) _exit(8);
      std::fflush(nullptr);  // as exit() would
      _exit(0);
    }
    CHECK(child_status(pid) == 0);
  }
  reset_environment();
  const std::vector<std::string> child_inits = child_init_lines(log, pid);
  REQUIRE(child_inits.size() == 2);
  for (const std::string& line : child_inits) {
    CAPTURE(line);
    CHECK(line.find("locking os") != std::string::npos);
    CHECK(line.find("serialized") == std::string::npos);
    CHECK(line.find("another user") == std::string::npos);
  }
  CHECK(child_inits[0].find("as initialized before fork()") != std::string::npos);
  CHECK(child_inits[1].find("before fork()") == std::string::npos);
  ::unlink(log.c_str());
}

// The same in a group configuration (issue 15, docs/groups.md), for every
// [backend.NAME]: only the first was told its locking in the parent, and the
// others took their copy for another user's (every call serialized). Two
// backends: the mock and the spec-bender (the mock's code in a library of
// its own, so a state of its own).
TEST_CASE("fork: in a group configuration, every backend keeps its locking and is owned") {
  const std::string log = "/tmp/p11mux-fork-backends-test.log";
  ::unlink(log.c_str());
  pid_t pid = -1;
  {
    GroupProxy proxy(std::string("[backend.mock]\nmodule = ") + P11MUX_TEST_MOCK_PATH +
                         "\n[backend.bender]\nmodule = " + P11MUX_TEST_SPEC_BENDER_PATH +
                         "\n[group.signing]\nmembers = mock/label:mock-token-0, "
                         "bender/label:mock-token-0\n",
                     {}, {{"P11MUX_LOG_LEVEL", "info"}, {"P11MUX_LOG_FILE", log.c_str()}});
    REQUIRE(proxy.initialize() == CKR_OK);
    pid = in_child([&] {
      CK_C_INITIALIZE_ARGS os{};
      os.flags = CKF_OS_LOCKING_OK;
#if defined(__SANITIZE_THREAD__)
      // A group starts its members' watch thread, and ThreadSanitizer lets
      // no thread start after a multi-threaded fork(): none in its build.
      os.flags |= CKF_LIBRARY_CANT_CREATE_OS_THREADS;
#endif
      CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
      if (int step = initialize_and_open(proxy.p11, h, &os)) return step;
      const unsigned long finalized = mock_stats().finalize_calls;
      if (proxy.p11->C_Finalize(nullptr) != CKR_OK) return 4;
      // Owned: the child's C_Finalize finalized its copy.
      if (mock_stats().finalize_calls != finalized + 1) return 5;
      std::fflush(nullptr);  // as exit() would
      return 0;
    });
    CHECK(child_status(pid) == 0);
  }
  reset_environment();
  const std::vector<std::string> child_inits = child_init_lines(log, pid);
  REQUIRE(child_inits.size() == 2);
  CHECK(child_inits[0].find("[backend.mock]") != std::string::npos);
  CHECK(child_inits[1].find("[backend.bender]") != std::string::npos);
  for (const std::string& line : child_inits) {
    CAPTURE(line);
    CHECK(line.find("locking os") != std::string::npos);
    CHECK(line.find("as initialized before fork()") != std::string::npos);
    CHECK(line.find("serialized") == std::string::npos);
    CHECK(line.find("another user") == std::string::npos);
  }
  ::unlink(log.c_str());
}

// Issue 12, defect 5: nginx clears its workers' environment, and the child's
// C_Initialize failed with "no backend module configured".
TEST_CASE("fork: a child whose environment was cleared starts from the parent's configuration") {
  Proxy proxy;
  CK_SESSION_HANDLE parent_session = proxy.open();
  std::fflush(stdout);  // else the child writes the runner's buffered output again
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::alarm(20);
    if (::clearenv() != 0) _exit(2);
    CK_C_INITIALIZE_ARGS os{};
    os.flags = CKF_OS_LOCKING_OK;
    if (proxy.p11->C_Initialize(&os) != CKR_OK) _exit(3);
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    if (proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) != CKR_OK) _exit(4);
    CK_BYTE buf[8];
    if (proxy.p11->C_GenerateRandom(h, buf, sizeof buf) != CKR_OK) _exit(5);
    if (proxy.p11->C_Finalize(nullptr) != CKR_OK) _exit(6);
    // A re-initialization that follows no fork() reads the environment, as in
    // any process: here, nothing configured (its error to stderr, muted).
    int devnull = ::open("/dev/null", O_WRONLY);
    if (devnull < 0 || ::dup2(devnull, 2) < 0) _exit(7);
    if (proxy.p11->C_Initialize(&os) != CKR_GENERAL_ERROR) _exit(8);
    _exit(0);
  }
  CHECK(child_status(pid) == 0);
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(parent_session, buf, sizeof buf) == CKR_OK);
}

}  // namespace
}  // namespace p11mux::test
