// A group's virtual object handles (proxy/group/object_map.hpp, issue 15)
// over three SoftHSM2 tokens holding the same keys (support/replicated_tokens.h):
// a key found on one member resolves, by object_key, to the same key on the
// others, which signs so that the first member's public key verifies.
//
// Loads SoftHSM2 directly (P11MUX_TEST_MODULE): the map is p11mux's part, the
// members are the module's tokens, each reached through one session.
#include "group/object_map.hpp"

#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/objects.h"
#include "support/replicated_tokens.h"

#include <string>
#include <vector>

using namespace p11test;
using p11mux::MemberIndex;
using p11mux::ObjectMap;

namespace {

const Bytes kMessage = to_bytes("one key, three members");

// Member i is the fixture's session i: what the runtime will do with a
// session of its own on each member.
class FixtureMembers final : public p11mux::MemberObjects {
 public:
  explicit FixtureMembers(ReplicatedFixture& f) : f_(f) {}

  CK_RV get_attribute_value(MemberIndex member, CK_OBJECT_HANDLE object, CK_ATTRIBUTE* templ,
                            CK_ULONG count) override {
    return f_.p11.C_GetAttributeValue(f_.sessions.at(member), object, templ, count);
  }
  CK_RV find_objects(MemberIndex member, const CK_ATTRIBUTE* templ, CK_ULONG count,
                     std::size_t limit, std::vector<CK_OBJECT_HANDLE>& found) override {
    ++finds;
    const CK_SESSION_HANDLE session = f_.sessions.at(member);
    CK_RV rv = f_.p11.C_FindObjectsInit(session, const_cast<CK_ATTRIBUTE*>(templ), count);
    if (rv != CKR_OK) return rv;
    CK_OBJECT_HANDLE batch[16];
    while (found.size() < limit) {
      CK_ULONG got = 0;
      rv = f_.p11.C_FindObjects(session, batch, 16, &got);
      if (rv != CKR_OK || got == 0) break;
      for (CK_ULONG i = 0; i < got && found.size() < limit; ++i) found.push_back(batch[i]);
    }
    const CK_RV final_rv = f_.p11.C_FindObjectsFinal(session);
    return rv != CKR_OK ? rv : final_rv;
  }

  int finds = 0;

 private:
  ReplicatedFixture& f_;
};

struct GroupObjects : ReplicatedFixture {
  FixtureMembers members{*this};
  p11mux::LockSource locks;
  ObjectMap map{kDefaultReplicas, p11mux::ObjectKey::id_or_label, locks};

  // The virtual handle of key's object of class cls as member `m` finds it.
  CK_OBJECT_HANDLE issue(MemberIndex m, CK_OBJECT_CLASS cls, const ReplicaKey& key) {
    const ObjectMap::Issued issued =
        map.issue_found(members, m, require_replica_key(p11, sessions.at(m), cls, key));
    REQUIRE_RV(issued.rv, CKR_OK);
    REQUIRE(issued.handle != CK_INVALID_HANDLE);
    return issued.handle;
  }
  CK_OBJECT_HANDLE on(MemberIndex m, CK_OBJECT_HANDLE handle) {
    const ObjectMap::Resolved r = map.resolve(members, handle, m);
    REQUIRE(r.status == ObjectMap::Status::found);
    return r.object;
  }
};

TEST_CASE_FIXTURE(GroupObjects,
                  "keys found on member 1 resolve on members 2 and 3 to the same keys") {
  for (const ReplicaKey* key : {&kReplicaEc, &kReplicaRsa}) {
    CAPTURE(key->label);
    const CK_OBJECT_HANDLE priv = issue(0, CKO_PRIVATE_KEY, *key);
    const CK_OBJECT_HANDLE pub = issue(0, CKO_PUBLIC_KEY, *key);
    CHECK(priv != pub);
    const CK_ATTRIBUTE_TYPE public_value = key->type == CKK_EC ? CKA_EC_POINT : CKA_MODULUS;
    const Bytes expected = key->type == CKK_EC ? replica_ec_point() : replica_rsa_modulus();
    for (MemberIndex m = 0; m < kDefaultReplicas; ++m) {
      CAPTURE(m);
      const CK_OBJECT_HANDLE member_priv = on(m, priv);
      const CK_OBJECT_HANDLE member_pub = on(m, pub);
      // The member's own handles: what its own search gives.
      CHECK(member_priv == require_replica_key(p11, sessions[m], CKO_PRIVATE_KEY, *key));
      CHECK(member_pub == require_replica_key(p11, sessions[m], CKO_PUBLIC_KEY, *key));
      CHECK(attribute_bytes(p11, sessions[m], member_priv, CKA_ID) == replica_id(*key));
      CHECK(attribute_bytes(p11, sessions[m], member_pub, CKA_ID) == replica_id(*key));
      CHECK(attribute_ulong(p11, sessions[m], member_priv, CKA_CLASS) == CKO_PRIVATE_KEY);
      CHECK(attribute_bytes(p11, sessions[m], member_pub, public_value) == expected);
      CHECK(attribute_bytes(p11, sessions[m], member_pub, public_value) ==
            attribute_bytes(p11, sessions[0], on(0, pub), public_value));
      // Found again on that member: the same virtual handle.
      CHECK(issue(m, CKO_PRIVATE_KEY, *key) == priv);
      CHECK(issue(m, CKO_PUBLIC_KEY, *key) == pub);
    }
  }
  CHECK(map.size() == 4);
  // Resolved once per member and object, then cached.
  const int finds = members.finds;
  on(2, issue(0, CKO_PRIVATE_KEY, kReplicaEc));
  CHECK(members.finds == finds);
}

TEST_CASE_FIXTURE(GroupObjects,
                  "a signature made with member 3's handle verifies with member 1's public key") {
  const CK_OBJECT_HANDLE ec_priv = issue(0, CKO_PRIVATE_KEY, kReplicaEc);
  const CK_OBJECT_HANDLE ec_pub = issue(0, CKO_PUBLIC_KEY, kReplicaEc);
  const Bytes ec_signature = ecdsa_sha256_sign(p11, sessions[2], on(2, ec_priv), kMessage);
  CHECK_RV(ecdsa_sha256_verify(p11, sessions[0], on(0, ec_pub), kMessage, ec_signature), CKR_OK);
  CHECK_RV(ecdsa_sha256_verify(p11, sessions[0], on(0, ec_pub), to_bytes("another"), ec_signature),
           CKR_SIGNATURE_INVALID);

  const CK_OBJECT_HANDLE rsa_priv = issue(0, CKO_PRIVATE_KEY, kReplicaRsa);
  const CK_OBJECT_HANDLE rsa_pub = issue(0, CKO_PUBLIC_KEY, kReplicaRsa);
  const Bytes rsa_signature =
      sign(p11, sessions[2], CKM_SHA256_RSA_PKCS, on(2, rsa_priv), kMessage);
  CHECK_RV(verify(p11, sessions[0], CKM_SHA256_RSA_PKCS, on(0, rsa_pub), kMessage, rsa_signature),
           CKR_OK);
}

TEST_CASE_FIXTURE(GroupObjects, "an object on one member only is missing on the others") {
  const CK_OBJECT_HANDLE only =
      create_data_object(p11, sessions[1], "member-2-only", "x", Lifetime::token);
  const ObjectMap::Issued issued = map.issue_found(members, 1, only);
  REQUIRE_RV(issued.rv, CKR_OK);
  CHECK(on(1, issued.handle) == only);
  CHECK(map.resolve(members, issued.handle, 0).status == ObjectMap::Status::missing);
  CHECK(map.resolve(members, issued.handle, 2).status == ObjectMap::Status::missing);
}

TEST_CASE_FIXTURE(GroupObjects, "a data object without CKA_ID is matched by its label") {
  std::vector<CK_OBJECT_HANDLE> made;
  for (MemberIndex m = 0; m < kDefaultReplicas; ++m) {
    made.push_back(
        create_data_object(p11, sessions[m], "replicated-config", "v1", Lifetime::token));
  }
  const CK_OBJECT_HANDLE v = map.issue_found(members, 0, made[0]).handle;
  for (MemberIndex m = 0; m < kDefaultReplicas; ++m) {
    CAPTURE(m);
    CHECK(on(m, v) == made[m]);
  }
  // A second one of that label on member 3: refused there, never guessed.
  create_data_object(p11, sessions[2], "replicated-config", "v2", Lifetime::token);
  map.member_restarted(2);
  const ObjectMap::Resolved r = map.resolve(members, v, 2);
  CHECK(r.status == ObjectMap::Status::ambiguous);
  CHECK(r.matches == 2);
}

TEST_CASE_FIXTURE(GroupObjects, "a session object stays on the member that made it") {
  const CK_OBJECT_HANDLE aes = generate_aes(p11, sessions[0], 32, "session-aes");
  const CK_OBJECT_HANDLE v = map.issue_session_object(0, sessions[0], aes).handle;
  CHECK(on(0, v) == aes);
  CHECK(map.resolve(members, v, 1).status == ObjectMap::Status::elsewhere);
  // A search that returns it (CKA_TOKEN false) gives the same handle.
  CHECK(map.issue_found(members, 0, aes).handle == v);
  map.forget_session(0, sessions[0]);
  CHECK(map.resolve(members, v, 0).status == ObjectMap::Status::unknown);
}

}  // namespace
