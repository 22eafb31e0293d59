// Threads with a session each, signing concurrently: each thread opens its own
// session, generates its own P-256 key pair and signs (C_Digest SHA-256 + ECDSA),
// verifying every signature and checking that a tampered message fails.
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/fixture.h"
#include "support/threads.h"

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

using namespace p11test;

TEST_CASE_FIXTURE(LoggedInFixture, "8 threads, one session each: ECDSA signatures all verify") {
  constexpr std::size_t kThreads = 8;
  std::atomic<long> signatures{0};
  std::atomic<long> verified{0};
  std::atomic<long> tamper_rejected{0};
  std::vector<long> per_thread(kThreads, 0);

  const Budget budget(300, std::chrono::seconds(5));
  const auto errors = run_in_threads(kThreads, [&](std::size_t i) {
    Session own(p11, slot, Access::read_write);
    const KeyPair key = generate_ec_p256(p11, own, "thread-" + std::to_string(i));
    for (int n = 0; budget.allows(n); ++n) {
      const Bytes message =
          to_bytes("thread " + std::to_string(i) + " message " + std::to_string(n));
      const Bytes signature = ecdsa_sha256_sign(p11, own, key.private_key, message);
      ++signatures;
      ++per_thread[i];
      if (signature.size() != 64) {
        throw std::runtime_error("signature of " + std::to_string(signature.size()) + " bytes");
      }
      if (const CK_RV rv = ecdsa_sha256_verify(p11, own, key.public_key, message, signature);
          rv != CKR_OK) {
        throw std::runtime_error("verify: " + ckr_string(rv));
      }
      ++verified;
      Bytes tampered = message;
      tampered.back() ^= 0x01;
      if (const CK_RV rv = ecdsa_sha256_verify(p11, own, key.public_key, tampered, signature);
          rv != CKR_SIGNATURE_INVALID) {
        throw std::runtime_error("tampered verify: " + ckr_string(rv));
      }
      ++tamper_rejected;
    }
  });
  CHECK(errors.empty());
  for (const auto& e : errors) MESSAGE(e);

  MESSAGE(kThreads << " threads, own sessions: " << signatures.load() << " signatures, "
                   << verified.load() << " verified, " << tamper_rejected.load()
                   << " tampered rejected");
  CHECK(signatures.load() > 0);
  CHECK(verified.load() == signatures.load());
  CHECK(tamper_rejected.load() == signatures.load());
  for (std::size_t i = 0; i < kThreads; ++i) {
    CAPTURE(i);
    CHECK(per_thread[i] >= 1);
  }
}
