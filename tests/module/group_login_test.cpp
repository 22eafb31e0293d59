// Issue 15, a group's login (docs/groups.md, "Keeping the PIN";
// proxy/group/group_login.hpp): C_Login on one session of a group logs in
// every member, a member that was absent is logged in from the kept PIN when
// a session opens on it, C_Logout and the group's last session log every
// member out, C_SetPIN and C_InitPIN are refused. Over the faulty module in
// front of the mock's three tokens, so that a member's token can be made
// absent (its slot answers CKR_TOKEN_NOT_PRESENT, its sessions kept) and the
// next session opened on another member. The mock itself is reached behind
// both to read and change each token's login and PIN.
#include "group_login_harness.hpp"

#include <dlfcn.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

// The sanitizers' mlock does nothing and answers 0: RLIMIT_MEMLOCK's
// refusal is checked only without them (as in tests/unit/pin_store_test.cpp).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define P11MUX_GROUP_LOGIN_FAKE_MLOCK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define P11MUX_GROUP_LOGIN_FAKE_MLOCK 1
#endif
#endif

namespace p11mux::test {
namespace {

#ifdef P11MUX_GROUP_LOGIN_FAKE_MLOCK
constexpr bool kRealMlock = false;
#else
constexpr bool kRealMlock = true;
#endif

}  // namespace

TEST_CASE("group login: C_Login on one session logs in every member; C_Logout every one out") {
  GroupLoginProxy proxy;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);  // on member 1, the mock's slot 0
  REQUIRE(proxy.login(a) == CKR_OK);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_USER_FUNCTIONS);
  // The application's login is the group's: a second one gets what the
  // spec says, on any session.
  REQUIRE(proxy.open(b) == CKR_OK);
  CHECK(proxy.login(b) == CKR_USER_ALREADY_LOGGED_IN);
  // A session on another member (the first one's token absent) is logged in.
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE c = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(c) == CKR_OK);
  faulty_control()->clear_slot(0);
  CHECK(proxy.state(c) == CKS_RO_USER_FUNCTIONS);
  // C_Logout on that session reaches every member.
  CHECK(proxy.p11->C_Logout(c) == CKR_OK);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_PUBLIC_SESSION);
  CHECK(proxy.p11->C_Logout(a) == CKR_USER_NOT_LOGGED_IN);
  // Logged in again after the logout: every member again.
  REQUIRE(proxy.login(b) == CKR_OK);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_USER_FUNCTIONS);
}

TEST_CASE("group login: a member absent at C_Logout is logged out when it is back") {
  GroupLoginProxy proxy;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  faulty_control()->fail_slot(1, CKR_DEVICE_ERROR);  // down, its sessions (and login) kept
  CHECK(proxy.logged([&] { return proxy.p11->C_Logout(a); }) == CKR_OK);
  CHECK(token_state(1) == CKS_RO_USER_FUNCTIONS);  // behind the fault: still logged in
  CHECK_MESSAGE(proxy.log().find("member 2 (f/label:mock-token-1) did not take the logout "
                                 "(CKR_DEVICE_ERROR)") != std::string::npos,
                proxy.log());
  faulty_control()->clear_slot(1);
  CK_SESSION_HANDLE b = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(b) == CKR_OK);  // the group's next call
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_PUBLIC_SESSION);
}

TEST_CASE(
    "group login: CKU_CONTEXT_SPECIFIC goes to the session's member, the group's login stays") {
  GroupLoginProxy proxy;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a, CKF_SERIAL_SESSION | CKF_RW_SESSION) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  // A key that wants its own authorization for each signature.
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE templ[] = {{CKA_PRIVATE, &yes, sizeof yes},
                          {CKA_ALWAYS_AUTHENTICATE, &yes, sizeof yes}};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  REQUIRE(proxy.p11->C_GenerateKeyPair(a, &gen, nullptr, 0, templ, 2, &pub, &priv) == CKR_OK);
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  std::string text = "authorized once";
  CK_BYTE sig[MOCK_DIGEST_LEN * 2];
  CK_ULONG len = sizeof sig;
  REQUIRE(proxy.p11->C_SignInit(a, &ecdsa, priv) == CKR_OK);
  CHECK(proxy.p11->C_Login(a, CKU_CONTEXT_SPECIFIC, utf8(kPin), kPin.size()) == CKR_OK);
  CHECK(proxy.p11->C_Sign(a, reinterpret_cast<CK_BYTE_PTR>(text.data()), text.size(), sig, &len) ==
        CKR_OK);
  // Not the group's login: that is still the user's, on every member.
  CHECK(proxy.login(a) == CKR_USER_ALREADY_LOGGED_IN);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) {
    const CK_STATE state = token_state(slot);
    CHECK((state == CKS_RO_USER_FUNCTIONS || state == CKS_RW_USER_FUNCTIONS));
  }
  REQUIRE(proxy.p11->C_Logout(a) == CKR_OK);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_PUBLIC_SESSION);
}

TEST_CASE("group login: a wrong PIN on one member leaves no member logged in, and says which") {
  GroupLoginProxy proxy;
  set_token_pin(1, kPin, "otherpin");  // the second member's PIN differs
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  CHECK(proxy.login(a) == CKR_PIN_INCORRECT);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_PUBLIC_SESSION);
  CHECK(proxy.state(a) == CKS_RO_PUBLIC_SESSION);
  CHECK_MESSAGE(proxy.log().find("failed on member 2 (f/label:mock-token-1): CKR_PIN_INCORRECT") !=
                    std::string::npos,
                proxy.log());
  // Nothing was kept: a session on the third member is not logged in.
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  faulty_control()->fail_slot(1, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE c = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(c) == CKR_OK);
  CHECK(proxy.state(c) == CKS_RO_PUBLIC_SESSION);
  CHECK(token_state(2) == CKS_RO_PUBLIC_SESSION);
}

TEST_CASE("group login: a member absent at C_Login is logged in from the kept PIN when it opens") {
  GroupLoginProxy proxy({{"P11MUX_LOG_LEVEL", "trace"}});
  faulty_control()->fail_slot(1, CKR_TOKEN_NOT_PRESENT);  // the second member absent at the login
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  CHECK(token_state(0) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);
  CHECK(token_state(2) == CKS_RO_USER_FUNCTIONS);
  // Back, and the only member with its token: its new session is logged in.
  faulty_control()->clear_slot(1);
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE b = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(b) == CKR_OK);
  CHECK(proxy.state(b) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(1) == CKS_RO_USER_FUNCTIONS);
  CHECK_MESSAGE(proxy.log().find("member 2 (f/label:mock-token-1) logged in from the kept login") !=
                    std::string::npos,
                proxy.log());
  // Traced, every call of it: the PIN is in no line.
  CHECK(proxy.log().find("C_Login") != std::string::npos);
  CHECK_MESSAGE(proxy.log().find(kPin) == std::string::npos, proxy.log());
  REQUIRE(proxy.p11->C_Logout(b) == CKR_OK);
  CHECK(proxy.log().find(kPin) == std::string::npos);
}

TEST_CASE("group login: a kept PIN a late member refuses is not tried again") {
  GroupLoginProxy proxy;
  faulty_control()->fail_slot(1, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  set_token_pin(1, kPin, "changed");  // out of band, while it was away
  faulty_control()->clear_slot(1);
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  faulty_control()->fail_slot(2, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE b = CK_INVALID_HANDLE;
  CHECK(proxy.open(b) == CKR_DEVICE_ERROR);
  CHECK_MESSAGE(proxy.log().find("member 2 (f/label:mock-token-1) refused the kept login "
                                 "(CKR_PIN_INCORRECT); not tried again") != std::string::npos,
                proxy.log());
  // Its PIN back as it was: still not tried (each try could count toward a lockout).
  set_token_pin(1, "changed", kPin);
  CHECK(proxy.open(b) == CKR_DEVICE_ERROR);
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);
  // The application logs out and in again: the member is tried again.
  faulty_control()->clear_slot(0);
  REQUIRE(proxy.p11->C_Logout(a) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  REQUIRE(proxy.open(b) == CKR_OK);
  CHECK(proxy.state(b) == CKS_RO_USER_FUNCTIONS);
}

TEST_CASE("group login: the group's last session closed logs every member out") {
  GroupLoginProxy proxy;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  REQUIRE(proxy.open(b) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  REQUIRE(proxy.p11->C_CloseSession(a) == CKR_OK);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_USER_FUNCTIONS);
  REQUIRE(proxy.p11->C_CloseSession(b) == CKR_OK);
  // p11mux's idle pooled sessions keep the tokens open: the logout is its.
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) CHECK(token_state(slot) == CKS_RO_PUBLIC_SESSION);
  // And the kept PIN went with it: a new session is not logged in.
  REQUIRE(proxy.open(a) == CKR_OK);
  CHECK(proxy.state(a) == CKS_RO_PUBLIC_SESSION);
}

TEST_CASE("group login: C_SetPIN and C_InitPIN on a group are refused, with a log line") {
  GroupLoginProxy proxy;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a, CKF_SERIAL_SESSION | CKF_RW_SESSION) == CKR_OK);
  REQUIRE(proxy.login(a) == CKR_OK);
  std::string_view next = "next-pin";
  CHECK(proxy.logged([&] {
    return proxy.p11->C_SetPIN(a, utf8(kPin), kPin.size(), utf8(next), next.size());
  }) == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_MESSAGE(proxy.log().find("C_SetPIN on group 'signing' refused") != std::string::npos,
                proxy.log());
  CHECK(proxy.logged([&] { return proxy.p11->C_InitPIN(a, utf8(next), next.size()); }) ==
        CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(proxy.log().find("C_InitPIN on group 'signing' refused") != std::string::npos);
  // Every member's PIN is what it was.
  REQUIRE(proxy.p11->C_Logout(a) == CKR_OK);
  for (CK_SLOT_ID slot = 0; slot < 3; ++slot) set_token_pin(slot, kPin, kPin);
}

TEST_CASE(
    "group login: C_LoginUser (v3.0) logs in every member, and a late one with its username") {
  GroupLoginProxy proxy;
  void* lib = ::dlopen(P11MUX_TEST_LIBRARY_PATH, RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(lib != nullptr);
  auto get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(lib, "C_GetInterface"));
  REQUIRE(static_cast<bool>(get_interface));
  CK_VERSION v30{3, 0};
  CK_INTERFACE_PTR interface = nullptr;
  REQUIRE(get_interface(utf8("PKCS 11"), &v30, &interface, 0) == CKR_OK);
  auto* f3 = static_cast<CK_FUNCTION_LIST_3_0*>(interface->pFunctionList);
  faulty_control()->fail_slot(2, CKR_TOKEN_NOT_PRESENT);  // the third member away at the login
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(a) == CKR_OK);
  std::string_view user = "alice";
  REQUIRE(f3->C_LoginUser(a, CKU_USER, utf8(kPin), kPin.size(), utf8(user), user.size()) == CKR_OK);
  CHECK(token_state(0) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(1) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(2) == CKS_RO_PUBLIC_SESSION);
  faulty_control()->clear_slot(2);
  faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
  faulty_control()->fail_slot(1, CKR_TOKEN_NOT_PRESENT);
  CK_SESSION_HANDLE b = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(b) == CKR_OK);
  CHECK(proxy.state(b) == CKS_RO_USER_FUNCTIONS);
}

namespace {

// Member 2 (the mock's slot 1) down: its device failing, found so by a call
// of session `b` placed on it. Session `a` is on member 1. Probed every
// second once it answers again.
void take_member_2_down(GroupLoginProxy& proxy, CK_SESSION_HANDLE& a, CK_SESSION_HANDLE& b) {
  REQUIRE(proxy.open(a) == CKR_OK);  // member 1: least busy, first
  REQUIRE(proxy.open(b) == CKR_OK);  // member 2
  faulty_control()->fail_slot(1, CKR_DEVICE_ERROR);
  std::array<CK_BYTE, 8> bytes{};
  REQUIRE(proxy.logged([&] {
    return proxy.p11->C_GenerateRandom(b, bytes.data(), bytes.size());
  }) == CKR_DEVICE_ERROR);
}

}  // namespace

// Issue 15, "Failover and recovery": a member that recovers is "logged in
// again, and re-admitted". It used to be admitted logged out, and logged
// in only when a session was placed on it.
TEST_CASE("group login: a member that recovers is logged in by its probe, before it is admitted") {
  GroupLoginProxy proxy({}, "recovery_interval_s = 1\n");
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE;
  take_member_2_down(proxy, a, b);
  // Down at the login: the others take it, it does not.
  REQUIRE(proxy.login(a) == CKR_OK);
  CHECK(token_state(0) == CKS_RO_USER_FUNCTIONS);
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);
  CHECK(token_state(2) == CKS_RO_USER_FUNCTIONS);
  // It answers again: its probe logs it in, no session of the
  // application's placed on it.
  faulty_control()->clear_slot(1);
  const std::string up = "group 'signing' member f/label:mock-token-1 is up again";
  CHECK(proxy.log_until([&](const std::string& log) {
    return log.find(up) != std::string::npos && token_state(1) == CKS_RO_USER_FUNCTIONS;
  }));
  const std::string in =
      "group 'signing': member 2 (f/label:mock-token-1) logged in from the kept login by its probe";
  const std::size_t logged_in = proxy.log().find(in);
  CHECK_MESSAGE(logged_in != std::string::npos, proxy.log());
  CHECK_MESSAGE(logged_in < proxy.log().find(up), proxy.log());  // before it was admitted
  CHECK_MESSAGE(proxy.log().find(kPin) == std::string::npos, proxy.log());
  // Admitted: sessions go to it again, logged in.
  CHECK(proxy.p11->C_CloseSession(b) == CKR_OK);
  CK_SESSION_HANDLE c = CK_INVALID_HANDLE;
  REQUIRE(proxy.open(c) == CKR_OK);
  CHECK(proxy.state(c) == CKS_RO_USER_FUNCTIONS);
  // Never lazily, when a session was placed on it.
  const std::string any = "member 2 (f/label:mock-token-1) logged in from the kept login";
  CHECK_MESSAGE(proxy.log().find(any, logged_in + in.size()) == std::string::npos, proxy.log());
}

TEST_CASE("group login: a member whose login fails at its probe stays down") {
  GroupLoginProxy proxy({}, "recovery_interval_s = 1\n");
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE;
  take_member_2_down(proxy, a, b);
  REQUIRE(proxy.login(a) == CKR_OK);
  set_token_pin(1, kPin, "changed");  // out of band, while it was down
  faulty_control()->clear_slot(1);
  const std::string refused =
      "group 'signing': member 2 (f/label:mock-token-1) stays down: it refused the kept login "
      "(CKR_PIN_INCORRECT)";
  CHECK(proxy.log_until(
      [&](const std::string& log) { return log.find(refused) != std::string::npos; }));
  // Down for it, and probed again a second later: the PIN not tried again
  // (each try counts toward a lockout), not logged in, not admitted.
  const std::string down = "member f/label:mock-token-1 is down (login-failed)";
  CHECK_MESSAGE(proxy.log_until([&](const std::string& log) {
    const std::size_t first = log.find(down);
    return first != std::string::npos && log.find(down, first + 1) != std::string::npos;
  }),
                proxy.log());
  CHECK_MESSAGE(proxy.log().find("is up again") == std::string::npos, proxy.log());
  CHECK(proxy.log().find(refused, proxy.log().find(refused) + 1) == std::string::npos);
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);
  // Its sessions go elsewhere: members 1 and 3, logged in.
  for (int i = 0; i < 4; ++i) {
    CK_SESSION_HANDLE c = CK_INVALID_HANDLE;
    REQUIRE(proxy.open(c) == CKR_OK);
    CHECK(proxy.state(c) == CKS_RO_USER_FUNCTIONS);
  }
  CHECK(token_state(1) == CKS_RO_PUBLIC_SESSION);
}

// Drops CAP_IPC_LOCK (root has it; with it RLIMIT_MEMLOCK does not apply).
bool drop_ipc_lock() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3]{};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  const unsigned bit = 1U << (CAP_IPC_LOCK % 32);
  data[CAP_IPC_LOCK / 32].effective &= ~bit;
  data[CAP_IPC_LOCK / 32].permitted &= ~bit;
  return ::syscall(SYS_capset, &header, data) == 0;
}

TEST_CASE("group login: without a locked page, a warning at C_Initialize and no late login") {
  if (!kRealMlock) return;
  // In a child: the capability and the limit are the process's.
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    bool ok = false;
    try {
      rlimit none{0, 0};
      if (drop_ipc_lock() && ::setrlimit(RLIMIT_MEMLOCK, &none) == 0) {
        GroupLoginProxy proxy;
        const bool warned =
            proxy.log().find(
                "group 'signing': the group's PIN is not kept: cannot lock its page "
                "in memory (mlock, RLIMIT_MEMLOCK 0 bytes): ") != std::string::npos;
        faulty_control()->fail_slot(1, CKR_TOKEN_NOT_PRESENT);
        CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE;
        // The members present are logged in all the same.
        const bool logged_in = proxy.open(a) == CKR_OK && proxy.login(a) == CKR_OK &&
                               token_state(0) == CKS_RO_USER_FUNCTIONS &&
                               token_state(2) == CKS_RO_USER_FUNCTIONS;
        faulty_control()->clear_slot(1);
        faulty_control()->fail_slot(0, CKR_TOKEN_NOT_PRESENT);
        faulty_control()->fail_slot(2, CKR_TOKEN_NOT_PRESENT);
        // The late member cannot be logged in: its session is refused.
        const bool refused =
            proxy.open(b) == CKR_DEVICE_ERROR &&
            proxy.log().find("no login is kept to log it in") != std::string::npos &&
            token_state(1) == CKS_RO_PUBLIC_SESSION;
        ok = warned && logged_in && refused;
      }
    } catch (...) {
    }
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

}  // namespace p11mux::test
