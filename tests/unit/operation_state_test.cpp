// What each call does to a backend session's operations (operation_state.hpp):
// `ops`, what the spec says is active, and `maybe`, what an error may have
// left active on a backend that bends the spec (docs/pkcs11-facts.md,
// "Operations" and "Backends that bend the specification"). No backend: the
// rules are pure functions of the call, its arguments and its return value.
#include "forward/operation_state.hpp"

#include <doctest/doctest.h>

#include <string_view>

namespace p11mux {
namespace {

constexpr CK_SESSION_HANDLE kSession = 5;

struct State {
  OpMask ops = 0;
  OpMask maybe = 0;
};

// Both masks after a call, as session_effects.hpp's record_call computes them.
template <class F, class... A>
State after(State s, CK_RV rv, A... a) {
  return {ops_after<F>(s.ops, rv, kSession, a...),
          maybe_after<F>(s.ops, s.maybe, rv, kSession, a...)};
}

CK_BYTE in[16] = {};
CK_BYTE out[16] = {};
CK_ULONG out_len = sizeof out;
CK_MECHANISM mechanism{CKM_AES_CBC, nullptr, 0};
constexpr CK_OBJECT_HANDLE kKey = 9;

TEST_CASE("a successful Init starts an operation; a failed one changes nothing") {
  State s = after<fn::C_EncryptInit>({}, CKR_OK, &mechanism, kKey);
  CHECK(s.ops == op::encrypt);
  CHECK(s.maybe == 0);
  s = after<fn::C_SignInit>(s, CKR_KEY_HANDLE_INVALID, &mechanism, kKey);
  CHECK(s.ops == op::encrypt);
  CHECK(s.maybe == 0);
  // CKR_OPERATION_ACTIVE: the one already running goes on.
  s = after<fn::C_EncryptInit>(s, CKR_OPERATION_ACTIVE, &mechanism, kKey);
  CHECK(s.ops == op::encrypt);
}

TEST_CASE("v3.0: an Init with a NULL mechanism cancels; a NULL find template does not") {
  State s{op::decrypt | op::sign, 0};
  s = after<fn::C_DecryptInit>(s, CKR_OK, CK_MECHANISM_PTR{nullptr}, kKey);
  CHECK(s.ops == op::sign);
  s = after<fn::C_MessageSignInit>({op::message_sign, op::message_sign}, CKR_OK,
                                   CK_MECHANISM_PTR{nullptr}, kKey);
  CHECK(s.ops == 0);
  CHECK(s.maybe == 0);
  // "Find every object": a search starts.
  s = after<fn::C_FindObjectsInit>({}, CKR_OK, CK_ATTRIBUTE_PTR{nullptr}, CK_ULONG{0});
  CHECK(s.ops == op::find);
}

TEST_CASE("an update continues its operation; CKR_BUFFER_TOO_SMALL keeps it") {
  const State active{op::encrypt, 0};
  State s = after<fn::C_EncryptUpdate>(active, CKR_OK, in, CK_ULONG{16}, out, &out_len);
  CHECK(s.ops == op::encrypt);
  CHECK(s.maybe == 0);
  s = after<fn::C_EncryptUpdate>(active, CKR_BUFFER_TOO_SMALL, in, CK_ULONG{16}, out, &out_len);
  CHECK(s.ops == op::encrypt);
  CHECK(s.maybe == 0);
}

TEST_CASE("spec bender: after a failed update the operation may still be active") {
  // SoftHSM2 keeps a digest active after C_DigestKey fails with
  // CKR_KEY_HANDLE_INVALID (docs/pkcs11-facts.md). The spec says it ended:
  // calls are no longer routed by it, but the session is not clean either.
  State s = after<fn::C_DigestKey>({op::digest, 0}, CKR_KEY_HANDLE_INVALID, kKey);
  CHECK(s.ops == 0);
  CHECK(s.maybe == op::digest);
  // A later error elsewhere does not forget it.
  s = after<fn::C_SignInit>(s, CKR_MECHANISM_INVALID, &mechanism, kKey);
  CHECK(s.maybe == op::digest);
  // A successful Init proves the backend had none left.
  s = after<fn::C_DigestInit>(s, CKR_OK, &mechanism);
  CHECK(s.ops == op::digest);
  CHECK(s.maybe == 0);
}

TEST_CASE("spec bender: an update that fails on a maybe-active operation keeps it maybe") {
  // Nothing the spec calls active, but an earlier error may have left it:
  // another failure proves nothing.
  State s =
      after<fn::C_DigestUpdate>({0, op::digest}, CKR_OPERATION_NOT_INITIALIZED, in, CK_ULONG{16});
  CHECK(s.ops == 0);
  CHECK(s.maybe == op::digest);
  // A failure on an operation never started leaves nothing behind.
  s = after<fn::C_DigestUpdate>({op::sign, 0}, CKR_OPERATION_NOT_INITIALIZED, in, CK_ULONG{16});
  CHECK(s.ops == op::sign);
  CHECK(s.maybe == 0);
}

TEST_CASE("a dual-function update ends, or maybe leaves, both its operations") {
  const State active{op::digest | op::encrypt | op::verify, 0};
  State s = after<fn::C_DigestEncryptUpdate>(active, CKR_OK, in, CK_ULONG{16}, out, &out_len);
  CHECK(s.ops == active.ops);
  s = after<fn::C_DigestEncryptUpdate>(active, CKR_DEVICE_MEMORY, in, CK_ULONG{16}, out, &out_len);
  CHECK(s.ops == op::verify);
  CHECK(s.maybe == (op::digest | op::encrypt));
}

TEST_CASE("a final call ends its operation") {
  State s = after<fn::C_SignFinal>({op::sign | op::find, op::sign}, CKR_OK, out, &out_len);
  CHECK(s.ops == op::find);
  CHECK(s.maybe == 0);  // a successful end proves it gone
  s = after<fn::C_FindObjectsFinal>(s, CKR_OK);
  CHECK(s.ops == 0);
  s = after<fn::C_VerifyFinal>({op::verify, 0}, CKR_SIGNATURE_INVALID, in, CK_ULONG{16});
  CHECK(s.ops == 0);
}

TEST_CASE("a length query or CKR_BUFFER_TOO_SMALL does not end the operation") {
  const State active{op::sign, 0};
  // NULL output buffer: the caller asks for the length and calls again.
  State s = after<fn::C_Sign>(active, CKR_OK, in, CK_ULONG{16}, CK_BYTE_PTR{nullptr}, &out_len);
  CHECK(s.ops == op::sign);
  CHECK(s.maybe == 0);
  s = after<fn::C_Sign>(active, CKR_BUFFER_TOO_SMALL, in, CK_ULONG{16}, out, &out_len);
  CHECK(s.ops == op::sign);
  CHECK(s.maybe == 0);
  s = after<fn::C_EncryptFinal>({op::encrypt, 0}, CKR_OK, CK_BYTE_PTR{nullptr}, &out_len);
  CHECK(s.ops == op::encrypt);
  // With a buffer, success ends it whatever length the backend wrote back.
  CK_ULONG huge = 1u << 20;
  s = after<fn::C_Sign>(active, CKR_OK, in, CK_ULONG{16}, out, &huge);
  CHECK(s.ops == 0);
}

TEST_CASE("spec bender: after a failed final call the operation may still be active") {
  // By the spec any error other than CKR_BUFFER_TOO_SMALL ends it; a backend
  // that keeps it would hand the next user of the pooled session a live one.
  State s =
      after<fn::C_Encrypt>({op::encrypt, 0}, CKR_DATA_LEN_RANGE, in, CK_ULONG{15}, out, &out_len);
  CHECK(s.ops == 0);
  CHECK(s.maybe == op::encrypt);
  // Also a failed length query.
  s = after<fn::C_Decrypt>({op::decrypt, 0}, CKR_ENCRYPTED_DATA_INVALID, in, CK_ULONG{16},
                           CK_BYTE_PTR{nullptr}, &out_len);
  CHECK(s.ops == 0);
  CHECK(s.maybe == op::decrypt);
  // A later successful end proves it gone.
  s = after<fn::C_DecryptFinal>({op::decrypt, op::decrypt}, CKR_OK, out, &out_len);
  CHECK(s.maybe == 0);
  // A failed search end too.
  s = after<fn::C_FindObjectsFinal>({op::find, 0}, CKR_FUNCTION_FAILED);
  CHECK(s.maybe == op::find);
}

TEST_CASE("message-based operations survive their messages' errors until Final") {
  State s = after<fn::C_MessageEncryptInit>({}, CKR_OK, &mechanism, kKey);
  CHECK(s.ops == op::message_encrypt);
  CK_BYTE params[12] = {};
  s = after<fn::C_EncryptMessage>(s, CKR_DATA_LEN_RANGE, params, CK_ULONG{12}, in, CK_ULONG{0}, in,
                                  CK_ULONG{16}, out, &out_len);
  CHECK(s.ops == op::message_encrypt);
  CHECK(s.maybe == 0);
  s = after<fn::C_EncryptMessage>(s, CKR_OK, params, CK_ULONG{12}, in, CK_ULONG{0}, in,
                                  CK_ULONG{16}, out, &out_len);
  CHECK(s.ops == op::message_encrypt);
  s = after<fn::C_MessageEncryptFinal>(s, CKR_OK);
  CHECK(s.ops == 0);
  CHECK(s.maybe == 0);
  s = after<fn::C_MessageVerifyFinal>({op::message_verify, 0}, CKR_DEVICE_ERROR);
  CHECK(s.ops == 0);
  CHECK(s.maybe == op::message_verify);
}

TEST_CASE("C_SessionCancel ends exactly the operations it names, when it succeeds") {
  const State s0{op::encrypt | op::find | op::message_sign, op::digest};
  State s = after<fn::C_SessionCancel>(s0, CKR_OK, CK_FLAGS{CKF_FIND_OBJECTS | CKF_DIGEST});
  CHECK(s.ops == (op::encrypt | op::message_sign));
  CHECK(s.maybe == 0);
  s = after<fn::C_SessionCancel>(s0, CKR_FUNCTION_FAILED, CK_FLAGS{CKF_ENCRYPT});
  CHECK(s.ops == s0.ops);
  CHECK(s.maybe == s0.maybe);
}

TEST_CASE("C_SetOperationState may leave any operation active, even when it fails") {
  CK_BYTE state[8] = {};
  State s = after<fn::C_SetOperationState>({}, CKR_OK, state, CK_ULONG{8}, CK_OBJECT_HANDLE{0},
                                           CK_OBJECT_HANDLE{0});
  CHECK(s.maybe == kAllOps);
  // And the spec says it is active: a call continuing any operation must run
  // on the backend session that holds the restored state (multiplex mode).
  CHECK(s.ops == kAllOps);
  s = after<fn::C_SetOperationState>({op::sign, 0}, CKR_SAVED_STATE_INVALID, state, CK_ULONG{8},
                                     CK_OBJECT_HANDLE{0}, CK_OBJECT_HANDLE{0});
  CHECK(s.maybe == kAllOps);
  CHECK(s.ops == op::sign);  // a failed restore changed nothing the spec knows of
}

TEST_CASE("calls that are no operation leave the masks alone") {
  const State s0{op::verify, op::digest};
  CK_ULONG count = 0;
  State s = after<fn::C_GenerateKey>(s0, CKR_FUNCTION_FAILED, &mechanism, CK_ATTRIBUTE_PTR{nullptr},
                                     count, CK_OBJECT_HANDLE_PTR{nullptr});
  CHECK(s.ops == s0.ops);
  CHECK(s.maybe == s0.maybe);
  s = after<fn::C_GetSessionInfo>(s0, CKR_DEVICE_ERROR, CK_SESSION_INFO_PTR{nullptr});
  CHECK(s.ops == s0.ops);
  CHECK(s.maybe == s0.maybe);
  // Successful ones too.
  CK_BYTE random[4];
  s = after<fn::C_GenerateRandom>(s0, CKR_OK, random, CK_ULONG{sizeof random});
  CHECK(s.ops == s0.ops);
  CHECK(s.maybe == s0.maybe);
  s = after<fn::C_GenerateKey>(s0, CKR_OK, &mechanism, CK_ATTRIBUTE_PTR{nullptr}, count,
                               CK_OBJECT_HANDLE_PTR{nullptr});
  CHECK(s.ops == s0.ops);
  CHECK(s.maybe == s0.maybe);
}

TEST_CASE("cancel flags and operation masks map one to one") {
  for (OpMask bit = 1; bit <= kAllOps; bit = static_cast<OpMask>(bit << 1)) {
    CAPTURE(bit);
    const CK_FLAGS f = cancel_flags(bit);
    CHECK(f != 0);
    CHECK((f & (f - 1)) == 0);  // one flag
    CHECK(ops_of_cancel_flags(f) == bit);
  }
  CHECK(cancel_flags(kAllOps) ==
        (CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT | CKF_MESSAGE_SIGN | CKF_MESSAGE_VERIFY |
         CKF_FIND_OBJECTS | CKF_ENCRYPT | CKF_DECRYPT | CKF_DIGEST | CKF_SIGN | CKF_SIGN_RECOVER |
         CKF_VERIFY | CKF_VERIFY_RECOVER));
}

// Every operation has one Init that starts it and at least one call that
// ends it; every call that continues or ends one names which.
struct Table {
  int starts[16] = {};
  int finishes[16] = {};
  bool consistent = true;
};

template <class F>
void add(Table& t) {
  constexpr Effect e = effect<F>;
  const bool names_ops = e.ops != 0;
  switch (e.step) {
    case Step::start:
    case Step::finish:
      for (int i = 0; i < 16; ++i) {
        if (e.ops & (1 << i)) ++(e.step == Step::start ? t.starts : t.finishes)[i];
      }
      [[fallthrough]];
    case Step::update:
    case Step::message:
      if (!names_ops) t.consistent = false;
      break;
    default:
      break;
  }
  if (e.step == Step::start && (e.ops & (e.ops - 1)) != 0) t.consistent = false;
}

TEST_CASE("the effect table: one Init and at least one end per operation") {
  Table t;
#define P11MUX_ADD(name, since, dispatch, args) add<fn::name>(t);
  P11MUX_FUNCTIONS(P11MUX_ADD)
#undef P11MUX_ADD
  CHECK(t.consistent);
  for (int i = 0; (1 << i) <= kAllOps; ++i) {
    CAPTURE(i);
    CHECK(t.starts[i] == 1);
    CHECK(t.finishes[i] >= 1);
  }
  CHECK(effect<fn::C_DeriveKey>.step == Step::create);
  CHECK(effect<fn::C_UnwrapKey>.step == Step::create);
  CHECK(effect<fn::C_GenerateKeyPair>.step == Step::create);
  CHECK(effect<fn::C_CopyObject>.step == Step::create);
  CHECK(effect<fn::C_DestroyObject>.step == Step::none);
}

}  // namespace
}  // namespace p11mux
