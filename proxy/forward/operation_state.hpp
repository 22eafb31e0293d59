// Which operation each function starts, continues or ends, and which
// functions create objects: the facts the session pool needs to reset a
// backend session and that multiplex mode needs to keep an operation on one
// backend session (docs/pkcs11-facts.md, "Operations"). Described once, per function.
//
// The rules (PKCS#11 2.40 §5.x): an operation starts with a successful Init;
// it ends with its final call (single-part or Final) unless that call was a
// length query (NULL output buffer) or returned CKR_BUFFER_TOO_SMALL; any other
// error from an Update or final call ends it too. When in doubt an operation
// is kept "active": a needless reset is cheap, a dirty pooled session is not.
//
// Backends bend these rules (SoftHSM2 keeps a digest active after C_DigestKey
// fails), so p11mux keeps two masks: `ops`, what the spec says is active,
// which multiplex mode routes calls by; and `maybe`, what an error may have
// left active on a backend that ignores the spec. Both must be empty, or be
// cancelled, before a backend session is pooled again.
#pragma once

#include "functions/function_traits.hpp"

#include <cstdint>
#include <tuple>

namespace p11mux {

using OpMask = std::uint16_t;
namespace op {
inline constexpr OpMask encrypt = 1 << 0, decrypt = 1 << 1, digest = 1 << 2, sign = 1 << 3,
                        verify = 1 << 4, sign_recover = 1 << 5, verify_recover = 1 << 6,
                        find = 1 << 7, message_encrypt = 1 << 8, message_decrypt = 1 << 9,
                        message_sign = 1 << 10, message_verify = 1 << 11;
}  // namespace op

inline constexpr OpMask kAllOps = (op::message_verify << 1) - 1;

// `message`: one message of a v3.0 message-based operation, which needs the
// operation (so multiplex mode runs it where the operation is) but never ends it.
// `restore`: C_SetOperationState, which makes active whatever the saved state
// held: any operation, as far as p11mux can tell.
enum class Step : std::uint8_t { none, start, update, finish, cancel, create, message, restore };

struct Effect {
  Step step = Step::none;
  OpMask ops = 0;
};

template <class F>
inline constexpr Effect effect{};

#define P11MUX_EFFECT(name, step_, ops_) \
  template <>                            \
  inline constexpr Effect effect<fn::name>{Step::step_, ops_};

P11MUX_EFFECT(C_EncryptInit, start, op::encrypt)
P11MUX_EFFECT(C_Encrypt, finish, op::encrypt)
P11MUX_EFFECT(C_EncryptUpdate, update, op::encrypt)
P11MUX_EFFECT(C_EncryptFinal, finish, op::encrypt)
P11MUX_EFFECT(C_DecryptInit, start, op::decrypt)
P11MUX_EFFECT(C_Decrypt, finish, op::decrypt)
P11MUX_EFFECT(C_DecryptUpdate, update, op::decrypt)
P11MUX_EFFECT(C_DecryptFinal, finish, op::decrypt)
P11MUX_EFFECT(C_DigestInit, start, op::digest)
P11MUX_EFFECT(C_Digest, finish, op::digest)
P11MUX_EFFECT(C_DigestUpdate, update, op::digest)
P11MUX_EFFECT(C_DigestKey, update, op::digest)
P11MUX_EFFECT(C_DigestFinal, finish, op::digest)
P11MUX_EFFECT(C_SignInit, start, op::sign)
P11MUX_EFFECT(C_Sign, finish, op::sign)
P11MUX_EFFECT(C_SignUpdate, update, op::sign)
P11MUX_EFFECT(C_SignFinal, finish, op::sign)
P11MUX_EFFECT(C_SignRecoverInit, start, op::sign_recover)
P11MUX_EFFECT(C_SignRecover, finish, op::sign_recover)
P11MUX_EFFECT(C_VerifyInit, start, op::verify)
P11MUX_EFFECT(C_Verify, finish, op::verify)
P11MUX_EFFECT(C_VerifyUpdate, update, op::verify)
P11MUX_EFFECT(C_VerifyFinal, finish, op::verify)
P11MUX_EFFECT(C_VerifyRecoverInit, start, op::verify_recover)
P11MUX_EFFECT(C_VerifyRecover, finish, op::verify_recover)
P11MUX_EFFECT(C_DigestEncryptUpdate, update, op::digest | op::encrypt)
P11MUX_EFFECT(C_DecryptDigestUpdate, update, op::decrypt | op::digest)
P11MUX_EFFECT(C_SignEncryptUpdate, update, op::sign | op::encrypt)
P11MUX_EFFECT(C_DecryptVerifyUpdate, update, op::decrypt | op::verify)
P11MUX_EFFECT(C_FindObjectsInit, start, op::find)
P11MUX_EFFECT(C_FindObjects, update, op::find)
P11MUX_EFFECT(C_FindObjectsFinal, finish, op::find)
// Message-based operations stay active across messages, errors included,
// until their Final (v3.0 §5.9-5.14: "active until ... C_MessageEncryptFinal";
// an error ends only the message): only Init and Final change them.
P11MUX_EFFECT(C_MessageEncryptInit, start, op::message_encrypt)
P11MUX_EFFECT(C_MessageEncryptFinal, finish, op::message_encrypt)
P11MUX_EFFECT(C_MessageDecryptInit, start, op::message_decrypt)
P11MUX_EFFECT(C_MessageDecryptFinal, finish, op::message_decrypt)
P11MUX_EFFECT(C_MessageSignInit, start, op::message_sign)
P11MUX_EFFECT(C_MessageSignFinal, finish, op::message_sign)
P11MUX_EFFECT(C_MessageVerifyInit, start, op::message_verify)
P11MUX_EFFECT(C_MessageVerifyFinal, finish, op::message_verify)
P11MUX_EFFECT(C_EncryptMessage, message, op::message_encrypt)
P11MUX_EFFECT(C_EncryptMessageBegin, message, op::message_encrypt)
P11MUX_EFFECT(C_EncryptMessageNext, message, op::message_encrypt)
P11MUX_EFFECT(C_DecryptMessage, message, op::message_decrypt)
P11MUX_EFFECT(C_DecryptMessageBegin, message, op::message_decrypt)
P11MUX_EFFECT(C_DecryptMessageNext, message, op::message_decrypt)
P11MUX_EFFECT(C_SignMessage, message, op::message_sign)
P11MUX_EFFECT(C_SignMessageBegin, message, op::message_sign)
P11MUX_EFFECT(C_SignMessageNext, message, op::message_sign)
P11MUX_EFFECT(C_VerifyMessage, message, op::message_verify)
P11MUX_EFFECT(C_VerifyMessageBegin, message, op::message_verify)
P11MUX_EFFECT(C_VerifyMessageNext, message, op::message_verify)
P11MUX_EFFECT(C_SessionCancel, cancel, 0)
P11MUX_EFFECT(C_SetOperationState, restore, kAllOps)
// Functions that may create session objects (CKA_TOKEN false).
P11MUX_EFFECT(C_CreateObject, create, 0)
P11MUX_EFFECT(C_CopyObject, create, 0)
P11MUX_EFFECT(C_GenerateKey, create, 0)
P11MUX_EFFECT(C_GenerateKeyPair, create, 0)
P11MUX_EFFECT(C_UnwrapKey, create, 0)
P11MUX_EFFECT(C_DeriveKey, create, 0)
#undef P11MUX_EFFECT

// The CKF_MESSAGE_*/operation flags C_SessionCancel takes, for a mask.
constexpr CK_FLAGS cancel_flags(OpMask ops) noexcept {
  CK_FLAGS f = 0;
  if (ops & op::message_encrypt) f |= CKF_MESSAGE_ENCRYPT;
  if (ops & op::message_decrypt) f |= CKF_MESSAGE_DECRYPT;
  if (ops & op::message_sign) f |= CKF_MESSAGE_SIGN;
  if (ops & op::message_verify) f |= CKF_MESSAGE_VERIFY;
  if (ops & op::find) f |= CKF_FIND_OBJECTS;
  if (ops & op::encrypt) f |= CKF_ENCRYPT;
  if (ops & op::decrypt) f |= CKF_DECRYPT;
  if (ops & op::digest) f |= CKF_DIGEST;
  if (ops & op::sign) f |= CKF_SIGN;
  if (ops & op::sign_recover) f |= CKF_SIGN_RECOVER;
  if (ops & op::verify) f |= CKF_VERIFY;
  if (ops & op::verify_recover) f |= CKF_VERIFY_RECOVER;
  return f;
}

constexpr OpMask ops_of_cancel_flags(CK_FLAGS f) noexcept {
  OpMask m = 0;
  for (OpMask bit = 1; bit != 0 && bit <= kAllOps; bit = static_cast<OpMask>(bit << 1)) {
    if (cancel_flags(bit) & f) m |= bit;
  }
  return m;
}

// True when the call's output buffer (letter 'o') was NULL: a length query,
// which never ends an operation.
template <class F, std::size_t I, class Tuple>
constexpr bool null_output(const Tuple& args) noexcept {
  if constexpr (F::args[I] == 'o') {
    return std::get<I>(args) == nullptr;
  } else {
    return false;
  }
}

template <class F, class... A>
constexpr bool is_length_query(A... a) noexcept {
  const std::tuple<A...> args{a...};
  return [&]<std::size_t... I>(std::index_sequence<I...>) {
    return (null_output<F, I>(args) || ...);
  }
  (std::index_sequence_for<A...>{});
}

// The operations still active after a call, given those active before it.
// `args` are the call's arguments (the session handle included).
template <class F, class... A>
constexpr OpMask ops_after(OpMask before, CK_RV rv, A... args) noexcept {
  constexpr Effect e = effect<F>;
  if constexpr (e.step == Step::start) {
    if (rv != CKR_OK) return before;
    // v3.0: Init with a NULL mechanism cancels the operation (a NULL
    // template in C_FindObjectsInit is "find everything", not a cancel).
    bool cancel = false;
    if constexpr (F::args[1] == 'm') cancel = std::get<1>(std::tuple<A...>{args...}) == nullptr;
    return cancel ? static_cast<OpMask>(before & ~e.ops) : static_cast<OpMask>(before | e.ops);
  } else if constexpr (e.step == Step::update) {
    if (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL) return before;
    return static_cast<OpMask>(before & ~e.ops);
  } else if constexpr (e.step == Step::finish) {
    if (rv == CKR_BUFFER_TOO_SMALL) return before;
    if (rv == CKR_OK && is_length_query<F>(args...)) return before;
    return static_cast<OpMask>(before & ~e.ops);
  } else if constexpr (e.step == Step::message) {
    return before;
  } else if constexpr (e.step == Step::cancel) {
    if (rv != CKR_OK) return before;
    return static_cast<OpMask>(before &
                               ~ops_of_cancel_flags(std::get<1>(std::tuple<A...>{args...})));
  } else if constexpr (e.step == Step::restore) {
    // The saved state is opaque: any operation may be active now, and a call
    // continuing one must run here (multiplex mode routes by `ops`). The
    // backend session then stays with its virtual session until each is
    // ended or cancelled, or the session closes.
    return rv == CKR_OK ? e.ops : before;
  } else {
    return before;
  }
}

// The operations an error may have left active after a call, on a backend
// that does not end them as the spec says (`maybe`, before and after), given
// those the spec says were active before it (`ops`). Any error from a call
// that would end or continue an operation leaves it "maybe active" until a
// successful Init or final call, or a C_SessionCancel, proves otherwise.
template <class F, class... A>
constexpr OpMask maybe_after(OpMask ops, OpMask maybe, CK_RV rv, A... args) noexcept {
  constexpr Effect e = effect<F>;
  const auto without = [&](OpMask m) { return static_cast<OpMask>(maybe & ~m); };
  const OpMask held = static_cast<OpMask>((ops | maybe) & e.ops);
  if constexpr (e.step == Step::start) {
    // A successful Init: the backend had no such operation left.
    return rv == CKR_OK ? without(e.ops) : maybe;
  } else if constexpr (e.step == Step::update) {
    if (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL) return maybe;
    return static_cast<OpMask>(maybe | held);
  } else if constexpr (e.step == Step::finish) {
    if (rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && is_length_query<F>(args...))) return maybe;
    return rv == CKR_OK ? without(e.ops) : static_cast<OpMask>(maybe | held);
  } else if constexpr (e.step == Step::cancel) {
    if (rv != CKR_OK) return maybe;
    return without(ops_of_cancel_flags(std::get<1>(std::tuple<A...>{args...})));
  } else if constexpr (e.step == Step::restore) {
    // Whatever the saved state held, successful or not: p11mux cannot see it.
    return static_cast<OpMask>(maybe | e.ops);
  } else {
    return maybe;
  }
}

}  // namespace p11mux
