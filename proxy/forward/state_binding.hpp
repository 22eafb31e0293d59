// [pool] bind = state in serialize mode: the session's one binding (its
// anchor) is taken from the pool by the first call that needs it and given
// back by the call that leaves nothing on it (docs/design.md, "Binding on
// state"). The session's lock is held across the call anyway, so both run
// under it; multiplex mode does the same with its bindings (multiplex.hpp).
#pragma once

#include "lifecycle/runtime.hpp"

namespace p11mux {

// A backend session for an idle session's call: waits up to pool.wait_ms at
// the limit. The session holds no backend session meanwhile, so waiting
// cannot hold up one that others wait for.
[[gnu::cold, gnu::noinline]] inline CK_RV bind_anchor(Session& s) noexcept REQUIRES(s.lock) {
  CK_SESSION_HANDLE fresh = CK_INVALID_HANDLE;
  CK_RV rv = s.pool->borrow(s.slot, s.rw, fresh);
  if (rv == CKR_OK) s.anchor.backend = fresh;
  return rv;
}

// After the call: a binding with no state goes back to the pool (or is
// closed, if a call marked it unclean or dead). A session opened with a
// Notify callback keeps its own backend session (it carries the callback).
inline void unbind_if_idle(Session& s) noexcept REQUIRES(s.lock) {
  Binding& b = s.anchor;
  if (b.holds_state() || s.notify.load(std::memory_order_relaxed) != nullptr) return;
  s.pool->give(s.slot, s.rw, b.backend, SessionPool::unreset_fate(b.discard, b.dead, b.why));
  b.clear();
}

}  // namespace p11mux
