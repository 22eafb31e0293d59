// C_GetTokenInfo (dispatch `handled`): the backend's answer, with the session
// figures told as the application sees them through p11mux
// (docs/pkcs11-facts.md, "Session limits").
#include "handled/handled.hpp"
#include "sync/lock.hpp"

namespace p11mux {
namespace {

// A session limit no larger than `most`: the backend's own when it is lower,
// `most` when the backend's is larger, unknown or infinite.
void cap(CK_ULONG& limit, unsigned long most) noexcept {
  if (limit == CK_UNAVAILABLE_INFORMATION || limit == CK_EFFECTIVELY_INFINITE || limit > most) {
    limit = most;
  }
}

}  // namespace

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
    cap(info->ulMaxSessionCount, *most);
    cap(info->ulMaxRwSessionCount, *most);
  }
  return CKR_OK;
}

}  // namespace p11mux
