#include "lifecycle/runtime.hpp"

#include "group/group_login.hpp"
#include "group/member_pool_calls.hpp"
#include "group/session_lanes.hpp"

#include "forward/operation_state.hpp"
#include "observe/logging.hpp"

#include <p11mux/ckr_error.hpp>
#include <p11mux/rv_names.hpp>

#include <algorithm>
#include <chrono>

namespace p11mux {
namespace {

using namespace std::chrono_literals;

// How often an emulated blocking C_WaitForSlotEvent asks the backend.
constexpr auto kSlotEventPoll = 100ms;
// How long C_Finalize waits for blocked C_WaitForSlotEvent callers to return
// after the backend was finalized, before it gives up on them.
constexpr auto kWaiterGrace = 2s;

BackendLocking backend_locking(LockingMode mode) noexcept {
  switch (mode) {
    case LockingMode::automatic:
      return BackendLocking::automatic;
    case LockingMode::os:
      return BackendLocking::os;
    case LockingMode::callbacks:
      return BackendLocking::callbacks;
    case LockingMode::none:
      return BackendLocking::none;
  }
  return BackendLocking::automatic;
}

// In a forked child, the locking port `i` had in the parent (Runtime::inherited_locking).
std::optional<BackendLocking> inherited_at(std::span<const std::optional<BackendLocking>> inherited,
                                           std::size_t i) noexcept {
  return i < inherited.size() ? inherited[i] : std::nullopt;
}

BackendOptions named_backend_options(const NamedBackend& backend, const CK_FUNCTION_LIST* self,
                                     std::optional<BackendLocking> inherited) {
  BackendOptions options;
  options.inherited = inherited;
  options.path = backend.module;
  options.init_reserved = backend.init_reserved;
  options.self = self;
  options.locking = backend_locking(backend.locking);
  return options;
}

// The runtime's own port: the top-level module, or in a group configuration
// the first [backend.NAME] (the others: load_named_backends).
BackendOptions backend_options(const Config& config, const CK_FUNCTION_LIST* self,
                               std::optional<BackendLocking> inherited) {
  if (config.has_groups()) {
    // config.cpp refuses a named backend no group uses, so there is one.
    if (config.backends.empty()) throw ConfigError("[group.NAME] without any [backend.NAME]");
    // [policy] tokens picks slots by asking the backend about a slot ID;
    // a group configuration's slot IDs are p11mux's (group_runtime.hpp).
    if (!config.policy.tokens.empty()) {
      throw ConfigError(
          "[policy] tokens does not apply to [group.NAME] configurations yet (docs/groups.md); "
          "a group's hide_members hides its members");
    }
    // The vendor's interfaces call one module with its own slot IDs,
    // bypassing p11mux: in a group configuration, which module is unclear
    // and its slot IDs are not the application's.
    if (config.backend.vendor_interfaces == VendorInterfaces::pass) {
      throw ConfigError(
          "[backend] vendor_interfaces = pass does not apply to [group.NAME] configurations "
          "(docs/groups.md)");
    }
    return named_backend_options(config.backends.front(), self, inherited);
  }
  if (config.module.empty()) {
    throw CkrError(CKR_GENERAL_ERROR,
                   "no backend module configured: set P11MUX_MODULE, or `module` in the file "
                   "named by P11MUX_CONFIG or, with that unset, in " +
                       std::string(default_config_file()));
  }
  BackendOptions options;
  options.path = config.module;
  options.init_reserved = config.backend.init_reserved;
  options.self = self;
  options.inherited = inherited;
  options.locking = backend_locking(config.backend.locking);
  return options;
}

// Each [backend.NAME] after the first, loaded once however many members it
// serves, each with its own locking and init_reserved, and in a forked
// child the locking it had in the parent (port i + 1's of `inherited`).
std::vector<std::unique_ptr<BackendPort>> load_named_backends(
    const Config& config, const CK_FUNCTION_LIST* self, const LockSource& locks,
    std::span<const std::optional<BackendLocking>> inherited) {
  std::vector<std::unique_ptr<BackendPort>> ports;
  for (std::size_t i = 1; i < config.backends.size(); ++i) {
    ports.push_back(
        std::make_unique<BackendPort>(std::make_unique<Backend>(named_backend_options(
                                          config.backends[i], self, inherited_at(inherited, i))),
                                      locks));
  }
  return ports;
}

void log_backend(spdlog::logger& log, const Backend& backend, std::string_view name) {
  log.info("backend {}'{}' initialized: cryptoki {}.{}, locking {}{}{}", name, backend.path(),
           backend.version().major, backend.version().minor, to_string(backend.locking()),
           backend.thread_safe() ? "" : " (not thread-safe: every call serialized)",
           backend.shared()      ? ", already initialized by another user"
           : backend.inherited() ? ", as initialized before fork()"
                                 : "");
}

}  // namespace

Runtime::Runtime(const Config& config, const InitArgs& init, const CK_FUNCTION_LIST* self,
                 std::uint64_t epoch, GateAccess& gate,
                 std::span<const std::optional<BackendLocking>> inherited)
    : config_(config),
      gate_(gate),
      locks_(init.locks),
      may_create_threads_(init.may_create_threads),
      multiplexed_(config.session_mode == SessionMode::multiplex),
      binds_on_state_(config.binds_on_state()),
      log_(make_logger(config.log, locks_, init.may_create_threads)),
      tracing_(log_->should_log(spdlog::level::trace)),
      observer_(std::make_unique<Observer>(config, locks_, init.may_create_threads, log_)),
      policy_(config.policy.any() ? std::make_unique<const Policy>(config.policy, locks_)
                                  : nullptr),
      // A group's session calls translate object handles (group_object_calls.hpp).
      slow_path_(observer_->active() || policy_ != nullptr),
      port_(std::make_unique<Backend>(backend_options(config, self, inherited_at(inherited, 0))),
            locks_),
      extra_ports_(load_named_backends(config, self, locks_, inherited)),
      groups_(config.has_groups() ? std::make_unique<const GroupRuntime>(config, ports(), *log_)
                                  : nullptr),
      group_objects_(groups_ ? make_group_objects(config, locks_, *log_)
                             : std::vector<GroupObjectsPtr>{}),
      sessions_(locks_),
      poll_lock_(locks_) {
  // A group's login is the group's, not a member's: its last session logs
  // every member out (GroupLogin::closed), so a member's pool never logs out
  // on its own when the last of the group's sessions on that member closes.
  Config::Pool pool_config = config.pool;
  if (groups_) pool_config.keep_login = true;
  // Each port's pool reports to its backend's own figures (Observer::pools):
  // two backends may both have a slot 0.
  const std::vector<const BackendPort*> all = ports();
  for (std::size_t i = 0; i < all.size(); ++i) {
    pools_.push_back(std::make_unique<SessionPool>(*all[i], gate, pool_config, locks_, epoch, *log_,
                                                   observer_->pools(i)));
  }
  if (groups_) {
    std::vector<std::string> names;
    std::vector<std::vector<SessionPool*>> member_pools;
    for (std::size_t g = 0; g < groups_->group_count(); ++g) {
      names.push_back(config.groups.at(g).name);
      auto& pools = member_pools.emplace_back();
      for (const GroupRuntime::Member& m : groups_->members(g)) pools.push_back(&pool_of(*m.port));
    }
    group_login_ = std::make_unique<GroupLogin>(*groups_, std::move(names), std::move(member_pools),
                                                locks_, config.pool.keep_login, *log_);
  }
  // A group configuration opens no sessions at start: prewarming members is
  // not built (docs/groups.md, "Not built yet").
  if (!groups_) {
    pool().prewarm();
  } else if (config.pool.prewarm > 0) {
    log_->warn(
        "[pool] prewarm = {} is not applied to groups yet: a member's backend sessions open "
        "when sessions need them (docs/groups.md)",
        config.pool.prewarm);
  }
  std::chrono::seconds idle(config.pool.idle_timeout_s), keepalive(config.pool.keepalive_s);
  if (idle.count() > 0 || keepalive.count() > 0) {
    if (may_create_threads_ && groups_) {
      start_member_maintenance(idle, keepalive);
    } else if (may_create_threads_) {
      for (auto& pool : pools_) {
        maintenance_.push_back(std::make_unique<PoolMaintenance>(*pool, idle, keepalive));
      }
    } else {
      log_->warn(
          "pool.idle_timeout_s and pool.keepalive_s are off: "
          "CKF_LIBRARY_CANT_CREATE_OS_THREADS forbids p11mux's maintenance thread");
    }
  }
  if (groups_) {
    if (may_create_threads_) {
      start_member_watch();
    } else {
      log_->warn(
          "groups: down members are never probed nor hung calls found: "
          "CKF_LIBRARY_CANT_CREATE_OS_THREADS forbids p11mux's maintenance thread");
    }
  }
  log_->info("sessions: mode {}, bind {}", to_string(config.session_mode),
             binds_on_state_ ? "state" : "open");
  if (groups_) {
    for (std::size_t i = 0; i < config.backends.size(); ++i) {
      log_backend(*log_, *ports()[i]->backend(), "[backend." + config.backends[i].name + "] ");
    }
  } else {
    log_backend(*log_, *port_.backend(), "");
  }
  if (locks_.uses_app_callbacks()) log_->info("using the application's mutex callbacks");
  if (policy_) log_->info("{}", policy_->describe());
  if (groups_) {
    observer_->start(sessions_, [g = groups_.get()] { return g->member_figures(); });
  } else {
    observer_->start(sessions_);
  }
}

// A group's members each get their own pool maintenance, which leaves them
// alone while they are not up (group/member_pool_calls.hpp): a member that
// stops answering holds up no other member's keepalive, nor its own hang's
// detection (docs/groups.md, "Members up and down"). A token in several
// groups is one: maintained once, called only while it is up in each.
void Runtime::start_member_maintenance(std::chrono::seconds idle, std::chrono::seconds keepalive) {
  struct Token {
    const BackendPort* port;
    CK_SLOT_ID slot;
    std::vector<MemberHealth*> members;
  };
  std::vector<Token> tokens;
  for (std::size_t g = 0; g < groups_->group_count(); ++g) {
    for (std::size_t m = 0; m < groups_->members(g).size(); ++m) {
      const GroupRuntime::Member& member = groups_->members(g)[m];
      auto same = [&](const Token& t) { return t.port == member.port && t.slot == member.slot; };
      auto it = std::find_if(tokens.begin(), tokens.end(), same);
      if (it == tokens.end()) it = tokens.insert(tokens.end(), Token{member.port, member.slot, {}});
      it->members.push_back(&groups_->health(g, m));
    }
  }
  for (Token& t : tokens) {
    auto& calls =
        member_pool_calls_.emplace_back(std::make_unique<MemberPoolCalls>(std::move(t.members)));
    maintenance_.push_back(
        std::make_unique<PoolMaintenance>(pool_of(*t.port), t.slot, *calls, idle, keepalive));
  }
}

// The members' watch on a thread that calls no member, and each member's
// recovery on a thread of its own: a member whose probe, login or catch-up
// hangs holds up neither the hang detection of the others nor their
// recovery (docs/groups.md, "Members up and down").
void Runtime::start_member_watch() {
  const auto period = groups_->maintenance_period();
  member_watch_.push_back(std::make_unique<PeriodicTask>(
      "p11mux-members", period, [this] { groups_->watch(HealthClock::now()); }));
  for (std::size_t g = 0; g < groups_->group_count(); ++g) {
    for (std::size_t m = 0; m < groups_->members(g).size(); ++m) {
      member_watch_.push_back(std::make_unique<PeriodicTask>("p11mux-probe", period, [this, g, m] {
        // Probes are backend calls like any other: fork() and C_Finalize
        // wait for them.
        GateAccess::Background call(gate_);
        if (call.epoch() != pool().epoch()) return;
        groups_->recover(
            g, m, HealthClock::now(),
            // Logged in, then given the changes to token objects it missed.
            [this](std::size_t group, std::size_t member) {
              // It answers again: the sessions abandoned while it hung are
              // closed first (SessionPool::Fate::abandon).
              const GroupRuntime::Member& mm = groups_->members(group)[member];
              pool_of(*mm.port).close_abandoned(mm.slot);
              return group_login_->join(group, member) && group_catch_up(*this, group, member);
            },
            [this](std::size_t group, std::size_t member) {
              group_member_readmitted(*this, group, member);
            });
        // Sessions abandoned while it was not up (joining, say) are closed
        // once it is: an empty list costs a look.
        const GroupRuntime::Member& mm = groups_->members(g)[m];
        if (groups_->health(g, m).up()) pool_of(*mm.port).close_abandoned(mm.slot);
      }));
    }
  }
}

bool Runtime::token_hung(const BackendPort& port, CK_SLOT_ID slot) const noexcept {
  for (std::size_t g = 0; groups_ && g < groups_->group_count(); ++g) {
    for (std::size_t m = 0; m < groups_->members(g).size(); ++m) {
      const GroupRuntime::Member& member = groups_->members(g)[m];
      if (member.port == &port && member.slot == slot && !groups_->health(g, m).up()) return true;
    }
  }
  return false;
}

// The stats thread reads the sessions and the pool: it stops before they go.
Runtime::~Runtime() { observer_->stop(); }

// Ends what the virtual session left behind, so that the next user of the
// backend session sees none of it: active operations, those an error may have
// left active (v3.0 C_SessionCancel, or C_FindObjectsFinal for a search), and
// the session objects it created. Fate::reuse only when that is proven done;
// otherwise closed, with the reason counted (deny by default); Fate::dead when
// the backend said the session or device is gone.
SessionPool::Fate Runtime::reset_backend_session(const BackendPort& port, Binding& s) noexcept {
  using Fate = SessionPool::Fate;
  if (s.discard) return SessionPool::unreset_fate(s.discard, s.dead, s.why);
  const OpMask pending = s.ops | s.maybe;
  if (pending != 0 && port.call<fn::C_SessionCancel>(s.backend, cancel_flags(pending)) == CKR_OK) {
    s.ops = s.maybe = 0;
  }
  if ((s.ops | s.maybe) == op::find) {
    // Either answer proves no search is left.
    CK_RV rv = port.call<fn::C_FindObjectsFinal>(s.backend);
    if (rv == CKR_OK || rv == CKR_OPERATION_NOT_INITIALIZED) s.ops = s.maybe = 0;
  }
  if (s.ops != 0) return Fate::closed(CloseReason::operation_active);
  if (s.maybe != 0) return Fate::closed(CloseReason::operation_maybe_active);
  for (CK_OBJECT_HANDLE object : s.objects) {
    CK_RV rv = port.call<fn::C_DestroyObject>(s.backend, object);
    if (rv != CKR_OK && rv != CKR_OBJECT_HANDLE_INVALID) {
      return Fate::closed(CloseReason::object_not_destroyed);
    }
  }
  s.objects.clear();
  return Fate::reuse;
}

CK_RV Runtime::close_session(SessionLease lease) noexcept {
  Session* s = &*lease;
  HeldLock leased(s->lock);
  // No new call gets in; multiplexed calls still running finish first.
  // The handle's store and the count's load are seq_cst: a multiplexed
  // call counts itself, then loads the handle, without the lock
  // (forward_multiplexed, forward/multiplex.hpp); either it sees 0 and
  // leaves, or we see it counted.
  s->closing = true;
  s->handle.store(0, std::memory_order_seq_cst);
  if (s->in_flight.load(std::memory_order_seq_cst) != 0) {
    // Unlocked while we wait (the calls need the lock to finish), and
    // locked again before the lease, which unlocks, can end.
    s->lock.unlock();
    // Counted as a waiter, so that the last call to leave wakes us (one
    // atomic decrement decides it: no other flag to read after it).
    std::uint32_t n =
        s->in_flight.fetch_add(Session::kWaiter, std::memory_order_seq_cst) + Session::kWaiter;
    while (n % Session::kWaiter != 0) {
      timed_wait(s->in_flight, n, std::chrono::milliseconds(10));  // the bound is a backstop
      n = s->in_flight.load(std::memory_order_acquire);
    }
    s->in_flight.fetch_sub(Session::kWaiter, std::memory_order_relaxed);
    s->lock.lock();
  }
  // A lead (multiplex mode on a group's slot) holds no backend session: its
  // lanes do, and close with it (group/session_lanes.hpp).
  if (s->leads) {
    close_lanes(*this, *s);
    sessions_.close(std::move(lease));
    return CKR_OK;
  }
  SessionPool& pool = *s->pool;
  // A group's session objects made there die with it (docs/groups.md, "Objects").
  if (s->group != Session::kNoGroup && s->anchor.backend != CK_INVALID_HANDLE) {
    group_session_ended(*this, s->group, s->member, s->anchor.backend);
  }
  // A group's member that is not up (down, hung, or being probed) is not
  // called (it may hang the application's C_CloseSession): its backend
  // sessions are abandoned until it answers a probe, or is up again
  // (SessionPool::Fate::abandon; proxy/group/README.md, "A hung member").
  // On one up, the reset and close below are counted in flight, so that a
  // member that stops answering under them is found hung (counted first,
  // the state read after, as the balancer does).
  MemberHealth* member = nullptr;
  if (s->group != Session::kNoGroup) {
    member = &groups()->health(s->group, s->member);
    member->begin();
    if (!member->up()) {
      member->cancel();
      member = nullptr;
    }
  }
  const bool hung = s->group != Session::kNoGroup && member == nullptr;
  for (auto& extra : s->extra) {
    if (extra->backend == CK_INVALID_HANDLE) continue;
    pool.give(s->slot, s->rw, extra->backend,
              hung ? SessionPool::Fate::abandon : reset_backend_session(pool.port(), *extra));
    extra->clear();
  }
  if (s->anchor.backend == CK_INVALID_HANDLE) {
    pool.leave(s->slot, s->rw);  // [pool] bind = state: it held none
  } else {
    // A session opened with a Notify callback carries the application's
    // callback: never reused.
    SessionPool::Fate fate = SessionPool::Fate::abandon;
    if (!hung) {
      fate = s->notify.load(std::memory_order_relaxed) != nullptr && !s->anchor.discard
                 ? SessionPool::Fate::closed(CloseReason::notify_callback)
                 : reset_backend_session(pool.port(), s->anchor);
    }
    pool.close(s->slot, s->rw, s->anchor.backend, fate);
  }
  // Answered (their codes are the reset's own business: it closes a session
  // it cannot prove clean).
  if (member != nullptr) member->end_ok();
  if (s->group != Session::kNoGroup) groups()->release_session(s->group, s->member);
  const std::uint32_t group = s->group;
  sessions_.close(std::move(lease));
  // The group's last session logs every member out (group_login.hpp).
  if (group != Session::kNoGroup && group_login_) group_login_->closed(group);
  return CKR_OK;
}

Runtime::WaiterRef::WaiterRef(Runtime& rt) noexcept : rt_(rt) {
  rt_.waiters_.fetch_add(1, std::memory_order_seq_cst);
}

Runtime::WaiterRef::~WaiterRef() {
  rt_.waiters_.fetch_sub(1, std::memory_order_seq_cst);
  wake_all(rt_.waiters_);
}

SessionPool& Runtime::pool_of(const BackendPort& port) noexcept {
  for (auto& pool : pools_)
    if (&pool->port() == &port) return *pool;
  return pool();  // not reached: every port has its pool
}

void Runtime::interrupt_waiters() noexcept {
  for (auto& pool : pools_) pool->interrupt_waiters();
}

std::vector<const BackendPort*> Runtime::ports() const {
  std::vector<const BackendPort*> all{&port_};
  for (const auto& p : extra_ports_) all.push_back(p.get());
  return all;
}

CK_RV Runtime::wait_for_slot_event(CK_FLAGS flags, CK_SLOT_ID_PTR slot) noexcept {
  if (groups_) return groups_->refuse_slot_events();
  auto wait = [this, slot](CK_FLAGS f) {
    return port_.call<fn::C_WaitForSlotEvent>(f, slot, nullptr);
  };
  if (!port_.serialized()) {
    // Block in the backend; C_Finalize wakes us by finalizing it.
    if (stopping_.load(std::memory_order_seq_cst) != 0) return CKR_CRYPTOKI_NOT_INITIALIZED;
    CK_RV rv = wait(flags);
    if (stopping_.load(std::memory_order_seq_cst) != 0) return CKR_CRYPTOKI_NOT_INITIALIZED;
    if (rv != CKR_FUNCTION_NOT_SUPPORTED) return rv;
  }
  // Not thread-safe (blocking would hold the backend lock for ever) or no
  // blocking support: poll without blocking, waking early for C_Finalize.
  for (;;) {
    CK_RV rv;
    {
      // A poll is a backend call like any other: fork() waits for it.
      GateAccess::Background call(gate_);
      if (call.epoch() != pool().epoch()) return CKR_CRYPTOKI_NOT_INITIALIZED;
      MutexGuard poll(poll_lock_);
      if (stopping_.load(std::memory_order_seq_cst) != 0) return CKR_CRYPTOKI_NOT_INITIALIZED;
      rv = wait(flags | CKF_DONT_BLOCK);
    }
    if (rv != CKR_NO_EVENT) return rv;
    timed_wait(stopping_, 0, kSlotEventPoll);
  }
}

bool Runtime::shutdown() noexcept {
  maintenance_.clear();
  member_watch_.clear();  // no pool work may race the backend's finalization
  observer_->finalize();  // the summary while sessions and pool still show their figures
  // Every kept PIN zeroed first; the backends' C_Finalize ends the logins
  // (no member's logout on a borrowed session while the pools are closing).
  if (group_login_) group_login_->finalize();
  if (groups_) group_objects_finalize(*this);  // missed changes' templates zeroed
  sessions_.for_each_live([this](SessionLease lease) { (void)close_session(std::move(lease)); });
  for (auto& pool : pools_) {
    if (!groups_) {
      pool->close_all();
      continue;
    }
    // The idle sessions of a member down or hung are not closed (C_Finalize
    // would hang with it); its backend's C_Finalize, below, ends them.
    pool->close_all([&](CK_SLOT_ID slot) { return !token_hung(pool->port(), slot); });
  }
  {
    MutexGuard poll(poll_lock_);  // a poll in progress finishes first
    stopping_.store(1, std::memory_order_seq_cst);
  }
  wake_all(stopping_);
  for (auto& extra : extra_ports_) {
    if (CK_RV rv = extra->finalize(); rv != CKR_OK) {
      log_->warn("backend '{}' C_Finalize returned {}", extra->backend()->path(), rv_name(rv));
    }
  }
  if (CK_RV rv = port_.finalize(); rv != CKR_OK) {
    log_->warn("backend C_Finalize returned {}", rv_name(rv));
  }
  auto deadline = std::chrono::steady_clock::now() + kWaiterGrace;
  for (;;) {
    std::uint32_t n = waiters_.load(std::memory_order_seq_cst);
    if (n == 0) return true;
    auto left = deadline - std::chrono::steady_clock::now();
    if (left <= decltype(left)::zero()) break;
    timed_wait(waiters_, n, std::min<std::chrono::nanoseconds>(left, 10ms));
  }
  log_->error(
      "{} C_WaitForSlotEvent call(s) still inside the backend after C_Finalize; "
      "keeping the backend loaded",
      waiters_.load());
  port_.backend()->abandon();
  return false;
}

std::vector<std::optional<BackendLocking>> Runtime::inherited_locking() const {
  std::vector<std::optional<BackendLocking>> out;
  for (const BackendPort* port : ports()) {
    const Backend& b = *port->backend();
    out.push_back(b.initialized_by_us() ? std::optional(b.locking()) : std::nullopt);
  }
  return out;
}

void Runtime::abandon() noexcept {
  for (auto& extra : extra_ports_) extra->backend()->abandon();
  port_.backend()->abandon();
}

}  // namespace p11mux
