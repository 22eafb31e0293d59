// Which PKCS#11 interfaces a backend module offers, found without initializing
// it: PKCS#11 3.0 lets C_GetFunctionList, C_GetInterfaceList and C_GetInterface
// be called before C_Initialize ("C_GetInterface" in the 3.0 base spec).
#pragma once

#include "shared_library.hpp"

#include <p11mux/pkcs11.h>

#include <string>
#include <vector>

namespace p11mux {

// The standard interface name; every other name is a vendor interface.
inline constexpr char kStandardInterfaceName[] = "PKCS 11";

struct BackendInterfaces {
  // The backend's "PKCS 11" 3.x function list, of which p11mux uses the 3.0
  // part; NULL for a 2.x module. Known to be a 3.x list because the backend
  // returned it for that interface version, not because of its version field.
  const CK_FUNCTION_LIST_3_0* v3 = nullptr;
  // Interfaces under other names, as the backend's C_GetInterface returned
  // them: pointers into the backend, valid while it stays loaded.
  std::vector<const CK_INTERFACE*> vendor;
};

// True for the "PKCS 11" interfaces.
bool is_standard_interface(const CK_INTERFACE& i) noexcept;
// An interface's version: the CK_VERSION every function list starts with (the
// spec's own example reads it so). pFunctionList must not be NULL.
CK_VERSION interface_version(const CK_INTERFACE& i) noexcept;

// Asks the loaded module (not initialized, or initialized: either is allowed).
// A module without C_GetInterface is a 2.x module. Throws only std::bad_alloc.
BackendInterfaces discover_interfaces(const SharedLibrary& library);

// True when the library's C_GetFunctionList returns `self` (p11mux's own
// list): p11mux configured as its own backend.
bool is_self(const SharedLibrary& library, const CK_FUNCTION_LIST* self) noexcept;

// A backend loaded only to see which interfaces it offers, never initialized.
// Keeps the library loaded, so the vendor interfaces it found stay valid.
class BackendProbe {
 public:
  // Throws CkrError when the library cannot be loaded; p11mux itself as the
  // backend probes as a 2.x module (C_Initialize reports that error).
  BackendProbe(const std::string& path, const CK_FUNCTION_LIST* self);
  BackendProbe(const BackendProbe&) = delete;  // one dlopen, one dlclose
  BackendProbe& operator=(const BackendProbe&) = delete;

  const BackendInterfaces& interfaces() const noexcept { return interfaces_; }

 private:
  SharedLibrary library_;
  BackendInterfaces interfaces_;
};

}  // namespace p11mux
