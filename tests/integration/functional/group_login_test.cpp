// Issue 15, a group's login over real tokens (docs/groups.md, "Keeping the
// PIN"): three SoftHSM2 tokens holding the same keys
// (support/replicated_tokens.h) behind the faulty module (P11MUX_TEST_FAULTY),
// one group of all three through p11mux (P11MUX_TEST_MODULE). A session is
// put on a member by making the members before it absent (their slots answer
// CKR_TOKEN_NOT_PRESENT, tests/backends/faulty/README.md), and kept there
// while it signs, so a signature proves that member was logged in.
#include "support/ck_error.h"
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/replicated_tokens.h"
#include "support/temp_dir.h"

#include "support/faulty_module.h"

#include <dlfcn.h>

#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

using namespace p11test;

namespace {

// Every token's user PIN for these tests: unlike anything else in a log.
constexpr std::string_view kGroupPin = "Gl0gin-pin-7Qx";

std::string softhsm_path() {
  return env_or("P11MUX_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so");
}

CK_UTF8CHAR_PTR utf8(std::string_view text) {
  return reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char*>(text.data()));
}

// SoftHSM2's slot of each token; every token's user PIN set to `pins[i]`,
// straight through SoftHSM2, before p11mux loads it.
std::vector<CK_SLOT_ID> prepare(const ReplicatedTokens& tokens,
                                const std::vector<std::string_view>& pins) {
  Module soft(softhsm_path());
  std::vector<CK_SLOT_ID> slots = replica_slots(soft.fn(), tokens);
  for (std::size_t i = 0; i < slots.size(); ++i) {
    Session s(soft.fn(), slots[i], Access::read_write);
    REQUIRE_RV(login_user(soft.fn(), s, kUserPin), CKR_OK);
    REQUIRE_RV(soft->C_SetPIN(s, utf8(kUserPin), std::string_view(kUserPin).size(), utf8(pins[i]),
                              pins[i].size()),
               CKR_OK);
  }
  return slots;
}

// p11mux over the faulty module over SoftHSM2: one group, the three tokens.
struct GroupOverFaulty {
  explicit GroupOverFaulty(std::vector<std::string_view> pins = {kGroupPin, kGroupPin, kGroupPin})
      : slots(prepare(tokens, pins)),
        dir("p11mux-group-login-"),
        conf((dir.path() / "p11mux.conf").string()),
        log_file((dir.path() / "p11mux.log").string()),
        faulty_path(required_env("P11MUX_TEST_FAULTY")),
        target("P11MUX_FAULTY_TARGET", softhsm_path()),
        faulty(faulty_control(faulty_path)),
        reset(faulty.reset() == 0),
        config("P11MUX_CONFIG", write_conf()),
        no_module("P11MUX_MODULE", ""),
        level("P11MUX_LOG_LEVEL", "trace"),
        file("P11MUX_LOG_FILE", log_file),
        module(std::make_unique<Module>(required_env("P11MUX_TEST_MODULE"))),
        p11(module->fn()) {}
  ~GroupOverFaulty() {
    module.reset();
    faulty.reset();
  }
  GroupOverFaulty(const GroupOverFaulty&) = delete;
  GroupOverFaulty& operator=(const GroupOverFaulty&) = delete;

  std::string write_conf() const {
    std::ofstream(conf) << "[backend.f]\nmodule = " << faulty_path
                        << "\n[group.replicas]\nmembers = f/label:" << tokens.label(0)
                        << ", f/label:" << tokens.label(1) << ", f/label:" << tokens.label(2)
                        << "\n";
    return conf;
  }

  // The members before `member` absent: a session opened now runs on it (or
  // a later one), and stays off them while they stay absent.
  void only_from(std::size_t member) {
    for (std::size_t i = 0; i < slots.size(); ++i)
      faulty.fail_slot(slots[i], i < member ? CKR_TOKEN_NOT_PRESENT : CKR_OK);
  }
  void all_present() { only_from(0); }

  // C_SignInit + C_Sign with the replicated EC private key, found on `s`.
  CK_RV sign(CK_SESSION_HANDLE s) {
    const std::vector<CK_OBJECT_HANDLE> keys =
        find_replica_key(p11, s, CKO_PRIVATE_KEY, kReplicaEc);
    if (keys.size() != 1) return CKR_USER_NOT_LOGGED_IN;  // private objects hidden
    CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
    Bytes hash(32, 0x5a), out(64);
    CK_ULONG length = out.size();
    if (CK_RV rv = p11.C_SignInit(s, &ecdsa, keys[0]); rv != CKR_OK) return rv;
    return p11.C_Sign(s, hash.data(), hash.size(), out.data(), &length);
  }
  CK_STATE state(CK_SESSION_HANDLE s) {
    CK_SESSION_INFO info{};
    REQUIRE_RV(p11.C_GetSessionInfo(s, &info), CKR_OK);
    return info.state;
  }
  std::string log() const {
    std::ifstream in(log_file);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  ReplicatedTokens tokens;  // first: SOFTHSM2_CONF before SoftHSM2 initializes
  std::vector<CK_SLOT_ID> slots;
  TempDir dir;
  std::string conf, log_file, faulty_path;
  ScopedEnv target;
  const FaultyControl& faulty;
  bool reset;
  ScopedEnv config, no_module, level, file;
  std::unique_ptr<Module> module;
  const CK_FUNCTION_LIST& p11;
};

}  // namespace

TEST_CASE("group login over SoftHSM2: one C_Login, a private key signs on every member") {
  GroupOverFaulty g;
  REQUIRE(g.reset);
  Session first(g.p11, 0, Access::read_only);  // on member 1
  REQUIRE_RV(login_user(g.p11, first, kGroupPin), CKR_OK);
  CHECK_RV(g.sign(first), CKR_OK);
  std::vector<std::unique_ptr<Session>> others;
  for (std::size_t member = 1; member < 3; ++member) {
    g.only_from(member);
    others.push_back(std::make_unique<Session>(g.p11, 0, Access::read_only));
    CHECK(g.state(*others.back()) == CKS_RO_USER_FUNCTIONS);
    CHECK_RV(g.sign(*others.back()), CKR_OK);
  }
  // C_Logout on the last member's session, the others absent at the time:
  // they are logged out when back, at the group's next call.
  CHECK_RV(g.p11.C_Logout(*others.back()), CKR_OK);
  g.all_present();
  { Session next(g.p11, 0, Access::read_only); }
  CHECK(g.state(first) == CKS_RO_PUBLIC_SESSION);
  CHECK(g.log().find("did not take the logout") != std::string::npos);
  for (std::size_t member = 0; member < 3; ++member) {
    g.only_from(member);
    Session s(g.p11, 0, Access::read_only);
    CHECK(g.state(s) == CKS_RO_PUBLIC_SESSION);
    CHECK_RV(g.sign(s), CKR_USER_NOT_LOGGED_IN);
  }
  g.all_present();
  // The PIN, traced call by call, is in no line of the log.
  const std::string log = g.log();
  CHECK(log.find("C_Login") != std::string::npos);
  CHECK(log.find(kGroupPin) == std::string::npos);
}

TEST_CASE("group login over SoftHSM2: a wrong PIN on one member leaves no member logged in") {
  GroupOverFaulty g({kGroupPin, "another-pin-2", kGroupPin});
  REQUIRE(g.reset);
  Session first(g.p11, 0, Access::read_only);
  CHECK_RV(login_user(g.p11, first, kGroupPin), CKR_PIN_INCORRECT);
  CHECK(g.state(first) == CKS_RO_PUBLIC_SESSION);
  for (std::size_t member = 0; member < 3; ++member) {
    g.only_from(member);
    Session s(g.p11, 0, Access::read_only);
    CHECK(g.state(s) == CKS_RO_PUBLIC_SESSION);
    CHECK_RV(g.sign(s), CKR_USER_NOT_LOGGED_IN);
  }
  g.all_present();
  CHECK(g.log().find("failed on member 2 (f/label:" + g.tokens.label(1) + "): CKR_PIN_INCORRECT") !=
        std::string::npos);
}

TEST_CASE("group login over SoftHSM2: a member absent at C_Login is logged in when it is back") {
  GroupOverFaulty g;
  REQUIRE(g.reset);
  g.faulty.fail_slot(g.slots[1], CKR_TOKEN_NOT_PRESENT);  // member 2 away at the login
  Session first(g.p11, 0, Access::read_only);
  REQUIRE_RV(login_user(g.p11, first, kGroupPin), CKR_OK);
  // Back, and the only member present: a new session there signs.
  g.only_from(1);
  g.faulty.fail_slot(g.slots[2], CKR_TOKEN_NOT_PRESENT);
  Session late(g.p11, 0, Access::read_only);
  CHECK(g.state(late) == CKS_RO_USER_FUNCTIONS);
  CHECK_RV(g.sign(late), CKR_OK);
  g.all_present();
  const std::string log = g.log();
  CHECK(log.find("member 2 (f/label:" + g.tokens.label(1) + ") logged in from the kept login") !=
        std::string::npos);
  CHECK(log.find(kGroupPin) == std::string::npos);
}
