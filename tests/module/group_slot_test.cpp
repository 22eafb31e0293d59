// Issue 15, first runtime slice (docs/groups.md): a configuration of named
// backends and groups is served; each group is one slot whose slot, token and
// mechanism answers are synthesized from its members; sessions on it are
// refused for now. Over the mock, whose slots hold "mock-token-N", serial N.
#include "group_harness.hpp"

#include <array>
#include <chrono>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace p11mux::test {
namespace {

std::string padded_text(const CK_UTF8CHAR* field, std::size_t size) {
  std::string s(reinterpret_cast<const char*>(field), size);
  return s.substr(0, s.find_last_not_of(' ') + 1);
}

std::string mock_backend(const std::string& name = "mock") {
  return "[backend." + name + "]\nmodule = " + P11MUX_TEST_MOCK_PATH + "\n";
}

MockConfig three_tokens() {
  MockConfig mock{};
  mock.slot_count = 3;
  return mock;
}

}  // namespace

TEST_CASE("groups: one slot per group, members hidden by default, one module loaded once") {
  GroupProxy proxy(
      mock_backend() + "[group.signing]\nmembers = mock/label:mock-token-0, mock/serial:2\n",
      three_tokens());
  REQUIRE(proxy.initialize() == CKR_OK);
  // Two members of one [backend.NAME]: the module is initialized once.
  CHECK(mock_stats().initialize_calls == 1);
  CHECK(proxy.slots() == std::vector<CK_SLOT_ID>{0});
  CHECK(proxy.slots(CK_TRUE) == std::vector<CK_SLOT_ID>{0});
  // The spec's length rules: a short buffer gets the count.
  CK_SLOT_ID none[1];
  CK_ULONG n = 0;
  CHECK(proxy.p11->C_GetSlotList(CK_FALSE, none, &n) == CKR_BUFFER_TOO_SMALL);
  CHECK(n == 1);
  // The members' own slots (the mock's 0 and 2) are not p11mux's slots.
  CK_SLOT_INFO info{};
  CHECK(proxy.p11->C_GetSlotInfo(1, &info) == CKR_SLOT_ID_INVALID);
  CHECK(proxy.p11->C_GetSlotInfo(2, &info) == CKR_SLOT_ID_INVALID);
  // No session was opened on any member (no prewarm for groups yet).
  CHECK(mock_stats().sessions_opened_total == 0);
}

TEST_CASE("groups: a [backend.NAME] is initialized with its own locking and init_reserved") {
  GroupProxy proxy("[backend.mock]\nmodule = " + std::string(P11MUX_TEST_MOCK_PATH) +
                       "\nlocking = callbacks\ninit_reserved = \"configdir='sql:/tmp/x'\"\n"
                       "[group.signing]\nmembers = mock/label:mock-token-0\n",
                   three_tokens());
  REQUIRE(proxy.initialize() == CKR_OK);
  const MockStats stats = mock_stats();
  CHECK(stats.init_locking == MOCK_LOCK_CALLBACKS);  // automatic would pick OS locking
  CHECK(std::string(stats.init_reserved) == "configdir='sql:/tmp/x'");
}

TEST_CASE("groups: hide_members = false shows each member's slot after the groups'") {
  GroupProxy proxy(
      mock_backend() +
          "[group.signing]\nmembers = mock/label:mock-token-2, mock/label:mock-token-0\n"
          "hide_members = false\n"
          "[group.verify]\nmembers = mock/label:mock-token-1, mock/label:mock-token-2\n",
      three_tokens());
  REQUIRE(proxy.initialize() == CKR_OK);
  // Groups 0 and 1; then signing's members, except mock-token-2, which
  // group verify (hide_members = true by default) hides.
  CHECK(proxy.slots() == std::vector<CK_SLOT_ID>{0, 1, 2});
  CHECK(padded_text(proxy.token(0).label, 32) == "signing");
  CHECK(padded_text(proxy.token(1).label, 32) == "verify");
  // The member shown is answered by its backend.
  CHECK(padded_text(proxy.token(2).label, 32) == "mock-token-0");
  CK_SLOT_INFO info{};
  REQUIRE(proxy.p11->C_GetSlotInfo(2, &info) == CKR_OK);
  CHECK(padded_text(info.slotDescription, 64) == "mock slot 0");
  CHECK(proxy.mechanisms(2).size() == 5);
  CK_TOKEN_INFO token{};
  CHECK(proxy.p11->C_GetTokenInfo(3, &token) == CKR_SLOT_ID_INVALID);
}

TEST_CASE("groups: the slot and token info are the group's, session counts summed") {
  MockConfig mock = three_tokens();
  mock.token_max_session_count = 10;
  mock.token_max_rw_session_count = 4;
  GroupProxy proxy(
      mock_backend() +
          "[group.signing]\nmembers = mock/label:mock-token-0, mock/label:mock-token-2\n",
      mock);
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_SLOT_INFO slot{};
  REQUIRE(proxy.p11->C_GetSlotInfo(0, &slot) == CKR_OK);
  CHECK(padded_text(slot.slotDescription, 64) == "signing");
  CHECK(padded_text(slot.manufacturerID, 32) == "p11mux");
  CHECK((slot.flags & CKF_TOKEN_PRESENT) != 0);
  CHECK((slot.flags & CKF_HW_SLOT) == 0);  // the mock's slots are not hardware slots

  // Sessions opened on the members directly: the group counts them all.
  CK_FUNCTION_LIST* direct = mock_functions();
  CK_SESSION_HANDLE h[3];
  REQUIRE(direct->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h[0]) == CKR_OK);
  REQUIRE(direct->C_OpenSession(2, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h[1]) ==
          CKR_OK);
  REQUIRE(direct->C_OpenSession(2, CKF_SERIAL_SESSION, nullptr, nullptr, &h[2]) == CKR_OK);
  // A session on a token that is no member does not count.
  CK_SESSION_HANDLE other;
  REQUIRE(direct->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, &other) == CKR_OK);

  const CK_TOKEN_INFO token = proxy.token(0);
  CHECK(padded_text(token.label, 32) == "signing");
  CHECK(padded_text(token.manufacturerID, 32) == "p11mux");
  CHECK(padded_text(token.model, 16) == "group");
  CHECK(token.ulSessionCount == 3);
  CHECK(token.ulRwSessionCount == 1);
  CHECK(token.ulMaxSessionCount == 20);
  CHECK(token.ulMaxRwSessionCount == 8);
  CHECK(token.flags ==
        (CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED | CKF_TOKEN_INITIALIZED));
  CHECK(token.ulMinPinLen == 4);
  CHECK(token.ulMaxPinLen == 8);
  for (CK_SESSION_HANDLE s : {h[0], h[1], h[2], other}) CHECK(direct->C_CloseSession(s) == CKR_OK);
}

TEST_CASE("groups: the mechanisms are those every member has") {
  // The 7th C_GetMechanismInfo fails: the second member's second mechanism
  // (CKM_ECDSA), which that member then does not offer.
  MockConfig mock = three_tokens();
  std::strcpy(mock.fail_function, "C_GetMechanismInfo");
  mock.fail_rv = CKR_MECHANISM_INVALID;
  mock.fail_nth = 7;
  GroupProxy proxy(
      mock_backend() +
          "[group.signing]\nmembers = mock/label:mock-token-0, mock/label:mock-token-1\n",
      mock);
  REQUIRE(proxy.initialize() == CKR_OK);
  CHECK(proxy.mechanisms(0) == std::vector<CK_MECHANISM_TYPE>{CKM_SHA256, CKM_AES_ECB,
                                                              CKM_GENERIC_SECRET_KEY_GEN,
                                                              CKM_EC_KEY_PAIR_GEN});
  CK_MECHANISM_INFO info{};
  CHECK(proxy.p11->C_GetMechanismInfo(0, CKM_ECDSA, &info) == CKR_MECHANISM_INVALID);
  REQUIRE(proxy.p11->C_GetMechanismInfo(0, CKM_AES_ECB, &info) == CKR_OK);
  CHECK(info.flags == (CKF_ENCRYPT | CKF_DECRYPT));
  CHECK(info.ulMaxKeySize == 4096);
  CHECK(proxy.p11->C_GetMechanismInfo(9, CKM_AES_ECB, &info) == CKR_SLOT_ID_INVALID);
}

TEST_CASE("groups: a member that fails or lost its token does not count; none left, no token") {
  // The faulty module over the mock: slot faults on one member at a time.
  const FaultyControl* faulty = faulty_control();
  MockConfig mock = three_tokens();
  mock.token_max_session_count = 10;
  GroupProxy proxy("[backend.f]\nmodule = " + std::string(P11MUX_TEST_FAULTY_PATH) +
                       "\n[group.signing]\nmembers = f/label:mock-token-0, f/label:mock-token-1\n",
                   mock, {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  CHECK(proxy.token(0).ulMaxSessionCount == 20);

  faulty->set_slot_removed(1, 1);  // the second member's token removed
  CHECK(proxy.token(0).ulMaxSessionCount == 10);
  CHECK(proxy.slots(CK_TRUE) == std::vector<CK_SLOT_ID>{0});

  faulty->fail_slot(0, CKR_DEVICE_ERROR);  // and the first one failing
  CK_TOKEN_INFO token{};
  CHECK(proxy.p11->C_GetTokenInfo(0, &token) == CKR_TOKEN_NOT_PRESENT);
  CK_SLOT_INFO slot{};
  REQUIRE(proxy.p11->C_GetSlotInfo(0, &slot) == CKR_OK);
  CHECK((slot.flags & CKF_TOKEN_PRESENT) == 0);
  CHECK(proxy.slots(CK_TRUE).empty());
  CHECK(proxy.slots(CK_FALSE) == std::vector<CK_SLOT_ID>{0});

  faulty->clear_slot(0);
  faulty->clear_slot(1);
  CHECK(proxy.token(0).ulMaxSessionCount == 20);
  CHECK(proxy.slots(CK_TRUE) == std::vector<CK_SLOT_ID>{0});
}

TEST_CASE("groups: C_InitToken and slot events on a group are refused for now, with a log line") {
  GroupProxy proxy(mock_backend() + "[group.signing]\nmembers = mock/label:mock-token-0\n",
                   three_tokens(), {{"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CK_RV rv = CKR_OK;
  CHECK(proxy.p11->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
        CKR_SLOT_ID_INVALID);
  CK_UTF8CHAR pin[] = "0000";
  CK_UTF8CHAR label[32];
  std::memset(label, ' ', sizeof label);
  std::string err = capture_stderr([&] { rv = proxy.p11->C_InitToken(0, pin, 4, label); });
  CHECK(rv == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_MESSAGE(err.find("C_InitToken on slot 0 refused") != std::string::npos, err);
  CK_SLOT_ID slot = 0;
  err = capture_stderr([&] { rv = proxy.p11->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, nullptr); });
  CHECK(rv == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_MESSAGE(err.find("C_WaitForSlotEvent refused") != std::string::npos, err);
  (void)capture_stderr([&] { rv = proxy.p11->C_WaitForSlotEvent(0, &slot, nullptr); });
  CHECK(rv == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK(proxy.p11->C_CloseAllSessions(0) == CKR_OK);
  CHECK(proxy.p11->C_CloseAllSessions(1) == CKR_SLOT_ID_INVALID);
  CHECK(mock_stats().sessions_opened_total == 0);
  CHECK(libs().mock->calls("C_InitToken") == 0);
}

TEST_CASE("groups: a member whose token is not there fails C_Initialize, naming it") {
  GroupProxy proxy(
      mock_backend() + "[group.signing]\nmembers = mock/label:mock-token-0, mock/label:absent\n",
      three_tokens());
  std::string err;
  CHECK(proxy.initialize(&err) == CKR_GENERAL_ERROR);
  CHECK_MESSAGE(
      err.find("[group.signing] member mock/label:absent: no token of [backend.mock] "
               "matches (its tokens: label:'mock-token-0' serial:'0'") != std::string::npos,
      err);
  CK_ULONG n = 0;
  CHECK(proxy.p11->C_GetSlotList(CK_FALSE, nullptr, &n) == CKR_CRYPTOKI_NOT_INITIALIZED);
  // The backend loaded for it is finalized again.
  CHECK(mock_stats().initialized == 0);
}

TEST_CASE(
    "groups: a member whose label two tokens have fails C_Initialize; by serial it is found") {
  auto relabel_token_2 = [] {
    // Labels survive the mock's C_Finalize (until mock_reset).
    CK_FUNCTION_LIST* direct = mock_functions();
    REQUIRE(direct->C_Initialize(nullptr) == CKR_OK);
    CK_UTF8CHAR so_pin[] = MOCK_SO_PIN;
    CK_UTF8CHAR label[32];
    std::memset(label, ' ', sizeof label);
    std::memcpy(label, "mock-token-0", 12);
    REQUIRE(direct->C_InitToken(2, so_pin, 4, label) == CKR_OK);
    REQUIRE(direct->C_Finalize(nullptr) == CKR_OK);
  };
  {
    GroupProxy proxy(mock_backend() + "[group.signing]\nmembers = mock/label:mock-token-0\n",
                     three_tokens());
    relabel_token_2();
    std::string err;
    CHECK(proxy.initialize(&err) == CKR_GENERAL_ERROR);
    CHECK_MESSAGE(err.find("[group.signing] member mock/label:mock-token-0: 2 tokens match; "
                           "name the member by serial:") != std::string::npos,
                  err);
  }
  GroupProxy proxy(mock_backend() +
                       "[group.signing]\nmembers = mock/serial:2\n"
                       "hide_members = false\n",
                   three_tokens());
  relabel_token_2();
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_TOKEN_INFO token = proxy.token(1);
  CHECK(padded_text(token.serialNumber, 16) == "2");
}

TEST_CASE("groups: a backend that cannot be loaded fails C_Initialize, and the others are let go") {
  GroupProxy proxy(mock_backend() + "[backend.gone]\nmodule = /nonexistent/libgone.so\n" +
                       "[group.signing]\nmembers = mock/label:mock-token-0\n"
                       "[group.other]\nmembers = gone/label:x\n",
                   three_tokens());
  std::string err;
  CHECK(proxy.initialize(&err) != CKR_OK);
  CHECK_MESSAGE(err.find("/nonexistent/libgone.so") != std::string::npos, err);
  CHECK(mock_stats().initialize_ok == 1);
  CHECK(mock_stats().initialized == 0);
}

TEST_CASE(
    "groups: [pool] prewarm is not applied, with a warning; vendor_interfaces = pass refused") {
  {
    GroupProxy proxy(mock_backend() +
                         "[group.signing]\nmembers = mock/label:mock-token-0\n"
                         "[pool]\nprewarm = 2\n",
                     three_tokens(), {{"P11MUX_LOG_LEVEL", "warn"}});
    std::string err;
    REQUIRE(proxy.initialize(&err) == CKR_OK);
    // The reason given is true: sessions on groups are served, members'
    // backend sessions open as sessions need them.
    CHECK_MESSAGE(err.find("[pool] prewarm = 2 is not applied to groups yet: a member's backend "
                           "sessions open when sessions need them") != std::string::npos,
                  err);
    CHECK(mock_stats().sessions_opened_total == 0);
  }
  GroupProxy proxy(mock_backend() + "[group.signing]\nmembers = mock/label:mock-token-0\n",
                   three_tokens(), {{"P11MUX_BACKEND_VENDOR_INTERFACES", "pass"}});
  std::string err;
  CHECK(proxy.initialize(&err) == CKR_GENERAL_ERROR);
  CHECK_MESSAGE(err.find("vendor_interfaces = pass does not apply") != std::string::npos, err);
}

TEST_CASE("groups: [policy] tokens is refused beside groups (their slot IDs are p11mux's)") {
  GroupProxy proxy(mock_backend() +
                       "[group.signing]\nmembers = mock/label:mock-token-0\n"
                       "[policy]\ntokens = label:signing\n",
                   three_tokens());
  std::string err;
  CHECK(proxy.initialize(&err) == CKR_GENERAL_ERROR);
  CHECK_MESSAGE(err.find("[policy] tokens does not apply") != std::string::npos, err);
}

}  // namespace p11mux::test

namespace p11mux::test {
namespace {

// The mock's own count of sessions open on a token (p11mux's pooled ones
// included): which member p11mux's backend sessions are on.
CK_ULONG member_sessions(CK_SLOT_ID mock_slot) {
  CK_TOKEN_INFO info{};
  REQUIRE(mock_functions()->C_GetTokenInfo(mock_slot, &info) == CKR_OK);
  return info.ulSessionCount;
}

// A group whose first member is the mock's slot 2 (so that the member's own
// slot ID is not the group's, 0), the second its slot 1.
std::string two_member_group() {
  return mock_backend() + "[group.signing]\nmembers = mock/serial:2, mock/label:mock-token-1\n";
}

}  // namespace

TEST_CASE("group sessions: balance = primary keeps them on the first member; sign and verify") {
  GroupProxy proxy(two_member_group() + "balance = primary\n", three_tokens());
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE;
  REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &a) == CKR_OK);
  REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &b) == CKR_OK);
  // Both on the first member (mock slot 2), none on the second: the
  // mock's tokens set no session limit, so the primary is never full.
  CHECK(member_sessions(2) == 2);
  CHECK(member_sessions(1) == 0);
  // The application sees the group's slot; its token counts the sessions
  // on the members (here p11mux's two, both in use).
  CK_SESSION_INFO info{};
  REQUIRE(p->C_GetSessionInfo(b, &info) == CKR_OK);
  CHECK(info.slotID == 0);
  CHECK((info.flags & CKF_RW_SESSION) != 0);
  const CK_TOKEN_INFO token = proxy.token(0);
  CHECK(token.ulSessionCount == 2);
  CHECK(token.ulRwSessionCount == 1);
  // A key pair made on one session signs on it and verifies on the other.
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  REQUIRE(p->C_GenerateKeyPair(a, &gen, nullptr, 0, nullptr, 0, &pub, &priv) == CKR_OK);
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  std::string text = "over a group";
  auto* data = reinterpret_cast<CK_BYTE*>(text.data());
  std::array<CK_BYTE, MOCK_DIGEST_LEN> sig{};
  CK_ULONG sig_len = sig.size();
  REQUIRE(p->C_SignInit(a, &ecdsa, priv) == CKR_OK);
  REQUIRE(p->C_Sign(a, data, text.size(), sig.data(), &sig_len) == CKR_OK);
  REQUIRE(p->C_VerifyInit(b, &ecdsa, priv) == CKR_OK);
  CHECK(p->C_Verify(b, data, text.size(), sig.data(), sig_len) == CKR_OK);
  // C_Login reaches every member (group_login_test.cpp has the details).
  std::string pin = MOCK_USER_PIN;
  REQUIRE(p->C_Login(a, CKU_USER, reinterpret_cast<CK_UTF8CHAR_PTR>(pin.data()), pin.size()) ==
          CKR_OK);
  auto mock_state = [](CK_SLOT_ID mock_slot) {
    CK_SESSION_HANDLE d = CK_INVALID_HANDLE;
    CK_SESSION_INFO di{};
    REQUIRE(mock_functions()->C_OpenSession(mock_slot, CKF_SERIAL_SESSION, nullptr, nullptr, &d) ==
            CKR_OK);
    REQUIRE(mock_functions()->C_GetSessionInfo(d, &di) == CKR_OK);
    REQUIRE(mock_functions()->C_CloseSession(d) == CKR_OK);
    return di.state;
  };
  CHECK(mock_state(2) == CKS_RO_USER_FUNCTIONS);
  CHECK(mock_state(1) == CKS_RO_USER_FUNCTIONS);
  // C_CloseAllSessions on the group's slot closes both.
  CHECK(p->C_CloseAllSessions(0) == CKR_OK);
  CHECK(p->C_GetSessionInfo(a, &info) == CKR_SESSION_HANDLE_INVALID);
  CHECK(p->C_GetSessionInfo(b, &info) == CKR_SESSION_HANDLE_INVALID);
  CHECK(p->C_CloseAllSessions(7) == CKR_SLOT_ID_INVALID);
  // Nothing left open on the mock at C_Finalize.
  REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &a) == CKR_OK);
  REQUIRE(p->C_Finalize(nullptr) == CKR_OK);
  proxy.finalized();
  const MockStats stats = mock_stats();
  CHECK(stats.sessions_open == 0);
  CHECK(stats.sessions_closed_by_finalize == 0);
}

TEST_CASE("group sessions: least-busy spreads them over the members; each runs on its own") {
  GroupProxy proxy(two_member_group(), three_tokens());
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = proxy.p11;
  std::vector<CK_SESSION_HANDLE> open(4, CK_INVALID_HANDLE);
  for (CK_SESSION_HANDLE& h : open)
    REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  CHECK(member_sessions(2) == 2);
  CHECK(member_sessions(1) == 2);
  // Each session's calls go to its member: a session object made on one is
  // that member's alone (the mock's object count per slot says where).
  auto mock_objects = [](CK_SLOT_ID mock_slot) {
    CK_SESSION_HANDLE d = CK_INVALID_HANDLE;
    REQUIRE(mock_functions()->C_OpenSession(mock_slot, CKF_SERIAL_SESSION, nullptr, nullptr, &d) ==
            CKR_OK);
    REQUIRE(mock_functions()->C_FindObjectsInit(d, nullptr, 0) == CKR_OK);
    std::array<CK_OBJECT_HANDLE, 64> found{};
    CK_ULONG n = 0;
    REQUIRE(mock_functions()->C_FindObjects(d, found.data(), found.size(), &n) == CKR_OK);
    REQUIRE(mock_functions()->C_FindObjectsFinal(d) == CKR_OK);
    REQUIRE(mock_functions()->C_CloseSession(d) == CKR_OK);
    return n;
  };
  const CK_ULONG before1 = mock_objects(1), before2 = mock_objects(2);
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  for (CK_SESSION_HANDLE h : open)
    REQUIRE(p->C_GenerateKeyPair(h, &gen, nullptr, 0, nullptr, 0, &pub, &priv) == CKR_OK);
  CHECK(mock_objects(1) == before1 + 4);
  CHECK(mock_objects(2) == before2 + 4);
  // Two sessions of one member close (the first and third opened: ties are
  // taken in turn from member 0). Their backend sessions stay open in that
  // member's pool; the next two sessions go to that member, the least busy
  // now, and reuse them. Had the closed sessions not been let go, one would
  // go to the other member and open a third backend session there.
  REQUIRE(p->C_CloseSession(open[0]) == CKR_OK);
  REQUIRE(p->C_CloseSession(open[2]) == CKR_OK);
  REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &open[0]) == CKR_OK);
  REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &open[2]) == CKR_OK);
  CHECK(member_sessions(2) == 2);
  CHECK(member_sessions(1) == 2);
}

TEST_CASE("group sessions: round-robin, and primary moving on at its token's session limit") {
  SUBCASE("round-robin") {
    GroupProxy proxy(two_member_group() + "balance = round-robin\n", three_tokens());
    REQUIRE(proxy.initialize() == CKR_OK);
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    for (CK_ULONG expected : {1, 1, 2}) {  // members 0, 1, 0: mock slots 2, 1, 2
      REQUIRE(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
      CHECK(member_sessions(2) == expected);
    }
    CHECK(member_sessions(1) == 1);
  }
  SUBCASE("primary") {
    MockConfig mock = three_tokens();
    mock.token_max_session_count = 2;
    GroupProxy proxy(two_member_group() + "balance = primary\n", mock);
    REQUIRE(proxy.initialize() == CKR_OK);
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    for (int i = 0; i < 3; ++i)
      REQUIRE(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
    CHECK(member_sessions(2) == 2);
    CHECK(member_sessions(1) == 1);
  }
}

TEST_CASE("group sessions: a member without its token is passed over; none, no token") {
  const FaultyControl* faulty = faulty_control();
  GroupProxy proxy(std::string("[backend.faulty]\nmodule = ") + P11MUX_TEST_FAULTY_PATH +
                       "\n[group.signing]\nmembers = faulty/serial:2, faulty/label:mock-token-1\n",
                   three_tokens(), {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}});
  REQUIRE(faulty->reset() == 0);
  REQUIRE(proxy.initialize() == CKR_OK);
  faulty->set_slot_removed(2, 1);  // the first member's token removed
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  CHECK(member_sessions(1) == 1);
  CHECK(member_sessions(2) == 0);
  faulty->set_slot_removed(1, 1);
  CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
        CKR_TOKEN_NOT_PRESENT);
  faulty->clear_slot(1);
  faulty->clear_slot(2);
}

// C_OpenSession on `slot` is refused with CKR_FUNCTION_NOT_SUPPORTED and a
// log line that names `why`.
void check_open_refused(GroupProxy& proxy, CK_SLOT_ID slot, std::string_view why) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CK_RV rv = CKR_OK;
  const std::string err = capture_stderr(
      [&] { rv = proxy.p11->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h); });
  CHECK(rv == CKR_FUNCTION_NOT_SUPPORTED);
  CHECK_MESSAGE(err.find(why) != std::string::npos, err);
}

TEST_CASE("group sessions: multiplex mode opens a session that holds none on a member") {
  // Its lanes hold them, one per calling thread (group_multiplex_test.cpp).
  GroupProxy proxy(two_member_group() + "hide_members = false\n", three_tokens(),
                   {{"P11MUX_LOG_LEVEL", "warn"}, {"P11MUX_SESSION_MODE", "multiplex"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CHECK(proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
  CHECK(mock_stats().sessions_opened_total == 0);
  check_open_refused(proxy, 1, "member shown");
  CHECK(proxy.p11->C_CloseSession(h) == CKR_OK);
}

TEST_CASE("group sessions: refused with a [policy] and on a member shown, with a log line") {
  GroupProxy proxy(two_member_group() + "hide_members = false\n", three_tokens(),
                   {{"P11MUX_LOG_LEVEL", "warn"},
                    {"P11MUX_POLICY_MECHANISMS_ALLOW", "CKM_ECDSA CKM_EC_KEY_PAIR_GEN"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  check_open_refused(proxy, 0, "[policy]");
  check_open_refused(proxy, 1, "member shown");
  CHECK(mock_stats().sessions_opened_total == 0);
}

TEST_CASE("group members: a member answering a device error goes down; its sessions move") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    FaultyGroup g(FaultyGroup::Bind{bind});
    REQUIRE(g.proxy.initialize() == CKR_OK);
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE a = g.open();  // member 0: the faulty module's slot 2
    const CK_SESSION_HANDLE b = g.open();  // member 1: slot 1
    REQUIRE(g.random(a) == CKR_OK);
    REQUIRE(g.random(b) == CKR_OK);
    // A digest in progress on member 0 when it fails.
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    std::string part = "lost with its member";
    auto* data = reinterpret_cast<CK_BYTE*>(part.data());
    REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
    REQUIRE(p->C_DigestUpdate(a, data, part.size()) == CKR_OK);
    g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
    // The member's answer reaches the application once, and takes it down.
    CHECK(p->C_DigestUpdate(a, data, part.size()) == CKR_DEVICE_ERROR);
    // The session moves to member 1. The error ended its digest, as any
    // error of C_DigestUpdate does (PKCS#11 v2.40 5.10).
    std::array<CK_BYTE, 64> digest{};
    CK_ULONG len = digest.size();
    CHECK(p->C_DigestFinal(a, digest.data(), &len) == CKR_OPERATION_NOT_INITIALIZED);
    // It lives on, on member 1: a new digest, and any other call, work.
    REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
    len = digest.size();
    CHECK(p->C_Digest(a, data, part.size(), digest.data(), &len) == CKR_OK);
    CHECK(g.random(a) == CKR_OK);
    CHECK(g.random(b) == CKR_OK);
    CK_SESSION_INFO info{};
    REQUIRE(p->C_GetSessionInfo(a, &info) == CKR_OK);
    CHECK(info.slotID == 0);
    // New sessions go to member 1 only while member 0 is down.
    const CK_SESSION_HANDLE c = g.open();
    CHECK(g.random(c) == CKR_OK);
    if (std::string_view(bind) == "open") {
      CHECK(g.sessions_on(1) == 3);  // a, b and c
    }
    // Member 0 answers again: probed within about a second, up again, and
    // the next sessions go there (it holds none of the group's).
    g.faulty->clear_slot(2);
    CK_SESSION_HANDLE d = CK_INVALID_HANDLE;
    std::string err;
    bool rejoined = false;
    for (int i = 0; i < 100 && !rejoined; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const unsigned long before = g.sessions_on(2);
      d = g.open();
      REQUIRE(g.random(d) == CKR_OK);
      rejoined = g.sessions_on(2) > before;
      if (!rejoined) REQUIRE(p->C_CloseSession(d) == CKR_OK);
    }
    CHECK(rejoined);
    CHECK(g.random(d) == CKR_OK);
  }
}

TEST_CASE("group members: none up, calls answer CKR_DEVICE_ERROR at once; C_OpenSession no token") {
  FaultyGroup g("", {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                     {"P11MUX_METRICS_SUMMARY", "true"},
                     {"P11MUX_LOG_LEVEL", "info"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  const CK_SESSION_HANDLE a = g.open();
  const CK_SESSION_HANDLE b = g.open();
  g.faulty->fail_slot(1, CKR_DEVICE_REMOVED);
  g.faulty->fail_slot(2, CKR_DEVICE_REMOVED);
  CHECK(g.random(a) == CKR_DEVICE_REMOVED);  // each member's own answer, once
  CHECK(g.random(b) == CKR_DEVICE_REMOVED);
  const unsigned long calls = g.faulty->calls("C_GenerateRandom");
  CHECK(g.random(a) == CKR_DEVICE_ERROR);  // no member to move to: not sent anywhere
  CHECK(g.faulty->calls("C_GenerateRandom") == calls);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CHECK(g.proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
        CKR_TOKEN_NOT_PRESENT);
  // The summary at C_Finalize has each member's figures.
  const std::string log =
      capture_stderr([&] { CHECK(g.proxy.p11->C_Finalize(nullptr) == CKR_OK); });
  g.proxy.finalized();
  CHECK_MESSAGE(log.find("group signing member faulty/serial:2: down, 1 sessions, 1 calls") !=
                    std::string::npos,
                log);
  CHECK_MESSAGE(
      log.find("group signing member faulty/label:mock-token-1: down, 1 sessions, 1 calls") !=
          std::string::npos,
      log);
}

}  // namespace p11mux::test
