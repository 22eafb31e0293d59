// Shared by the reliability suites: loading libp11mux.so and the test
// backends the way an application does, scaling the work to the build,
// seeded random choices, tallies of return codes against the set each call
// may return, and threads run under a liveness guard.
#pragma once

#include <p11mux/pkcs11.h>

#include "faulty_control.h"
#include "mock_control.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <string>
#include <vector>

namespace p11mux::reliability {

// ---- how much work ----

// Iteration counts are written for the plain build; ThreadSanitizer builds
// run a fifth of them (same thread counts). P11MUX_TEST_SCALE=percent
// overrides, e.g. 1000 for a long local run.
unsigned scale_percent();
// n scaled, at least `floor`.
long scaled(long n, long floor = 1);
// Seconds a thread body may take before the process is declared hung.
inline constexpr auto kLivenessGuard = std::chrono::seconds(240);

// ---- the libraries ----

// libp11mux.so's v2.40 function list (loaded once; -z nodelete like in real use).
CK_FUNCTION_LIST& p11mux();
const MockControl& mock();
const FaultyControl& faulty();
const char* mock_path();
const char* faulty_path();
// The named test backends (tests/backends): the race detector (the mock, not
// thread-safe unless configured otherwise) and the slow module (the faulty
// module with network-HSM latency unless configured otherwise). Each is its
// own library with its own state.
const MockControl& race_detector();
const FaultyControl& slow();
const char* race_detector_path();
const char* slow_path();
// The spec bender (the mock bending the spec as real modules do, every
// MOCK_BEND_* on unless configured otherwise), its own library too.
const MockControl& spec_bender();
const char* spec_bender_path();
const char* softhsm2_path();  // P11MUX_TEST_SOFTHSM2_MODULE or the Debian path

// Points p11mux at a backend; keeps P11MUX_SESSION_MODE from the environment
// (ctest sets it per registration). Not thread-safe (setenv).
void use_backend(const char* path);
// "serialize" unless P11MUX_SESSION_MODE says otherwise.
std::string session_mode();
// CKF_OS_LOCKING_OK, as threaded applications pass it.
CK_C_INITIALIZE_ARGS* os_locking();

MockStats mock_stats(const MockControl& control = mock());
FaultyStats faulty_stats(const FaultyControl& control = faulty());

// A code from the PKCS#11 header's set (not an unknown or vendor value).
bool valid_ckr(CK_RV rv);
std::string rv_string(CK_RV rv);

// ---- seeded choices ----
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next();
  // Uniform in [0, n).
  std::uint64_t below(std::uint64_t n) { return next() % n; }
  bool chance(unsigned percent) { return below(100) < percent; }

 private:
  std::uint64_t state_;
};
// The suites' base seed: P11MUX_TEST_SEED, else fixed.
std::uint64_t base_seed();

// ---- return codes ----

using RvSet = std::initializer_list<CK_RV>;

// What one thread saw: calls by function name and return code, and the
// calls whose code was not in the set allowed for them.
class Tally {
 public:
  // Records rv; returns true when it is allowed (CKR_OK is always allowed).
  bool record(const char* call, CK_RV rv, RvSet allowed = {});
  void merge(const Tally& other);
  // rv is allowed on every call (e.g. CKR_SESSION_COUNT on any multiplexed
  // call over a backend that refuses sessions now and then).
  void allow_everywhere(CK_RV rv) { everywhere_.push_back(rv); }
  unsigned long calls() const { return calls_; }
  unsigned long count(const char* call, CK_RV rv) const;
  unsigned long count_rv(CK_RV rv) const;  // over all calls
  const std::vector<std::string>& unexpected() const { return unexpected_; }
  unsigned long unexpected_count() const { return unexpected_count_; }
  // Codes outside the header's set (never allowed).
  unsigned long invalid_count() const { return invalid_count_; }
  // "C_Sign: 120 (CKR_OK 118, CKR_DEVICE_ERROR 2); ..." for the test log.
  std::string summary() const;

 private:
  // Looked up by string_view: a record allocates only for a name and code
  // not seen before. A traffic thread that allocates on every call could be
  // inside the allocator when another thread forks, and GCC 12's
  // AddressSanitizer does not lock its allocator around fork(), so the child
  // could hang on that lock (docs/design.md, "How it is tested").
  std::map<std::string, std::map<CK_RV, unsigned long>, std::less<>> by_call_;
  std::vector<std::string> unexpected_;  // the first few, as text
  unsigned long unexpected_count_ = 0;
  unsigned long invalid_count_ = 0;
  unsigned long calls_ = 0;
  std::vector<CK_RV> everywhere_;
};

// ---- threads ----

// Runs body(i) on `count` threads released together, and joins them. If they
// have not all returned within kLivenessGuard, prints what is stuck and ends
// the process (exit code 3): a hang must fail the test, not stall CI.
void run_threads(std::size_t count, const std::function<void(std::size_t)>& body, const char* what);

// A liveness guard for one wait (a forked child, a future).
[[noreturn]] void hung(const std::string& what);

// Prints every thread's stack of process `pid` (a hung forked child) to
// stderr with gdb, when gdb is installed: a hang in CI must say where.
void print_stacks(int pid);

// ---- objects ----

using Bytes = std::vector<CK_BYTE>;

// A CKA_TOKEN/CKA_PRIVATE-false EC key pair labelled `label` for signing
// (mock: fake EC; SoftHSM2: P-256). Non-private, so logouts by other threads
// do not change what the signers see. Token objects survive HSM restarts.
struct KeyPair {
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
};
KeyPair make_sign_key(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE rw_session, const char* label,
                      bool token_object);

}  // namespace p11mux::reliability
