// C_GetInfo, slots, token and mechanism information, and the module lifecycle.
#include "support/doctest_ck.h"
#include "support/fixture.h"
#include "support/slots.h"

#include <algorithm>
#include <vector>

using namespace p11test;

TEST_CASE_FIXTURE(TokenFixture, "C_GetInfo describes a PKCS#11 2.x or 3.x library") {
  CK_INFO info{};
  REQUIRE_RV(p11.C_GetInfo(&info), CKR_OK);
  CHECK(info.cryptokiVersion.major >= 2);
  CHECK(info.cryptokiVersion.major <= 3);
  CHECK_FALSE(unpad(info.manufacturerID).empty());
  CHECK(info.flags == 0);  // no flags are defined for CK_INFO
}

TEST_CASE_FIXTURE(TokenFixture, "C_GetSlotList lists the token's slot, with size queries") {
  const auto present = slot_list(p11, true);
  const auto all = slot_list(p11, false);
  CHECK(std::count(present.begin(), present.end(), slot) == 1);
  CHECK(std::count(all.begin(), all.end(), slot) == 1);
  CHECK(all.size() >= present.size());

  // A buffer too small: CKR_BUFFER_TOO_SMALL and the needed count.
  std::vector<CK_SLOT_ID> buffer(present.size() + 1, CK_SLOT_ID{0});
  CK_ULONG count = 0;
  CHECK_RV(p11.C_GetSlotList(CK_TRUE, buffer.data(), &count), CKR_BUFFER_TOO_SMALL);
  CHECK(count == present.size());
  count = buffer.size();
  CHECK_RV(p11.C_GetSlotList(CK_TRUE, buffer.data(), &count), CKR_OK);
  CHECK(count == present.size());
}

TEST_CASE_FIXTURE(TokenFixture, "C_GetSlotInfo and C_GetTokenInfo describe the initialized token") {
  CK_SLOT_INFO slot_info{};
  REQUIRE_RV(p11.C_GetSlotInfo(slot, &slot_info), CKR_OK);
  CHECK((slot_info.flags & CKF_TOKEN_PRESENT) != 0);

  CK_TOKEN_INFO info{};
  REQUIRE_RV(p11.C_GetTokenInfo(slot, &info), CKR_OK);
  CHECK(unpad(info.label) == kTokenLabel);
  CHECK((info.flags & CKF_TOKEN_INITIALIZED) != 0);
  CHECK((info.flags & CKF_USER_PIN_INITIALIZED) != 0);
  CHECK((info.flags & CKF_LOGIN_REQUIRED) != 0);
  CHECK((info.flags & CKF_RNG) != 0);
  CHECK(info.ulMinPinLen <= 6);
  CHECK(info.ulMaxPinLen >= 8);

  // A slot ID the module did not hand out.
  const auto all = slot_list(p11, false);
  CK_SLOT_ID unknown = 0x7ffffff0;
  while (std::count(all.begin(), all.end(), unknown) != 0) ++unknown;
  CHECK_RV(p11.C_GetSlotInfo(unknown, &slot_info), CKR_SLOT_ID_INVALID);
  CHECK_RV(p11.C_GetTokenInfo(unknown, &info), CKR_SLOT_ID_INVALID);
}

TEST_CASE_FIXTURE(TokenFixture, "the token offers the mechanisms the suite uses") {
  CK_ULONG count = 0;
  REQUIRE_RV(p11.C_GetMechanismList(slot, nullptr, &count), CKR_OK);
  std::vector<CK_MECHANISM_TYPE> mechanisms(count);
  REQUIRE_RV(p11.C_GetMechanismList(slot, mechanisms.data(), &count), CKR_OK);
  mechanisms.resize(count);
  for (CK_MECHANISM_TYPE wanted :
       {CKM_SHA256, CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_SHA256_RSA_PKCS,
        CKM_AES_KEY_GEN, CKM_AES_CBC_PAD}) {
    CAPTURE(wanted);
    CHECK(std::count(mechanisms.begin(), mechanisms.end(), wanted) == 1);
  }

  CK_MECHANISM_INFO info{};
  REQUIRE_RV(p11.C_GetMechanismInfo(slot, CKM_AES_KEY_GEN, &info), CKR_OK);
  CHECK((info.flags & CKF_GENERATE) != 0);
  CHECK(info.ulMinKeySize <= 32);  // bytes, for AES
  CHECK(info.ulMaxKeySize >= 32);
  REQUIRE_RV(p11.C_GetMechanismInfo(slot, CKM_ECDSA, &info), CKR_OK);
  CHECK((info.flags & CKF_SIGN) != 0);
  CHECK((info.flags & CKF_VERIFY) != 0);
  CHECK_RV(p11.C_GetMechanismInfo(slot, CKM_VENDOR_DEFINED | 0x4242, &info), CKR_MECHANISM_INVALID);
}

TEST_CASE_FIXTURE(TokenFixture, "initialize twice, then finalize: no calls after C_Finalize") {
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  CHECK_RV(p11.C_Initialize(&args), CKR_CRYPTOKI_ALREADY_INITIALIZED);

  REQUIRE_RV(module.finalize(), CKR_OK);
  CK_INFO info{};
  CHECK_RV(p11.C_GetInfo(&info), CKR_CRYPTOKI_NOT_INITIALIZED);
  CK_ULONG count = 0;
  CHECK_RV(p11.C_GetSlotList(CK_FALSE, nullptr, &count), CKR_CRYPTOKI_NOT_INITIALIZED);
  CHECK_RV(p11.C_Finalize(nullptr), CKR_CRYPTOKI_NOT_INITIALIZED);
}
