#include "plan.h"

#include <array>
#include <boost/program_options.hpp>
#include <charconv>
#include <cmath>
#include <sstream>

#include "p11mux_stats.h"

namespace po = boost::program_options;

namespace p11mux::load {
namespace {

constexpr std::array<std::string_view, kOpKinds> kOpNames = {
    "random",     "digest",  "sign-ec",    "verify-ec",    "sign-rsa",
    "verify-rsa", "aes-gcm", "open-close", "login-logout", "find",
};

constexpr std::uint32_t kMaxWeight = 1000000;
constexpr unsigned kHelpWidth = 88;

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

const char* const kUsage =
    "Usage: p11mux-load --module PATH [options]\n"
    "\n"
    "Load and concurrency tester for any PKCS#11 module: runs a weighted mix of\n"
    "operations from many threads, checks every result, and reports throughput,\n"
    "latency percentiles, errors by CKR name, collisions and verification failures.\n";

const char* const kNotes =
    "\nOperations (--op NAME[:WEIGHT],...; each op is drawn at random by weight):\n"
    "  random        C_GenerateRandom, 32 bytes (checked: differs from the previous output)\n"
    "  digest        C_DigestInit(CKM_SHA256) + C_Digest(\"abc\") (checked: the FIPS 180 value)\n"
    "  sign-ec       C_SignInit(CKM_ECDSA, P-256 key) + C_Sign(SHA-256 hash); every Nth\n"
    "                signature is verified with C_Verify (see --verify-every)\n"
    "  verify-ec     C_VerifyInit + C_Verify of a good signature (must pass); every Nth op\n"
    "                also checks that a corrupted signature fails\n"
    "  sign-rsa, verify-rsa   the same with CKM_SHA256_RSA_PKCS and RSA-2048\n"
    "  aes-gcm       CKM_AES_GCM (AES-256) encrypt 1 KiB with a fresh 12-byte IV, then\n"
    "                decrypt; the result must equal the plaintext\n"
    "  open-close    C_OpenSession + C_CloseSession (ignores --sessions)\n"
    "  login-logout  C_OpenSession + C_Login(CKU_USER) + C_Logout + C_CloseSession.\n"
    "                Login state belongs to the whole token, so this op must be the only\n"
    "                one in the mix, the tool itself does not log in, and it always uses\n"
    "                a fresh session per op. With several threads, C_Login returning\n"
    "                CKR_USER_ALREADY_LOGGED_IN means another thread holds the login: it\n"
    "                is counted as a collision and retried, so logins are serialized.\n"
    "  find          C_FindObjectsInit(CKA_LABEL=p11mux-load-ec) + C_FindObjects +\n"
    "                C_FindObjectsFinal (checked: the number of objects found at setup)\n"
    "Keys are token objects labelled p11mux-load-ec, p11mux-load-rsa and p11mux-load-aes;\n"
    "missing ones are generated unless --no-create-keys is given.\n"
    "\n"
    "Sessions (--sessions):\n"
    "  per-thread    each thread opens one session and keeps it (default)\n"
    "  per-op        each op opens and closes its own session (timed as part of the op)\n"
    "  shared        all threads use ONE session, concurrently. The PKCS#11 spec allows\n"
    "                only one call at a time per session: a plain module such as SoftHSM2\n"
    "                may crash (SIGSEGV) here, which is the point of testing a proxy like\n"
    "                p11mux. CKR_OPERATION_ACTIVE from C_*Init when threads collide is a\n"
    "                valid outcome: it is counted as a collision, not an error, and retried.\n"
    "\n"
    "Throughput (ops/s): with --duration, the ops that ENDED inside the measured window\n"
    "(those issued during the warmup too), divided by the window's length: the rate the\n"
    "module completed ops at. Ops still in flight at its end are reported as \"after\"\n"
    "and left out of ops/s and latency, but their errors still count. (Ops issued in\n"
    "the window over the time until the last of them ended would add one queue wait to\n"
    "the time: 5.5% with 256 threads waiting for 4 HSM sessions over 1.5 s.) With\n"
    "--count, the measured ops divided by the time until the last of them ended.\n"
    "Ctrl-C ends the window where it came.\n"
    "\n"
    "Latency: measured per op from its start to its end; sampled verification is not\n"
    "timed. Only ops that succeeded are in the histogram. With --rate, ops follow a fixed\n"
    "schedule (op k of the run is due at start + k/rate) and latency is measured from the\n"
    "op's SCHEDULED start, so time spent waiting because the module (or the threads) fell\n"
    "behind counts too (no coordinated omission). The service time (from the actual\n"
    "start) is reported beside it.\n"
    "\n"
    "PIN: --pin, else the environment variable P11MUX_LOAD_PIN, else a prompt on the\n"
    "terminal (echo off). Note that --pin is visible to other users in the process list.\n"
    "The PIN is never printed or logged.\n"
    "\n"
    "p11mux's figures (--stats-url, with p11mux's [metrics] listen set): once a second\n"
    "a line on stderr with its calls/s, errors/s, session lock wait and pool use, and a\n"
    "summary line after the report (not with --json).\n"
    "\n"
    "Timeline (--timeline MS): successful ops and errors in each MS of the measured phase,\n"
    "by each op's end, after the report (in --json: \"timeline\", with the wall-clock time\n"
    "the measured phase began, to line it up with events elsewhere, such as a fault).\n"
    "\n"
    "Exit status: 0 success; 1 if any error or verification failure happened in an op\n"
    "measured or ending after the window (collisions and warmup errors do not count);\n"
    "2 bad usage or setup.\n"
    "\n"
    "Examples:\n"
    "  p11mux-load --module /usr/lib/softhsm/libsofthsm2.so --token-label load \\\n"
    "              --op sign-ec --threads 4 --duration 10\n"
    "  P11MUX_LOAD_PIN=123456 p11mux-load --module ./libp11mux.so --op sign-ec:3,digest:1 \\\n"
    "              --threads 64 --sessions shared --warmup 2 --duration 30 --json\n"
    "  p11mux-load --module libvendor.so --slot 0 --op sign-rsa --rate 200 --threads 16 \\\n"
    "              --duration 60        # latency at a fixed 200 ops/s\n"
    "  p11mux-load --module libvendor.so --op random --count 100000 --no-login --quiet\n"
    "  p11mux-load --module libvendor.so --list-tokens\n";

// Strict number parsing: Boost's lexical_cast accepts "-1" for unsigned types.
template <class T>
T parse_number(const std::string& text, const char* option) {
  T value{};
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(begin, end, value);
  if (ec != std::errc() || ptr != end || text.empty()) {
    throw UsageError("--" + std::string(option) + ": '" + text + "' is not a valid number");
  }
  return value;
}

double parse_seconds(const std::string& text, const char* option, bool allow_zero) {
  // from_chars for double exists in GCC 12's libstdc++.
  double v = parse_number<double>(text, option);
  if (!std::isfinite(v) || v < 0.0 || (!allow_zero && v == 0.0)) {
    throw UsageError("--" + std::string(option) + ": '" + text + "' must be a number of seconds " +
                     (allow_zero ? ">= 0" : "> 0"));
  }
  return v;
}

// clang-format off (one option per line)
po::options_description make_options() {
  po::options_description target("Module and token", kHelpWidth, kHelpWidth / 2);
  target.add_options()("module", po::value<std::string>()->value_name("PATH"),
                       "PKCS#11 module to load (required)")(
      "token-label", po::value<std::string>()->value_name("LABEL"), "use the token with this label")(
      "slot", po::value<std::string>()->value_name("N"),
      "use the token in slot ID N (default: first slot with a token)")(
      "pin", po::value<std::string>()->value_name("PIN"), "user PIN (else $P11MUX_LOAD_PIN, else a prompt)")(
      "no-login", "do not log in (only public objects and keyless ops)")(
      "create-keys", "generate missing keys (default)")("no-create-keys",
                                                        "fail if a key the mix needs is missing")(
      "list-tokens", "list the module's slots and tokens, then exit");

  po::options_description load("Load", kHelpWidth, kHelpWidth / 2);
  load.add_options()("op", po::value<std::vector<std::string>>()->composing()->value_name("NAME[:W],..."),
                     "operations and weights (default: random); may be repeated")(
      "threads", po::value<std::string>()->value_name("N"), "worker threads, 1..10000 (default 1)")(
      "sessions", po::value<std::string>()->value_name("MODE"),
      "per-thread | shared | per-op (default per-thread)")("duration",
                                                           po::value<std::string>()->value_name("SECONDS"),
                                                           "measured window (default 10 unless --count)")(
      "count", po::value<std::string>()->value_name("N"), "measured ops in total, instead of --duration")(
      "warmup", po::value<std::string>()->value_name("SECONDS"),
      "run this long first without measuring (default 0)")(
      "rate", po::value<std::string>()->value_name("OPS_PER_SEC"),
      "pace all threads together to this rate (default: unpaced)")(
      "verify-every", po::value<std::string>()->value_name("N"),
      "verify every Nth signature per thread and op (default 16)")(
      "verify-all", "verify every signature (same as --verify-every 1)");

  po::options_description output("Output", kHelpWidth, kHelpWidth / 2);
  output.add_options()("json", "print the summary as one JSON object on stdout")(
      "quiet,q", "no progress lines on stderr")(
      "stats-url", po::value<std::string>()->value_name("URL"),
      "show p11mux's own figures live from its metrics endpoint: http://HOST:PORT or unix:PATH")(
      "timeline", po::value<std::string>()->value_name("MS"),
      "also report successful ops and errors per MS milliseconds of the measured phase")(
      "help,h", "show this help")("version", "show the version");

  po::options_description all(kHelpWidth, kHelpWidth / 2);
  all.add(target).add(load).add(output);
  return all;
}
// clang-format on

std::string help_text(const po::options_description& options) {
  std::ostringstream out;
  out << kUsage << options << kNotes;
  return out.str();
}

}  // namespace

std::string_view op_name(OpKind op) { return kOpNames[static_cast<std::size_t>(op)]; }

std::optional<OpKind> op_from_name(std::string_view name) {
  for (std::size_t i = 0; i < kOpNames.size(); ++i) {
    if (kOpNames[i] == name) return static_cast<OpKind>(i);
  }
  return std::nullopt;
}

std::string all_op_names() {
  std::string out;
  for (std::string_view n : kOpNames) {
    if (!out.empty()) out += ", ";
    out += n;
  }
  return out;
}

Mix Mix::parse(std::string_view spec) {
  Mix mix;
  std::uint64_t total = 0;
  while (true) {
    std::size_t comma = spec.find(',');
    std::string_view item = trim(spec.substr(0, comma));
    if (item.empty()) throw UsageError("--op: empty operation name in '" + std::string(spec) + "'");
    std::string_view name = item;
    std::uint32_t weight = 1;
    if (std::size_t colon = item.find(':'); colon != std::string_view::npos) {
      name = trim(item.substr(0, colon));
      std::string_view w = trim(item.substr(colon + 1));
      std::uint64_t parsed = 0;
      auto [ptr, ec] = std::from_chars(w.data(), w.data() + w.size(), parsed);
      if (w.empty() || ec != std::errc() || ptr != w.data() + w.size() || parsed == 0 ||
          parsed > kMaxWeight) {
        throw UsageError("--op: weight '" + std::string(w) + "' of " + std::string(name) +
                         " must be a whole number from 1 to " + std::to_string(kMaxWeight));
      }
      weight = static_cast<std::uint32_t>(parsed);
    }
    std::optional<OpKind> op = op_from_name(name);
    if (!op) {
      throw UsageError("--op: unknown operation '" + std::string(name) + "' (known: " + all_op_names() + ")");
    }
    if (mix.contains(*op)) throw UsageError("--op: " + std::string(name) + " is listed twice");
    total += weight;
    mix.entries_.push_back({*op, weight});
    mix.cumulative_.push_back(total);
    if (comma == std::string_view::npos) break;
    spec.remove_prefix(comma + 1);
  }
  return mix;
}

bool Mix::contains(OpKind op) const {
  for (const MixEntry& e : entries_) {
    if (e.op == op) return true;
  }
  return false;
}

std::size_t Mix::pick(std::uint64_t r) const {
  if (entries_.size() == 1) return 0;
  std::uint64_t x = r % cumulative_.back();
  std::size_t i = 0;
  while (x >= cumulative_[i]) ++i;  // mixes are short: a linear scan beats a binary search
  return i;
}

std::string Mix::to_string() const {
  std::string out;
  for (const MixEntry& e : entries_) {
    if (!out.empty()) out += ',';
    out += op_name(e.op);
    if (e.weight != 1) out += ':' + std::to_string(e.weight);
  }
  return out;
}

std::string_view session_mode_name(SessionMode mode) {
  switch (mode) {
    case SessionMode::per_thread:
      return "per-thread";
    case SessionMode::shared:
      return "shared";
    case SessionMode::per_op:
      return "per-op";
  }
  return "?";
}

ParseResult parse_command_line(int argc, const char* const argv[]) {
  po::options_description options = make_options();
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(options).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(std::string(e.what()) + " (see --help)");
  }

  ParseResult result;
  if (vm.count("help")) {
    result.kind = ParseResult::Kind::help;
    result.text = help_text(options);
    return result;
  }
  if (vm.count("version")) {
    result.kind = ParseResult::Kind::version;
    result.text = "p11mux-load (p11mux) 0.1.0\n";
    return result;
  }

  auto str = [&](const char* name) { return vm[name].as<std::string>(); };
  Plan& p = result.plan;

  if (!vm.count("module")) throw UsageError("--module PATH is required (see --help)");
  p.module = str("module");
  if (p.module.empty()) throw UsageError("--module: empty path");

  if (vm.count("token-label") && vm.count("slot")) {
    throw UsageError("--token-label and --slot both choose the token: give only one");
  }
  if (vm.count("token-label")) p.token_label = str("token-label");
  if (vm.count("slot")) p.slot = parse_number<CK_SLOT_ID>(str("slot"), "slot");
  if (vm.count("pin")) p.pin = str("pin");
  p.login = !vm.count("no-login");
  if (vm.count("create-keys") && vm.count("no-create-keys")) {
    throw UsageError("--create-keys and --no-create-keys contradict each other");
  }
  p.create_keys = !vm.count("no-create-keys");
  p.list_tokens = vm.count("list-tokens") > 0;

  std::string spec;
  if (vm.count("op")) {
    for (const std::string& s : vm["op"].as<std::vector<std::string>>()) {
      if (!spec.empty()) spec += ',';
      spec += s;
    }
  } else {
    spec = "random";
  }
  p.mix = Mix::parse(spec);

  if (vm.count("threads")) {
    unsigned long t = parse_number<unsigned long>(str("threads"), "threads");
    if (t < 1 || t > kMaxThreads) {
      throw UsageError("--threads: " + str("threads") + " is out of range 1.." + std::to_string(kMaxThreads));
    }
    p.threads = static_cast<unsigned>(t);
  }

  bool sessions_given = vm.count("sessions") > 0;
  if (sessions_given) {
    std::string m = str("sessions");
    if (m == "per-thread") {
      p.sessions = SessionMode::per_thread;
    } else if (m == "shared") {
      p.sessions = SessionMode::shared;
    } else if (m == "per-op") {
      p.sessions = SessionMode::per_op;
    } else {
      throw UsageError("--sessions: unknown mode '" + m + "' (known: per-thread, shared, per-op)");
    }
  }

  if (vm.count("duration") && vm.count("count")) {
    throw UsageError("--duration and --count both end the run: give only one");
  }
  if (vm.count("count")) {
    p.count = parse_number<std::uint64_t>(str("count"), "count");
    if (*p.count == 0) throw UsageError("--count: must be at least 1");
  } else if (vm.count("duration")) {
    p.duration = parse_seconds(str("duration"), "duration", false);
  } else {
    p.duration = kDefaultDuration;
  }
  if (vm.count("warmup")) p.warmup = parse_seconds(str("warmup"), "warmup", true);
  if (vm.count("rate")) {
    p.rate = parse_number<double>(str("rate"), "rate");
    if (!std::isfinite(*p.rate) || *p.rate <= 0.0 || *p.rate > 1e9) {
      throw UsageError("--rate: '" + str("rate") + "' must be a number of ops per second > 0");
    }
  }
  if (vm.count("verify-every")) {
    unsigned long n = parse_number<unsigned long>(str("verify-every"), "verify-every");
    if (n < 1 || n > 1000000000UL) throw UsageError("--verify-every: must be from 1 to 1000000000");
    p.verify_every = static_cast<unsigned>(n);
  }
  if (vm.count("verify-all")) {
    if (vm.count("verify-every")) throw UsageError("--verify-all and --verify-every: give only one");
    p.verify_every = 1;
  }
  p.json = vm.count("json") > 0;
  p.quiet = vm.count("quiet") > 0;
  if (vm.count("stats-url")) {
    (void)parse_stats_url(str("stats-url"));  // a bad URL is a usage error, before any setup
    p.stats_url = str("stats-url");
  }

  if (vm.count("timeline")) {
    unsigned long ms = parse_number<unsigned long>(str("timeline"), "timeline");
    if (ms < 1 || ms > kMaxTimelineMs) {
      throw UsageError("--timeline: " + str("timeline") + " is out of range 1.." +
                       std::to_string(kMaxTimelineMs) + " (milliseconds)");
    }
    // Its counters are sized from the duration before the run.
    if (!p.duration) throw UsageError("--timeline needs --duration, not --count");
    p.timeline_ms = static_cast<unsigned>(ms);
  }

  if (p.mix.contains(OpKind::login_logout)) {
    if (p.mix.entries().size() != 1) {
      throw UsageError(
          "--op: login-logout changes the login state of the whole token and cannot be mixed "
          "with other ops");
    }
    if (!p.login) throw UsageError("--op login-logout needs a PIN: drop --no-login");
    if (sessions_given && p.sessions != SessionMode::per_op) {
      throw UsageError(
          "--op login-logout always uses a fresh session per op: use --sessions per-op "
          "or leave --sessions out");
    }
    p.sessions = SessionMode::per_op;
  }
  return result;
}

}  // namespace p11mux::load
