// C_OpenSession, C_CloseSession and C_CloseAllSessions: the virtual session
// lifecycle (dispatch `handled`).
#include "handled.hpp"

#include <p11mux/ckr_error.hpp>

#include <new>

namespace p11mux {
namespace {

// The backend hands its Notify our trampoline; the application gets its own
// callback with the virtual handle (pkcs11-notes, "Sessions").
CK_RV notify_trampoline(CK_SESSION_HANDLE, CK_NOTIFICATION event, CK_VOID_PTR context) {
  auto* session = static_cast<Session*>(context);
  return session->notify(session->opening_handle, event, session->application);
}

}  // namespace

CK_RV open_session(Runtime& rt, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                   CK_NOTIFY notify, CK_SESSION_HANDLE_PTR session) noexcept {
  SessionLease lease;
  try {
    lease = rt.sessions().reserve();
  } catch (const CkrError& e) {
    return e.rv();
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
  lease->slot = slot;
  lease->notify = notify;
  lease->application = application;
  CK_RV rv;
  {
    OptionalGuard serial(rt.backend_lock());
    rv = rt.functions().C_OpenSession(slot, flags, notify ? lease.operator->() : nullptr,
                                      notify ? &notify_trampoline : nullptr, &lease->backend);
  }
  if (rv != CKR_OK) {
    rt.sessions().discard(std::move(lease));
    return rv;
  }
  *session = lease->opening_handle;
  rt.sessions().publish(*lease);
  return CKR_OK;
}

CK_RV close_session(Runtime& rt, CK_SESSION_HANDLE session) noexcept {
  SessionLease lease = rt.sessions().lease(session);
  if (!lease) return CKR_SESSION_HANDLE_INVALID;
  return rt.close_session(std::move(lease));
}

CK_RV close_all_sessions(Runtime& rt, CK_SLOT_ID slot) noexcept {
  rt.sessions().for_each_live([&](SessionLease lease) {
    if (lease->slot == slot) (void)rt.close_session(std::move(lease));
  });
  // Lets the backend validate the slot ID (CKR_SLOT_ID_INVALID) and close
  // anything p11mux did not open itself.
  OptionalGuard serial(rt.backend_lock());
  return rt.functions().C_CloseAllSessions(slot);
}

}  // namespace p11mux
