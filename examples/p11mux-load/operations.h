// The operations, as run by one worker thread. Every result is checked (see
// --help); the expensive checks (verifying a signature) are sampled and not
// timed. Nothing here allocates or locks once the Worker is constructed.
#pragma once

#include <p11mux/pkcs11.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "keys.h"
#include "module.h"
#include "plan.h"
#include "schedule.h"
#include "stats.h"

namespace p11mux::load {

// What all workers share, fixed before they start.
struct RunContext {
  CK_FUNCTION_LIST* fn = nullptr;
  CK_SLOT_ID slot = 0;
  const Keys* keys = nullptr;
  SessionMode mode = SessionMode::per_thread;
  CK_SESSION_HANDLE shared_session = CK_INVALID_HANDLE;
  unsigned verify_every = kDefaultVerifyEvery;
  const std::optional<std::string>* pin = nullptr;  // login-logout; nullopt = PIN pad
  const Schedule* schedule = nullptr;               // retries give up once it is stopped
  std::uint64_t iv_seed = 0;                        // random per run, for AES-GCM IVs
};

class Worker {
 public:
  // Opens the thread's own session with --sessions per-thread (SetupError).
  Worker(const RunContext& ctx, unsigned index);
  Worker(const Worker&) = delete;  // owns its session and buffers
  Worker& operator=(const Worker&) = delete;

  Outcome execute(OpKind op);

  // Time spent in untimed checks since reset_untimed().
  Clock::duration untimed() const noexcept { return untimed_; }
  void reset_untimed() noexcept { untimed_ = Clock::duration::zero(); }

 private:
  friend class Untimed;

  Outcome dispatch(OpKind op, CK_SESSION_HANDLE s);
  Outcome random(CK_SESSION_HANDLE s);
  Outcome digest(CK_SESSION_HANDLE s);
  Outcome sign(CK_SESSION_HANDLE s, OpKind op);
  Outcome verify(CK_SESSION_HANDLE s, OpKind op);
  Outcome aes_gcm(CK_SESSION_HANDLE s);
  Outcome open_close();
  Outcome login_logout();
  Outcome find(CK_SESSION_HANDLE s);

  // C_xxxInit, retried while it collides with another thread's operation on a
  // shared session (CKR_OPERATION_ACTIVE); each retry counts as a collision.
  template <class Init>
  CK_RV init(Outcome& o, Init&& call);
  void check_signature(Outcome& o, CK_SESSION_HANDLE s, CK_MECHANISM_TYPE mech, CK_OBJECT_HANDLE key,
                       const CK_BYTE* data, CK_ULONG data_len, const CK_BYTE* sig, CK_ULONG sig_len,
                       bool expect_valid);
  bool sample(OpKind op) noexcept;

  const RunContext& ctx_;
  CK_FUNCTION_LIST* f_;
  unsigned index_;
  Session own_session_;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
  Clock::duration untimed_{};
  std::array<std::uint64_t, kOpKinds> sampled_{};
  std::uint64_t iv_counter_;

  std::array<CK_BYTE, 32> random_{}, previous_random_{};
  std::array<CK_BYTE, 64> digest_{};
  std::array<CK_BYTE, 1024> signature_{}, bad_signature_{};
  std::array<CK_BYTE, 1024> plaintext_{};
  // As large as the ciphertext: modules may ask for an upper bound of the
  // plaintext before checking the tag (SoftHSM2 does).
  std::array<CK_BYTE, 1024 + 64> ciphertext_{}, decrypted_{};
  std::array<CK_BYTE, 12> iv_{};
  std::array<CK_OBJECT_HANDLE, 64> found_{};
};

}  // namespace p11mux::load
