// Issue 15, the groups' slots through p11mux over real modules: three
// SoftHSM2 tokens holding the same keys (support/replicated_tokens.h), one
// module serving them all, and the mock beside it as a second module with
// other mechanisms. p11mux is P11MUX_TEST_MODULE; the mock P11MUX_TEST_MOCK.
#include "support/ck_error.h"
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/replicated_tokens.h"
#include "support/temp_dir.h"

#include "support/faulty_module.h"

#include <algorithm>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

using namespace p11test;

namespace {

std::string text(const CK_UTF8CHAR* field, std::size_t size) {
  std::string s(reinterpret_cast<const char*>(field), size);
  return s.substr(0, s.find_last_not_of(' ') + 1);
}

std::vector<CK_MECHANISM_TYPE> mechanisms(const CK_FUNCTION_LIST& p11, CK_SLOT_ID slot) {
  CK_ULONG n = 0;
  CHECK_RV(p11.C_GetMechanismList(slot, nullptr, &n), CKR_OK);
  std::vector<CK_MECHANISM_TYPE> list(n);
  CHECK_RV(p11.C_GetMechanismList(slot, list.data(), &n), CKR_OK);
  list.resize(n);
  return list;
}

std::optional<CK_MECHANISM_INFO> info(const CK_FUNCTION_LIST& p11, CK_SLOT_ID slot,
                                      CK_MECHANISM_TYPE type) {
  CK_MECHANISM_INFO i{};
  if (p11.C_GetMechanismInfo(slot, type, &i) != CKR_OK) return std::nullopt;
  return i;
}

}  // namespace

TEST_CASE("groups over SoftHSM2 and the mock: slots, synthesized token, mechanisms in common") {
  ReplicatedTokens tokens;  // before p11mux: SoftHSM2 reads SOFTHSM2_CONF at C_Initialize
  TempDir dir("p11mux-group-slot-");
  const std::string conf = (dir.path() / "p11mux.conf").string();
  std::ofstream(conf) << "[backend.soft]\nmodule = "
                      << env_or("P11MUX_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
                      << "\n[backend.mock]\nmodule = " << required_env("P11MUX_TEST_MOCK")
                      << "\n[group.replicas]\nmembers = soft/label:" << tokens.label(0)
                      << ", soft/label:" << tokens.label(1) << ", soft/serial:" << tokens.serial(2)
                      << "\nhide_members = false\n"
                      << "[group.mixed]\nmembers = soft/label:" << tokens.label(0)
                      << ", mock/label:mock-token-0\nhide_members = false\n";
  ScopedEnv config("P11MUX_CONFIG", conf);
  ScopedEnv no_module("P11MUX_MODULE", "");
  Module module(required_env("P11MUX_TEST_MODULE"));
  const CK_FUNCTION_LIST& p11 = module.fn();

  // The groups, then the members shown: the three SoftHSM2 tokens, the mock's.
  CK_ULONG n = 0;
  CHECK_RV(p11.C_GetSlotList(CK_TRUE, nullptr, &n), CKR_OK);
  std::vector<CK_SLOT_ID> slots(n);
  CHECK_RV(p11.C_GetSlotList(CK_TRUE, slots.data(), &n), CKR_OK);
  CHECK(slots == std::vector<CK_SLOT_ID>{0, 1, 2, 3, 4, 5});
  CK_TOKEN_INFO token{};
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK_RV(p11.C_GetTokenInfo(2 + i, &token), CKR_OK);
    CHECK(text(token.label, sizeof token.label) == tokens.label(i));
  }
  CHECK_RV(p11.C_GetTokenInfo(5, &token), CKR_OK);
  CHECK(text(token.label, sizeof token.label) == "mock-token-0");

  CK_TOKEN_INFO member{};
  CHECK_RV(p11.C_GetTokenInfo(2, &member), CKR_OK);
  CHECK_RV(p11.C_GetTokenInfo(0, &token), CKR_OK);
  CHECK(text(token.label, sizeof token.label) == "replicas");
  CHECK(text(token.model, sizeof token.model) == "group");
  CHECK(text(token.serialNumber, sizeof token.serialNumber) !=
        text(member.serialNumber, sizeof member.serialNumber));
  // Alike members: the group can do what each can.
  CHECK((token.flags & CKF_TOKEN_INITIALIZED) != 0);
  CHECK((token.flags & CKF_RNG) == (member.flags & CKF_RNG));
  CHECK(token.ulMinPinLen == member.ulMinPinLen);
  CHECK(token.ulMaxPinLen == member.ulMaxPinLen);

  // Three SoftHSM2 tokens: SoftHSM2's mechanisms.
  const std::vector<CK_MECHANISM_TYPE> soft = mechanisms(p11, 2);
  const std::vector<CK_MECHANISM_TYPE> mock = mechanisms(p11, 5);
  CHECK(mechanisms(p11, 0) == soft);
  // SoftHSM2 with the mock: those both have, in the first member's order,
  // each with the flags and key sizes both take.
  std::vector<CK_MECHANISM_TYPE> common;
  for (CK_MECHANISM_TYPE m : soft)
    if (std::find(mock.begin(), mock.end(), m) != mock.end()) common.push_back(m);
  REQUIRE(!common.empty());
  REQUIRE(common.size() < soft.size());
  CHECK(mechanisms(p11, 1) == common);
  for (CK_MECHANISM_TYPE m : common) {
    const CK_MECHANISM_INFO a = *info(p11, 2, m), b = *info(p11, 5, m);
    const std::optional<CK_MECHANISM_INFO> group = info(p11, 1, m);
    REQUIRE(group.has_value());
    CHECK(group->flags == (a.flags & b.flags));
    if (a.ulMaxKeySize != 0 && b.ulMaxKeySize != 0) {
      CHECK(group->ulMinKeySize == std::max(a.ulMinKeySize, b.ulMinKeySize));
      CHECK(group->ulMaxKeySize == std::min(a.ulMaxKeySize, b.ulMaxKeySize));
    }
  }
  const CK_MECHANISM_TYPE soft_only = *std::find_if(soft.begin(), soft.end(), [&](auto m) {
    return std::find(mock.begin(), mock.end(), m) == mock.end();
  });
  CHECK(!info(p11, 1, soft_only).has_value());
  CHECK(info(p11, 0, soft_only).has_value());
}

TEST_CASE("groups over SoftHSM2: a session on the group logs in, signs and verifies on a member") {
  ReplicatedTokens tokens(2);  // before p11mux: SoftHSM2 reads SOFTHSM2_CONF at C_Initialize
  TempDir dir("p11mux-group-session-");
  const std::string conf = (dir.path() / "p11mux.conf").string();
  std::ofstream(conf) << "[backend.soft]\nmodule = "
                      << env_or("P11MUX_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
                      << "\n[group.replicas]\nmembers = soft/label:" << tokens.label(0)
                      << ", soft/label:" << tokens.label(1) << "\n";
  ScopedEnv config("P11MUX_CONFIG", conf);
  ScopedEnv no_module("P11MUX_MODULE", "");
  Module module(required_env("P11MUX_TEST_MODULE"));
  const CK_FUNCTION_LIST& p11 = module.fn();

  Session s(p11, 0, Access::read_only);
  CK_SESSION_INFO info{};
  CHECK_RV(p11.C_GetSessionInfo(s, &info), CKR_OK);
  CHECK(info.slotID == 0);
  CHECK_RV(login_user(p11, s, kUserPin), CKR_OK);
  const CK_OBJECT_HANDLE priv = require_replica_key(p11, s, CKO_PRIVATE_KEY, kReplicaEc);
  const CK_OBJECT_HANDLE pub = require_replica_key(p11, s, CKO_PUBLIC_KEY, kReplicaEc);
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CK_BYTE digest[32] = {1, 2, 3};
  CK_BYTE sig[64];
  CK_ULONG sig_len = sizeof sig;
  CHECK_RV(p11.C_SignInit(s, &ecdsa, priv), CKR_OK);
  CHECK_RV(p11.C_Sign(s, digest, sizeof digest, sig, &sig_len), CKR_OK);
  // A second session of the group is on the same member: the handles agree.
  Session t(p11, 0, Access::read_only);
  CHECK_RV(p11.C_VerifyInit(t, &ecdsa, pub), CKR_OK);
  CHECK_RV(p11.C_Verify(t, digest, sizeof digest, sig, sig_len), CKR_OK);
}

namespace {

// p11mux over the faulty module over SoftHSM2's replicated tokens, one
// group of them all: the faulty module's slot faults fail a member.
struct GroupOverFaulty {
  explicit GroupOverFaulty(std::size_t members, const std::string& group_keys = "")
      : tokens(members),  // before p11mux: SoftHSM2 reads SOFTHSM2_CONF at C_Initialize
        dir("p11mux-group-faulty-"),
        faulty_path(required_env("P11MUX_TEST_FAULTY")),
        config("P11MUX_CONFIG", write_conf(group_keys)),
        no_module("P11MUX_MODULE", ""),
        target("P11MUX_FAULTY_TARGET",
               env_or("P11MUX_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so")),
        faulty(faulty_control(faulty_path)),
        reset(faulty.reset() == 0),
        module(required_env("P11MUX_TEST_MODULE")),
        p11(module.fn()),
        slots(replica_slots(loaded_functions(faulty_path), tokens)) {}
  ~GroupOverFaulty() { faulty.reset(); }
  GroupOverFaulty(const GroupOverFaulty&) = delete;
  GroupOverFaulty& operator=(const GroupOverFaulty&) = delete;

  std::string write_conf(const std::string& group_keys) const {
    const std::string conf = (dir.path() / "p11mux.conf").string();
    std::ofstream out(conf);
    out << "[backend.soft]\nmodule = " << faulty_path << "\n[group.replicas]\nmembers = ";
    for (std::size_t i = 0; i < tokens.size(); ++i)
      out << (i == 0 ? "" : ", ") << "soft/label:" << tokens.label(i);
    out << "\n" << group_keys;
    return conf;
  }

  ReplicatedTokens tokens;
  TempDir dir;
  std::string faulty_path;
  ScopedEnv config, no_module, target;
  const FaultyControl& faulty;
  bool reset;
  Module module;
  const CK_FUNCTION_LIST& p11;
  std::vector<CK_SLOT_ID> slots;  // SoftHSM2's, of each member's token
};

}  // namespace

// docs/groups.md, "Objects": the application's handles are the group's; a
// session on another member resolves them to that member's copies, whose
// SoftHSM2 numbers differ. The first member's token is removed (the faulty
// module in front of SoftHSM2) to put the second session on the second member.
TEST_CASE("groups over SoftHSM2: a key found on one member signs in a session on another") {
  GroupOverFaulty g(2);
  REQUIRE(g.reset);
  const CK_FUNCTION_LIST& p11 = g.p11;
  const FaultyControl& faulty = g.faulty;
  const std::vector<CK_SLOT_ID>& slots = g.slots;
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CK_BYTE digest[32] = {4, 5, 6};
  CK_BYTE sig[64];
  CK_ULONG sig_len = sizeof sig;
  CK_OBJECT_HANDLE priv = CK_INVALID_HANDLE, pub = CK_INVALID_HANDLE;
  {
    Session first(p11, 0, Access::read_only);  // on the first member
    CHECK_RV(login_user(p11, first, kUserPin), CKR_OK);
    priv = require_replica_key(p11, first, CKO_PRIVATE_KEY, kReplicaEc);
    pub = require_replica_key(p11, first, CKO_PUBLIC_KEY, kReplicaEc);
    CHECK_RV(p11.C_SignInit(first, &ecdsa, priv), CKR_OK);
    CHECK_RV(p11.C_Sign(first, digest, sizeof digest, sig, &sig_len), CKR_OK);
  }
  // The members' own numbers for the key differ (SoftHSM2 numbers objects
  // across its slots): the group's handle names the key on either.
  faulty.set_slot_removed(slots[0], 1);
  {
    Session second(p11, 0, Access::read_only);  // on the second member
    CHECK_RV(login_user(p11, second, kUserPin), CKR_OK);
    CHECK_RV(p11.C_VerifyInit(second, &ecdsa, pub), CKR_OK);
    CHECK_RV(p11.C_Verify(second, digest, sizeof digest, sig, sig_len), CKR_OK);
    CHECK_RV(p11.C_SignInit(second, &ecdsa, priv), CKR_OK);
    sig_len = sizeof sig;
    CHECK_RV(p11.C_Sign(second, digest, sizeof digest, sig, &sig_len), CKR_OK);
    // Found there, the same handles.
    CHECK(require_replica_key(p11, second, CKO_PRIVATE_KEY, kReplicaEc) == priv);
    // A session object made there, destroyed: its handle names nothing after.
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE data[] = {{CKA_CLASS, &cls, sizeof cls}};
    CK_OBJECT_HANDLE made = CK_INVALID_HANDLE;
    CHECK_RV(p11.C_CreateObject(second, data, 1, &made), CKR_OK);
    CHECK_RV(p11.C_DestroyObject(second, made), CKR_OK);
    CK_ULONG size = 0;
    CHECK_RV(p11.C_GetObjectSize(second, made, &size), CKR_OBJECT_HANDLE_INVALID);
  }
  faulty.reset();
}

// docs/groups.md, "Replay" and "Members up and down", over real members: the
// first member's token is removed between a C_SignInit and its C_Sign, and
// under a digest that took data. The signature is made on another member
// without an error and verifies on a third; the digest is told lost once,
// and the session goes on. Both session modes (multiplex: the session's
// lane moves).
TEST_CASE("groups over SoftHSM2: a member removed mid-operation; the signature replayed") {
  for (const char* mode : {"serialize", "multiplex"}) {
    CAPTURE(mode);
    ScopedEnv session_mode("P11MUX_SESSION_MODE", mode);  // before p11mux loads
    GroupOverFaulty g(3, "balance = primary\n");          // sessions on the first member up
    REQUIRE(g.reset);
    const CK_FUNCTION_LIST& p11 = g.p11;
    Session s(p11, 0, Access::read_only), t(p11, 0, Access::read_only);
    REQUIRE_RV(login_user(p11, s, kUserPin), CKR_OK);
    const CK_OBJECT_HANDLE priv = require_replica_key(p11, s, CKO_PRIVATE_KEY, kReplicaEc);
    const CK_OBJECT_HANDLE pub = require_replica_key(p11, s, CKO_PUBLIC_KEY, kReplicaEc);
    CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0}, sha{CKM_SHA256, nullptr, 0};
    CK_BYTE hash[32] = {7, 8, 9};
    CK_BYTE sig[64];
    CK_ULONG sig_len = sizeof sig;
    CK_BYTE out[32];
    CK_ULONG out_len = sizeof out;
    REQUIRE_RV(p11.C_SignInit(s, &ecdsa, priv), CKR_OK);
    REQUIRE_RV(p11.C_DigestInit(t, &sha), CKR_OK);
    REQUIRE_RV(p11.C_DigestUpdate(t, hash, sizeof hash), CKR_OK);

    g.faulty.set_slot_removed(g.slots[0], 1);
    FaultySlotStats dropped{};
    g.faulty.slot_stats(g.slots[0], &dropped);
    CHECK(dropped.sessions_dropped >= 2);  // s's and t's were there
    CHECK_RV(p11.C_Sign(s, hash, sizeof hash, sig, &sig_len), CKR_OK);
    CHECK_RV(p11.C_DigestFinal(t, out, &out_len), CKR_DEVICE_ERROR);  // its data is lost
    CHECK_RV(p11.C_DigestFinal(t, out, &out_len), CKR_OPERATION_NOT_INITIALIZED);
    REQUIRE_RV(p11.C_DigestInit(t, &sha), CKR_OK);
    CHECK_RV(p11.C_Digest(t, hash, sizeof hash, out, &out_len), CKR_OK);

    // Verified on the third member: the second is taken out of the way.
    g.faulty.set_slot_removed(g.slots[1], 1);
    Session v(p11, 0, Access::read_only);
    CHECK_RV(p11.C_VerifyInit(v, &ecdsa, pub), CKR_OK);
    CHECK_RV(p11.C_Verify(v, hash, sizeof hash, sig, sig_len), CKR_OK);
  }
}
