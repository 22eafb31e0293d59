// Key pair generation and signatures: ECDSA P-256 over a C_Digest SHA-256 digest,
// and RSA-2048 with CKM_SHA256_RSA_PKCS.
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/fixture.h"
#include "support/objects.h"

using namespace p11test;

namespace {

const Bytes kMessage = to_bytes("p11mux signs this message");
const Bytes kTampered = to_bytes("p11mux signs this massage");

Bytes flipped(Bytes bytes, std::size_t at) {
  bytes.at(at) ^= 0x01;
  return bytes;
}

}  // namespace

TEST_CASE_FIXTURE(LoggedInFixture, "EC P-256 key pair: ECDSA sign and verify") {
  const KeyPair key = generate_ec_p256(p11, session, "ec-sign");

  CHECK(attribute_ulong(p11, session, key.public_key, CKA_CLASS) == CKO_PUBLIC_KEY);
  CHECK(attribute_ulong(p11, session, key.private_key, CKA_CLASS) == CKO_PRIVATE_KEY);
  CHECK(attribute_ulong(p11, session, key.public_key, CKA_KEY_TYPE) == CKK_EC);
  CHECK(attribute_ulong(p11, session, key.private_key, CKA_KEY_TYPE) == CKK_EC);
  CHECK(attribute_bytes(p11, session, key.public_key, CKA_EC_PARAMS) == kPrime256v1Params);
  // DER OCTET STRING holding the uncompressed point: 04 41 04 X(32) Y(32).
  const Bytes point = attribute_bytes(p11, session, key.public_key, CKA_EC_POINT);
  REQUIRE(point.size() == 67);
  CHECK(point[0] == 0x04);
  CHECK(point[1] == 0x41);
  CHECK(point[2] == 0x04);

  Bytes hash = digest(p11, session, CKM_SHA256, kMessage);
  REQUIRE(hash.size() == 32);

  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  REQUIRE_RV(p11.C_SignInit(session, &ecdsa, key.private_key), CKR_OK);
  CK_ULONG length = 0;
  REQUIRE_RV(p11.C_Sign(session, hash.data(), hash.size(), nullptr, &length), CKR_OK);
  CHECK(length == 64);
  Bytes signature(64);
  length = 10;
  REQUIRE_RV(p11.C_Sign(session, hash.data(), hash.size(), signature.data(), &length),
             CKR_BUFFER_TOO_SMALL);
  CHECK(length == 64);
  length = signature.size();
  REQUIRE_RV(p11.C_Sign(session, hash.data(), hash.size(), signature.data(), &length), CKR_OK);
  REQUIRE(length == 64);

  CHECK_RV(verify(p11, session, CKM_ECDSA, key.public_key, hash, signature), CKR_OK);
  CHECK_RV(ecdsa_sha256_verify(p11, session, key.public_key, kMessage, signature), CKR_OK);
  CHECK_RV(ecdsa_sha256_verify(p11, session, key.public_key, kTampered, signature),
           CKR_SIGNATURE_INVALID);
  CHECK_RV(verify(p11, session, CKM_ECDSA, key.public_key, hash, flipped(signature, 40)),
           CKR_SIGNATURE_INVALID);

  // ECDSA is randomized: a second signature differs and verifies too.
  const Bytes again = ecdsa_sha256_sign(p11, session, key.private_key, kMessage);
  CHECK(again != signature);
  CHECK_RV(ecdsa_sha256_verify(p11, session, key.public_key, kMessage, again), CKR_OK);

  // Another key's signature does not verify.
  const KeyPair other = generate_ec_p256(p11, session, "ec-other");
  CHECK_RV(ecdsa_sha256_verify(p11, session, other.public_key, kMessage, signature),
           CKR_SIGNATURE_INVALID);
}

TEST_CASE_FIXTURE(LoggedInFixture, "RSA-2048 key pair: CKM_SHA256_RSA_PKCS sign and verify") {
  const KeyPair key = generate_rsa(p11, session, 2048, "rsa-sign");

  CHECK(attribute_ulong(p11, session, key.public_key, CKA_KEY_TYPE) == CKK_RSA);
  CHECK(attribute_ulong(p11, session, key.public_key, CKA_MODULUS_BITS) == 2048);
  CHECK(attribute_bytes(p11, session, key.public_key, CKA_MODULUS).size() == 256);
  CHECK(attribute_bytes(p11, session, key.public_key, CKA_PUBLIC_EXPONENT) ==
        Bytes{0x01, 0x00, 0x01});

  const Bytes signature = sign(p11, session, CKM_SHA256_RSA_PKCS, key.private_key, kMessage);
  CHECK(signature.size() == 256);
  CHECK_RV(verify(p11, session, CKM_SHA256_RSA_PKCS, key.public_key, kMessage, signature), CKR_OK);
  CHECK_RV(verify(p11, session, CKM_SHA256_RSA_PKCS, key.public_key, kTampered, signature),
           CKR_SIGNATURE_INVALID);
  CHECK_RV(
      verify(p11, session, CKM_SHA256_RSA_PKCS, key.public_key, kMessage, flipped(signature, 100)),
      CKR_SIGNATURE_INVALID);

  // PKCS#1 v1.5 is deterministic: the same signature again, also in parts.
  CHECK(sign(p11, session, CKM_SHA256_RSA_PKCS, key.private_key, kMessage) == signature);
  CK_MECHANISM mechanism{CKM_SHA256_RSA_PKCS, nullptr, 0};
  REQUIRE_RV(p11.C_SignInit(session, &mechanism, key.private_key), CKR_OK);
  Bytes message = kMessage;
  REQUIRE_RV(p11.C_SignUpdate(session, message.data(), 7), CKR_OK);
  REQUIRE_RV(p11.C_SignUpdate(session, message.data() + 7, message.size() - 7), CKR_OK);
  Bytes parts(256);
  CK_ULONG length = parts.size();
  REQUIRE_RV(p11.C_SignFinal(session, parts.data(), &length), CKR_OK);
  CHECK(length == 256);
  CHECK(parts == signature);
}

TEST_CASE_FIXTURE(LoggedInFixture, "private key values are not readable") {
  const KeyPair key = generate_ec_p256(p11, session, "ec-sensitive");
  CK_ATTRIBUTE value{CKA_VALUE, nullptr, 0};
  CHECK_RV(p11.C_GetAttributeValue(session, key.private_key, &value, 1), CKR_ATTRIBUTE_SENSITIVE);
  CHECK(value.ulValueLen == CK_UNAVAILABLE_INFORMATION);
}
