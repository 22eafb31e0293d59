// Issue 15, a member that hangs inside the group's own C_Login, C_Logout or
// last session's logout (docs/groups.md, "Keeping the PIN"): it holds up the
// thread that called into it, and no other: the group's other opens and
// calls go on, placed on the other members, and the hung member is found
// hung after hang_timeout_s. Over the faulty module in front of the mock's
// three tokens (group_login_harness.hpp: member i is the mock's slot i).
// Every wait is bounded: before the group's lock was let go across the
// members' calls, the other thread's open waited for the hung member, and
// the 5 s bounds below failed.
#include "group_login_harness.hpp"

#include <array>
#include <chrono>
#include <future>
#include <string>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

// balance = primary: the sessions go to member 1 (the mock's slot 0) while it
// is up; member 2 (slot 1) is the one that hangs.
constexpr const char* kGroup = "balance = primary\nhang_timeout_s = 1\nrecovery_interval_s = 1\n";

// What another thread's open on the group, and a call on its session, got.
struct Other {
  CK_RV open = CKR_GENERAL_ERROR;
  CK_RV random = CKR_GENERAL_ERROR;
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
};

Other open_and_call(GroupLoginProxy& proxy) {
  Other out;
  out.open = proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &out.h);
  if (out.open != CKR_OK) return out;
  std::array<CK_BYTE, 8> bytes{};
  out.random = proxy.p11->C_GenerateRandom(out.h, bytes.data(), bytes.size());
  return out;
}

// While another thread's calls run: whether they ended within 5 s, and
// whether member 2 was found hung (its "down (hung)" line within 10 s: a
// liveness guard, not a timing; hang_timeout_s = 1 finds it within 1.25 s).
// Whatever p11mux logs meanwhile goes to proxy.log().
struct Watched {
  bool prompt = false;
  bool hung = false;
};
Watched watch(GroupLoginProxy& proxy, const std::future<Other>& other) {
  Watched out;
  const auto start = std::chrono::steady_clock::now();
  (void)proxy.log_until(
      [&](const std::string& log) {
        const bool in_time = std::chrono::steady_clock::now() - start < 5s;
        if (!out.prompt && in_time) {
          out.prompt = other.wait_for(0s) == std::future_status::ready;
        }
        out.hung = log.find("group 'signing' member f/label:mock-token-1 is down (hung)") !=
                   std::string::npos;
        return out.hung && (out.prompt || !in_time);
      },
      10s);
  return out;
}

// Member 2 answers again whatever happens below, before the calls waiting on
// it are waited for (the futures end after this).
struct Released {
  ~Released() {
    faulty_control()->clear_slot(1);
    (void)mock_open_takes(0);
  }
};

// Runs `call` on a thread of its own and waits until it hangs in member 2's
// C_Login or C_Logout: the session p11mux borrows there is opened first
// (the pool keeps none for it), slowly, and member 2 stops answering
// meanwhile, so that the open is made (a hang in it is the pool's, not
// counted on the member) and the call after it hangs. `future`
// outlives the test's Released, which lets member 2 go before it is waited for.
template <class Call>
void hang_member_2_in(std::future<CK_RV>& future, Call call) {
  REQUIRE(mock_open_takes(1'000'000));
  const unsigned long opens = faulty_control()->calls("C_OpenSession");
  future = std::async(std::launch::async, call);
  for (int i = 0; i < 2500 && faulty_control()->calls("C_OpenSession") <= opens; ++i) {
    std::this_thread::sleep_for(2ms);
  }
  REQUIRE(faulty_control()->calls("C_OpenSession") > opens);
  faulty_control()->hang_slot(1, FAULTY_HANG_UNTIL_RELEASED);
  REQUIRE(mock_open_takes(0));
  REQUIRE(wait_hung(faulty_control(), 1));
}

// Member 2 answers: the call that hung in it returns CKR_OK, and the other
// thread's calls have ended; what they got.
Other answered(std::future<CK_RV>& hung, std::future<Other>& other) {
  faulty_control()->release_slot(1);
  REQUIRE(hung.wait_for(10s) == std::future_status::ready);
  CHECK(hung.get() == CKR_OK);
  REQUIRE(other.wait_for(10s) == std::future_status::ready);
  Other out = other.get();
  CHECK(out.open == CKR_OK);
  CHECK(out.random == CKR_OK);
  return out;
}

// Every member's token logged out.
void check_all_logged_out() {
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) {
    CAPTURE(slot);
    CHECK(token_state(slot) == CKS_RO_PUBLIC_SESSION);
  }
}

}  // namespace

TEST_CASE(
    "group login hang: a member that hangs in the group's C_Login holds up only that login; the "
    "group logs in on the others, and the member from the kept PIN once it is back") {
  GroupLoginProxy proxy({}, kGroup);
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);  // on member 1

  std::future<CK_RV> login;
  std::future<Other> other;
  Released released;
  // Straight to p11mux, not through proxy.login: its log capture would race
  // the main thread's log_until.
  hang_member_2_in(login, [&] { return proxy.p11->C_Login(a, CKU_USER, utf8(kPin), kPin.size()); });

  // Another thread opens a session (on member 1) and calls on it: at once.
  // Its C_Login is answered as the login in progress will be, not waited for.
  CK_RV second_login = CKR_GENERAL_ERROR;
  other = std::async(std::launch::async, [&] {
    Other out = open_and_call(proxy);
    if (out.open == CKR_OK) {
      second_login = proxy.p11->C_Login(out.h, CKU_USER, utf8(kPin), kPin.size());
    }
    return out;
  });
  const Watched w = watch(proxy, other);
  CHECK(w.prompt);
  CHECK(w.hung);
  CHECK(login.wait_for(0s) == std::future_status::timeout);  // A still waits in member 2

  // Member 2 answers at last, with a device error: down by then, it is
  // skipped as a member not up is, and the group is logged in on the others.
  faulty_control()->fail_slot(1, CKR_DEVICE_ERROR);
  const Other b = answered(login, other);
  CHECK(second_login == CKR_USER_ALREADY_LOGGED_IN);
  CHECK(proxy.state(a) == CKS_RO_USER_FUNCTIONS);
  CHECK(proxy.state(b.h) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(0) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(2) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);

  // Member 2 back: its probe logs it in from the kept PIN.
  faulty_control()->clear_slot(1);
  CHECK(proxy.log_until(
      [](const std::string& log) {
        return log.find(
                   "member 2 (f/label:mock-token-1) logged in from the kept login by its "
                   "probe") != std::string::npos;
      },
      10s));
  CHECK(token_state(1) == CKS_RO_USER_FUNCTIONS);
}

TEST_CASE(
    "group login hang: a member that hangs in the group's C_Logout holds up only that logout; "
    "the others' sessions open meanwhile, and every member ends logged out") {
  GroupLoginProxy proxy({}, kGroup);
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);  // on member 1
  REQUIRE(proxy.login(a) == CKR_OK);

  std::future<CK_RV> logout;
  std::future<Other> other;
  Released released;
  hang_member_2_in(logout, [&] { return proxy.p11->C_Logout(a); });

  // The logout in progress is the application's already: the other thread's
  // session opens, on member 1 (logged out by then), and its C_Logout
  // answers CKR_USER_NOT_LOGGED_IN at once.
  CK_RV second_logout = CKR_GENERAL_ERROR;
  other = std::async(std::launch::async, [&] {
    Other out = open_and_call(proxy);
    if (out.open == CKR_OK) second_logout = proxy.p11->C_Logout(out.h);
    return out;
  });
  const Watched w = watch(proxy, other);
  CHECK(w.prompt);
  CHECK(w.hung);

  const Other b = answered(logout, other);
  CHECK(second_logout == CKR_USER_NOT_LOGGED_IN);
  CHECK(proxy.state(b.h) == CKS_RO_PUBLIC_SESSION);
  check_all_logged_out();
  // Logged out, the group logs in again as before.
  CHECK(proxy.login(a) == CKR_OK);
  CHECK(token_state(0) == CKS_RO_USER_FUNCTIONS);
}

TEST_CASE(
    "group login hang: a member that hangs in the logout of the group's last session holds up "
    "only that close") {
  GroupLoginProxy proxy({}, kGroup);
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);  // on member 1, the group's only session
  REQUIRE(proxy.login(a) == CKR_OK);

  std::future<CK_RV> closed;
  std::future<Other> other;
  Released released;
  hang_member_2_in(closed, [&] { return proxy.p11->C_CloseSession(a); });

  other = std::async(std::launch::async, [&] { return open_and_call(proxy); });
  const Watched w = watch(proxy, other);
  CHECK(w.prompt);
  CHECK(w.hung);

  const Other b = answered(closed, other);
  CHECK(proxy.state(b.h) == CKS_RO_PUBLIC_SESSION);
  check_all_logged_out();
}

}  // namespace p11mux::test
