// What a run of p11mux-load does, parsed from the command line. Pure logic:
// no PKCS#11 calls, no environment, no terminal; main.cpp supplies those.
#pragma once

#include <p11mux/pkcs11.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace p11mux::load {

// Bad command line: main prints "p11mux-load: error: <what>" and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class OpKind : std::uint8_t {
  random,
  digest,
  sign_ec,
  verify_ec,
  sign_rsa,
  verify_rsa,
  aes_gcm,
  open_close,
  login_logout,
  find,
};
inline constexpr std::size_t kOpKinds = 10;

std::string_view op_name(OpKind op);
std::optional<OpKind> op_from_name(std::string_view name);
// "random, digest, ..." for messages.
std::string all_op_names();

struct MixEntry {
  OpKind op;
  std::uint32_t weight;
};

// A weighted set of operations, e.g. "sign-ec:3,digest:1". Each op of a run is
// drawn independently: with the mix above, 3 in 4 ops are sign-ec on average.
class Mix {
 public:
  // Throws UsageError on unknown names, bad or zero weights, duplicates.
  static Mix parse(std::string_view spec);

  const std::vector<MixEntry>& entries() const { return entries_; }
  std::uint64_t total_weight() const { return cumulative_.empty() ? 0 : cumulative_.back(); }
  bool contains(OpKind op) const;
  // Index into entries() for a uniformly random r: entry i is chosen for
  // weight_i of every total_weight() consecutive values of r.
  std::size_t pick(std::uint64_t r) const;
  // Canonical spelling, "sign-ec:3,digest:1" (":1" omitted).
  std::string to_string() const;

 private:
  std::vector<MixEntry> entries_;
  std::vector<std::uint64_t> cumulative_;
};

enum class SessionMode { per_thread, shared, per_op };
std::string_view session_mode_name(SessionMode mode);

inline constexpr unsigned kMaxThreads = 10000;
inline constexpr double kDefaultDuration = 10.0;
inline constexpr unsigned kDefaultVerifyEvery = 16;
inline constexpr unsigned kMaxTimelineMs = 60000;

struct Plan {
  std::string module;
  std::optional<std::string> token_label;
  std::optional<CK_SLOT_ID> slot;
  std::optional<std::string> pin;  // from --pin only; the environment is main's business
  bool login = true;
  bool create_keys = true;
  bool list_tokens = false;

  Mix mix;
  SessionMode sessions = SessionMode::per_thread;
  unsigned threads = 1;
  std::optional<double> duration;               // seconds; set unless count is
  std::optional<std::uint64_t> count;           // total measured ops
  double warmup = 0.0;                          // seconds
  std::optional<double> rate;                   // ops per second, all threads together
  unsigned verify_every = kDefaultVerifyEvery;  // 1 = --verify-all

  bool json = false;
  bool quiet = false;
  std::optional<std::string> stats_url;  // p11mux's metrics endpoint, checked by parse_stats_url
  std::optional<unsigned> timeline_ms;   // ops and errors per interval (timeline.h)
};

struct ParseResult {
  enum class Kind { run, help, version };
  Kind kind = Kind::run;
  Plan plan;         // for run
  std::string text;  // for help and version
};

// Parses argv (argv[0] ignored). Throws UsageError for anything invalid, with a
// message that names the option and the problem.
ParseResult parse_command_line(int argc, const char* const argv[]);

}  // namespace p11mux::load
