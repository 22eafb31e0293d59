// AES-256 key generation and CKM_AES_CBC_PAD encryption, with the length
// conventions: NULL output gives the size, a too small buffer gives
// CKR_BUFFER_TOO_SMALL and keeps the operation, the final call ends it.
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/fixture.h"
#include "support/objects.h"

#include <algorithm>

using namespace p11test;

namespace {

const Bytes kPlaintext = to_bytes("37 bytes of plaintext for AES-CBC-PAD");  // 37: pads to 48

Bytes random_bytes(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session, std::size_t size) {
  Bytes out(size);
  REQUIRE_RV(p11.C_GenerateRandom(session, out.data(), out.size()), CKR_OK);
  return out;
}

Bytes cbc_pad(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session, bool encrypt,
              CK_OBJECT_HANDLE key, Bytes iv, Bytes input) {
  CK_MECHANISM mechanism{CKM_AES_CBC_PAD, iv.data(), iv.size()};
  Bytes out(input.size() + 16);
  CK_ULONG length = out.size();
  if (encrypt) {
    REQUIRE_RV(p11.C_EncryptInit(session, &mechanism, key), CKR_OK);
    REQUIRE_RV(p11.C_Encrypt(session, input.data(), input.size(), out.data(), &length), CKR_OK);
  } else {
    REQUIRE_RV(p11.C_DecryptInit(session, &mechanism, key), CKR_OK);
    REQUIRE_RV(p11.C_Decrypt(session, input.data(), input.size(), out.data(), &length), CKR_OK);
  }
  out.resize(length);
  return out;
}

}  // namespace

TEST_CASE_FIXTURE(LoggedInFixture, "AES-256 key generation") {
  const CK_OBJECT_HANDLE key = generate_aes(p11, session, 32, "aes-key");
  CHECK(attribute_ulong(p11, session, key, CKA_CLASS) == CKO_SECRET_KEY);
  CHECK(attribute_ulong(p11, session, key, CKA_KEY_TYPE) == CKK_AES);
  CHECK(attribute_ulong(p11, session, key, CKA_VALUE_LEN) == 32);
  CK_ATTRIBUTE value{CKA_VALUE, nullptr, 0};
  CHECK_RV(p11.C_GetAttributeValue(session, key, &value, 1), CKR_ATTRIBUTE_SENSITIVE);
}

TEST_CASE_FIXTURE(LoggedInFixture, "AES-CBC-PAD round trip with length queries") {
  const CK_OBJECT_HANDLE key = generate_aes(p11, session, 32, "aes-cbc");
  Bytes iv = random_bytes(p11, session, 16);
  Bytes plaintext = kPlaintext;
  CK_MECHANISM mechanism{CKM_AES_CBC_PAD, iv.data(), iv.size()};

  // Encrypt.
  REQUIRE_RV(p11.C_EncryptInit(session, &mechanism, key), CKR_OK);
  CK_ULONG length = 0;
  REQUIRE_RV(p11.C_Encrypt(session, plaintext.data(), plaintext.size(), nullptr, &length), CKR_OK);
  CHECK(length >= 48);  // a module may answer an upper bound
  Bytes ciphertext(length);
  length = 16;
  REQUIRE_RV(p11.C_Encrypt(session, plaintext.data(), plaintext.size(), ciphertext.data(), &length),
             CKR_BUFFER_TOO_SMALL);
  CHECK(length >= 48);
  length = ciphertext.size();
  REQUIRE_RV(p11.C_Encrypt(session, plaintext.data(), plaintext.size(), ciphertext.data(), &length),
             CKR_OK);
  REQUIRE(length == 48);
  ciphertext.resize(length);
  CHECK(Bytes(ciphertext.begin(), ciphertext.begin() + 37) != plaintext);
  CHECK_RV(p11.C_Encrypt(session, plaintext.data(), plaintext.size(), ciphertext.data(), &length),
           CKR_OPERATION_NOT_INITIALIZED);

  // Decrypt.
  REQUIRE_RV(p11.C_DecryptInit(session, &mechanism, key), CKR_OK);
  length = 0;
  REQUIRE_RV(p11.C_Decrypt(session, ciphertext.data(), ciphertext.size(), nullptr, &length),
             CKR_OK);
  CHECK(length >= 37);
  Bytes decrypted(length);
  length = 8;
  REQUIRE_RV(
      p11.C_Decrypt(session, ciphertext.data(), ciphertext.size(), decrypted.data(), &length),
      CKR_BUFFER_TOO_SMALL);
  CHECK(length >= 37);
  length = decrypted.size();
  REQUIRE_RV(
      p11.C_Decrypt(session, ciphertext.data(), ciphertext.size(), decrypted.data(), &length),
      CKR_OK);
  decrypted.resize(length);
  CHECK(decrypted == plaintext);
  CHECK_RV(p11.C_Decrypt(session, ciphertext.data(), ciphertext.size(), decrypted.data(), &length),
           CKR_OPERATION_NOT_INITIALIZED);
}

TEST_CASE_FIXTURE(LoggedInFixture, "AES-CBC-PAD behaves like CBC: multi-part and IV changes") {
  const CK_OBJECT_HANDLE key = generate_aes(p11, session, 32, "aes-cbc-parts");
  Bytes iv = random_bytes(p11, session, 16);
  const Bytes ciphertext = cbc_pad(p11, session, true, key, iv, kPlaintext);
  REQUIRE(ciphertext.size() == 48);

  // Multi-part encryption with the same IV gives the same ciphertext.
  CK_MECHANISM mechanism{CKM_AES_CBC_PAD, iv.data(), iv.size()};
  REQUIRE_RV(p11.C_EncryptInit(session, &mechanism, key), CKR_OK);
  Bytes plaintext = kPlaintext;
  Bytes parts;
  for (std::size_t at = 0; at < plaintext.size(); at += 10) {
    Bytes out(32);
    CK_ULONG length = out.size();
    const std::size_t size = std::min<std::size_t>(10, plaintext.size() - at);
    REQUIRE_RV(p11.C_EncryptUpdate(session, plaintext.data() + at, size, out.data(), &length),
               CKR_OK);
    parts.insert(parts.end(), out.begin(), out.begin() + static_cast<std::ptrdiff_t>(length));
  }
  Bytes last(32);
  CK_ULONG length = last.size();
  REQUIRE_RV(p11.C_EncryptFinal(session, last.data(), &length), CKR_OK);
  parts.insert(parts.end(), last.begin(), last.begin() + static_cast<std::ptrdiff_t>(length));
  CHECK(parts == ciphertext);

  // In CBC, flipping a bit of the IV flips the same bit of the first plaintext block only.
  Bytes changed_iv = iv;
  changed_iv[3] ^= 0x20;
  Bytes expected = kPlaintext;
  expected[3] ^= 0x20;
  CHECK(cbc_pad(p11, session, false, key, changed_iv, ciphertext) == expected);
  CHECK(cbc_pad(p11, session, false, key, iv, ciphertext) == kPlaintext);
}
