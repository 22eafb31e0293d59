// The one p11mux instance in a process: the lifecycle state, the call gate
// and the runtime. This is the only mutable global object in the library.
#pragma once

#include "entry/interfaces.hpp"
#include "lifecycle/call_gate.hpp"
#include "lifecycle/gate_access.hpp"
#include "lifecycle/runtime.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace p11mux {

// The gate it hands down (GateAccess) is the only way below the entry points
// to its call gate.
class Module final : public GateAccess {
 public:
  constexpr Module() = default;
  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  CK_RV initialize(CK_VOID_PTR init_args) noexcept;
  CK_RV finalize(CK_VOID_PTR reserved) noexcept;

  // A call in flight: holds the gate open for C_Finalize to wait on.
  class Call {
   public:
    explicit Call(Module& m) noexcept : m_(m) {
      if (m_.gate_.enter(shard_)) rt_ = m_.runtime_.get();
    }
    ~Call() {
      if (rt_ != nullptr) m_.gate_.leave(shard_);
    }
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;
    // NULL when p11mux is not initialized: return CKR_CRYPTOKI_NOT_INITIALIZED.
    Runtime* runtime() const noexcept { return rt_; }

   private:
    Module& m_;
    Runtime* rt_ = nullptr;
    std::size_t shard_ = 0;
  };

  // A call about to sleep outside the backend (SessionPool::take at the
  // limit): fork() does not wait for it while it is parked. unpark() waits
  // while a fork holds the gate, so that no parked call enters the backend
  // across fork(). C_Finalize wakes parked waiters itself (they return
  // CKR_CRYPTOKI_NOT_INITIALIZED).
  void park() noexcept override { gate_.park(); }
  void unpark() noexcept override { gate_.unpark(); }

  // pthread_atfork handlers. Calls are kept out of the backend across fork()
  // (the child would inherit the backend's locks as they were held):
  // prepare holds new calls at the gate and waits, bounded, for the ones
  // inside, then flushes the log and holds it (logging.hpp); parent lets the
  // held ones in. The child handler takes no lock (it releases the log).
  void on_fork_prepare() noexcept;
  void on_fork_parent() noexcept;
  void on_fork_child() noexcept;

  // What the configured backend offers, probed without initializing it, for
  // C_GetInterfaceList/C_GetInterface before C_Initialize (interfaces.hpp).
  // Probed again after each C_Initialize or C_Finalize. NULL only when out of memory.
  std::shared_ptr<const ProbedBackend> probed_interfaces() noexcept;

 private:
  enum Phase : std::uint32_t { uninitialized, initializing, ready, finalizing };
  CK_RV start(const InitArgs& args) noexcept;
  std::uint64_t enter_background(std::size_t& shard) noexcept override;
  void leave_background(std::size_t shard) noexcept override { gate_.leave(shard); }
  void register_fork_handler() noexcept;

  std::atomic<std::uint32_t> phase_{uninitialized};
  std::atomic<bool> forked_{false};
  std::atomic<bool> fork_handler_registered_{false};
  // No lock guards the plain fields below: phase_ (a compare-and-swap) lets
  // one thread at a time initialize or finalize, and they are written only
  // then or in the fork handlers, as each says.
  // The forking thread's own entry, from prepare to parent (glibc runs one
  // fork's handlers at a time, under its atfork lock).
  bool fork_entered_ = false;
  std::size_t fork_shard_ = 0;
  std::uint64_t epochs_ = 0;  // runtimes created so far; written only while initializing
  // The highest session handle generation of the runtimes so far: the next
  // session table starts above it, so that a handle kept across C_Finalize
  // (or fork()) never names a session of a later initialization.
  std::uint64_t generation_floor_ = 0;
  // A forked child's inheritance from the parent's initialization, kept until
  // the child's C_Initialize succeeds (a later, non-forked re-initialization
  // reads the environment again, as in any process). The configuration the
  // parent was initialized with, in the parent's runtime, which the child
  // leaks: the child's environment may have been cleared (nginx does so for
  // its workers). And the locking p11mux had initialized each backend with
  // (Runtime::inherited_locking: every [backend.NAME] of a group
  // configuration), when it had: the child's copy of a backend answers
  // CKR_CRYPTOKI_ALREADY_INITIALIZED, and is still p11mux's own.
  const Config* inherited_config_ = nullptr;
  std::vector<std::optional<BackendLocking>> inherited_locking_;
  CallGate gate_;
  // Written only while the gate is closed and drained; read inside a Call.
  std::unique_ptr<Runtime> runtime_;
  InterfaceProbe interface_probe_;
};

extern constinit Module the_module;

}  // namespace p11mux
