// C_GetTokenInfo (dispatch `handled`): the backend's answer, with the session
// figures told as the application sees them through p11mux
// (docs/pkcs11-facts.md, "Session limits").
#include "handled/handled.hpp"
#include "sessions/session_pool.hpp"

namespace p11mux {

CK_RV get_token_info(Runtime& rt, CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) noexcept {
  CK_RV rv = rt.port().call<fn::C_GetTokenInfo>(slot, info);
  if (rv != CKR_OK) return rv;
  // The backend counts p11mux's sessions, the pooled ones and a multiplexed
  // session's per-thread ones included; the application sees its own.
  const SessionPool::AppSessions app = rt.pool().app_sessions(slot);
  info->ulSessionCount = app.all;
  info->ulRwSessionCount = app.read_write;
  if (rt.binds_on_state()) {
    // Virtual sessions are not the backend's: pool.max_virtual_sessions is
    // the application's limit, of either kind.
    info->ulMaxSessionCount = rt.config().pool.max_virtual_sessions;
    info->ulMaxRwSessionCount = rt.config().pool.max_virtual_sessions;
  } else if (const auto& most = rt.config().pool.max_sessions) {
    // No more virtual sessions open than pool.max_sessions: applications
    // that size their own session pool from the token (Java's SunPKCS11)
    // stay within it.
    info->ulMaxSessionCount = SessionPool::session_limit(info->ulMaxSessionCount, *most);
    info->ulMaxRwSessionCount = SessionPool::session_limit(info->ulMaxRwSessionCount, *most);
  }
  return CKR_OK;
}

}  // namespace p11mux
