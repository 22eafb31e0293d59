// The faulty test module's control (tests/backends/faulty/faulty_control.h),
// reached in the instance the module under test loaded from `path`: to kill,
// revive or hang a member behind p11mux's back.
#pragma once

#include "doctest_ck.h"

#include "faulty_control.h"

#include <p11mux/pkcs11.h>

#include <dlfcn.h>

#include <string>

namespace p11test {

inline const FaultyControl& faulty_control(const std::string& path) {
  void* library = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // -z nodelete: never unloaded
  REQUIRE_MESSAGE(library != nullptr, ::dlerror());
  auto get = reinterpret_cast<FaultyGetControlFn>(::dlsym(library, "faulty_get_control"));
  REQUIRE(static_cast<bool>(get));
  return *get();
}

// The faulty (or slow) module's own function list, the instance the module
// under test loaded from `path`: its slot IDs are the target's, which
// replica_slots finds by token label.
inline const CK_FUNCTION_LIST& loaded_functions(const std::string& path) {
  void* library = ::dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(library != nullptr);
  auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(library, "C_GetFunctionList"));
  CK_FUNCTION_LIST* list = nullptr;
  REQUIRE(get(&list) == CKR_OK);
  return *list;
}

}  // namespace p11test
