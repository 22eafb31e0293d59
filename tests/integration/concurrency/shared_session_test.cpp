// Many threads on ONE session, as thread pools do although the spec says a session
// serves one call at a time. Through p11mux every call must either give the right
// answer or, when another thread's digest is active on the session, the spec's
// CKR_OPERATION_ACTIVE. SoftHSM2 called directly crashes here: run only through p11mux.
//
// P11MUX_TEST_SHARED_THREADS overrides the thread count (default 32).
#include "support/ckr_names.h"
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/fixture.h"
#include "support/threads.h"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

using namespace p11test;

namespace {

struct ThreadResult {
  long ok_digests = 0;
  long active_retries = 0;
  long randoms = 0;
  long wrong_digests = 0;
  long bad_randoms = 0;  // all zero, or equal to the previous output
  std::string error;     // the first unexpected return code, which stops the thread
};

// Distinct data for each thread, of distinct lengths.
Bytes thread_data(std::size_t index) {
  std::string text;
  for (std::size_t i = 0; i <= index % 7 + 3; ++i) text += "thread " + std::to_string(index) + ";";
  return to_bytes(text);
}

// One iteration's digest: C_DigestInit until the session is free, then C_Digest.
// Returns false (with result.error set) on any unexpected return code.
bool shared_digest(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session, Bytes& data,
                   const Bytes& expected, const Budget& budget, ThreadResult& result) {
  CK_MECHANISM sha256{CKM_SHA256, nullptr, 0};
  for (;;) {
    const CK_RV rv = p11.C_DigestInit(session, &sha256);
    if (rv == CKR_OK) break;
    if (rv != CKR_OPERATION_ACTIVE) {
      result.error = "C_DigestInit: " + ckr_string(rv);
      return false;
    }
    ++result.active_retries;
    if (budget.expired()) return false;
    std::this_thread::yield();
  }
  Bytes out(32);
  CK_ULONG length = out.size();
  const CK_RV rv = p11.C_Digest(session, data.data(), data.size(), out.data(), &length);
  if (rv != CKR_OK) {
    result.error = "C_Digest: " + ckr_string(rv);
    return false;
  }
  if (length == out.size() && out == expected) {
    ++result.ok_digests;
  } else {
    ++result.wrong_digests;
  }
  return true;
}

bool shared_random(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session, Bytes& previous,
                   ThreadResult& result) {
  Bytes out(32, 0);
  const CK_RV rv = p11.C_GenerateRandom(session, out.data(), out.size());
  if (rv != CKR_OK) {
    result.error = "C_GenerateRandom: " + ckr_string(rv);
    return false;
  }
  ++result.randoms;
  if (out == Bytes(32, 0) || out == previous) ++result.bad_randoms;
  previous = out;
  return true;
}

template <class Field>
long total(const std::vector<ThreadResult>& results, Field field) {
  return std::accumulate(results.begin(), results.end(), 0L,
                         [&](long sum, const ThreadResult& r) { return sum + r.*field; });
}

}  // namespace

TEST_CASE_FIXTURE(SessionFixture, "threads sharing one session: digests and random numbers") {
  const std::size_t threads = std::stoul(env_or("P11MUX_TEST_SHARED_THREADS", "32"));
  REQUIRE(threads >= 1);

  // Known-good digests, computed single-threaded on a private session.
  std::vector<Bytes> data(threads);
  std::vector<Bytes> expected(threads);
  {
    Session reference(p11, slot, Access::read_only);
    for (std::size_t i = 0; i < threads; ++i) {
      data[i] = thread_data(i);
      expected[i] = digest(p11, reference, CKM_SHA256, data[i]);
      REQUIRE(expected[i].size() == 32);
    }
  }

  std::vector<ThreadResult> results(threads);
  const CK_SESSION_HANDLE shared = session;
  const Budget budget(1000, std::chrono::seconds(5));
  const auto errors = run_in_threads(threads, [&](std::size_t i) {
    ThreadResult& result = results[i];
    Bytes previous_random;
    for (int n = 0; budget.allows(n); ++n) {
      if (!shared_digest(p11, shared, data[i], expected[i], budget, result)) break;
      if (!shared_random(p11, shared, previous_random, result)) break;
    }
  });
  CHECK(errors.empty());
  for (const auto& e : errors) MESSAGE(e);

  const long ok = total(results, &ThreadResult::ok_digests);
  MESSAGE(threads << " threads on one session: " << ok << " ok digests, "
                  << total(results, &ThreadResult::active_retries)
                  << " CKR_OPERATION_ACTIVE retries, " << total(results, &ThreadResult::randoms)
                  << " randoms");
  CHECK(total(results, &ThreadResult::wrong_digests) == 0);
  CHECK(total(results, &ThreadResult::bad_randoms) == 0);
  for (std::size_t i = 0; i < threads; ++i) {
    CAPTURE(i);
    CHECK(results[i].error.empty());
    if (!results[i].error.empty()) MESSAGE("thread " << i << ": " << results[i].error);
    CHECK(results[i].ok_digests >= 1);  // every thread made progress
  }
  CHECK(ok > 0);

  // The session is still usable, with no digest left active.
  CHECK(to_hex(digest(p11, session, CKM_SHA256, to_bytes("abc"))) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}
