#include "operations.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace p11mux::load {

// Adds the time of a scope (a sampled check) to the worker's untimed total.
class Untimed {
 public:
  explicit Untimed(Worker& w) : w_(w), start_(Clock::now()) {}
  ~Untimed() { w_.untimed_ += Clock::now() - start_; }
  Untimed(const Untimed&) = delete;
  Untimed& operator=(const Untimed&) = delete;

 private:
  Worker& w_;
  Clock::time_point start_;
};

namespace {

constexpr CK_ULONG kGcmTagBits = 128;

Outcome& fail(Outcome& o, Call call, CK_RV rv) {
  o.rv = rv;
  o.call = call;
  return o;
}

CK_BYTE* bytes(const void* p) { return static_cast<CK_BYTE*>(const_cast<void*>(p)); }

// CKR_BUFFER_TOO_SMALL is the one error that leaves the operation active
// (PKCS#11 5.2): finish it with a buffer of the size the module asked for, so
// the session stays usable. Our buffers are larger than any correct output, so
// this is off the hot path, and it may allocate.
template <class Output>
void finish_operation(Output&& call, CK_ULONG needed) {
  std::vector<CK_BYTE> spill(needed > 0 && needed < (CK_ULONG{1} << 24) ? needed : 1 << 16);
  auto len = static_cast<CK_ULONG>(spill.size());
  call(spill.data(), &len);
}

}  // namespace

Worker::Worker(const RunContext& ctx, unsigned index)
    : ctx_(ctx), f_(ctx.fn), index_(index), iv_counter_(ctx.iv_seed) {
  if (ctx.mode == SessionMode::per_thread) {
    own_session_ = Session(f_, ctx.slot, 0, "thread " + std::to_string(index));
    session_ = own_session_.handle();
  } else if (ctx.mode == SessionMode::shared) {
    session_ = ctx.shared_session;
  }
  for (std::size_t i = 0; i < plaintext_.size(); ++i) plaintext_[i] = static_cast<CK_BYTE>(i * 7 + 1);
}

template <class Init>
CK_RV Worker::init(Outcome& o, Init&& call) {
  const bool shared = ctx_.mode == SessionMode::shared;
  for (;;) {
    CK_RV rv = call();
    if (rv != CKR_OPERATION_ACTIVE || !shared) return rv;
    ++o.collisions;
    if (ctx_.schedule->stopped()) {
      o.abandoned = true;
      return rv;
    }
    std::this_thread::yield();
  }
}

bool Worker::sample(OpKind op) noexcept {
  // The first op of each kind is checked, then every Nth.
  return sampled_[static_cast<std::size_t>(op)]++ % ctx_.verify_every == 0;
}

Outcome Worker::execute(OpKind op) {
  if (op == OpKind::open_close) return open_close();
  if (op == OpKind::login_logout) return login_logout();
  if (ctx_.mode != SessionMode::per_op) return dispatch(op, session_);

  // per-op: the session's open and close are part of the op, and timed.
  Outcome o;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  CK_RV rv = f_->C_OpenSession(ctx_.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
  if (rv != CKR_OK) return fail(o, Call::OpenSession, rv);
  o = dispatch(op, s);
  rv = f_->C_CloseSession(s);
  if (rv != CKR_OK && o.ok()) fail(o, Call::CloseSession, rv);
  return o;
}

Outcome Worker::dispatch(OpKind op, CK_SESSION_HANDLE s) {
  switch (op) {
    case OpKind::random:
      return random(s);
    case OpKind::digest:
      return digest(s);
    case OpKind::sign_ec:
    case OpKind::sign_rsa:
      return sign(s, op);
    case OpKind::verify_ec:
    case OpKind::verify_rsa:
      return verify(s, op);
    case OpKind::aes_gcm:
      return aes_gcm(s);
    case OpKind::find:
      return find(s);
    case OpKind::open_close:
      return open_close();
    case OpKind::login_logout:
      return login_logout();
  }
  return Outcome{};
}

Outcome Worker::random(CK_SESSION_HANDLE s) {
  Outcome o;
  CK_RV rv = f_->C_GenerateRandom(s, random_.data(), static_cast<CK_ULONG>(random_.size()));
  if (rv != CKR_OK) return fail(o, Call::GenerateRandom, rv);
  // A repeat of the previous 32 bytes (or all zeros, the first time) means a
  // stuck generator or a proxy handing out a stale buffer.
  o.checks = 1;
  if (random_ == previous_random_) o.check_failures = 1;
  previous_random_ = random_;
  return o;
}

Outcome Worker::digest(CK_SESSION_HANDLE s) {
  Outcome o;
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  CK_RV rv = init(o, [&] { return f_->C_DigestInit(s, &mech); });
  if (rv != CKR_OK) return fail(o, Call::DigestInit, rv);
  auto len = static_cast<CK_ULONG>(digest_.size());
  rv = f_->C_Digest(s, bytes(kMessage), sizeof kMessage, digest_.data(), &len);
  if (rv == CKR_BUFFER_TOO_SMALL) {
    finish_operation(
        [&](CK_BYTE* out, CK_ULONG* out_len) {
          return f_->C_Digest(s, bytes(kMessage), sizeof kMessage, out, out_len);
        },
        len);
  }
  if (rv != CKR_OK) return fail(o, Call::Digest, rv);
  o.checks = 1;
  if (len != sizeof kMessageSha256 || std::memcmp(digest_.data(), kMessageSha256, len) != 0) {
    o.check_failures = 1;
  }
  return o;
}

void Worker::check_signature(Outcome& o, CK_SESSION_HANDLE s, CK_MECHANISM_TYPE type, CK_OBJECT_HANDLE key,
                             const CK_BYTE* data, CK_ULONG data_len, const CK_BYTE* sig, CK_ULONG sig_len,
                             bool expect_valid) {
  CK_MECHANISM mech{type, nullptr, 0};
  CK_RV rv = init(o, [&] { return f_->C_VerifyInit(s, &mech, key); });
  if (rv != CKR_OK) {
    fail(o, Call::VerifyInit, rv);
    return;
  }
  rv = f_->C_Verify(s, bytes(data), data_len, bytes(sig), sig_len);
  if (rv == CKR_OK || rv == CKR_SIGNATURE_INVALID) {
    ++o.checks;
    if ((rv == CKR_OK) != expect_valid) ++o.check_failures;
    return;
  }
  fail(o, Call::Verify, rv);
}

Outcome Worker::sign(CK_SESSION_HANDLE s, OpKind op) {
  Outcome o;
  const Keys& k = *ctx_.keys;
  const bool ec = op == OpKind::sign_ec;
  const CK_MECHANISM_TYPE type = ec ? CKM_ECDSA : CKM_SHA256_RSA_PKCS;
  const CK_OBJECT_HANDLE priv = ec ? k.ec_private : k.rsa_private;
  const CK_BYTE* data = ec ? kMessageSha256 : kMessage;
  const CK_ULONG data_len = ec ? sizeof kMessageSha256 : sizeof kMessage;

  CK_MECHANISM mech{type, nullptr, 0};
  CK_RV rv = init(o, [&] { return f_->C_SignInit(s, &mech, priv); });
  if (rv != CKR_OK) return fail(o, Call::SignInit, rv);
  auto len = static_cast<CK_ULONG>(signature_.size());
  rv = f_->C_Sign(s, bytes(data), data_len, signature_.data(), &len);
  if (rv == CKR_BUFFER_TOO_SMALL) {
    finish_operation(
        [&](CK_BYTE* out, CK_ULONG* out_len) { return f_->C_Sign(s, bytes(data), data_len, out, out_len); },
        len);
  }
  if (rv != CKR_OK) return fail(o, Call::Sign, rv);
  if (sample(op)) {
    Untimed untimed(*this);
    check_signature(o, s, type, ec ? k.ec_public : k.rsa_public, data, data_len, signature_.data(), len,
                    true);
  }
  return o;
}

Outcome Worker::verify(CK_SESSION_HANDLE s, OpKind op) {
  Outcome o;
  const Keys& k = *ctx_.keys;
  const bool ec = op == OpKind::verify_ec;
  const CK_MECHANISM_TYPE type = ec ? CKM_ECDSA : CKM_SHA256_RSA_PKCS;
  const CK_OBJECT_HANDLE pub = ec ? k.ec_public : k.rsa_public;
  const CK_BYTE* data = ec ? kMessageSha256 : kMessage;
  const CK_ULONG data_len = ec ? sizeof kMessageSha256 : sizeof kMessage;
  const std::vector<CK_BYTE>& good = ec ? k.ec_signature : k.rsa_signature;
  const auto sig_len = static_cast<CK_ULONG>(good.size());

  check_signature(o, s, type, pub, data, data_len, good.data(), sig_len, true);
  if (o.ok() && !o.abandoned && sample(op)) {
    // A module that accepts anything would pass the timed check: make sure a
    // corrupted signature is refused.
    Untimed untimed(*this);
    std::memcpy(bad_signature_.data(), good.data(), good.size());
    bad_signature_[good.size() - 1] ^= 0x01;
    check_signature(o, s, type, pub, data, data_len, bad_signature_.data(), sig_len, false);
  }
  return o;
}

Outcome Worker::aes_gcm(CK_SESSION_HANDLE s) {
  Outcome o;
  // A fresh 96-bit IV per op: 32 bits of thread index and a 64-bit counter
  // that starts at a random value per run, so no IV repeats within a run (and
  // a repeat across runs with the same key is as unlikely as a 64-bit match).
  for (int i = 0; i < 4; ++i) iv_[static_cast<std::size_t>(i)] = static_cast<CK_BYTE>(index_ >> (24 - 8 * i));
  const std::uint64_t n = iv_counter_++;
  for (int i = 0; i < 8; ++i) iv_[static_cast<std::size_t>(4 + i)] = static_cast<CK_BYTE>(n >> (56 - 8 * i));
  CK_GCM_PARAMS params{iv_.data(), iv_.size(), iv_.size() * 8, nullptr, 0, kGcmTagBits};
  CK_MECHANISM mech{CKM_AES_GCM, &params, sizeof params};
  const CK_OBJECT_HANDLE key = ctx_.keys->aes;

  CK_RV rv = init(o, [&] { return f_->C_EncryptInit(s, &mech, key); });
  if (rv != CKR_OK) return fail(o, Call::EncryptInit, rv);
  auto ct_len = static_cast<CK_ULONG>(ciphertext_.size());
  const auto pt_size = static_cast<CK_ULONG>(plaintext_.size());
  rv = f_->C_Encrypt(s, plaintext_.data(), pt_size, ciphertext_.data(), &ct_len);
  if (rv == CKR_BUFFER_TOO_SMALL) {
    finish_operation(
        [&](CK_BYTE* out, CK_ULONG* out_len) {
          return f_->C_Encrypt(s, plaintext_.data(), pt_size, out, out_len);
        },
        ct_len);
  }
  if (rv != CKR_OK) return fail(o, Call::Encrypt, rv);

  rv = init(o, [&] { return f_->C_DecryptInit(s, &mech, key); });
  if (rv != CKR_OK) return fail(o, Call::DecryptInit, rv);
  auto pt_len = static_cast<CK_ULONG>(decrypted_.size());
  rv = f_->C_Decrypt(s, ciphertext_.data(), ct_len, decrypted_.data(), &pt_len);
  if (rv == CKR_BUFFER_TOO_SMALL) {
    finish_operation(
        [&](CK_BYTE* out, CK_ULONG* out_len) {
          return f_->C_Decrypt(s, ciphertext_.data(), ct_len, out, out_len);
        },
        pt_len);
  }
  if (rv != CKR_OK) return fail(o, Call::Decrypt, rv);

  o.checks = 1;
  if (ct_len != plaintext_.size() + kGcmTagBits / 8 || pt_len != plaintext_.size() ||
      std::memcmp(decrypted_.data(), plaintext_.data(), plaintext_.size()) != 0) {
    o.check_failures = 1;
  }
  return o;
}

Outcome Worker::open_close() {
  Outcome o;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  CK_RV rv = f_->C_OpenSession(ctx_.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
  if (rv != CKR_OK) return fail(o, Call::OpenSession, rv);
  rv = f_->C_CloseSession(s);
  if (rv != CKR_OK) return fail(o, Call::CloseSession, rv);
  return o;
}

Outcome Worker::login_logout() {
  Outcome o;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  CK_RV rv = f_->C_OpenSession(ctx_.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
  if (rv != CKR_OK) return fail(o, Call::OpenSession, rv);
  const std::optional<std::string>& pin = *ctx_.pin;
  for (;;) {
    rv = pin ? f_->C_Login(s, CKU_USER, bytes(pin->data()), static_cast<CK_ULONG>(pin->size()))
             : f_->C_Login(s, CKU_USER, nullptr, 0);
    // Login state is per token: another thread is between its C_Login and
    // C_Logout. Wait for it (counted as a collision), as the spec leaves us
    // nothing else to do.
    if (rv != CKR_USER_ALREADY_LOGGED_IN) break;
    ++o.collisions;
    if (ctx_.schedule->stopped()) {
      o.abandoned = true;
      f_->C_CloseSession(s);
      return o;
    }
    std::this_thread::yield();
  }
  if (rv != CKR_OK) {
    f_->C_CloseSession(s);
    return fail(o, Call::Login, rv);
  }
  rv = f_->C_Logout(s);
  if (rv != CKR_OK) {
    f_->C_CloseSession(s);
    return fail(o, Call::Logout, rv);
  }
  rv = f_->C_CloseSession(s);
  if (rv != CKR_OK) return fail(o, Call::CloseSession, rv);
  return o;
}

Outcome Worker::find(CK_SESSION_HANDLE s) {
  Outcome o;
  CK_ATTRIBUTE tmpl[] = {{CKA_LABEL, bytes(kEcLabel), static_cast<CK_ULONG>(std::strlen(kEcLabel))}};
  CK_RV rv = init(o, [&] { return f_->C_FindObjectsInit(s, tmpl, 1); });
  if (rv != CKR_OK) return fail(o, Call::FindObjectsInit, rv);
  CK_ULONG n = 0;
  rv = f_->C_FindObjects(s, found_.data(), static_cast<CK_ULONG>(found_.size()), &n);
  if (rv != CKR_OK) {
    f_->C_FindObjectsFinal(s);
    return fail(o, Call::FindObjects, rv);
  }
  rv = f_->C_FindObjectsFinal(s);
  if (rv != CKR_OK) return fail(o, Call::FindObjectsFinal, rv);
  o.checks = 1;
  const CK_ULONG expected = std::min<CK_ULONG>(ctx_.keys->find_expected, found_.size());
  if (n != expected) o.check_failures = 1;
  return o;
}

}  // namespace p11mux::load
