// A dlopen'ed library, closed when the last owner lets go of it.
#pragma once

#include <string>

namespace p11mux {

class SharedLibrary {
 public:
  // Throws CkrError(CKR_GENERAL_ERROR) naming the path and dlerror()'s reason.
  explicit SharedLibrary(const std::string& path);
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
};

}  // namespace p11mux
