// Issue 15, "the slow test backend with a session limit, for capacity"
// (docs/groups.md, "Tests"): a group of three SoftHSM2 tokens holding the same
// keys (support/replicated_tokens.h) behind the slow backend
// (tests/backends/faulty, libp11mux-slow.so; P11MUX_TEST_SLOW), each token
// taking at most 4 sessions, and many more threads signing through p11mux
// (P11MUX_TEST_MODULE) with [pool] bind = state, which lets many application
// sessions share few backend sessions (README, "Session pool"). Functional
// only: no figure of speed is checked (scripts/bench.sh --only groups
// measures it).
#include "support/ckr_names.h"
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/faulty_module.h"
#include "support/replicated_tokens.h"
#include "support/temp_dir.h"
#include "support/threads.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace p11test;

namespace {

constexpr unsigned long kMemberLimit = 4;  // P11MUX_FAULTY_MAX_SLOT_SESSIONS
constexpr std::size_t kThreads = 32;
constexpr int kSignatures = 50;  // per thread

// GET /metrics on p11mux's metrics socket (P11MUX_METRICS_LISTEN); empty if
// it cannot be reached.
std::string metrics(const std::string& socket_path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, socket_path.c_str(), sizeof sa.sun_path - 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return {};
  std::string raw;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const std::string req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
    if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;)
        raw.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  return raw;
}

// The value of series name{labels} in a Prometheus text, if there.
std::optional<double> series(const std::string& text, const std::string& name_and_labels) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.starts_with(name_and_labels + " "))
      return std::stod(line.substr(name_and_labels.size()));
  return std::nullopt;
}

enum class Sessions { per_thread, shared };

// p11mux over the slow module over the replicated tokens, one group of them
// all; a thread samples each member's open sessions as the slow module counts
// them, so that the highest seen can be checked against the limit.
struct CapacityGroup {
  explicit CapacityGroup(const char* mode)
      : tokens(3),  // before p11mux: SoftHSM2 reads SOFTHSM2_CONF at C_Initialize
        dir("p11mux-group-capacity-"),
        slow_path(required_env("P11MUX_TEST_SLOW")),
        socket_path((dir.path() / "metrics.sock").string()),
        config("P11MUX_CONFIG", write_conf()),
        no_module("P11MUX_MODULE", ""),
        session_mode("P11MUX_SESSION_MODE", mode),
        metrics_listen("P11MUX_METRICS_LISTEN", socket_path),
        target("P11MUX_FAULTY_TARGET",
               env_or("P11MUX_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so")),
        // A fifth of a millisecond per crypto call: a network HSM, made quick.
        latency("P11MUX_FAULTY_LATENCY", "open=200,close=200,login=200,crypto=200"),
        limit("P11MUX_FAULTY_MAX_SLOT_SESSIONS", std::to_string(kMemberLimit)),
        slow(faulty_control(slow_path)),
        reset(slow.reset() == 0),  // counters zero, the environment above read
        module(required_env("P11MUX_TEST_MODULE")),
        p11(module.fn()),
        slots(replica_slots(loaded_functions(slow_path), tokens)),
        highest(slots.size()) {}
  // No faulty reset here: it would finalize the slow module under p11mux,
  // which finalizes it itself; the next test's constructor resets it.
  ~CapacityGroup() { stop_sampling(); }
  CapacityGroup(const CapacityGroup&) = delete;
  CapacityGroup& operator=(const CapacityGroup&) = delete;

  std::string write_conf() const {
    const std::string conf = (dir.path() / "p11mux.conf").string();
    std::ofstream out(conf);
    out << "[backend.slow]\nmodule = " << slow_path << "\n[group.signing]\nmembers = ";
    for (std::size_t i = 0; i < tokens.size(); ++i)
      out << (i == 0 ? "" : ", ") << "slow/label:" << tokens.label(i);
    out << "\n[pool]\nbind = state\n";
    return conf;
  }

  void start_sampling() {
    sampler = std::thread([this] {
      while (!done.load()) {
        for (std::size_t i = 0; i < slots.size(); ++i) {
          FaultySlotStats s{};
          slow.slot_stats(slots[i], &s);
          highest[i] = std::max(highest[i], s.sessions_open);
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  void stop_sampling() {
    done = true;
    if (sampler.joinable()) sampler.join();
  }

  std::string member(std::size_t i) const { return "slow/label:" + tokens.label(i); }

  ReplicatedTokens tokens;
  TempDir dir;
  std::string slow_path, socket_path;
  ScopedEnv config, no_module, session_mode, metrics_listen, target, latency, limit;
  const FaultyControl& slow;
  bool reset;
  Module module;
  const CK_FUNCTION_LIST& p11;
  std::vector<CK_SLOT_ID> slots;       // SoftHSM2's, of each member's token
  std::vector<unsigned long> highest;  // sessions open on each member, the most sampled
  std::atomic<bool> done{false};
  std::thread sampler;
};

// A session on the group's slot (0), closed at the end; throws on failure.
struct GroupSession {
  GroupSession(const CK_FUNCTION_LIST& fn, std::atomic<unsigned long>& errors) : p11(fn) {
    const CK_RV rv = fn.C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &handle);
    if (rv != CKR_OK) {
      ++errors;
      throw std::runtime_error("C_OpenSession: " + ckr_string(rv));
    }
  }
  ~GroupSession() { p11.C_CloseSession(handle); }
  GroupSession(const GroupSession&) = delete;
  GroupSession& operator=(const GroupSession&) = delete;
  const CK_FUNCTION_LIST& p11;
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
};

// kThreads threads, each signing kSignatures times (C_SignInit + C_Sign,
// ECDSA on the replicated EC key) on its own session or all on one, then
// verifying each of its signatures on the same session.
void sign_from_threads(CapacityGroup& g, Sessions sessions) {
  const CK_FUNCTION_LIST& p11 = g.p11;
  std::atomic<unsigned long> errors{0}, signed_ok{0}, verified{0};
  // The application's login, kept by a session open throughout: every
  // session of the group sees it (docs/groups.md, "Keeping the PIN").
  GroupSession anchor(p11, errors);
  REQUIRE_RV(login_user(p11, anchor.handle, kUserPin), CKR_OK);
  const CK_OBJECT_HANDLE priv =
      require_replica_key(p11, anchor.handle, CKO_PRIVATE_KEY, kReplicaEc);
  const CK_OBJECT_HANDLE pub = require_replica_key(p11, anchor.handle, CKO_PUBLIC_KEY, kReplicaEc);

  g.start_sampling();
  const std::vector<std::string> failures = run_in_threads(kThreads, [&](std::size_t t) {
    std::optional<GroupSession> own;
    if (sessions == Sessions::per_thread) own.emplace(p11, errors);
    const CK_SESSION_HANDLE s = own ? own->handle : anchor.handle;
    CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
    auto fail = [&](const char* call, CK_RV rv) {
      ++errors;
      throw std::runtime_error(std::string(call) + ": " + ckr_string(rv));
    };
    std::vector<std::vector<CK_BYTE>> sigs(kSignatures);
    auto digest = [&](int i) {
      std::vector<CK_BYTE> d(32, static_cast<CK_BYTE>(i));
      d[0] = static_cast<CK_BYTE>(t);
      return d;
    };
    for (int i = 0; i < kSignatures; ++i) {
      std::vector<CK_BYTE> d = digest(i);
      sigs[i].resize(64);
      CK_ULONG len = sigs[i].size();
      if (CK_RV rv = p11.C_SignInit(s, &ecdsa, priv); rv != CKR_OK) fail("C_SignInit", rv);
      if (CK_RV rv = p11.C_Sign(s, d.data(), d.size(), sigs[i].data(), &len); rv != CKR_OK)
        fail("C_Sign", rv);
      sigs[i].resize(len);
      ++signed_ok;
    }
    for (int i = 0; i < kSignatures; ++i) {
      std::vector<CK_BYTE> d = digest(i);
      if (CK_RV rv = p11.C_VerifyInit(s, &ecdsa, pub); rv != CKR_OK) fail("C_VerifyInit", rv);
      if (CK_RV rv = p11.C_Verify(s, d.data(), d.size(), sigs[i].data(), sigs[i].size());
          rv != CKR_OK)
        fail("C_Verify", rv);
      ++verified;
    }
  });
  g.stop_sampling();

  for (const std::string& f : failures) MESSAGE(f);
  CHECK(failures.empty());
  CHECK(errors.load() == 0);
  CHECK(signed_ok.load() == kThreads * kSignatures);
  CHECK(verified.load() == kThreads * kSignatures);

  // Every member carried calls (p11mux's own per-member figures).
  const std::string text = metrics(g.socket_path);
  REQUIRE_MESSAGE(text.starts_with("HTTP/1."), "the metrics socket answered nothing");
  double total = 0;
  for (std::size_t i = 0; i < g.slots.size(); ++i) {
    const std::optional<double> calls =
        series(text, "p11mux_member_calls_total{group=\"signing\",member=\"" + g.member(i) + "\"}");
    REQUIRE_MESSAGE(calls.has_value(), g.member(i));
    MESSAGE(g.member(i) << ": " << *calls << " calls, at most " << g.highest[i]
                        << " sessions open seen");
    CHECK(*calls > 0);
    total += *calls;
    // Within the member's limit, as the slow module counted its sessions.
    CHECK(g.highest[i] <= kMemberLimit);
  }
  CHECK(total >= 2.0 * kThreads * kSignatures);  // the Inits and the signatures at least

  // p11mux kept within the limit: it learns it from the token's first
  // CKR_SESSION_COUNT (SoftHSM2's token gives none), so each member may
  // refuse an open once or a few times while opens race, never once per call.
  FaultyStats stats{};
  g.slow.stats(&stats);
  MESSAGE("CKR_SESSION_COUNT refusals by the slow module: " << stats.session_count_refusals
                                                            << ", most sessions open at once: "
                                                            << stats.max_sessions_open);
  CHECK(stats.max_sessions_open <= kMemberLimit * g.slots.size());
  CHECK(stats.session_count_refusals <= kThreads);
}

}  // namespace

TEST_CASE("group capacity over the slow backend: serialize mode, a session per thread") {
  CapacityGroup g("serialize");
  REQUIRE(g.reset);
  sign_from_threads(g, Sessions::per_thread);
}

TEST_CASE("group capacity over the slow backend: multiplex mode, a session per thread") {
  CapacityGroup g("multiplex");
  REQUIRE(g.reset);
  sign_from_threads(g, Sessions::per_thread);
}

TEST_CASE("group capacity over the slow backend: multiplex mode, one session shared") {
  CapacityGroup g("multiplex");
  REQUIRE(g.reset);
  sign_from_threads(g, Sessions::shared);
}
