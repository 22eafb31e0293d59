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

// With a Notify callback the backend session is the application's alone:
// it is opened for it (with p11mux's trampoline) and closed with it, not
// pooled, because a pooled session cannot change its callback.
CK_RV open_session(Runtime& rt, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                   CK_NOTIFY notify, CK_SESSION_HANDLE_PTR session) noexcept {
  // Checked here because a pooled session would hide the backend's refusal.
  if ((flags & CKF_SERIAL_SESSION) == 0) return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
  SessionLease lease;
  try {
    lease = rt.sessions().reserve();
  } catch (const CkrError& e) {
    return e.rv();
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
  lease->slot = slot;
  lease->rw = (flags & CKF_RW_SESSION) != 0;
  lease->notify = notify;
  lease->application = application;
  CK_RV rv;
  if (notify != nullptr) {
    {
      OptionalGuard serial(rt.backend_lock());
      rv = rt.functions().C_OpenSession(slot, flags, lease.operator->(), &notify_trampoline,
                                        &lease->anchor.backend);
    }
    // Outside the backend lock: on a slot's first use the pool takes it too.
    if (rv == CKR_OK) rt.pool().adopt(slot, lease->rw);
  } else {
    rv = rt.pool().open(slot, lease->rw, lease->anchor.backend);
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
  // Not the backend's C_CloseAllSessions: that would also close p11mux's
  // idle pooled sessions. Asking for the slot's info validates the slot ID
  // (unless the backend lacks C_GetSlotInfo: then the slot is not checked).
  CK_SLOT_INFO info{};
  {
    OptionalGuard serial(rt.backend_lock());
    CK_RV rv = rt.functions().C_GetSlotInfo(slot, &info);
    if (rv != CKR_OK && rv != CKR_FUNCTION_NOT_SUPPORTED) return rv;
  }
  rt.sessions().for_each_live([&](SessionLease lease) {
    if (lease->slot == slot) (void)rt.close_session(std::move(lease));
  });
  return CKR_OK;
}

}  // namespace p11mux
