// Shared by the tests of the named test backends (race detector, slow, null):
// loading a module the way an application does, and libp11mux.so pointed at
// one through its normal configuration (P11MUX_MODULE).
#pragma once

#include <doctest/doctest.h>

#include <p11mux/pkcs11.h>

#include <dlfcn.h>
#include <stdlib.h>

#include <string>

namespace p11mux::backends_test {

inline void* open_library(const char* path) {
  void* lib = ::dlopen(path, RTLD_NOW | RTLD_LOCAL);
  REQUIRE_MESSAGE(lib != nullptr, ::dlerror());
  return lib;
}

template <class Fn>
Fn symbol(void* lib, const char* name) {
  auto fn = reinterpret_cast<Fn>(::dlsym(lib, name));
  REQUIRE_MESSAGE(static_cast<bool>(fn), name);
  return fn;
}

inline CK_FUNCTION_LIST* function_list(void* lib) {
  CK_FUNCTION_LIST* list = nullptr;
  REQUIRE(symbol<CK_C_GetFunctionList>(lib, "C_GetFunctionList")(&list) == CKR_OK);
  return list;
}

// The module's "PKCS 11" 3.0 list, or NULL if it offers none.
inline CK_FUNCTION_LIST_3_0* function_list_3_0(void* lib) {
  CK_INTERFACE* iface = nullptr;
  CK_VERSION v30{3, 0};
  char name[] = "PKCS 11";
  auto get = symbol<CK_C_GetInterface>(lib, "C_GetInterface");
  if (get(reinterpret_cast<CK_UTF8CHAR*>(name), &v30, &iface, 0) != CKR_OK) return nullptr;
  return static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
}

inline void* p11mux_library() {
  static void* lib = open_library(P11MUX_LIBRARY_PATH);
  return lib;
}

// Points libp11mux.so at a backend by environment, as a deployment would.
// The session mode comes from P11MUX_SESSION_MODE (ctest sets it per
// registration). Not thread-safe (setenv).
inline void use_backend(const char* path) {
  ::unsetenv("P11MUX_CONFIG");
  ::unsetenv("P11MUX_BACKEND_LOCKING");
  ::setenv("P11MUX_MODULE", path, 1);
  ::setenv("P11MUX_LOG_LEVEL", "error", 1);
}

inline CK_C_INITIALIZE_ARGS* os_locking() {
  static CK_C_INITIALIZE_ARGS args{nullptr, nullptr, nullptr, nullptr, CKF_OS_LOCKING_OK, nullptr};
  return &args;
}

inline std::string session_mode() {
  const char* env = ::getenv("P11MUX_SESSION_MODE");
  return env != nullptr && *env != '\0' ? env : "serialize";
}

}  // namespace p11mux::backends_test
