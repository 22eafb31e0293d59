// The backend: the vendor PKCS#11 module p11mux forwards to, loaded from a
// path and initialized with the best locking it accepts.
#pragma once

#include "backend_interfaces.hpp"
#include "shared_library.hpp"

#include <p11mux/pkcs11.h>

#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace p11mux {

// How the backend's C_Initialize was called; `automatic` tries them in order.
enum class BackendLocking { automatic, os, callbacks, none };
std::string_view to_string(BackendLocking locking) noexcept;

struct BackendOptions {
  std::string path;
  BackendLocking locking = BackendLocking::automatic;
  // Passed as pReserved to the backend's C_Initialize (NSS softoken's init string).
  std::optional<std::string> init_reserved;
  // In a forked child: the locking p11mux initialized this backend with in
  // the parent, while it was still initialized at fork().
  std::optional<BackendLocking> inherited;
  // p11mux's own function list, to refuse loading p11mux as its own backend
  // (which would re-enter its own C_Initialize).
  const CK_FUNCTION_LIST* self = nullptr;
  // Unit tests: a fake module's symbols, used instead of loading `path`
  // (which then only names it in messages).
  SymbolLookup module = nullptr;
};

class Backend {
 public:
  // Loads and initializes the module. Throws CkrError with a message that names
  // the path and, when the backend refused, its CKR code.
  explicit Backend(const BackendOptions& options);
  // Finalizes the backend (if p11mux initialized it) and unloads it.
  ~Backend();
  Backend(const Backend&) = delete;  // owns a loaded, initialized library
  Backend& operator=(const Backend&) = delete;

  // Every function, v3.0 ones included; an entry the backend lacks is NULL.
  const CK_FUNCTION_LIST_3_0& functions() const noexcept { return functions_; }
  // False when the backend only accepted C_Initialize without locking: then
  // every call into it must be serialized by p11mux.
  bool thread_safe() const noexcept { return thread_safe_; }
  BackendLocking locking() const noexcept { return locking_; }
  // The version of the interface p11mux negotiated (2.x unless has_v3()).
  CK_VERSION version() const noexcept { return functions_.version; }
  // True when the backend offers the v3.0 "PKCS 11" interface.
  bool has_v3() const noexcept { return interfaces_.v3 != nullptr; }
  // Everything it offers, vendor interfaces included (found before C_Initialize).
  const BackendInterfaces& interfaces() const noexcept { return interfaces_; }
  // True when someone else in the process had initialized it already, so
  // p11mux must not finalize it.
  bool shared() const noexcept { return !owns_initialization_; }
  // True when this is a forked child's copy of the backend p11mux had
  // initialized in the parent (BackendOptions::inherited).
  bool inherited() const noexcept { return inherited_; }
  // Initialized by p11mux and not finalized yet: a child forked now inherits it.
  bool initialized_by_us() const noexcept { return owns_initialization_ && !finalized_; }
  const std::string& path() const noexcept { return path_; }

  // Calls the backend's C_Finalize now (idempotent); also wakes its blocked
  // C_WaitForSlotEvent callers, as the spec says.
  CK_RV finalize() noexcept;
  // After fork() or with threads stuck inside it: never call into the backend
  // again and never unload it.
  void abandon() noexcept;

 private:
  void resolve_functions();
  void initialize(const BackendOptions& options);

  std::string path_;
  SharedLibrary library_;
  BackendInterfaces interfaces_;
  CK_FUNCTION_LIST_3_0 functions_{};
  BackendLocking locking_ = BackendLocking::none;
  bool thread_safe_ = false;
  bool owns_initialization_ = false;
  bool inherited_ = false;
  bool finalized_ = false;
};

}  // namespace p11mux
