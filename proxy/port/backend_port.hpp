// One loaded backend as the rest of p11mux calls it, and the only way any
// code calls a backend. It owns the Backend (loaded and initialized by
// backend-loader), a copy of its function table with every NULL entry
// answering CKR_FUNCTION_NOT_SUPPORTED (backend_table.hpp), and, when the
// backend is not thread-safe, the lock held around every call into it.
// A call is call<fn::C_X>(args...) (function_traits.hpp): the lock (if any),
// one load of the entry, the call; it inlines to what a hand-written call
// site did. The runtime owns its port and hands it to the session pool; the
// port is no singleton (one per backend module), so that one runtime could
// hold several.
#pragma once

#include "backend.hpp"
#include "port/backend_table.hpp"
#include "sync/lock.hpp"

#include <memory>
#include <utility>

namespace p11mux {

class BackendPort {
 public:
  // A loaded, initialized backend; serialized when it is not thread-safe.
  BackendPort(std::unique_ptr<Backend> backend, const LockSource& locks)
      : BackendPort(backend->functions(), backend->thread_safe(), locks) {
    backend_ = std::move(backend);
  }
  // A bare function table (tests: a fake backend); backend() is then NULL.
  BackendPort(const CK_FUNCTION_LIST_3_0& functions, bool thread_safe, const LockSource& locks)
      : functions_(without_null_entries(functions)),
        lock_(thread_safe ? nullptr : std::make_unique<Mutex>(locks)) {}
  // The lock keeps a pointer to `locks` (the application's callbacks, held by
  // the runtime): a temporary would leave it dangling.
  BackendPort(std::unique_ptr<Backend>, const LockSource&&) = delete;
  BackendPort(const CK_FUNCTION_LIST_3_0&, bool, const LockSource&&) = delete;
  BackendPort(const BackendPort&) = delete;  // owns the backend and its lock
  BackendPort& operator=(const BackendPort&) = delete;

  // Calls the backend's function F (fn::C_X) with `a`, under the
  // serialization lock when there is one. Never jumps through NULL.
  template <class F, class... A>
  [[gnu::always_inline]] CK_RV call(A... a) const noexcept {
    OptionalGuard serial(lock_.get());
    return (functions_.*F::member)(a...);
  }

  // The backend's C_Finalize, serialized like any call (Backend::finalize).
  CK_RV finalize() noexcept {
    if (!backend_) return CKR_OK;
    OptionalGuard serial(lock_.get());
    return backend_->finalize();
  }

  // The cryptoki version of the table (major 3: v3.0 argument rules).
  CK_VERSION version() const noexcept { return functions_.version; }
  // True when calls are serialized (the backend is not thread-safe).
  bool serialized() const noexcept { return lock_ != nullptr; }
  // The loaded backend: which functions it really has, its interfaces, its
  // locking. NULL for a port over a bare table.
  Backend* backend() const noexcept { return backend_.get(); }

 private:
  std::unique_ptr<Backend> backend_;
  CK_FUNCTION_LIST_3_0 functions_;  // copied: one indirection less per call
  std::unique_ptr<Mutex> lock_;     // NULL when the backend is thread-safe
};

}  // namespace p11mux
