// C_GetInterfaceList and C_GetInterface (dispatch `entry`): which interfaces
// p11mux offers, and how it learns what the backend has before C_Initialize.
//
// On offer, in this order (the first is the default, the highest version):
//   "PKCS 11" 3.0   p11mux's CK_FUNCTION_LIST_3_0, only when the backend has 3.0
//   "PKCS 11" 2.40  p11mux's CK_FUNCTION_LIST, always
//   vendor ones     the backend's own CK_INTERFACE objects, unchanged, only with
//                   [backend] vendor_interfaces = pass (their calls bypass p11mux)
// p11mux's interfaces have flags 0: it never claims CKF_INTERFACE_FORK_SAFE
// (a forked child must call C_Initialize again), so a request for that flag
// matches none of them.
//
// Before C_Initialize the answer comes from a probe: the configuration is
// loaded and the backend dlopen'ed (not initialized) and asked. A broken
// configuration or a missing backend offers 2.40 only; C_Initialize then
// reports the error. The probe is kept until the next C_Initialize or
// C_Finalize, since the configuration may change between cycles. While p11mux
// is initialized the running backend answers instead.
#pragma once

#include "backend_interfaces.hpp"
#include "config/config.hpp"

#include <p11mux/pkcs11.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace p11mux {

// What a probe found: the backend still loaded (NULL when the configuration
// or the backend could not be loaded), and the vendor_interfaces setting.
struct ProbedBackend {
  std::unique_ptr<BackendProbe> backend;
  VendorInterfaces vendor = VendorInterfaces::hide;
};

// The cached probe, part of the one Module. Readers share the result; a
// stale one is replaced by the next reader and freed (the library unloaded)
// when its last reader is done, after the new probe has loaded the library.
class InterfaceProbe {
 public:
  constexpr InterfaceProbe() = default;
  InterfaceProbe(const InterfaceProbe&) = delete;  // owns the probe result
  InterfaceProbe& operator=(const InterfaceProbe&) = delete;

  // The current result, probing now when there is none or it is stale.
  // NULL only when out of memory (then 2.40 only is offered).
  std::shared_ptr<const ProbedBackend> get(const CK_FUNCTION_LIST* self) noexcept;
  // The next get() probes again.
  void invalidate() noexcept { generation_.fetch_add(1, std::memory_order_acq_rel); }
  // pthread_atfork child handler: no locks. A parent thread that held the
  // spin lock does not exist in the child.
  void reset_after_fork() noexcept { busy_.store(false, std::memory_order_relaxed); }

 private:
  // Guards current_ and current_generation_ for a pointer copy or swap only:
  // probing happens outside it. A spin lock because the child of a fork()
  // must be able to reset it.
  class SpinGuard;
  std::atomic<bool> busy_{false};
  std::atomic<std::uint64_t> generation_{0};
  std::uint64_t current_generation_ = 0;
  std::shared_ptr<const ProbedBackend> current_;
};

// The interfaces on offer given what the backend has (NULL: nothing known, a
// 2.x backend), in C_GetInterfaceList order.
std::vector<const CK_INTERFACE*> offered_interfaces(const BackendInterfaces* backend,
                                                    VendorInterfaces vendor);

// The first offered interface that matches (C_GetInterface's rules): the name
// if given (a NULL name means the standard "PKCS 11" interfaces only, never a
// vendor one), the version if given, and every requested flag. NULL if none.
const CK_INTERFACE* select_interface(const std::vector<const CK_INTERFACE*>& offered,
                                     const CK_UTF8CHAR* name, const CK_VERSION* version,
                                     CK_FLAGS flags) noexcept;

}  // namespace p11mux
