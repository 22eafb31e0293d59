// The ReplicatedTokens fixture on its own (support/replicated_tokens.h): the
// tokens an HSM group's tests (issue 15) run on hold the same keys, so a
// signature made on one verifies on every other, and each key is found once
// per token by class and CKA_ID.
#include "support/replicated_tokens.h"
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/objects.h"
#include "support/slots.h"

#include <set>

using namespace p11test;

namespace {

const Bytes kMessage = to_bytes("every member signs alike");
const Bytes kTampered = to_bytes("every member signs alikE");

CK_OBJECT_HANDLE key_on(ReplicatedFixture& f, std::size_t token, CK_OBJECT_CLASS cls,
                        const ReplicaKey& key) {
  return require_replica_key(f.p11, f.sessions.at(token), cls, key);
}

// Bytes of a single-part C_Encrypt with a parameterless mechanism.
Bytes encrypt(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
              CK_OBJECT_HANDLE key, Bytes data) {
  CK_MECHANISM mech{mechanism, nullptr, 0};
  REQUIRE_RV(fn.C_EncryptInit(session, &mech, key), CKR_OK);
  Bytes out(512);
  CK_ULONG length = out.size();
  REQUIRE_RV(fn.C_Encrypt(session, data.data(), data.size(), out.data(), &length), CKR_OK);
  out.resize(length);
  return out;
}

Bytes decrypt(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, CK_MECHANISM_TYPE mechanism,
              CK_OBJECT_HANDLE key, Bytes data) {
  CK_MECHANISM mech{mechanism, nullptr, 0};
  REQUIRE_RV(fn.C_DecryptInit(session, &mech, key), CKR_OK);
  Bytes out(512);
  CK_ULONG length = out.size();
  REQUIRE_RV(fn.C_Decrypt(session, data.data(), data.size(), out.data(), &length), CKR_OK);
  out.resize(length);
  return out;
}

}  // namespace

TEST_CASE_FIXTURE(ReplicatedFixture, "three tokens: own labels, serials and slots") {
  REQUIRE(tokens.size() == kDefaultReplicas);
  REQUIRE(slots.size() == kDefaultReplicas);
  CHECK(std::set<std::string>(tokens.labels().begin(), tokens.labels().end()).size() == 3);
  CHECK(std::set<std::string>(tokens.serials().begin(), tokens.serials().end()).size() == 3);
  CHECK(std::set<CK_SLOT_ID>(slots.begin(), slots.end()).size() == 3);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    CAPTURE(i);
    CHECK(tokens.label(i) == kReplicaLabelPrefix + std::to_string(i + 1));
    CHECK_FALSE(tokens.serial(i).empty());
    CK_TOKEN_INFO info{};
    REQUIRE_RV(p11.C_GetTokenInfo(slots[i], &info), CKR_OK);
    CHECK(unpad(info.label) == tokens.label(i));
    CHECK(unpad(info.serialNumber) == tokens.serial(i));
    MESSAGE("token " << tokens.label(i) << ": serial " << tokens.serial(i) << ", slot "
                     << slots[i]);
  }
}

TEST_CASE_FIXTURE(ReplicatedFixture, "each key is found once per token by class and CKA_ID") {
  std::vector<std::vector<CK_OBJECT_HANDLE>> handles(tokens.size());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    CAPTURE(i);
    for (const ReplicaKey* key : {&kReplicaEc, &kReplicaRsa}) {
      CAPTURE(key->label);
      for (CK_OBJECT_CLASS cls : {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}) {
        const auto found = find_replica_key(p11, sessions[i], cls, *key);
        REQUIRE(found.size() == 1);
        const CK_OBJECT_HANDLE h = found.front();
        handles[i].push_back(h);
        CHECK(attribute_ulong(p11, sessions[i], h, CKA_KEY_TYPE) == key->type);
        CHECK(attribute_string(p11, sessions[i], h, CKA_LABEL) == key->label);
        CHECK(attribute_bytes(p11, sessions[i], h, CKA_TOKEN) == Bytes{CK_TRUE});
      }
      // The private values stay inside, as on a cloned HSM.
      const CK_OBJECT_HANDLE priv = key_on(*this, i, CKO_PRIVATE_KEY, *key);
      CHECK(attribute_bytes(p11, sessions[i], priv, CKA_SENSITIVE) == Bytes{CK_TRUE});
      CHECK(attribute_bytes(p11, sessions[i], priv, CKA_EXTRACTABLE) == Bytes{CK_FALSE});
    }
    CHECK(attribute_bytes(p11, sessions[i], key_on(*this, i, CKO_PUBLIC_KEY, kReplicaEc),
                          CKA_EC_POINT) == replica_ec_point());
    CHECK(attribute_bytes(p11, sessions[i], key_on(*this, i, CKO_PUBLIC_KEY, kReplicaRsa),
                          CKA_MODULUS) == replica_rsa_modulus());
    // Each key pair has its own CKA_ID: a class and an ID name one object.
    CHECK(find_replica_key(p11, sessions[i], CKO_SECRET_KEY, kReplicaEc).empty());
  }
  // Handles are each token's own business; recorded, not asserted. (SoftHSM2
  // numbers objects across the whole module, so here they differ: 4-7, 8-11,
  // 12-15; another module may give the same numbers on every token.)
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    std::string list;
    for (CK_OBJECT_HANDLE h : handles[i]) list += " " + std::to_string(h);
    MESSAGE("token " << tokens.label(i) << " handles (EC priv, pub, RSA priv, pub):" << list);
  }
}

TEST_CASE_FIXTURE(ReplicatedFixture,
                  "an ECDSA signature made on one token verifies on the others") {
  for (std::size_t signer = 0; signer < tokens.size(); ++signer) {
    CAPTURE(signer);
    const Bytes signature = ecdsa_sha256_sign(
        p11, sessions[signer], key_on(*this, signer, CKO_PRIVATE_KEY, kReplicaEc), kMessage);
    for (std::size_t verifier = 0; verifier < tokens.size(); ++verifier) {
      CAPTURE(verifier);
      const CK_OBJECT_HANDLE pub = key_on(*this, verifier, CKO_PUBLIC_KEY, kReplicaEc);
      CHECK_RV(ecdsa_sha256_verify(p11, sessions[verifier], pub, kMessage, signature), CKR_OK);
      CHECK_RV(ecdsa_sha256_verify(p11, sessions[verifier], pub, kTampered, signature),
               CKR_SIGNATURE_INVALID);
    }
  }
  // Control: a key made on token 2 alone does not verify token 1's signature.
  const KeyPair other = generate_ec_p256(p11, sessions[1], "not-replicated");
  const Bytes signature =
      ecdsa_sha256_sign(p11, sessions[0], key_on(*this, 0, CKO_PRIVATE_KEY, kReplicaEc), kMessage);
  CHECK_RV(ecdsa_sha256_verify(p11, sessions[1], other.public_key, kMessage, signature),
           CKR_SIGNATURE_INVALID);
}

TEST_CASE_FIXTURE(ReplicatedFixture, "an RSA signature made on one token verifies on the others") {
  std::vector<Bytes> signatures;
  for (std::size_t signer = 0; signer < tokens.size(); ++signer) {
    CAPTURE(signer);
    signatures.push_back(sign(p11, sessions[signer], CKM_SHA256_RSA_PKCS,
                              key_on(*this, signer, CKO_PRIVATE_KEY, kReplicaRsa), kMessage));
    CHECK(signatures.back().size() == 256);
    for (std::size_t verifier = 0; verifier < tokens.size(); ++verifier) {
      CAPTURE(verifier);
      const CK_OBJECT_HANDLE pub = key_on(*this, verifier, CKO_PUBLIC_KEY, kReplicaRsa);
      CHECK_RV(
          verify(p11, sessions[verifier], CKM_SHA256_RSA_PKCS, pub, kMessage, signatures.back()),
          CKR_OK);
      CHECK_RV(
          verify(p11, sessions[verifier], CKM_SHA256_RSA_PKCS, pub, kTampered, signatures.back()),
          CKR_SIGNATURE_INVALID);
    }
  }
  // PKCS#1 v1.5 is deterministic: the same key gives the same signature everywhere.
  CHECK(signatures[1] == signatures[0]);
  CHECK(signatures[2] == signatures[0]);
}

TEST_CASE_FIXTURE(ReplicatedFixture, "RSA: encrypted on one token, decrypted on another") {
  const Bytes plain = to_bytes("a secret for any member");
  const Bytes sealed =
      encrypt(p11, sessions[0], CKM_RSA_PKCS, key_on(*this, 0, CKO_PUBLIC_KEY, kReplicaRsa), plain);
  CHECK(sealed.size() == 256);
  CHECK(decrypt(p11, sessions[2], CKM_RSA_PKCS, key_on(*this, 2, CKO_PRIVATE_KEY, kReplicaRsa),
                sealed) == plain);
}

TEST_CASE("ReplicatedTokens: any number of tokens, and the store goes away with it") {
  std::filesystem::path store;
  {
    ReplicatedTokens tokens(2);
    store = tokens.directory();
    CHECK(tokens.size() == 2);
    CHECK(std::filesystem::exists(store / "softhsm2.conf"));
    CHECK(tokens.serial(0) != tokens.serial(1));
  }
  CHECK_FALSE(std::filesystem::exists(store));
}
