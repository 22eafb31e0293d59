// C_Finalize while calls are running, blocking slot events, and fork().
#include "harness.hpp"

#include <pthread.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

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

// The mock, unlike SoftHSM2, is not fork-safe: a fork while another thread
// holds one of its internal locks leaves that lock held in the child. These
// atfork handlers hold the traffic thread outside any call while fork() runs,
// as a fork-safe backend would (p11mux itself takes no lock at fork).
std::atomic<bool> fork_pause{false}, traffic_paused{false}, pause_at_fork{false};
void hold_traffic() {
  if (!pause_at_fork) return;
  fork_pause = true;
  while (!traffic_paused) std::this_thread::yield();
}
void release_traffic() { fork_pause = false; }

TEST_CASE("fork: the child must C_Initialize, then works; the parent carries on") {
  static bool registered = (pthread_atfork(hold_traffic, release_traffic, release_traffic), true);
  (void)registered;
  Proxy proxy;
  CK_SESSION_HANDLE parent_session = proxy.open();
  std::atomic<bool> stop{false};
  pause_at_fork = true;
  std::thread traffic([&] {
    CK_BYTE buf[8];
    while (!stop) {
      if (fork_pause) {
        traffic_paused = true;
        while (fork_pause) std::this_thread::yield();
        traffic_paused = false;
      }
      proxy.p11->C_GenerateRandom(parent_session, buf, sizeof buf);
    }
  });
  std::this_thread::sleep_for(10ms);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // In the child: exit codes say which check failed (doctest is not fork-safe).
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
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  stop = true;
  traffic.join();
  pause_at_fork = false;
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CK_BYTE buf[8];
  CHECK(proxy.p11->C_GenerateRandom(parent_session, buf, sizeof buf) == CKR_OK);
}

}  // namespace
}  // namespace p11mux::test
