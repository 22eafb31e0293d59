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
  // session's per-thread ones included, not the application's.
  info->ulSessionCount = CK_UNAVAILABLE_INFORMATION;
  info->ulRwSessionCount = CK_UNAVAILABLE_INFORMATION;
  // No more virtual sessions open than pool.max_sessions: applications that
  // size their own session pool from the token (Java's SunPKCS11) stay within it.
  if (const auto& most = rt.config().pool.max_sessions) {
    info->ulMaxSessionCount = SessionPool::session_limit(info->ulMaxSessionCount, *most);
    info->ulMaxRwSessionCount = SessionPool::session_limit(info->ulMaxRwSessionCount, *most);
  }
  return CKR_OK;
}

}  // namespace p11mux
