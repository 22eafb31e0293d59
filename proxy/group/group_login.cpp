#include "group/group_login.hpp"

#include "forward/session_effects.hpp"
#include "group/group_slot.hpp"
#include "sessions/gone_codes.hpp"
#include "sessions/session_pool.hpp"

#include <p11mux/rv_names.hpp>

#include <algorithm>
#include <new>
#include <optional>
#include <string>
#include <utility>

namespace p11mux {
namespace {

std::string member_name(const GroupMember& m) {
  return m.backend + (m.by == GroupMember::By::label ? "/label:" : "/serial:") + m.token;
}

// A kept PIN the member will not take: trying it again counts toward the
// member's lockout (docs/groups.md, "Keeping the PIN").
bool pin_refused(CK_RV rv) noexcept {
  return rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_EXPIRED;
}

// The member's token went away during the call: it counts as absent.
bool token_gone(CK_RV rv) noexcept {
  return rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_DEVICE_REMOVED;
}

// A session's state says the token is logged in as `user`.
bool logged_in_as(CK_STATE state, CK_USER_TYPE user) noexcept {
  if (user == CKU_SO) return state == CKS_RW_SO_FUNCTIONS;
  return state == CKS_RO_USER_FUNCTIONS || state == CKS_RW_USER_FUNCTIONS;
}

// Logged out, or never logged in: either way not logged in any more.
bool logged_out_now(CK_RV rv) noexcept { return rv == CKR_OK || rv == CKR_USER_NOT_LOGGED_IN; }

}  // namespace

GroupLogin::GroupLogin(const GroupRuntime& groups, std::vector<std::string> names,
                       std::vector<std::vector<SessionPool*>> pools, const LockSource& locks,
                       bool keep_login, spdlog::logger& log)
    : runtime_(groups), keep_login_(keep_login), log_(log) {
  for (std::size_t i = 0; i < groups.group_count(); ++i) {
    auto g = std::make_unique<Group>(locks);
    g->name = std::move(names.at(i));
    g->index = i;
    g->members = &groups.members(i);
    g->pools = std::move(pools.at(i));
    for (std::size_t m = 0; m < g->members->size(); ++m) g->health.push_back(&groups.health(i, m));
    {
      MutexGuard guard(g->mutex);
      g->stale.assign(g->members->size(), 0);
    }
    // One line for the first store without its page: the others share its
    // cause (RLIMIT_MEMLOCK is the process's).
    if (g->store.memory() != PinStore::Memory::locked &&
        std::none_of(groups_.begin(), groups_.end(), [](const auto& other) {
          return other->store.memory() != PinStore::Memory::locked;
        })) {
      log_.warn("group '{}': {}", g->name, g->store.memory_problem());
    }
    groups_.push_back(std::move(g));
  }
}

GroupLogin::~GroupLogin() = default;

template <class Fn>
CK_RV GroupLogin::on_borrowed(const Group& g, std::size_t member, bool rw, Reach reach,
                              Fn&& fn) const noexcept {
  const GroupRuntime::Member& m = (*g.members)[member];
  SessionPool& pool = *g.pools[member];
  MemberHealth& health = *g.health[member];
  // Borrowing may open a session there: not on a member that is not up.
  if (reach == Reach::up && !health.up()) return CKR_DEVICE_ERROR;
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  if (CK_RV rv = pool.borrow(m.slot, rw, h); rv != CKR_OK) return rv;
  // In flight on the member, so that one that stops answering under the call
  // is found hung (member_health.hpp); counted first, the state read after
  // (as the balancer does): a member marked down before this look is not
  // called, and its session is left to it (SessionPool::Fate::abandon).
  health.begin();
  if (reach == Reach::up && !health.up()) {
    health.cancel();
    pool.give(m.slot, rw, h, SessionPool::Fate::abandon);
    return CKR_DEVICE_ERROR;
  }
  const CK_RV rv = std::forward<Fn>(fn)(*m.port, h);
  if (reach == Reach::plain) {
    health.end_ok();  // answered
  } else {
    (void)health.end(rv, h, HealthClock::now());
  }
  // A login changes the token, not the session: it goes back as it was.
  const bool gone = session_gone(rv);
  pool.give(m.slot, rw, h, SessionPool::unreset_fate(gone, gone, CloseReason{}));
  if (gone) pool.invalidate(m.slot);
  return rv;
}

CK_RV GroupLogin::member_login(const Group& g, std::size_t member, Reach reach, CK_USER_TYPE user,
                               CK_UTF8CHAR_PTR pin, CK_ULONG pin_len, CK_UTF8CHAR_PTR username,
                               CK_ULONG username_len, bool by_username) const noexcept {
  const GroupRuntime::Member& m = (*g.members)[member];
  SessionPool& pool = *g.pools[member];
  // An SO login fails while the application has a read-only session there.
  if (user == CKU_SO) {
    if (CK_RV rv = pool.may_log_in_so(m.slot); rv != CKR_OK) return rv;
  }
  auto call = [&](const BackendPort& port, CK_SESSION_HANDLE h) {
    return by_username ? port.call<fn::C_LoginUser>(h, user, pin, pin_len, username, username_len)
                       : port.call<fn::C_Login>(h, user, pin, pin_len);
  };
  const bool rw = user == CKU_SO;
  CK_RV rv = on_borrowed(g, member, rw, reach, call);
  // p11mux's own idle read-only sessions may be what is in the way.
  if (rv == CKR_SESSION_READ_ONLY_EXISTS && user == CKU_SO &&
      pool.drain_idle(m.slot, /*read_only_only=*/true)) {
    rv = on_borrowed(g, member, rw, reach, call);
  }
  pool.logged_in(m.slot, user, rv == CKR_USER_ALREADY_LOGGED_IN ? CKR_OK : rv);
  return rv;
}

CK_RV GroupLogin::member_logout(const Group& g, std::size_t member) const noexcept {
  // A member that is not up (down, hung, being probed) is not called (the
  // caller would hang with it): it did not take the logout, and gets it when
  // it answers again (`stale`).
  if (!g.health[member]->up()) return CKR_DEVICE_ERROR;
  const GroupRuntime::Member& m = (*g.members)[member];
  const CK_RV rv = on_borrowed(
      g, member, false, Reach::plain,
      [](const BackendPort& port, CK_SESSION_HANDLE h) { return port.call<fn::C_Logout>(h); });
  g.pools[member]->logged_out(m.slot, rv);
  return rv;
}

CK_RV GroupLogin::login(Session& s, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len,
                        CK_UTF8CHAR_PTR username, CK_ULONG username_len,
                        bool by_username) noexcept {
  // The session's lock is held throughout: its fields, read here, stay.
  SessionPool& pool = *s.pool;
  const CK_SESSION_HANDLE backend = s.anchor.backend;
  const CK_SLOT_ID slot = s.slot;
  auto own_call = [&] {
    return by_username ? pool.port().call<fn::C_LoginUser>(backend, user, pin, pin_len, username,
                                                           username_len)
                       : pool.port().call<fn::C_Login>(backend, user, pin, pin_len);
  };
  // On the application's session, as forward.hpp would call it.
  auto own_login = [&] {
    CK_RV rv = own_call();
    // p11mux's own idle read-only sessions may be what is in the way.
    if (rv == CKR_SESSION_READ_ONLY_EXISTS && user == CKU_SO &&
        pool.drain_idle(slot, /*read_only_only=*/true)) {
      rv = own_call();
    }
    pool.logged_in(slot, user, rv == CKR_USER_ALREADY_LOGGED_IN ? CKR_OK : rv);
    return rv;
  };
  // CKU_CONTEXT_SPECIFIC authorizes one operation of this session, which
  // runs on its member: that member only, never kept. A user type neither
  // USER nor SO: the member's own answer (CKR_USER_TYPE_INVALID).
  if (user != CKU_USER && user != CKU_SO) {
    const CK_RV rv = own_login();
    note_call<fn::C_Login>(pool, s.anchor, slot, rv, user, pin, pin_len);
    return rv;
  }

  Group& g = *groups_.at(s.group);
  // 1: logged in by this call; 2: was logged in already (not ours to undo).
  std::vector<std::uint8_t> took;
  // A stale member this call logs out first: 1, then 2 once it took it.
  std::vector<std::uint8_t> retried;
  try {
    took.assign(g.members->size(), 0);
    retried.assign(g.members->size(), 0);
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
  {
    MutexGuard guard(g.mutex);
    // The application's login is the group's (docs/pkcs11-facts.md,
    // "Sessions"). Another thread's login in progress is answered as if it
    // had taken, a logout in progress as if it had not yet: neither is
    // waited for (its member may hang).
    if (g.claimed == user) return CKR_USER_ALREADY_LOGGED_IN;
    if (g.claimed != kNobody) return CKR_USER_ANOTHER_ALREADY_LOGGED_IN;
    if (user == CKU_SO) {
      for (std::size_t i = 0; i < g.pools.size(); ++i) {
        if (CK_RV rv = g.pools[i]->may_log_in_so((*g.members)[i].slot); rv != CKR_OK) return rv;
      }
    }
    // A member still logged in from before would answer "already logged in"
    // without checking this PIN: this call logs it out first.
    for (std::size_t i = 0; i < g.stale.size(); ++i) {
      if (g.stale[i] == kStale) {
        g.stale[i] = kStaleInFlight;
        retried[i] = 1;
      }
    }
    g.change = Change::logging_in;
    g.claimed = user;
    ++g.login_starts;
  }
  // The members' calls without the group's lock (group_login.hpp).
  for (std::size_t i = 0; i < retried.size(); ++i) {
    if (retried[i] != 0 && logged_out_now(member_logout(g, i))) retried[i] = 2;
  }
  // The login's end, recorded: `user` logged in (kNobody: not).
  auto end = [&](CK_USER_TYPE now) {
    MutexGuard guard(g.mutex);
    for (std::size_t i = 0; i < retried.size(); ++i) {
      if (retried[i] != 0 && g.stale[i] == kStaleInFlight)
        g.stale[i] = retried[i] == 2 ? 0 : kStale;
    }
    if (now != kNobody) {
      set_user(g, now);
      for (std::size_t i = 0; i < took.size(); ++i) {
        if (took[i] != 0) g.stale[i] = 0;
      }
    }
    g.claimed = now;
    g.change = Change::none;
  };
  const std::size_t own = s.member;
  auto undo = [&](std::size_t failed, CK_RV rv) {
    for (std::size_t i = 0; i < took.size(); ++i) {
      if (took[i] != 1) continue;
      if (i == own) {
        const CK_RV out = pool.port().call<fn::C_Logout>(backend);
        pool.logged_out(slot, out);
      } else {
        (void)member_logout(g, i);
      }
    }
    end(kNobody);
    log_.warn(
        "C_Login on group '{}' failed on member {} ({}): {}; the members it had logged in are "
        "logged out again",
        g.name, failed + 1, member_name((*g.members)[failed].config), rv_name(rv));
    return rv;
  };
  // The session's own member first, on the application's session: a wrong
  // PIN then costs one try on one member.
  CK_RV rv = own_login();
  note_call<fn::C_Login>(pool, s.anchor, slot, rv, user, pin, pin_len);
  if (rv == CKR_OK) {
    took[own] = 1;
  } else if (rv == CKR_USER_ALREADY_LOGGED_IN) {
    took[own] = 2;
  } else {
    return undo(own, rv);
  }
  for (std::size_t i = 0; i < took.size(); ++i) {
    if (i == own) continue;
    // An absent member is logged in from the kept PIN when it is back; so is
    // one that is not up, which is not asked (the application's call would
    // hang with it) and joins through its probe (join).
    if (!g.health[i]->up() || !GroupRuntime::token_present((*g.members)[i])) continue;
    rv = member_login(g, i, Reach::plain, user, pin, pin_len, username, username_len, by_username);
    if (rv == CKR_OK) {
      took[i] = 1;
    } else if (rv == CKR_USER_ALREADY_LOGGED_IN) {
      took[i] = 2;
    } else if (!token_gone(rv) && g.health[i]->up()) {
      return undo(i, rv);
    }
    // Gone down under the call (found hung while it hung, say): skipped as
    // one that was not up, it is logged in by its probe.
  }
  const bool verified = std::find(took.begin(), took.end(), 1) != took.end();
  // Only a PIN a member took is kept: one no member checked (every member
  // was logged in already) could be wrong, and each late login would count
  // a wrong try toward that member's lockout. Kept before the login is
  // recorded, so that an open that sees the login finds it; no logout can
  // clear it meanwhile (`claimed`).
  if (verified) {
    const PinKeep kept = by_username
                             ? g.store.keep_by_username(user, pin, pin_len, username, username_len)
                             : g.store.keep(user, pin, pin_len);
    if (kept != PinKeep::kept) {
      log_.info("group '{}': the login is not kept ({}); members that join later stay out", g.name,
                to_string(kept));
    }
  }
  end(user);
  // The application was not logged in: the login is new to it, whatever a
  // member said, unless no member took it (every one was logged in already,
  // as one token logged in by another user of its module would say).
  return verified ? CKR_OK : CKR_USER_ALREADY_LOGGED_IN;
}

void GroupLogin::log_out(Group& g, std::size_t member) noexcept {
  const CK_RV rv = member_logout(g, member);
  MutexGuard guard(g.mutex);
  g.stale[member] = logged_out_now(rv) ? 0 : kStale;
  if (g.stale[member] != 0) {
    log_.warn(
        "group '{}': member {} ({}) did not take the logout ({}); it is logged out at the "
        "group's next C_OpenSession, C_CloseSession or C_Login",
        g.name, member + 1, member_name((*g.members)[member].config), rv_name(rv));
  }
}

void GroupLogin::tidy_stale(Group& g) noexcept {
  for (std::size_t i = 0; i < g.members->size(); ++i) {
    std::uint64_t starts = 0;
    {
      MutexGuard guard(g.mutex);
      if (g.stale[i] != kStale || g.user != kNobody || g.change != Change::none) continue;
      g.stale[i] = kStaleInFlight;
      starts = g.login_starts;
    }
    const CK_RV rv = member_logout(g, i);
    MutexGuard guard(g.mutex);
    if (g.stale[i] == kStaleInFlight) g.stale[i] = logged_out_now(rv) ? 0 : kStale;
    // A C_Login began meanwhile and may have logged the member in before
    // this logout reached it: its login is not known. Down, its probe logs
    // it in as the group is (join), and its sessions move.
    if (rv == CKR_OK && g.login_starts != starts && g.claimed != kNobody &&
        g.health[i]->mark_down(DownReason::login_failed, HealthClock::now())) {
      log_.warn(
          "group '{}': member {} ({}) was logged out of its old login while the group's C_Login "
          "ran; it is taken down and logged in again by its probe",
          g.name, i + 1, member_name((*g.members)[i].config));
    }
  }
}

void GroupLogin::begin_log_out(Group& g) noexcept {
  g.change = Change::logging_out;
  set_user(g, kNobody);
}

void GroupLogin::log_out_members(Group& g, std::size_t skip) noexcept {
  for (std::size_t i = 0; i < g.pools.size(); ++i) {
    if (i != skip) log_out(g, i);
  }
  // Without the group's lock: it waits for a login from the kept PIN in
  // progress (pin_store.hpp), which a hung member may hold.
  g.store.clear_all();
  MutexGuard guard(g.mutex);
  g.claimed = kNobody;
  g.change = Change::none;
}

CK_RV GroupLogin::logout(Session& s) noexcept {
  SessionPool& pool = *s.pool;
  Group& g = *groups_.at(s.group);
  bool logged_in = false;
  {
    MutexGuard guard(g.mutex);
    // Another thread's login in progress is not the application's yet, and
    // its logout in progress is the application's already: either way not
    // logged in, and neither is waited for (its member may hang).
    if (g.change != Change::none) return CKR_USER_NOT_LOGGED_IN;
    logged_in = g.user != kNobody;
    if (logged_in) begin_log_out(g);
  }
  CK_RV rv = pool.port().call<fn::C_Logout>(s.anchor.backend);
  note_call<fn::C_Logout>(pool, s.anchor, s.slot, rv);
  pool.logged_out(s.slot, rv);
  if (!logged_in) return rv;  // the member's answer: CKR_USER_NOT_LOGGED_IN
  if (!logged_out_now(rv)) {
    MutexGuard guard(g.mutex);
    g.stale[s.member] = kStale;
  }
  log_out_members(g, s.member);
  // The application was logged in: its member having lost the login (its
  // pool logged it out with its last session there) changes nothing for it.
  return rv == CKR_USER_NOT_LOGGED_IN ? CKR_OK : rv;
}

CK_RV GroupLogin::refuse_pin_change(const char* function, const Session& s) noexcept {
  log_.warn(
      "{} on group '{}' refused (CKR_FUNCTION_NOT_SUPPORTED): it would change one member's PIN "
      "and not the others', and the kept login would then fail on them; change it on each "
      "member's token (docs/groups.md, \"Keeping the PIN\")",
      function, groups_.at(s.group)->name);
  return CKR_FUNCTION_NOT_SUPPORTED;
}

CK_RV GroupLogin::opening(std::size_t group, std::size_t member) noexcept {
  Group& g = *groups_.at(group);
  CK_USER_TYPE user = kNobody;
  std::uint64_t logins = 0;
  AfterClose after = AfterClose::nothing;
  bool passed = false;  // refused before: not tried
  {
    MutexGuard guard(g.mutex);
    // Counted before the member's calls: the group's last session closing
    // meanwhile does not log the group out under this open.
    ++g.sessions;
    user = g.user;
    logins = g.logins;
    if (user != kNobody && refused(g, member)) {
      // Placed here only when no other member can be logged in either
      // (GroupRuntime::place_session), or refused since it was placed.
      log_.warn(
          "group '{}': member {} ({}) is not logged in (see above): no session opens on it "
          "until the application logs in again",
          g.name, member + 1, member_name((*g.members)[member].config));
      after = count_closed(g);
      passed = true;
    }
  }
  if (user == kNobody) {
    tidy_stale(g);
    return CKR_OK;
  }
  if (passed) {
    after_close(g, after);
    return CKR_DEVICE_ERROR;
  }
  // Without the group's lock (group_login.hpp), as join(): the member's
  // calls may hang. Made again (at most twice) if the group's login changed
  // meanwhile to another one.
  for (int tries = 0;; ++tries) {
    const Joining j = join_login(g, member, user, Reach::up);
    CK_RV rv = CKR_OK;
    {
      MutexGuard guard(g.mutex);
      bool again = false;
      rv = brought_in(g, member, j, logins, again);
      if (again && tries < 2) {
        user = g.user;
        logins = g.logins;
        continue;
      }
      if (again) {
        log_.warn(
            "group '{}': member {} ({}) could not be logged in: the group's login changed while "
            "it was being logged in",
            g.name, member + 1, member_name((*g.members)[member].config));
      }
      if (rv != CKR_OK) after = count_closed(g);
    }
    after_close(g, after);
    return rv;
  }
}

CK_RV GroupLogin::brought_in(Group& g, std::size_t member, const Joining& j, std::uint64_t logins,
                             bool& again) noexcept {
  again = false;
  if (g.logins != logins) {
    // The application logged out meanwhile: the session opens logged out, as
    // it now is; a login of ours is undone at the group's next call. Logged
    // in again: the member is asked again.
    if (g.user != kNobody) {
      again = true;
      return CKR_DEVICE_ERROR;
    }
    if (j.ours) g.stale[member] = 1;
    return CKR_OK;
  }
  const std::string name = member_name((*g.members)[member].config);
  if (j.rv == CKR_OK) {
    if (j.ours) {
      log_.info("group '{}': member {} ({}) logged in from the kept login", g.name, member + 1,
                name);
    }
    return CKR_OK;
  }
  // Another open's (or its probe's) try was refused meanwhile: said there.
  if (j.refused) return CKR_DEVICE_ERROR;
  if (j.nothing_kept) {
    refuse(g, member);
    log_.warn(
        "group '{}': member {} ({}) is not logged in and no login is kept to log it in; "
        "sessions open on the other members until the application logs in again",
        g.name, member + 1, name);
    return CKR_DEVICE_ERROR;
  }
  if (pin_refused(j.rv)) {
    // Never again with this PIN: each try counts toward the member's lockout.
    refuse(g, member);
    log_.warn(
        "group '{}': member {} ({}) refused the kept login ({}); not tried again until the "
        "application logs in again; sessions open on the other members",
        g.name, member + 1, name, rv_name(j.rv));
    return CKR_DEVICE_ERROR;
  }
  // A member gone down meanwhile is said by the members' watch.
  if (j.tried && g.health[member]->up()) {
    log_.warn("group '{}': member {} ({}) could not be logged in from the kept login: {}", g.name,
              member + 1, name, rv_name(j.rv));
  }
  return j.rv;
}

GroupLogin::AfterClose GroupLogin::count_closed(Group& g) noexcept {
  if (g.sessions > 0) --g.sessions;
  if (g.user == kNobody) return AfterClose::tidy;
  // The pools log a member out with the application's last session there;
  // members logged in through borrowed sessions have none, so the group
  // logs them all out with its last session.
  if (g.sessions == 0 && !keep_login_ && g.change == Change::none) {
    begin_log_out(g);
    return AfterClose::log_out;
  }
  return AfterClose::nothing;
}

void GroupLogin::after_close(Group& g, AfterClose after) noexcept {
  if (after == AfterClose::tidy) tidy_stale(g);
  if (after == AfterClose::log_out) log_out_members(g, g.members->size());
}

void GroupLogin::closed(std::size_t group) noexcept {
  Group& g = *groups_.at(group);
  AfterClose after = AfterClose::nothing;
  {
    MutexGuard guard(g.mutex);
    after = count_closed(g);
  }
  after_close(g, after);
}

void GroupLogin::refuse(const Group& g, std::size_t member) const noexcept {
  runtime_.set_login_ready(g.index, member, false);
}

bool GroupLogin::refused(const Group& g, std::size_t member) const noexcept {
  return !runtime_.login_ready(g.index, member);
}

void GroupLogin::finalize() noexcept {
  for (auto& group : groups_) {
    Group& g = *group;
    MutexGuard guard(g.mutex);
    g.store.clear_all();
    set_user(g, kNobody);
    g.claimed = kNobody;
    g.stale.assign(g.stale.size(), 0);
  }
}

void GroupLogin::set_user(Group& g, CK_USER_TYPE user) const noexcept {
  g.user = user;
  ++g.logins;
  // A new login, or none: members that refused the last are tried again.
  for (std::size_t i = 0; i < g.members->size(); ++i) runtime_.set_login_ready(g.index, i, true);
}

GroupLogin::Joining GroupLogin::join_login(Group& g, std::size_t member, CK_USER_TYPE user,
                                           Reach reach) const noexcept {
  Joining out;
  const bool rw = user == CKU_SO;
  CK_SESSION_INFO info{};
  auto session_info = [&](const BackendPort& port, CK_SESSION_HANDLE h) {
    return port.call<fn::C_GetSessionInfo>(h, &info);
  };
  out.rv = on_borrowed(g, member, rw, reach, session_info);
  // The pool's idle sessions from before it went down may be gone with its
  // restart: on_borrowed dropped them, and a fresh one is opened.
  if (session_gone(out.rv)) out.rv = on_borrowed(g, member, rw, reach, session_info);
  if (out.rv != CKR_OK || logged_in_as(info.state, user)) return out;
  // The store's lock is held across the login, so the logins from the kept
  // PIN of one group are one at a time: a refusal is noted before the next
  // one looks, and the PIN is tried once (each try counts toward the
  // member's lockout), however many opens and probes want the member.
  const std::optional<CK_RV> login = g.store.use(user, [&](const KeptLogin& k) {
    if (!runtime_.login_ready(g.index, member)) {
      out.refused = true;
      return CKR_DEVICE_ERROR;
    }
    out.tried = true;
    const CK_RV rv = member_login(g, member, reach, k.user_type, k.pin, k.pin_len, k.username,
                                  k.username_len, k.by_username);
    if (pin_refused(rv)) runtime_.set_login_ready(g.index, member, false);
    return rv;
  });
  if (!login) {
    out.rv = CKR_USER_NOT_LOGGED_IN;
    out.nothing_kept = true;
    return out;
  }
  out.rv = *login == CKR_USER_ALREADY_LOGGED_IN ? CKR_OK : *login;
  out.ours = *login == CKR_OK;
  return out;
}

bool GroupLogin::join(std::size_t group, std::size_t member) noexcept {
  Group& g = *groups_.at(group);
  CK_USER_TYPE user = kNobody;
  std::uint64_t logins = 0;
  {
    MutexGuard guard(g.mutex);
    user = g.user;
    logins = g.logins;
    if (user == kNobody) return true;
    // Not tried again (opening): said when it was refused.
    if (refused(g, member)) return false;
  }
  // Without the group's lock (group_login.hpp): the member's calls may hang.
  const Joining j = join_login(g, member, user, Reach::joining);
  const std::string name = member_name((*g.members)[member].config);
  MutexGuard guard(g.mutex);
  if (g.logins != logins) {
    // The application logged out (or out and in again) meanwhile. Logged out,
    // the member may join: a login of ours is undone at the group's next call.
    if (j.ours) g.stale[member] = 1;
    if (g.user == kNobody) return true;
    log_.warn(
        "group '{}': member {} ({}) stays down until its next probe: the group's login "
        "changed while it was being logged in",
        g.name, member + 1, name);
    return false;
  }
  if (j.rv == CKR_OK) {
    if (j.ours) {
      log_.info("group '{}': member {} ({}) logged in from the kept login by its probe", g.name,
                member + 1, name);
    }
    return true;
  }
  if (j.refused) return false;  // said by the open that was refused
  if (j.nothing_kept || pin_refused(j.rv)) {
    // Never again with this PIN: each try counts toward the member's lockout.
    refuse(g, member);
    log_.warn(
        "group '{}': member {} ({}) stays down: {} ({}); not tried again until the application "
        "logs in again or out",
        g.name, member + 1, name,
        j.nothing_kept ? "no login is kept to log it in" : "it refused the kept login",
        rv_name(j.rv));
    return false;
  }
  log_.warn(
      "group '{}': member {} ({}) stays down until its next probe: its login from the "
      "kept login returned {}",
      g.name, member + 1, name, rv_name(j.rv));
  return false;
}

bool GroupLogin::member_ready(std::size_t group, std::size_t member) const noexcept {
  return runtime_.login_ready(group, member);
}

}  // namespace p11mux
