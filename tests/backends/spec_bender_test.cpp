// libp11mux-spec-bender.so loaded directly: with nothing configured, every
// bend of mock_control.h is on; it is a library with its own state.
#include "backends_test_support.hpp"

#include "key_material.hpp"
#include "mock_control.h"

#include <stdlib.h>

#include <cstring>

namespace p11mux::backends_test {
namespace {

const MockControl& bender_control() {
  return *symbol<MockGetControlFn>(open_library(SPEC_BENDER_PATH), "mock_get_control")();
}

TEST_CASE("the spec bender bends by default, and obeys when told to") {
  ::unsetenv("MOCK_BEND");
  const MockControl& bender = bender_control();
  const MockControl& mock =
      *symbol<MockGetControlFn>(open_library(MOCK_PATH), "mock_get_control")();
  REQUIRE(&bender != &mock);
  REQUIRE(bender.reset() == 0);
  REQUIRE(mock.reset() == 0);
  CK_FUNCTION_LIST* ck = function_list(open_library(SPEC_BENDER_PATH));
  // Thread-safe: OS locking is accepted.
  REQUIRE(ck->C_Initialize(os_locking()) == CKR_OK);

  CK_SESSION_HANDLE h = 0, h2 = 0;
  REQUIRE(ck->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
          CKR_OK);
  // keep-op
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
  CHECK(ck->C_DigestKey(h, 0xdead) == CKR_KEY_HANDLE_INVALID);
  CHECK(ck->C_DigestInit(h, &sha) == CKR_OPERATION_ACTIVE);
  // fill-len
  CK_OBJECT_CLASS cls = CKO_DATA;
  unsigned char label[] = "twelve bytes";
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, label, 12}};
  CK_OBJECT_HANDLE obj = 0;
  REQUIRE(ck->C_CreateObject(h, templ, 2, &obj) == CKR_OK);
  unsigned char small[2];
  CK_ATTRIBUTE get{CKA_LABEL, small, sizeof small};
  CHECK(ck->C_GetAttributeValue(h, obj, &get, 1) == CKR_BUFFER_TOO_SMALL);
  CHECK(get.ulValueLen == 12);
  // reuse-handles
  REQUIRE(ck->C_CloseSession(h) == CKR_OK);
  REQUIRE(ck->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h2) == CKR_OK);
  CHECK(h2 == h);
  // key-mat
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE base = 0;
  REQUIRE(ck->C_GenerateKey(h2, &gen, nullptr, 0, &base) == CKR_OK);
  test::KeyMaterialDerive derive(CKM_SSL3_KEY_AND_MAC_DERIVE, 160, 128);
  CHECK(ck->C_DeriveKey(h2, &derive.mechanism, base, nullptr, 0, nullptr) == CKR_OK);
  CHECK(derive.out.hServerKey != CK_INVALID_HANDLE);
  // transient-count: within MOCK_BEND_TRANSIENT_COUNT_EVERY opens one is refused.
  int refused = 0;
  for (unsigned long i = 0; i < MOCK_BEND_TRANSIENT_COUNT_EVERY; ++i) {
    CK_SESSION_HANDLE s = 0;
    CK_RV rv = ck->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
    if (rv == CKR_SESSION_COUNT)
      ++refused;
    else
      CHECK(rv == CKR_OK);
  }
  CHECK(refused == 1);
  MockStats st{};
  bender.stats(&st);
  CHECK(st.bend_ops_kept == 1);
  CHECK(st.bend_lengths_filled == 1);
  CHECK(st.bend_handles_reused >= 1);
  CHECK(st.bend_key_mat_keys == 4);
  CHECK(st.bend_session_count == 1);
  MockStats plain{};
  mock.stats(&plain);
  CHECK(plain.calls_total == 0);  // its own state
  REQUIRE(ck->C_Finalize(nullptr) == CKR_OK);

  // MockConfig.bend = MOCK_BEND_OBEY: the mock's behaviour.
  MockConfig obey{};
  obey.bend = MOCK_BEND_OBEY;
  REQUIRE(bender.configure(&obey) == 0);
  REQUIRE(ck->C_Initialize(os_locking()) == CKR_OK);
  REQUIRE(ck->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
          CKR_OK);
  REQUIRE(ck->C_DigestInit(h, &sha) == CKR_OK);
  CHECK(ck->C_DigestKey(h, 0xdead) == CKR_KEY_HANDLE_INVALID);
  CHECK(ck->C_DigestInit(h, &sha) == CKR_OK);
  REQUIRE(ck->C_Finalize(nullptr) == CKR_OK);
  CHECK(bender.reset() == 0);
}

}  // namespace
}  // namespace p11mux::backends_test
