// Replay of single-part operations on another member (group/operation_record.hpp,
// docs/groups.md "Replay"): the mechanism copy for each parameter layout, the
// phases an operation goes through, and the Init run again on a second member
// (a fake function table behind a BackendPort).
#include "group/operation_record.hpp"
#include "group/replay_calls.hpp"

#include "port/backend_port.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <memory>
#include <string_view>
#include <vector>

namespace p11mux {
namespace {

std::vector<unsigned char> bytes_of(const void* p, std::size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  return {b, b + n};
}

// The copy's parameter equals the original byte for byte, except the nested
// pointers, which point to the copy's own bytes (equal to the original's).
void check_same(const CK_MECHANISM& original, const MechanismCopy& copy) {
  REQUIRE_FALSE(copy.empty());
  const CK_MECHANISM* c = copy.get();
  CHECK(c->mechanism == original.mechanism);
  CHECK(c->ulParameterLen == original.ulParameterLen);
  if (original.ulParameterLen == 0) {
    CHECK(c->pParameter == nullptr);
    return;
  }
  CHECK(c->pParameter != original.pParameter);
  const ReplayMechanism* known = replay_mechanism(original.mechanism);
  REQUIRE(known != nullptr);
  const ParamLayout* layout = param_layout(known->param, original.ulParameterLen);
  REQUIRE(layout != nullptr);
  std::vector<unsigned char> expected = bytes_of(original.pParameter, layout->size);
  const auto* got = static_cast<const unsigned char*>(c->pParameter);
  for (std::size_t i = 0; i < layout->nested_count; ++i) {
    const NestedBytes& n = layout->nested[i];
    CK_ULONG len;
    const unsigned char *from, *to;
    std::memcpy(&len, expected.data() + n.length, sizeof len);
    std::memcpy(&from, expected.data() + n.pointer, sizeof from);
    std::memcpy(&to, got + n.pointer, sizeof to);
    if (len == 0) {
      CHECK(to == nullptr);
    } else {
      CHECK(to != from);
      CHECK(bytes_of(to, len) == bytes_of(from, len));
    }
    std::memcpy(expected.data() + n.pointer, &to, sizeof to);
  }
  CHECK(bytes_of(got, layout->size) == expected);
}

// A parameter one byte longer or shorter than its struct is refused.
void check_length_mismatch_refused(CK_MECHANISM m) {
  MechanismCopy copy;
  unsigned char bigger[256] = {};
  std::memcpy(bigger, m.pParameter, m.ulParameterLen);
  CK_MECHANISM longer{m.mechanism, bigger, m.ulParameterLen + 1};
  CHECK(copy.assign(longer) == CopyResult::bad_parameter);
  CHECK(copy.empty());
  CK_MECHANISM shorter{m.mechanism, m.pParameter, m.ulParameterLen - 1};
  CHECK(copy.assign(shorter) == CopyResult::bad_parameter);
  CHECK(copy.empty());
  // And a missing parameter where one is required.
  if (!replay_mechanism(m.mechanism)->optional) {
    CK_MECHANISM none{m.mechanism, nullptr, 0};
    CHECK(copy.assign(none) == CopyResult::bad_parameter);
  }
}

template <class P>
CK_MECHANISM mechanism_of(CK_MECHANISM_TYPE type, P& params) {
  return {type, &params, sizeof params};
}

TEST_CASE("every replayable mechanism with a parameter has a layout") {
  for (const ReplayMechanism& m : kReplayMechanisms) {
    CAPTURE(m.type);
    if (m.param == Param::none) continue;
    bool found = false;
    for (const ParamLayout& l : kParamLayouts) found = found || l.param == m.param;
    CHECK(found);
  }
  // Each found by the binary search, with its own parameter (listed once:
  // a static_assert); one not listed is not.
  for (const ReplayMechanism& m : kReplayMechanisms) {
    CAPTURE(m.type);
    const ReplayMechanism* found = replay_mechanism(m.type);
    REQUIRE(found != nullptr);
    CHECK(found->param == m.param);
    CHECK(found->optional == m.optional);
  }
  CHECK(replay_mechanism(CKM_VENDOR_DEFINED + 1) == nullptr);
  CHECK(replay_mechanism(0xFFFFFFFFul) == nullptr);
}

TEST_CASE("a mechanism without a parameter is copied without allocating") {
  MechanismCopy copy;
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  REQUIRE(copy.assign(ecdsa) == CopyResult::ok);
  check_same(ecdsa, copy);
  CHECK_FALSE(copy.on_heap());
  // A pointer with a length of 0 says no parameter; it is not kept.
  int unrelated = 0;
  CK_MECHANISM sha256{CKM_SHA256, &unrelated, 0};
  REQUIRE(copy.assign(sha256) == CopyResult::ok);
  CHECK(copy.get()->pParameter == nullptr);
  // A parameter where none is defined fits no layout.
  CK_ULONG stray = 5;
  CK_MECHANISM with{CKM_ECDSA_SHA256, &stray, sizeof stray};
  CHECK(copy.assign(with) == CopyResult::bad_parameter);
  CHECK(copy.get() == nullptr);
}

TEST_CASE("an unknown mechanism is not copied") {
  MechanismCopy copy;
  unsigned char iv[16] = {1, 2, 3};
  CK_MECHANISM vendor{CKM_VENDOR_DEFINED | 0x42, iv, sizeof iv};
  CHECK(copy.assign(vendor) == CopyResult::unknown_mechanism);
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
  CHECK(copy.assign(wrap) == CopyResult::unknown_mechanism);
  CHECK(copy.empty());
}

TEST_CASE("a copy reused for one mechanism, then others: each by its own entry") {
  // MechanismCopy keeps the table's entry of its last mechanism.
  MechanismCopy copy;
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  for (int i = 0; i < 2; ++i) {
    REQUIRE(copy.assign(ecdsa) == CopyResult::ok);
    check_same(ecdsa, copy);
  }
  CK_ULONG stray = 5;
  CK_MECHANISM with{CKM_ECDSA, &stray, sizeof stray};  // ECDSA takes no parameter
  CHECK(copy.assign(with) == CopyResult::bad_parameter);
  CK_MECHANISM vendor{CKM_VENDOR_DEFINED | 0x42, nullptr, 0};
  CHECK(copy.assign(vendor) == CopyResult::unknown_mechanism);
  CHECK(copy.assign(vendor) == CopyResult::unknown_mechanism);
  CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA256, CKG_MGF1_SHA256, 32};
  CK_MECHANISM rsa_pss{CKM_SHA256_RSA_PKCS_PSS, &pss, sizeof pss};
  REQUIRE(copy.assign(rsa_pss) == CopyResult::ok);
  check_same(rsa_pss, copy);
  REQUIRE(copy.assign(ecdsa) == CopyResult::ok);
  check_same(ecdsa, copy);
}

TEST_CASE("IVs: 16 bytes for AES CBC, 8 for DES3 CBC") {
  unsigned char iv16[16];
  for (int i = 0; i < 16; ++i) iv16[i] = static_cast<unsigned char>(0xa0 + i);
  for (CK_MECHANISM_TYPE t : {CKM_AES_CBC, CKM_AES_CBC_PAD}) {
    MechanismCopy copy;
    CK_MECHANISM m{t, iv16, sizeof iv16};
    REQUIRE(copy.assign(m) == CopyResult::ok);
    check_same(m, copy);
    CHECK_FALSE(copy.on_heap());
    check_length_mismatch_refused(m);
  }
  unsigned char iv8[8] = {9, 8, 7, 6, 5, 4, 3, 2};
  MechanismCopy copy;
  CK_MECHANISM des{CKM_DES3_CBC_PAD, iv8, sizeof iv8};
  REQUIRE(copy.assign(des) == CopyResult::ok);
  check_same(des, copy);
  check_length_mismatch_refused(des);
  CK_MECHANISM aes_with_8{CKM_AES_CBC, iv8, sizeof iv8};
  CHECK(copy.assign(aes_with_8) == CopyResult::bad_parameter);
}

TEST_CASE("flat structures: CTR, PSS, a MAC length") {
  CK_AES_CTR_PARAMS ctr{};
  ctr.ulCounterBits = 32;
  for (int i = 0; i < 16; ++i) ctr.cb[i] = static_cast<unsigned char>(i * 3);
  CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA256, CKG_MGF1_SHA256, 32};
  CK_MAC_GENERAL_PARAMS mac = 16;
  for (CK_MECHANISM m :
       {mechanism_of(CKM_AES_CTR, ctr), mechanism_of(CKM_RSA_PKCS_PSS, pss),
        mechanism_of(CKM_SHA384_RSA_PKCS_PSS, pss), mechanism_of(CKM_SHA256_HMAC_GENERAL, mac),
        mechanism_of(CKM_AES_CMAC_GENERAL, mac)}) {
    CAPTURE(m.mechanism);
    MechanismCopy copy;
    REQUIRE(copy.assign(m) == CopyResult::ok);
    check_same(m, copy);
    CHECK_FALSE(copy.on_heap());
    check_length_mismatch_refused(m);
  }
}

TEST_CASE("OAEP: the label is copied; without one, nothing is pointed to") {
  unsigned char label[5] = {'l', 'a', 'b', 'e', 'l'};
  CK_RSA_PKCS_OAEP_PARAMS oaep{CKM_SHA256, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED, label,
                               sizeof label};
  MechanismCopy copy;
  CK_MECHANISM m = mechanism_of(CKM_RSA_PKCS_OAEP, oaep);
  REQUIRE(copy.assign(m) == CopyResult::ok);
  check_same(m, copy);
  check_length_mismatch_refused(m);

  CK_RSA_PKCS_OAEP_PARAMS no_label{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, label, 0};
  CK_MECHANISM m2 = mechanism_of(CKM_RSA_PKCS_OAEP, no_label);
  REQUIRE(copy.assign(m2) == CopyResult::ok);
  check_same(m2, copy);

  // A length with no bytes behind it.
  CK_RSA_PKCS_OAEP_PARAMS broken{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 4};
  CHECK(copy.assign(mechanism_of(CKM_RSA_PKCS_OAEP, broken)) == CopyResult::bad_parameter);
}

TEST_CASE("GCM: both layouts, told apart by length, copied as they came") {
  unsigned char iv[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  unsigned char aad[3] = {0xaa, 0xbb, 0xcc};
  CK_GCM_PARAMS v3{iv, sizeof iv, 96, aad, sizeof aad, 128};
  GcmParamsV240Text v240{iv, sizeof iv, aad, sizeof aad, 128};
  for (CK_MECHANISM m : {mechanism_of(CKM_AES_GCM, v3), mechanism_of(CKM_AES_GCM, v240)}) {
    CAPTURE(m.ulParameterLen);
    MechanismCopy copy;
    REQUIRE(copy.assign(m) == CopyResult::ok);
    check_same(m, copy);
    CHECK_FALSE(copy.on_heap());  // 48 + 12 + 3 or 40 + 12 + 3 bytes fit inline
    check_length_mismatch_refused(m);
  }
  // The v3.0 layout keeps its ulIvBits.
  MechanismCopy copy;
  REQUIRE(copy.assign(mechanism_of(CKM_AES_GCM, v3)) == CopyResult::ok);
  CHECK(static_cast<const CK_GCM_PARAMS*>(copy.get()->pParameter)->ulIvBits == 96);
  // No AAD: NULL, 0.
  CK_GCM_PARAMS no_aad{iv, sizeof iv, 96, nullptr, 0, 128};
  REQUIRE(copy.assign(mechanism_of(CKM_AES_GCM, no_aad)) == CopyResult::ok);
  check_same(mechanism_of(CKM_AES_GCM, no_aad), copy);
}

TEST_CASE("CCM: nonce and AAD copied") {
  unsigned char nonce[7] = {7, 6, 5, 4, 3, 2, 1};
  unsigned char aad[20] = {};
  for (int i = 0; i < 20; ++i) aad[i] = static_cast<unsigned char>(i);
  CK_CCM_PARAMS ccm{64, nonce, sizeof nonce, aad, sizeof aad, 16};
  MechanismCopy copy;
  CK_MECHANISM m = mechanism_of(CKM_AES_CCM, ccm);
  REQUIRE(copy.assign(m) == CopyResult::ok);
  check_same(m, copy);
  CHECK(copy.on_heap());  // 48 + 7 + 20 bytes
  check_length_mismatch_refused(m);
}

TEST_CASE("EdDSA: the context copied; the parameter may be absent") {
  unsigned char context[4] = {'c', 't', 'x', '!'};
  CK_EDDSA_PARAMS eddsa;
  std::memset(&eddsa, 0, sizeof eddsa);  // its padding after phFlag, too
  eddsa.phFlag = CK_TRUE;
  eddsa.ulContextDataLen = sizeof context;
  eddsa.pContextData = context;
  MechanismCopy copy;
  CK_MECHANISM m = mechanism_of(CKM_EDDSA, eddsa);
  REQUIRE(copy.assign(m) == CopyResult::ok);
  check_same(m, copy);
  check_length_mismatch_refused(m);
  CK_MECHANISM pure{CKM_EDDSA, nullptr, 0};
  REQUIRE(copy.assign(pure) == CopyResult::ok);
  check_same(pure, copy);
}

TEST_CASE(
    "the last mechanism again without a parameter: a copy of its own, whatever came between") {
  // MechanismCopy::assign's inline path takes the last copy when it had no
  // parameter; anything else in between must send it to the table again.
  unsigned char context[4] = {'c', 't', 'x', '!'};
  CK_EDDSA_PARAMS eddsa;
  std::memset(&eddsa, 0, sizeof eddsa);
  eddsa.ulContextDataLen = sizeof context;
  eddsa.pContextData = context;
  CK_MECHANISM with_context = mechanism_of(CKM_EDDSA, eddsa);
  CK_MECHANISM pure{CKM_EDDSA, nullptr, 0};
  MechanismCopy copy;
  REQUIRE(copy.assign(pure) == CopyResult::ok);
  REQUIRE(copy.assign(with_context) == CopyResult::ok);
  check_same(with_context, copy);
  REQUIRE(copy.assign(pure) == CopyResult::ok);
  check_same(pure, copy);  // not the context left from before
  REQUIRE(copy.assign(pure) == CopyResult::ok);
  check_same(pure, copy);
  // A refused copy in between leaves it empty; the next is copied anew.
  CK_ULONG stray = 5;
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CK_MECHANISM ecdsa_with{CKM_ECDSA, &stray, sizeof stray};
  REQUIRE(copy.assign(ecdsa) == CopyResult::ok);
  CHECK(copy.assign(ecdsa_with) == CopyResult::bad_parameter);
  CHECK(copy.empty());
  REQUIRE(copy.assign(ecdsa) == CopyResult::ok);
  check_same(ecdsa, copy);
  // A type no entry knows is never taken for the last one, nor held.
  CK_MECHANISM unknown{0xFFFFFFFFul, nullptr, 0};
  CHECK(copy.assign(unknown) == CopyResult::unknown_mechanism);
  CHECK(copy.assign(unknown) == CopyResult::unknown_mechanism);
  CHECK(copy.empty());
  copy.clear();
  REQUIRE(copy.assign(ecdsa) == CopyResult::ok);
  check_same(ecdsa, copy);
}

TEST_CASE("the copy owns its bytes: the application's buffers may go") {
  auto iv = std::make_unique<unsigned char[]>(12);
  auto aad = std::make_unique<unsigned char[]>(100);
  std::memset(iv.get(), 0x11, 12);
  std::memset(aad.get(), 0x22, 100);
  auto params =
      std::make_unique<CK_GCM_PARAMS>(CK_GCM_PARAMS{iv.get(), 12, 96, aad.get(), 100, 128});
  MechanismCopy copy;
  REQUIRE(copy.assign({CKM_AES_GCM, params.get(), sizeof(CK_GCM_PARAMS)}) == CopyResult::ok);
  CHECK(copy.on_heap());
  params.reset();
  iv.reset();
  aad.reset();
  // Read through the copy alone (an ASan build sees any read of the freed buffers).
  const auto* p = static_cast<const CK_GCM_PARAMS*>(copy.get()->pParameter);
  CHECK(p->ulIvLen == 12);
  CHECK(p->pIv[11] == 0x11);
  CHECK(p->pAAD[99] == 0x22);
  CHECK(p->ulTagBits == 128);
}

TEST_CASE("a heap buffer is reused by a copy that fits it; too much is refused") {
  unsigned char iv[12] = {};
  std::vector<unsigned char> aad(1000, 0x33);
  CK_GCM_PARAMS big{iv, sizeof iv, 96, aad.data(), 1000, 128};
  MechanismCopy copy;
  REQUIRE(copy.assign(mechanism_of(CKM_AES_GCM, big)) == CopyResult::ok);
  const void* first = copy.get()->pParameter;
  CK_GCM_PARAMS smaller{iv, sizeof iv, 96, aad.data(), 500, 128};
  REQUIRE(copy.assign(mechanism_of(CKM_AES_GCM, smaller)) == CopyResult::ok);
  CHECK(copy.get()->pParameter == first);
  check_same(mechanism_of(CKM_AES_GCM, smaller), copy);
  // Back inline when it fits.
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  REQUIRE(copy.assign(ecdsa) == CopyResult::ok);
  CHECK_FALSE(copy.on_heap());

  std::vector<unsigned char> huge(MechanismCopy::kMaxBytes + 1, 0x44);
  CK_GCM_PARAMS too_big{iv, sizeof iv, 96, huge.data(), huge.size(), 128};
  CHECK(copy.assign(mechanism_of(CKM_AES_GCM, too_big)) == CopyResult::too_large);
  CHECK(copy.empty());
  CK_GCM_PARAMS at_limit{iv, sizeof iv, 96, huge.data(), MechanismCopy::kMaxBytes - sizeof iv, 128};
  CHECK(copy.assign(mechanism_of(CKM_AES_GCM, at_limit)) == CopyResult::ok);
}

TEST_CASE("a session's records stay within 1 KiB (docs/groups.md, the mechanism copy)") {
  MESSAGE("sizeof(MechanismCopy) = " << sizeof(MechanismCopy) << ", sizeof(SessionOperations) = "
                                     << sizeof(SessionOperations));
  CHECK(sizeof(SessionOperations) <= 1024);
}

// ---- phases ----

constexpr CK_SESSION_HANDLE kSession = 3;
constexpr CK_OBJECT_HANDLE kVirtualKey = 0x1001;
CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
unsigned char data[32] = {};
unsigned char out[256] = {};
CK_ULONG out_len = sizeof out;

TEST_CASE("a single-part call: replayable until it ends") {
  SessionOperations s;
  OperationRecord& sign = s.of(op::sign);
  CHECK(sign.phase() == Phase::finished);
  CHECK_FALSE(sign.replayable());

  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  CHECK(sign.phase() == Phase::initialized);
  CHECK(sign.replayable());
  CHECK(sign.kind() == op::sign);
  CHECK(sign.key() == kVirtualKey);

  // A length query (NULL signature) keeps the operation, and so does a short buffer.
  s.after<fn::C_Sign>(CKR_OK, kSession, data, CK_ULONG{32}, nullptr, &out_len);
  CHECK(sign.replayable());
  s.after<fn::C_Sign>(CKR_BUFFER_TOO_SMALL, kSession, data, CK_ULONG{32}, out, &out_len);
  CHECK(sign.replayable());
  // The member failed during the call: the runtime does not report that
  // call, so the record stays replayable.
  CHECK(sign.replayable());

  s.after<fn::C_Sign>(CKR_OK, kSession, data, CK_ULONG{32}, out, &out_len);
  CHECK(sign.phase() == Phase::finished);
  CHECK_FALSE(sign.replayable());
  CHECK(sign.mechanism().empty());
}

TEST_CASE("an error the member gave ends the operation") {
  SessionOperations s;
  s.after<fn::C_DecryptInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_Decrypt>(CKR_ENCRYPTED_DATA_INVALID, kSession, data, CK_ULONG{32}, out, &out_len);
  CHECK(s.of(op::decrypt).phase() == Phase::finished);
}

TEST_CASE("multi-part: not replayable once an Update ran") {
  SessionOperations s;
  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_SignUpdate>(CKR_OK, kSession, data, CK_ULONG{32});
  OperationRecord& sign = s.of(op::sign);
  CHECK(sign.phase() == Phase::updated);
  CHECK_FALSE(sign.replayable());
  // A length query of the Final keeps it, still not replayable.
  s.after<fn::C_SignFinal>(CKR_OK, kSession, nullptr, &out_len);
  CHECK(sign.phase() == Phase::updated);
  s.after<fn::C_SignFinal>(CKR_OK, kSession, out, &out_len);
  CHECK(sign.phase() == Phase::finished);

  // A failed Update ends it.
  s.after<fn::C_VerifyInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_VerifyUpdate>(CKR_DATA_LEN_RANGE, kSession, data, CK_ULONG{32});
  CHECK(s.of(op::verify).phase() == Phase::finished);

  // C_DigestKey continues a digest: multi-part.
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  s.after<fn::C_DigestInit>(CKR_OK, kSession, &sha);
  CHECK(s.of(op::digest).replayable());
  CHECK(s.of(op::digest).key() == CK_INVALID_HANDLE);
  s.after<fn::C_DigestKey>(CKR_OK, kSession, kVirtualKey);
  CHECK(s.of(op::digest).phase() == Phase::updated);

  // A dual-function update continues both its operations.
  s.after<fn::C_EncryptInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_DigestEncryptUpdate>(CKR_OK, kSession, data, CK_ULONG{32}, out, &out_len);
  CHECK(s.of(op::encrypt).phase() == Phase::updated);
  CHECK(s.of(op::digest).phase() == Phase::updated);
}

TEST_CASE("the record follows Init, cancel and restore") {
  SessionOperations s;
  // A failed Init changes nothing.
  s.after<fn::C_SignInit>(CKR_KEY_HANDLE_INVALID, kSession, &ecdsa, kVirtualKey);
  CHECK(s.of(op::sign).phase() == Phase::finished);
  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_SignInit>(CKR_OPERATION_ACTIVE, kSession, &ecdsa, kVirtualKey + 1);
  CHECK(s.of(op::sign).key() == kVirtualKey);
  // v3.0: a NULL mechanism cancels.
  s.after<fn::C_SignInit>(CKR_OK, kSession, static_cast<CK_MECHANISM*>(nullptr), kVirtualKey);
  CHECK(s.of(op::sign).phase() == Phase::finished);

  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_VerifyInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_SessionCancel>(CKR_OK, kSession, CK_FLAGS{CKF_SIGN});
  CHECK(s.of(op::sign).phase() == Phase::finished);
  CHECK(s.of(op::verify).replayable());

  // A restored state is opaque.
  s.after<fn::C_SetOperationState>(CKR_OK, kSession, out, CK_ULONG{16}, CK_OBJECT_HANDLE{0},
                                   CK_OBJECT_HANDLE{0});
  for (OpMask k : {op::encrypt, op::decrypt, op::digest, op::sign, op::verify, op::sign_recover,
                   op::verify_recover}) {
    CHECK(s.of(k).phase() == Phase::updated);
    CHECK_FALSE(s.of(k).replayable());
  }
}

TEST_CASE("message-based operations are not recorded") {
  SessionOperations s;
  s.after<fn::C_MessageSignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_MessageEncryptInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  for (OpMask k : {op::encrypt, op::sign}) CHECK(s.of(k).phase() == Phase::finished);
}

TEST_CASE("an unknown mechanism: active, not replayable, and lost with CKR_DEVICE_ERROR") {
  SessionOperations s;
  CK_MECHANISM vendor{CKM_VENDOR_DEFINED | 7, nullptr, 0};
  s.after<fn::C_SignInit>(CKR_OK, kSession, &vendor, kVirtualKey);
  OperationRecord& sign = s.of(op::sign);
  CHECK(sign.phase() == Phase::initialized);
  CHECK(sign.copy_result() == CopyResult::unknown_mechanism);
  CHECK_FALSE(sign.replayable());
  sign.end();
  CHECK(kOperationLostRv == CKR_DEVICE_ERROR);
  CHECK(sign.phase() == Phase::finished);
  CHECK(sign.copy_result() == CopyResult::ok);
}

TEST_CASE("sign-recover and verify-recover are single-part, and replayable") {
  SessionOperations s;
  CK_MECHANISM rsa{CKM_RSA_PKCS, nullptr, 0};
  s.after<fn::C_SignRecoverInit>(CKR_OK, kSession, &rsa, kVirtualKey);
  s.after<fn::C_VerifyRecoverInit>(CKR_OK, kSession, &rsa, kVirtualKey);
  CHECK(s.of(op::sign_recover).replayable());
  CHECK(s.of(op::verify_recover).replayable());
  s.after<fn::C_SignRecover>(CKR_OK, kSession, data, CK_ULONG{32}, out, &out_len);
  CHECK(s.of(op::sign_recover).phase() == Phase::finished);
}

// ---- replay on a second member ----

// What the second member's Init was given.
struct Seen {
  int calls = 0;
  const char* function = "";
  CK_SESSION_HANDLE session = 0;
  CK_MECHANISM_TYPE mechanism = 0;
  std::vector<unsigned char> parameter;  // the struct's bytes
  std::vector<unsigned char> iv, aad;    // GCM's byte strings
  CK_OBJECT_HANDLE key = 0;
  CK_RV answer = CKR_OK;
};
Seen seen;

CK_RV record_init(const char* function, CK_SESSION_HANDLE s, CK_MECHANISM_PTR m,
                  CK_OBJECT_HANDLE key) {
  ++seen.calls;
  seen.function = function;
  seen.session = s;
  seen.mechanism = m->mechanism;
  seen.parameter = bytes_of(m->pParameter, m->ulParameterLen);
  if (m->mechanism == CKM_AES_GCM && m->ulParameterLen == sizeof(CK_GCM_PARAMS)) {
    const auto* p = static_cast<const CK_GCM_PARAMS*>(m->pParameter);
    seen.iv = bytes_of(p->pIv, p->ulIvLen);
    seen.aad = bytes_of(p->pAAD, p->ulAADLen);
  }
  seen.key = key;
  return seen.answer;
}

#define P11MUX_FAKE_INIT(name)                                                     \
  CK_RV fake_##name(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) { \
    return record_init(#name, s, m, k);                                            \
  }
P11MUX_FAKE_INIT(C_EncryptInit)
P11MUX_FAKE_INIT(C_DecryptInit)
P11MUX_FAKE_INIT(C_SignInit)
P11MUX_FAKE_INIT(C_VerifyInit)
P11MUX_FAKE_INIT(C_SignRecoverInit)
P11MUX_FAKE_INIT(C_VerifyRecoverInit)
#undef P11MUX_FAKE_INIT
CK_RV fake_C_DigestInit(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m) {
  return record_init("C_DigestInit", s, m, CK_INVALID_HANDLE);
}

CK_FUNCTION_LIST_3_0 second_member() {
  CK_FUNCTION_LIST_3_0 t{};
  t.version = {2, 40};
  t.C_EncryptInit = &fake_C_EncryptInit;
  t.C_DecryptInit = &fake_C_DecryptInit;
  t.C_SignInit = &fake_C_SignInit;
  t.C_VerifyInit = &fake_C_VerifyInit;
  t.C_SignRecoverInit = &fake_C_SignRecoverInit;
  t.C_VerifyRecoverInit = &fake_C_VerifyRecoverInit;
  t.C_DigestInit = &fake_C_DigestInit;
  return t;
}

constexpr CK_SESSION_HANDLE kMemberSession = 77;
constexpr CK_OBJECT_HANDLE kMemberKey = 0x55;

struct Resolver {
  int calls = 0;
  CK_OBJECT_HANDLE asked = 0;
  CK_RV answer = CKR_OK;
  CK_RV operator()(CK_OBJECT_HANDLE virtual_key, CK_OBJECT_HANDLE& member_key) {
    ++calls;
    asked = virtual_key;
    member_key = kMemberKey;
    return answer;
  }
};

TEST_CASE("replay: the second member gets the same mechanism bytes and its own key") {
  seen = {};
  const LockSource none{};
  BackendPort member(second_member(), /*thread_safe=*/true, none);
  SessionOperations s;
  std::vector<unsigned char> iv = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  std::vector<unsigned char> aad = {0xde, 0xad, 0xbe, 0xef};
  {
    // The application's parameter lives only for its Init.
    CK_GCM_PARAMS gcm{iv.data(), iv.size(), 96, aad.data(), aad.size(), 128};
    CK_MECHANISM m{CKM_AES_GCM, &gcm, sizeof gcm};
    s.after<fn::C_EncryptInit>(CKR_OK, kSession, &m, kVirtualKey);
  }
  OperationRecord& encrypt = s.of(op::encrypt);
  REQUIRE(encrypt.replayable());
  Resolver resolve;
  CHECK(replay_init(encrypt, member, kMemberSession, resolve) == CKR_OK);
  CHECK(resolve.calls == 1);
  CHECK(resolve.asked == kVirtualKey);
  CHECK(seen.calls == 1);
  CHECK(std::string_view(seen.function) == "C_EncryptInit");
  CHECK(seen.session == kMemberSession);
  CHECK(seen.key == kMemberKey);
  CHECK(seen.mechanism == CKM_AES_GCM);
  CHECK(seen.iv == iv);
  CHECK(seen.aad == aad);
  REQUIRE(seen.parameter.size() == sizeof(CK_GCM_PARAMS));
  CK_GCM_PARAMS got;
  std::memcpy(&got, seen.parameter.data(), sizeof got);
  CHECK(got.ulIvBits == 96);
  CHECK(got.ulTagBits == 128);
  // Still replayable: the runtime re-issues the call, which then ends it.
  CHECK(encrypt.replayable());
}

TEST_CASE("replay: each kind runs its own Init; a digest resolves no key") {
  const LockSource none{};
  BackendPort member(second_member(), /*thread_safe=*/true, none);
  CK_MECHANISM rsa{CKM_RSA_PKCS, nullptr, 0};
  struct Case {
    OpMask kind;
    const char* init;
  };
  for (Case c : {Case{op::encrypt, "C_EncryptInit"}, Case{op::decrypt, "C_DecryptInit"},
                 Case{op::sign, "C_SignInit"}, Case{op::verify, "C_VerifyInit"},
                 Case{op::sign_recover, "C_SignRecoverInit"},
                 Case{op::verify_recover, "C_VerifyRecoverInit"}}) {
    CAPTURE(c.init);
    seen = {};
    OperationRecord r;
    r.started(c.kind, rsa, kVirtualKey);
    Resolver resolve;
    CHECK(replay_init(r, member, kMemberSession, resolve) == CKR_OK);
    CHECK(std::string_view(seen.function) == c.init);
    CHECK(seen.key == kMemberKey);
    CHECK(seen.parameter.empty());
  }
  seen = {};
  SessionOperations s;
  CK_MECHANISM sha{CKM_SHA384, nullptr, 0};
  s.after<fn::C_DigestInit>(CKR_OK, kSession, &sha);
  Resolver resolve;
  CHECK(replay_init(s.of(op::digest), member, kMemberSession, resolve) == CKR_OK);
  CHECK(resolve.calls == 0);
  CHECK(std::string_view(seen.function) == "C_DigestInit");
  CHECK(seen.mechanism == CKM_SHA384);
}

TEST_CASE("replay refuses what it cannot replay, and passes failures on") {
  const LockSource none{};
  BackendPort member(second_member(), /*thread_safe=*/true, none);
  seen = {};
  Resolver resolve;

  // Unknown layout: no call at all.
  SessionOperations s;
  unsigned char iv[15] = {};  // AES CBC takes 16
  CK_MECHANISM odd{CKM_AES_CBC, iv, sizeof iv};
  s.after<fn::C_DecryptInit>(CKR_OK, kSession, &odd, kVirtualKey);
  CHECK(s.of(op::decrypt).copy_result() == CopyResult::bad_parameter);
  CHECK(replay_init(s.of(op::decrypt), member, kMemberSession, resolve) == CKR_DEVICE_ERROR);
  // Multi-part: no call at all.
  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  s.after<fn::C_SignUpdate>(CKR_OK, kSession, data, CK_ULONG{32});
  CHECK(replay_init(s.of(op::sign), member, kMemberSession, resolve) == CKR_DEVICE_ERROR);
  // No operation: no call.
  CHECK(replay_init(s.of(op::verify), member, kMemberSession, resolve) == CKR_DEVICE_ERROR);
  CHECK(seen.calls == 0);
  CHECK(resolve.calls == 0);

  // The key is not found on that member: its answer, and no Init.
  s.after<fn::C_VerifyInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  resolve.answer = CKR_KEY_HANDLE_INVALID;
  CHECK(replay_init(s.of(op::verify), member, kMemberSession, resolve) == CKR_KEY_HANDLE_INVALID);
  CHECK(seen.calls == 0);
  // The member refuses the Init: its answer; the record stays replayable
  // (the runtime may try a third member, or count it lost: replayed()).
  resolve.answer = CKR_OK;
  seen.answer = CKR_DEVICE_REMOVED;
  CHECK(replay_init(s.of(op::verify), member, kMemberSession, resolve) == CKR_DEVICE_REMOVED);
  CHECK(seen.calls == 1);
  CHECK(s.of(op::verify).replayable());
  s.replayed(op::verify, false);
  CHECK(s.take_lost(op::verify));
  CHECK_FALSE(s.of(op::verify).replayable());
}

TEST_CASE("a move: replayable operations pending, the others lost and told once") {
  SessionOperations s;
  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);  // replayable
  s.after<fn::C_DigestInit>(CKR_OK, kSession, &ecdsa);
  s.after<fn::C_DigestUpdate>(CKR_OK, kSession, data, CK_ULONG{32});  // took data
  s.moved(4);
  CHECK(s.pending() == op::sign);
  CHECK(s.replayed_from() == 4);
  CHECK(s.of(op::digest).phase() == Phase::finished);
  // The digest's loss is told to the first call continuing a digest, once.
  CHECK_FALSE(s.take_lost(op::sign));
  CHECK(s.take_lost(op::digest));
  CHECK_FALSE(s.take_lost(op::digest));
  // A replay that ran keeps the operation; one that failed loses it.
  s.replayed(op::sign, true);
  CHECK(s.pending() == 0);
  CHECK(s.of(op::sign).replayable());
  s.moved(5);
  s.replayed(op::sign, false);
  CHECK_FALSE(s.of(op::sign).replayable());
  // A new Init of a lost kind is a fresh operation: nothing to tell.
  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  CHECK_FALSE(s.take_lost(op::sign));
  // reset() forgets everything.
  s.moved(6);
  s.reset();
  CHECK(s.pending() == 0);
  CHECK(s.of(op::sign).phase() == Phase::finished);
}

TEST_CASE("marked(): set by whatever a call must look at before it runs, and only by that") {
  // restore_operations tests marked() alone on every call (replay_calls.hpp).
  SessionOperations s;
  CHECK_FALSE(s.marked());
  s.after<fn::C_SignInit>(CKR_OK, kSession, &ecdsa, kVirtualKey);
  CHECK_FALSE(s.marked());  // an operation recorded is not a mark
  s.moved(1);               // pending
  CHECK(s.marked());
  s.replayed(op::sign, true);  // replayed
  CHECK(s.marked());
  s.settled(op::sign);
  CHECK_FALSE(s.marked());
  s.after<fn::C_DigestInit>(CKR_OK, kSession, &ecdsa);
  s.after<fn::C_DigestUpdate>(CKR_OK, kSession, data, CK_ULONG{32});
  s.moved(2);  // the sign pending, the digest lost
  s.drop_pending(op::sign);
  CHECK(s.marked());
  CHECK(s.take_lost(op::digest));
  CHECK_FALSE(s.marked());
  s.member_interrupted();
  CHECK(s.marked());
  CHECK(s.take_interruption() == SessionOperations::Interruption::interrupted);
  CHECK_FALSE(s.marked());
  s.member_unreached();
  CHECK(s.marked());
  s.reset();
  CHECK_FALSE(s.marked());
}

TEST_CASE("output lengths: restored for a call made again, the NULL ones left alone") {
  CK_ULONG given = 64;
  OutputLengths<fn::C_Sign, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR> saved(
      data, CK_ULONG{32}, out, &given);
  given = 7;  // a member that failed wrote it
  saved.restore(data, CK_ULONG{32}, out, &given);
  CHECK(given == 64);
  // Another function's output, and a NULL length pointer left alone.
  CK_ULONG state_len = 9;
  OutputLengths<fn::C_GetOperationState, CK_BYTE_PTR, CK_ULONG_PTR> state(out, &state_len);
  state_len = 1;
  state.restore(out, &state_len);
  CHECK(state_len == 9);
  OutputLengths<fn::C_GetOperationState, CK_BYTE_PTR, CK_ULONG_PTR> none(out, nullptr);
  none.restore(out, nullptr);
}

}  // namespace
}  // namespace p11mux
