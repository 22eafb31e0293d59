// A group's login secret, kept so that a member that joins or recovers later
// can be logged in before it takes calls (issue 15; docs/groups.md, "Keeping
// the PIN", says what this costs and why).
//
// One PIN per user type (CKU_USER, CKU_SO), with C_LoginUser's username when
// the login was by username. CKU_CONTEXT_SPECIFIC is never kept: it
// authorizes one operation on one session (CKA_ALWAYS_AUTHENTICATE), not a
// member's login.
//
// Where it lives: one page of its own, from mmap, locked in RAM (mlock: never
// written to swap), left out of core dumps (MADV_DONTDUMP), and not given to
// a forked child (MADV_WIPEONFORK: the child's copy reads zero; on a kernel
// without it, before 4.14, MADV_DONTFORK: the child has no copy). A child
// must C_Initialize and log in again (docs/pkcs11-facts.md, "fork()"), so in
// a child the store keeps and hands back nothing. Every byte of a secret is
// zeroed with explicit_bzero (a store the compiler may not drop) when it is
// cleared, replaced, refused, and when the store is destroyed. The secret is
// never copied anywhere else: not into a std::string, the heap, a log or a
// trace. Nothing here formats it; use() lends it to a callable under the
// store's lock, so a clear waits for a login in progress and never races it.
//
// When the page cannot be had (mlock refused: RLIMIT_MEMLOCK without
// CAP_IPC_LOCK), the store keeps nothing rather than keep the PIN in memory
// that may be swapped: keep() answers PinKeep::no_locked_memory, and
// memory_problem() is the one warning line the runtime logs. The group then
// logs in on the members that are up, and the others stay out until the
// application logs in again.
//
// Lock order (sync/lock.hpp): the store's lock is taken under the calling
// session's lock (C_Login, C_Logout), under a group's login lock (C_Finalize;
// group_login.hpp), or under none (an open, a recovering member's probe,
// the last session's logout), and held across a member's C_Login from the kept
// login, on a borrowed session (the pool's and the backend's locks under
// it); it is taken under none of the pool's locks and no session's lock is
// taken under it.
#pragma once

#include "sync/lock.hpp"
#include "sync/thread_safety.hpp"

#include <p11mux/pkcs11.h>

#include <sys/types.h>

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

namespace p11mux {

// The longest PIN and username kept, in bytes. CK_TOKEN_INFO's ulMaxPinLen
// is a CK_ULONG, but tokens take far less (255 at most in the modules we
// know); longer is refused (PinKeep::too_long), never cut.
inline constexpr CK_ULONG kMaxKeptPin = 256;
inline constexpr CK_ULONG kMaxKeptUsername = 256;

// What keep() did with a login's secret.
enum class PinKeep {
  kept,               // held, replacing any earlier one of that user type
  context_specific,   // CKU_CONTEXT_SPECIFIC: one operation's, never kept
  unknown_user_type,  // neither CKU_USER nor CKU_SO: nothing a member could take
  too_long,           // PIN or username over its bound: not kept (the earlier one cleared)
  no_locked_memory,   // no locked page (memory_problem() says why): not kept
  forked_child,       // this process is a fork()ed child of the store's: not kept
};
const char* to_string(PinKeep keep) noexcept;

// The kept login, lent to use()'s callable: pointers into the locked page,
// valid only during the call and never to be copied out of it. A NULL `pin`
// is a login without a PIN (a protected authentication path, e.g. a PIN
// pad). `by_username` says the login was C_LoginUser's.
struct KeptLogin {
  CK_USER_TYPE user_type;
  CK_UTF8CHAR_PTR pin;
  CK_ULONG pin_len;
  bool by_username;
  CK_UTF8CHAR_PTR username;
  CK_ULONG username_len;
};

class PinStore {
 public:
  // Whether the store's page was had, and if not, why.
  enum class Memory { locked, no_page, not_locked, not_excluded_from_dumps };

  // What the destructor does with the page once zeroed: unmaps it, or (for
  // a test that reads it after destruction) leaves it mapped.
  enum class AfterDestruction { unmap, leave_mapped_for_test };

  // Maps and locks the page now, so that a problem is known (and logged by
  // the runtime) at C_Initialize, not at the first login. Never throws for
  // the page: a store without one keeps nothing (memory()).
  PinStore() noexcept : PinStore(AfterDestruction::unmap) {}
  explicit PinStore(AfterDestruction after) noexcept;
  // Locks through `locks` (the application's mutex callbacks, when it gave
  // them), which must outlive the store. Throws CkrError when its
  // CreateMutex fails.
  explicit PinStore(const LockSource& locks, AfterDestruction after = AfterDestruction::unmap);
  explicit PinStore(const LockSource&& locks, AfterDestruction after = {}) = delete;
  // Zeroes the page, unlocks and unmaps it. In a forked child it touches
  // nothing (the child's copy is zero, or absent).
  ~PinStore() NO_THREAD_SAFETY_ANALYSIS;  // the last owner: no other thread is left
  PinStore(const PinStore&) = delete;     // two copies of a secret is what this avoids
  PinStore& operator=(const PinStore&) = delete;

  Memory memory() const noexcept { return memory_; }
  // The warning line for a store without its page ("" when it has one):
  // what failed, the errno, and what follows for the group.
  std::string memory_problem() const;
  // Whether the child of a fork() gets a zeroed copy (MADV_WIPEONFORK) rather
  // than none at all (MADV_DONTFORK, older kernels). Either way it keeps nothing.
  bool wiped_on_fork() const noexcept { return wipe_on_fork_; }

  // Keeps the secret of a C_Login that succeeded, replacing (and zeroing)
  // the earlier one of that user type. `pin` NULL: a login without a PIN.
  PinKeep keep(CK_USER_TYPE user_type, const CK_UTF8CHAR* pin, CK_ULONG pin_len) EXCLUDES(mutex_);
  // The same for C_LoginUser: the PIN and the username.
  PinKeep keep_by_username(CK_USER_TYPE user_type, const CK_UTF8CHAR* pin, CK_ULONG pin_len,
                           const CK_UTF8CHAR* username, CK_ULONG username_len) EXCLUDES(mutex_);

  // Whether a login of `user_type` is kept.
  bool kept(CK_USER_TYPE user_type) const EXCLUDES(mutex_);

  // Runs fn(const KeptLogin&) under the store's lock with the login kept
  // for `user_type` and returns what fn returns; nullopt (fn not run) when
  // none is kept. fn must not keep the pointers, and must not call back
  // into the store (the lock is not recursive).
  template <class F>
  std::optional<std::invoke_result_t<F, const KeptLogin&>> use(CK_USER_TYPE user_type, F&& fn)
      EXCLUDES(mutex_);

  // Zeroes the login of `user_type`, or all of them (C_Logout, C_Finalize).
  // Waits for a use() in progress.
  void clear(CK_USER_TYPE user_type) EXCLUDES(mutex_);
  void clear_all() EXCLUDES(mutex_);

  // Test hook: the page, read as bytes, or empty without one. Not locked:
  // for a test with no other thread on the store.
  std::span<const unsigned char> page_for_test() const noexcept NO_THREAD_SAFETY_ANALYSIS;

 private:
  struct Page;
  struct Slot;

  void map_page() noexcept NO_THREAD_SAFETY_ANALYSIS;  // in the constructor, before any sharing
  bool in_forked_child() const noexcept;
  Slot* slot_of(CK_USER_TYPE user_type) const REQUIRES(mutex_);
  PinKeep check(CK_USER_TYPE user_type) const noexcept;
  PinKeep store(CK_USER_TYPE user_type, const CK_UTF8CHAR* pin, CK_ULONG pin_len, bool by_username,
                const CK_UTF8CHAR* username, CK_ULONG username_len) EXCLUDES(mutex_);
  std::optional<KeptLogin> lend(CK_USER_TYPE user_type) const REQUIRES(mutex_);

  mutable Mutex mutex_;
  // Set once by the constructor; what it points to is under the lock.
  Page* page_ PT_GUARDED_BY(mutex_) = nullptr;
  std::size_t page_size_ = 0;
  Memory memory_ = Memory::no_page;
  int memory_errno_ = 0;
  bool wipe_on_fork_ = false;
  AfterDestruction after_ = AfterDestruction::unmap;
  pid_t owner_pid_ = 0;  // the process that mapped the page; any other is a forked child
};

template <class F>
std::optional<std::invoke_result_t<F, const KeptLogin&>> PinStore::use(CK_USER_TYPE user_type,
                                                                       F&& fn) {
  // In a child the lock may be a copy of one a parent's thread held at fork().
  if (in_forked_child()) return std::nullopt;
  MutexGuard guard(mutex_);
  std::optional<KeptLogin> login = lend(user_type);
  if (!login) return std::nullopt;
  return std::forward<F>(fn)(std::as_const(*login));
}

}  // namespace p11mux
