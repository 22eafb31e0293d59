// Counters each worker thread keeps for itself, and their merge into a Summary.
// A worker writes only its own ThreadStats; the progress reporter reads just
// the two live_* atomics; everything else is read after the threads joined.
#pragma once

#include <p11mux/pkcs11.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <tuple>

#include "histogram.h"
#include "plan.h"
#include "timeline.h"

namespace p11mux::load {

// The PKCS#11 function an error came from.
enum class Call : std::uint8_t {
  GenerateRandom,
  DigestInit,
  Digest,
  SignInit,
  Sign,
  VerifyInit,
  Verify,
  EncryptInit,
  Encrypt,
  DecryptInit,
  Decrypt,
  OpenSession,
  CloseSession,
  Login,
  Logout,
  FindObjectsInit,
  FindObjects,
  FindObjectsFinal,
};
std::string_view call_name(Call call);

// What one op did. rv != CKR_OK means an error in `call`.
struct Outcome {
  CK_RV rv = CKR_OK;
  Call call = Call::GenerateRandom;
  std::uint32_t collisions = 0;  // CKR_OPERATION_ACTIVE / CKR_USER_ALREADY_LOGGED_IN, retried
  std::uint32_t checks = 0;      // results verified
  std::uint32_t check_failures = 0;
  bool abandoned = false;  // gave up retrying because the run is stopping: not counted

  bool ok() const { return rv == CKR_OK; }
};

struct OpStats {
  LatencyHistogram latency;  // successful measured ops
  std::uint64_t ops = 0;
  std::uint64_t errors = 0;
  std::uint64_t collisions = 0;
  std::uint64_t checks = 0;
  std::uint64_t check_failures = 0;

  void merge(const OpStats& o) noexcept;
};

// Errors by (op, call, rv) in a fixed table: recording one never allocates.
class ErrorTable {
 public:
  static constexpr std::size_t kSlots = 16;
  struct Entry {
    OpKind op;
    Call call;
    CK_RV rv;
    std::uint64_t count;
  };
  void add(OpKind op, Call call, CK_RV rv) noexcept;
  const Entry* begin() const noexcept { return entries_.data(); }
  const Entry* end() const noexcept { return entries_.data() + used_; }
  std::uint64_t overflow() const noexcept { return overflow_; }  // distinct kinds beyond kSlots

 private:
  std::array<Entry, kSlots> entries_{};
  std::size_t used_ = 0;
  std::uint64_t overflow_ = 0;
};

// Ops in flight at the end of a --duration window, which ended after it
// (window.h): left out of ops/s and latency, but their failures still fail
// the run.
struct AfterWindow {
  std::uint64_t ops = 0;
  std::uint64_t errors = 0;
  std::uint64_t check_failures = 0;
  ErrorTable kinds;
};

struct alignas(64) ThreadStats {
  // Allocated before the thread starts, for the ops in the mix only.
  ThreadStats(const Mix& mix, bool track_service_time);

  std::array<std::unique_ptr<OpStats>, kOpKinds> per_op;
  std::unique_ptr<LatencyHistogram> service;  // with --rate: from the actual start
  ErrorTable errors;
  std::uint64_t warmup_ops = 0;
  std::uint64_t warmup_errors = 0;
  AfterWindow after_window;
  std::uint64_t last_end_ns = 0;  // of the last measured op, since the measured phase began

  // Single writer (the worker), read by the progress line: relaxed is enough.
  std::atomic<std::uint64_t> live_ops{0};
  std::atomic<std::uint64_t> live_errors{0};

  void bump(std::atomic<std::uint64_t>& c) noexcept {
    c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
};

struct ErrorKey {
  OpKind op;
  Call call;
  CK_RV rv;
  bool operator<(const ErrorKey& o) const { return std::tie(op, call, rv) < std::tie(o.op, o.call, o.rv); }
};

// Everything the reports show, merged from all threads.
struct Summary {
  std::array<std::unique_ptr<OpStats>, kOpKinds> per_op;  // ops in the mix
  OpStats total;
  std::unique_ptr<LatencyHistogram> service;
  std::map<ErrorKey, std::uint64_t> errors;
  std::map<CK_RV, std::uint64_t> errors_by_rv;
  std::uint64_t error_overflow = 0;
  std::uint64_t warmup_ops = 0;
  std::uint64_t warmup_errors = 0;
  struct AfterWindowSummary {
    std::uint64_t ops = 0;
    std::uint64_t errors = 0;
    std::uint64_t check_failures = 0;
    std::map<ErrorKey, std::uint64_t> kinds;
    std::uint64_t overflow = 0;  // distinct kinds beyond the threads' tables
  };
  AfterWindowSummary after_window;
  // Seconds ops/s divides by (MeasuredWindow::seconds): the window's length
  // with --duration, until the last measured op ended with --count.
  double elapsed = 0.0;
  bool interrupted = false;
  std::optional<TimelineReport> timeline;  // with --timeline

  double ops_per_sec() const { return elapsed > 0 ? static_cast<double>(total.ops) / elapsed : 0.0; }
  bool failed() const {
    return total.errors > 0 || total.check_failures > 0 || after_window.errors > 0 ||
           after_window.check_failures > 0;
  }
};

Summary merge_stats(const Mix& mix, const std::vector<std::unique_ptr<ThreadStats>>& threads);

}  // namespace p11mux::load
