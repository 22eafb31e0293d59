// Internal state of the faulty module: the function table, the fault and
// latency settings, the counters, the target module and the session table.
//
// Synchronization: settings and counters are relaxed atomics (read on every
// call, changed at any time by the control API); the session table is a map
// under a shared_mutex, read-locked for lookups only, so that calls on
// different sessions do not order each other for ThreadSanitizer. No faulty
// lock is held while the target is called, except:
//   lifecycle_mu_ (C_Initialize, C_Finalize, reset)    -> open_mu_ -> table_mu_
//   open_mu_ is held shared across a target C_OpenSession and exclusively
//   across a target C_CloseAllSessions, so a session opened meanwhile is
//   never half-closed.
//   C_Finalize joins the schedule's thread (Scheduler) under lifecycle_mu_;
//   that thread takes the locks after it (table_mu_, SlotFaults), never
//   lifecycle_mu_.
#pragma once

#include <p11mux/functions.h>
#include <p11mux/pkcs11.h>

#include "faulty_control.h"
#include "faulty_schedule.hpp"

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace p11mux::faulty {

// ---- the function table, from <p11mux/functions.h> ----
enum class Fn : unsigned {
#define FAULTY_ENUM(name, since, dispatch, args) name,
  P11MUX_FUNCTIONS(FAULTY_ENUM)
#undef FAULTY_ENUM
      Count
};
inline constexpr std::size_t kFunctionCount = static_cast<std::size_t>(Fn::Count);
static_assert(kFunctionCount == FAULTY_FUNCTION_COUNT);

inline constexpr std::array<std::string_view, kFunctionCount> kNames = {
#define FAULTY_NAME(name, since, dispatch, args) #name,
    P11MUX_FUNCTIONS(FAULTY_NAME)
#undef FAULTY_NAME
};

constexpr std::size_t index(Fn fn) { return static_cast<std::size_t>(fn); }
// Index of a function name; -1 if unknown.
int function_index(std::string_view name);

constexpr bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

// Which latency setting a function gets (see FaultyConfig).
enum class Latency { none, open, close, login, crypto };
constexpr Latency latency_of(std::string_view name) {
  if (name == "C_OpenSession") return Latency::open;
  if (name == "C_CloseSession") return Latency::close;
  if (name == "C_Login" || name == "C_Logout" || name == "C_LoginUser") return Latency::login;
  for (std::string_view part : {"Encrypt", "Decrypt", "Sign", "Verify", "Digest", "Generate",
                                "Wrap", "Derive", "Random", "Message"}) {
    if (contains(name, part)) return Latency::crypto;
  }
  return Latency::none;
}

// What a call does to the operation (sign, digest, find...) it belongs to.
// An injected fault must leave the target and the application agreeing on
// whether that operation is still active, as a real error would:
//   begins     (C_xxxInit): the fault replaces the call, nothing starts;
//   ends       (single-part calls, C_xxxFinal): the call is forwarded and its
//              answer replaced by the fault, when it did end the operation
//              (not a length query, not CKR_BUFFER_TOO_SMALL);
//   continues  (C_xxxUpdate, C_FindObjects, C_DigestKey, message parts): a
//              fault would end the operation for the application only, so
//              "*" leaves them alone; a rule naming one injects before
//              forwarding and the target's operation stays active.
enum class OpEffect { none, begins, ends, continues };
constexpr OpEffect op_effect(std::string_view name) {
  if (name.ends_with("Init") && name != "C_Initialize") return OpEffect::begins;
  for (std::string_view ending :
       {"C_Encrypt", "C_Decrypt", "C_Digest", "C_Sign", "C_Verify", "C_SignRecover",
        "C_VerifyRecover", "C_EncryptFinal", "C_DecryptFinal", "C_DigestFinal", "C_SignFinal",
        "C_VerifyFinal", "C_FindObjectsFinal", "C_MessageEncryptFinal", "C_MessageDecryptFinal",
        "C_MessageSignFinal", "C_MessageVerifyFinal"}) {
    if (name == ending) return OpEffect::ends;
  }
  if (contains(name, "Update") || contains(name, "MessageBegin") || contains(name, "MessageNext") ||
      name == "C_FindObjects" || name == "C_DigestKey") {
    return OpEffect::continues;
  }
  return OpEffect::none;
}

// Functions a "*" rule never matches (see FaultyRule).
constexpr bool wildcard_excluded(std::string_view name) {
  if (op_effect(name) == OpEffect::continues) return true;
  for (std::string_view excluded :
       {"C_Initialize", "C_Finalize", "C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface",
        "C_CloseSession", "C_CloseAllSessions"}) {
    if (name == excluded) return true;
  }
  return false;
}

// Calls about the token in a slot: CKR_TOKEN_NOT_PRESENT while it is removed.
constexpr bool needs_token(std::string_view name) {
  return name == "C_GetTokenInfo" || name == "C_GetMechanismList" || name == "C_GetMechanismInfo" ||
         name == "C_InitToken" || name == "C_OpenSession";
}

// Calls whose first argument is a slot ID: a slot fault touches them.
constexpr bool takes_slot(std::string_view name) {
  return needs_token(name) || name == "C_GetSlotInfo" || name == "C_CloseAllSessions";
}

// ---- faults aimed at one slot ----
// What a call is to its slot: the answer a removed token gives depends on it.
enum class SlotCall { session, token, slot_info };

class SlotFaults {
 public:
  // Whether any slot has a fault set: one relaxed load on calls when none does.
  bool any() const { return active_.load(std::memory_order_relaxed) != 0; }
  // For a call concerning slot, before it is forwarded: waits while the slot
  // hangs, then the answer of a removal, then (if replace) of a failure code;
  // nullopt: go on. Counts what it answers.
  std::optional<CK_RV> enter(CK_SLOT_ID slot, SlotCall call, bool replace);
  // The failure code of slot, for a call that was forwarded to end its operation.
  std::optional<CK_RV> failing(CK_SLOT_ID slot);
  bool removed(CK_SLOT_ID slot) const;

  void fail(CK_SLOT_ID slot, CK_RV rv);
  void set_removed(CK_SLOT_ID slot, bool removed);
  void hang(CK_SLOT_ID slot, unsigned long ms);
  unsigned long release(CK_SLOT_ID slot);
  void clear(CK_SLOT_ID slot);
  void count_restart(CK_SLOT_ID slot, unsigned long dropped);
  // Counters only; sessions_open is the module's to fill in.
  FaultySlotStats stats(CK_SLOT_ID slot) const;
  // No faults, counters zero, every waiting call released.
  void reset();

 private:
  struct Slot {
    CK_RV fail = CKR_OK;
    bool removed = false;
    bool hanging = false;
    std::chrono::steady_clock::time_point hang_until{};  // max(): until released
    std::uint64_t releases = 0;                          // waiters leave when it changes
    FaultySlotStats stats{};
    bool faulty() const { return fail != CKR_OK || removed || hanging; }
  };
  // mu_ held. Entries are never erased: a waiting call keeps a reference.
  Slot& slot_locked(CK_SLOT_ID slot) { return slots_[slot]; }
  void update_active_locked();
  unsigned long release_locked(Slot& s);

  mutable std::mutex mu_;
  std::condition_variable released_;
  std::map<CK_SLOT_ID, Slot> slots_;  // guarded by mu_
  std::atomic<unsigned long> active_{0};
};

// ---- settings ----
inline constexpr int kUnusedRule = -1;
inline constexpr int kWildcard = -2;

struct Rule {
  std::atomic<int> fn{kUnusedRule};  // function index, kWildcard or kUnusedRule
  std::atomic<CK_RV> rv{CKR_OK};
  std::atomic<unsigned long> per_million{0};
  std::atomic<unsigned long> nth{0};
  std::atomic<bool> after{false};      // FaultyRule.after
  std::atomic<unsigned long> seen{0};  // matching calls since configure
};

// Which rules a call's injection point may fire: before the target call,
// after it (FaultyRule.after), or either (a call that ends an operation,
// which always injects after).
enum class InjectAt : std::uint8_t { before, after, any };

struct Counters;

class Settings {
 public:
  // False (nothing changed) if a rule names an unknown function.
  bool apply(const FaultyConfig& config);
  // The target path to load: the configured one, else the environment's, else SoftHSM2.
  std::string target_path() const;
  // The injected return code for this call of fn, if a rule fires.
  std::optional<CK_RV> inject(Fn fn, Counters& counters, InjectAt at = InjectAt::any);
  // Sleeps for fn's latency, if any.
  void delay(Fn fn, Counters& counters) const;
  unsigned long max_sessions() const { return max_sessions_.load(std::memory_order_relaxed); }
  unsigned long max_slot_sessions() const {
    return max_slot_sessions_.load(std::memory_order_relaxed);
  }
  bool keep_object_handles() const { return keep_object_handles_.load(std::memory_order_relaxed); }

 private:
  bool fires(Rule& rule);

  mutable std::mutex target_mu_;  // guards target_
  std::string target_;
  std::atomic<std::uint64_t> seed_{1};
  std::atomic<std::uint64_t> draws_{0};
  std::array<Rule, FAULTY_MAX_RULES> rules_{};
  std::atomic<unsigned long> max_sessions_{0};
  std::atomic<unsigned long> max_slot_sessions_{0};
  std::atomic<bool> keep_object_handles_{false};
  std::array<std::atomic<unsigned long>, 5> latency_us_{};  // by Latency
};

// Parses the P11MUX_FAULTY_* variables; false with a message in `error`.
bool config_from_env(FaultyConfig& out, std::string& error);
// CKR code by name ("CKR_DEVICE_ERROR") or number ("0x30", "48").
std::optional<CK_RV> parse_rv(std::string_view text);

// ---- counters ----
struct Counters {
  using Counter = std::atomic<unsigned long>;
  Counter initialize_calls{0}, initialize_ok{0}, finalize_calls{0};
  Counter calls_total{0}, calls_not_initialized{0}, max_concurrent_calls{0};
  Counter session_violations{0}, finalize_during_call{0};
  Counter sessions_open{0}, sessions_opened{0}, sessions_closed{0}, sessions_closed_all{0},
      sessions_dropped{0}, sessions_open_at_finalize{0}, max_sessions_open{0},
      stale_handle_calls{0}, session_count_refusals{0}, restarts{0},
      target_sessions_closed_by_restart{0};
  Counter faults_injected{0}, delayed_calls{0};
  std::array<Counter, kFunctionCount> calls{}, faults{};

  void reset();
};

inline void bump(std::atomic<unsigned long>& c, unsigned long n = 1) {
  c.fetch_add(n, std::memory_order_relaxed);
}
inline void raise_peak(std::atomic<unsigned long>& peak, unsigned long now) {
  unsigned long seen = peak.load(std::memory_order_relaxed);
  while (now > seen && !peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
  }
}

// ---- the target module ----
struct Target {
  std::string path;
  CK_FUNCTION_LIST_3_0 functions{};  // v3.0 entries NULL for a 2.x target
  bool v3 = false;                   // it offers the "PKCS 11" 3.0 interface
};
// Loads a target once per path; targets are never unloaded (like -z nodelete).
// NULL with a message in `error` if it cannot be loaded.
const Target* load_target(const std::string& path, std::string& error);

// ---- sessions ----
struct Session {
  Session(CK_SESSION_HANDLE h, CK_SLOT_ID s, const Target* t, std::uint64_t gen, CK_NOTIFY n,
          CK_VOID_PTR app)
      : handle(h), slot(s), target(t), generation(gen), notify(n), application(app) {}
  // Closes the target session if a restart dropped it and nobody closed it since.
  ~Session();
  Session(const Session&) = delete;  // its address is the target's Notify context
  Session& operator=(const Session&) = delete;

  const CK_SESSION_HANDLE handle;  // ours
  const CK_SLOT_ID slot;
  const Target* const target;
  const std::uint64_t generation;  // of the initialization that opened it
  const CK_NOTIFY notify;
  const CK_VOID_PTR application;
  CK_SESSION_HANDLE target_handle = CK_INVALID_HANDLE;  // set before publication

  std::atomic<unsigned> inside{0};            // calls in progress on it
  std::atomic<bool> target_closed{false};     // the target session is gone
  std::atomic<bool> close_on_destroy{false};  // dropped by a restart
};

class Module {
 public:
  Settings settings;
  Counters counters;
  SlotFaults slot_faults;
  Scheduler scheduler;  // P11MUX_FAULTY_SCHEDULE, from each C_Initialize to C_Finalize

  CK_RV initialize(CK_VOID_PTR init_args);
  CK_RV finalize(CK_VOID_PTR reserved);
  int reset();
  bool initialized() const { return initialized_.load(std::memory_order_acquire); }
  std::uint64_t generation() const { return generation_.load(std::memory_order_relaxed); }
  bool removed() const { return removed_.load(std::memory_order_relaxed); }
  // The target of the current initialization; call only after initialized().
  const Target& target() const { return *target_.load(std::memory_order_acquire); }
  // The configured target, loaded if need be (C_GetInterface* before
  // C_Initialize); NULL if it cannot be loaded.
  const Target* probe_target();

  // CKR_SESSION_HANDLE_INVALID (or CKR_DEVICE_REMOVED) for unknown handles.
  CK_RV lookup(CK_SESSION_HANDLE handle, std::shared_ptr<Session>& out);
  CK_RV open_session(Fn fn, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                     CK_NOTIFY notify, CK_SESSION_HANDLE_PTR out);
  CK_RV close_session(Fn fn, CK_SESSION_HANDLE handle);
  CK_RV close_all_sessions(Fn fn, CK_SLOT_ID slot);
  unsigned long restart();
  void set_removed(bool removed);
  // Faults aimed at one slot (faulty_control.h).
  unsigned long restart_slot(CK_SLOT_ID slot, bool removal = false);
  void set_slot_removed(CK_SLOT_ID slot, bool removed);
  unsigned long sessions_on(CK_SLOT_ID slot);

  // Threads inside a call: for max_concurrent_calls and finalize_during_call.
  std::atomic<unsigned long> active{0};   // blocked C_WaitForSlotEvent excluded
  std::atomic<unsigned long> waiting{0};  // blocked in C_WaitForSlotEvent

 private:
  // Takes sessions out of the table (table_mu_ held exclusively).
  template <class Pred>
  std::vector<std::shared_ptr<Session>> take_locked(Pred&& pred);
  bool finalize_locked();
  std::uint64_t slot_epoch_locked(CK_SLOT_ID slot) const;  // table_mu_ held
  // Open sessions by slot, places reserved by opens in progress included:
  // false (nothing reserved) beyond max_slot_sessions.
  bool reserve_slot_place(CK_SLOT_ID slot);
  void release_slot_places(CK_SLOT_ID slot, unsigned long n = 1);
  // FaultyConfig::keep_object_handles: the module's own target session on
  // `slot`, opened if there is none yet.
  void keep_target_session(const Target& t, CK_SLOT_ID slot);
  void close_kept_sessions(const Target& t);

  std::mutex lifecycle_mu_;
  std::shared_mutex open_mu_;
  std::shared_mutex table_mu_;  // guards sessions_
  std::unordered_map<CK_SESSION_HANDLE, std::shared_ptr<Session>> sessions_;
  std::atomic<CK_SESSION_HANDLE> next_handle_{FAULTY_SESSION_HANDLE_BASE};
  std::atomic<bool> initialized_{false};
  std::atomic<const Target*> target_{nullptr};
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<bool> removed_{false};
  std::uint64_t restart_epoch_ = 0;                  // bumped by every restart; table_mu_
  std::map<CK_SLOT_ID, std::uint64_t> slot_epochs_;  // by every restart of a slot; table_mu_
  // Sessions dropped by a slot's removal, by handle: CKR_DEVICE_REMOVED on
  // them while it lasts. Emptied by C_Finalize; table_mu_.
  std::unordered_map<CK_SESSION_HANDLE, CK_SLOT_ID> removed_sessions_;
  std::mutex slot_open_mu_;                        // after table_mu_
  std::map<CK_SLOT_ID, unsigned long> slot_open_;  // guarded by slot_open_mu_
  bool owns_target_init_ = false;                  // lifecycle_mu_
  std::mutex kept_mu_;                             // guards kept_
  std::map<CK_SLOT_ID, CK_SESSION_HANDLE> kept_;   // target sessions, by slot
};

// The one instance, deliberately leaked (threads may outlive static destructors).
Module& module();

}  // namespace p11mux::faulty
