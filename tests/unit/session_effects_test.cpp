// Which key handles a key-making call returns, by mechanism
// (key_mechanisms.hpp), and what p11mux notes on a binding after a call
// (session_effects.hpp): the handles a derivation returns inside its
// mechanism parameter (NSS softoken's TLS key-and-MAC derive, with phKey
// NULL: docs/pkcs11-facts.md), deny by default for mechanisms p11mux does not
// know, and a destroyed handle forgotten so that a reused number is never
// destroyed again. No backend call: find_created's CKA_TOKEN queries are
// left to the module tests.
#include "forward/session_effects.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace p11mux {
namespace {

bool has(const ReturnedKeys& keys, CK_OBJECT_HANDLE h) {
  return std::find(keys.handles, keys.handles + keys.count, h) != keys.handles + keys.count;
}

template <class Params>
CK_MECHANISM mechanism_with(CK_MECHANISM_TYPE type, Params& params) {
  return {type, &params, sizeof params};
}

TEST_CASE("only key- and object-making calls look for created objects") {
  static_assert(std::is_same_v<CreatedBy<fn::C_DeriveKey>, CreatedObjects>);
  static_assert(std::is_same_v<CreatedBy<fn::C_UnwrapKey>, CreatedObjects>);
  static_assert(std::is_same_v<CreatedBy<fn::C_GenerateKey>, CreatedObjects>);
  static_assert(std::is_same_v<CreatedBy<fn::C_GenerateKeyPair>, CreatedObjects>);
  static_assert(std::is_same_v<CreatedBy<fn::C_CreateObject>, CreatedObjects>);
  static_assert(std::is_same_v<CreatedBy<fn::C_CopyObject>, CreatedObjects>);
  static_assert(std::is_same_v<CreatedBy<fn::C_Encrypt>, NothingCreated>);
  static_assert(std::is_same_v<CreatedBy<fn::C_DestroyObject>, NothingCreated>);
  CHECK(true);
}

TEST_CASE("a derivation p11mux does not know is denied, not guessed") {
  CK_MECHANISM vendor{CKM_VENDOR_DEFINED | 0x42, nullptr, 0};
  CHECK_FALSE(key_outputs<fn::C_DeriveKey>(&vendor).has_value());
  CK_MECHANISM x3dh{0x4031 /* CKM_X3DH_RESPOND, v3.0 */, nullptr, 0};
  CHECK_FALSE(key_outputs<fn::C_DeriveKey>(&x3dh).has_value());
  CHECK_FALSE(key_outputs<fn::C_DeriveKey>(nullptr).has_value());
  // A key-generating mechanism is no derivation.
  CK_MECHANISM aes_gen{CKM_AES_KEY_GEN, nullptr, 0};
  CHECK_FALSE(key_outputs<fn::C_DeriveKey>(&aes_gen).has_value());
  CK_MECHANISM ecdh{CKM_ECDH1_DERIVE, nullptr, 0};
  CHECK(key_outputs<fn::C_DeriveKey>(&ecdh) == KeyOutputs::handle_args);
}

TEST_CASE(
    "unwrap and generate: standard mechanisms return keys in phKey only, vendor ones are unknown") {
  CK_MECHANISM aes_gen{CKM_AES_KEY_GEN, nullptr, 0};
  CHECK(key_outputs<fn::C_GenerateKey>(&aes_gen) == KeyOutputs::handle_args);
  CK_MECHANISM rsa_pair{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
  CHECK(key_outputs<fn::C_GenerateKeyPair>(&rsa_pair) == KeyOutputs::handle_args);
  CK_MECHANISM vendor{CKM_VENDOR_DEFINED + 1, nullptr, 0};
  CHECK_FALSE(key_outputs<fn::C_UnwrapKey>(&vendor).has_value());
  CHECK_FALSE(key_outputs<fn::C_GenerateKey>(&vendor).has_value());
  CHECK_FALSE(key_outputs<fn::C_GenerateKeyPair>(nullptr).has_value());
}

TEST_CASE("the derivation table names each mechanism once") {
  for (std::size_t i = 0; i < std::size(kDeriveMechanisms); ++i) {
    for (std::size_t j = i + 1; j < std::size(kDeriveMechanisms); ++j) {
      CAPTURE(kDeriveMechanisms[i].type);
      CHECK(kDeriveMechanisms[i].type != kDeriveMechanisms[j].type);
    }
  }
}

TEST_CASE("spec bender: TLS key-and-MAC derive returns four keys inside its parameter") {
  // NSS softoken: phKey NULL, the keys in CK_SSL3_KEY_MAT_OUT. Trusting
  // phKey alone would leave four session keys in a pooled backend session.
  for (CK_MECHANISM_TYPE type : {CKM_SSL3_KEY_AND_MAC_DERIVE, CKM_TLS_KEY_AND_MAC_DERIVE}) {
    CAPTURE(type);
    CK_SSL3_KEY_MAT_OUT returned{11, 12, 13, 14, nullptr, nullptr};
    CK_SSL3_KEY_MAT_PARAMS params{};
    params.ulMacSizeInBits = 160;
    params.ulKeySizeInBits = 128;
    params.pReturnedKeyMaterial = &returned;
    CK_MECHANISM m = mechanism_with(type, params);
    std::optional<KeyOutputs> outputs = key_outputs<fn::C_DeriveKey>(&m);
    REQUIRE(outputs == KeyOutputs::ssl3_key_mat);
    ReturnedKeys keys;
    CHECK(add_parameter_keys(*outputs, m, keys));
    CHECK(keys.complete);
    REQUIRE(keys.count == 4);
    for (CK_OBJECT_HANDLE h : {11, 12, 13, 14}) CHECK(has(keys, h));
  }
}

TEST_CASE("key-and-MAC derive: sizes of 0 mean no such keys, whatever the fields hold") {
  // The application's leftovers (here, numbers of its own objects) must not
  // become "session objects to destroy".
  CK_SSL3_KEY_MAT_OUT returned{21, 22, 777, 778, nullptr, nullptr};
  CK_TLS12_KEY_MAT_PARAMS params{};
  params.ulMacSizeInBits = 256;
  params.ulKeySizeInBits = 0;  // a NULL cipher: MAC keys only
  params.pReturnedKeyMaterial = &returned;
  params.prfHashMechanism = CKM_SHA256;
  CK_MECHANISM m = mechanism_with(CKM_TLS12_KEY_AND_MAC_DERIVE, params);
  REQUIRE(key_outputs<fn::C_DeriveKey>(&m) == KeyOutputs::tls12_key_mat);
  ReturnedKeys keys;
  CHECK(add_parameter_keys(KeyOutputs::tls12_key_mat, m, keys));
  CHECK(keys.count == 2);
  CHECK(has(keys, 21));
  CHECK(has(keys, 22));
  CHECK_FALSE(has(keys, 777));

  params.ulMacSizeInBits = 0;
  params.ulKeySizeInBits = 128;
  returned = {555, 556, 31, 32, nullptr, nullptr};
  ReturnedKeys keys2;
  CHECK(add_parameter_keys(KeyOutputs::tls12_key_mat, m, keys2));
  CHECK(keys2.count == 2);
  CHECK(has(keys2, 31));
  CHECK(has(keys2, 32));
}

TEST_CASE("WTLS key-and-MAC derive returns its keys in CK_WTLS_KEY_MAT_OUT") {
  CK_WTLS_KEY_MAT_OUT returned{41, 42, nullptr};
  CK_WTLS_KEY_MAT_PARAMS params{};
  params.DigestMechanism = CKM_SHA_1;
  params.ulMacSizeInBits = 160;
  params.ulKeySizeInBits = 128;
  params.pReturnedKeyMaterial = &returned;
  for (CK_MECHANISM_TYPE type :
       {CKM_WTLS_SERVER_KEY_AND_MAC_DERIVE, CKM_WTLS_CLIENT_KEY_AND_MAC_DERIVE}) {
    CAPTURE(type);
    CK_MECHANISM m = mechanism_with(type, params);
    std::optional<KeyOutputs> outputs = key_outputs<fn::C_DeriveKey>(&m);
    REQUIRE(outputs == KeyOutputs::wtls_key_mat);
    ReturnedKeys keys;
    CHECK(add_parameter_keys(*outputs, m, keys));
    CHECK(keys.count == 2);
    CHECK(has(keys, 41));
    CHECK(has(keys, 42));
  }
}

TEST_CASE("SP 800-108 KDFs return their additional keys through pAdditionalDerivedKeys") {
  CK_OBJECT_HANDLE k1 = 51, k2 = 52;
  CK_DERIVED_KEY extra[3] = {{nullptr, 0, &k1}, {nullptr, 0, nullptr}, {nullptr, 0, &k2}};
  CK_SP800_108_KDF_PARAMS counter{};
  counter.prfType = CKM_SHA256_HMAC;
  counter.ulAdditionalDerivedKeys = 3;
  counter.pAdditionalDerivedKeys = extra;
  for (CK_MECHANISM_TYPE type : {kCkmSp800108CounterKdf, kCkmSp800108DoublePipelineKdf}) {
    CAPTURE(type);
    CK_MECHANISM m = mechanism_with(type, counter);
    std::optional<KeyOutputs> outputs = key_outputs<fn::C_DeriveKey>(&m);
    REQUIRE(outputs == KeyOutputs::sp800_108);
    ReturnedKeys keys;
    keys.add(50);  // phKey
    CHECK(add_parameter_keys(*outputs, m, keys));
    CHECK(keys.complete);
    CHECK(keys.count == 3);
    CHECK(has(keys, 51));
    CHECK(has(keys, 52));
  }
  // The feedback KDF's parameter has another layout (pIV before the keys).
  CK_SP800_108_FEEDBACK_KDF_PARAMS feedback{};
  feedback.prfType = CKM_SHA256_HMAC;
  CK_BYTE iv[16] = {};
  feedback.ulIVLen = sizeof iv;
  feedback.pIV = iv;
  feedback.ulAdditionalDerivedKeys = 3;
  feedback.pAdditionalDerivedKeys = extra;
  CK_MECHANISM m = mechanism_with(kCkmSp800108FeedbackKdf, feedback);
  REQUIRE(key_outputs<fn::C_DeriveKey>(&m) == KeyOutputs::sp800_108_feedback);
  ReturnedKeys keys;
  CHECK(add_parameter_keys(KeyOutputs::sp800_108_feedback, m, keys));
  CHECK(keys.count == 2);
  CHECK(has(keys, 51));
  CHECK(has(keys, 52));
}

TEST_CASE("phKey holds a new key, except for the key-and-MAC derivations, which never write it") {
  // An ordinary derivation, generation or unwrap: phKey is the key made.
  ReturnedKeys args;
  args.add(70);
  ReturnedKeys keys;
  CHECK(add_argument_keys(KeyOutputs::handle_args, args, keys));
  CHECK(keys.count == 1);
  CHECK(has(keys, 70));
  // SP 800-108: phKey and the additional keys both.
  ReturnedKeys kdf;
  kdf.add(51);
  CHECK(add_argument_keys(KeyOutputs::sp800_108, args, kdf));
  CHECK(kdf.count == 2);

  // Key-and-MAC: the four keys are in the parameter, and phKey still holds
  // what the application left there (here, the handle of one of its own
  // objects, say from another session). Taken for a new key, that object
  // would be destroyed when this session is reset for the pool.
  for (KeyOutputs outputs :
       {KeyOutputs::ssl3_key_mat, KeyOutputs::tls12_key_mat, KeyOutputs::wtls_key_mat}) {
    ReturnedKeys from_parameter;
    for (CK_OBJECT_HANDLE h : {11, 12, 13, 14}) from_parameter.add(h);
    ReturnedKeys leftover;
    leftover.add(70);
    CHECK_FALSE(add_argument_keys(outputs, leftover, from_parameter));  // not provably clean
    CHECK_FALSE(has(from_parameter, 70));                               // and never destroyed
    CHECK(from_parameter.count == 4);
    // One of the parameter's own keys, or nothing (NULL or CK_INVALID_HANDLE): fine.
    ReturnedKeys same;
    same.add(12);
    CHECK(add_argument_keys(outputs, same, from_parameter));
    CHECK(add_argument_keys(outputs, ReturnedKeys{}, from_parameter));
    CHECK(from_parameter.count == 4);
  }
}

TEST_CASE("a parameter p11mux cannot read, or too many keys, is not provably clean") {
  CK_SSL3_KEY_MAT_PARAMS params{};
  params.ulKeySizeInBits = 128;
  // No pReturnedKeyMaterial: where did the keys go?
  CK_MECHANISM m = mechanism_with(CKM_TLS_KEY_AND_MAC_DERIVE, params);
  ReturnedKeys keys;
  CHECK_FALSE(add_parameter_keys(KeyOutputs::ssl3_key_mat, m, keys));
  // A parameter shorter than the structure: never read past it.
  CK_SSL3_KEY_MAT_OUT returned{1, 2, 3, 4, nullptr, nullptr};
  params.pReturnedKeyMaterial = &returned;
  m.ulParameterLen = sizeof params - 1;
  CHECK_FALSE(add_parameter_keys(KeyOutputs::ssl3_key_mat, m, keys));
  m.pParameter = nullptr;
  m.ulParameterLen = 0;
  CHECK_FALSE(add_parameter_keys(KeyOutputs::wtls_key_mat, m, keys));
  CHECK_FALSE(add_parameter_keys(KeyOutputs::sp800_108, m, keys));
  CHECK(keys.count == 0);

  // Additional keys announced, no array.
  CK_SP800_108_KDF_PARAMS kdf{};
  kdf.ulAdditionalDerivedKeys = 1;
  CK_MECHANISM k = mechanism_with(kCkmSp800108CounterKdf, kdf);
  CHECK_FALSE(add_parameter_keys(KeyOutputs::sp800_108, k, keys));
  // More than p11mux follows: incomplete, and none read.
  std::vector<CK_OBJECT_HANDLE> many(kMaxReturnedKeys + 1, 60);
  std::vector<CK_DERIVED_KEY> derived(many.size());
  for (std::size_t i = 0; i < many.size(); ++i) derived[i].phKey = &many[i];
  kdf.ulAdditionalDerivedKeys = static_cast<CK_ULONG>(derived.size());
  kdf.pAdditionalDerivedKeys = derived.data();
  ReturnedKeys too_many;
  CHECK(add_parameter_keys(KeyOutputs::sp800_108, k, too_many));
  CHECK_FALSE(too_many.complete);

  // handle_args mechanisms have nothing in their parameter.
  CHECK(add_parameter_keys(KeyOutputs::handle_args, m, keys));
}

TEST_CASE("returned keys: invalid handles are skipped, one too many is incomplete") {
  ReturnedKeys keys;
  keys.add(CK_INVALID_HANDLE);
  CHECK(keys.count == 0);
  for (CK_OBJECT_HANDLE h = 1; h <= kMaxReturnedKeys; ++h) keys.add(h);
  CHECK(keys.complete);
  CHECK(keys.count == kMaxReturnedKeys);
  keys.add(kMaxReturnedKeys + 1);
  CHECK_FALSE(keys.complete);
  CHECK(keys.count == kMaxReturnedKeys);
}

TEST_CASE("a destroyed object is forgotten: a reused handle number is never destroyed again") {
  // SoftHSM2 reuses object handle numbers (docs/pkcs11-facts.md).
  Binding b;
  b.objects = {7, 8, 7};
  forget_object(b, 7);
  CHECK(b.objects == std::vector<CK_OBJECT_HANDLE>{8});
  forget_object(b, 99);
  CHECK(b.objects == std::vector<CK_OBJECT_HANDLE>{8});
}

TEST_CASE("unclean: the first reason is the one kept") {
  Binding b;
  mark_unclean(b, CloseReason::unknown_mechanism);
  mark_unclean(b, CloseReason::object_untracked);
  CHECK(b.discard);
  CHECK(b.why == CloseReason::unknown_mechanism);
  CreatedObjects created;
  created.deny(CloseReason::object_untracked);
  created.deny(CloseReason::unknown_mechanism);
  CHECK(created.unclean);
  CHECK(created.why == CloseReason::object_untracked);
}

TEST_CASE("the errors that mean the backend session or its device is gone") {
  for (CK_RV rv : {CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED, CKR_DEVICE_REMOVED,
                   CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_ERROR}) {
    CAPTURE(rv);
    CHECK(session_gone(rv));
  }
  for (CK_RV rv : {CKR_OK, CKR_FUNCTION_FAILED, CKR_OPERATION_ACTIVE, CKR_BUFFER_TOO_SMALL,
                   CKR_OBJECT_HANDLE_INVALID, CKR_USER_NOT_LOGGED_IN}) {
    CAPTURE(rv);
    CHECK_FALSE(session_gone(rv));
  }
}

}  // namespace
}  // namespace p11mux
