// A dlopen'ed library, closed when the last owner lets go of it.
#pragma once

#include <string>

namespace p11mux {

// Finds a symbol of a module that was never loaded: a unit test's fake module
// (tests/unit/backend_loader_test.cpp). NULL when it has no such symbol.
using SymbolLookup = void* (*)(const char* name);

class SharedLibrary {
 public:
  // Throws CkrError(CKR_GENERAL_ERROR) naming the path and dlerror()'s reason.
  explicit SharedLibrary(const std::string& path);
  // A module already in the process, whose symbols `lookup` finds: nothing
  // is loaded or unloaded.
  explicit SharedLibrary(SymbolLookup lookup) noexcept : handle_(nullptr), lookup_(lookup) {}
  ~SharedLibrary();
  SharedLibrary(const SharedLibrary&) = delete;  // one dlopen, one dlclose
  SharedLibrary& operator=(const SharedLibrary&) = delete;

  // nullptr when the library has no such symbol.
  void* symbol(const char* name) const noexcept;
  // Keeps the library mapped for the rest of the process: for code that may
  // still be running in it (a thread stuck in the backend, a forked child).
  void leak() noexcept { handle_ = nullptr; }

 private:
  void* handle_;
  SymbolLookup lookup_ = nullptr;
};

}  // namespace p11mux
