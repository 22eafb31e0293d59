// Compiled, not run, by the thread-safety tests (CMakeLists.txt here): a
// virtual session's fields are checked although its lock is held through a
// SessionLease, which the analysis cannot follow (sessions/session_table.hpp).
// With -Wthread-safety -Werror this must compile as it is, and must fail with
// P11MUX_SESSION_UNLOCKED defined: a Session field read through a lease that
// does not say it holds the lock (no HeldLock), as a new call path would.
#include "sessions/session_table.hpp"

namespace p11mux {

// A function given a locked session says so; its callers must hold the lock.
CK_SLOT_ID slot_of(Session& s) REQUIRES(s.lock) { return s.slot; }

CK_SLOT_ID lease_slot(SessionTable& table, CK_SESSION_HANDLE handle) {
  SessionLease lease = table.lease(handle);
  if (!lease) return 0;
  HeldLock leased(lease->lock);
  lease->anchor.ops = 0;
  return slot_of(*lease) + lease->slot;
}

// Released and retaken inside the lease's scope (a wait), as
// Runtime::close_session does.
bool rw_after_wait(SessionTable& table, CK_SESSION_HANDLE handle) {
  SessionLease lease = table.lease(handle);
  if (!lease) return false;
  Session& s = *lease;
  HeldLock leased(s.lock);
  s.lock.unlock();
  s.lock.lock();
  return s.rw;
}

#ifdef P11MUX_SESSION_UNLOCKED
CK_SLOT_ID unlocked_slot(SessionTable& table, CK_SESSION_HANDLE handle) {
  SessionLease lease = table.lease(handle);
  return lease ? lease->slot : 0;
}
#endif

}  // namespace p11mux
