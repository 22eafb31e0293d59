// The faulty test module's control (tests/backends/faulty/faulty_control.h),
// reached in the instance the module under test loaded from `path`: to kill,
// revive or hang a member behind p11mux's back.
#pragma once

#include "doctest_ck.h"

#include "faulty_control.h"

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

}  // namespace p11test
