// Internal state of the mock PKCS#11 backend: configuration, counters, tokens,
// sessions and objects, plus the wrappers every C entry point goes through.
//
// Synchronization is chosen so the mock itself is race-free whatever the
// caller does, while adding as few happens-before edges between unrelated
// calls as possible (so ThreadSanitizer still sees the caller's own races):
// counters and settings are relaxed atomics, the session table is read under
// a shared lock (readers do not order each other), and only the calls of one
// session serialize on that session's mutex.
//
// Lock order (outer to inner). No mock lock is held while calling back into
// the application (Notify); the mutex callbacks run under lifecycle_mu only.
//   Module::lifecycle_mu  -> Module::table_mu -> Token::mu -> ObjectStore::mu
//   Session::mu           -> Module::table_mu -> ...
//   Module::event_mu is innermost.
// A session call may close its own session (Session::mu, then table_mu);
// nothing takes a Session::mu while holding table_mu or lifecycle_mu.
#pragma once

#include <p11mux/pkcs11.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <shared_mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "mock_control.h"
#include "mock_function_table.h"

#define MOCK_EXPORT extern "C" __attribute__((visibility("default")))

// The v3.0 entry points have no declaration in p11-kit's header: declare them
// from the function types of our header (CK_C_LoginUser -> C_LoginUser ...).
#define MOCK_DECLARE_V3(name, kind, op) MOCK_EXPORT std::remove_pointer_t<CK_##name> name;
MOCK_V3_FUNCTIONS(MOCK_DECLARE_V3)
#undef MOCK_DECLARE_V3

namespace p11mux::mock {

using Bytes = std::vector<unsigned char>;

enum class Kind { Boot, Global, Slot, Session };
// Operations a session can have active; several kinds may be active at once.
enum class Op { Digest, Sign, Verify, Encrypt, Decrypt, Find, None };
inline constexpr std::size_t kOpCount = static_cast<std::size_t>(Op::None);

enum class Fn : unsigned {
#define MOCK_ENUM(name, kind, op) name,
  MOCK_ALL_FUNCTIONS(MOCK_ENUM)
#undef MOCK_ENUM
      Count
};
inline constexpr std::size_t kFunctionCount = static_cast<std::size_t>(Fn::Count);
static_assert(kFunctionCount == MOCK_FUNCTION_COUNT);
static_assert(static_cast<unsigned>(Fn::C_GetInterfaceList) == 68, "68 v2.40 functions");

struct FnInfo {
  const char* name;
  Kind kind;
  Op op;
};
extern const FnInfo kFunctions[kFunctionCount];
inline const FnInfo& info(Fn fn) { return kFunctions[static_cast<unsigned>(fn)]; }
// Index of a function name, -1 if unknown.
int function_index(const char* name);

// ---- fake crypto (mock_crypto.cpp) ----
using Digest = std::array<unsigned char, MOCK_DIGEST_LEN>;
Digest reference_digest(const unsigned char* data, std::size_t len);
Digest reference_signature(unsigned long key_id, const unsigned char* data, std::size_t len);
unsigned char xor_byte(unsigned long key_id);
void fill_random(unsigned char* out, std::size_t len);

// ---- configuration, read lock-free on every call ----

// What accept_locking = 0 means: every form, or in libp11mux-race-detector.so
// (the same sources built with MOCK_DEFAULT_ACCEPT_LOCKING=MOCK_LOCK_NONE)
// only NULL arguments, so that any program loading it gets the race detector.
#ifndef MOCK_DEFAULT_ACCEPT_LOCKING
#define MOCK_DEFAULT_ACCEPT_LOCKING MOCK_LOCK_ALL
#endif
inline constexpr unsigned long kDefaultAcceptLocking = MOCK_DEFAULT_ACCEPT_LOCKING;
// What bend = 0 means: libp11mux-spec-bender.so is built with
// MOCK_DEFAULT_BEND=MOCK_BEND_ALL.
#ifndef MOCK_DEFAULT_BEND
#define MOCK_DEFAULT_BEND 0UL
#endif
inline constexpr unsigned long kDefaultBend = MOCK_DEFAULT_BEND;

struct Settings {
  std::atomic<unsigned long> accept_locking{kDefaultAcceptLocking};
  std::atomic<unsigned long> slot_count{1};
  std::atomic<unsigned long> max_sessions{0};
  std::atomic<unsigned long> token_max_sessions{0};
  std::atomic<unsigned long> token_max_rw_sessions{0};
  std::atomic<unsigned long> call_spin_us{0};
  std::atomic<unsigned long> slow_us{0};
  std::atomic<unsigned long> open_session_us{0};
  std::atomic<int> fail_fn{-1};
  std::atomic<unsigned long> fail_rv{CKR_OK};
  std::atomic<unsigned long> fail_nth{0};
  std::atomic<unsigned long> fail_seen{0};  // calls of fail_fn since configure
  std::atomic<bool> provide_v3{false};
  std::atomic<bool> wait_blocking_unsupported{false};
  std::atomic<unsigned long> bend{kDefaultBend};  // MOCK_BEND_* bits in force (OBEY resolved)
  std::atomic<unsigned long> transient_count_every{MOCK_BEND_TRANSIENT_COUNT_EVERY};
  std::atomic<unsigned long> opens_seen{0};  // C_OpenSession that could succeed

  bool bends(unsigned long bit) const { return (bend.load(std::memory_order_relaxed) & bit) != 0; }

  // False if fail_function is unknown (nothing changed then).
  bool apply(const MockConfig& config);
  // The MOCK_* environment variables that are set (see mock_control.h); false,
  // with a line on stderr and nothing changed, if one is not a number.
  bool apply_environment();
  // The injected return value for this call of fn, if any.
  std::optional<CK_RV> injected_failure(Fn fn);
};

struct Counters {
  std::atomic<unsigned long> initialize_calls{0}, initialize_ok{0}, finalize_calls{0};
  std::atomic<unsigned long> sessions_open{0}, sessions_opened_total{0}, sessions_closed_total{0},
      sessions_closed_by_finalize{0}, sessions_dropped{0};
  std::atomic<unsigned long> calls_total{0}, max_concurrent_calls{0};
  std::atomic<unsigned long> library_violations{0}, session_violations{0}, finalize_during_call{0},
      calls_after_finalize{0};
  std::atomic<unsigned long> last_session{0}, last_random_len{0};
  std::array<std::atomic<unsigned long>, kFunctionCount> calls{};
  std::atomic<unsigned long> sessions_open_peak{0}, bend_ops_kept{0}, bend_lengths_filled{0},
      bend_handles_reused{0}, bend_key_mat_keys{0}, bend_session_count{0};

  void reset();
};

inline void bump(std::atomic<unsigned long>& counter, unsigned long n = 1) {
  counter.fetch_add(n, std::memory_order_relaxed);
}
inline void drop(std::atomic<unsigned long>& counter, unsigned long n = 1) {
  counter.fetch_sub(n, std::memory_order_relaxed);
}

// ---- objects (mock_objects.cpp) ----
struct Attribute {
  CK_ATTRIBUTE_TYPE type;
  Bytes value;
};
using Attributes = std::vector<Attribute>;

// Copies a caller's template; CKR_ARGUMENTS_BAD if it is malformed.
CK_RV read_template(const CK_ATTRIBUTE* templ, CK_ULONG count, Attributes& out);

struct Object {
  CK_SLOT_ID slot = 0;
  CK_SESSION_HANDLE owner = 0;  // creating session; 0 for token objects
  unsigned long key_id = 0;     // identity used by the fake crypto (see mock_control.h)
  Attributes attrs;

  const Bytes* find(CK_ATTRIBUTE_TYPE type) const;
  bool is_true(CK_ATTRIBUTE_TYPE type) const;  // CK_BBOOL attribute set to CK_TRUE
  void set(const Attribute& attr);             // add or replace
  void set(const Attributes& attrs);
  bool matches(const Attributes& templ) const;
};

// Who may see an object: the slot asked from and whether the user is logged in
// there (CKA_PRIVATE objects are invisible otherwise).
struct Viewer {
  CK_SLOT_ID slot;
  bool user;
};

class ObjectStore {
 public:
  CK_OBJECT_HANDLE add(Object obj);
  std::optional<Object> get(CK_OBJECT_HANDLE handle, Viewer who) const;
  // Runs fn(Object&) under the store lock if the object is visible.
  template <class F>
  CK_RV update(CK_OBJECT_HANDLE handle, Viewer who, F&& fn) {
    std::unique_lock lock(mu_);
    if (visible(handle, who) == nullptr) return CKR_OBJECT_HANDLE_INVALID;
    return fn(objects_.at(handle));
  }
  bool erase(CK_OBJECT_HANDLE handle, Viewer who);
  std::vector<CK_OBJECT_HANDLE> find(Viewer who, const Attributes& templ) const;
  void erase_owned_by(CK_SESSION_HANDLE owner);
  void erase_session_objects();
  void erase_token_objects(CK_SLOT_ID slot);
  void clear();  // everything, and handles restart at the base
  void count(unsigned long& session_objects, unsigned long& token_objects) const;

 private:
  const Object* visible(CK_OBJECT_HANDLE handle, Viewer who) const;  // mu_ held
  // Shared for lookups, so that key lookups of unrelated sessions do not
  // order their calls for ThreadSanitizer.
  mutable std::shared_mutex mu_;
  std::map<CK_OBJECT_HANDLE, Object> objects_;
  CK_OBJECT_HANDLE next_ = MOCK_OBJECT_HANDLE_BASE;  // above every handle handed out so far
};

// The lowest number from `base` that is not a key of `taken` (an ordered map).
template <class Map>
unsigned long lowest_free(const Map& taken, unsigned long base) {
  unsigned long h = base;
  for (auto it = taken.lower_bound(base); it != taken.end() && it->first == h; ++it) ++h;
  return h;
}

// ---- tokens and sessions ----
inline constexpr CK_USER_TYPE kNobody = MOCK_NOBODY;

// One token per slot; lives from the first C_Initialize that needs it until
// mock_reset(), so token objects, PINs and the label survive C_Finalize.
struct Token : std::enable_shared_from_this<Token> {
  explicit Token(CK_SLOT_ID slot_id);
  const CK_SLOT_ID id;
  std::mutex mu;  // guards the fields below
  std::string label, user_pin, so_pin;
  unsigned long ro_sessions = 0, rw_sessions = 0;
  // Written under mu, read lock-free (GetSessionInfo, object visibility).
  std::atomic<CK_USER_TYPE> user{kNobody};

  bool user_logged_in() const { return user.load(std::memory_order_relaxed) == CKU_USER; }
};

struct OpState {
  bool active = false;
  bool multipart = false;            // an Update call was made
  bool needs_context_login = false;  // CKA_ALWAYS_AUTHENTICATE key
  unsigned long key_id = 0;
  Bytes data;  // accumulated input
};

struct Session {
  Session(CK_SESSION_HANDLE h, std::shared_ptr<Token> t, CK_FLAGS f, CK_VOID_PTR app, CK_NOTIFY cb)
      : handle(h), token(std::move(t)), flags(f), application(app), notify(cb) {}
  const CK_SESSION_HANDLE handle;
  const std::shared_ptr<Token> token;
  const CK_FLAGS flags;
  const CK_VOID_PTR application;
  const CK_NOTIFY notify;
  std::atomic<unsigned> inside{0};  // calls on this session in progress

  std::mutex mu;  // held by session_call() around the body: guards the fields below
  std::array<OpState, kOpCount> ops{};
  std::vector<CK_OBJECT_HANDLE> found;
  std::size_t found_pos = 0;

  bool rw() const { return (flags & CKF_RW_SESSION) != 0; }
  OpState& op(Op o) { return ops[static_cast<std::size_t>(o)]; }
  void end(Op o);
  void end_all();
  Viewer viewer() const { return {token->id, token->user_logged_in()}; }
};

struct InitRecord {
  bool null_args = false, had_callbacks = false;
  unsigned long locking = 0, flags = 0;
  std::string reserved;
};

class Module {
 public:
  Settings settings;
  Counters counters;
  ObjectStore objects;

  CK_RV initialize(CK_VOID_PTR init_args);
  CK_RV finalize();  // C_Finalize body after argument checks
  int reset();       // mock_reset()
  bool initialized() const { return initialized_flag_.load(std::memory_order_relaxed); }
  bool thread_safe() const { return thread_safe_.load(std::memory_order_relaxed); }
  InitRecord init_record() const;

  // Lookups: CKR_CRYPTOKI_NOT_INITIALIZED / CKR_SLOT_ID_INVALID /
  // CKR_SESSION_HANDLE_INVALID on failure.
  CK_RV token(CK_SLOT_ID slot, std::shared_ptr<Token>& out) const;
  CK_RV session(CK_SESSION_HANDLE handle, std::shared_ptr<Session>& out) const;
  unsigned long slot_count() const;

  CK_RV open_session(const std::shared_ptr<Token>& token, CK_FLAGS flags, CK_VOID_PTR app,
                     CK_NOTIFY notify, CK_SESSION_HANDLE& out);
  CK_RV close_session(Session& s);
  CK_RV close_all_sessions(Token& token);
  unsigned long drop_sessions();
  std::vector<std::shared_ptr<Session>> sessions_with_notify() const;

  CK_RV login(Session& s, CK_USER_TYPE user, const unsigned char* pin, CK_ULONG pin_len);
  CK_RV logout(Session& s);

  // Slot events.
  void trigger_event(CK_SLOT_ID slot);
  CK_RV wait_for_event(bool block, CK_SLOT_ID& slot);

  // Race accounting, see CallScope.
  std::atomic<unsigned long> active{0};   // threads inside a call, waiters excluded
  std::atomic<unsigned long> waiting{0};  // threads blocked in C_WaitForSlotEvent

 private:
  // Closes sessions (table_mu held exclusively): objects, login, counters.
  void forget_sessions_locked(const std::vector<std::shared_ptr<Session>>& victims);
  // C_Finalize's work with lifecycle_mu held; false if not initialized.
  bool finalize_locked();

  mutable std::mutex lifecycle_mu_;  // C_Initialize, C_Finalize, mock_reset; guards record_
  InitRecord record_;
  CK_C_INITIALIZE_ARGS callbacks_{};  // mutex callbacks of the current initialization
  void* callback_mutex_ = nullptr;

  mutable std::shared_mutex table_mu_;  // guards tokens_, sessions_, next_session_
  std::vector<std::shared_ptr<Token>> tokens_;
  std::map<CK_SESSION_HANDLE, std::shared_ptr<Session>> sessions_;
  CK_SESSION_HANDLE next_session_ = MOCK_SESSION_HANDLE_BASE;
  std::atomic<bool> initialized_flag_{false};  // written under table_mu_ exclusively
  std::atomic<bool> thread_safe_{true};

  std::mutex event_mu_;  // guards pending_, finalize_generation_
  std::condition_variable event_cv_;
  std::vector<bool> pending_;
  unsigned long finalize_generation_ = 0;
};

// The one instance. Deliberately leaked: threads may still be inside the
// library while static destructors run at process exit.
Module& module();

// ---- the wrappers every entry point uses (mock_calls.cpp) ----

// Exceptions never cross the C boundary.
template <class F>
CK_RV guarded(F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  } catch (...) {
    return CKR_GENERAL_ERROR;
  }
}

// Counts a call, and (for all but Boot functions) tracks how many threads are
// inside the library to detect overlap when it is not thread-safe.
class CallScope {
 public:
  explicit CallScope(Fn fn);
  ~CallScope();
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;
  // Other threads inside a call when this one entered, threads blocked in
  // C_WaitForSlotEvent not included.
  unsigned long others_active() const { return others_active_; }

 private:
  bool tracked_;
  unsigned long others_active_ = 0;
};

// Counts and returns CKR_CRYPTOKI_NOT_INITIALIZED.
CK_RV not_initialized();
// Busy-waits or sleeps for the given time.
void pause_us(unsigned long us);

template <class F>
CK_RV global_call(Fn fn, F&& body) noexcept {
  CallScope scope(fn);
  return guarded([&]() -> CK_RV {
    Module& m = module();
    if (!m.initialized()) return not_initialized();
    if (auto rv = m.settings.injected_failure(fn)) return *rv;
    return body();
  });
}

template <class F>
CK_RV slot_call(Fn fn, CK_SLOT_ID slot, F&& body) noexcept {
  CallScope scope(fn);
  return guarded([&]() -> CK_RV {
    Module& m = module();
    std::shared_ptr<Token> token;
    if (CK_RV rv = m.token(slot, token); rv != CKR_OK)
      return rv == CKR_CRYPTOKI_NOT_INITIALIZED ? not_initialized() : rv;
    if (auto rv = m.settings.injected_failure(fn)) return *rv;
    return body(*token);
  });
}

// Marks a session busy for the duration of a call; a second concurrent call
// on the same session is a session violation.
class SessionScope {
 public:
  explicit SessionScope(Session& s);
  ~SessionScope();
  SessionScope(const SessionScope&) = delete;
  SessionScope& operator=(const SessionScope&) = delete;

 private:
  Session& s_;
};

template <class F>
CK_RV session_call(Fn fn, CK_SESSION_HANDLE handle, F&& body) noexcept {
  CallScope scope(fn);
  return guarded([&]() -> CK_RV {
    Module& m = module();
    std::shared_ptr<Session> s;
    if (CK_RV rv = m.session(handle, s); rv != CKR_OK)
      return rv == CKR_CRYPTOKI_NOT_INITIALIZED ? not_initialized() : rv;
    SessionScope busy(*s);
    m.counters.last_session.store(handle, std::memory_order_relaxed);
    pause_us(m.settings.call_spin_us.load(std::memory_order_relaxed));
    std::lock_guard lock(s->mu);
    CK_RV rv;
    if (auto injected = m.settings.injected_failure(fn))
      rv = *injected;
    else
      rv = body(*s);
    if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL && info(fn).op != Op::None) {
      if (!m.settings.bends(MOCK_BEND_KEEP_OP))
        s->end(info(fn).op);
      else if (s->op(info(fn).op).active)
        bump(m.counters.bend_ops_kept);
    }
    return rv;
  });
}

}  // namespace p11mux::mock
