// Many threads on ONE session doing AES-GCM message encryption and decryption
// through p11mux in front of NSS softoken. Message-based operations are made
// for this: one C_MessageEncryptInit, then any number of self-contained
// C_EncryptMessage calls. Softoken lets only one of the message-encrypt and
// message-decrypt operations be active on a session, so the threads work in
// rounds: all encrypt, the last to arrive switches the session to decryption,
// all decrypt (their own and a neighbour's messages), and it switches back.
//
// The session mode comes from P11MUX_SESSION_MODE (ctest registers one test
// per mode); P11MUX_TEST_V3_THREADS overrides the thread count (default 8).
#include "nss_support.h"

#include "support/ckr_names.h"
#include "support/doctest_ck.h"
#include "support/threads.h"

#include <atomic>
#include <barrier>
#include <chrono>
#include <mutex>
#include <string>
#include <vector>

using namespace p11test;

namespace {

constexpr int kMessagesPerRound = 4;
constexpr int kMaxRounds = 100;
constexpr auto kTimeBudget = std::chrono::seconds(5);

struct Message {
  Bytes iv, aad, plaintext, ciphertext, tag;
};

// Distinct per thread, round and index: the IV must never repeat under one key.
Message make_message(std::size_t thread, int round, int index) {
  Message m;
  m.iv = Bytes(12, 0);
  m.iv[0] = static_cast<CK_BYTE>(thread);
  m.iv[1] = static_cast<CK_BYTE>(round);
  m.iv[2] = static_cast<CK_BYTE>(index);
  m.aad = to_bytes("thread " + std::to_string(thread));
  m.plaintext = to_bytes("round " + std::to_string(round) + " message " + std::to_string(index) +
                         std::string(thread % 5 * 7, '.'));
  return m;
}

struct Tally {
  std::atomic<long> encrypted{0}, decrypted{0}, wrong{0};
  std::mutex mu;
  std::vector<std::string> errors;  // guarded by mu

  void error(const std::string& what) {
    std::lock_guard lock(mu);
    if (errors.size() < 20) errors.push_back(what);
  }
};

}  // namespace

TEST_CASE("threads sharing one session: AES-GCM message encryption and decryption") {
  const std::string mode = env_or("P11MUX_SESSION_MODE", "serialize");
  const std::size_t threads = std::stoul(env_or("P11MUX_TEST_V3_THREADS", "8"));
  REQUIRE(threads >= 2);
  MESSAGE("session_mode = " << mode << ", " << threads << " threads");

  Library p11mux(required_env("P11MUX_TEST_P11MUX"));
  NssDatabase db;
  SoftokenBehindP11mux config(db);
  refresh_p11mux_probe(p11mux);
  CK_FUNCTION_LIST_3_0* fn = function_list_3_0(p11mux);
  REQUIRE(fn != nullptr);
  Initialized init(fn);

  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  REQUIRE_RV(fn->C_OpenSession(slot_labelled(fn, kNssCryptoSlot), CKF_SERIAL_SESSION, nullptr,
                               nullptr, &session),
             CKR_OK);
  const GcmVector& kat = gcm_test_case_4();
  const CK_OBJECT_HANDLE key = import_aes_key(fn, session, kat.key);
  CK_MECHANISM gcm{CKM_AES_GCM, nullptr, 0};
  REQUIRE_RV(fn->C_MessageEncryptInit(session, &gcm, key), CKR_OK);

  Tally tally;
  std::vector<std::vector<Message>> messages(threads);
  const auto deadline = std::chrono::steady_clock::now() + kTimeBudget;
  int round = 0;
  bool decrypting = false;
  bool more = true;  // read by all after each phase; written only by the completion step
  // Runs on one thread while the others wait: switches the session's operation.
  auto switch_phase = [&]() noexcept {
    CK_RV final_rv =
        decrypting ? fn->C_MessageDecryptFinal(session) : fn->C_MessageEncryptFinal(session);
    CK_RV init_rv = decrypting ? fn->C_MessageEncryptInit(session, &gcm, key)
                               : fn->C_MessageDecryptInit(session, &gcm, key);
    if (final_rv != CKR_OK || init_rv != CKR_OK) {
      tally.error("switching phase: " + ckr_string(final_rv) + ", " + ckr_string(init_rv));
      more = false;
    }
    if (decrypting) {
      ++round;
      if (round >= kMaxRounds || std::chrono::steady_clock::now() >= deadline) more = false;
    }
    decrypting = !decrypting;
  };
  std::barrier sync(static_cast<std::ptrdiff_t>(threads), switch_phase);

  const auto failures = run_in_threads(threads, [&](std::size_t t) {
    while (more) {
      // Encrypt phase: this thread's messages of the round.
      messages[t].clear();
      for (int i = 0; i < kMessagesPerRound; ++i) {
        Message m = make_message(t, round, i);
        CK_RV rv = encrypt_message(fn, session, m.iv, m.aad, m.plaintext, m.ciphertext, m.tag);
        if (rv != CKR_OK) {
          tally.error("thread " + std::to_string(t) + ": C_EncryptMessage " + ckr_string(rv));
          continue;
        }
        ++tally.encrypted;
        messages[t].push_back(std::move(m));
      }
      // The KAT once per round, through the same shared operation.
      if (t == 0) {
        Bytes c, tag;
        if (encrypt_message(fn, session, kat.iv, kat.aad, kat.plaintext, c, tag) != CKR_OK ||
            c != kat.ciphertext || tag != kat.tag) {
          ++tally.wrong;
        }
      }
      sync.arrive_and_wait();
      // Decrypt phase: its own messages and the next thread's.
      for (std::size_t owner : {t, (t + 1) % threads}) {
        for (const Message& m : messages[owner]) {
          Bytes plaintext;
          CK_RV rv = decrypt_message(fn, session, m.iv, m.aad, m.ciphertext, m.tag, plaintext);
          if (rv != CKR_OK) {
            tally.error("thread " + std::to_string(t) + ": C_DecryptMessage " + ckr_string(rv));
          } else if (plaintext != m.plaintext) {
            ++tally.wrong;
          } else {
            ++tally.decrypted;
          }
        }
      }
      sync.arrive_and_wait();
    }
  });
  CHECK(failures.empty());
  for (const auto& f : failures) MESSAGE(f);
  for (const auto& e : tally.errors) MESSAGE(e);
  MESSAGE(round << " rounds: " << tally.encrypted.load() << " messages encrypted, "
                << tally.decrypted.load() << " decrypted");
  CHECK(tally.errors.empty());
  CHECK(tally.wrong.load() == 0);
  CHECK(round >= 1);
  CHECK(tally.encrypted.load() == static_cast<long>(threads) * kMessagesPerRound * round);
  CHECK(tally.decrypted.load() == 2 * tally.encrypted.load());

  // The session is left with message encryption active and still correct.
  Bytes c, tag;
  REQUIRE_RV(encrypt_message(fn, session, kat.iv, kat.aad, kat.plaintext, c, tag), CKR_OK);
  CHECK(to_hex(c) == to_hex(kat.ciphertext));
  CHECK_RV(fn->C_MessageEncryptFinal(session), CKR_OK);
  CHECK_RV(fn->C_CloseSession(session), CKR_OK);
}
