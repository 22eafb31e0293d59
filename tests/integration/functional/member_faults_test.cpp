// The two fixtures of issue 15 together, without the group feature: the faulty
// module (P11MUX_TEST_FAULTY) over SoftHSM2 holding the replicated tokens
// (support/replicated_tokens.h). One member is killed and revived through the
// slot faults (tests/backends/faulty/README.md) while the others keep signing,
// as the group tests will do behind p11mux.
#include "support/ck_error.h"
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/replicated_tokens.h"

#include "support/faulty_module.h"

#include <dlfcn.h>

#include <atomic>
#include <memory>
#include <thread>

using namespace p11test;

namespace {

const Bytes kMessage = to_bytes("members come and go");

// The replicated tokens seen through the faulty module, a logged-in session on each.
struct FaultyMembers {
  FaultyMembers()
      : path(required_env("P11MUX_TEST_FAULTY")),
        target("P11MUX_FAULTY_TARGET",
               env_or("P11MUX_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so")),
        faulty(faulty_control(path)),
        reset(faulty.reset() == 0),
        module(path),
        p11(module.fn()),
        slots(replica_slots(p11, tokens)) {
    for (CK_SLOT_ID slot : slots) {
      sessions.push_back(std::make_unique<Session>(p11, slot, Access::read_write));
    }
    for (std::size_t i = 0; i < slots.size(); ++i) login(i);
  }
  ~FaultyMembers() {
    // Sessions and module first (members in reverse order), then no fault left behind.
    sessions.clear();
    module.finalize();
    faulty.reset();
  }
  FaultyMembers(const FaultyMembers&) = delete;
  FaultyMembers& operator=(const FaultyMembers&) = delete;

  void login(std::size_t i) {
    const CK_RV rv = login_user(p11, *sessions.at(i), kUserPin);
    REQUIRE((rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN));
  }
  // C_SignInit + C_Sign with member i's EC key; the answer of whichever fails first.
  CK_RV sign_on(std::size_t i, Bytes* signature = nullptr) {
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    try {
      key = require_replica_key(p11, *sessions.at(i), CKO_PRIVATE_KEY, kReplicaEc);
    } catch (const CkError& e) {
      return e.rv();
    }
    CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
    Bytes hash(32, 0x5a);
    if (CK_RV rv = p11.C_SignInit(*sessions.at(i), &ecdsa, key); rv != CKR_OK) return rv;
    Bytes out(64);
    CK_ULONG length = out.size();
    CK_RV rv = p11.C_Sign(*sessions.at(i), hash.data(), hash.size(), out.data(), &length);
    if (signature != nullptr) *signature = Bytes(out.begin(), out.begin() + length);
    return rv;
  }
  CK_RV verify_on(std::size_t i, const Bytes& signature) {
    const CK_OBJECT_HANDLE key =
        require_replica_key(p11, *sessions.at(i), CKO_PUBLIC_KEY, kReplicaEc);
    return verify(p11, *sessions.at(i), CKM_ECDSA, key, Bytes(32, 0x5a), signature);
  }

  ReplicatedTokens tokens;  // first: SOFTHSM2_CONF before the target initializes
  std::string path;
  ScopedEnv target;
  const FaultyControl& faulty;
  bool reset;
  Module module;
  const CK_FUNCTION_LIST& p11;
  std::vector<CK_SLOT_ID> slots;
  std::vector<std::unique_ptr<Session>> sessions;
};

}  // namespace

TEST_CASE_FIXTURE(FaultyMembers, "a member removed and back; the others sign throughout") {
  REQUIRE(reset);
  for (std::size_t i = 0; i < slots.size(); ++i) CHECK_RV(sign_on(i), CKR_OK);

  faulty.set_slot_removed(slots[1], 1);
  CHECK_RV(sign_on(1), CKR_DEVICE_REMOVED);
  Bytes signature;
  CHECK_RV(sign_on(0, &signature), CKR_OK);
  CHECK_RV(verify_on(2, signature), CKR_OK);
  FaultySlotStats stats{};
  faulty.slot_stats(slots[1], &stats);
  CHECK(stats.sessions_dropped == 1);

  faulty.set_slot_removed(slots[1], 0);
  CHECK_RV(sessions[1]->close(), CKR_SESSION_HANDLE_INVALID);  // it went with the token
  sessions[1] = std::make_unique<Session>(p11, slots[1], Access::read_write);
  login(1);  // the target's login went with its last session
  CHECK_RV(sign_on(1, &signature), CKR_OK);
  CHECK_RV(verify_on(0, signature), CKR_OK);
}

TEST_CASE_FIXTURE(FaultyMembers, "a member failing with a code, then revived with its sessions") {
  REQUIRE(reset);
  faulty.fail_slot(slots[2], CKR_DEVICE_ERROR);
  CHECK_RV(sign_on(2), CKR_DEVICE_ERROR);
  CHECK_RV(sign_on(0), CKR_OK);
  CHECK_RV(sign_on(1), CKR_OK);
  faulty.clear_slot(slots[2]);
  CHECK_RV(sign_on(2), CKR_OK);
}

TEST_CASE_FIXTURE(FaultyMembers, "a hung member does not hold up the others") {
  REQUIRE(reset);
  faulty.hang_slot(slots[0], FAULTY_HANG_UNTIL_RELEASED);
  std::atomic<bool> returned{false};
  CK_RV rv = CKR_GENERAL_ERROR;
  std::thread hung([&] {
    rv = sign_on(0);
    returned = true;
  });
  for (FaultySlotStats s{}; s.hung_now == 0; faulty.slot_stats(slots[0], &s)) {
    std::this_thread::yield();
  }
  CHECK_RV(sign_on(1), CKR_OK);
  CHECK_RV(sign_on(2), CKR_OK);
  CHECK_FALSE(returned.load());
  CHECK(faulty.release_slot(slots[0]) == 1);
  hung.join();
  CHECK_RV(rv, CKR_OK);
}
