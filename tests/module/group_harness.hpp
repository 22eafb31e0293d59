// What the module tests of groups (issue 15) share: p11mux initialized with a
// configuration file of named backends and groups, and the test backends'
// own handles behind it (the mock p11mux or the faulty module loaded, and
// the faulty module's control).
#pragma once

#include "harness.hpp"

#include "faulty_control.h"

#include <dlfcn.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace p11mux::test {

// The mock's own function list (the instance p11mux, or the faulty module in
// front of it, loaded): to act on its tokens behind p11mux's back.
inline CK_FUNCTION_LIST* mock_functions() {
  void* lib = ::dlopen(P11MUX_TEST_MOCK_PATH, RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(lib != nullptr);
  auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  REQUIRE(static_cast<bool>(get));
  CK_FUNCTION_LIST* list = nullptr;
  REQUIRE(get(&list) == CKR_OK);
  return list;
}

// The faulty module's control (tests/backends/faulty/faulty_control.h).
inline const FaultyControl* faulty_control() {
  void* lib = ::dlopen(P11MUX_TEST_FAULTY_PATH, RTLD_NOW | RTLD_LOCAL);  // -z nodelete
  REQUIRE(lib != nullptr);
  auto get = reinterpret_cast<FaultyGetControlFn>(::dlsym(lib, "faulty_get_control"));
  REQUIRE(static_cast<bool>(get));
  return get();
}

// p11mux initialized with `conf` as its file (the harness's top-level module
// unset: it cannot stand beside named backends), the mock configured first.
class GroupProxy {
 public:
  GroupProxy(const std::string& conf, MockConfig mock = {},
             std::initializer_list<std::pair<const char*, const char*>> env = {})
      : path_(unique_temp_path("group", "conf")) {
    reset_environment();
    std::ofstream(path_) << conf;
    ::setenv("P11MUX_CONFIG", path_.c_str(), 1);
    ::setenv("P11MUX_MODULE", "", 1);
    for (auto [name, value] : env) ::setenv(name, value, 1);
    CHECK(libs().mock->reset() == 0);
    REQUIRE(libs().mock->configure(&mock) == 0);
  }
  ~GroupProxy() {
    if (initialized_) p11->C_Finalize(nullptr);
    ::unlink(path_.c_str());
    reset_environment();
  }
  GroupProxy(const GroupProxy&) = delete;
  GroupProxy& operator=(const GroupProxy&) = delete;

  // C_Initialize; `err` gets what it wrote on stderr.
  CK_RV initialize(std::string* err = nullptr) {
    CK_C_INITIALIZE_ARGS os{};
    os.flags = CKF_OS_LOCKING_OK;
    CK_RV rv = CKR_OK;
    std::string text = capture_stderr([&] { rv = p11->C_Initialize(&os); });
    if (err != nullptr) *err = text;
    initialized_ = rv == CKR_OK;
    return rv;
  }
  // The test called C_Finalize itself.
  void finalized() { initialized_ = false; }

  // A session on the first group's slot.
  CK_SESSION_HANDLE open(bool rw = true) {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION | (rw ? CKF_RW_SESSION : 0), nullptr, nullptr,
                               &h) == CKR_OK);
    return h;
  }

  std::vector<CK_SLOT_ID> slots(CK_BBOOL present = CK_FALSE) {
    CK_ULONG n = 0;
    REQUIRE(p11->C_GetSlotList(present, nullptr, &n) == CKR_OK);
    std::vector<CK_SLOT_ID> ids(n);
    REQUIRE(p11->C_GetSlotList(present, ids.data(), &n) == CKR_OK);
    ids.resize(n);
    return ids;
  }

  CK_TOKEN_INFO token(CK_SLOT_ID slot) {
    CK_TOKEN_INFO info{};
    REQUIRE(p11->C_GetTokenInfo(slot, &info) == CKR_OK);
    return info;
  }

  std::vector<CK_MECHANISM_TYPE> mechanisms(CK_SLOT_ID slot) {
    CK_ULONG n = 0;
    REQUIRE(p11->C_GetMechanismList(slot, nullptr, &n) == CKR_OK);
    std::vector<CK_MECHANISM_TYPE> list(n);
    REQUIRE(p11->C_GetMechanismList(slot, list.data(), &n) == CKR_OK);
    list.resize(n);
    return list;
  }

  CK_FUNCTION_LIST* p11 = libs().p11;

 private:
  std::string path_;
  bool initialized_ = false;
};

// The mock with `count` tokens (slots 0..count-1, labels mock-token-N, serial N).
inline MockConfig mock_tokens(unsigned long count) {
  MockConfig mock{};
  mock.slot_count = count;
  return mock;
}

// A group over the mock itself: member 0 its slot 2, member 1 its slot 1.
inline std::string two_mock_members() {
  return std::string("[backend.mock]\nmodule = ") + P11MUX_TEST_MOCK_PATH +
         "\n[group.signing]\nmembers = mock/serial:2, mock/label:mock-token-1\n";
}

// A token secret key made through the group: one copy on each member, each
// with its own handle there, so each member's MACs with it are its own.
inline CK_OBJECT_HANDLE make_token_key(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s,
                                       std::string id = "replayed", CK_BBOOL on_token = CK_TRUE) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_GENERIC_SECRET;
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_KEY_TYPE, &type, sizeof type},
                          {CKA_TOKEN, &on_token, sizeof on_token},
                          {CKA_ID, id.data(), id.size()}};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  REQUIRE(p->C_CreateObject(s, templ, 4, &key) == CKR_OK);
  return key;
}

// Waits (at most 5 s) until `slot` of the faulty module has a call hung in it.
inline bool wait_hung(const FaultyControl* faulty, unsigned long slot) {
  for (int i = 0; i < 500; ++i) {
    FaultySlotStats stats{};
    faulty->slot_stats(slot, &stats);
    if (stats.hung_now > 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// The faulty module over the mock's three tokens, as a group of its slots 2
// (member 0) and 1 (member 1), probed every second.
struct FaultyGroup {
  FaultyGroup(std::string extra = "", std::initializer_list<std::pair<const char*, const char*>>
                                          env = {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}})
      : faulty(faulty_control()),
        proxy(std::string("[backend.faulty]\nmodule = ") + P11MUX_TEST_FAULTY_PATH +
                  "\n[group.signing]\nmembers = faulty/serial:2, faulty/label:mock-token-1\n"
                  "recovery_interval_s = 1\n" +
                  extra,
              mock_tokens(3), env) {
    REQUIRE(faulty->reset() == 0);
  }
  // Over the mock, with [pool] bind = `mode` and the log at `level`.
  struct Bind {
    const char* mode;
  };
  explicit FaultyGroup(Bind bind, const char* level = "warn")
      : FaultyGroup(bind, P11MUX_TEST_MOCK_PATH, level) {}
  // The same over another build of the mock (`target`: the spec bender,
  // say), which the test configures before initialize(): this configures
  // only the mock.
  FaultyGroup(Bind bind, const char* target, const char* level)
      : FaultyGroup("", {{"P11MUX_FAULTY_TARGET", target},
                         {"P11MUX_POOL_BIND", bind.mode},
                         {"P11MUX_LOG_LEVEL", level}}) {}
  ~FaultyGroup() { faulty->reset(); }
  FaultyGroup(const FaultyGroup&) = delete;
  FaultyGroup& operator=(const FaultyGroup&) = delete;

  unsigned long sessions_on(CK_SLOT_ID slot) const {
    FaultySlotStats stats{};
    faulty->slot_stats(slot, &stats);
    return stats.sessions_open;
  }
  CK_SESSION_HANDLE open(bool rw = false) {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION | (rw ? CKF_RW_SESSION : 0), nullptr,
                                     nullptr, &h) == CKR_OK);
    return h;
  }
  CK_RV random(CK_SESSION_HANDLE h) {
    std::array<CK_BYTE, 8> bytes{};
    return proxy.p11->C_GenerateRandom(h, bytes.data(), bytes.size());
  }
  // Member 0 taken down by a call on another session (`other`, on member 0;
  // in multiplex mode the calling thread's lane of it). With bind = state an
  // idle session borrows a backend session for its call: member 0's
  // C_OpenSession fails, which takes it down as well, and the call is made
  // on member 1.
  void take_member_0_down(CK_SESSION_HANDLE other) {
    faulty->fail_slot(2, CKR_DEVICE_ERROR);
    const CK_RV rv = random(other);
    CHECK((rv == CKR_DEVICE_ERROR || rv == CKR_OK));
  }
  // Whether `s` (in multiplex mode, the calling thread's lane of it) is on
  // member 0, without taking either down: member 1 answers a code that says
  // nothing of its health (group_failover_test.cpp).
  bool on_member_0(CK_SESSION_HANDLE s) {
    faulty->fail_slot(1, CKR_FUNCTION_FAILED);
    const CK_RV rv = random(s);
    faulty->clear_slot(1);
    CAPTURE(rv);
    REQUIRE((rv == CKR_OK || rv == CKR_FUNCTION_FAILED));
    return rv == CKR_OK;
  }
  // The faulty module's rule: the Nth `function` is forwarded (the member
  // does its work) and answered `rv` (faulty_control.h: on a call ending an
  // operation, or any call with `after`; any other call it replaces).
  void fail_nth(const char* function, CK_RV rv, unsigned long nth, bool after = false) {
    FaultyConfig c{};
    REQUIRE(faulty->config_from_env(&c) == 0);
    std::strncpy(c.rules[0].function, function, sizeof c.rules[0].function - 1);
    c.rules[0].rv = rv;
    c.rules[0].nth = nth;
    c.rules[0].after = after ? 1 : 0;
    REQUIRE(faulty->configure(&c) == 0);
  }

  const FaultyControl* faulty;
  GroupProxy proxy;
};

// A thread of its own that runs what it is given, in turn: in multiplex
// mode, one lane of each session it calls, used at several moments of a test.
class Worker {
 public:
  Worker() : thread_([this] { serve(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      stop_ = true;
    }
    ready_.notify_one();
    thread_.join();
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  CK_RV run(std::function<CK_RV()> call) {
    std::packaged_task<CK_RV()> task(std::move(call));
    std::future<CK_RV> answer = task.get_future();
    {
      std::lock_guard<std::mutex> guard(mutex_);
      tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
    return answer.get();
  }

 private:
  void serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      ready_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;
      std::packaged_task<CK_RV()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::packaged_task<CK_RV()>> tasks_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace p11mux::test
