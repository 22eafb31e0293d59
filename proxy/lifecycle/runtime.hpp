// Everything that exists between C_Initialize and C_Finalize: the loaded
// backend, the virtual sessions, the locks and the logger.
#pragma once

#include "config/config.hpp"
#include "group/group_objects.hpp"
#include "group/group_runtime.hpp"
#include "lifecycle/gate_access.hpp"
#include "lifecycle/init_args.hpp"
#include "observe/observer.hpp"
#include "policy/policy.hpp"
#include "port/backend_port.hpp"
#include "sessions/pool_maintenance.hpp"
#include "sessions/session_pool.hpp"
#include "sessions/session_table.hpp"
#include "sync/lock.hpp"
#include "sync/periodic_task.hpp"

#include <spdlog/logger.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace p11mux {

class GroupLogin;
class MemberPoolCalls;

class Runtime {
 public:
  // Loads and initializes the backend. Throws CkrError (or spdlog_ex for a log
  // file that cannot be opened) with a message that names the problem.
  // `epoch` tells this initialization from earlier ones (threads' pool caches).
  // `inherited`: in a forked child, the locking p11mux initialized each
  // backend with in the parent (BackendOptions::inherited), in ports()'
  // order (the parent's inherited_locking()); empty, or nullopt for one,
  // outside a child. `gate`: the module's call gate, for the runtime's and
  // the pool's own backend calls.
  Runtime(const Config& config, const InitArgs& init, const CK_FUNCTION_LIST* self,
          std::uint64_t epoch, GateAccess& gate,
          std::span<const std::optional<BackendLocking>> inherited = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;  // owns the backend and every session
  Runtime& operator=(const Runtime&) = delete;

  // Every call into the backend goes through its port (backend_port.hpp).
  const BackendPort& port() const noexcept { return port_; }
  // Which functions the backend really has, its interfaces, its locking.
  const Backend& backend() const noexcept { return *port_.backend(); }
  // A group configuration ([backend.NAME], [group.NAME]; docs/groups.md): its
  // groups, which answer the slot functions (group/group_calls.hpp); NULL for
  // the single backend. port() is then the first [backend.NAME]'s.
  const GroupRuntime* groups() const noexcept { return groups_.get(); }
  // Group `group`'s object handles (group/group_objects.hpp); groups() only.
  GroupObjects& group_objects(std::size_t group) noexcept { return *group_objects_[group]; }
  SessionTable& sessions() noexcept { return sessions_; }
  // The groups' logins (group/group_login.hpp); NULL for the single backend.
  GroupLogin* group_login() noexcept { return group_login_.get(); }
  // The pool of port()'s backend sessions. A session's calls take its own
  // pool (Session::pool): there is one per port (pool_of).
  SessionPool& pool() noexcept { return *pools_.front(); }
  // The pool of `port`'s backend sessions: one of ports().
  SessionPool& pool_of(const BackendPort& port) noexcept;
  spdlog::logger& log() noexcept { return *log_; }
  bool tracing() const noexcept { return tracing_; }
  // Tracing, metrics or a policy: calls take Entry<F>'s slow path
  // (entry_points.cpp); with all three off, the one branch they cost. A
  // group's session takes its own branch on the hot path (forward.hpp).
  bool slow_path() const noexcept { return slow_path_; }
  Observer& observer() noexcept { return *observer_; }
  // The [policy] rules; NULL when the configuration sets none.
  const Policy* policy() const noexcept { return policy_.get(); }
  const Config& config() const noexcept { return config_; }
  bool may_create_threads() const noexcept { return may_create_threads_; }
  // session_mode = multiplex: one backend session per calling thread.
  bool multiplexed() const noexcept { return multiplexed_; }
  // [pool] bind = state (or auto in multiplex mode): a virtual session holds
  // a backend session only while it has state to keep (docs/design.md,
  // "Binding on state").
  bool binds_on_state() const noexcept { return binds_on_state_; }

  // C_WaitForSlotEvent without CKF_DONT_BLOCK. The caller has left the call
  // gate (so that C_Finalize is not held up) and holds a WaiterRef.
  CK_RV wait_for_slot_event(CK_FLAGS flags, CK_SLOT_ID_PTR slot) noexcept;

  // Keeps the runtime alive for a blocked C_WaitForSlotEvent.
  class WaiterRef {
   public:
    explicit WaiterRef(Runtime& rt) noexcept;
    ~WaiterRef();
    WaiterRef(const WaiterRef&) = delete;
    WaiterRef& operator=(const WaiterRef&) = delete;
    Runtime& runtime() const noexcept { return rt_; }

   private:
    Runtime& rt_;
  };

  // C_Finalize, once the call gate is closed: every pool's waiters return
  // (SessionPool::interrupt_waiters).
  void interrupt_waiters() noexcept;
  // C_Finalize, after the call gate has drained: closes every session, wakes
  // the slot-event waiters, finalizes the backend. Returns false when a waiter
  // is still stuck inside the backend: the runtime must then be leaked.
  bool shutdown() noexcept;
  // After fork(): the parent's backend and sessions are not ours to touch.
  void abandon() noexcept;
  // For a forked child's runtime (`inherited` above): each backend's
  // locking, ports()' order, where p11mux initialized it (nullopt where
  // another user of the process had).
  std::vector<std::optional<BackendLocking>> inherited_locking() const;

  // Resets a leased session's backend session and gives it back to the pool
  // (or closes it when it cannot be made clean), then frees the virtual one.
  CK_RV close_session(SessionLease lease) noexcept;

 private:
  const Config config_;
  GateAccess& gate_;
  const LockSource locks_;
  const bool may_create_threads_;
  const bool multiplexed_;
  const bool binds_on_state_;
  std::shared_ptr<spdlog::logger> log_;
  bool tracing_;
  // Before the sessions and the pool, which it reports on; its thread is
  // stopped first thing in shutdown() and ~Runtime().
  std::unique_ptr<Observer> observer_;
  // Before the backend is loaded: a bad rule fails C_Initialize first.
  std::unique_ptr<const Policy> policy_;
  bool slow_path_;
  BackendPort port_;
  // The other [backend.NAME]s of a group configuration, in file order.
  std::vector<std::unique_ptr<BackendPort>> extra_ports_;
  std::unique_ptr<const GroupRuntime> groups_;
  std::vector<GroupObjectsPtr> group_objects_;  // one per group
  SessionTable sessions_;
  // One per port, ports()' order: a backend's sessions are its own.
  std::vector<std::unique_ptr<SessionPool>> pools_;
  // After the pools, whose sessions it borrows; gone before them.
  std::unique_ptr<GroupLogin> group_login_;
  // A group member's pool maintenance calls, one per token (runtime.cpp,
  // start_member_maintenance); before the maintenance that uses them.
  std::vector<std::unique_ptr<MemberPoolCalls>> member_pool_calls_;
  // One per pool (a group configuration: one per member's token), only with
  // a period configured and threads allowed.
  std::vector<std::unique_ptr<PoolMaintenance>> maintenance_;
  // The groups' member watch (GroupRuntime::watch), then each member's
  // recovery (GroupRuntime::recover), with threads allowed.
  std::vector<std::unique_ptr<PeriodicTask>> member_watch_;
  // Held by a polling C_WaitForSlotEvent across "not stopping? then ask the
  // backend", and by shutdown() to set stopping_: no poll after finalization.
  // stopping_ is an atomic (also read without it); the lock orders a poll
  // against shutdown(), which GUARDED_BY cannot say. Taken before the backend
  // lock (lock.hpp).
  std::atomic<std::uint32_t> stopping_{0};
  Mutex poll_lock_;
  std::atomic<std::uint32_t> waiters_{0};

  // The groups' watch, and a recovery thread per member (member_watch_).
  void start_member_watch();
  // The pool maintenance of a group configuration: a thread per member's token.
  void start_member_maintenance(std::chrono::seconds idle, std::chrono::seconds keepalive);
  // Whether `port`'s `slot` is a group member's token that is not up (down,
  // hung, or being probed) in any of its groups: not to be called.
  bool token_hung(const BackendPort& port, CK_SLOT_ID slot) const noexcept;
  // Every port, config.backends' order in a group configuration.
  std::vector<const BackendPort*> ports() const;
  // Ends what a virtual session left on a backend session; says whether it
  // can be pooled again.
  SessionPool::Fate reset_backend_session(const BackendPort& port, Binding& binding) noexcept;
};

}  // namespace p11mux
