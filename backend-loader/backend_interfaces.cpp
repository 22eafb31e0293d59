#include "backend_interfaces.hpp"

#include <algorithm>
#include <cstring>

namespace p11mux {
namespace {

// More than any real module offers; bounds what a broken count could allocate.
constexpr CK_ULONG kMaxInterfaces = 256;

bool usable(const CK_INTERFACE* i) noexcept {
  return i != nullptr && i->pInterfaceName != nullptr && i->pFunctionList != nullptr;
}

// The backend's C_GetInterfaceList, copied; empty when it has none or it fails.
std::vector<CK_INTERFACE> interface_list(const SharedLibrary& library) {
  auto get_list = reinterpret_cast<CK_C_GetInterfaceList>(library.symbol("C_GetInterfaceList"));
  if (get_list == nullptr) return {};
  // The count can only change if the module changes under us; a few tries are plenty.
  for (int attempt = 0; attempt < 3; ++attempt) {
    CK_ULONG count = 0;
    if (get_list(nullptr, &count) != CKR_OK || count > kMaxInterfaces) return {};
    std::vector<CK_INTERFACE> list(count);
    CK_RV rv = get_list(list.data(), &count);
    if (rv == CKR_OK && count <= list.size()) {
      list.resize(count);
      return list;
    }
    if (rv != CKR_BUFFER_TOO_SMALL) return {};
  }
  return {};
}

}  // namespace

bool is_standard_interface(const CK_INTERFACE& i) noexcept {
  return std::strcmp(reinterpret_cast<const char*>(i.pInterfaceName), kStandardInterfaceName) == 0;
}

CK_VERSION interface_version(const CK_INTERFACE& i) noexcept {
  return *static_cast<const CK_VERSION*>(i.pFunctionList);
}

BackendInterfaces discover_interfaces(const SharedLibrary& library) {
  BackendInterfaces found;
  auto get_interface = reinterpret_cast<CK_C_GetInterface>(library.symbol("C_GetInterface"));
  if (get_interface == nullptr) return found;  // a 2.x module

  // Ask for exactly the interface p11mux forwards to. An answer under another
  // name (a vendor's table, any layout) or that claims another major version
  // is not trusted to be a 3.0 function list.
  CK_VERSION v30{3, 0};
  CK_INTERFACE* standard = nullptr;
  auto* name = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(kStandardInterfaceName));
  if (get_interface(name, &v30, &standard, 0) == CKR_OK && usable(standard) &&
      is_standard_interface(*standard) && interface_version(*standard).major == 3) {
    found.v3 = static_cast<const CK_FUNCTION_LIST_3_0*>(standard->pFunctionList);
  }

  for (const CK_INTERFACE& entry : interface_list(library)) {
    if (!usable(&entry)) continue;
    if (is_standard_interface(entry)) {
      // A module offering only a later 3.x: those lists extend the 3.0 layout.
      if (found.v3 == nullptr && interface_version(entry).major == 3) {
        found.v3 = static_cast<const CK_FUNCTION_LIST_3_0*>(entry.pFunctionList);
      }
      continue;
    }
    // The list holds copies; C_GetInterface gives the backend's own object,
    // which p11mux can hand out unchanged and which stays valid.
    CK_VERSION version = interface_version(entry);
    CK_INTERFACE* own = nullptr;
    if (get_interface(entry.pInterfaceName, &version, &own, entry.flags) != CKR_OK ||
        !usable(own)) {
      continue;
    }
    if (std::find(found.vendor.begin(), found.vendor.end(), own) == found.vendor.end()) {
      found.vendor.push_back(own);
    }
  }
  return found;
}

bool is_self(const SharedLibrary& library, const CK_FUNCTION_LIST* self) noexcept {
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(library.symbol("C_GetFunctionList"));
  CK_FUNCTION_LIST* list = nullptr;
  return self != nullptr && get_list != nullptr && get_list(&list) == CKR_OK && list == self;
}

BackendProbe::BackendProbe(const std::string& path, const CK_FUNCTION_LIST* self) : library_(path) {
  // Asking p11mux itself would re-enter this probe: it has nothing to offer.
  if (!is_self(library_, self)) interfaces_ = discover_interfaces(library_);
}

}  // namespace p11mux
