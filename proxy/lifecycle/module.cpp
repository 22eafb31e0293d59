#include "lifecycle/module.hpp"

#include "entry/entry_points.hpp"
#include "observe/logging.hpp"

#include <p11mux/ckr_error.hpp>

#include <pthread.h>

#include <chrono>
#include <new>
#include <utility>

namespace p11mux {

constinit Module the_module;

namespace {
// How long fork() waits for calls inside the backend. A fork from inside a
// p11mux call, or a call stuck in the backend, costs this much, never a deadlock.
constexpr auto kForkHoldLimit = std::chrono::seconds(3);
}  // namespace

Module::~Module() {
  // At process exit the backend may already be torn down by its own static
  // destructors; finalizing it is the application's job (C_Finalize).
  (void)runtime_.release();
}

CK_RV Module::initialize(CK_VOID_PTR init_args) noexcept {
  InitArgs args;
  if (CK_RV rv = parse_init_args(init_args, args); rv != CKR_OK) return rv;
  register_fork_handler();

  // Many threads may race the first C_Initialize: one wins and initializes,
  // the others wait for its outcome so that none sees a half-built state.
  for (;;) {
    std::uint32_t phase = phase_.load(std::memory_order_acquire);
    if (phase == ready) return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    if (phase == uninitialized) {
      if (phase_.compare_exchange_weak(phase, initializing, std::memory_order_acq_rel)) break;
      continue;
    }
    phase_.wait(phase, std::memory_order_acquire);
  }
  CK_RV rv = start(args);
  interface_probe_.invalidate();  // the configuration may have changed since the probe
  phase_.store(rv == CKR_OK ? ready : uninitialized, std::memory_order_release);
  phase_.notify_all();
  return rv;
}

CK_RV Module::start(const InitArgs& args) noexcept {
  if (forked_.exchange(false)) {
    // The runtime belongs to the parent process: leak it untouched (but the
    // parent's handles, which the child has copies of, stay stale here).
    if (runtime_) {
      generation_floor_ = runtime_->sessions().highest_generation();
      inherited_config_ = &runtime_->config();
      // Every backend's, not only the first's (a group configuration has one
      // per [backend.NAME]). Memory is the only failure: those start afresh.
      try {
        inherited_locking_ = runtime_->inherited_locking();
      } catch (const std::bad_alloc&) {
        inherited_locking_.clear();
      }
      runtime_->abandon();
    }
    (void)runtime_.release();
  }
  try {
    Config config =
        inherited_config_ != nullptr ? *inherited_config_ : load_config(process_environment());
    runtime_ = std::make_unique<Runtime>(config, args, entry_points::function_list(), ++epochs_,
                                         *this, inherited_locking_);
    runtime_->sessions().start_above(generation_floor_);  // before the gate opens
  } catch (const CkrError& e) {
    log_startup_error(e.what());
    return e.rv();
  } catch (const ConfigError& e) {
    log_startup_error(e.what());
    return CKR_GENERAL_ERROR;
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  } catch (const std::exception& e) {
    log_startup_error(e.what());
    return CKR_GENERAL_ERROR;
  }
  inherited_config_ = nullptr;
  inherited_locking_.clear();
  gate_.open();
  return CKR_OK;
}

// The gate is open only while runtime_ (of epoch epochs_) exists.
std::uint64_t Module::enter_background(std::size_t& shard) noexcept {
  if (!gate_.enter(shard)) return 0;
  return epochs_;
}

CK_RV Module::finalize(CK_VOID_PTR reserved) noexcept {
  if (reserved != nullptr) return CKR_ARGUMENTS_BAD;
  std::uint32_t phase = ready;
  if (!phase_.compare_exchange_strong(phase, finalizing, std::memory_order_acq_rel)) {
    return CKR_CRYPTOKI_NOT_INITIALIZED;
  }
  // New calls now get CKR_CRYPTOKI_NOT_INITIALIZED; the ones inside finish
  // before the backend is finalized under them. Calls waiting for a pooled
  // session are woken to return at once rather than at their deadline.
  gate_.close();
  runtime_->interrupt_waiters();
  gate_.drain();
  generation_floor_ = runtime_->sessions().highest_generation();
  if (runtime_->shutdown()) {
    runtime_.reset();
  } else {
    (void)runtime_.release();  // a thread is stuck in the backend: keep it all
  }
  interface_probe_.invalidate();  // a probe made while finalizing must not outlive it
  phase_.store(uninitialized, std::memory_order_release);
  phase_.notify_all();
  return CKR_OK;
}

void Module::on_fork_prepare() noexcept {
  // Entered like a call: a C_Finalize racing the fork waits for on_fork_parent().
  fork_entered_ = gate_.enter(fork_shard_);
  if (!fork_entered_) return;  // not initialized: no call can be inside the backend
  if (gate_.hold(kForkHoldLimit) == CallGate::Hold::timed_out) {
    runtime_->log().warn(
        "fork(): calls still inside the backend after {} s; forking anyway "
        "(the child may find the backend's locks held)",
        kForkHoldLimit.count());
  }
  hold_log_for_fork(runtime_->log());
}

void Module::on_fork_parent() noexcept {
  if (!std::exchange(fork_entered_, false)) return;
  release_log_after_fork(runtime_->log());
  gate_.resume();
  gate_.leave(fork_shard_);
}

void Module::on_fork_child() noexcept {
  // The child must call C_Initialize before anything works again, and must
  // never touch the parent's backend sessions (docs/pkcs11-facts.md, "fork()").
  if (std::exchange(fork_entered_, false)) release_log_after_fork(runtime_->log());
  note_thread_id_after_fork();
  gate_.reset_after_fork();
  Observer::after_fork();  // closes the child's copy of the parent's stats endpoint
  interface_probe_.reset_after_fork();
  forked_.store(true, std::memory_order_relaxed);
  phase_.store(uninitialized, std::memory_order_relaxed);
}

std::shared_ptr<const ProbedBackend> Module::probed_interfaces() noexcept {
  return interface_probe_.get(entry_points::function_list());
}

void Module::register_fork_handler() noexcept {
  if (fork_handler_registered_.exchange(true)) return;
  pthread_atfork([] { the_module.on_fork_prepare(); }, [] { the_module.on_fork_parent(); },
                 [] { the_module.on_fork_child(); });
}

}  // namespace p11mux
