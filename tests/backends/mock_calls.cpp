// The function table, the configuration and counters, and the call-accounting
// scopes behind global_call / slot_call / session_call.
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <p11mux/functions.h>

#include <iterator>
#include <string_view>

#include "mock_state.h"

namespace p11mux::mock {

const FnInfo kFunctions[kFunctionCount] = {
#define MOCK_INFO(name, kind, op) {#name, Kind::kind, Op::op},
    MOCK_ALL_FUNCTIONS(MOCK_INFO)
#undef MOCK_INFO
};

// The mock's table carries what p11mux's does not (kind, operation); its
// order must stay p11mux's, which the function index and the lists rely on.
namespace {
constexpr std::string_view kMockOrder[] = {
#define MOCK_NAME(name, kind, op) #name,
    MOCK_ALL_FUNCTIONS(MOCK_NAME)
#undef MOCK_NAME
};
constexpr std::string_view kP11muxOrder[] = {
#define P11MUX_NAME(name, since, dispatch, args) #name,
    P11MUX_FUNCTIONS(P11MUX_NAME)
#undef P11MUX_NAME
};
constexpr bool same_order() {
  if (std::size(kMockOrder) != std::size(kP11muxOrder)) return false;
  for (std::size_t i = 0; i < std::size(kMockOrder); ++i)
    if (kMockOrder[i] != kP11muxOrder[i]) return false;
  return true;
}
static_assert(same_order(),
              "mock_function_table.h must list <p11mux/functions.h>'s functions in order");
}  // namespace

int function_index(const char* name) {
  if (name == nullptr) return -1;
  for (std::size_t i = 0; i < kFunctionCount; ++i)
    if (std::strcmp(kFunctions[i].name, name) == 0) return static_cast<int>(i);
  return -1;
}

Module& module() {
  static Module* const instance = new Module;
  return *instance;
}

namespace {

// MockConfig.bend as it is in force: 0 is the library's default, OBEY none.
unsigned long resolve_bend(unsigned long bend) {
  if (bend == 0) bend = kDefaultBend;
  return (bend & MOCK_BEND_OBEY) != 0 ? 0 : bend & MOCK_BEND_ALL;
}

bool parse_number(const char* text, unsigned long& out, int base = 10) {
  char* end = nullptr;
  errno = 0;
  out = std::strtoul(text, &end, base);
  return std::isdigit(static_cast<unsigned char>(text[0])) && *end == '\0' && errno == 0;
}

// MOCK_BEND: a number, or names separated by commas.
bool parse_bend(const char* text, unsigned long& out) {
  if (parse_number(text, out, 0)) return true;
  static constexpr struct {
    std::string_view name;
    unsigned long bits;
  } kNames[] = {{"keep-op", MOCK_BEND_KEEP_OP},
                {"fill-len", MOCK_BEND_FILL_LEN},
                {"reuse-handles", MOCK_BEND_REUSE_HANDLES},
                {"key-mat", MOCK_BEND_KEY_MAT},
                {"transient-count", MOCK_BEND_TRANSIENT_COUNT},
                {"slow-open", MOCK_BEND_SLOW_OPEN},
                {"all", MOCK_BEND_ALL},
                {"none", MOCK_BEND_OBEY}};
  out = 0;
  std::string_view rest(text);
  while (true) {
    std::string_view word = rest.substr(0, rest.find(','));
    bool known = false;
    for (const auto& n : kNames)
      if (word == n.name) {
        out |= n.bits;
        known = true;
      }
    if (!known) return false;
    if (word.size() == rest.size()) return true;
    rest.remove_prefix(word.size() + 1);
  }
}

}  // namespace

bool Settings::apply(const MockConfig& c) {
  char name[sizeof c.fail_function + 1] = {};
  std::memcpy(name, c.fail_function, sizeof c.fail_function);
  int fn = -1;
  if (name[0] != '\0' && (fn = function_index(name)) < 0) return false;

  auto relaxed = std::memory_order_relaxed;
  accept_locking.store(c.accept_locking ? c.accept_locking : kDefaultAcceptLocking, relaxed);
  slot_count.store(c.slot_count ? c.slot_count : 1, relaxed);
  max_sessions.store(c.max_sessions, relaxed);
  token_max_sessions.store(c.token_max_session_count, relaxed);
  token_max_rw_sessions.store(c.token_max_rw_session_count, relaxed);
  call_spin_us.store(c.call_spin_us, relaxed);
  slow_us.store(c.slow_us, relaxed);
  open_session_us.store(c.open_session_us, relaxed);
  fail_rv.store(c.fail_rv, relaxed);
  fail_nth.store(c.fail_nth, relaxed);
  fail_seen.store(0, relaxed);
  fail_fn.store(fn, relaxed);
  provide_v3.store(c.provide_v3 != 0, relaxed);
  wait_blocking_unsupported.store(c.wait_blocking_unsupported != 0, relaxed);
  bend.store(resolve_bend(c.bend), relaxed);
  transient_count_every.store(
      c.transient_count_every ? c.transient_count_every : MOCK_BEND_TRANSIENT_COUNT_EVERY, relaxed);
  opens_seen.store(0, relaxed);
  return true;
}

bool Settings::apply_environment() {
  struct Variable {
    const char* name;
    std::atomic<unsigned long>& field;
    std::optional<unsigned long> value;
  };
  Variable vars[] = {{"MOCK_CALL_SPIN_US", call_spin_us, {}},
                     {"MOCK_SLOW_US", slow_us, {}},
                     {"MOCK_OPEN_SESSION_US", open_session_us, {}},
                     {"MOCK_TRANSIENT_COUNT_EVERY", transient_count_every, {}}};
  for (Variable& v : vars) {
    const char* text = std::getenv(v.name);
    if (text == nullptr) continue;
    unsigned long value = 0;
    if (!parse_number(text, value)) {
      std::fprintf(stderr, "p11mux-mock: %s=%s is not a whole number\n", v.name, text);
      return false;
    }
    v.value = value;
  }
  std::optional<unsigned long> bend_value;
  if (const char* text = std::getenv("MOCK_BEND"); text != nullptr) {
    unsigned long value = 0;
    if (!parse_bend(text, value)) {
      std::fprintf(stderr,
                   "p11mux-mock: MOCK_BEND=%s is neither a number nor a list of keep-op, "
                   "fill-len, reuse-handles, key-mat, transient-count, slow-open, all, none\n",
                   text);
      return false;
    }
    bend_value = resolve_bend(value);
  }
  for (Variable& v : vars)
    if (v.value) v.field.store(*v.value, std::memory_order_relaxed);
  if (transient_count_every.load(std::memory_order_relaxed) == 0)
    transient_count_every.store(MOCK_BEND_TRANSIENT_COUNT_EVERY, std::memory_order_relaxed);
  if (bend_value) bend.store(*bend_value, std::memory_order_relaxed);
  return true;
}

std::optional<CK_RV> Settings::injected_failure(Fn fn) {
  auto relaxed = std::memory_order_relaxed;
  if (fail_fn.load(relaxed) != static_cast<int>(fn)) return std::nullopt;
  unsigned long nth = fail_nth.load(relaxed);
  unsigned long seen = fail_seen.fetch_add(1, relaxed) + 1;
  if (nth != 0 && seen != nth) return std::nullopt;
  return fail_rv.load(relaxed);
}

void Counters::reset() {
  for (auto* c : {&initialize_calls,
                  &initialize_ok,
                  &finalize_calls,
                  &sessions_open,
                  &sessions_opened_total,
                  &sessions_closed_total,
                  &sessions_closed_by_finalize,
                  &sessions_dropped,
                  &calls_total,
                  &max_concurrent_calls,
                  &library_violations,
                  &session_violations,
                  &finalize_during_call,
                  &calls_after_finalize,
                  &last_session,
                  &last_random_len,
                  &sessions_open_peak,
                  &bend_ops_kept,
                  &bend_lengths_filled,
                  &bend_handles_reused,
                  &bend_key_mat_keys,
                  &bend_session_count})
    c->store(0, std::memory_order_relaxed);
  for (auto& c : calls) c.store(0, std::memory_order_relaxed);
}

CallScope::CallScope(Fn fn) : tracked_(info(fn).kind != Kind::Boot) {
  Module& m = module();
  bump(m.counters.calls_total);
  bump(m.counters.calls[static_cast<unsigned>(fn)]);
  if (!tracked_) return;
  auto relaxed = std::memory_order_relaxed;
  others_active_ = m.active.fetch_add(1, relaxed);
  unsigned long others = others_active_ + m.waiting.load(relaxed);
  unsigned long now = others + 1;
  unsigned long peak = m.counters.max_concurrent_calls.load(relaxed);
  while (now > peak && !m.counters.max_concurrent_calls.compare_exchange_weak(peak, now, relaxed)) {
  }
  if (others > 0 && m.initialized() && !m.thread_safe()) bump(m.counters.library_violations);
}

CallScope::~CallScope() {
  if (tracked_) module().active.fetch_sub(1, std::memory_order_relaxed);
}

SessionScope::SessionScope(Session& s) : s_(s) {
  if (s_.inside.fetch_add(1, std::memory_order_relaxed) != 0)
    bump(module().counters.session_violations);
}

SessionScope::~SessionScope() { s_.inside.fetch_sub(1, std::memory_order_relaxed); }

CK_RV not_initialized() {
  bump(module().counters.calls_after_finalize);
  return CKR_CRYPTOKI_NOT_INITIALIZED;
}

void pause_us(unsigned long us) {
  if (us == 0) return;
  auto length = std::chrono::microseconds(us);
  if (us > 100) {
    std::this_thread::sleep_for(length);
    return;
  }
  // Short waits spin: sleeping would round them up to the scheduler's tick.
  auto until = std::chrono::steady_clock::now() + length;
  while (std::chrono::steady_clock::now() < until) {
  }
}

}  // namespace p11mux::mock
