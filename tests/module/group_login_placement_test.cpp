// Issue 15, where a group's sessions open while the application is logged in
// (docs/groups.md, "Keeping the PIN"): a member that cannot be logged in
// from the kept PIN is passed over while another member can take the
// session, and a member that stops answering while a session opens on it
// holds up neither the group's other opens nor its own hang detection.
// Over the faulty module in front of the mock's three tokens
// (group_login_harness.hpp: member i is the mock's slot i).
#include "group_login_harness.hpp"

#include "unit/observe_test_support.hpp"

#include <unistd.h>

#include <array>
#include <chrono>
#include <future>
#include <string>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

constexpr const char* kMember2 = "f/label:mock-token-1";  // the mock's slot 1

// GroupLoginProxy in session mode `mode` with its figures in /metrics.
class MeteredLogin {
 public:
  MeteredLogin(const char* mode, std::string_view group = "")
      : sock_(unique_temp_path("login-placement", "sock")),
        proxy({{"P11MUX_SESSION_MODE", mode}, {"P11MUX_METRICS_LISTEN", sock_.c_str()}}, group) {}
  ~MeteredLogin() { ::unlink(sock_.c_str()); }
  MeteredLogin(const MeteredLogin&) = delete;
  MeteredLogin& operator=(const MeteredLogin&) = delete;

  // A member's figure (docs/groups.md, "Per-member figures").
  double figure(const char* name, const char* member) const {
    auto m = http_get(endpoint_of(sock_), "/metrics");
    REQUIRE(m);
    return parse_prometheus(m->body).at(std::string(name) + "{group=\"signing\",member=\"" +
                                        member + "\"}");
  }
  // Whether `member` is found hung, polled for at most 10 s (a liveness
  // guard, not a timing: hang_timeout_s = 1 finds it within 1.25 s).
  bool hung_within_10s(const char* member) const {
    for (int i = 0; i < 200; ++i) {
      if (figure("p11mux_member_hung_total", member) == 1) return true;
      std::this_thread::sleep_for(50ms);
    }
    return false;
  }
  // A session opened on the group, logged in, serving calls; CK_INVALID_HANDLE
  // if it did not open.
  CK_SESSION_HANDLE open_logged_in() {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    CHECK(proxy.open(h) == CKR_OK);
    if (h == CK_INVALID_HANDLE) return h;
    // In multiplex mode the calls open the session's lane, placed then.
    CK_SESSION_INFO info{};
    CHECK(proxy.logged([&] { return proxy.p11->C_GetSessionInfo(h, &info); }) == CKR_OK);
    CHECK(info.state == CKS_RO_USER_FUNCTIONS);
    // One call or two: in multiplex mode with bind = state each call places
    // the lane anew, and choices among idle members take turns, so a fixed
    // number of calls could have every lane land on the same member.
    const unsigned calls = 1 + opened_++ % 2;
    for (unsigned k = 0; k < calls; ++k) {
      std::array<CK_BYTE, 8> bytes{};
      CHECK(proxy.logged([&] {
        return proxy.p11->C_GenerateRandom(h, bytes.data(), bytes.size());
      }) == CKR_OK);
    }
    return h;
  }

 private:
  std::string sock_;
  unsigned opened_ = 0;

 public:
  GroupLoginProxy proxy;
};

// The application logged in (on the session returned) while member 2 was
// absent; its PIN changed out of band meanwhile, then it is back: up, with
// its token, and it refuses the kept PIN.
CK_SESSION_HANDLE log_in_without_member_2(GroupLoginProxy& proxy) {
  faulty_control()->fail_slot(1, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  set_token_pin(1, kPin, "changed");
  faulty_control()->clear_slot(1);
  return a;
}

// Member 2 refuses the kept PIN (log_in_without_member_2). Every session
// still opens, logged in, on the other members; the PIN is tried on member 2
// once; once the application logs in again (the PIN fixed), member 2 takes
// sessions again.
void sessions_pass_over_a_refusing_member(const char* mode) {
  MeteredLogin m(mode);
  GroupLoginProxy& proxy = m.proxy;
  const CK_SESSION_HANDLE a = log_in_without_member_2(proxy);

  // Sessions open until one was placed on member 2 (the first open in
  // serialize mode: it holds the fewest sessions), and 6 more. Each opens
  // logged in and serves its calls: before, those placed on member 2
  // answered CKR_DEVICE_ERROR (serialize mode: every open after the first
  // that was placed there, as it still held the fewest), or member 2 was
  // taken down for it (multiplex mode: a lane's open failing).
  const std::string refused =
      "member 2 (f/label:mock-token-1) refused the kept login (CKR_PIN_INCORRECT)";
  int more = 6;
  for (int i = 0; i < 40 && more > 0; ++i) {
    CAPTURE(i);
    CHECK(m.open_logged_in() != CK_INVALID_HANDLE);
    if (proxy.log().find(refused) != std::string::npos) --more;
  }
  CHECK(more == 0);
  CHECK(m.figure("p11mux_member_up", kMember2) == 1);
  CHECK(m.figure("p11mux_member_login_ready", kMember2) == 0);
  CHECK(m.figure("p11mux_member_login_ready", "f/label:mock-token-0") == 1);
  CHECK(m.figure("p11mux_member_sessions", kMember2) == 0);
  CHECK(m.figure("p11mux_member_sessions", "f/label:mock-token-0") > 0);
  CHECK(m.figure("p11mux_member_sessions", "f/label:mock-token-2") > 0);
  // Said once: the PIN is not tried again.
  const std::size_t said = proxy.log().find(refused);
  CHECK_MESSAGE(proxy.log().find(refused, said + 1) == std::string::npos, proxy.log());
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);

  // Its PIN put back, the application logs in again: member 2 takes the
  // login, and sessions again.
  set_token_pin(1, "changed", kPin);
  REQUIRE(proxy.p11->C_Logout(a) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  CHECK(token_state(1) == CKS_RO_USER_FUNCTIONS);
  for (int i = 0; i < 6; ++i) CHECK(m.open_logged_in() != CK_INVALID_HANDLE);
  CHECK(m.figure("p11mux_member_sessions", kMember2) > 0);
  CHECK(m.figure("p11mux_member_login_ready", kMember2) == 1);
}

}  // namespace

TEST_CASE("group login placement: sessions pass over a member that refuses the kept PIN") {
  sessions_pass_over_a_refusing_member("serialize");
}

TEST_CASE(
    "group login placement: multiplex mode, lanes pass over a member that refuses the kept PIN") {
  sessions_pass_over_a_refusing_member("multiplex");
}

TEST_CASE("group login placement: no member can be logged in: the open answers CKR_DEVICE_ERROR") {
  GroupLoginProxy proxy;
  (void)log_in_without_member_2(proxy);
  // Member 2 the only member with its token: nowhere else to go.
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  faulty_control()->fail_slot(2, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE b = CK_INVALID_HANDLE;
  CHECK(proxy.open(b) == CKR_DEVICE_ERROR);
  CHECK(proxy.open(b) == CKR_DEVICE_ERROR);
  CHECK_MESSAGE(proxy.log().find("member 2 (f/label:mock-token-1) is not logged in (see above)") !=
                    std::string::npos,
                proxy.log());
  // Another member back: the session goes there.
  faulty_control()->clear_slot(2);
  REQUIRE(proxy.open(b) == CKR_OK);
  CHECK(proxy.state(b) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);
}

TEST_CASE(
    "group login placement: a member that hangs while a session opens on it holds up neither "
    "the group's other opens nor its hang detection") {
  // balance = primary: member 1 while its token is there, else member 2.
  GroupLoginProxy proxy({}, "balance = primary\nhang_timeout_s = 1\n");
  // Member 2 absent at the login: it has no session of p11mux's, so the
  // first open placed on it opens one, in the mock, before asking its state.
  faulty_control()->fail_slot(1, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  faulty_control()->clear_slot(1);

  CK_SESSION_HANDLE b = CK_INVALID_HANDLE, c = CK_INVALID_HANDLE;
  std::future<CK_RV> first, second;
  // Whatever happens below, member 2 answers again before the calls waiting
  // on it are waited for (the futures end after this).
  struct Released {
    ~Released() {
      faulty_control()->clear_slot(0);
      faulty_control()->release_slot(1);
      (void)mock_open_takes(0);
    }
  } released;

  // Member 1's token away for a moment: b is placed on member 2, whose
  // backend session opens slowly; member 2 stops answering meanwhile, so
  // that b's open hangs in member 2's C_GetSessionInfo (GroupLogin asking
  // whether it is logged in).
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  REQUIRE(mock_open_takes(2'000'000));
  const unsigned long opens = faulty_control()->calls("C_OpenSession");
  first = std::async(std::launch::async, [&] {
    return proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &b);
  });
  for (int i = 0; i < 2500 && faulty_control()->calls("C_OpenSession") == opens; ++i) {
    std::this_thread::sleep_for(2ms);
  }
  REQUIRE(faulty_control()->calls("C_OpenSession") > opens);
  faulty_control()->hang_slot(1, FAULTY_HANG_UNTIL_RELEASED);
  faulty_control()->clear_slot(0);
  REQUIRE(mock_open_takes(0));
  REQUIRE(wait_hung(faulty_control(), 1));

  // Another open goes to member 1 and completes at once: the group's
  // login lock is not held across member 2's call. Before, it waited for
  // member 2 for ever (5 s bound here).
  second = std::async(std::launch::async, [&] {
    return proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &c);
  });
  const bool prompt = second.wait_for(5s) == std::future_status::ready;
  CHECK(prompt);
  // Member 2's hung call is counted in flight: it is found hung after
  // hang_timeout_s (within 1.25 s; 10 s is a liveness guard). Before, never.
  CHECK(proxy.log_until(
      [&](const std::string& log) {
        return log.find("group 'signing' member f/label:mock-token-1 is down (hung)") !=
               std::string::npos;
      },
      10s));
  // Member 2 answers again: b's open, its member now down, goes elsewhere.
  faulty_control()->release_slot(1);
  REQUIRE(first.wait_for(10s) == std::future_status::ready);
  CHECK(first.get() == CKR_OK);
  REQUIRE(second.wait_for(10s) == std::future_status::ready);
  CHECK(second.get() == CKR_OK);
  CHECK(proxy.state(b) == CKS_RO_USER_FUNCTIONS);
  CHECK(proxy.state(c) == CKS_RO_USER_FUNCTIONS);
}

TEST_CASE(
    "group login placement: a member that hangs under C_CloseSession's own calls is found hung") {
  MeteredLogin m("serialize", "balance = primary\nhang_timeout_s = 1\n");
  GroupLoginProxy& proxy = m.proxy;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);  // on member 1, the mock's slot 0
  // A search left active: the close ends it on the member before the
  // backend session goes back to the pool (Runtime::reset_backend_session),
  // which member 1, silent by then, does not answer.
  REQUIRE(proxy.p11->C_FindObjectsInit(a, nullptr, 0) == CKR_OK);
  std::future<CK_RV> closed;
  struct Released {
    ~Released() { faulty_control()->release_slot(0); }
  } released;
  faulty_control()->hang_slot(0, FAULTY_HANG_UNTIL_RELEASED);
  closed = std::async(std::launch::async, [&] { return proxy.p11->C_CloseSession(a); });
  REQUIRE(wait_hung(faulty_control(), 0));
  // Counted in flight: found hung (within 1.25 s; 10 s is a liveness
  // guard). Before, never: no other call was in flight there.
  const char* member1 = "f/label:mock-token-0";
  CHECK(m.hung_within_10s(member1));
  faulty_control()->release_slot(0);
  REQUIRE(closed.wait_for(10s) == std::future_status::ready);
  CHECK(closed.get() == CKR_OK);
}

TEST_CASE(
    "group login placement: a member that hangs while placement looks at its token is found "
    "hung, and the session goes elsewhere") {
  // balance = primary: member 1 first.
  MeteredLogin m("serialize", "balance = primary\nhang_timeout_s = 1\n");
  GroupLoginProxy& proxy = m.proxy;
  CK_SESSION_HANDLE b = CK_INVALID_HANDLE;
  std::future<CK_RV> opened;
  struct Released {
    ~Released() { faulty_control()->release_slot(0); }
  } released;
  // Member 1 silent: placement's look at its token (C_GetSlotInfo) hangs.
  faulty_control()->hang_slot(0, FAULTY_HANG_UNTIL_RELEASED);
  opened = std::async(std::launch::async, [&] {
    return proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &b);
  });
  REQUIRE(wait_hung(faulty_control(), 0));
  // Counted in flight: found hung (within 1.25 s; 10 s is a liveness
  // guard). Before, never: no other call was in flight there.
  const char* member1 = "f/label:mock-token-0";
  CHECK(m.hung_within_10s(member1));
  // It answers: down by now, so the session goes to member 2.
  faulty_control()->release_slot(0);
  REQUIRE(opened.wait_for(10s) == std::future_status::ready);
  CHECK(opened.get() == CKR_OK);
  CHECK(m.figure("p11mux_member_sessions", member1) == 0);
  CHECK(m.figure("p11mux_member_sessions", kMember2) == 1);
}

}  // namespace p11mux::test
