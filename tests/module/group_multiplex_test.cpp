// Issue 15, multiplex mode on a group's slot (docs/groups.md, "Multiplex
// mode"): a virtual session that several threads call at once runs each
// thread's calls on a lane of its own (proxy/group/session_lanes.hpp), each
// lane a group's session placed by the group's balance over calls in flight.
// Over the faulty module in front of the mock's tokens (FaultyGroup: member 0
// is the mock's slot 2, member 1 its slot 1).
#include "group_harness.hpp"

#include "unit/observe_test_support.hpp"

#include <dlfcn.h>

#include <array>
#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

namespace p11mux::test {
namespace {

// FaultyGroup in multiplex mode, its members chosen by `balance`.
struct MultiplexGroup : FaultyGroup {
  explicit MultiplexGroup(const char* balance = "least-busy")
      : FaultyGroup(std::string("balance = ") + balance + "\n",
                    {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                     {"P11MUX_SESSION_MODE", "multiplex"},
                     {"P11MUX_LOG_LEVEL", "error"}}) {
    REQUIRE(proxy.initialize() == CKR_OK);
  }
  // `call` run on a thread of its own, its answer awaited at most 10 s
  // (CKR_CANCEL if it did not come: the thread then waited for another's call).
  template <class Call>
  CK_RV on_own_thread(Call call) {
    auto answer = std::async(std::launch::async, call);
    if (answer.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      faulty->clear_slot(1);  // lets it end, so the test can
      faulty->clear_slot(2);
      answer.wait();
      return CKR_CANCEL;
    }
    return answer.get();
  }
};

}  // namespace

TEST_CASE("group multiplex: a call in flight on one member does not hold up another thread's") {
  MultiplexGroup g;
  const CK_SESSION_HANDLE s = g.open();
  // Member 0 hangs. Threads call the session until one of them is caught
  // there (the first choice among idle members takes turns).
  g.faulty->hang_slot(2, FAULTY_HANG_UNTIL_RELEASED);
  std::vector<std::thread> caught;
  struct Joined {
    MultiplexGroup& g;
    std::vector<std::thread>& threads;
    ~Joined() {
      g.faulty->release_slot(2);
      for (std::thread& t : threads) t.join();
    }
  } joined{g, caught};
  for (int i = 0; i < 6 && !wait_hung(g.faulty, 2); ++i) {
    caught.emplace_back([&] { (void)g.random(s); });
  }
  REQUIRE(wait_hung(g.faulty, 2));
  // Another thread's calls on the same session go to member 1, which has
  // fewer calls in flight, and are answered meanwhile: in serialize mode
  // they would wait for the hung call.
  CHECK(g.on_own_thread([&] {
    for (int i = 0; i < 20; ++i) {
      if (CK_RV rv = g.random(s); rv != CKR_OK) return rv;
    }
    return CKR_OK;
  }) == CKR_OK);
  FaultySlotStats stats{};
  g.faulty->slot_stats(2, &stats);
  CHECK(stats.hung_now == 1);  // still there: those calls went elsewhere
}

TEST_CASE("group multiplex: a thread's first call, its member's token gone unnoticed, goes on") {
  // primary: the lane is opened on member 0, up as far as p11mux knows.
  MultiplexGroup g("primary");
  const CK_SESSION_HANDLE s = g.open();
  g.faulty->set_slot_removed(2, 1);
  CHECK(g.on_own_thread([&] { return g.random(s); }) == CKR_OK);
  CHECK(g.on_own_thread([&] { return g.random(s); }) == CKR_OK);
  g.faulty->clear_slot(2);
}

TEST_CASE("group multiplex: the lane of a thread that exited closes when another thread comes") {
  const std::string sock = unique_temp_path("lanes", "sock");
  FaultyGroup g("", {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                     {"P11MUX_SESSION_MODE", "multiplex"},
                     {"P11MUX_LOG_LEVEL", "error"},
                     {"P11MUX_METRICS_LISTEN", sock.c_str()}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  // The session and its lanes are p11mux's virtual sessions.
  auto sessions_open = [&] {
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    return parse_prometheus(m->body).at("p11mux_sessions_open");
  };
  const CK_SESSION_HANDLE s = g.open();
  for (int t = 0; t < 5; ++t) {
    std::thread thread([&] { CHECK(g.random(s) == CKR_OK); });
    thread.join();  // its thread_local destructors have run
  }
  CHECK(sessions_open() == 2);  // the session and the last thread's lane
  CHECK(g.random(s) == CKR_OK);
  CHECK(sessions_open() == 2);  // the session and this thread's lane
  ::unlink(sock.c_str());
}

TEST_CASE("group multiplex: balance = primary, an idle lane goes back to the first member") {
  const std::string sock = unique_temp_path("primary", "sock");
  FaultyGroup g("balance = primary\n", {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                                        {"P11MUX_SESSION_MODE", "multiplex"},
                                        {"P11MUX_LOG_LEVEL", "error"},
                                        {"P11MUX_METRICS_LISTEN", sock.c_str()}});
  // Each member takes one call at a time (its token says one session).
  MockConfig mock = mock_tokens(3);
  mock.token_max_session_count = 1;
  REQUIRE(libs().mock->configure(&mock) == 0);
  REQUIRE(g.proxy.initialize() == CKR_OK);
  auto lanes_on = [&](const char* member) {
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    return parse_prometheus(m->body).at(
        std::string("p11mux_member_sessions{group=\"signing\",member=\"") + member + "\"}");
  };
  const CK_SESSION_HANDLE s = g.open();
  // A first worker's lane on member 0; then a call of it hangs there, in
  // flight, so the second worker's lane opens on member 1.
  Worker first;
  CHECK(first.run([&] { return g.random(s); }) == CKR_OK);
  g.faulty->hang_slot(2, FAULTY_HANG_UNTIL_RELEASED);
  auto hung =
      std::async(std::launch::async, [&] { return first.run([&] { return g.random(s); }); });
  struct Released {
    const FaultyControl* faulty;
    ~Released() { faulty->release_slot(2); }  // before `hung` waits, if a check fails
  } released{g.faulty};
  REQUIRE(wait_hung(g.faulty, 2));
  Worker worker;
  CHECK(worker.run([&] { return g.random(s); }) == CKR_OK);
  CHECK(lanes_on("faulty/serial:2") == 1);
  CHECK(lanes_on("faulty/label:mock-token-1") == 1);
  g.faulty->release_slot(2);
  CHECK(hung.get() == CKR_OK);
  // Member 0 has room again: the worker's lane, holding nothing, goes back
  // there before its next call takes a backend session.
  CHECK(worker.run([&] { return g.random(s); }) == CKR_OK);
  CHECK(lanes_on("faulty/serial:2") == 2);
  CHECK(lanes_on("faulty/label:mock-token-1") == 0);
  ::unlink(sock.c_str());
}

TEST_CASE("group multiplex: a lane's handle is never the application's") {
  MultiplexGroup g;
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE s = g.open();
  // Lanes are opened after the session, on the entries that follow it.
  for (int t = 0; t < 3; ++t) CHECK(g.on_own_thread([&] { return g.random(s); }) == CKR_OK);
  CK_SESSION_INFO info{};
  for (CK_SESSION_HANDLE h = s + 1; h < s + 8; ++h) {
    CAPTURE(h);
    CHECK(p->C_GetSessionInfo(h, &info) == CKR_SESSION_HANDLE_INVALID);
    CHECK(p->C_CloseSession(h) == CKR_SESSION_HANDLE_INVALID);
  }
  // The session and its lanes are as they were.
  for (int t = 0; t < 3; ++t) CHECK(g.on_own_thread([&] { return g.random(s); }) == CKR_OK);
  REQUIRE(p->C_GetSessionInfo(s, &info) == CKR_OK);
  CHECK(info.slotID == 0);  // the group's slot, not a member's
  // Closed, it takes its lanes with it: nothing answers on it any more, and
  // C_Finalize finds no backend session of the application's.
  CHECK(p->C_CloseSession(s) == CKR_OK);
  CHECK(g.random(s) == CKR_SESSION_HANDLE_INVALID);
  CHECK(g.on_own_thread([&] { return g.random(s); }) == CKR_SESSION_HANDLE_INVALID);
  CHECK(g.proxy.p11->C_Finalize(nullptr) == CKR_OK);
  g.proxy.finalized();
  CHECK(g.sessions_on(1) == 0);
  CHECK(g.sessions_on(2) == 0);
}

TEST_CASE("group multiplex: C_CloseAllSessions and C_Finalize close sessions with their lanes") {
  MultiplexGroup g;
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open();
  const CK_SESSION_HANDLE b = g.open();
  for (CK_SESSION_HANDLE s : {a, b}) {
    for (int t = 0; t < 3; ++t) CHECK(g.on_own_thread([&] { return g.random(s); }) == CKR_OK);
  }
  CHECK(p->C_CloseAllSessions(0) == CKR_OK);
  CHECK(g.random(a) == CKR_SESSION_HANDLE_INVALID);
  CHECK(g.random(b) == CKR_SESSION_HANDLE_INVALID);
  // A new session works, with lanes of its own.
  const CK_SESSION_HANDLE c = g.open();
  CHECK(g.on_own_thread([&] { return g.random(c); }) == CKR_OK);
  CHECK(g.random(c) == CKR_OK);
}

TEST_CASE("group multiplex: a session object pins the session's lanes to its member") {
  // round-robin: without the pin, each call of a lane holding nothing goes
  // to the next member in turn, and some of these calls run on the member
  // where the object is not.
  MultiplexGroup g("round-robin");
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE s = g.open(true);
  CK_OBJECT_CLASS cls = CKO_DATA;
  std::string label = "session object of a multiplexed session";
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, label.data(), label.size()}};
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
  REQUIRE(g.random(s) == CKR_OK);
  REQUIRE(p->C_CreateObject(s, templ, 2, &object) == CKR_OK);
  for (int t = 0; t < 4; ++t) {
    CAPTURE(t);
    CHECK(g.on_own_thread([&] {
      if (CK_RV rv = g.random(s); rv != CKR_OK) return rv;
      std::array<char, 64> read{};
      CK_ATTRIBUTE get{CKA_LABEL, read.data(), read.size()};
      CK_RV rv = p->C_GetAttributeValue(s, object, &get, 1);
      if (rv == CKR_OK && std::string(read.data(), get.ulValueLen) != label) rv = CKR_GENERAL_ERROR;
      return rv;
    }) == CKR_OK);
  }
  CHECK(p->C_DestroyObject(s, object) == CKR_OK);
}

TEST_CASE("group multiplex: C_SessionCancel from one thread cancels on every lane holding it") {
  MockConfig mock = mock_tokens(3);
  mock.provide_v3 = 1;
  GroupProxy proxy(two_mock_members(), mock,
                   {{"P11MUX_SESSION_MODE", "multiplex"}, {"P11MUX_LOG_LEVEL", "error"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  void* p11mux = ::dlopen(P11MUX_TEST_LIBRARY_PATH, RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(p11mux != nullptr);
  auto get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(p11mux, "C_GetInterface"));
  REQUIRE(static_cast<bool>(get_interface));
  CK_VERSION v30{3, 0};
  CK_INTERFACE* iface = nullptr;
  REQUIRE(get_interface(reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>("PKCS 11")), &v30, &iface,
                        0) == CKR_OK);
  auto* p3 = static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
  CK_FUNCTION_LIST* p = proxy.p11;
  const CK_SESSION_HANDLE s = proxy.open();
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  // Two other threads' digests, on their own lanes.
  Worker first, second;
  for (Worker* w : {&first, &second}) {
    CHECK(w->run([&] { return p->C_DigestInit(s, &sha); }) == CKR_OK);
  }
  // Cancelled from this thread, which has no lane of its own yet.
  CHECK(p3->C_SessionCancel(s, CKF_DIGEST) == CKR_OK);
  for (Worker* w : {&first, &second}) {
    CHECK(w->run([&] {
      std::array<CK_BYTE, 64> out{};
      CK_ULONG len = out.size();
      return p->C_DigestFinal(s, out.data(), &len);
    }) == CKR_OPERATION_NOT_INITIALIZED);
    CHECK(w->run([&] { return p->C_DigestInit(s, &sha); }) == CKR_OK);
  }
}

TEST_CASE("group multiplex: one thread's C_Login is every lane's") {
  MultiplexGroup g;
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE s = g.open(true);
  auto state = [&] {
    CK_SESSION_INFO info{};
    CK_RV rv = p->C_GetSessionInfo(s, &info);
    return rv == CKR_OK ? info.state : ~CK_STATE{0};
  };
  CHECK(g.on_own_thread(state) == CKS_RW_PUBLIC_SESSION);
  std::string pin = MOCK_USER_PIN;
  REQUIRE(p->C_Login(s, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin.data()), pin.size()) ==
          CKR_OK);
  for (int t = 0; t < 3; ++t) CHECK(g.on_own_thread(state) == CKS_RW_USER_FUNCTIONS);
  CHECK(g.on_own_thread([&] { return p->C_Logout(s); }) == CKR_OK);
  CHECK(state() == CKS_RW_PUBLIC_SESSION);
}

}  // namespace p11mux::test
