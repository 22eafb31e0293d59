// Fault rules, latency, the P11MUX_FAULTY_* environment, counters, and
// loading the target module.
#include "faulty_state.hpp"

#include <p11mux/rv_names.hpp>

#include <dlfcn.h>

#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

// P11MUX_FAULTY_LATENCY when it is unset: none, or a network HSM's in
// libp11mux-slow.so (these sources built with
// FAULTY_DEFAULT_LATENCY=FAULTY_SLOW_LATENCY).
#ifndef FAULTY_DEFAULT_LATENCY
#define FAULTY_DEFAULT_LATENCY ""
#endif

namespace p11mux::faulty {

int function_index(std::string_view name) {
  for (std::size_t i = 0; i < kFunctionCount; ++i) {
    if (kNames[i] == name) return static_cast<int>(i);
  }
  return -1;
}

// ---- settings ----

namespace {

// A rule's function: an index, kWildcard, kUnusedRule; nullopt if unknown.
std::optional<int> rule_function(const char (&text)[sizeof(FaultyRule::function)]) {
  std::string_view name(text, strnlen(text, sizeof text));
  if (name.empty()) return kUnusedRule;
  if (name == "*") return kWildcard;
  int i = function_index(name);
  if (i < 0) return std::nullopt;
  return i;
}

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

bool Settings::apply(const FaultyConfig& c) {
  std::array<int, FAULTY_MAX_RULES> fns{};
  for (std::size_t i = 0; i < fns.size(); ++i) {
    auto fn = rule_function(c.rules[i].function);
    if (!fn) return false;
    fns[i] = *fn;
  }
  auto relaxed = std::memory_order_relaxed;
  {
    std::lock_guard lock(target_mu_);
    target_.assign(c.target, strnlen(c.target, sizeof c.target));
  }
  seed_.store(c.seed, relaxed);
  draws_.store(0, relaxed);
  for (std::size_t i = 0; i < fns.size(); ++i) {
    Rule& r = rules_[i];
    r.fn.store(kUnusedRule, relaxed);  // no half-written rule fires
    r.rv.store(c.rules[i].rv, relaxed);
    r.per_million.store(c.rules[i].per_million, relaxed);
    r.nth.store(c.rules[i].nth, relaxed);
    r.after.store(c.rules[i].after != 0, relaxed);
    r.seen.store(0, relaxed);
    r.fn.store(fns[i], relaxed);
  }
  max_sessions_.store(c.max_sessions, relaxed);
  max_slot_sessions_.store(c.max_sessions_per_slot, relaxed);
  keep_object_handles_.store(c.keep_object_handles != 0, relaxed);
  latency_us_[static_cast<std::size_t>(Latency::open)].store(c.open_session_us, relaxed);
  latency_us_[static_cast<std::size_t>(Latency::close)].store(c.close_session_us, relaxed);
  latency_us_[static_cast<std::size_t>(Latency::login)].store(c.login_us, relaxed);
  latency_us_[static_cast<std::size_t>(Latency::crypto)].store(c.crypto_us, relaxed);
  return true;
}

std::string Settings::target_path() const {
  {
    std::lock_guard lock(target_mu_);
    if (!target_.empty()) return target_;
  }
  const char* env = std::getenv("P11MUX_FAULTY_TARGET");
  return env != nullptr && *env != '\0' ? env : FAULTY_DEFAULT_TARGET;
}

bool Settings::fires(Rule& rule) {
  auto relaxed = std::memory_order_relaxed;
  unsigned long seen = rule.seen.fetch_add(1, relaxed) + 1;
  if (unsigned long nth = rule.nth.load(relaxed); nth != 0) return seen == nth;
  // One draw per matching call from a counter-based generator: the sequence
  // of draws is fixed by the seed; which call gets which draw follows the
  // order in which threads arrive.
  std::uint64_t draw = splitmix64(seed_.load(relaxed) ^ splitmix64(draws_.fetch_add(1, relaxed)));
  return draw % 1'000'000 < rule.per_million.load(relaxed);
}

std::optional<CK_RV> Settings::inject(Fn fn, Counters& counters, InjectAt at) {
  const int i = static_cast<int>(index(fn));
  for (Rule& rule : rules_) {
    int target = rule.fn.load(std::memory_order_relaxed);
    if (target == kUnusedRule) continue;
    if (target != i && !(target == kWildcard && !wildcard_excluded(kNames[index(fn)]))) continue;
    if (at != InjectAt::any &&
        rule.after.load(std::memory_order_relaxed) != (at == InjectAt::after))
      continue;
    if (!fires(rule)) continue;
    bump(counters.faults_injected);
    bump(counters.faults[index(fn)]);
    return rule.rv.load(std::memory_order_relaxed);
  }
  return std::nullopt;
}

void Settings::delay(Fn fn, Counters& counters) const {
  Latency kind = latency_of(kNames[index(fn)]);
  if (kind == Latency::none) return;
  unsigned long us = latency_us_[static_cast<std::size_t>(kind)].load(std::memory_order_relaxed);
  if (us == 0) return;
  bump(counters.delayed_calls);
  std::this_thread::sleep_for(std::chrono::microseconds(us));
}

// ---- environment ----

std::optional<CK_RV> parse_rv(std::string_view text) {
  if (text.starts_with("CKR_")) {
    // The name table has every code the header defines, all below 0x400.
    for (CK_RV rv = 0; rv < 0x400; ++rv) {
      if (rv_name(rv) == text) return rv;
    }
    if (text == "CKR_VENDOR_DEFINED") return CKR_VENDOR_DEFINED;
    return std::nullopt;
  }
  int base = 10;
  if (text.starts_with("0x") || text.starts_with("0X")) {
    text.remove_prefix(2);
    base = 16;
  }
  CK_RV value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value, base);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

namespace {

std::optional<unsigned long> parse_ulong(std::string_view text) {
  unsigned long value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

// A probability in [0, 1] as millionths; "0.01" -> 10000.
std::optional<unsigned long> parse_probability(std::string_view text) {
  double p = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), p);
  if (ec != std::errc() || end != text.data() + text.size() || p < 0 || p > 1) return std::nullopt;
  return static_cast<unsigned long>(p * 1e6 + 0.5);
}

// Splits "a,b,c" (empty pieces skipped).
template <class Fn>
void for_each_item(std::string_view text, char separator, Fn&& fn) {
  while (!text.empty()) {
    std::size_t end = text.find(separator);
    std::string_view item = text.substr(0, end);
    if (!item.empty()) fn(item);
    if (end == std::string_view::npos) break;
    text.remove_prefix(end + 1);
  }
}

bool parse_rule(std::string_view text, FaultyRule& rule, std::string& error) {
  // FUNCTION:RV:p=P or FUNCTION:RV:nth=N, then perhaps :after
  if (text.ends_with(":after")) {
    rule.after = 1;
    text.remove_suffix(6);
  }
  std::size_t a = text.find(':');
  std::size_t b = a == std::string_view::npos ? a : text.find(':', a + 1);
  if (b == std::string_view::npos) {
    error = "rule '" + std::string(text) + "' is not FUNCTION:RV:p=P or FUNCTION:RV:nth=N";
    return false;
  }
  std::string_view function = text.substr(0, a), rv = text.substr(a + 1, b - a - 1),
                   when = text.substr(b + 1);
  if (function.size() >= sizeof rule.function ||
      (function != "*" && function_index(function) < 0)) {
    error = "rule '" + std::string(text) + "': unknown function '" + std::string(function) + "'";
    return false;
  }
  std::memcpy(rule.function, function.data(), function.size());
  auto code = parse_rv(rv);
  if (!code) {
    error = "rule '" + std::string(text) + "': unknown return code '" + std::string(rv) + "'";
    return false;
  }
  rule.rv = *code;
  if (when.starts_with("p=")) {
    auto p = parse_probability(when.substr(2));
    if (p) rule.per_million = *p;
    if (p) return true;
  } else if (when.starts_with("nth=")) {
    auto n = parse_ulong(when.substr(4));
    if (n && *n > 0) rule.nth = *n;
    if (n && *n > 0) return true;
  }
  error = "rule '" + std::string(text) + "': '" + std::string(when) +
          "' is neither p=PROBABILITY (0..1) nor nth=N (N >= 1)";
  return false;
}

bool parse_latency(std::string_view text, FaultyConfig& c, std::string& error) {
  bool ok = true;
  for_each_item(text, ',', [&](std::string_view item) {
    std::size_t eq = item.find('=');
    auto us = eq == std::string_view::npos ? std::nullopt : parse_ulong(item.substr(eq + 1));
    std::string_view kind = item.substr(0, eq);
    unsigned long* field = kind == "open"     ? &c.open_session_us
                           : kind == "close"  ? &c.close_session_us
                           : kind == "login"  ? &c.login_us
                           : kind == "crypto" ? &c.crypto_us
                                              : nullptr;
    if (field == nullptr || !us) {
      if (ok) error = "'" + std::string(item) + "' is not open|close|login|crypto=MICROSECONDS";
      ok = false;
      return;
    }
    *field = *us;
  });
  return ok;
}

}  // namespace

bool config_from_env(FaultyConfig& out, std::string& error) {
  FaultyConfig c{};
  c.seed = 1;
  auto env = [](const char* name) -> std::string_view {
    const char* value = std::getenv(name);
    return value != nullptr ? value : "";
  };
  // The target stays "" here: Settings::target_path() reads the variable at
  // C_Initialize, so a test can change it between initializations.
  if (auto seed = env("P11MUX_FAULTY_SEED"); !seed.empty()) {
    auto n = parse_ulong(seed);
    if (!n) {
      error = "P11MUX_FAULTY_SEED: '" + std::string(seed) + "' is not a number";
      return false;
    }
    c.seed = *n;
  }
  std::size_t rules = 0;
  bool ok = true;
  for_each_item(env("P11MUX_FAULTY_FAIL"), ',', [&](std::string_view item) {
    if (!ok) return;
    if (rules == FAULTY_MAX_RULES) {
      error = "more than " + std::to_string(FAULTY_MAX_RULES) + " rules";
      ok = false;
      return;
    }
    ok = parse_rule(item, c.rules[rules++], error);
  });
  if (!ok) {
    error = "P11MUX_FAULTY_FAIL: " + error;
    return false;
  }
  if (auto max = env("P11MUX_FAULTY_MAX_SESSIONS"); !max.empty()) {
    auto n = parse_ulong(max);
    if (!n) {
      error = "P11MUX_FAULTY_MAX_SESSIONS: '" + std::string(max) + "' is not a number";
      return false;
    }
    c.max_sessions = *n;
  }
  if (auto max = env("P11MUX_FAULTY_MAX_SLOT_SESSIONS"); !max.empty()) {
    auto n = parse_ulong(max);
    if (!n) {
      error = "P11MUX_FAULTY_MAX_SLOT_SESSIONS: '" + std::string(max) + "' is not a number";
      return false;
    }
    c.max_sessions_per_slot = *n;
  }
  const char* latency = std::getenv("P11MUX_FAULTY_LATENCY");
  if (!parse_latency(latency != nullptr ? latency : FAULTY_DEFAULT_LATENCY, c, error)) {
    error = "P11MUX_FAULTY_LATENCY: " + error;
    return false;
  }
  // Applied by C_Initialize (Module::initialize); checked here so that a
  // malformed schedule fails it as the other variables do.
  if (!parse_schedule(env("P11MUX_FAULTY_SCHEDULE"), error)) {
    error = "P11MUX_FAULTY_SCHEDULE: " + error;
    return false;
  }
  out = c;
  return true;
}

// ---- counters ----

void Counters::reset() {
  for (Counter* c : {&initialize_calls,
                     &initialize_ok,
                     &finalize_calls,
                     &calls_total,
                     &calls_not_initialized,
                     &max_concurrent_calls,
                     &session_violations,
                     &finalize_during_call,
                     &sessions_open,
                     &sessions_opened,
                     &sessions_closed,
                     &sessions_closed_all,
                     &sessions_dropped,
                     &sessions_open_at_finalize,
                     &max_sessions_open,
                     &stale_handle_calls,
                     &session_count_refusals,
                     &restarts,
                     &target_sessions_closed_by_restart,
                     &faults_injected,
                     &delayed_calls}) {
    c->store(0, std::memory_order_relaxed);
  }
  for (auto& c : calls) c.store(0, std::memory_order_relaxed);
  for (auto& c : faults) c.store(0, std::memory_order_relaxed);
}

// ---- targets ----

const Target* load_target(const std::string& path, std::string& error) {
  static std::mutex mu;
  // Never freed, like the libraries: sessions point at their target. Keyed by
  // path and interface, as a target may offer 3.0 or not from one
  // initialization to the next (the mock's provide_v3).
  static auto* loaded = new std::map<std::pair<std::string, bool>, Target>;
  std::lock_guard lock(mu);
  void* lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // counted; never closed
  if (lib == nullptr) {
    error = "cannot load target '" + path + "': " + ::dlerror();
    return nullptr;
  }
  Target t;
  t.path = path;
  auto get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(lib, "C_GetInterface"));
  CK_INTERFACE* iface = nullptr;
  CK_VERSION v30{3, 0};
  char name[] = "PKCS 11";
  if (get_interface != nullptr &&
      get_interface(reinterpret_cast<CK_UTF8CHAR*>(name), &v30, &iface, 0) == CKR_OK &&
      iface != nullptr && iface->pFunctionList != nullptr) {
    t.functions = *static_cast<const CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
    t.v3 = true;
  } else {
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
    CK_FUNCTION_LIST* list = nullptr;
    if (get_list == nullptr || get_list(&list) != CKR_OK || list == nullptr) {
      error = "target '" + path + "' is not a PKCS#11 module (C_GetFunctionList)";
      return nullptr;
    }
    std::memcpy(&t.functions, list, sizeof(CK_FUNCTION_LIST));  // the v3.0 tail stays NULL
    if (t.functions.version.major >= 3) t.functions.version = CK_VERSION{2, 40};
  }
  auto key = std::pair{path, t.v3};
  if (auto it = loaded->find(key); it != loaded->end()) return &it->second;
  return &loaded->emplace(key, std::move(t)).first->second;
}

}  // namespace p11mux::faulty
