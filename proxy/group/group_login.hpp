// A group's login (issue 15; docs/groups.md, "Keeping the PIN"): in PKCS#11
// the login belongs to the token and the application, not to one session
// (docs/pkcs11-facts.md, "Sessions"), so a C_Login on any session of a group
// logs in every member whose token is present, and a member that did not
// take it (absent then, or logged out since by its pool or its backend) is
// logged in from the kept PIN before a session opens on it.
//
// Per group: the application's login as p11mux answers it (`user`), the
// PinStore with its secret, the application's sessions on the group, and
// the members that refused the kept PIN (never tried again: each wrong try
// counts toward a lockout; GroupRuntime::login_ready, which placement reads
// to pass them over). The members' own sessions for these calls are
// borrowed from their pools (SessionPool::borrow) and given back; the
// session's own member is logged in through the application's session.
// Each call on a borrowed session is counted in flight on its member
// (MemberHealth), as the application's calls are, so that a member that
// stops answering under one is found hung.
//
// In multiplex mode each thread's lane is a group's session of its own
// (session_lanes.hpp): the same calls, on the lane. Not on the
// hot path: only C_Login, C_LoginUser, C_Logout, C_SetPIN, C_InitPIN on a
// group's session, C_OpenSession / C_CloseSession on a group's slot, and
// the probe of a member that recovers (join). None of them calls a member
// under the group's lock: they read and record under it, and call without
// it, so that a member that hangs in one holds up only the thread that
// called into it. A C_Login, C_Logout or last session's logout in progress
// is recorded (`change`) so that the others answer as the spec's one token
// would without waiting for it (docs/groups.md, "Keeping the PIN").
//
// Lock order (sync/lock.hpp): a group's lock is taken under a Session::lock
// (the call's own, or none), then the PinStore's, then the pools' and the
// backend's locks through the members' calls; never a Session::lock under it.
#pragma once

#include "functions/function_traits.hpp"
#include "group/group_runtime.hpp"
#include "group/pin_store.hpp"
#include "sessions/session_table.hpp"
#include "sync/lock.hpp"
#include "sync/thread_safety.hpp"

#include <p11mux/pkcs11.h>

#include <spdlog/logger.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace p11mux {

class Runtime;
class SessionPool;

class GroupLogin {
 public:
  // `pools[g][m]`: the pool of member m of group g (Runtime::pool_of its
  // port). `keep_login`: [pool] keep_login, the application's last session
  // does not log the token out. Logs one warning line when a store has no
  // locked page (PinStore::memory_problem: RLIMIT_MEMLOCK and errno).
  // `names[g]`: group g's name, for the log.
  GroupLogin(const GroupRuntime& groups, std::vector<std::string> names,
             std::vector<std::vector<SessionPool*>> pools, const LockSource& locks, bool keep_login,
             spdlog::logger& log);
  GroupLogin(const GroupLogin&) = delete;
  GroupLogin& operator=(const GroupLogin&) = delete;
  ~GroupLogin();

  // The calls on a group's session, its lock held (forward.hpp). `s.anchor`
  // holds its backend session.
  CK_RV login(Session& s, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len,
              CK_UTF8CHAR_PTR username, CK_ULONG username_len, bool by_username) noexcept
      REQUIRES(s.lock);
  CK_RV logout(Session& s) noexcept REQUIRES(s.lock);
  // C_SetPIN and C_InitPIN: refused (CKR_FUNCTION_NOT_SUPPORTED) with a log
  // line: the members' PINs would diverge (docs/groups.md).
  CK_RV refuse_pin_change(const char* function, const Session& s) noexcept REQUIRES(s.lock);

  // Before a session opens on `member` of `group`: while the application is
  // logged in, the member is logged in too (from the kept PIN if it is
  // not), else the open fails: CKR_DEVICE_ERROR, with a log line, when the
  // member cannot be logged in (it refused the kept PIN, or none is kept:
  // member_ready is false from then on, and placement passes it over) or is
  // no longer up; the member's error otherwise. The member's calls are made
  // without the group's lock, as join()'s: a member that hangs in them holds
  // up this open only (and is found hung: they are counted in flight).
  // Counts the application's session on the group; closed() undoes it.
  CK_RV opening(std::size_t group, std::size_t member) noexcept;
  // A session of the group closed (or did not open after opening()): the
  // last one logs every member out and clears the kept PIN, as the spec
  // logs the application out with its last session on the token.
  void closed(std::size_t group) noexcept;
  // C_Finalize, before the sessions close: every kept PIN zeroed, the group
  // logged out (the backends' C_Finalize ends the members' logins).
  void finalize() noexcept;

  // A down member whose probe succeeded, before it is admitted again
  // (GroupRuntime::maintain, on the p11mux-members thread): while the
  // application is logged in to the group, the member is logged in as the
  // group is, from the kept PIN unless it is already (a
  // CKR_USER_ALREADY_LOGGED_IN counts as in). True: it may be admitted
  // (the group not logged in, or the member in). False, with a log line:
  // it stays down until its next probe. A member that refuses the kept PIN,
  // or that no kept login can log in, is not tried again (each wrong try
  // counts toward its lockout) until the application logs in again or out.
  // The group's lock is held only to read and to record, never across the
  // member's calls: a member that hangs in them holds up its own probe, and
  // a C_Logout or last C_CloseSession of the group only when it clears the
  // kept PIN, whose lock the member's C_Login holds (pin_store.hpp).
  bool join(std::size_t group, std::size_t member) noexcept;

  // Whether the member can be logged in as the group is, as far as p11mux
  // knows: the group not logged in, or the member neither refused the kept
  // PIN nor missed the login without a store (GroupRuntime::login_ready,
  // which placement reads). Takes no lock.
  bool member_ready(std::size_t group, std::size_t member) const noexcept;

 private:
  static constexpr CK_USER_TYPE kNobody = ~CK_USER_TYPE{0};
  // A change of the group's login whose members' calls are in progress,
  // made without the group's lock by the thread that asked for it.
  enum class Change : std::uint8_t { none, logging_in, logging_out };
  // What a session's close leaves to do once the group's lock is let go.
  enum class AfterClose : std::uint8_t { nothing, tidy, log_out };
  struct Group {
    explicit Group(const LockSource& locks) : mutex(locks), store(locks) {}
    std::string name;
    std::size_t index = 0;  // in GroupRuntime
    const std::vector<GroupRuntime::Member>* members = nullptr;
    std::vector<SessionPool*> pools;    // member i's
    std::vector<MemberHealth*> health;  // member i's
    mutable Mutex mutex;
    PinStore store;  // its own lock, taken under `mutex`
    // The application's login on the group: CKU_USER, CKU_SO, or kNobody.
    CK_USER_TYPE user GUARDED_BY(mutex) = kNobody;
    // Member i did not take a logout (absent, or failing, at the time): it
    // may still be logged in, and is logged out at the group's next call.
    // kStale, or kStaleInFlight while a thread makes that logout.
    std::vector<std::uint8_t> stale GUARDED_BY(mutex);
    Change change GUARDED_BY(mutex) = Change::none;
    // The login as C_Login answers it: `user`, the login in progress, or the
    // one a logout in progress ends.
    CK_USER_TYPE claimed GUARDED_BY(mutex) = kNobody;
    // Bumped when a C_Login begins: a stale member's logout made meanwhile
    // may have undone that login on it (tidy_stale).
    std::uint64_t login_starts GUARDED_BY(mutex) = 0;
    std::size_t sessions GUARDED_BY(mutex) = 0;  // the application's, open on the group
    // Bumped at every change of `user`: join() and opening() tell from it
    // whether the login changed while they worked without the lock.
    std::uint64_t logins GUARDED_BY(mutex) = 0;
  };

  // How a member's call on a borrowed session is made. `plain`: the group's
  // C_Login and C_Logout, on a member they found up; its answer is theirs to
  // judge (a member that does not take a logout gets it later), so it counts
  // as answered whatever its code. `up`: a session opening; not made on a
  // member that is not up (CKR_DEVICE_ERROR: the caller would hang with a
  // hung one), and its answer counted as a call's (member_health.hpp: a
  // device code takes the member down, and the open goes elsewhere).
  // `joining`: the same on a member being admitted (its probe's join).
  enum class Reach : std::uint8_t { plain, up, joining };
  // A member's call on a session borrowed from its pool, counted in flight
  // on the member (a member that stops answering under it is found hung).
  template <class Fn>
  CK_RV on_borrowed(const Group& g, std::size_t member, bool rw, Reach reach,
                    Fn&& fn) const noexcept;
  CK_RV member_login(const Group& g, std::size_t member, Reach reach, CK_USER_TYPE user,
                     CK_UTF8CHAR_PTR pin, CK_ULONG pin_len, CK_UTF8CHAR_PTR username,
                     CK_ULONG username_len, bool by_username) const noexcept;
  CK_RV member_logout(const Group& g, std::size_t member) const noexcept;
  static constexpr std::uint8_t kStale = 1;
  static constexpr std::uint8_t kStaleInFlight = 2;
  // One of the application's sessions on the group less: the last begins
  // the logout of every member (closed()), which after_close makes.
  AfterClose count_closed(Group& g) noexcept REQUIRES(g.mutex);
  void after_close(Group& g, AfterClose after) noexcept EXCLUDES(g.mutex);
  // Member i cannot be logged in as the group is until the login changes
  // (GroupRuntime::login_ready); refused(): whether it is so.
  void refuse(const Group& g, std::size_t member) const noexcept REQUIRES(g.mutex);
  bool refused(const Group& g, std::size_t member) const noexcept REQUIRES(g.mutex);
  // The group's logout begins: the application is logged out from now on
  // for opens and probes (`user`), still logged in for C_Login (`claimed`)
  // until log_out_members ends it.
  void begin_log_out(Group& g) noexcept REQUIRES(g.mutex);
  // Every member but `skip` logged out (or marked stale), the kept PIN
  // cleared, the logout ended.
  void log_out_members(Group& g, std::size_t skip) noexcept EXCLUDES(g.mutex);
  // Member i logged out, or marked stale when it did not take it.
  void log_out(Group& g, std::size_t member) noexcept EXCLUDES(g.mutex);
  // While the group is logged out and no change is in progress: the stale
  // members logged out, those that take it now.
  void tidy_stale(Group& g) noexcept EXCLUDES(g.mutex);
  // The application's login on the group is now `user`: every member may be
  // tried again.
  void set_user(Group& g, CK_USER_TYPE user) const noexcept REQUIRES(g.mutex);
  // join()'s and opening()'s calls on the member, without the group's lock:
  // whether it is logged in as `user`, and if not, its login from the kept
  // one.
  struct Joining {
    CK_RV rv = CKR_OK;          // CKR_OK: logged in as the group is
    bool nothing_kept = false;  // not logged in, and no login kept to do it
    bool ours = false;          // logged in by this join, from the kept login
    bool tried = false;         // a login from the kept one was made
    bool refused = false;       // not tried: the member refused the kept login meanwhile
  };
  Joining join_login(Group& g, std::size_t member, CK_USER_TYPE user, Reach reach) const noexcept
      EXCLUDES(g.mutex);
  // What opening() makes of its calls `j`, made for the login `logins`
  // counted: CKR_OK, or the open's error (the member then refused, and said
  // so, when it cannot be logged in). `again`: the group's login changed
  // meanwhile to another one: the calls are to be made again.
  CK_RV brought_in(Group& g, std::size_t member, const Joining& j, std::uint64_t logins,
                   bool& again) noexcept REQUIRES(g.mutex);

  const GroupRuntime& runtime_;
  const bool keep_login_;
  spdlog::logger& log_;
  std::vector<std::unique_ptr<Group>> groups_;
};

// The group's calls that forward.hpp hands over (serialize mode).
template <class F>
inline constexpr bool kGroupLoginCall =
    std::is_same_v<F, fn::C_Login> || std::is_same_v<F, fn::C_LoginUser> ||
    std::is_same_v<F, fn::C_Logout> || std::is_same_v<F, fn::C_SetPIN> ||
    std::is_same_v<F, fn::C_InitPIN>;

template <class F, class... A>
CK_RV group_login_call(GroupLogin& login, Session& s, A... a) noexcept REQUIRES(s.lock) {
  if constexpr (std::is_same_v<F, fn::C_Login>) {
    return login.login(s, a..., nullptr, 0, false);
  } else if constexpr (std::is_same_v<F, fn::C_LoginUser>) {
    return login.login(s, a..., true);
  } else if constexpr (std::is_same_v<F, fn::C_Logout>) {
    return login.logout(s);
  } else if constexpr (std::is_same_v<F, fn::C_SetPIN>) {
    return login.refuse_pin_change("C_SetPIN", s);
  } else {
    return login.refuse_pin_change("C_InitPIN", s);
  }
}

}  // namespace p11mux
